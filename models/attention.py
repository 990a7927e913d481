"""Grouped-query causal self-attention with RoPE, through `jax.nn.dot_product_attention`.

o = softmax(q k^T / sqrt(d_h) + M) v per head (Vaswani et al. 2017), with H query heads sharing
K = num_kv_heads key/value heads (GQA, Ainslie et al. 2023; head h reads kv head h // (H / K)).
M is causal and block-diagonal over `segment_ids`, so packed documents never attend across each other.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from axlearn_like.config import config_class, require
from kernels.common import backend, resolve_implementation
from models.layers import DenseGeneral, RMSNorm, apply_rope

IMPLEMENTATIONS = {"xla": ("cpu", "gpu", "tpu"), "cudnn": ("gpu",)}


@config_class
class AttentionConfig:
    """num_heads query heads of size head_dim, num_kv_heads shared K/V heads (GQA; = num_heads for MHA).

    implementation: None (cuDNN flash attention on GPU when dtype/head_dim allow it, XLA otherwise),
    "xla" or "cudnn" (forced; errors off-GPU). qk_norm: RMSNorm on q and k per head before RoPE.
    """

    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 64
    rope_theta: float = 10000.0
    implementation: str | None = None
    qk_norm: bool = False

    def validate(self) -> None:
        require(self.num_heads >= 1 and self.num_kv_heads >= 1, "num_heads", "head counts must be >= 1")
        require(
            self.num_heads % self.num_kv_heads == 0,
            "num_kv_heads",
            f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}",
        )
        require(self.head_dim >= 2 and self.head_dim % 2 == 0, "head_dim", f"must be even for RoPE, got {self.head_dim}")
        require(self.rope_theta > 0, "rope_theta", f"must be > 0, got {self.rope_theta}")
        require(
            self.implementation in (None, *IMPLEMENTATIONS),
            "implementation",
            f"{self.implementation!r} is not one of None, {', '.join(map(repr, IMPLEMENTATIONS))}",
        )


def choose_implementation(implementation: str | None, dtype: Any, head_dim: int) -> str:
    """None -> 'cudnn' on GPU for 16-bit dtypes and head_dim % 8 == 0, <= 128; else 'xla'."""
    if implementation is not None:
        return resolve_implementation("dot_product_attention", implementation, supported=IMPLEMENTATIONS, preferred={})
    cudnn_ok = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and head_dim % 8 == 0 and head_dim <= 128
    return "cudnn" if backend() == "gpu" and cudnn_ok else "xla"


def segment_mask(segment_ids: jax.Array) -> jax.Array:
    """int [B, S] -> bool [B, 1, S, S], True where query and key belong to the same segment."""
    return (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array | None = None,
    *,
    implementation: str | None = None,
) -> jax.Array:
    """Causal GQA attention. q: [B, S, H, D]; k, v: [B, S, K, D]; segment_ids: int [B, S] or None -> [B, S, H, D]."""
    impl = choose_implementation(implementation, q.dtype, q.shape[-1])
    mask = None if segment_ids is None else segment_mask(segment_ids)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation=impl)


class Attention(nn.Module):
    """The "attention" mixer: [B, S, D] -> [B, S, D].

    Named checkpoints: "qkv_proj" (q, k, v after RoPE), "attn_context" (per-head output), "attn_out".
    """

    cfg: AttentionConfig
    dtype: Any = jnp.bfloat16
    init_std: float = 0.02
    out_init_std: float = 0.02
    norm_eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array, *, positions: jax.Array, segment_ids: jax.Array | None, train: bool = False) -> jax.Array:
        del train
        c = self.cfg
        init = nn.initializers.normal(self.init_std)
        dense = lambda n, heads, axis: DenseGeneral(
            (n, c.head_dim), ("embed", axis, "head_dim"), dtype=self.dtype, kernel_init=init, name=heads
        )
        q = dense(c.num_heads, "query", "heads")(x)
        k = dense(c.num_kv_heads, "key", "kv_heads")(x)
        v = dense(c.num_kv_heads, "value", "kv_heads")(x)
        if c.qk_norm:
            q = RMSNorm(self.norm_eps, self.dtype, name="query_norm")(q)
            k = RMSNorm(self.norm_eps, self.dtype, name="key_norm")(k)
        q = apply_rope(q, positions, c.rope_theta)
        k = apply_rope(k, positions, c.rope_theta)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
        k = nn.with_logical_constraint(k, ("batch", "length", "kv_heads", "head_dim"))
        v = nn.with_logical_constraint(v, ("batch", "length", "kv_heads", "head_dim"))
        q, k, v = (checkpoint_name(t, "qkv_proj") for t in (q, k, v))
        ctx = dot_product_attention(q, k, v, segment_ids, implementation=c.implementation)
        ctx = nn.with_logical_constraint(ctx, ("batch", "length", "heads", "head_dim"))
        ctx = checkpoint_name(ctx, "attn_context")
        out = DenseGeneral(
            x.shape[-1],
            ("heads", "head_dim", "embed"),
            axis=(-2, -1),
            dtype=self.dtype,
            kernel_init=nn.initializers.normal(self.out_init_std),
            name="out",
        )(ctx)
        out = nn.with_logical_constraint(out, ("batch", "length", "embed"))
        return checkpoint_name(out, "attn_out")
