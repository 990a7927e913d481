"""Public SSD op: `ssd(x, dt, A, B, C, ...)` with implementation= dispatch and one custom VJP for every backend.

All implementations share the chunked algorithm in this file (pad, cumsum of dt*A per chunk, stages, and the
closed-form backward); an implementation only supplies the five heavy stages (see reference.py for their
meaning). The backward needs no Q x Q matrix from the forward: residuals are the inputs plus the chunk-boundary
states [b, c+1, h, P, N] float32 (memory linear in sequence length).

Backward (derived for this repo, checked against a float64 NumPy recurrence in tests): with dS the reverse
state recurrence dS_c = exp(cs_last_c) dS_{c+1} + sum_t exp(cs_t) dy_t^T C_t (dS_final = final-state cotangent),
the cotangent of the in-chunk cumsum is
    dcs_t = C_t.dC_t^h - dt_t x_t.W_t + [t = last] <dS_{c+1}, S_{c+1}>
and da = reverse-cumsum(dcs) within the chunk, ddt = x.W + A da, dA = sum dt da.

Packed rows (segment_ids, the recurrence restarts at every document; reference.py module doc): every
implementation, through the same custom VJP. With r the chunk-relative document index (reference.chunk_documents)
the forward multiplies four 0/1 masks into factors it already has: chunk-state weights by f_s = [r_s = r_last],
the chunk decay by k_c = [r_last = 0] (here), the intra-chunk decay by [r_t = r_s] and the carried-state term by
e_t = [r_t = 0] (inside chunk_scan). The masks are functions of the integer ids only, so each masked factor
m exp(u) has derivative m exp(u) in u: zero where masked, unchanged elsewhere. The backward therefore keeps the
formulas above with the same masks in the same places: the reverse state recurrence runs with k_c and
e_t exp(cs_t) as its decay and weights, chunk_bwd_dx_dB masks its t-sum by [r_t = r_s] and its dS_{c+1} terms by
f_s, chunk_bwd_dC its s-sum by [r_s = r_t] and its state term by e_t, and dcs_t is the same expression in the
masked W and dC. The carried term stays <dS_{c+1}, S_{c+1}>: d/dcs_last of k_c exp(cs_last) S_c +
sum_s f_s exp(cs_last - cs_s) dt_s x_s B_s^T is that (masked) sum itself, i.e. S_{c+1}. Kernels get r (int32
[b, c, Q], one int per position), never a dense mask; without segment_ids no mask is formed anywhere.
"""
from __future__ import annotations

import functools
import types

import jax
import jax.numpy as jnp

from kernels import common
from kernels.op import PLATFORMS, Op, requires_jax_triton
from kernels.ssd import reference

F32 = jnp.float32

_XLA_STAGES = types.SimpleNamespace(
    chunk_state=reference.chunk_state,
    state_passing=reference.state_passing,
    chunk_scan=reference.chunk_scan,
    chunk_bwd_dx_dB=reference.chunk_bwd_dx_dB,
    chunk_bwd_dC=reference.chunk_bwd_dC,
)


def _stages(implementation: str):
    if implementation == "xla":
        return _XLA_STAGES
    if implementation == "pallas":
        from kernels.ssd import pallas_tpu

        return pallas_tpu.STAGES
    if implementation == "triton":
        from kernels.ssd import triton_gpu

        return triton_gpu.STAGES
    raise AssertionError(implementation)


class SSD(Op):
    name = "ssd"
    implementations = {"xla": PLATFORMS, "pallas": ("cpu", "tpu"), "triton": ("gpu",)}
    preference = {"gpu": ("triton",), "tpu": ("pallas",)}

    def validate(self, x, dt, A, B, C, D, initial_state, chunk_size, segment_ids=None):
        def err(msg):
            raise ValueError(f"ssd: {msg}")

        if x.ndim != 4:
            err(f"x must be [batch, seq, heads, head_dim], got shape {x.shape}")
        b, L, h, P = x.shape
        if dt.shape != (b, L, h):
            err(f"dt must be [batch, seq, heads] = {(b, L, h)}, got {dt.shape}")
        if A.shape != (h,):
            err(f"A must be [heads] = {(h,)}, got {A.shape}")
        if B.ndim != 4 or B.shape[:2] != (b, L):
            err(f"B must be [batch, seq, groups, d_state] with batch, seq = {(b, L)}, got {B.shape}")
        if C.shape != B.shape:
            err(f"C must have B's shape {B.shape}, got {C.shape}")
        g, N = B.shape[2], B.shape[3]
        if g < 1 or h % g:
            err(f"heads ({h}) must be a multiple of groups ({g})")
        if D is not None and D.shape != (h,):
            err(f"D must be [heads] = {(h,)} or None, got {D.shape}")
        if initial_state is not None and initial_state.shape != (b, h, P, N):
            err(f"initial_state must be [batch, heads, head_dim, d_state] = {(b, h, P, N)}, got {initial_state.shape}")
        common.check_segment_ids(self.name, segment_ids, b, L)
        if not isinstance(chunk_size, int) or chunk_size < 1:
            err(f"chunk_size must be a positive int, got {chunk_size!r}")
        for name, v in (("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C)):
            if not jnp.issubdtype(v.dtype, jnp.floating):
                err(f"{name} must be floating point, got {v.dtype}")

    def facts(self, x, dt, A, B, C, D, initial_state, chunk_size, segment_ids=None):
        return {"segments": segment_ids is not None}

    def unsupported(self, implementation, *, segments=False):
        # segment_ids (document resets) run on every implementation
        return requires_jax_triton() if implementation == "triton" else None


OP = SSD()
IMPLEMENTATIONS = OP.IMPLEMENTATIONS


def ssd(x, dt, A, B, C, *, chunk_size=256, D=None, initial_state=None, return_final_state=False,
        implementation=None, segment_ids=None):
    """Mamba-2 SSD scan: H_t = exp(dt_t A) H_{t-1} + dt_t x_t B_t^T, y_t = H_t C_t + D x_t.

    Args:
      x: [batch, seq, heads, head_dim]; dt: [batch, seq, heads] positive (softplus and bias already applied);
      A: [heads] negative; B, C: [batch, seq, groups, d_state], heads a multiple of groups;
      chunk_size: SSD chunk length Q (any seq; padded internally; a seq shorter than Q runs as one chunk of
        whole 16-row tiles, the Triton kernels' unit, instead of being padded to Q);
      D: [heads] skip connection or None; initial_state: [batch, heads, head_dim, d_state] or None (zeros);
      implementation: "xla", "pallas", "triton" or None (per backend);
      segment_ids: int [batch, seq] or None (packed rows, like mamba_ssm's seq_idx): the state restarts from 0
        (H_t = dt_t x_t B_t^T) at every position whose id differs from the previous position's; padding id 0
        runs are documents of their own; initial_state feeds only the row's first document.
    Returns y with x's shape and dtype, and with return_final_state=True also the float32 final state (the
    state after the last position, i.e. of the row's last document).
    """
    if segment_ids is not None:
        segment_ids = jnp.asarray(segment_ids)
    impl = OP.select(implementation, x, dt, A, B, C, D, initial_state, chunk_size, segment_ids)
    b, L, h, P = x.shape
    N = B.shape[3]
    chunk_size = min(chunk_size, -(-max(L, 1) // 16) * 16)
    if D is None:
        D = jnp.zeros((h,), F32)
    if initial_state is None:
        initial_state = jnp.zeros((b, h, P, N), F32)
    run = functools.partial(_ssd_segments, chunk_size, impl)
    args = (x, dt, A, B, C, D, initial_state, segment_ids)
    if impl == "pallas":
        # Mosaic kernels run per chip: batch rows and heads split over the mesh (common.partitioned); B and C
        # split with the heads only where every chip's heads keep their own groups; segment_ids with the rows.
        gd = "b.h." if B.shape[2] > 1 else "b..."
        y, final = common.partitioned(run, args, ("b.h.", "b.h", "h", gd, gd, "h", "bh..", "b."), ("b.h.", "bh.."))
    else:
        y, final = run(*args)
    return (y, final) if return_final_state else y


def _ssd_segments(chunk_size, impl, x, dt, A, B, C, D, init, segment_ids):
    """segment_ids [b, L] (or None) -> chunk-relative document indices, then the custom-VJP op (per shard under
    common.partitioned: the indices depend on the row only)."""
    docs = None if segment_ids is None else reference.chunk_documents(segment_ids, chunk_size)
    return _ssd(chunk_size, impl, x, dt, A, B, C, D, init, docs)


def _chunked(chunk_size, x, dt, A, B, C):
    """Pads seq to a multiple of Q and reshapes: x -> [b,c,Q,h,P], B/C -> [b,c,Q,g,N], dt/cs -> [b,h,c,Q] f32."""
    b, L, h, P = x.shape
    Q = chunk_size
    pad = (-L) % Q
    padseq = lambda v: jnp.pad(v, [(0, 0), (0, pad)] + [(0, 0)] * (v.ndim - 2)) if pad else v
    nc = (L + pad) // Q
    xc = padseq(x).reshape(b, nc, Q, h, P)
    Bc = padseq(B).reshape(b, nc, Q, *B.shape[2:])
    Cc = padseq(C).reshape(b, nc, Q, *C.shape[2:])
    dtc = jnp.moveaxis(padseq(dt).astype(F32), 1, 2).reshape(b, h, nc, Q)
    cs = jnp.cumsum(dtc * A.astype(F32)[None, :, None, None], axis=-1)
    return xc, dtc, cs, Bc, Cc


def _unchunk(v, L):
    b, c, Q = v.shape[:3]
    return v.reshape(b, c * Q, *v.shape[3:])[:, :L]


def _doc_gates(docs, cs):
    """(f [b,h,c,Q]: r_s = r_last, k [b,h,c]: r_last = 0) as float32 0/1 multipliers, or (1, 1) without docs."""
    if docs is None:
        return 1.0, 1.0
    f = (docs == docs[..., -1:])[:, None].astype(F32)
    k = (docs[..., -1] == 0)[:, None].astype(F32)
    return jnp.broadcast_to(f, cs.shape), jnp.broadcast_to(k, cs.shape[:-1])


def _forward(chunk_size, impl, x, dt, A, B, C, D, init, docs=None):
    """The chunked forward: y [b, L, h, P] in x.dtype and states [b, c+1, h, P, N] f32. Plain jnp for impl='xla',
    so jax autodiff through it is the tests' second reference for the custom VJP."""
    st = _stages(impl)
    xc, dtc, cs, Bc, Cc = _chunked(chunk_size, x, dt, A, B, C)
    f, k = _doc_gates(docs, cs)
    # with docs: chunk states only from the chunk-end document; no carry through a chunk that contains a reset
    w = dtc * jnp.exp(cs[..., -1:] - cs) * f
    decay = jnp.exp(cs[..., -1]) * k
    y_kw = {} if docs is None else {"docs": docs}
    states = st.state_passing(st.chunk_state(xc, Bc, w), decay, init.astype(F32))
    y = st.chunk_scan(xc, dtc, cs, Bc, Cc, states, D, **y_kw)
    return _unchunk(y, x.shape[1]).astype(x.dtype), states


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _ssd(chunk_size, impl, x, dt, A, B, C, D, init, docs):
    y, states = _forward(chunk_size, impl, x, dt, A, B, C, D, init, docs)
    return y, states[:, -1]


def _ssd_fwd(chunk_size, impl, x, dt, A, B, C, D, init, docs):
    y, states = _forward(chunk_size, impl, x, dt, A, B, C, D, init, docs)
    return (y, states[:, -1]), (x, dt, A, B, C, D, init, docs, states)


def _ssd_bwd(chunk_size, impl, res, cts):
    x, dt, A, B, C, D, init, docs, states = res
    dy, dfinal = cts
    st = _stages(impl)
    L = x.shape[1]
    xc, dtc, cs, Bc, Cc = _chunked(chunk_size, x, dt, A, B, C)
    dyc = _chunked(chunk_size, dy, dt, A, B, C)[0]
    _, k = _doc_gates(docs, cs)
    kw = {} if docs is None else {"docs": docs}
    # reverse state recurrence: dS_c = k_c exp(cs_last) dS_{c+1} + sum_t e_t exp(cs_t) dy_t^T C_t
    entry = jnp.exp(cs) if docs is None else jnp.exp(cs) * (docs == 0)[:, None].astype(F32)
    dstates, carried = st.state_passing(st.chunk_state(dyc, Cc, entry), jnp.exp(cs[..., -1]) * k,
                                        dfinal.astype(F32), reverse=True, fwd_states=states)
    dx, dB, ddt_direct, dD_part = st.chunk_bwd_dx_dB(xc, dtc, cs, Bc, Cc, dyc, dstates, D, **kw)
    dC, CdC = st.chunk_bwd_dC(xc, dtc, cs, Bc, Cc, dyc, states, **kw)
    dcs = (CdC - dtc * ddt_direct).at[..., -1].add(carried)
    da = jnp.flip(jnp.cumsum(jnp.flip(dcs, -1), -1), -1)
    ddt = ddt_direct + A.astype(F32)[None, :, None, None] * da
    dA = jnp.sum(dtc * da, axis=(0, 2, 3))
    b, h = dt.shape[0], dt.shape[2]
    ddt = jnp.moveaxis(ddt.reshape(b, h, -1), 1, 2)[:, :L]
    return (
        _unchunk(dx, L).astype(x.dtype),
        ddt.astype(dt.dtype),
        dA.astype(A.dtype),
        _unchunk(dB, L).astype(B.dtype),
        _unchunk(dC, L).astype(C.dtype),
        jnp.sum(dD_part, axis=(0, 2, 3)).astype(D.dtype),
        dstates[:, 0].astype(init.dtype),
        None,  # integer document indices: no cotangent
    )


_ssd.defvjp(_ssd_fwd, _ssd_bwd)


def ssd_step(state, x_t, dt_t, A, B_t, C_t, D=None):
    """Single decode step; see reference.ssd_step (shapes [batch, heads, head_dim] etc., float32 state)."""
    return reference.ssd_step(state, x_t, dt_t, A, B_t, C_t, D)
