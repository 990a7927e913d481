"""2-simplicial attention on GPU as w2 cuDNN flash-attention calls (one per k2 offset), merged exactly.

For a k2 offset t (key k = i - t of query i) the rows b^t_ih = q_ih * k2_{i-t} meet the k1 window exactly as
queries meet keys in causal sliding-window attention (window w1, keys k1, values v1, GQA over the K/V head).
So the simplicial logits of offset t are ordinary attention logits, and the joint softmax over (j, t) is the
per-offset softmax re-weighted by exp(lse^t - LSE) with LSE = logsumexp_t lse^t (docs/equations.md §1,
Eq. 5-7; the same per-row-then-merge step the Triton kernel does in registers):

    O_ih = sum_t exp(lse^t_ih - LSE_ih) * v2_{i-t} * o^t_ih,   o^t = softmax_j(scale * b^t . k1_j) @ v1.

Backward: with the joint P^t_ihj = exp(scale * b^t_ih . k1_j - LSE_ih), the gradient is flash attention's for
queries b^t, keys k1, values v1, output-gradient e^t = dO_ih * v2_{i-t}, statistics LSE and the per-head
delta D_ih = <dO_ih, O_ih> (not the per-row <e^t, o^t> flash attention would form). cuDNN's backward forms
delta = rowsum(dO' * O') from the O' it is handed (O' is used for nothing else), so it gets O' = D e / |e|^2
(`_delta_carrier`; the values keep their head dim: an extra delta column in V would push cuDNN onto its
192-wide kernel, measured 2.5x slower). cuDNN then returns dB^t (-> dq, and this query's dk2 row t2), dk1 and
dv1; dv2's rows u2 come from o^t, from the forward call of the same offsets.
Offsets are processed in groups folded into the head axis (heads ordered [kv head, offset, group head], so
cuDNN's GQA sums dk1/dv1 over the offsets of a group). Nothing O(S * w1 * w2) exists; a call alone needs
O(S * Hq * D * group). The backward re-calls cuDNN's forward on the same rows for o^t, one group at a time:
optimization barriers keep XLA from merging those calls with the forward pass's (which kept every offset's
rows and o^t alive between forward and backward, O(w2 * S * Hq * D): 30.6 GiB per layer at the paper's
B2 S8192 Hq64 setting, 166 GiB for the simplicial:gpu_1b preset). Residuals are the op's inputs, O and LSE,
as for the Triton kernels; the price is one more forward pass of cuDNN calls in the backward.

bfloat16 only (float16's range cannot hold the delta carrier); other dtypes use the Triton kernels. The backward
binds cuDNN's backward primitive from jax._src (the public API derives its delta from the forward output and cannot
take these statistics); it is pinned by tests/kernels/test_simplicial_gpu.py.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# Offsets per cuDNN call: the group's rows b^t (and dO', dB^t in the backward) take about this many bytes.
GROUP_BYTES = 1 << 30
_F32 = jnp.float32


def _fa():
    from jax._src.cudnn import fused_attention_stablehlo as fa

    return fa


def unsupported(dtype, d_qk: int, d_v: int, segments: bool = False) -> str | None:
    """Why cuDNN's flash attention cannot take these inputs (a phrase naming the fix, following
    "implementation='cudnn'"), or None.

    Packed documents are refused: the k1 side would need a per-query window start (the document's), which
    cuDNN's causal sliding window cannot take; its mask / bias argument is a dense [B, 1, S, S] tensor read
    once per head of every offset group, and its packed (offsets) layout is not wired through the backward
    primitive bound here. The Triton kernels mask exactly at the same cost (docs/notes/simplicial.md)."""
    if segments:  # first: no dtype or shape change would make this call run
        return "cannot mask packed documents (segment_ids); use 'triton' or None"
    if dtype != jnp.bfloat16:  # float16: the delta carrier O' = D e / |e|^2 can leave float16's range
        return f"needs bfloat16 inputs, got {dtype}; use 'triton' or None"
    if d_qk % 8 or d_qk > 256 or d_v % 8 or d_v > 256:
        return (f"needs head dims that are multiples of 8 and <= 256 (determinant: q/k "
                f"is 2x head_dim); got q/k {d_qk}, v {d_v}; use 'triton' or None")
    return None


def _group_size(q, w2: int) -> int:
    b, s, hq, d = q.shape
    per_offset = b * s * hq * d * q.dtype.itemsize
    return max(1, min(w2, GROUP_BYTES // max(per_offset, 1)))


def _shifted(x, offsets):
    """x [B,S,K,D] -> [B,S,K,T,D] with [..., t, :] = x at position i - offsets[t] (zeros before position 0)."""
    s = x.shape[1]
    return jnp.stack([jnp.pad(x, ((0, 0), (t, 0), (0, 0), (0, 0)))[:, :s] for t in offsets], axis=3)


def _rows(q, k2, offsets):
    """b^t rows for a group of offsets: [B, S, K*T*G, D] in q.dtype, heads ordered (kv head, offset, head)."""
    b, s, hq, d = q.shape
    kv = k2.shape[2]
    qg = q.reshape(b, s, kv, 1, hq // kv, d).astype(_F32)
    rows = qg * _shifted(k2, offsets).astype(_F32)[:, :, :, :, None]
    return rows.astype(q.dtype).reshape(b, s, kv * len(offsets) * (hq // kv), d)


def _window(w1: int, s: int):
    return None if w1 >= s else w1  # cuDNN's causal sliding window: keys j with i - w1 < j <= i


def _attend(rows, k1, v1, cfg, s):
    """cuDNN forward: o [B,S,N,Dv] (per-row softmax), lse [B,N,S] float32 (natural log, scaled logits)."""
    fa = _fa()
    o, lse = fa.dot_product_attention(rows, k1, v1, scale=cfg.scale, mask_type=fa.MaskType.CAUSAL,
                                      sliding_window_length=_window(cfg.w1, s), return_residual=True)
    return o, lse


def _attend_bwd(rows, k1, v, lse, o, do, cfg, s):
    """cuDNN backward with the given statistics lse [B,N,S] and output o (used only for delta = rowsum(do * o)):
    dS = P * (do . v_j - delta) with P = exp(scale * rows . k1_j - lse). Returns d rows, dk1, dv (GQA-summed)."""
    fa = _fa()
    nu = jnp.zeros(0, rows.dtype)
    return fa._dot_product_attention_bwd_p_wrapper.bind(
        rows, k1, v, nu, nu, nu, nu, nu, nu, nu, lse, o, do,
        scale=cfg.scale, seed=42, dropout_rate=0.0, variadic_args=(False, False),
        mask_type=fa.MaskType.CAUSAL, layout=fa.AttentionLayout.BTNH.value,
        sliding_window_length=_window(cfg.w1, s))


def _delta_carrier(e, delta, nn):
    """(dO', O') with dO' = e in bf16 (up to a 2^-32 nudge on exactly-zero rows) and <dO', O'> = delta per row.

    e [..., Dv] float32, delta [...] float32, nn [...] = |e|^2 from the small factors (dO and v2: no pass over
    e). cuDNN derives its delta from the output it is handed, so the joint per-head delta rides in
    O' = delta * dO' / |e|^2; rounding dO' and O' to bf16 moves <dO', O'> by ~2^-8 relative. A row with e == 0
    but delta != 0 (an exactly-zero v2 row) gets dO' = 2^-32 on its first component: its dP changes by
    2^-32 * v1, and O' stays finite in bf16."""
    nudge = (nn == 0) & (delta != 0)
    e = jnp.where(nudge[..., None] & (jnp.arange(e.shape[-1]) == 0), 2.0 ** -32, e).astype(jnp.bfloat16)
    nn = jnp.where(nudge, 2.0 ** -64, nn)
    scale = jnp.where(nn > 0, delta / jnp.where(nn > 0, nn, 1.0), 0.0)
    return e, (e.astype(_F32) * scale[..., None]).astype(e.dtype)


def _group_stats(lse, b, s, kv, t, g, offsets):
    """lse [B, K*T*G, S] -> [B, S, K, T, G] with -inf for rows whose k2 key is before position 0."""
    lse = jnp.moveaxis(lse.reshape(b, kv, t, g, s), -1, 1)
    return jnp.where(_valid(s, offsets), lse, -jnp.inf)


def _valid(s: int, offsets):
    """bool [1, S, 1, T, 1]: query i has a k2 key at offset t (i - t >= 0); broadcasts over [B, S, K, T, G]."""
    return (jnp.arange(s)[:, None] >= jnp.asarray(offsets)[None, :])[None, :, None, :, None]


def _groups(w2: int, size: int):
    return [list(range(t0, min(t0 + size, w2))) for t0 in range(0, w2, size)]


def forward(q, k1, v1, k2, v2, seg, cfg):
    """Returns out [B,S,Hq,Dv] (q.dtype) and lse [B,S,Hq] (float32, natural log). seg must be None (unsupported)."""
    assert seg is None, "cudnn: segment_ids are refused by unsupported()"
    b, s, hq, _ = q.shape
    kv, dv = k1.shape[2], v1.shape[-1]
    g = hq // kv
    acc = jnp.zeros((b, s, kv, g, dv), _F32)
    run = jnp.full((b, s, kv, g), -jnp.inf, _F32)
    for offsets in _groups(cfg.w2, _group_size(q, cfg.w2)):
        t = len(offsets)
        # One group's rows at a time: the barrier orders the groups after the previous merge, so XLA cannot
        # materialise every group's rows b^t at once.
        q, k1, v1, k2, v2, acc, run = jax.lax.optimization_barrier((q, k1, v1, k2, v2, acc, run))
        o, lse = _attend(_rows(q, k2, offsets), k1, v1, cfg, s)
        lse = _group_stats(lse, b, s, kv, t, g, offsets)  # [B,S,K,T,G]
        new = jnp.logaddexp(run, jax.nn.logsumexp(lse, axis=3))
        w = jnp.exp(lse - new[:, :, :, None])  # 0 for invalid rows
        vo = o.reshape(b, s, kv, t, g, dv).astype(_F32) * _shifted(v2, offsets).astype(_F32)[:, :, :, :, None]
        acc = acc * jnp.exp(run - new)[..., None] + jnp.sum(w[..., None] * vo, axis=3)
        run = new
    return acc.reshape(b, s, hq, dv).astype(q.dtype), run.reshape(b, s, hq)


def backward(q, k1, v1, k2, v2, seg, do, lse, delta, cfg):
    """Returns dq, dk1, dv1 and the per-query rows t2, u2 [B,S,Hkv,w2,D] (float32; row r <-> k = i - w2 + 1 + r)."""
    assert seg is None, "cudnn: segment_ids are refused by unsupported()"
    b, s, hq, d = q.shape
    kv, dv = k1.shape[2], v1.shape[-1]
    g = hq // kv
    lse_h = lse.reshape(b, s, kv, g)
    delta_h = delta.reshape(b, s, kv, g).astype(_F32)
    do_h = do.reshape(b, s, kv, g, dv).astype(_F32)
    dq = jnp.zeros((b, s, kv, g, d), _F32)
    dk1 = jnp.zeros(k1.shape, _F32)
    dv1 = jnp.zeros(v1.shape, _F32)
    t2, u2 = [], []
    for offsets in _groups(cfg.w2, _group_size(q, cfg.w2)):
        t = len(offsets)
        n = kv * t * g
        # The barrier ties this group's inputs to dO and the running gradients: the rows and the forward call
        # below are recomputed here, group by group, instead of being merged (CSE) with the forward pass's
        # identical calls, which would keep every group's rows and o^t alive from the forward to the backward.
        q, k1, v1, k2, v2, do_h, dq, dk1, dv1 = jax.lax.optimization_barrier(
            (q, k1, v1, k2, v2, do_h, dq, dk1, dv1))
        q_h = q.reshape(b, s, kv, g, d).astype(_F32)
        rows = _rows(q, k2, offsets)
        # u2: this query's dv2 rows need the joint-normalized P^t @ v1 = o^t * exp(lse^t - LSE).
        o, lse_t = _attend(rows, k1, v1, cfg, s)
        wt = jnp.exp(_group_stats(lse_t, b, s, kv, t, g, offsets) - lse_h[:, :, :, None])  # [B,S,K,T,G]
        c = o.reshape(b, s, kv, t, g, dv).astype(_F32) * wt[..., None]
        u2.append(jnp.sum(c * do_h[:, :, :, None], axis=4))  # [B,S,K,T,Dv]
        v2s = _shifted(v2, offsets).astype(_F32)  # [B,S,K,T,Dv]
        e = do_h[:, :, :, None] * v2s[:, :, :, :, None]
        nn = jnp.einsum("bskgd,bsktd->bsktg", do_h * do_h, v2s * v2s)  # |e|^2 per row
        do_t, o_t = _delta_carrier(e, jnp.where(_valid(s, offsets), delta_h[:, :, :, None], 0.0), nn)
        stats = jnp.broadcast_to(jnp.moveaxis(lse_h, 1, -1)[:, :, None], (b, kv, t, g, s)).reshape(b, n, s)
        d_rows, d_k1, d_v1 = _attend_bwd(rows, k1, v1, stats, o_t.reshape(b, s, n, dv), do_t.reshape(b, s, n, dv),
                                         cfg, s)
        d_rows = d_rows.reshape(b, s, kv, t, g, d).astype(_F32)
        k2s = _shifted(k2, offsets).astype(_F32)[:, :, :, :, None]
        dq = dq + jnp.sum(d_rows * k2s, axis=3)
        t2.append(jnp.sum(d_rows * q_h[:, :, :, None], axis=4))  # [B,S,K,T,D]
        dk1 = dk1 + d_k1.astype(_F32)
        dv1 = dv1 + d_v1.astype(_F32)
    # offsets t -> window rows r = w2 - 1 - t
    t2 = jnp.concatenate(t2, axis=3)[:, :, :, ::-1]
    u2 = jnp.concatenate(u2, axis=3)[:, :, :, ::-1]
    return dq.reshape(q.shape), dk1, dv1, t2, u2
