"""Basic layers: RMSNorm, Dense/DenseGeneral, SwiGLU MLP, rotary embeddings, token embedding.

Conventions shared by every model layer:
  * parameters are float32 and created through `axlearn_like.params.param_init(init, logical_axes,
    weight_decay=...)`, so each leaf carries its logical axes and weight-decay flag (norm scales and
    biases: weight_decay=False);
  * compute runs in `dtype` (bf16 by default): inputs and kernels are cast at use; reductions that need
    range (norm statistics, softmax, logits) run in float32;
  * activations are annotated with `nn.with_logical_constraint` using the logical axis names of
    axlearn_like/sharding.py (batch, length, embed, mlp, heads, kv_heads, head_dim, vocab).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.custom_derivatives import SymbolicZero

from axlearn_like.config import ConfigError, config_class, require
from axlearn_like.params import param_init
from kernels.common import backend
from models.kinds import FFNConfig, LayerContext

Dtype = Any
Initializer = Callable[..., jax.Array]

DTYPES: dict[str, Dtype] = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


def get_dtype(name: str) -> Dtype:
    """'bfloat16' | 'float32' -> jnp dtype (ConfigError naming the valid choices otherwise)."""
    if name not in DTYPES:
        raise ConfigError(f"dtype: unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def _canonical_axes(axis: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(a % ndim for a in axes)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * scale over the last axis (statistics in float32).

    x: [..., D] -> [..., D] in `dtype`. `scale` is initialised to ones, logical axis ("norm",), no decay.
    """

    eps: float = 1e-6
    dtype: Dtype = jnp.bfloat16
    scale_axis: str = "norm"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale",
            param_init(nn.initializers.ones, (self.scale_axis,), weight_decay=False),
            (x.shape[-1],),
            jnp.float32,
        )
        x32 = x.astype(jnp.float32)
        inv = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (x32 * inv * scale).astype(self.dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _dot_wide_out(x: jax.Array, w: jax.Array, dims) -> jax.Array:
    """dot_general(x, w, dims) returned float32 from low-precision x, w, with derivatives in x's dtype.

    Autodiff of a dot with preferred_element_type=float32 transposes with the float32 cotangent against the
    bf16 operand, which XLA runs as float32 (TF32) GEMMs: for the logits ([tokens, d] x [d, vocab]) those two
    GEMMs were 12% of the moe:gpu_0p8b step on an H100 (docs/benchmarks.md, "The MoE preset's profile"). The tangent
    products run in x's dtype (float32 accumulation) and are widened after, so their transposes round the
    cotangent to bf16 first, as every other layer's cotangent already is, and both backward GEMMs run in bf16.
    A custom JVP rather than a custom VJP: the EBT differentiates its energy head to second order in forward
    mode, which a custom VJP does not support.
    """
    return jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)


def _dot_wide_out_jvp(dims, primals, tangents):
    x, w = primals
    tx, tw = tangents
    y = _dot_wide_out(x, w, dims)
    t = jnp.zeros_like(y)
    if not isinstance(tx, SymbolicZero):
        t = t + jax.lax.dot_general(tx, w, dims, preferred_element_type=x.dtype).astype(jnp.float32)
    if not isinstance(tw, SymbolicZero):
        t = t + jax.lax.dot_general(x, tw, dims, preferred_element_type=x.dtype).astype(jnp.float32)
    return y, t


_dot_wide_out.defjvp(_dot_wide_out_jvp, symbolic_zeros=True)


def _dot(x: jax.Array, w: jax.Array, dims, out_dtype) -> jax.Array:
    """dot_general of x and w (both already in the compute dtype) returned in out_dtype; a float32 result from a
    narrower compute dtype (logits) goes through `_dot_wide_out`, so its backward stays in the compute dtype."""
    if jnp.dtype(out_dtype) == jnp.float32 and jnp.dtype(x.dtype).itemsize < 4:
        return _dot_wide_out(x, w, dims)
    return jax.lax.dot_general(x, w, dims, preferred_element_type=out_dtype)


class DenseGeneral(nn.Module):
    """y = x . W contracting `axis` of x with the leading axes of W; W has shape in_shape + features.

    `kernel_axes` gives one logical name per kernel axis (len = len(axis) + len(features)). The matmul runs
    in `dtype`; with `out_dtype=float32` it accumulates and returns float32 (used for logits).
    """

    features: int | tuple[int, ...]
    kernel_axes: tuple[str | None, ...]
    axis: int | tuple[int, ...] = -1
    use_bias: bool = False
    dtype: Dtype = jnp.bfloat16
    out_dtype: Dtype | None = None
    kernel_init: Initializer = nn.initializers.normal(0.02)
    weight_decay: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        axes = _canonical_axes(self.axis, x.ndim)
        if len(self.kernel_axes) != len(axes) + len(features):
            raise ValueError(
                f"{self.name}: kernel_axes {self.kernel_axes} must name {len(axes) + len(features)} kernel axes "
                f"(contracted {len(axes)} + features {len(features)})"
            )
        kernel_shape = tuple(x.shape[a] for a in axes) + features
        kernel = self.param(
            "kernel",
            param_init(self.kernel_init, self.kernel_axes, weight_decay=self.weight_decay),
            kernel_shape,
            jnp.float32,
        )
        out_dtype = self.out_dtype or self.dtype
        xs = x.astype(self.dtype)
        one_row = backend() == "gpu" and 0 not in axes and all(x.shape[a] == 1 for a in range(x.ndim) if a not in axes)
        if one_row:
            # One token of one row (batch-1 decoding): XLA:GPU rewrites a vector x matrix dot whose operands hold
            # < 10M elements into multiply + reduce, which for the attention projections runs at a third of the
            # GEMV's bandwidth (docs/benchmarks.md, cached generation). Two identical rows behind a barrier keep
            # it a matrix product; the second row is dropped.
            xs = jax.lax.optimization_barrier(jnp.concatenate([xs, xs], axis=0))
        y = _dot(xs, kernel.astype(self.dtype), ((axes, tuple(range(len(axes)))), ((), ())), out_dtype)
        if one_row:
            y = y[:1]
        if self.use_bias:
            bias = self.param(
                "bias",
                param_init(nn.initializers.zeros, self.kernel_axes[len(axes):], weight_decay=False),
                features,
                jnp.float32,
            )
            y = y + bias.astype(out_dtype)
        return y.astype(out_dtype)


class Dense(DenseGeneral):
    """DenseGeneral over the last axis to a single feature axis: [..., D] -> [..., F]."""


class MLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): y = W_o (silu(x W_g) * (x W_u)); [B,S,D] -> [B,S,D].

    Named checkpoints: "mlp_gate", "mlp_up" (pre-activations), "mlp_hidden" (the gated product).
    """

    hidden_dim: int
    dtype: Dtype = jnp.bfloat16
    init_std: float = 0.02
    out_init_std: float = 0.02

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        del train
        d = x.shape[-1]
        init = nn.initializers.normal(self.init_std)
        gate = Dense(self.hidden_dim, ("embed", "mlp"), dtype=self.dtype, kernel_init=init, name="wi_gate")(x)
        up = Dense(self.hidden_dim, ("embed", "mlp"), dtype=self.dtype, kernel_init=init, name="wi_up")(x)
        gate = checkpoint_name(gate, "mlp_gate")
        up = checkpoint_name(up, "mlp_up")
        h = nn.silu(gate.astype(jnp.float32)).astype(self.dtype) * up
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        h = checkpoint_name(h, "mlp_hidden")
        out_init = nn.initializers.normal(self.out_init_std)
        y = Dense(d, ("mlp", "embed"), dtype=self.dtype, kernel_init=out_init, name="wo")(h)
        return nn.with_logical_constraint(y, ("batch", "length", "embed"))


@config_class
class MLPConfig(FFNConfig):
    """The "mlp" FFN kind: the SwiGLU `MLP` with hidden width mlp_dim."""

    kind: ClassVar[str] = "mlp"
    logical_axes: ClassVar[tuple[str, ...]] = ("embed", "mlp")

    mlp_dim: int = 1024

    def validate(self) -> None:
        require(self.mlp_dim >= 1, "mlp_dim", f"must be >= 1, got {self.mlp_dim}")

    def build(self, ctx: LayerContext, name: str) -> nn.Module:
        return MLP(self.mlp_dim, ctx.dtype, ctx.init_std, ctx.out_init_std, name=name)

    def extra_flops(self, d_model: int, seq_len: int) -> float:
        del d_model, seq_len
        return 0.0  # three matmuls, all counted by 6 x params


def rope_frequencies(head_dim: int, theta: float) -> jax.Array:
    """Inverse frequencies theta^(-2i/d), i = 0..d/2-1 (RoFormer, Su et al. 2021, eq. 15). float32 [d/2]."""
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
    return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def yarn_frequencies(
    head_dim: int,
    theta: float,
    factor: float,
    original_max_len: int,
    *,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    mscale: float = 0.0,
    mscale_all_dim: float = 0.0,
    attention_factor: float | None = None,
    truncate: bool = True,
) -> tuple[jax.Array, float]:
    """YaRN (Peng et al. 2023, arXiv 2309.00071) -> (inv_freq float32 [d/2], attention factor).

    With r = theta^(2i/d) and ramp gamma_i = clip((i - lo) / (hi - lo), 0, 1) over the pair index i,
    where lo = c(beta_fast), hi = c(beta_slow), c(beta) = d ln(L / (2 pi beta)) / (2 ln theta) with
    L = original_max_len (floor/ceil when `truncate`, clipped to [0, d-1]):
    w_i = (1 - gamma_i) / r + gamma_i / (factor r)  ("NTK-by-parts").
    Attention factor (multiplies cos and sin): `attention_factor` if given, else
    m(factor, mscale) / m(factor, mscale_all_dim) when both are non-zero, else m(factor, 1), with
    m(s, a) = 0.1 a ln s + 1 for s > 1, 1 otherwise (YaRN's attention temperature sqrt(1/t) = 0.1 ln s + 1,
    with DeepSeek-V2/V3's coefficient a). Matches Hugging Face transformers' "yarn" rope parameters.
    """
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")

    def corr(beta):
        return head_dim * math.log(original_max_len / (beta * 2 * math.pi)) / (2 * math.log(theta))

    lo, hi = corr(beta_fast), corr(beta_slow)
    if truncate:
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, head_dim - 1)
    if lo == hi:
        hi += 0.001  # a ramp of zero width
    ramp = jnp.clip((jnp.arange(head_dim // 2, dtype=jnp.float32) - lo) / (hi - lo), 0.0, 1.0)
    pos_freqs = theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * ramp + (1.0 / pos_freqs) * (1.0 - ramp)
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    return inv_freq, float(attention_factor)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """m(s, a) = 0.1 a ln s + 1 for s > 1, else 1 (YaRN's temperature with DeepSeek's coefficient a)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def llama3_frequencies(
    head_dim: int, theta: float, factor: float, original_max_len: int, low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
) -> jax.Array:
    """Llama 3.1's RoPE scaling -> inv_freq float32 [d/2] (Hugging Face transformers' "llama3" rope type).

    With w_i = theta^(-2i/d), wavelength l_i = 2 pi / w_i, L = original_max_len: l_i < L / high_freq_factor
    keeps w_i; l_i > L / low_freq_factor uses w_i / factor; in between it interpolates,
    w_i' = (1 - s) w_i / factor + s w_i with s = (L / l_i - low_freq_factor) / (high_freq_factor - low_freq_factor).
    """
    inv_freq = rope_frequencies(head_dim, theta)
    wavelen = 2 * math.pi / inv_freq
    low_wavelen, high_wavelen = original_max_len / low_freq_factor, original_max_len / high_freq_factor
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def apply_rope(
    x: jax.Array, positions: jax.Array, theta: float = 10000.0, *, inv_freq: jax.Array | None = None
) -> jax.Array:
    """Rotary position embedding in the half-split layout (pairs (x_i, x_{i+d/2}) rotate by pos * w_i).

    x: [B, S, H, D]; positions: int [B, S] (per token, so packed documents restart at 0). Angles and the
    rotation are computed in float32, the result is cast back to x.dtype. <R(p)q, R(k)k'> depends on p - k only.
    inv_freq: float32 [D/2] frequencies w_i (e.g. `yarn_frequencies`); default theta^(-2i/D).
    """
    d = x.shape[-1]
    if inv_freq is None:
        inv_freq = rope_frequencies(d, theta)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, S, D/2]
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., : d // 2], x32[..., d // 2 :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class Embed(nn.Module):
    """Token embedding table [vocab, embed]; `attend` reuses it as the (tied) output projection.

    __call__: int tokens [B, S] -> [B, S, D] in `dtype`. attend: [B, S, D] -> float32 logits [B, S, vocab].
    """

    num_embeddings: int
    features: int
    dtype: Dtype = jnp.bfloat16
    init_std: float = 0.02

    def setup(self):
        self.embedding = self.param(
            "embedding",
            param_init(nn.initializers.normal(self.init_std), ("vocab", "embed")),
            (self.num_embeddings, self.features),
            jnp.float32,
        )

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))

    def attend(self, x: jax.Array) -> jax.Array:
        logits = _dot(x.astype(self.dtype), self.embedding.astype(self.dtype), (((x.ndim - 1,), (1,)), ((), ())),
                      jnp.float32)
        return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
