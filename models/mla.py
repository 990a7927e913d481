"""Multi-head Latent Attention (DeepSeek-V2 Sec. 2.1, arXiv 2405.04434; as used by DeepSeek-V3, 2412.19437).

Per token h [D], with H heads, latent ranks R = kv_lora_rank and R_q = q_lora_rank (DeepSeek-V2 Eq. 9-19):
    c_kv = RMSNorm(W_dkv h)                               [R]      the only per-token KV state   (9)
    [k_nope_i ; v_i] = W_ukv_i c_kv                       [d_n], [d_v] per head i             (10, 11)
    c_q = RMSNorm(W_dq h)        (q = W_q h when q_lora_rank is None)                         (12)
    [q_nope_i ; q_rope_i] = W_uq_i c_q                    [d_n], [d_r]                        (13, 14)
    k_rope = RoPE(W_kr h)                                 [d_r]    one key shared by all heads  (15)
    q_i = [q_nope_i ; a RoPE(q_rope_i)],  k_i = [k_nope_i ; a k_rope]                         (16, 17)
    o_i = softmax(scale q_i K_i^T + M) V_i,   u = W_o [o_1; ...; o_H]                         (18, 19)
W_dkv and W_kr form one matrix `kv_a` [D, R + d_r] (as in DeepSeek's checkpoints); the RMSNorms after both
latents are DeepSeek's (eps `latent_norm_eps`). v_head_dim d_v may differ from d_n + d_r.

Rotary positions use the half-split layout of models.layers.apply_rope. DeepSeek's checkpoints rotate
interleaved pairs (x_0, x_1), (x_2, x_3), ...; since q_rope and k_rope only meet in a dot product, that is
the same model with the rope rows of W_uq / W_kr permuted (evens first, then odds): the importer
(tools/hf/deepseek.py) permutes, nothing here depends on it.

YaRN (rope_factor > 1): frequencies w_i and the factor a from models.layers.yarn_frequencies (a scales the
rotated halves of q and k, i.e. cos and sin); the logit scale is
    scale = m(s, mscale_all_dim)^2 / sqrt(d_n + d_r),   m(s, c) = 0.1 c ln s + 1,
which also scales the non-rotary dims (DeepSeek's reference and Hugging Face transformers do the same).

M is causal and block-diagonal over `segment_ids`, so packed documents never attend across each other.
The attention itself is models.attention.dot_product_attention (cuDNN flash attention on GPU where dtype
and head dim allow, XLA otherwise); it needs equal q/k and v head dims, so the narrower side is
zero-padded (exact: zero columns of v give zero outputs that are sliced off; zero columns of q and k
leave the logits unchanged).
"""
from __future__ import annotations

import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from axlearn_like.config import config_class, require
from models.attention import IMPLEMENTATIONS, cache_write, dot_product_attention, output_projection, yarn_rope
from models.kinds import LayerContext, MixerConfig, check_implementation
from models.layers import DenseGeneral, RMSNorm, apply_rope, rope_frequencies, yarn_mscale


@config_class
class MLAConfig(MixerConfig):
    """The "mla" mixer kind. Head dims: qk_nope_head_dim d_n, qk_rope_head_dim d_r, v_head_dim d_v.

    q_lora_rank: None = full-rank queries (DeepSeek-V2-Lite), else the query latent width.
    rope_factor: YaRN scale s (1.0 = plain RoPE); rope_original_max_len, yarn_* as Hugging Face's "yarn"
    rope parameters (beta_fast, beta_slow, mscale, mscale_all_dim, attention_factor, truncate; 0 = unset).
    implementation: None (cuDNN on GPU where the padded head dim allows, XLA otherwise), "xla" or "cudnn".
    """

    num_heads: int = 4
    kv_lora_rank: int = 64
    q_lora_rank: int | None = 96
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    rope_theta: float = 10000.0
    rope_factor: float = 1.0
    rope_original_max_len: int = 4096
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_mscale: float = 0.0
    yarn_mscale_all_dim: float = 0.0
    yarn_attention_factor: float | None = None
    yarn_truncate: bool = True
    latent_norm_eps: float = 1e-6
    implementation: str | None = None

    kind: ClassVar[str] = "mla"
    logical_axes: ClassVar[tuple[str, ...]] = ("embed", "q_lora", "kv_lora", "heads", "head_dim", "norm")
    decode_cache: ClassVar[bool] = True  # latent cache + absorbed projections: `MLA.cached_core`

    def build(self, ctx: LayerContext, name: str) -> nn.Module:
        return MLA(self, ctx.dtype, ctx.init_std, ctx.out_init_std, name=name)

    def extra_flops(self, d_model: int, seq_len: int) -> float:
        """q.k (d_n + d_r) and p.v (d_v) per token: 2 FLOPs/MAC x seq_len, x3 with the backward, /2 causal
        (the convention of models.attention)."""
        del d_model
        return 3.0 * seq_len * self.num_heads * (self.qk_head_dim + self.v_head_dim)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def validate(self) -> None:
        require(self.num_heads >= 1, "num_heads", f"must be >= 1, got {self.num_heads}")
        require(self.kv_lora_rank >= 1, "kv_lora_rank", f"must be >= 1, got {self.kv_lora_rank}")
        require(self.q_lora_rank is None or self.q_lora_rank >= 1, "q_lora_rank",
                f"must be None (full-rank queries) or >= 1, got {self.q_lora_rank}")
        require(self.qk_nope_head_dim >= 0, "qk_nope_head_dim", f"must be >= 0, got {self.qk_nope_head_dim}")
        require(self.qk_rope_head_dim >= 2 and self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim",
                f"must be even and >= 2 for RoPE, got {self.qk_rope_head_dim}")
        require(self.v_head_dim >= 1, "v_head_dim", f"must be >= 1, got {self.v_head_dim}")
        require(self.rope_theta > 1, "rope_theta", f"must be > 1, got {self.rope_theta}")
        require(self.rope_factor >= 1, "rope_factor", f"must be >= 1 (1 = no YaRN scaling), got {self.rope_factor}")
        require(self.rope_original_max_len >= 1, "rope_original_max_len",
                f"must be >= 1, got {self.rope_original_max_len}")
        require(0 < self.yarn_beta_slow <= self.yarn_beta_fast, "yarn_beta_slow",
                f"need 0 < yarn_beta_slow <= yarn_beta_fast, got {self.yarn_beta_slow} and {self.yarn_beta_fast}")
        require(self.latent_norm_eps > 0, "latent_norm_eps", f"must be > 0, got {self.latent_norm_eps}")
        check_implementation(self.implementation, IMPLEMENTATIONS, "attention")

    def rope(self) -> tuple[jax.Array, float]:
        """-> (inv_freq float32 [d_r / 2], attention factor a applied to the rotated q and k halves)."""
        if self.rope_factor == 1.0:
            return rope_frequencies(self.qk_rope_head_dim, self.rope_theta), 1.0
        return yarn_rope(self, self.qk_rope_head_dim)

    def softmax_scale(self) -> float:
        """m(s, mscale_all_dim)^2 / sqrt(d_n + d_r) (YaRN's correction on every dim; 1/sqrt(d) unscaled)."""
        scale = 1.0 / math.sqrt(self.qk_head_dim)
        if self.rope_factor != 1.0 and self.yarn_mscale_all_dim:
            scale *= yarn_mscale(self.rope_factor, self.yarn_mscale_all_dim) ** 2
        return scale


def mla_core(q, k, v, segment_ids, *, scale: float, implementation: str | None) -> jax.Array:
    """Causal attention with per-head k, v (K = H). q, k: [B, S, H, Dqk]; v: [B, S, H, Dv] -> [B, S, H, Dv].

    Unequal Dqk / Dv are zero-padded to the larger one (exact, see the module docstring)."""
    dqk, dv = q.shape[-1], v.shape[-1]
    pad = lambda t, n: jnp.pad(t, ((0, 0),) * 3 + ((0, n),))
    if dv < dqk:
        v = pad(v, dqk - dv)
    elif dqk < dv:
        q, k = pad(q, dv - dqk), pad(k, dv - dqk)
    out = dot_product_attention(q, k, v, segment_ids, implementation=implementation, scale=scale)
    return out[..., :dv]


class MLA(nn.Module):
    """The "mla" mixer: [B, S, D] -> [B, S, D].

    Params: q_a [D, R_q] + q_a_norm + q_b [R_q, H, d_n + d_r] (or query [D, H, d_n + d_r]), kv_a [D, R + d_r],
    kv_a_norm [R], kv_b [R, H, d_n + d_v], out [H, d_v, D]. Named checkpoints: "qkv_proj" (q, k, v after
    RoPE), "attn_context", "attn_out" (shared with models.attention).
    """

    cfg: MLAConfig
    dtype: Any = jnp.bfloat16
    init_std: float = 0.02
    out_init_std: float = 0.02

    @nn.compact
    def __call__(
        self, x: jax.Array, *, positions: jax.Array, segment_ids: jax.Array | None, train: bool = False
    ) -> jax.Array:
        del train
        c = self.cfg
        h, dn, dr, dv, r = c.num_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
        init = nn.initializers.normal(self.init_std)
        dense = lambda feats, axes, name: DenseGeneral(feats, axes, dtype=self.dtype, kernel_init=init, name=name)
        norm = lambda name: RMSNorm(c.latent_norm_eps, self.dtype, name=name)
        heads = lambda t: nn.with_logical_constraint(t, ("batch", "length", "heads", "head_dim"))

        if c.q_lora_rank is None:
            q = dense((h, dn + dr), ("embed", "heads", "head_dim"), "query")(x)
        else:
            cq = norm("q_a_norm")(dense(c.q_lora_rank, ("embed", "q_lora"), "q_a")(x))
            cq = nn.with_logical_constraint(cq, ("batch", "length", "q_lora"))
            q = dense((h, dn + dr), ("q_lora", "heads", "head_dim"), "q_b")(cq)
        q = heads(q)

        kv_a = dense(r + dr, ("embed", "kv_lora"), "kv_a")(x)
        ckv = nn.with_logical_constraint(norm("kv_a_norm")(kv_a[..., :r]), ("batch", "length", "kv_lora"))
        kv_b = dense((h, dn + dv), ("kv_lora", "heads", "head_dim"), "kv_b")

        inv_freq, a = c.rope()
        rot = lambda t: (apply_rope(t, positions, inv_freq=inv_freq).astype(jnp.float32) * a).astype(t.dtype)
        q_rope = rot(q[..., dn:])
        k_rope = rot(kv_a[..., None, r:])  # [B, S, 1, d_r]: one rotary key for every head
        if self.is_mutable_collection("cache") and not self.is_initializing():
            w_ukv = nn.unbox(self.variables["params"]["kv_b"]["kernel"]).astype(self.dtype)  # [R, H, d_n + d_v]
            ctx = self.cached_core(q[..., :dn], q_rope, ckv, k_rope[:, :, 0], w_ukv, positions)
            return output_projection(ctx, x.shape[-1], self.dtype, self.out_init_std)
        kv = heads(kv_b(ckv))
        k_nope, v = kv[..., :dn], kv[..., dn:]
        q = jnp.concatenate([q[..., :dn], q_rope], axis=-1)
        k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope, (*k_nope.shape[:-1], dr))], axis=-1)
        q, k, v = (checkpoint_name(heads(t), "qkv_proj") for t in (q, k, v))
        ctx = mla_core(q, k, v, segment_ids, scale=c.softmax_scale(), implementation=c.implementation)
        return output_projection(ctx, x.shape[-1], self.dtype, self.out_init_std)

    def cached_core(self, q_nope, q_rope, ckv, k_rope, w_ukv, positions):
        """Cached decoding (models/kinds.py) with the latent cache of DeepSeek-V2 Sec. 2.1: per token only
        c_kv [R] ("kv_latent") and the shared rotary key [d_r] ("k_rope") are cached ([B, T, R], [B, T, d_r]),
        and W_ukv = [W_uk ; W_uv] is absorbed: q_nope_i . k_nope_i,t = (W_uk_i^T q_nope_i) . c_kv_t (W_uk into the
        query) and sum_t p_t W_uv_i c_kv_t = W_uv_i (sum_t p_t c_kv_t) (W_uv into the output), so attention runs in
        the R-dim latent space and per-head keys/values are never formed. q_nope [B, S, H, d_n], q_rope
        [B, S, H, d_r] (rotated), ckv [B, S, R], k_rope [B, S, d_r] (rotated) -> context [B, S, H, d_v]."""
        c = self.cfg
        b, s = ckv.shape[:2]
        latent = self.variable("cache", "kv_latent", jnp.zeros, (b, s, c.kv_lora_rank), self.dtype)
        rope_key = self.variable("cache", "k_rope", jnp.zeros, (b, s, c.qk_rope_head_dim), self.dtype)
        latent.value = cache_write(latent.value, ckv, positions)
        rope_key.value = cache_write(rope_key.value, k_rope, positions)
        lat, kr = latent.value, rope_key.value
        f32 = jnp.float32
        w_uk, w_uv = w_ukv[..., :c.qk_nope_head_dim], w_ukv[..., c.qk_nope_head_dim:]
        q_lat = jnp.einsum("bshn,rhn->bshr", q_nope, w_uk, preferred_element_type=f32).astype(self.dtype)
        logits = (jnp.einsum("bshr,btr->bhst", q_lat, lat, preferred_element_type=f32)
                  + jnp.einsum("bshd,btd->bhst", q_rope.astype(self.dtype), kr, preferred_element_type=f32))
        visible = jnp.arange(lat.shape[1])[None, None, :] <= positions[:, :, None]  # [B, S, T]
        logits = jnp.where(visible[:, None], logits * c.softmax_scale(), jnp.finfo(f32).min)
        p = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        o_lat = jnp.einsum("bhst,btr->bshr", p, lat, preferred_element_type=f32).astype(self.dtype)
        return jnp.einsum("bshr,rhv->bshv", o_lat, w_uv, preferred_element_type=f32).astype(self.dtype)
