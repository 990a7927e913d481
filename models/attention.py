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
    scale: float | None = None,
) -> jax.Array:
    """Causal GQA attention. q: [B, S, H, D]; k, v: [B, S, K, D]; segment_ids: int [B, S] or None -> [B, S, H, D].
    scale: the logit scale (default 1/sqrt(D))."""
    impl = choose_implementation(implementation, q.dtype, q.shape[-1])
    mask = None if segment_ids is None else segment_mask(segment_ids)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, scale=scale, implementation=impl)


def head_projection(x: jax.Array, name: str, heads: int, head_dim: int, axis: str, dtype: Any, init) -> jax.Array:
    """x [B, S, D] -> [B, S, heads, head_dim] (param `name`: [D, heads, head_dim] with logical axes
    ("embed", axis, "head_dim")). Call from inside a compact module: the Dense becomes its child."""
    y = DenseGeneral((heads, head_dim), ("embed", axis, "head_dim"), dtype=dtype, kernel_init=init, name=name)(x)
    return nn.with_logical_constraint(y, ("batch", "length", axis, "head_dim"))


def output_projection(ctx: jax.Array, d_model: int, dtype: Any, init_std: float, name: str = "out") -> jax.Array:
    """Per-head context [B, S, H, Dh] -> [B, S, D], with the "attn_context"/"attn_out" checkpoint names that
    every attention-like mixer shares (so one remat policy covers all of them)."""
    ctx = checkpoint_name(nn.with_logical_constraint(ctx, ("batch", "length", "heads", "head_dim")), "attn_context")
    out = DenseGeneral(d_model, ("heads", "head_dim", "embed"), axis=(-2, -1), dtype=dtype,
                       kernel_init=nn.initializers.normal(init_std), name=name)(ctx)
    return checkpoint_name(nn.with_logical_constraint(out, ("batch", "length", "embed")), "attn_out")


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
        q = head_projection(x, "query", c.num_heads, c.head_dim, "heads", self.dtype, init)
        k = head_projection(x, "key", c.num_kv_heads, c.head_dim, "kv_heads", self.dtype, init)
        v = head_projection(x, "value", c.num_kv_heads, c.head_dim, "kv_heads", self.dtype, init)
        if c.qk_norm:
            q = RMSNorm(self.norm_eps, self.dtype, name="query_norm")(q)
            k = RMSNorm(self.norm_eps, self.dtype, name="key_norm")(k)
        pos = self.rope_positions(positions)
        q = apply_rope(q, pos, c.rope_theta)
        k = apply_rope(k, pos, c.rope_theta)
        q, k, v = (checkpoint_name(t, "qkv_proj") for t in (q, k, v))
        return output_projection(self.core(q, k, v, segment_ids), x.shape[-1], self.dtype, self.out_init_std)

    # Hooks for attention variants that keep these projections and parameter names (e.g. models.ebt's
    # System-2 and bidirectional attention) but change the core or the rotary positions.
    def core(self, q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
        """q [B,L,H,Dh], k/v [B,L,K,Dh] -> ctx [B,L,H,Dh]: causal GQA attention within segments."""
        return dot_product_attention(q, k, v, segment_ids, implementation=self.cfg.implementation)

    def rope_positions(self, positions: jax.Array) -> jax.Array:
        return positions
