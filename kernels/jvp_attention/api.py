"""Public op: causal GQA attention returning (out, lse), with fused reverse- AND forward-mode rules.

Why it exists: an Energy-Based Transformer's loss differentiates the inner gradient dE/dp again. Its "jvp"
second-order mode (models.ebt) takes that as the gradient of a JVP, so attention must be jvp'd and the
JVP reverse-differentiated, which no fused attention (cuDNN, jax.nn) allows; jnp attention then stores and
re-reads float32 score-sized tensors. Here every pass is a flash-style kernel that never writes S x S:
  forward(q, k, v[, tq], seg)                         -> o, lse[, to, tlse]       (reference eq. 1)
  backward(q, k, v, tq, lse, tlse, go, gto, gd, r, seg) -> gq, gk, gv, gtq          (reference eq. 3)
Two rule sets share them:
  * reverse mode (the default): custom VJP; backward with tq = None is the flash backward (+ lse cotangent).
  * forward mode (`forward_mode=True`, or inside `with forward_mode():`): custom JVP whose tangent comes
    from the forward with tq; the tangent op itself has a custom VJP (backward with tq), so grad(jvp(.))
    works. Forward-mode ops cannot be reverse-differentiated directly (JAX would have to transpose the
    kernel) and reverse-mode ops cannot be jvp'd, hence the explicit switch.
Keys/values have no tangent on the fused path (in an EBT they come from the observed stream's cache, which
does not depend on the candidate); a k/v tangent falls back to autodiff of the jnp oracle.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from kernels import common
from kernels.jvp_attention import reference
from kernels.op import PLATFORMS, Op, requires_jax_triton

_OP = "jvp_attention"
_FORWARD_MODE = contextvars.ContextVar("jvp_attention_forward_mode", default=False)
F32 = jnp.float32


@contextlib.contextmanager
def forward_mode(enabled: bool = True):
    """Inside (at trace time), `attention(...)` without an explicit forward_mode uses its forward-mode rules:
    wrap code that will be jax.jvp'd (e.g. the JVP inside a custom VJP)."""
    token = _FORWARD_MODE.set(enabled)
    try:
        yield
    finally:
        _FORWARD_MODE.reset(token)


def _rowdot(a, b):
    """<a_i, b_i> per row: [B,S,H,D] x2 -> float32 [B,H,S]."""
    return jnp.swapaxes(jnp.sum(a.astype(F32) * b.astype(F32), -1), 1, 2)


def row_terms(o, to, tlse, go, glse, gto, gtlse):
    """Eq. (2) of the reference: (gd, r) float32 [B,H,S]; gd None without a tangent (to None)."""
    if to is None:
        return None, _rowdot(go, o) - glse
    gd = gtlse - _rowdot(gto, o)
    return gd, _rowdot(go, o) + _rowdot(gto, to) + gd * tlse - glse


@functools.cache
def _kernels(impl: str):
    if impl == "triton":
        from kernels.jvp_attention import triton_gpu

        return triton_gpu.forward, triton_gpu.backward
    if impl == "pallas":
        from kernels.jvp_attention import pallas_tpu

        return pallas_tpu.forward, pallas_tpu.backward
    return reference.forward, reference.backward


@functools.cache
def _ops(impl: str):
    """(reverse-mode op, forward-mode op) for one implementation; both (q, k, v, seg) -> (o, lse)."""
    fwd, bwd = _kernels(impl)

    # reverse mode ------------------------------------------------------------------------------------
    @jax.custom_vjp
    def rev(q, k, v, seg):
        return fwd(q, k, v, None, seg)

    def rev_fwd(q, k, v, seg):
        o, lse = fwd(q, k, v, None, seg)
        return (o, lse), (q, k, v, seg, o, lse)

    def rev_bwd(res, cts):
        q, k, v, seg, o, lse = res
        go, glse = cts
        _, r = row_terms(o, None, None, go, glse, None, None)
        gq, gk, gv, _ = bwd(q, k, v, None, lse, None, go.astype(q.dtype), None, None, r, seg)
        return gq.astype(q.dtype), gk.astype(k.dtype), gv.astype(v.dtype), None

    rev.defvjp(rev_fwd, rev_bwd)

    # forward mode: the tangent op (o, lse, to, tlse) with its own VJP --------------------------------
    @jax.custom_vjp
    def tangent(q, k, v, tq, seg):
        return fwd(q, k, v, tq, seg)

    def tangent_fwd(q, k, v, tq, seg):
        outs = fwd(q, k, v, tq, seg)
        return outs, (q, k, v, tq, seg) + outs

    def tangent_bwd(res, cts):
        q, k, v, tq, seg, o, lse, to, tlse = res
        go, glse, gto, gtlse = cts
        gd, r = row_terms(o, to, tlse, go, glse, gto, gtlse)
        gq, gk, gv, gtq = bwd(q, k, v, tq, lse, tlse, go.astype(q.dtype), gto.astype(q.dtype), gd, r, seg)
        return (gq.astype(q.dtype), gk.astype(k.dtype), gv.astype(v.dtype), gtq.astype(tq.dtype),
                None)

    tangent.defvjp(tangent_fwd, tangent_bwd)

    @jax.custom_jvp
    def fwd_mode(q, k, v, seg):
        return fwd(q, k, v, None, seg)

    def fwd_mode_jvp(primals, tangents):
        q, k, v, seg = primals
        tq, tk, tv, _ = tangents
        if not (isinstance(tk, SymbolicZero) and isinstance(tv, SymbolicZero)):  # not an EBT case: autodiff
            tans = tuple(jnp.zeros_like(x) if isinstance(t, SymbolicZero) else t
                         for x, t in zip(primals[:3], tangents[:3]))
            return jax.jvp(lambda q, k, v: reference.attention(q, k, v, seg), (q, k, v), tans)
        if isinstance(tq, SymbolicZero):
            o, lse = fwd_mode(q, k, v, seg)
            return (o, lse), (jnp.zeros_like(o), jnp.zeros_like(lse))
        o, lse, to, tlse = tangent(q, k, v, tq, seg)
        return (o, lse), (to, tlse)

    fwd_mode.defjvp(fwd_mode_jvp, symbolic_zeros=True)
    return rev, fwd_mode


class JVPAttention(Op):
    name = _OP
    implementations = {"xla": PLATFORMS, "pallas": ("cpu", "tpu"), "triton": ("gpu",)}
    preference = {"gpu": ("triton",), "tpu": ("pallas",)}

    def validate(self, q, k, v, segment_ids=None):
        common.check_attention_shapes(_OP, q, k, v, segment_ids)
        if len({q.dtype, k.dtype, v.dtype}) != 1 or not jnp.issubdtype(q.dtype, jnp.floating):
            raise ValueError(f"{_OP}: q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")

    def facts(self, q, k, v, segment_ids=None):
        return {"head_dim": q.shape[-1]}

    def unsupported(self, implementation, *, head_dim):
        if implementation != "triton":
            return None
        if head_dim & (head_dim - 1) or not 16 <= head_dim <= 256:
            return f"needs a power-of-two head_dim in [16, 256], got {head_dim} (use implementation='xla')"
        return requires_jax_triton()


OP = JVPAttention()
IMPLEMENTATIONS = OP.IMPLEMENTATIONS


def choose_implementation(implementation: str | None, head_dim: int) -> str:
    """The implementation a call with this head_dim uses here: None -> 'triton' on a GPU with jax-triton and a
    power-of-two head_dim in [16, 256], 'pallas' on a TPU, else 'xla'."""
    return OP.pick(implementation, head_dim=head_dim)


def attention(q, k, v, segment_ids=None, *, forward_mode: bool | None = None, implementation: str | None = None):
    """Causal grouped-query attention with its log-sum-exp: o_i = softmax_j(c q_i.k_j) v_j over keys j <= i of
    i's segment, c = 1/sqrt(head_dim).

    Args:
      q: [batch, seq, heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim] (heads % kv_heads == 0).
      segment_ids: int [batch, seq] or None (packed documents never see each other).
      forward_mode: use the forward-mode rules (jax.jvp, and grad of the jvp) instead of the reverse-mode
        ones (jax.grad / vjp, to first order). None reads the `forward_mode()` context (default False).
      implementation: "xla" (jnp, the reference equations), "pallas" (TPU kernels; interpret mode on CPU),
        "triton" (GPU kernels) or None (best here).
    Returns:
      o [batch, seq, heads, head_dim] in q.dtype and lse float32 [batch, heads, seq].
    """
    impl = OP.select(implementation, q, k, v, segment_ids)
    rev, fwd_mode = _ops(impl)
    use_fwd = _FORWARD_MODE.get() if forward_mode is None else forward_mode
    op = fwd_mode if use_fwd else rev
    if impl != "pallas":
        return op(q, k, v, segment_ids)
    # Mosaic kernels run per chip: batch rows and K/V-head groups split over the mesh (common.partitioned)
    return common.partitioned(op, (q, k, v, segment_ids), ("b.h.", "b.h.", "b.h.", "b."), ("b.h.", "bh."))
