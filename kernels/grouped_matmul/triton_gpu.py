"""Triton grouped matmul for GPUs (launched through jax-triton 0.3.1).

gmm: one program per (work item, column tile) of the output. Work items come from a tile table
(tiles.work_items): each group's rows cut into BM tiles from the group's first row, group-major, then
zero-fill tiles past sum(group_sizes); items never share a row, so a program runs one K loop with
the other rows masked and stores only its own rows (no atomics). The 1-D grid is rastered
column-fastest: the programs in flight share one lhs row tile and one or two groups' rhs, so both come
from L2 (row-fastest re-read every lhs tile from HBM per column tile: 0.567 vs 0.384 ms on the H200,
so it was removed). `Tiling.programs` > 0 makes the launch persistent (programs stride over the tiles).
float32 operands use IEEE-exact dots (Triton's default for float32 is tf32, a 10-bit mantissa: relative
errors ~1e-3, above the float32 tolerance); bf16 operands are exact products either way.
tgmm: one program per (group, k tile, n tile) of drhs; it walks the group's rows in steps of BM and
accumulates lhs_rows^T @ dout_rows. Empty groups store zeros. No atomics, so results are deterministic.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from kernels.grouped_matmul.tiles import group_bounds, work_items


class Tiling(NamedTuple):
    bm: int = 128
    bn: int = 128
    bk: int = 64
    num_warps: int = 8
    num_stages: int = 3
    programs: int = 0  # 0: one program per output tile; P > 0: persistent, P programs stride over the tiles


# Best of the sweep in tools/bench_moe.py on an H200 (2026-11-29 10:41 UTC; 64 groups, 32768 x 2048 x 1408 bf16,
# uniform): gmm 0.382 ms (persistent, 2 programs per SM), dlhs gmm^T 0.446 ms, tgmm 0.448 ms.
# `fit_columns` halves BN where N is not a multiple of it.
GMM_TILING = Tiling(bm=128, bn=128, bk=64, num_warps=8, num_stages=3, programs=264)
GMM_T_TILING = Tiling(bm=256, bn=128, bk=64, num_warps=8, num_stages=3)  # dlhs = dout @ rhs[g]^T
# tgmm tiled for the MoE layer's shapes (49152 rows, 768 per group, f32 out; docs/notes/moe.md): 32-row
# steps with 4 warps and 4 stages 0.674 / 0.613 ms (k2048 n1408 / k1408 n2048) vs 0.725 / 0.745 for (64, 128, 128,
# 8, 3); the same outputs bit for bit.
TGMM_TILING = Tiling(bm=32, bn=128, bk=128, num_warps=4, num_stages=4)

# Hopper gives a block at most 227 KiB of shared memory; stay under it with some room for Triton's own use.
SMEM_BUDGET = 180 * 1024


def fit_shared_memory(tiling: Tiling, itemsize: int, a_tile: tuple[str, str], b_tile: tuple[str, str],
                      b_count: int = 1) -> Tiling:
    """Shrinks a tiling tuned for bf16 until its pipelined operand tiles fit in shared memory (float32 operands
    double the bytes; `b_count` rhs tiles per step): first fewer pipeline stages, then halve a block dimension."""
    def smem(t: Tiling) -> int:
        dims = t._asdict()
        a = dims[a_tile[0]] * dims[a_tile[1]]
        return t.num_stages * itemsize * (a + b_count * dims[b_tile[0]] * dims[b_tile[1]])

    while smem(tiling) > SMEM_BUDGET:
        if tiling.num_stages > 2:
            tiling = tiling._replace(num_stages=tiling.num_stages - 1)
        elif tiling.bn >= tiling.bk and tiling.bn > 32:
            tiling = tiling._replace(bn=tiling.bn // 2)
        elif tiling.bk > 32:
            tiling = tiling._replace(bk=tiling.bk // 2)
        else:
            break
    return tiling


@triton.jit
def _work_item(pid, item_group_ptr, item_start_ptr, item_end_ptr, N, BN: tl.constexpr):
    """(group or -1, first row, end row, column tile) of output tile `pid` of num_items * n_tiles; a work
    item's column tiles are consecutive (one lhs tile and one group's rhs in flight, both in L2)."""
    n_tiles = tl.cdiv(N, BN)
    item = pid // n_tiles
    pid_n = pid % n_tiles
    return tl.load(item_group_ptr + item), tl.load(item_start_ptr + item), tl.load(item_end_ptr + item), pid_n


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:  # float32 operands: exact products (the default tf32 keeps 10 mantissa bits)
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def _group_dot(acc, lhs_ptr, rhs_g, rm, rn, row_ok, k_end, K, N, TRANSPOSE_RHS: tl.constexpr, BK: tl.constexpr,
               IEEE: tl.constexpr):
    """acc += lhs[rows in row_ok, :k_end] @ rhs_g[:k_end] (rhs_g stored [K, N], or [N, K] if transposed)."""
    rk = tl.arange(0, BK)
    for k0 in range(0, k_end, BK):
        kk = k0 + rk
        a = tl.load(lhs_ptr + rm[:, None] * K + kk[None, :], mask=row_ok[:, None] & (kk[None, :] < K), other=0.0)
        if TRANSPOSE_RHS:
            b = tl.load(rhs_g + rn[:, None] * K + kk[None, :], mask=(rn[:, None] < N) & (kk[None, :] < K), other=0.0)
            acc += _dot(a, tl.trans(b), IEEE)
        else:
            b = tl.load(rhs_g + kk[:, None] * N + rn[None, :], mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
            acc += _dot(a, b, IEEE)
    return acc


@triton.jit
def _gmm_tile(tile, lhs_ptr, rhs_ptr, item_group_ptr, item_start_ptr, item_end_ptr, out_ptr,
              K: tl.constexpr, N: tl.constexpr, TRANSPOSE_RHS: tl.constexpr, IEEE: tl.constexpr,
              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    g, r0, r1, pid_n = _work_item(tile, item_group_ptr, item_start_ptr, item_end_ptr, N, BN)
    rm = r0 + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    row_ok = rm < r1
    k_end = tl.where(g >= 0, K, 0)  # zero-fill and padding items skip the product
    off = tl.cast(tl.maximum(g, 0), tl.int64) * (K * N)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc = _group_dot(acc, lhs_ptr, rhs_ptr + off, rm, rn, row_ok, k_end, K, N, TRANSPOSE_RHS, BK, IEEE)
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (rn[None, :] < N))


@triton.jit
def gmm_kernel(lhs_ptr, rhs_ptr, item_group_ptr, item_start_ptr, item_end_ptr, out_ptr,
               NUM_ITEMS: tl.constexpr, K: tl.constexpr, N: tl.constexpr, TRANSPOSE_RHS: tl.constexpr,
               IEEE: tl.constexpr, PROGRAMS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """out[rows of the item] = lhs @ rhs[g]; g = -1 items store zeros."""
    if PROGRAMS == 0:
        _gmm_tile(tl.program_id(0), lhs_ptr, rhs_ptr, item_group_ptr, item_start_ptr, item_end_ptr, out_ptr,
                  K, N, TRANSPOSE_RHS, IEEE, BM, BN, BK)
    else:
        for tile in range(tl.program_id(0), NUM_ITEMS * tl.cdiv(N, BN), PROGRAMS):
            _gmm_tile(tile, lhs_ptr, rhs_ptr, item_group_ptr, item_start_ptr, item_end_ptr, out_ptr,
                      K, N, TRANSPOSE_RHS, IEEE, BM, BN, BK)


@triton.jit
def tgmm_kernel(lhs_ptr, dout_ptr, starts_ptr, ends_ptr, out_ptr, K: tl.constexpr, N: tl.constexpr,
                IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    g = tl.program_id(1)
    n_tiles = tl.cdiv(N, BN)
    rk = (pid // n_tiles) * BK + tl.arange(0, BK)
    rn = (pid % n_tiles) * BN + tl.arange(0, BN)
    start = tl.load(starts_ptr + g)
    end = tl.load(ends_ptr + g)
    acc = tl.zeros((BK, BN), dtype=tl.float32)
    for m0 in range(start, end, BM):
        rows = m0 + tl.arange(0, BM)
        ok = rows < end
        a = tl.load(lhs_ptr + rows[:, None] * K + rk[None, :], mask=ok[:, None] & (rk[None, :] < K), other=0.0)
        d = tl.load(dout_ptr + rows[:, None] * N + rn[None, :], mask=ok[:, None] & (rn[None, :] < N), other=0.0)
        acc += _dot(tl.trans(a), d, IEEE)
    out_g = out_ptr + tl.cast(g, tl.int64) * (K * N)
    tl.store(out_g + rk[:, None] * N + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rk[:, None] < K) & (rn[None, :] < N))


def fit_columns(tiling: Tiling, n: int) -> Tiling:
    """Halves BN while that removes padded columns (n = 1408 = 11 x 128: BN 256 would compute 8% padding)."""
    while n % tiling.bn and tiling.bn > 64 and n % (tiling.bn // 2) < n % tiling.bn:
        tiling = tiling._replace(bn=tiling.bn // 2)
    return tiling


def _programs(tiles: int, tiling: Tiling) -> int:
    """Persistent program count (0 = one program per tile)."""
    return min(tiling.programs, tiles) if tiling.programs else 0


def _grid(tiles: int, tiling: Tiling) -> tuple[int]:
    return (_programs(tiles, tiling) or tiles,)


def gmm(lhs, rhs, group_sizes, *, transpose_rhs: bool = False, tiling: Tiling | None = None):
    """lhs [m, k] @ rhs[g] ([G, k, n], or [G, n, k] used transposed) per row group -> [m, n] (lhs dtype)."""
    import jax_triton as jt

    m, k = lhs.shape
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tiling = fit_columns(tiling or (GMM_T_TILING if transpose_rhs else GMM_TILING), n)
    tiling = fit_shared_memory(tiling, lhs.dtype.itemsize, ("bm", "bk"), ("bk", "bn"))
    items = work_items(group_sizes, m, tiling.bm)
    tiles = items[0].shape[0] * triton.cdiv(n, tiling.bn)
    return jt.triton_call(
        lhs, rhs, *items,
        kernel=gmm_kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), lhs.dtype),
        grid=_grid(tiles, tiling),
        num_warps=tiling.num_warps, num_stages=tiling.num_stages,
        NUM_ITEMS=items[0].shape[0], K=k, N=n, TRANSPOSE_RHS=transpose_rhs, IEEE=lhs.dtype == jnp.float32,
        PROGRAMS=_programs(tiles, tiling), BM=tiling.bm, BN=tiling.bn, BK=tiling.bk,
    )


def tgmm(lhs, dout, group_sizes, *, tiling: Tiling | None = None, out_dtype=None):
    """out[g] = lhs_g^T @ dout_g: lhs [m, k], dout [m, n] -> [G, k, n] (out_dtype, default lhs dtype; the f32
    accumulator is stored in it directly); empty groups give 0."""
    import jax_triton as jt

    tiling = fit_shared_memory(tiling or TGMM_TILING, lhs.dtype.itemsize, ("bm", "bk"), ("bm", "bn"))
    m, k = lhs.shape
    n = dout.shape[1]
    g = group_sizes.shape[0]
    starts, ends = group_bounds(group_sizes, m)
    return jt.triton_call(
        lhs, dout, starts, ends,
        kernel=tgmm_kernel,
        out_shape=jax.ShapeDtypeStruct((g, k, n), lhs.dtype if out_dtype is None else out_dtype),
        grid=(triton.cdiv(k, tiling.bk) * triton.cdiv(n, tiling.bn), g),
        num_warps=tiling.num_warps, num_stages=tiling.num_stages,
        K=k, N=n, IEEE=lhs.dtype == jnp.float32, BM=tiling.bm, BN=tiling.bn, BK=tiling.bk,
    )
