"""Public grouped matmul: argument checks, `implementation=` dispatch and the custom VJP.

    out[i] = lhs[i] @ rhs[g(i)]        lhs [m, k] rows sorted by group, rhs [G, k, n], group_sizes [G] int32

Rows at or past sum(group_sizes) give zeros (sum(group_sizes) <= m is the caller's contract). Backward,
with dout [m, n]:  dlhs = grouped_matmul(dout, rhs^T)  and  drhs[g] = lhs_g^T @ dout_g  (the transposed
grouped matmul, `transposed_grouped_matmul`). Every implementation provides both launches:
  xla     jax.lax.ragged_dot / ragged_dot_general (any backend)
  pallas  kernels/grouped_matmul/pallas_tpu.py (TPU; interpret mode on CPU)
  triton  kernels/grouped_matmul/triton_gpu.py (jax-triton, GPU)
Accumulation is float32; outputs take lhs's dtype.

(There is no fused SwiGLU gate+up kernel: measured on the H200, its backward lost, 2.49 vs 2 x 1.12 ms, and the
MoE layer with it was slower, 9.94 vs 9.70 ms fwd+bwd; see docs/notes/moe.md.)
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kernels import common
from kernels.op import PLATFORMS, Op, requires_jax_triton

_OP = "grouped_matmul"


def _xla_gmm(lhs, rhs, group_sizes, transpose_rhs=False):
    rhs = jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs
    return jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32).astype(lhs.dtype)


def _xla_tgmm(lhs, dout, group_sizes, out_dtype=None):
    dims = jax.lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(((0,), (0,)), ((), ())), lhs_ragged_dimensions=[0], rhs_group_dimensions=[]
    )
    out = jax.lax.ragged_dot_general(lhs, dout, group_sizes, dims, preferred_element_type=jnp.float32)
    return out.astype(lhs.dtype if out_dtype is None else out_dtype)


class _Launches(NamedTuple):
    gmm: Callable  # (lhs, rhs, gs, transpose_rhs=False) -> [m, n]
    tgmm: Callable  # (lhs, dout, gs, out_dtype=None) -> [G, k, n] (out_dtype default: lhs dtype)


@functools.cache
def _launches(name: str) -> _Launches:
    """The launches of one implementation."""
    if name == "xla":
        return _Launches(_xla_gmm, _xla_tgmm)
    if name == "pallas":
        from kernels.grouped_matmul import pallas_tpu

        return _Launches(lambda l, r, g, t=False: pallas_tpu.gmm(l, r, g, transpose_rhs=t),
                         lambda l, d, g, o=None: pallas_tpu.tgmm(l, d, g, out_dtype=o))
    if name == "triton":
        from kernels.grouped_matmul import triton_gpu as tg

        return _Launches(lambda l, r, g, t=False: tg.gmm(l, r, g, transpose_rhs=t),
                         lambda l, d, g, o=None: tg.tgmm(l, d, g, out_dtype=o))
    raise AssertionError(name)


@functools.cache
def _op(name: str, rhs_dtype):
    """Custom-VJP gmm on the stored (e.g. float32 master) rhs: the bf16 copy is made once in the forward
    and kept for the backward's dlhs, and the tgmm kernel writes drhs in rhs_dtype directly (no bf16
    [G, k, n] round trip: at 64 experts x 2048 x 1408 that is 0.74 GB of traffic per weight per step).
    The copy costs 0.78 ms per MoE layer step on the H200; casting float32 rhs tiles inside the Triton kernel
    instead was measured slower (the layer's 6 gmms 7.05 ms with the cast operand as wgmma's B, 14.4 ms layer
    with it swapped into A, vs 3.42 ms + the copy; docs/notes/moe.md)."""
    gmm, tgmm = _launches(name)

    def fwd(lhs, rhs, group_sizes):
        rc = rhs.astype(lhs.dtype)
        return gmm(lhs, rc, group_sizes), (lhs, rc, group_sizes)

    @jax.custom_vjp
    def op(lhs, rhs, group_sizes):
        return fwd(lhs, rhs, group_sizes)[0]

    def bwd(res, dout):
        lhs, rc, group_sizes = res
        dout = dout.astype(lhs.dtype)
        dlhs = gmm(dout, rc, group_sizes, True)
        drhs = tgmm(lhs, dout, group_sizes, rhs_dtype)
        return dlhs.astype(lhs.dtype), drhs.astype(rhs_dtype), None

    op.defvjp(fwd, bwd)
    return op


def _match_varying_axes(x: jax.Array, like: jax.Array) -> jax.Array:
    """Inside jax.shard_map, marks x as varying over the manual axes `like` varies over, so the custom
    VJP's cotangent types match its inputs (the transpose of that cast is the psum over those axes)."""
    try:
        missing = tuple(sorted(jax.typeof(like).manual_axis_type.varying - jax.typeof(x).manual_axis_type.varying))
    except AttributeError:  # an older jax spells it `.vma`
        missing = tuple(sorted(getattr(jax.typeof(like), "vma", set()) - getattr(jax.typeof(x), "vma", set())))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


class GroupedMatmul(Op):
    name = _OP
    implementations = {"xla": PLATFORMS, "pallas": ("cpu", "tpu"), "triton": ("gpu",)}
    preference = {"gpu": ("triton",), "tpu": ("pallas",)}

    def validate(self, lhs, rhs, group_sizes):
        if lhs.ndim != 2 or rhs.ndim != 3:
            raise ValueError(f"{_OP}: need lhs [m, k] and rhs [groups, k, n]; got {lhs.shape} and {rhs.shape}")
        if lhs.shape[1] != rhs.shape[1]:
            raise ValueError(f"{_OP}: lhs has k={lhs.shape[1]} but rhs has k={rhs.shape[1]}; "
                             "rhs must be [groups, k, n]")
        if group_sizes.shape != (rhs.shape[0],) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
            raise ValueError(f"{_OP}: group_sizes must be an integer array of shape ({rhs.shape[0]},), got "
                             f"{group_sizes.dtype}{group_sizes.shape}")
        if not jnp.issubdtype(lhs.dtype, jnp.floating) or not jnp.issubdtype(rhs.dtype, jnp.floating):
            raise ValueError(f"{_OP}: lhs and rhs must be floating point, got {lhs.dtype} and {rhs.dtype}")

    def facts(self, lhs, rhs, group_sizes):
        return {"unpartitioned": common.free_mesh() is not None and not common.pallas_interpret()}

    def unsupported(self, implementation, *, unpartitioned=False):
        if implementation == "pallas" and unpartitioned:
            # A Mosaic kernel runs per chip, and the row groups span the whole (sharded) batch.
            return ("cannot be partitioned over a multi-device mesh outside jax.shard_map (the row groups span the "
                    "sharded batch); call it inside a shard_map (the MoE layer does with an expert mesh axis)")
        return requires_jax_triton() if implementation == "triton" else None


OP = GroupedMatmul()
IMPLEMENTATIONS = OP.IMPLEMENTATIONS


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, implementation: str | None = None):
    """Grouped matmul: lhs [m, k] (rows sorted by group), rhs [G, k, n], group_sizes [G] int32 -> [m, n].

    Rows past sum(group_sizes) are zero. Differentiable in lhs and rhs (custom VJP with the transposed
    grouped matmul). `implementation`: None (best for the backend), "xla", "pallas" or "triton".
    rhs is cast to lhs's dtype for the product (bf16 compute with f32 master weights); its gradient comes
    back in rhs's own dtype.
    """
    name = OP.select(implementation, lhs, rhs, group_sizes)
    lhs, rhs = _match_varying_axes(lhs, rhs), _match_varying_axes(rhs, lhs)
    group_sizes = _match_varying_axes(group_sizes.astype(jnp.int32), lhs)
    return _op(name, jnp.dtype(rhs.dtype))(lhs, rhs, group_sizes)


def transposed_grouped_matmul(lhs: jax.Array, dout: jax.Array, group_sizes: jax.Array, *, implementation=None):
    """out[g] = lhs_g^T @ dout_g over group g's rows: lhs [m, k], dout [m, n] -> [G, k, n] (forward only)."""
    if lhs.ndim != 2 or dout.ndim != 2 or lhs.shape[0] != dout.shape[0]:
        raise ValueError(f"transposed_{_OP}: need lhs [m, k] and dout [m, n]; got {lhs.shape} and {dout.shape}")
    name = OP.pick(implementation)
    return _launches(name)[1](lhs, dout.astype(lhs.dtype), group_sizes.astype(jnp.int32))
