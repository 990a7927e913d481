"""Pure-jnp SSD (Mamba-2 state-space duality, Dao & Gu 2024): the sequential oracle, the one-token decode step,
and the chunked stages that every implementation shares.

Recurrence (docs/equations.md §2), per batch b and head h (group g = h // (heads // groups)):
    H_t = exp(dt_t A_h) H_{t-1} + dt_t x_t B_t^T          H_t in R^{P x N}
    y_t = H_t C_t + D_h x_t

Chunked form (chunk length Q, positions t, s inside chunk c, a_t = dt_t A, cs = inclusive cumsum of a in the
chunk, S_c = state entering chunk c):
    y_t      = sum_{s<=t} (C_t.B_s) exp(cs_t - cs_s) dt_s x_s + exp(cs_t) S_c C_t + D x_t      (chunk_scan)
    S_{c+1}  = exp(cs_last) S_c + sum_s exp(cs_last - cs_s) dt_s x_s B_s^T                      (chunk_state,
                                                                                                 state_passing)
The decay exp(cs_t - cs_s) is taken only for t >= s, where the exponent is <= 0: the "segment sum" never
exponentiates a positive number, so it cannot overflow (masked entries get exponent -inf, i.e. 0).

Document resets (packed rows, segment_ids): with d_t the row's document index (0 for the first document, +1 at
every position whose segment id differs from the previous position's), the recurrence becomes
    H_t = [d_t = d_{t-1}] exp(dt_t A) H_{t-1} + dt_t x_t B_t^T          (d_{-1} = 0: h_{-1} feeds the first document)
The stages see it as r [b, c, Q] int32, the document index relative to the document open at the chunk's start
(r = d - d_in, d_in = d at the previous chunk's last position, 0 for the first chunk; r is non-decreasing, so
r_t = r_s means no reset in (s, t]). In the chunked form the decay exp(cs_t - cs_s) is masked to r_t = r_s, the
state term exp(cs_t) S_c C_t to r_t = 0, chunk states keep only s with r_s = r_last, and the chunk decay is zeroed
when r_last != 0 (api._forward applies the last two; the stages take `docs=r` for the first two, and the
backward stages for the same masks transposed).

Internal layout ("chunked"): x [b, c, Q, h, P] and B, C [b, c, Q, g, N] are free reshapes of the user's
[b, L, ...] arrays; per-position scalars (dt, cs) are [b, h, c, Q] float32; states are [b, c+1, h, P, N]
float32 where index c is S_c and the last index is the final state.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32


def _split_heads(h: int, g: int):
    return g, h // g


def ssd_scan(x, dt, A, B, C, D=None, initial_state=None, segment_ids=None):
    """Token-by-token recurrence with lax.scan (the pure-jnp oracle; float32 state).

    x [b, L, h, P], dt [b, L, h], A [h], B/C [b, L, g, N], D [h] | None, initial_state [b, h, P, N] | None,
    segment_ids int [b, L] | None (the state restarts from 0 where the id changes; see the module doc).
    Returns (y [b, L, h, P] in x.dtype, final_state [b, h, P, N] float32).
    """
    b, L, h, P = x.shape
    N = B.shape[3]
    if initial_state is None:
        initial_state = jnp.zeros((b, h, P, N), F32)
    d = jnp.zeros((b, L), jnp.int32) if segment_ids is None else document_index(segment_ids)
    keep = jnp.concatenate([jnp.ones((b, 1), F32), (d[:, 1:] == d[:, :-1]).astype(F32)], axis=1)

    def step(state, inp):
        xt, dtt, bt, ct, kt = inp
        y, state = ssd_step(state * kt[:, None, None, None], xt, dtt, A, bt, ct, D)
        return state, y

    inputs = (jnp.moveaxis(x, 1, 0), jnp.moveaxis(dt, 1, 0), jnp.moveaxis(B, 1, 0), jnp.moveaxis(C, 1, 0), keep.T)
    final, ys = jax.lax.scan(step, initial_state.astype(F32), inputs)
    return jnp.moveaxis(ys, 0, 1).astype(x.dtype), final


def ssd_step(state, x_t, dt_t, A, B_t, C_t, D=None):
    """One recurrence step (decode): state [b, h, P, N] f32, x_t [b, h, P], dt_t [b, h], A [h],
    B_t/C_t [b, g, N], D [h] | None. Returns (y_t [b, h, P] in x_t.dtype, new_state [b, h, P, N] f32)."""
    h = x_t.shape[1]
    g = B_t.shape[1]
    if h % g:
        raise ValueError(f"ssd_step: heads ({h}) must be a multiple of groups ({g})")
    rep = h // g
    Bh = jnp.repeat(B_t.astype(F32), rep, axis=1)  # [b, h, N]
    Ch = jnp.repeat(C_t.astype(F32), rep, axis=1)
    xf, dtf = x_t.astype(F32), dt_t.astype(F32)
    decay = jnp.exp(dtf * A.astype(F32))  # [b, h]
    new_state = decay[..., None, None] * state.astype(F32) + (dtf[..., None] * xf)[..., :, None] * Bh[..., None, :]
    y = jnp.einsum("bhpn,bhn->bhp", new_state, Ch)
    if D is not None:
        y = y + D.astype(F32)[None, :, None] * xf
    return y.astype(x_t.dtype), new_state


# ----------------------------------------------------------------------------------------------------------
# Chunked stages (pure jnp). Every stage computes in float32; implementations replace stages one by one.
# ----------------------------------------------------------------------------------------------------------

def document_index(segment_ids):
    """segment_ids int [b, L] -> int32 [b, L] document index d_t: 0 in the row's first segment, +1 at every
    position whose id differs from the previous position's (so padding 0 runs and repeated ids are their own
    documents; d is non-decreasing, hence d_t = d_s means no reset in (s, t])."""
    seg = jnp.asarray(segment_ids)
    starts = (seg[:, 1:] != seg[:, :-1]).astype(jnp.int32)
    return jnp.concatenate([jnp.zeros_like(starts[:, :1]), jnp.cumsum(starts, axis=1)], axis=1)


def _decay_matrix(cs_t, cs_s, same_doc=None):
    """exp(cs_t - cs_s) for t >= s (and same_doc[..., t, s] when given) else 0; cs_* [..., Q].
    Returns [..., Q(t), Q(s)]."""
    Q = cs_t.shape[-1]
    diff = cs_t[..., :, None] - cs_s[..., None, :]
    keep = jnp.arange(Q)[:, None] >= jnp.arange(Q)[None, :]
    if same_doc is not None:
        keep = keep & same_doc
    return jnp.exp(jnp.where(keep, diff, -jnp.inf))


def _heads(x, g):
    """[b, c, Q, h, P] -> [b, c, Q, g, r, P] so group tensors broadcast against heads without a copy."""
    b, c, Q, h, P = x.shape
    return x.reshape(b, c, Q, g, h // g, P)


def _per_head(v, g):
    """[b, h, c, Q] -> [b, g, r, c, Q]."""
    b, h, c, Q = v.shape
    return v.reshape(b, g, h // g, c, Q)


def chunk_state(x, Bm, w):
    """sum_t w_t x_t^T B_t per chunk: x [b,c,Q,h,P], Bm [b,c,Q,g,N], w [b,h,c,Q] -> [b,c,h,P,N] f32."""
    g = Bm.shape[3]
    out = jnp.einsum("bgrcq,bcqgrp,bcqgn->bcgrpn", _per_head(w, g), _heads(x, g).astype(F32), Bm.astype(F32))
    b, c, _, r, P, N = out.shape
    return out.reshape(b, c, g * r, P, N)


def state_passing(chunk_states, chunk_decay, init, reverse=False, fwd_states=None):
    """Inter-chunk recurrence. Forward: S_0 = init, S_{c+1} = decay_c S_c + st_c; returns [b, c+1, h, P, N]
    with S_0..S_c (the last is the final state). reverse=True runs the adjoint: G_c = chunk_states[c],
    out[c_last+1] = init (the final-state cotangent), out[c] = decay_c out[c+1] + G_c.
    chunk_states [b, c, h, P, N] f32, chunk_decay [b, h, c] f32, init [b, h, P, N] f32.
    With reverse=True and fwd_states (the forward's output) also returns <out[c+1], fwd_states[c+1]> [b, h, c],
    the carried term of the cumsum cotangent."""
    st = jnp.moveaxis(chunk_states, 1, 0)
    dec = jnp.moveaxis(chunk_decay, 2, 0)[..., None, None]

    def step(s, inp):
        st_c, d_c = inp
        return d_c * s + st_c, s

    last, outs = jax.lax.scan(step, init.astype(F32), (st, dec), reverse=reverse)
    if reverse:
        allst = jnp.concatenate([last[None], outs], axis=0)
    else:
        allst = jnp.concatenate([outs, last[None]], axis=0)
    allst = jnp.moveaxis(allst, 0, 1)
    if reverse and fwd_states is not None:
        return allst, jnp.moveaxis(jnp.sum(allst[:, 1:] * fwd_states[:, 1:], axis=(-1, -2)), 1, 2)
    return allst


def chunk_documents(segment_ids, chunk_size):
    """segment_ids int [b, L] -> r int32 [b, c, Q]: each position's document index relative to the document open
    at its chunk's start (module doc). Seq is padded to whole chunks with the last document (padding has dt = 0
    and x = 0, so it adds nothing to any state)."""
    d = document_index(segment_ids)
    b, L = d.shape
    pad = (-L) % chunk_size
    d = jnp.pad(d, [(0, 0), (0, pad)], mode="edge").reshape(b, -1, chunk_size)
    d_in = jnp.concatenate([jnp.zeros_like(d[:, :1, 0]), d[:, :-1, -1]], axis=1)
    return d - d_in[..., None]


def _doc_masks(docs):
    """r [b,c,Q] -> (same [b,1,1,c,t,s] bool: r_t = r_s; entry [b,1,1,c,Q] f32: r_t = 0; tail [b,1,1,c,Q] f32:
    r_s = r_last), shaped to broadcast against [b, g, r, c, ...] per-head tensors; all None when docs is None."""
    if docs is None:
        return None, None, None
    r = docs[:, None, None]
    same = r[..., :, None] == r[..., None, :]
    return same, (r == 0).astype(F32), (r == r[..., -1:]).astype(F32)


def chunk_scan(x, dt, cs, Bm, Cm, states, D, docs=None):
    """y per chunk (first equation of the module docstring); states [b, c+1, h, P, N]. Returns [b,c,Q,h,P] f32.
    docs: r [b, c, Q] int32 (chunk_documents) or None; masks the intra-chunk decay to one document (r_t = r_s) and
    the carried-state term to the chunk's entering document (r_t = 0)."""
    g = Bm.shape[3]
    Bf, Cf = Bm.astype(F32), Cm.astype(F32)
    csg, dtg = _per_head(cs, g), _per_head(dt, g)
    xg = _heads(x, g).astype(F32)
    same_doc, entry, _ = _doc_masks(docs)
    state_w = jnp.exp(csg) if entry is None else jnp.exp(csg) * entry
    CB = jnp.einsum("bctgn,bcsgn->bgcts", Cf, Bf)  # shared by the heads of a group
    M = CB[:, :, None] * _decay_matrix(csg, csg, same_doc) * dtg[..., None, :]  # [b,g,r,c,t,s]
    y = jnp.einsum("bgrcts,bcsgrp->bctgrp", M, xg)
    S = states[:, :-1].reshape(states.shape[0], states.shape[1] - 1, g, -1, *states.shape[3:])  # [b,c,g,r,P,N]
    y = y + jnp.einsum("bcgrpn,bctgn,bgrct->bctgrp", S, Cf, state_w)
    if D is not None:
        y = y + D.astype(F32).reshape(g, -1)[:, :, None] * xg
    return y.reshape(x.shape)


def chunk_bwd_dx_dB(x, dt, cs, Bm, Cm, dy, dstates, D, docs=None):
    """Cotangents flowing through the "source" side s of each chunk.

    With W_s = sum_{t>=s} (B_s.C_t) exp(cs_t - cs_s) dy_t + exp(cs_last - cs_s) dS_{c+1} B_s:
      dx_s = dt_s W_s + D dy_s;   ddt_direct_s = x_s.W_s;   dD_s = dy_s.x_s (summed later);
      dB_s = sum_heads [ sum_{t>=s} (dy_t.x_s) exp(cs_t - cs_s) dt_s C_t + exp(cs_last - cs_s) dt_s dS_{c+1}^T x_s ].
    dstates [b, c+1, h, P, N] holds dS_c (index c); dS_{c+1} is index c+1. docs (r [b,c,Q] or None): the sums
    over t keep r_t = r_s, the dS_{c+1} terms r_s = r_last (the forward's masks, transposed).
    Returns dx [b,c,Q,h,P] f32, dB [b,c,Q,g,N] f32, ddt_direct [b,h,c,Q], dD_part [b,h,c,Q]."""
    g = Bm.shape[3]
    Bf, Cf = Bm.astype(F32), Cm.astype(F32)
    csg, dtg = _per_head(cs, g), _per_head(dt, g)
    xg, dyg = _heads(x, g).astype(F32), _heads(dy, g).astype(F32)
    same_doc, _, tail_mask = _doc_masks(docs)
    L = _decay_matrix(csg, csg, same_doc)  # [b,g,r,c,t,s]
    CB = jnp.einsum("bctgn,bcsgn->bgcts", Cf, Bf)
    dSn = dstates[:, 1:].reshape(dstates.shape[0], dstates.shape[1] - 1, g, -1, *dstates.shape[3:])
    tail = jnp.exp(csg[..., -1:] - csg)  # exp(cs_last - cs_s) [b,g,r,c,s]
    if tail_mask is not None:
        tail = tail * tail_mask
    W = jnp.einsum("bgcts,bgrcts,bctgrp->bcsgrp", CB, L, dyg)
    W = W + jnp.einsum("bgrcs,bcgrpn,bcsgn->bcsgrp", tail, dSn, Bf)
    dtx = jnp.moveaxis(dtg, (1, 2, 3, 4), (3, 4, 1, 2))[..., None]  # [b,c,s,g,r,1]
    dx = dtx * W
    if D is not None:
        dx = dx + D.astype(F32).reshape(g, -1)[:, :, None] * dyg
    XDY = jnp.einsum("bctgrp,bcsgrp->bgrcts", dyg, xg)
    dB = jnp.einsum("bgrcts,bgrcts,bgrcs,bctgn->bcsgn", XDY, L, dtg, Cf)
    dB = dB + jnp.einsum("bgrcs,bcgrpn,bcsgrp->bcsgn", tail * dtg, dSn, xg)
    to_hcq = lambda v: jnp.moveaxis(v, (1, 2), (3, 4)).reshape(cs.shape)  # [b,c,s,g,r] -> [b,h,c,Q]
    ddt_direct = to_hcq(jnp.sum(xg * W, -1))
    dD_part = to_hcq(jnp.sum(xg * dyg, -1))
    return dx.reshape(x.shape), dB, ddt_direct, dD_part


def chunk_bwd_dC(x, dt, cs, Bm, Cm, dy, states, docs=None):
    """Cotangents through the "query" side t: per head
      dC_t^h = sum_{s<=t} (dy_t.x_s) exp(cs_t - cs_s) dt_s B_s + exp(cs_t) S_c^T dy_t,
    (with docs: the sum keeps r_s = r_t, the state term r_t = 0), returns dC [b,c,Q,g,N] f32 (summed over the heads
    of a group) and CdC [b,h,c,Q] = C_t.dC_t^h, which equals dy_t.(y_t - D x_t), the cumsum cotangent's "query"
    term."""
    g = Bm.shape[3]
    Bf, Cf = Bm.astype(F32), Cm.astype(F32)
    csg, dtg = _per_head(cs, g), _per_head(dt, g)
    xg, dyg = _heads(x, g).astype(F32), _heads(dy, g).astype(F32)
    same_doc, entry, _ = _doc_masks(docs)
    L = _decay_matrix(csg, csg, same_doc)
    state_w = jnp.exp(csg) if entry is None else jnp.exp(csg) * entry
    S = states[:, :-1].reshape(states.shape[0], states.shape[1] - 1, g, -1, *states.shape[3:])
    XDY = jnp.einsum("bctgrp,bcsgrp->bgrcts", dyg, xg)
    dCh = jnp.einsum("bgrcts,bgrcts,bgrcs,bcsgn->bctgrn", XDY, L, dtg, Bf)
    dCh = dCh + jnp.einsum("bgrct,bcgrpn,bctgrp->bctgrn", state_w, S, dyg)
    CdC = jnp.einsum("bctgrn,bctgn->bgrct", dCh, Cf).reshape(cs.shape)
    return jnp.sum(dCh, axis=4), CdC
