"""Causal GQA attention in plain jnp: the oracle the other implementations are tested against and the portable
"xla" implementation (any platform, differentiated by XLA autodiff, scores materialised: O(S^2) memory).

    o_i = softmax_j(scale q_i . k_j + M_ij) v_j,   M_ij = 0 where j <= i and segment(j) = segment(i), else -inf
Query head h reads kv head h // (H / K). Logits and softmax in float32, the products in the input dtype (as
jax.nn.dot_product_attention's XLA path).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def segment_mask(segment_ids: jax.Array) -> jax.Array:
    """int [B, S] -> bool [B, 1, S, S], True where query and key belong to the same segment."""
    return (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None = None, *,
              scale: float | None = None) -> jax.Array:
    """q [B, S, H, D], k/v [B, S, K, D], segment_ids int [B, S] or None -> [B, S, H, D] in q.dtype."""
    b, s, h, d = q.shape
    kv = k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    qg = q.reshape(b, s, kv, h // kv, d)
    logits = jnp.einsum("bqkgd,btkd->bkgqt", qg, k, preferred_element_type=jnp.float32) * scale
    mask = jnp.tril(jnp.ones((s, s), bool))[None, None]  # [1, 1, S, S]
    if segment_ids is not None:
        mask = mask & segment_mask(segment_ids)  # [B, 1, S, S]
    logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgqt,btkd->bqkgd", probs, v)
    return out.reshape(b, s, h, v.shape[-1]).astype(q.dtype)
