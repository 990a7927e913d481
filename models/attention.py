"""Grouped-query causal self-attention with RoPE, through `jax.nn.dot_product_attention`.

o = softmax(q k^T / sqrt(d_h) + M) v per head (Vaswani et al. 2017), with H query heads sharing
K = num_kv_heads key/value heads (GQA, Ainslie et al. 2023; head h reads kv head h // (H / K)).
M is causal and block-diagonal over `segment_ids`, so packed documents never attend across each other.
Cached decoding (models/kinds.py): a KV cache [B, T, K, Dh] preallocated to the maximum length, written at each
token's per-row position (`Attention.cached_core`, `cache_write`, `cached_attention`).
"""
from __future__ import annotations

import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from axlearn_like.config import config_class, require
from kernels.attention import IMPLEMENTATIONS, choose_implementation, dot_product_attention, segment_mask  # noqa: F401
from models.kinds import LayerContext, MixerConfig, check_implementation
from models.layers import DenseGeneral, RMSNorm, apply_rope, llama3_frequencies, rope_frequencies, yarn_frequencies

ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def yarn_rope(c: Any, dim: int) -> tuple[jax.Array, float]:
    """`yarn_frequencies` over `dim` rotary dims from the YaRN fields a config shares with Hugging Face's "yarn"
    rope parameters (rope_theta, rope_factor, rope_original_max_len, yarn_beta_fast, yarn_beta_slow,
    yarn_mscale, yarn_mscale_all_dim, yarn_attention_factor, yarn_truncate; AttentionConfig, MLAConfig)."""
    return yarn_frequencies(
        dim, c.rope_theta, c.rope_factor, c.rope_original_max_len, beta_fast=c.yarn_beta_fast,
        beta_slow=c.yarn_beta_slow, mscale=c.yarn_mscale, mscale_all_dim=c.yarn_mscale_all_dim,
        attention_factor=c.yarn_attention_factor, truncate=c.yarn_truncate)


@config_class
class AttentionConfig(MixerConfig):
    """The "attention" mixer kind: num_heads query heads of size head_dim, num_kv_heads shared K/V heads
    (GQA; = num_heads for MHA).

    implementation: None (cuDNN flash attention on GPU when dtype/head_dim allow it, XLA otherwise),
    "xla" or "cudnn" (forced; errors off-GPU). qk_norm: RMSNorm on q and k per head before RoPE.
    qkv_bias / out_bias: biases on the q, k, v projections (Qwen2) / on the output projection.
    rope_type: "default" (theta^(-2i/d)), "linear" (positions / rope_factor), "llama3"
    (models.layers.llama3_frequencies with rope_factor, rope_original_max_len, rope_low/high_freq_factor) or
    "yarn" (models.layers.yarn_frequencies with rope_factor, rope_original_max_len and the yarn_* fields;
    its attention factor scales q and k after the rotation, as Hugging Face scales cos and sin).
    """

    kind: ClassVar[str] = "attention"
    logical_axes: ClassVar[tuple[str, ...]] = ("embed", "heads", "kv_heads", "head_dim", "norm")
    decode_cache: ClassVar[bool] = True  # KV cache: `Attention.cached_core`

    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 64
    rope_theta: float = 10000.0
    implementation: str | None = None
    qk_norm: bool = False
    qkv_bias: bool = False
    out_bias: bool = False
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_original_max_len: int = 8192
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_mscale: float = 0.0
    yarn_mscale_all_dim: float = 0.0
    yarn_attention_factor: float | None = None
    yarn_truncate: bool = True

    def rope(self) -> tuple[jax.Array, float]:
        """-> (inv_freq float32 [head_dim / 2], attention factor that multiplies q and k after RoPE)."""
        d, theta = self.head_dim, self.rope_theta
        if self.rope_type == "linear":
            return rope_frequencies(d, theta) / self.rope_factor, 1.0
        if self.rope_type == "llama3":
            return llama3_frequencies(d, theta, self.rope_factor, self.rope_original_max_len,
                                      self.rope_low_freq_factor, self.rope_high_freq_factor), 1.0
        if self.rope_type == "yarn":
            return yarn_rope(self, d)
        return rope_frequencies(d, theta), 1.0

    def build(self, ctx: LayerContext, name: str) -> nn.Module:
        return Attention(self, ctx.dtype, ctx.init_std, ctx.out_init_std, ctx.norm_eps, name=name)

    def extra_flops(self, d_model: int, seq_len: int) -> float:
        """q.k and p.v: 2 matmuls x 2 FLOPs x seq_len x H*D_h per token forward, x3 with backward, /2 causal."""
        del d_model
        return 12.0 * seq_len * self.num_heads * self.head_dim / 2

    def validate(self) -> None:
        require(self.num_heads >= 1 and self.num_kv_heads >= 1, "num_heads", "head counts must be >= 1")
        require(
            self.num_heads % self.num_kv_heads == 0,
            "num_kv_heads",
            f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}",
        )
        require(self.head_dim >= 2 and self.head_dim % 2 == 0, "head_dim",
                f"must be even for RoPE, got {self.head_dim}")
        require(self.rope_theta > 0, "rope_theta", f"must be > 0, got {self.rope_theta}")
        require(self.rope_type in ROPE_TYPES, "rope_type", f"{self.rope_type!r} is not one of {list(ROPE_TYPES)}")
        require(self.rope_factor > 0, "rope_factor", f"must be > 0, got {self.rope_factor}")
        require(self.rope_original_max_len >= 1, "rope_original_max_len",
                f"must be >= 1, got {self.rope_original_max_len}")
        require(0 < self.rope_low_freq_factor < self.rope_high_freq_factor, "rope_low_freq_factor",
                f"need 0 < rope_low_freq_factor < rope_high_freq_factor, got {self.rope_low_freq_factor} and "
                f"{self.rope_high_freq_factor}")
        require(0 < self.yarn_beta_slow <= self.yarn_beta_fast, "yarn_beta_slow",
                f"need 0 < yarn_beta_slow <= yarn_beta_fast, got {self.yarn_beta_slow} and {self.yarn_beta_fast}")
        check_implementation(self.implementation, IMPLEMENTATIONS, "attention")


def head_projection(x: jax.Array, name: str, heads: int, head_dim: int, axis: str, dtype: Any, init,
                    bias: bool = False) -> jax.Array:
    """x [B, S, D] -> [B, S, heads, head_dim] (param `name`: [D, heads, head_dim] with logical axes
    ("embed", axis, "head_dim"), plus bias [heads, head_dim] when `bias`). Call from inside a compact module:
    the Dense becomes its child."""
    y = DenseGeneral((heads, head_dim), ("embed", axis, "head_dim"), dtype=dtype, kernel_init=init, use_bias=bias,
                     name=name)(x)
    return nn.with_logical_constraint(y, ("batch", "length", axis, "head_dim"))


def cache_write(cache: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
    """cache [B, T, ...] with new [B, S, ...] written at slots positions int [B, S] (row by row; slots >= T
    are dropped)."""
    rows = jnp.arange(cache.shape[0])[:, None]
    return cache.at[rows, positions].set(new.astype(cache.dtype), mode="drop")


def cached_attention(q: jax.Array, keys: jax.Array, values: jax.Array, positions: jax.Array,
                     scale: float | None = None) -> jax.Array:
    """Decode-time GQA attention over a KV cache: q [B, S, H, D] at positions int [B, S], keys [B, T, K, D],
    values [B, T, K, Dv] -> [B, S, H, Dv] in q.dtype; query i of row b attends to slots t <= positions[b, i]
    (the cache holds the row's context in slot order). Logits and softmax in float32."""
    b, s, h, d = q.shape
    t, kv = keys.shape[1], keys.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qg = q.reshape(b, s, kv, h // kv, d)
    logits = jnp.einsum("bskgd,btkd->bkgst", qg, keys.astype(q.dtype), preferred_element_type=jnp.float32) * scale
    visible = jnp.arange(t)[None, None, :] <= positions[:, :, None]  # [B, S, T]
    logits = jnp.where(visible[:, None, None], logits, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bkgst,btkd->bskgd", p.astype(values.dtype), values, preferred_element_type=jnp.float32)
    return out.reshape(b, s, h, values.shape[-1]).astype(q.dtype)


def output_projection(ctx: jax.Array, d_model: int, dtype: Any, init_std: float, name: str = "out",
                      bias: bool = False) -> jax.Array:
    """Per-head context [B, S, H, Dh] -> [B, S, D] (bias [D] when `bias`), with the "attn_context"/"attn_out"
    checkpoint names that every attention-like mixer shares (so one remat policy covers all of them)."""
    ctx = checkpoint_name(nn.with_logical_constraint(ctx, ("batch", "length", "heads", "head_dim")), "attn_context")
    out = DenseGeneral(d_model, ("heads", "head_dim", "embed"), axis=(-2, -1), dtype=dtype,
                       kernel_init=nn.initializers.normal(init_std), use_bias=bias, name=name)(ctx)
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
    def __call__(
        self, x: jax.Array, *, positions: jax.Array, segment_ids: jax.Array | None, train: bool = False
    ) -> jax.Array:
        del train
        c = self.cfg
        init = nn.initializers.normal(self.init_std)
        q = head_projection(x, "query", c.num_heads, c.head_dim, "heads", self.dtype, init, c.qkv_bias)
        k = head_projection(x, "key", c.num_kv_heads, c.head_dim, "kv_heads", self.dtype, init, c.qkv_bias)
        v = head_projection(x, "value", c.num_kv_heads, c.head_dim, "kv_heads", self.dtype, init, c.qkv_bias)
        if c.qk_norm:
            q = RMSNorm(self.norm_eps, self.dtype, name="query_norm")(q)
            k = RMSNorm(self.norm_eps, self.dtype, name="key_norm")(k)
        pos = self.rope_positions(positions)
        inv_freq, factor = c.rope()
        q = apply_rope(q, pos, inv_freq=inv_freq)
        k = apply_rope(k, pos, inv_freq=inv_freq)
        if factor != 1.0:  # YaRN: cos and sin scaled by `factor` on both q and k
            q, k = (t * jnp.asarray(factor, t.dtype) for t in (q, k))
        q, k, v = (checkpoint_name(t, "qkv_proj") for t in (q, k, v))
        ctx = self.attend(q, k, v, positions, segment_ids)
        return output_projection(ctx, x.shape[-1], self.dtype, self.out_init_std, bias=c.out_bias)

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
               segment_ids: jax.Array | None) -> jax.Array:
        """q, k, v after RoPE -> per-head context: `cached_core` in cached decoding (the kind's decode_cache
        and a mutable 'cache' collection), else `core`. Variants with their own cache logic override this."""
        if self.cfg.decode_cache and self.is_mutable_collection("cache") and not self.is_initializing():
            return self.cached_core(q, k, v, positions)
        return self.core(q, k, v, segment_ids)

    def cached_core(self, q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array) -> jax.Array:
        """Cached decoding (models/kinds.py): k, v (after RoPE) go to cache "cached_key" / "cached_value"
        [B, T, K, Dh] at slots `positions`, then each query attends to its row's slots <= its position. Right
        padding needs no mask: its slots lie past the row's last token and are overwritten before any query
        reaches them."""
        shape = (q.shape[0], q.shape[1], *k.shape[2:])
        keys = self.variable("cache", "cached_key", jnp.zeros, shape, k.dtype)
        values = self.variable("cache", "cached_value", jnp.zeros, shape, v.dtype)
        keys.value = cache_write(keys.value, k, positions)
        values.value = cache_write(values.value, v, positions)
        return cached_attention(q, keys.value, values.value, positions)

    # Hooks for attention variants that keep these projections and parameter names (e.g. models.ebt's
    # System-2 and bidirectional attention) but change the core or the rotary positions.
    def core(self, q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
        """q [B,L,H,Dh], k/v [B,L,K,Dh] -> ctx [B,L,H,Dh]: causal GQA attention within segments."""
        return dot_product_attention(q, k, v, segment_ids, implementation=self.cfg.implementation)

    def rope_positions(self, positions: jax.Array) -> jax.Array:
        return positions
