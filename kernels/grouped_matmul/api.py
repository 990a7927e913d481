"""Public grouped matmul: argument checks, `implementation=` dispatch and the custom VJP.

    out[i] = lhs[i] @ rhs[g(i)]        lhs [m, k] rows sorted by group, rhs [G, k, n], group_sizes [G] int32

Rows at or past sum(group_sizes) give zeros (sum(group_sizes) <= m is the caller's contract). Backward,
with dout [m, n]:  dlhs = grouped_matmul(dout, rhs^T)  and  drhs[g] = lhs_g^T @ dout_g  (the transposed
grouped matmul, `transposed_grouped_matmul`). Every implementation provides both launches:
  xla     jax.lax.ragged_dot / ragged_dot_general (any backend)
  pallas  kernels/grouped_matmul/pallas_tpu.py (TPU; interpret mode on CPU)
  triton  kernels/grouped_matmul/triton_gpu.py (jax-triton, GPU)
Accumulation is float32; outputs take lhs's dtype.

`swiglu_grouped_matmul` fuses the gate and up projections of SwiGLU experts (DeepSeekMoE Eq. 3 with
FFN(u) = (silu(u Wg) * (u Wu)) Wd):  a = silu(lhs @ Wg[g]) * (lhs @ Wu[g]).  Triton runs it as one kernel
(one pass over the rows, SwiGLU epilogue); xla and pallas compose it from their gmm launches. Its VJP
keeps h = lhs Wg, u = lhs Wu from the forward (cheaper to store than to recompute) and computes
  dh = da * u * silu'(h),  du = da * silu(h),  dlhs = dh Wg^T + du Wu^T (one two-term gmm),
  dWg[g] = lhs_g^T dh_g,  dWu[g] = lhs_g^T du_g.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kernels import common

_OP = "grouped_matmul"
_SUPPORTED = {"xla": ("cpu", "gpu", "tpu"), "pallas": ("cpu", "tpu"), "triton": ("gpu",)}
_PREFERRED = {"cpu": "xla", "gpu": "triton", "tpu": "pallas"}


def _xla_gmm(lhs, rhs, group_sizes, transpose_rhs=False):
    rhs = jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs
    return jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32).astype(lhs.dtype)


def _xla_tgmm(lhs, dout, group_sizes):
    dims = jax.lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(((0,), (0,)), ((), ())), lhs_ragged_dimensions=[0], rhs_group_dimensions=[]
    )
    out = jax.lax.ragged_dot_general(lhs, dout, group_sizes, dims, preferred_element_type=jnp.float32)
    return out.astype(lhs.dtype)


def _swiglu(h, u, dtype):
    h = h.astype(jnp.float32)
    return (h * jax.nn.sigmoid(h) * u.astype(jnp.float32)).astype(dtype)


class _Launches(NamedTuple):
    gmm: Callable  # (lhs, rhs, gs, transpose_rhs=False) -> [m, n]
    tgmm: Callable  # (lhs, dout, gs) -> [G, k, n]
    gmm2: Callable  # (lhs, rhs, lhs2, rhs2, gs, transpose_rhs) -> lhs @ rhs[g] + lhs2 @ rhs2[g]
    swiglu: Callable  # (lhs, w_gate, w_up, gs, store_hu) -> a, or (a, h, u)


def _composed(gmm, tgmm) -> _Launches:
    """The two-term gmm and the SwiGLU pair from separate gmm launches (implementations without fused kernels)."""
    def gmm2(l1, r1, l2, r2, gs, t):
        return (gmm(l1, r1, gs, t).astype(jnp.float32) + gmm(l2, r2, gs, t).astype(jnp.float32)).astype(l1.dtype)

    def swiglu(lhs, wg, wu, gs, store_hu):
        h, u = gmm(lhs, wg, gs), gmm(lhs, wu, gs)
        a = _swiglu(h, u, lhs.dtype)
        return (a, h, u) if store_hu else a

    return _Launches(gmm, tgmm, gmm2, swiglu)


@functools.cache
def _launches(name: str) -> _Launches:
    """The launches of one implementation."""
    if name == "xla":
        return _composed(_xla_gmm, _xla_tgmm)
    if name == "pallas":
        from kernels.grouped_matmul import pallas_tpu

        return _composed(lambda l, r, g, t=False: pallas_tpu.gmm(l, r, g, transpose_rhs=t), pallas_tpu.tgmm)
    if name == "triton":
        from kernels.grouped_matmul import triton_gpu as tg

        return _Launches(
            gmm=lambda l, r, g, t=False: tg.gmm(l, r, g, transpose_rhs=t),
            tgmm=tg.tgmm,
            gmm2=lambda l1, r1, l2, r2, g, t: tg.gmm(l1, r1, g, transpose_rhs=t, lhs2=l2, rhs2=r2),
            swiglu=lambda l, wg, wu, g, store_hu: tg.gmm_swiglu(l, wg, wu, g, store_hu=store_hu),
        )
    raise AssertionError(name)


@functools.cache
def _op(name: str):
    gmm, tgmm = _launches(name)[:2]

    @jax.custom_vjp
    def op(lhs, rhs, group_sizes):
        return gmm(lhs, rhs, group_sizes)

    def fwd(lhs, rhs, group_sizes):
        return gmm(lhs, rhs, group_sizes), (lhs, rhs, group_sizes)

    def bwd(res, dout):
        lhs, rhs, group_sizes = res
        dout = dout.astype(lhs.dtype)
        dlhs = gmm(dout, rhs.astype(lhs.dtype), group_sizes, True)
        drhs = tgmm(lhs, dout, group_sizes)
        return dlhs.astype(lhs.dtype), drhs.astype(rhs.dtype), None

    op.defvjp(fwd, bwd)
    return op


@functools.cache
def _swiglu_op(name: str):
    launch = _launches(name)

    @jax.custom_vjp
    def op(lhs, w_gate, w_up, group_sizes):
        return launch.swiglu(lhs, w_gate, w_up, group_sizes, False)

    def fwd(lhs, w_gate, w_up, group_sizes):
        a, h, u = launch.swiglu(lhs, w_gate, w_up, group_sizes, True)
        return a, (lhs, w_gate, w_up, group_sizes, h, u)

    def bwd(res, da):
        lhs, w_gate, w_up, group_sizes, h, u = res
        h, u, da = h.astype(jnp.float32), u.astype(jnp.float32), da.astype(jnp.float32)
        sig = jax.nn.sigmoid(h)
        # One XLA elementwise pass (reads da, h, u; writes dh, du); rows past the groups have h = u = 0.
        dh = (da * u * sig * (1.0 + h * (1.0 - sig))).astype(lhs.dtype)
        du = (da * h * sig).astype(lhs.dtype)
        dlhs = launch.gmm2(dh, w_gate, du, w_up, group_sizes, True)
        dwg = launch.tgmm(lhs, dh, group_sizes)
        dwu = launch.tgmm(lhs, du, group_sizes)
        return dlhs.astype(lhs.dtype), dwg.astype(w_gate.dtype), dwu.astype(w_up.dtype), None

    op.defvjp(fwd, bwd)
    return op


def _match_varying_axes(x: jax.Array, like: jax.Array) -> jax.Array:
    """Inside jax.shard_map, marks x as varying over the manual axes `like` varies over, so the custom
    VJP's cotangent types match its inputs (the transpose of that cast is the psum over those axes)."""
    try:
        missing = tuple(sorted(jax.typeof(like).manual_axis_type.varying - jax.typeof(x).manual_axis_type.varying))
    except AttributeError:  # an older jax spells it `.vma`
        missing = tuple(sorted(getattr(jax.typeof(like), "vma", set()) - getattr(jax.typeof(x), "vma", set())))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def _check(lhs, rhs, group_sizes):
    if lhs.ndim != 2 or rhs.ndim != 3:
        raise ValueError(f"{_OP}: need lhs [m, k] and rhs [groups, k, n]; got {lhs.shape} and {rhs.shape}")
    if lhs.shape[1] != rhs.shape[1]:
        raise ValueError(f"{_OP}: lhs has k={lhs.shape[1]} but rhs has k={rhs.shape[1]}; rhs must be [groups, k, n]")
    if group_sizes.shape != (rhs.shape[0],) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(
            f"{_OP}: group_sizes must be an integer array of shape ({rhs.shape[0]},), got {group_sizes.dtype}{group_sizes.shape}"
        )
    if not jnp.issubdtype(lhs.dtype, jnp.floating) or not jnp.issubdtype(rhs.dtype, jnp.floating):
        raise ValueError(f"{_OP}: lhs and rhs must be floating point, got {lhs.dtype} and {rhs.dtype}")


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, implementation: str | None = None):
    """Grouped matmul: lhs [m, k] (rows sorted by group), rhs [G, k, n], group_sizes [G] int32 -> [m, n].

    Rows past sum(group_sizes) are zero. Differentiable in lhs and rhs (custom VJP with the transposed
    grouped matmul). `implementation`: None (best for the backend), "xla", "pallas" or "triton".
    rhs is cast to lhs's dtype for the product (bf16 compute with f32 master weights).
    """
    _check(lhs, rhs, group_sizes)
    name = common.resolve_implementation(_OP, implementation, supported=_SUPPORTED, preferred=_PREFERRED)
    if name == "triton" and not common.has_jax_triton():
        raise ValueError(f"{_OP}: implementation='triton' needs jax-triton 0.3.1 (pip install jax-triton==0.3.1)")
    rhs = rhs.astype(lhs.dtype)
    lhs, rhs = _match_varying_axes(lhs, rhs), _match_varying_axes(rhs, lhs)
    group_sizes = _match_varying_axes(group_sizes.astype(jnp.int32), lhs)
    return _op(name)(lhs, rhs, group_sizes)


def swiglu_grouped_matmul(lhs: jax.Array, w_gate: jax.Array, w_up: jax.Array, group_sizes: jax.Array, *,
                          implementation: str | None = None) -> jax.Array:
    """SwiGLU expert input projections: silu(lhs @ w_gate[g]) * (lhs @ w_up[g]) -> [m, n] (lhs dtype).

    lhs [m, k] rows sorted by group, w_gate / w_up [G, k, n], group_sizes [G] int32; rows past
    sum(group_sizes) are zero. Differentiable in lhs, w_gate, w_up (custom VJP, see the module docstring).
    """
    if w_gate.shape != w_up.shape:
        raise ValueError(f"swiglu_{_OP}: w_gate {w_gate.shape} and w_up {w_up.shape} must have the same shape [G, k, n]")
    _check(lhs, w_gate, group_sizes)
    _check(lhs, w_up, group_sizes)
    name = common.resolve_implementation(_OP, implementation, supported=_SUPPORTED, preferred=_PREFERRED)
    if name == "triton" and not common.has_jax_triton():
        raise ValueError(f"{_OP}: implementation='triton' needs jax-triton 0.3.1 (pip install jax-triton==0.3.1)")
    w_gate, w_up = (_match_varying_axes(w.astype(lhs.dtype), lhs) for w in (w_gate, w_up))
    lhs = _match_varying_axes(_match_varying_axes(lhs, w_gate), w_up)
    group_sizes = _match_varying_axes(group_sizes.astype(jnp.int32), lhs)
    return _swiglu_op(name)(lhs, w_gate, w_up, group_sizes)


def transposed_grouped_matmul(lhs: jax.Array, dout: jax.Array, group_sizes: jax.Array, *, implementation=None):
    """out[g] = lhs_g^T @ dout_g over group g's rows: lhs [m, k], dout [m, n] -> [G, k, n] (forward only)."""
    if lhs.ndim != 2 or dout.ndim != 2 or lhs.shape[0] != dout.shape[0]:
        raise ValueError(f"transposed_{_OP}: need lhs [m, k] and dout [m, n]; got {lhs.shape} and {dout.shape}")
    name = common.resolve_implementation(_OP, implementation, supported=_SUPPORTED, preferred=_PREFERRED)
    return _launches(name)[1](lhs, dout.astype(lhs.dtype), group_sizes.astype(jnp.int32))
