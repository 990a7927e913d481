"""Pure-jnp 2-simplicial attention (Roy et al. 2025, Eq. 5-7 with causal sliding windows).

The reference and portable fallback: logits are materialised only for a chunk of queries at a time
([batch, chunk, q_heads, w1, w2]), and each chunk is rematerialised in the backward pass, so memory stays
O(chunk * q_heads * w1 * w2) rather than O(seq * w1 * w2).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels import common

# Sarrus' rule: det(a, b, c) = <a, b_(2,3,1) * c_(3,1,2)> - <a, b_(3,1,2) * c_(2,3,1)> on each 3-chunk.
_PERM_231 = (1, 2, 0)
_PERM_312 = (2, 0, 1)

# Elements of the f32 logits tensor one chunk may hold (256 MiB); bounds the reference's memory.
_CHUNK_ELEMENTS = 1 << 26


def effective_windows(seq: int, w1: int, w2: int) -> tuple[int, int]:
    """Windows larger than the sequence behave as full causal windows."""
    return min(w1, seq), min(w2, seq)


def default_k2_bias(head_dim: int) -> float:
    """The k2 bias of Meta's reference (FBGEMM simplicial_attention, torch_fwd_ref): 1 / head_dim."""
    return 1.0 / head_dim


def biased_operands(k2: jax.Array, v2: jax.Array, k2_bias: float, v2_bias: float) -> tuple[jax.Array, jax.Array]:
    """(k2 + k2_bias, v2 + v2_bias), scalars added to every element (a zero bias leaves its operand as is).

    With c = k2_bias: <q_i, k1_j * (k2_k + c)> = <q_i, k1_j * k2_k> + c <q_i, k1_j>, and with v2_bias = 1,
    v1_j * (v2_k + 1) = v1_j * v2_k + v1_j: the layer gains a plain windowed-attention component
    (docs/notes/simplicial.md). The gradients w.r.t. k2, v2 are those w.r.t. the shifted operands.
    """
    if k2_bias:
        k2 = k2 + jnp.asarray(k2_bias, k2.dtype)
    if v2_bias:
        v2 = v2 + jnp.asarray(v2_bias, v2.dtype)
    return k2, v2


def segment_starts(segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """int [B, S] -> (first, run), int32 [B, S], for the kernels' document masks.

    first[b, i]: the first position of row b holding segment_ids[b, i], a canonical id (first[j] == first[i]
    iff the ids are equal; it is < S, so float32 holds it exactly) and the earliest key of i's document.
    run[b, i]: the start of i's run of equal ids, so every position in [run, i] is in i's document
    (first <= run <= i; first == run unless an id recurs after another one).
    """
    seg = segment_ids.astype(jnp.int32)
    b, s = seg.shape
    pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    order = jnp.argsort(seg, axis=1, stable=True)  # equal ids stay in position order
    ids = jnp.take_along_axis(seg, order, axis=1)
    head = jnp.concatenate([jnp.ones((b, 1), bool), ids[:, 1:] != ids[:, :-1]], axis=1)
    group_first = jnp.take_along_axis(order, jax.lax.cummax(jnp.where(head, pos, 0), axis=1), axis=1)
    first = jnp.zeros((b, s), jnp.int32).at[jnp.arange(b)[:, None], order].set(group_first.astype(jnp.int32))
    starts = jnp.concatenate([jnp.ones((b, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    run = jax.lax.cummax(jnp.where(starts, pos, 0), axis=1)
    return first, run


def _permute_chunks(x: jax.Array, perm: tuple[int, int, int]) -> jax.Array:
    x3 = x.reshape(*x.shape[:-1], x.shape[-1] // 3, 3)
    return x3[..., list(perm)].reshape(x.shape)


def determinant_operands(q, k1, k2):
    """Rewrites the determinant logits (Eq. 8-9) as one trilinear form over 2*head_dim.

    With q' = [q, -q], k1' = [k1_(231), k1_(312)], k2' = [k2_(312), k2_(231)] (permutations inside every
    3-chunk), sum_l q'_l k1'_l k2'_l = sum_chunks det[q; k1; k2]. Every implementation then only needs the
    trilinear kernel (with key dim 2*head_dim); gradients flow through this linear map by autodiff.
    """
    qe = jnp.concatenate([q, -q], axis=-1)
    k1e = jnp.concatenate([_permute_chunks(k1, _PERM_231), _permute_chunks(k1, _PERM_312)], axis=-1)
    k2e = jnp.concatenate([_permute_chunks(k2, _PERM_312), _permute_chunks(k2, _PERM_231)], axis=-1)
    return qe, k1e, k2e


def _windows(x: jax.Array, start: jax.Array, chunk: int, w: int) -> jax.Array:
    """x: [B, w + S_pad, H, D] front-padded by w. Returns [B, chunk, w, H, D], the window of each query
    start+c: positions start+c-w+1 .. start+c (padded index +w)."""
    span = jax.lax.dynamic_slice_in_dim(x, start + 1, chunk + w - 1, axis=1)
    idx = jnp.arange(chunk)[:, None] + jnp.arange(w)[None, :]
    return span[:, idx]


def two_simplicial_reference(q, k1, v1, k2, v2, *, w1: int, w2: int, scale: float, k2_bias: float = 0.0,
                             v2_bias: float = 0.0, chunk: int | None = None, segment_ids: jax.Array | None = None):
    """Trilinear 2-simplicial attention with causal sliding windows, optionally within packed documents.

    q: [B, S, Hq, Dk]; k1, k2: [B, S, Hkv, Dk]; v1, v2: [B, S, Hkv, Dv]; segment_ids: int [B, S] or None.
    Returns [B, S, Hq, Dv] in q.dtype. With k2 <- k2 + k2_bias, v2 <- v2 + v2_bias (`biased_operands`; the
    public op applies them before its variant's transform and passes 0 here): A_ijk = scale * sum_l q_il k1_jl
    k2_kl for i-w1 < j <= i, i-w2 < k <= i (and seg_j = seg_k = seg_i when segment_ids is given); P = softmax
    over those (j, k); o_i = sum_jk P_ijk v1_j * v2_k. Every query keeps (i, i). Accumulation is float32.
    """
    k2, v2 = biased_operands(k2, v2, k2_bias, v2_bias)
    b, s, hq, dk = q.shape
    hkv, dv = k1.shape[2], v1.shape[-1]
    g = hq // hkv
    w1, w2 = effective_windows(s, w1, w2)
    if chunk is None:
        chunk = max(1, min(s, _CHUNK_ELEMENTS // max(1, b * hq * w1 * w2)))
    n_chunks = common.cdiv(s, chunk)
    s_pad = n_chunks * chunk

    def pad(x, w):  # front pad by the window, rear pad to the chunked length
        return jnp.pad(x, ((0, 0), (w, s_pad - s), (0, 0), (0, 0)))

    qp = jnp.pad(q, ((0, 0), (0, s_pad - s), (0, 0), (0, 0))).reshape(b, n_chunks, chunk, hkv, g, dk)
    k1p, v1p, k2p, v2p = pad(k1, w1), pad(v1, w1), pad(k2, w2), pad(v2, w2)
    if segment_ids is None:
        seg_q = seg1 = seg2 = jnp.zeros((b, n_chunks), jnp.int32)  # unused placeholders for lax.map
    else:
        seg = segment_ids.astype(jnp.int32)[:, :, None, None]
        seg_q = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, s_pad - s))).reshape(b, n_chunks, chunk)
        seg1, seg2 = pad(seg, w1), pad(seg, w2)  # padding is outside every window (position < 0 or > i)

    @jax.checkpoint
    def one_chunk(args):
        q_c, sq_c, c = args
        start = c * chunk
        qpos = start + jnp.arange(chunk)
        jpos = qpos[:, None] - w1 + 1 + jnp.arange(w1)[None, :]
        kpos = qpos[:, None] - w2 + 1 + jnp.arange(w2)[None, :]
        mask = ((jpos >= 0)[:, :, None] & (kpos >= 0)[:, None, :])[None]  # [1 or B, chunk, w1, w2]
        if segment_ids is not None:  # same document as the query: seg_j == seg_i and seg_k == seg_i
            same1 = _windows(seg1, start, chunk, w1)[..., 0, 0] == sq_c[:, :, None]  # [B, chunk, w1]
            same2 = _windows(seg2, start, chunk, w2)[..., 0, 0] == sq_c[:, :, None]
            mask = mask & same1[:, :, :, None] & same2[:, :, None, :]
        k1w, v1w = _windows(k1p, start, chunk, w1), _windows(v1p, start, chunk, w1)
        k2w, v2w = _windows(k2p, start, chunk, w2), _windows(v2p, start, chunk, w2)
        # q * k2 first: the [.., w2, D] operand is small, then one batched matmul against k1's window.
        qk2 = jnp.einsum("bcngd,bcknd->bcngkd", q_c, k2w, preferred_element_type=jnp.float32)
        logits = jnp.einsum("bcngkd,bcjnd->bcngjk", qk2, k1w.astype(jnp.float32)) * scale
        logits = jnp.where(mask[:, :, None, None], logits, -jnp.inf)
        flat = logits.reshape(*logits.shape[:4], w1 * w2)
        p = jax.nn.softmax(flat, axis=-1).reshape(logits.shape)
        # sum_jk P v1_j * v2_k = sum_k v2_k * (sum_j P_jk v1_j)
        pv1 = jnp.einsum("bcngjk,bcjnd->bcngkd", p, v1w.astype(jnp.float32))
        return jnp.einsum("bcngkd,bcknd->bcngd", pv1, v2w.astype(jnp.float32))

    out = jax.lax.map(one_chunk, (jnp.moveaxis(qp, 1, 0), jnp.moveaxis(seg_q, 1, 0), jnp.arange(n_chunks)))
    out = jnp.moveaxis(out, 0, 1).reshape(b, s_pad, hq, dv)[:, :s]
    return out.astype(q.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def reference_op(q, k1, v1, k2, v2, segment_ids, w1, w2, scale):
    """two_simplicial_reference with a custom VJP that re-runs the chunked forward under jax.vjp
    (segment_ids: int [B, S] or None, no gradient)."""
    return two_simplicial_reference(q, k1, v1, k2, v2, w1=w1, w2=w2, scale=scale, segment_ids=segment_ids)


def _ref_fwd(q, k1, v1, k2, v2, segment_ids, w1, w2, scale):
    return reference_op(q, k1, v1, k2, v2, segment_ids, w1, w2, scale), (q, k1, v1, k2, v2, segment_ids)


def _ref_bwd(w1, w2, scale, res, g):
    *args, segment_ids = res
    f = functools.partial(two_simplicial_reference, w1=w1, w2=w2, scale=scale, segment_ids=segment_ids)
    _, vjp = jax.vjp(lambda *a: f(*a), *args)
    return (*vjp(g), None)


reference_op.defvjp(_ref_fwd, _ref_bwd)
