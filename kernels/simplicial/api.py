"""Public 2-simplicial attention op: argument checks, `implementation=` dispatch, custom VJPs.

Every kernel backend (Pallas, Triton, cuDNN) implements the same three launches, sharing the glue here:
  fwd(q, k1, v1, k2, v2, seg, cfg)                     -> out [B,S,Hq,Dv], lse [B,S,Hq] (float32)
  bwd(q, k1, v1, k2, v2, seg, do, lse, delta, cfg)     -> dq, dk1, dv1, t2, u2
where seg is None (no documents: the kernels compile without any segment code) or int32 [B, S] segment ids;
where t2/u2 [B,S,Hkv,W2P,D] (float32) hold, per query i and window row r (key k = i - w2 + 1 + r), the
query's contribution to dk2_k / dv2_k summed over its query heads; `_diagonal_sum` turns them into dk2/dv2
without atomics. See docs/notes/simplicial.md for the algorithm.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kernels import common
from kernels.op import PLATFORMS, Op, requires_jax_triton
from kernels.simplicial import cudnn_gpu, reference

_OP = "two_simplicial_attention"
_VARIANTS = ("trilinear", "determinant")


class Config(NamedTuple):
    """Static kernel parameters; windows are already clipped to the sequence length."""

    w1: int
    w2: int
    scale: float


def _diagonal_sum(t: jax.Array, w2: int) -> jax.Array:
    """t: [B, S, H, W2P, D], row r of query i belonging to key k = i - w2 + 1 + r. Returns [B, S, H, D]
    with out[k] = sum_r t[k + w2 - 1 - r, r] (rows of queries past the end do not exist)."""
    b, s, h, _, d = t.shape
    tp = jnp.pad(t, ((0, 0), (0, w2), (0, 0), (0, 0), (0, 0)))
    out = jnp.zeros((b, s, h, d), t.dtype)
    for r in range(w2):
        out = out + tp[:, w2 - 1 - r : w2 - 1 - r + s, :, r]
    return out


def _kernel_op(fwd_fn, bwd_fn):
    """custom_vjp op from a backend's fwd/bwd launches (flash-style: only O and the LSE are saved)."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
    def op(q, k1, v1, k2, v2, seg, cfg):
        return fwd_fn(q, k1, v1, k2, v2, seg, cfg)[0]

    def op_fwd(q, k1, v1, k2, v2, seg, cfg):
        out, lse = fwd_fn(q, k1, v1, k2, v2, seg, cfg)
        return out, (q, k1, v1, k2, v2, seg, out, lse)

    def op_bwd(cfg, res, do):
        q, k1, v1, k2, v2, seg, out, lse = res
        delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # D_i = <dO_i, O_i>
        dq, dk1, dv1, t2, u2 = bwd_fn(q, k1, v1, k2, v2, seg, do.astype(q.dtype), lse, delta, cfg)
        dk2, dv2 = _diagonal_sum(t2, cfg.w2), _diagonal_sum(u2, cfg.w2)
        grads = tuple(g.astype(x.dtype) for g, x in zip((dq, dk1, dv1, dk2, dv2), (q, k1, v1, k2, v2)))
        return (*grads, None)  # segment ids: no gradient

    op.defvjp(op_fwd, op_bwd)
    return op


@functools.cache
def _backend_op(name: str):
    if name == "pallas":
        from kernels.simplicial import pallas_tpu

        return _kernel_op(pallas_tpu.forward, pallas_tpu.backward)
    if name == "triton":
        from kernels.simplicial import triton_gpu

        return _kernel_op(triton_gpu.forward, triton_gpu.backward)
    if name == "cudnn":
        return _kernel_op(cudnn_gpu.forward, cudnn_gpu.backward)
    raise AssertionError(name)


class TwoSimplicialAttention(Op):
    name = _OP
    implementations = {"xla": PLATFORMS, "pallas": ("cpu", "tpu"), "triton": ("gpu",), "cudnn": ("gpu",)}
    # cudnn measured fastest on the GPU (docs/notes/simplicial.md); what it cannot take goes to Triton
    preference = {"gpu": ("cudnn", "triton"), "tpu": ("pallas",)}

    def validate(self, q, k1, v1, k2, v2, *, w1, w2, variant, k2_bias, v2_bias, segment_ids=None):
        if q.ndim != 4:
            raise ValueError(f"{_OP}: q must be [batch, seq, q_heads, head_dim], got shape {q.shape}")
        kshape = k1.shape
        for name, x in (("k1", k1), ("v1", v1), ("k2", k2), ("v2", v2)):
            if x.shape != kshape or x.ndim != 4:
                raise ValueError(
                    f"{_OP}: k1, v1, k2, v2 must share one shape [batch, seq, kv_heads, head_dim]; "
                    f"got k1 {k1.shape}, {name} {x.shape}"
                )
        b, s, hq, d = q.shape
        if (kshape[0], kshape[1], kshape[3]) != (b, s, d):
            raise ValueError(f"{_OP}: q {q.shape} and k1 {kshape} must agree in batch, seq and head_dim")
        if hq % kshape[2]:
            raise ValueError(
                f"{_OP}: q_heads={hq} must be a multiple of kv_heads={kshape[2]} (grouped-query attention)"
            )
        dtypes = {x.dtype for x in (q, k1, v1, k2, v2)}
        if len(dtypes) != 1 or not jnp.issubdtype(q.dtype, jnp.floating):
            raise ValueError(f"{_OP}: q, k1, v1, k2, v2 must share one floating dtype, got {sorted(map(str, dtypes))}")
        for name, w in (("w1", w1), ("w2", w2)):
            if not isinstance(w, int) or isinstance(w, bool) or w < 1:
                raise ValueError(f"{_OP}: {name} must be a positive int window size, got {w!r}")
        if variant not in _VARIANTS:
            raise ValueError(f"{_OP}: unknown variant={variant!r}; choose one of {_VARIANTS}")
        if variant == "determinant" and d % 3:
            raise ValueError(
                f"{_OP}: variant='determinant' splits head_dim into 3-dim chunks; head_dim={d} is not a multiple "
                "of 3 (use e.g. 96 or 129, or variant='trilinear')"
            )
        for name, bias in (("k2_bias", k2_bias), ("v2_bias", v2_bias)):
            if name == "k2_bias" and bias is None:
                continue  # the reference default, 1 / head_dim
            if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not math.isfinite(bias):
                default = " or None (1 / head_dim)" if name == "k2_bias" else ""
                raise ValueError(f"{_OP}: {name} must be a finite number (0 = no bias){default}, got {bias!r}")
        common.check_segment_ids(_OP, segment_ids, b, s)

    def facts(self, q, k1, v1, k2, v2, *, variant, segment_ids=None, **_):
        d = q.shape[-1]
        return {"dtype": q.dtype, "d_qk": 2 * d if variant == "determinant" else d, "d_v": v1.shape[-1],
                "segments": segment_ids is not None}

    def unsupported(self, implementation, *, dtype, d_qk, d_v, segments=False):
        if implementation == "cudnn":
            return cudnn_gpu.unsupported(dtype, d_qk, d_v, segments)
        return requires_jax_triton() if implementation == "triton" else None


OP = TwoSimplicialAttention()
IMPLEMENTATIONS = OP.IMPLEMENTATIONS


def two_simplicial_attention(
    q, k1, v1, k2, v2, *, w1: int, w2: int, variant: str = "trilinear", scale: float | None = None,
    k2_bias: float | None = None, v2_bias: float = 1.0, segment_ids: jax.Array | None = None,
    implementation: str | None = None,
):
    """2-simplicial attention with causal sliding windows (Roy et al. 2025, Eq. 5-7; determinant Eq. 8-9).

    Args:
      q: [batch, seq, q_heads, head_dim]; q_heads a multiple of kv_heads (grouped-query attention).
      k1, v1, k2, v2: [batch, seq, kv_heads, head_dim].
      w1, w2: query i sees k1/v1 at i-w1 < j <= i and k2/v2 at i-w2 < k <= i; windows may exceed seq.
      variant: "trilinear" A_ijk = scale * <q_i, k1_j * k2_k>, or "determinant" A_ijk = scale * sum over
        3-chunks of det[q_i; k1_j; k2_k] (rotation invariant; head_dim a multiple of 3).
      scale: logit scale, default 1/sqrt(head_dim).
      k2_bias, v2_bias: scalars added to every element of k2 and v2 before the variant's logits and values,
        as in Meta's reference (defaults: k2_bias None = 1/head_dim, v2_bias 1.0; 0.0 and 0.0 give the
        bias-free form of the paper's equations). See reference.biased_operands.
      segment_ids: int [batch, seq] or None. Packed documents: query i then sees only the pairs (j, k) with
        segment_ids[j] == segment_ids[k] == segment_ids[i] (as dot_product_attention's mask; padding ids, e.g.
        0, are a document like any other). (i, i) always qualifies, so no query is empty. None compiles no
        segment code into the kernels.
      implementation: "xla" (chunked jnp reference), "pallas" (TPU; interpret mode on CPU), "triton"
        (jax-triton, GPU), "cudnn" (GPU, bf16: one cuDNN flash-attention call per k2 offset, merged
        exactly) or None for the best one on this backend and dtype (kernels.op rule).
    Returns:
      [batch, seq, q_heads, head_dim] in q.dtype: o_i = sum_jk softmax_jk(A_ijk) v1_j * v2'_k (v2' = v2 + v2_bias),
      the softmax over the allowed (j, k).
    """
    impl = OP.select(implementation, q, k1, v1, k2, v2, w1=w1, w2=w2, variant=variant, k2_bias=k2_bias,
                     v2_bias=v2_bias, segment_ids=segment_ids)
    seg = None if segment_ids is None else jnp.asarray(segment_ids).astype(jnp.int32)
    d = q.shape[-1]
    scale = float(1.0 / math.sqrt(d) if scale is None else scale)
    k2_bias = reference.default_k2_bias(d) if k2_bias is None else float(k2_bias)
    # One exact path for every implementation: the kernels see the shifted operands (XLA fuses the add into
    # k2/v2's producer) and autodiff passes dk2/dv2 straight through it.
    k2, v2 = reference.biased_operands(k2, v2, k2_bias, float(v2_bias))
    if variant == "determinant":
        q, k1, k2 = reference.determinant_operands(q, k1, k2)
    w1e, w2e = reference.effective_windows(q.shape[1], w1, w2)
    if impl == "xla":
        return reference.reference_op(q, k1, v1, k2, v2, seg, w1e, w2e, scale)
    cfg, kernel = Config(w1e, w2e, scale), _backend_op(impl)
    op = lambda *qkv: kernel(*qkv, cfg)  # noqa: E731
    if impl != "pallas":
        return op(q, k1, v1, k2, v2, seg)
    # Mosaic kernels run per chip: batch rows and K/V-head groups split over the mesh (common.partitioned)
    return common.partitioned(op, (q, k1, v1, k2, v2, seg), ("b.h.",) * 5 + ("b.",), "b.h.")
