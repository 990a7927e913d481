"""Public causal GQA attention op: argument checks and `implementation=` dispatch (kernels.op rule).

    o_i = softmax_j(scale q_i . k_j + M_ij) v_j,   M_ij = 0 where j <= i and segment(j) = segment(i), else -inf
(Vaswani et al. 2017; GQA, Ainslie et al. 2023: query head h reads kv head h // (H / K)).
Implementations: "xla" (reference.py: materialised scores in jnp, any platform, differentiated by XLA
autodiff) and "cudnn" (jax.nn.dot_product_attention's cuDNN flash attention, GPU, 16-bit inputs, head_dim a
multiple of 8 and <= 128). implementation=None takes cudnn where it can run, else xla.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from kernels import common
from kernels.attention.reference import attention as reference_attention, segment_mask
from kernels.op import PLATFORMS, Op


class DotProductAttention(Op):
    name = "dot_product_attention"
    implementations = {"xla": PLATFORMS, "cudnn": ("gpu",)}
    preference = {"gpu": ("cudnn",)}

    def validate(self, q, k, v, segment_ids=None):
        common.check_attention_shapes(self.name, q, k, v, segment_ids)

    def facts(self, q, k, v, segment_ids=None):
        return {"dtype": q.dtype, "head_dim": q.shape[-1]}

    def unsupported(self, implementation, *, dtype, head_dim):
        if implementation != "cudnn":
            return None
        if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            return f"needs bfloat16 or float16 inputs, got {jnp.dtype(dtype)}; use 'xla' or None"
        if head_dim % 8 or head_dim > 128:
            return f"needs head_dim a multiple of 8 and <= 128, got {head_dim}; use 'xla' or None"
        return None


OP = DotProductAttention()
IMPLEMENTATIONS = OP.IMPLEMENTATIONS


def choose_implementation(implementation: str | None, dtype: Any, head_dim: int) -> str:
    """The implementation a call with this dtype and head_dim uses here (None: cudnn on GPU where it can run)."""
    return OP.pick(implementation, dtype=dtype, head_dim=head_dim)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array | None = None,
    *,
    implementation: str | None = None,
    scale: float | None = None,
) -> jax.Array:
    """Causal GQA attention within segments.

    Args:
      q: [B, S, H, D]; k, v: [B, S, K, D] with H a multiple of K.
      segment_ids: int [B, S] or None (packed documents never attend across each other).
      implementation: "xla", "cudnn" or None (best here).
      scale: the logit scale, default 1/sqrt(D).
    Returns:
      [B, S, H, D] in q.dtype.
    """
    impl = OP.select(implementation, q, k, v, segment_ids)
    if impl == "xla":
        return reference_attention(q, k, v, segment_ids, scale=scale)
    s = q.shape[1]
    if segment_ids is not None and s % 2:
        q, k, v, segment_ids = pad_to_even_length(q, k, v, segment_ids)
    mask = None if segment_ids is None else segment_mask(segment_ids)
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, scale=scale, implementation=impl)
    return out[:, :s]


def pad_to_even_length(q, k, v, segment_ids):
    """One trailing position for cuDNN, whose flash attention differentiates a masked (packed) call only at even
    lengths (an EBT row with its time token is 257 long). Causality keeps every real query from seeing it, and its
    own segment id (row max + 1) keeps it from attending the last document: its output is all zeros, sliced off.
    q [B, S, H, D], k/v [B, S, K, D], segment_ids [B, S] -> the same with S + 1."""
    pad = lambda x: jnp.pad(x, ((0, 0), (0, 1), (0, 0), (0, 0)))
    own = jnp.max(segment_ids, axis=1, keepdims=True) + 1
    return pad(q), pad(k), pad(v), jnp.concatenate([segment_ids, own.astype(segment_ids.dtype)], axis=1)
