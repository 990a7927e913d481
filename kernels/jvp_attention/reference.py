"""Pure-jnp forms of the jvp_attention op: the autodiff oracle and the portable ("xla") forward/backward.

Notation (per batch row and query head h, kv head h // G; c = 1/sqrt(D); keys j <= i in i's segment):
    S = c q k^T,  lse = logsumexp_j S,  P = exp(S - lse),  o = P v                         (flash attention)
JVP in the query tangent tq (keys/values carry no tangent in this op's fast path):
    tS = c tq k^T,  tlse = rowsum(P * tS),  to = (P * tS) v - tlse * o                       (1)
VJP of (o, lse, to, tlse) with cotangents (go, glse, gto, gtlse), tP = P * (tS - tlse):
    gd = gtlse - <gto, o>,  R = <go, o> + <gto, to> + gd * tlse - glse                        (2, per row)
    GP = go v^T + (gto v^T) * (tS - tlse) + gd * tS,  GS = P * (GP - R),  GT = P * (gto v^T + gd)
    gq = c GS k,  gk = c (GS^T q + GT^T tq),  gv = P^T go + tP^T gto,  gtq = c GT k              (3)
With tq = 0 (and gto = gtlse = 0), (3) is the ordinary flash-attention backward with an lse cotangent.
Every row has a key (its own position), so lse is finite.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32


def mask(s: int, segment_ids: jax.Array | None) -> jax.Array:
    """bool [B|1, 1, S, S]: key j visible to query i (causal, same segment)."""
    m = (jnp.arange(s)[:, None] >= jnp.arange(s)[None, :])[None, None]
    if segment_ids is not None:
        m = m & (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    return m


def _heads(x: jax.Array, groups: int) -> jax.Array:
    """[B, S, K, D] -> [B, H=K*groups, S, D] float32 (kv head h // groups for query head h)."""
    return jnp.repeat(jnp.swapaxes(x, 1, 2).astype(F32), groups, axis=1)


def _kv_sum(x: jax.Array, groups: int) -> jax.Array:
    """[B, H, S, D] -> [B, S, K, D]: sums the query heads of each kv head."""
    b, h, s, d = x.shape
    return jnp.swapaxes(x.reshape(b, h // groups, groups, s, d).sum(2), 1, 2)


def _bhsd(x):
    return jnp.swapaxes(x.astype(F32), 1, 2)


def _bshd(x, dtype):
    return jnp.swapaxes(x, 1, 2).astype(dtype)


def _probs(q, k, segment_ids):
    """float32 S [B,H,S,S] (masked to -inf), P, lse [B,H,S] for q [B,S,H,D], k [B,S,K,D]."""
    g = q.shape[2] // k.shape[2]
    c = 1.0 / jnp.sqrt(F32(q.shape[-1]))
    s = c * jnp.einsum("bhid,bhjd->bhij", _bhsd(q), _heads(k, g))
    s = jnp.where(mask(q.shape[1], segment_ids), s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1)
    return s, jnp.exp(s - lse[..., None]), lse


def attention(q, k, v, segment_ids=None):
    """The oracle for autodiff: (o [B,S,H,D] in q.dtype, lse float32 [B,H,S]), written plainly."""
    _, p, lse = _probs(q, k, segment_ids)
    o = jnp.einsum("bhij,bhjd->bhid", p, _heads(v, q.shape[2] // k.shape[2]))
    return _bshd(o, q.dtype), lse


def forward(q, k, v, tq=None, segment_ids=None):
    """(o, lse) or, with the query tangent tq, (o, lse, to, tlse) by eq. (1)."""
    g = q.shape[2] // k.shape[2]
    _, p, lse = _probs(q, k, segment_ids)
    vh = _heads(v, g)
    o = jnp.einsum("bhij,bhjd->bhid", p, vh)
    if tq is None:
        return _bshd(o, q.dtype), lse
    c = 1.0 / jnp.sqrt(F32(q.shape[-1]))
    pts = p * (c * jnp.einsum("bhid,bhjd->bhij", _bhsd(tq), _heads(k, g)))
    tlse = pts.sum(-1)
    to = jnp.einsum("bhij,bhjd->bhid", pts, vh) - tlse[..., None] * o
    return _bshd(o, q.dtype), lse, _bshd(to, q.dtype), tlse


def tile_terms(p, dpo, r, ts=None, dpt=None, tlse=None, gd=None):
    """Eq. (3) on a block of scores (row vectors broadcast over the last axis): GS, and with the tangent also
    GT and tP (else None). p = P, dpo = go v^T, ts = tS, dpt = gto v^T (float32). Shared by `backward` (the
    whole matrix) and the Pallas kernels (one tile)."""
    if ts is None:
        return p * (dpo - r[..., None]), None, None
    gp = dpo + dpt * (ts - tlse[..., None]) + gd[..., None] * ts
    return p * (gp - r[..., None]), p * (dpt + gd[..., None]), p * (ts - tlse[..., None])


def backward(q, k, v, tq, lse, tlse, go, gto, gd, r, segment_ids=None):
    """Eq. (3): (gq, gk, gv, gtq) float32; tq/gto/gd/tlse None for the first-order backward (gtq None).

    lse, tlse, gd, r: float32 [B,H,S] (r and gd from `api.row_terms`, eq. 2); the others as in `forward`."""
    g = q.shape[2] // k.shape[2]
    c = 1.0 / jnp.sqrt(F32(q.shape[-1]))
    s, _, _ = _probs(q, k, segment_ids)
    p = jnp.exp(s - lse[..., None])
    kh, vh = _heads(k, g), _heads(v, g)
    dpo = jnp.einsum("bhid,bhjd->bhij", _bhsd(go), vh)
    ts = dpt = None
    if tq is not None:
        ts = c * jnp.einsum("bhid,bhjd->bhij", _bhsd(tq), kh)
        dpt = jnp.einsum("bhid,bhjd->bhij", _bhsd(gto), vh)
    gs, gt, tp = tile_terms(p, dpo, r, ts, dpt, tlse, gd)
    gq = c * jnp.einsum("bhij,bhjd->bhid", gs, kh)
    gk = c * jnp.einsum("bhij,bhid->bhjd", gs, _bhsd(q))
    gv = jnp.einsum("bhij,bhid->bhjd", p, _bhsd(go))
    gtq = None
    if tq is not None:
        gk = gk + c * jnp.einsum("bhij,bhid->bhjd", gt, _bhsd(tq))
        gv = gv + jnp.einsum("bhij,bhid->bhjd", tp, _bhsd(gto))
        gtq = _bshd(c * jnp.einsum("bhij,bhjd->bhid", gt, kh), F32)
    return _bshd(gq, F32), _kv_sum(gk, g), _kv_sum(gv, g), gtq
