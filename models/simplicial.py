"""2-simplicial attention mixer (Roy et al. 2025, "Fast and Simplex", arXiv 2507.02754), layer kind "simplicial".

Projections Q = x W_Q, K = x W_K, V = x W_V, K' = x W_K', V' = x W_V' (GQA: num_heads query heads share
num_kv_heads K/V/K'/V' heads), then the op of kernels.simplicial with causal sliding windows (w1 for K/V,
w2 for K'/V'):
    A_ijk = scale <q_i, k_j * k'_k>  (Eq. 5; or the determinant form, Eq. 8-9)
    o_i   = sum_jk softmax_jk(A_ijk) (v_j * v'_k)  (Eq. 6-7)
and an output projection back to d_model.

RoPE (the paper does not say): `rope="none"` (default) uses no position encoding in this layer; the
windows are causal and local, and the global-attention layers around it carry RoPE. `rope="q_k1"`
rotates q and k (the first key, window w1) with RoPE at each token's position, leaving k' unrotated; with
a pair-isotropic k' this makes the q-k interaction depend on i - j only, as in dot-product attention, but
in general the trilinear form is not relative-position invariant (a rotation does not commute with the
Hadamard product by k'), and it breaks the determinant variant's rotation invariance. See
docs/notes/simplicial_model.md.

Packed documents (segment_ids given): the op masks exactly, query i attending to the pairs (j, k) of its
windows with segment_ids[j] == segment_ids[k] == segment_ids[i] (kernels.simplicial.two_simplicial_attention;
the same equality rule as the attention layers' mask), so no information crosses a document boundary and every
query of a contiguous document equals that document run alone. On a GPU the cuDNN path cannot mask, so calls with
segment ids use the Triton kernels (implementation=None picks them; implementation="cudnn" is refused).
"""
from __future__ import annotations

import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from axlearn_like.config import config_class, require
from kernels.simplicial import IMPLEMENTATIONS, two_simplicial_attention
from models.attention import head_projection, output_projection
from models.kinds import LayerContext, MixerConfig, check_implementation
from models.layers import apply_rope

_VARIANTS = ("trilinear", "determinant")
_ROPE = ("none", "q_k1")


@config_class
class SimplicialConfig(MixerConfig):
    """The "simplicial" mixer kind (`--set model.layer_pattern.simplicial.<field>=...`).

    num_heads query heads and num_kv_heads shared K/V/K'/V' heads of size head_dim (the paper's kernel
    uses 64 query heads per K/V head). w1, w2: causal windows of (K, V) and (K', V'); the paper uses
    (512, 32). variant: "trilinear" or "determinant" (head_dim % 3 == 0). implementation: passed to
    kernels.simplicial.two_simplicial_attention (None = best for the backend). rope: "none" | "q_k1"
    (module docstring). scale: logit scale, None = 1/sqrt(head_dim). k2_bias, v2_bias: scalars added to K' and
    V' inside the op, as in Meta's reference (None = 1/head_dim, and 1.0); 0.0 and 0.0 give the bias-free form.
    Saved configs from before these fields load bias-free (migrate_dict), as they were trained.
    """

    kind: ClassVar[str] = "simplicial"
    logical_axes: ClassVar[tuple[str, ...]] = ("embed", "heads", "kv_heads", "head_dim")
    decode_cache: ClassVar[bool] = True  # window buffers of the last max(w1, w2) keys/values

    num_heads: int = 8
    num_kv_heads: int = 1
    head_dim: int = 64
    w1: int = 512
    w2: int = 32
    variant: str = "trilinear"
    implementation: str | None = None
    rope: str = "none"
    rope_theta: float = 10000.0
    scale: float | None = None
    k2_bias: float | None = None
    v2_bias: float = 1.0

    @classmethod
    def migrate_dict(cls, d: dict) -> dict:
        """A config saved before k2_bias / v2_bias existed ran the bias-free op: keep it so."""
        if "k2_bias" not in d and "v2_bias" not in d:
            d.update(k2_bias=0.0, v2_bias=0.0)
        return d

    def validate(self) -> None:
        require(self.num_heads >= 1, "num_heads", f"must be >= 1, got {self.num_heads}")
        require(self.num_kv_heads >= 1, "num_kv_heads", f"must be >= 1, got {self.num_kv_heads}")
        require(
            self.num_heads % self.num_kv_heads == 0,
            "num_kv_heads",
            f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}",
        )
        require(self.head_dim >= 1, "head_dim", f"must be >= 1, got {self.head_dim}")
        require(self.w1 >= 1, "w1", f"window must be >= 1, got {self.w1}")
        require(self.w2 >= 1, "w2", f"window must be >= 1, got {self.w2}")
        require(self.variant in _VARIANTS, "variant",
                f"unknown variant {self.variant!r}; choose one of {list(_VARIANTS)}")
        require(
            self.variant != "determinant" or self.head_dim % 3 == 0,
            "head_dim",
            f"variant='determinant' splits head_dim into 3-dim chunks; head_dim={self.head_dim} is not a multiple of 3",
        )
        require(self.rope in _ROPE, "rope", f"unknown rope {self.rope!r}; choose one of {list(_ROPE)}")
        require(
            self.rope == "none" or self.head_dim % 2 == 0,
            "head_dim",
            f"rope={self.rope!r} needs an even head_dim, got {self.head_dim}",
        )
        require(self.rope_theta > 0, "rope_theta", f"must be > 0, got {self.rope_theta}")
        check_implementation(self.implementation, IMPLEMENTATIONS, "simplicial")
        require(self.scale is None or self.scale > 0, "scale", f"must be None or > 0, got {self.scale}")
        require(self.k2_bias is None or math.isfinite(self.k2_bias), "k2_bias",
                f"must be None (1/head_dim) or a finite number, got {self.k2_bias}")
        require(math.isfinite(self.v2_bias), "v2_bias", f"must be a finite number, got {self.v2_bias}")

    def build(self, ctx: LayerContext, name: str) -> nn.Module:
        return SimplicialAttention(self, ctx.dtype, ctx.init_std, ctx.out_init_std, name=name)

    def extra_flops(self, d_model: int, seq_len: int) -> float:
        """Training FLOPs per token beyond 6 x its parameters.

        Forward per query head: the logits matmul 2 * Dk * pairs (Dk = head_dim, 2 * head_dim for the
        determinant form) and the value matmul 2 * head_dim * pairs, pairs = mean allowed (j, k) per query
        (O(w1 * w2)); training = 3 x forward (backward ~ 2 x forward), as for "attention".
        """
        del d_model
        dk = 2 * self.head_dim if self.variant == "determinant" else self.head_dim
        forward = 2.0 * (dk + self.head_dim) * mean_window_pairs(seq_len, self.w1, self.w2) * self.num_heads
        return 3.0 * forward


class SimplicialAttention(nn.Module):
    """The "simplicial" mixer: x [B, S, D] -> [B, S, D] in `dtype`.

    Named checkpoints (shared with the "attention" mixer so remat policies apply to both): "qkv_proj"
    (q, k, v, k', v' after RoPE), "attn_context" (per-head output), "attn_out".
    """

    cfg: SimplicialConfig
    dtype: Any = jnp.bfloat16
    init_std: float = 0.02
    out_init_std: float = 0.02

    @nn.compact
    def __call__(
        self, x: jax.Array, *, positions: jax.Array, segment_ids: jax.Array | None = None, train: bool = False
    ) -> jax.Array:
        del train
        c = self.cfg
        init = nn.initializers.normal(self.init_std)

        def proj(name: str, heads: int, axis: str) -> jax.Array:
            return head_projection(x, name, heads, c.head_dim, axis, self.dtype, init)

        q = proj("query", c.num_heads, "heads")
        k1, v1 = proj("key", c.num_kv_heads, "kv_heads"), proj("value", c.num_kv_heads, "kv_heads")
        k2, v2 = proj("key2", c.num_kv_heads, "kv_heads"), proj("value2", c.num_kv_heads, "kv_heads")
        if c.rope == "q_k1":
            q = apply_rope(q, positions, c.rope_theta)
            k1 = apply_rope(k1, positions, c.rope_theta)
        q, k1, v1, k2, v2 = (checkpoint_name(t, "qkv_proj") for t in (q, k1, v1, k2, v2))
        if self.is_mutable_collection("cache") and not self.is_initializing():
            ctx = self.cached_core(q, k1, v1, k2, v2, positions, segment_ids)
            return output_projection(ctx, x.shape[-1], self.dtype, self.out_init_std)
        ctx = two_simplicial_attention(
            q, k1, v1, k2, v2, w1=c.w1, w2=c.w2, variant=c.variant, scale=c.scale, k2_bias=c.k2_bias,
            v2_bias=c.v2_bias, segment_ids=segment_ids, implementation=c.implementation
        )
        return output_projection(ctx, x.shape[-1], self.dtype, self.out_init_std)

    def cached_core(self, q, k1, v1, k2, v2, positions, segment_ids):
        """Cached decoding (models/kinds.py). The cache holds each row's last W = max(w1, w2) tokens' k1, v1,
        k2, v2 ([B, W, K, Dh] each, "window_*"), oldest first: entry j is the token at position p0 - W + j when
        the call's first token sits at p0 (a position < 0 is empty). The new tokens' windows are read from
        [window ; new] with those masked out (and right padding, segment id 0), so the result is the op's exactly
        (`simplicial_window_attention`); then the window moves to end at each row's last real token."""
        c = self.cfg
        b, s = q.shape[:2]
        w = max(c.w1, c.w2)
        bufs = [self.variable("cache", f"window_{n}", jnp.zeros, (b, w, *t.shape[2:]), t.dtype)
                for n, t in (("key", k1), ("value", v1), ("key2", k2), ("value2", v2))]
        valid = jnp.ones((b, s), bool) if segment_ids is None else segment_ids != 0
        buf_pos = positions[:, :1] - w + jnp.arange(w)[None, :]
        ok = jnp.concatenate([buf_pos >= 0, valid], axis=1)  # [B, W + S]
        k1c, v1c, k2c, v2c = (jnp.concatenate([buf.value, t.astype(buf.value.dtype)], axis=1)
                              for buf, t in zip(bufs, (k1, v1, k2, v2)))
        ctx = simplicial_window_attention(q, k1c, v1c, k2c, v2c, ok, w1=c.w1, w2=c.w2, variant=c.variant,
                                          scale=c.scale, k2_bias=c.k2_bias, v2_bias=c.v2_bias)
        # keep the W entries that end at each row's last real token (right padding is a suffix)
        keep = jnp.sum(valid, axis=1, dtype=jnp.int32)[:, None] + jnp.arange(w)[None, :]
        for buf, cat in zip(bufs, (k1c, v1c, k2c, v2c)):
            buf.value = jnp.take_along_axis(cat, keep[:, :, None, None], axis=1)
        return ctx


def simplicial_window_attention(q, k1, v1, k2, v2, ok, *, w1: int, w2: int, variant: str = "trilinear",
                                scale: float | None = None, k2_bias: float | None = None, v2_bias: float = 1.0,
                                query_chunk: int | None = None):
    """2-simplicial attention of the last S tokens of a masked key stream (the decode path; the op's math).

    q [B, S, Hq, D]: queries of stream entries L - S .. L - 1; k1, v1, k2, v2 [B, L, K, D] (L >= S + max(w1, w2)
    - 1); ok bool [B, L]: which entries exist. Query i (entry e = L - S + i) sees k1/v1 at e - w1 < j <= e and
    k2/v2 at e - w2 < k <= e where ok; softmax over the allowed (j, k) pairs; biases and variant as
    kernels.simplicial.two_simplicial_attention. Queries go `query_chunk` at a time (logits [B, chunk, Hq, w1,
    w2] float32 per chunk). A query with no allowed pair gets a finite meaningless output (never NaN).
    """
    from kernels.simplicial import reference

    b, s, hq, d = q.shape
    big_l, kv = k1.shape[1], k1.shape[2]
    g = hq // kv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    k2, v2 = reference.biased_operands(k2, v2, reference.default_k2_bias(d) if k2_bias is None else k2_bias,
                                       v2_bias)
    if variant == "determinant":
        q, k1, k2 = reference.determinant_operands(q, k1, k2)
    if query_chunk is None:
        query_chunk = max(1, min(s, (1 << 24) // max(1, b * hq * w1 * w2)))
    n = -(-s // query_chunk)
    qp = jnp.pad(q, ((0, 0), (0, n * query_chunk - s), (0, 0), (0, 0)))
    qp = qp.reshape(b, n, query_chunk, kv, g, q.shape[-1])
    f32 = jnp.float32

    def one_chunk(args):
        q_c, start = args
        e = big_l - s + start + jnp.arange(query_chunk)  # stream entries of these queries (past L: padding)
        i1 = jnp.clip(e[:, None] - w1 + 1 + jnp.arange(w1)[None, :], 0, big_l - 1)  # [C, w1]
        i2 = jnp.clip(e[:, None] - w2 + 1 + jnp.arange(w2)[None, :], 0, big_l - 1)
        m1 = ok[:, i1] & (e[:, None] - w1 + 1 + jnp.arange(w1)[None, :] >= 0)[None]
        m2 = ok[:, i2] & (e[:, None] - w2 + 1 + jnp.arange(w2)[None, :] >= 0)[None]
        mask = m1[:, :, :, None] & m2[:, :, None, :]  # [B, C, w1, w2]
        qk2 = jnp.einsum("bcngd,bcknd->bcngkd", q_c, k2[:, i2], preferred_element_type=f32)
        logits = jnp.einsum("bcngkd,bcjnd->bcngjk", qk2, k1[:, i1].astype(f32)) * scale
        logits = jnp.where(mask[:, :, None, None], logits, jnp.finfo(f32).min)
        p = jax.nn.softmax(logits.reshape(*logits.shape[:4], w1 * w2), axis=-1).reshape(logits.shape)
        pv1 = jnp.einsum("bcngjk,bcjnd->bcngkd", p, v1[:, i1].astype(f32))
        return jnp.einsum("bcngkd,bcknd->bcngd", pv1, v2[:, i2].astype(f32))

    out = jax.lax.map(one_chunk, (jnp.moveaxis(qp, 1, 0), jnp.arange(n) * query_chunk))
    out = jnp.moveaxis(out, 0, 1).reshape(b, n * query_chunk, hq, v1.shape[-1])[:, :s]
    return out.astype(q.dtype)


def mean_window_pairs(seq_len: int, w1: int, w2: int) -> float:
    """Mean over queries i < seq_len of the allowed (j, k) pairs, min(w1, i+1) * min(w2, i+1) (causal ramp)."""
    i = np.arange(1, seq_len + 1, dtype=np.float64)
    return float(np.mean(np.minimum(w1, i) * np.minimum(w2, i)))
