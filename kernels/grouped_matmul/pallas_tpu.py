"""Pallas grouped matmul (TPU Mosaic; CPU tests run it with interpret=True).

Rows are cut into tiles of `tm`. A "visit" is one (row tile, group) pair with the group owning rows in
the tile; the visits are listed in row order (so one tile's visits are consecutive) and scalar-prefetched
to drive the block index maps. Per visit the kernel multiplies the tile with the group's rows masked
in and accumulates in a float32 VMEM scratch that persists while the tile (gmm) or the group (tgmm)
stays the same. A boundary tile shared by two groups is read twice; empty groups cost nothing.
Number of visits <= m_tiles + groups - 1, a static bound the grid uses (unused slots are no-ops).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels import common


class Tiling(NamedTuple):
    tm: int = 128
    tk: int = 128
    tn: int = 128


class Visits(NamedTuple):
    tile: jax.Array  # [V] row tile of the visit
    group: jax.Array  # [V] group of the visit (the last non-empty group for no-op slots)
    valid: jax.Array  # [V] 1 = real (tile, group) visit
    first_tile: jax.Array  # [V] 1 = first visit of its row tile (gmm zeroes its accumulator)
    first_group: jax.Array  # [V] 1 = first visit of its group (tgmm zeroes its accumulator)
    starts: jax.Array  # [G] first row of each group
    ends: jax.Array  # [G] one past the last row


def visits(group_sizes: jax.Array, m_tiles: int, tm: int) -> Visits:
    """Visit list (traceable, static length m_tiles + G - 1); row tiles past the last group are listed
    once as invalid 'tail' visits so that gmm writes their zeros."""
    g = group_sizes.shape[0]
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.minimum(jnp.cumsum(sizes), m_tiles * tm)
    starts = jnp.minimum(ends - sizes, ends)
    nonempty = ends > starts
    start_tile = starts // tm
    end_tile = (ends - 1) // tm
    nvis = jnp.where(nonempty, end_tile - start_tile + 1, 0)
    cum = jnp.cumsum(nvis)
    total = cum[-1]
    last_tile = jnp.max(jnp.where(nonempty, end_tile, -1))
    n_tail = m_tiles - 1 - last_tile
    last_group = jnp.max(jnp.where(nonempty, jnp.arange(g), 0))

    v = jnp.arange(m_tiles + g - 1, dtype=jnp.int32)
    gi = jnp.clip(jnp.searchsorted(cum, v, side="right"), 0, g - 1).astype(jnp.int32)
    is_group = v < total
    is_tail = (v >= total) & (v < total + n_tail)
    tile = jnp.where(
        is_group, start_tile[gi] + v - (cum[gi] - nvis[gi]), jnp.where(is_tail, last_tile + 1 + v - total, m_tiles - 1)
    )
    group = jnp.where(is_group, gi, last_group)
    prev_tile = jnp.concatenate([jnp.full((1,), -1, jnp.int32), tile[:-1]])
    prev_group = jnp.concatenate([jnp.full((1,), -1, jnp.int32), group[:-1]])
    as_i32 = lambda b: b.astype(jnp.int32)
    return Visits(
        tile=tile.astype(jnp.int32),
        group=group.astype(jnp.int32),
        valid=as_i32(is_group),
        first_tile=as_i32((tile != prev_tile) & (is_group | is_tail)),
        first_group=as_i32(is_group & (group != prev_group)),
        starts=starts,
        ends=ends,
    )


def _pad_to(x: jax.Array, axis: int, mult: int) -> jax.Array:
    return common.pad_axis(x, axis, common.round_up(x.shape[axis], mult))


def _row_mask(tile, group, starts_ref, ends_ref, tm):
    rows = tile * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
    return (rows >= starts_ref[group]) & (rows < ends_ref[group])


def _gmm_kernel(tile_ref, group_ref, valid_ref, first_ref, starts_ref, ends_ref, lhs_ref, rhs_ref, out_ref, acc_ref,
                *, tm: int, nk: int, transpose_rhs: bool):
    v, kk = pl.program_id(1), pl.program_id(2)

    @pl.when((first_ref[v] == 1) & (kk == 0))
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(valid_ref[v] == 1)
    def _():
        mask = _row_mask(tile_ref[v], group_ref[v], starts_ref, ends_ref, tm)
        a = jnp.where(mask, lhs_ref[...], jnp.zeros((), lhs_ref.dtype))
        b = rhs_ref[0]
        contract = ((1,), (1,)) if transpose_rhs else ((1,), (0,))
        acc_ref[...] += jax.lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=jnp.float32)

    @pl.when(kk == nk - 1)
    def _():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def gmm(lhs, rhs, group_sizes, *, transpose_rhs: bool = False, tiling: Tiling = Tiling()):
    """lhs [m, k] @ rhs[g] ([G, k, n], or [G, n, k] used transposed) per row group -> [m, n] (lhs dtype)."""
    m, k = lhs.shape
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tm, tk, tn = min(tiling.tm, common.round_up(m, 8)), min(tiling.tk, k), min(tiling.tn, n)
    lhs_p = _pad_to(_pad_to(lhs, 0, tm), 1, tk)
    rhs_p = _pad_to(_pad_to(rhs, 1, tn if transpose_rhs else tk), 2, tk if transpose_rhs else tn)
    m_tiles, k_tiles, n_tiles = lhs_p.shape[0] // tm, lhs_p.shape[1] // tk, common.cdiv(n, tn)
    vis = visits(group_sizes, m_tiles, tm)
    nv = vis.tile.shape[0]
    if transpose_rhs:
        rhs_spec = pl.BlockSpec((1, tn, tk), lambda j, v, kk, t, g, *_: (g[v], j, kk))
    else:
        rhs_spec = pl.BlockSpec((1, tk, tn), lambda j, v, kk, t, g, *_: (g[v], kk, j))
    out = pl.pallas_call(
        functools.partial(_gmm_kernel, tm=tm, nk=k_tiles, transpose_rhs=transpose_rhs),
        out_shape=common.out_struct((m_tiles * tm, n_tiles * tn), lhs.dtype, lhs_p, rhs_p, vis.tile),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=6,
            grid=(n_tiles, nv, k_tiles),
            in_specs=[pl.BlockSpec((tm, tk), lambda j, v, kk, t, *_: (t[v], kk)), rhs_spec],
            out_specs=pl.BlockSpec((tm, tn), lambda j, v, kk, t, *_: (t[v], j)),
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        interpret=common.pallas_interpret(),
        name="grouped_matmul_gmm",
    )(vis.tile, vis.group, vis.valid, vis.first_tile, vis.starts, vis.ends, lhs_p, rhs_p)
    return out[:m, :n]


def _tgmm_kernel(tile_ref, group_ref, valid_ref, first_ref, starts_ref, ends_ref, lhs_ref, dout_ref, out_ref, acc_ref,
                 *, tm: int):
    v = pl.program_id(2)

    @pl.when(first_ref[v] == 1)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(valid_ref[v] == 1)
    def _():
        mask = _row_mask(tile_ref[v], group_ref[v], starts_ref, ends_ref, tm)
        a = jnp.where(mask, lhs_ref[...], jnp.zeros((), lhs_ref.dtype))
        acc_ref[...] += jax.lax.dot_general(
            a, dout_ref[...], (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )
        out_ref[0] = acc_ref[...].astype(out_ref.dtype)


def tgmm(lhs, dout, group_sizes, *, tiling: Tiling = Tiling(), out_dtype=None):
    """out[g] = lhs_g^T @ dout_g: lhs [m, k], dout [m, n] -> [G, k, n] (out_dtype, default lhs dtype; the f32
    accumulator is stored in it directly); empty groups give 0."""
    out_dtype = lhs.dtype if out_dtype is None else out_dtype
    m, k = lhs.shape
    n = dout.shape[1]
    g = group_sizes.shape[0]
    tm, tk, tn = min(tiling.tm, common.round_up(m, 8)), min(tiling.tk, k), min(tiling.tn, n)
    lhs_p = _pad_to(_pad_to(lhs, 0, tm), 1, tk)
    dout_p = _pad_to(_pad_to(dout, 0, tm), 1, tn)
    m_tiles, k_tiles, n_tiles = lhs_p.shape[0] // tm, lhs_p.shape[1] // tk, dout_p.shape[1] // tn
    vis = visits(group_sizes, m_tiles, tm)
    nv = vis.tile.shape[0]
    out = pl.pallas_call(
        functools.partial(_tgmm_kernel, tm=tm),
        out_shape=common.out_struct((g, k_tiles * tk, n_tiles * tn), out_dtype, lhs_p, dout_p, vis.tile),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=6,
            grid=(k_tiles, n_tiles, nv),
            in_specs=[
                pl.BlockSpec((tm, tk), lambda i, j, v, t, *_: (t[v], i)),
                pl.BlockSpec((tm, tn), lambda i, j, v, t, *_: (t[v], j)),
            ],
            out_specs=pl.BlockSpec((1, tk, tn), lambda i, j, v, t, gr, *_: (gr[v], i, j)),
            scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=common.pallas_interpret(),
        name="grouped_matmul_tgmm",
    )(vis.tile, vis.group, vis.valid, vis.first_group, vis.starts, vis.ends, lhs_p, dout_p)
    # Empty groups are never visited, so their blocks hold whatever the buffer held.
    return jnp.where((group_sizes > 0)[:, None, None], out[:, :k, :n], 0).astype(out_dtype)
