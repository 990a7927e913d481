"""Triton grouped matmul for GPUs (launched through jax-triton 0.3.1).

gmm: one program per (row tile, column tile) of the output; it loops over the groups whose rows meet
the tile (usually one; two or more at group boundaries), masks the other groups' rows out of the lhs
loads and accumulates lhs_tile @ rhs[g] over k in float32. Row tiles past sum(group_sizes) store zeros.
tgmm: one program per (group, k tile, n tile) of drhs; it walks the group's rows in steps of BM and
accumulates lhs_rows^T @ dout_rows. Empty groups store zeros. No atomics, so results are deterministic.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import triton
import triton.language as tl


class Tiling(NamedTuple):
    bm: int = 128
    bn: int = 128
    bk: int = 64
    num_warps: int = 8
    num_stages: int = 3


# Best of the sweep in tools/bench_moe.py on an H200 (2026-11-29; 64 groups, 32768 x 2048 x 1408 bf16).
GMM_TILING = Tiling(bm=128, bn=256, bk=64, num_warps=8, num_stages=3)
TGMM_TILING = Tiling(bm=64, bn=128, bk=128, num_warps=8, num_stages=3)

# Hopper gives a block at most 227 KiB of shared memory; stay under it with some room for Triton's own use.
SMEM_BUDGET = 160 * 1024


def fit_shared_memory(tiling: Tiling, itemsize: int, a_tile: tuple[str, str], b_tile: tuple[str, str]) -> Tiling:
    """Shrinks a tiling tuned for bf16 until its pipelined operand tiles fit in shared memory (float32 operands
    double the bytes): first fewer pipeline stages, then halve the larger block dimension."""
    def smem(t: Tiling) -> int:
        dims = t._asdict()
        return t.num_stages * itemsize * (dims[a_tile[0]] * dims[a_tile[1]] + dims[b_tile[0]] * dims[b_tile[1]])

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
def gmm_kernel(lhs_ptr, rhs_ptr, g_first_ptr, g_last_ptr, starts_ptr, ends_ptr, out_ptr,
               M: tl.constexpr, K: tl.constexpr, N: tl.constexpr, TRANSPOSE_RHS: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    g_first = tl.load(g_first_ptr + pid_m)
    g_last = tl.load(g_last_ptr + pid_m)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for g in range(g_first, g_last):
        start = tl.load(starts_ptr + g)
        end = tl.load(ends_ptr + g)
        if end > start:
            row_ok = (rm >= start) & (rm < end)
            rhs_g = rhs_ptr + tl.cast(g, tl.int64) * (K * N)
            for k0 in range(0, K, BK):
                kk = k0 + rk
                a = tl.load(lhs_ptr + rm[:, None] * K + kk[None, :], mask=row_ok[:, None] & (kk[None, :] < K), other=0.0)
                if TRANSPOSE_RHS:  # rhs[g] stored [N, K]
                    b = tl.load(rhs_g + rn[:, None] * K + kk[None, :], mask=(rn[:, None] < N) & (kk[None, :] < K), other=0.0)
                    acc += tl.dot(a, tl.trans(b))
                else:  # rhs[g] stored [K, N]
                    b = tl.load(rhs_g + kk[:, None] * N + rn[None, :], mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
                    acc += tl.dot(a, b)
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def tgmm_kernel(lhs_ptr, dout_ptr, starts_ptr, ends_ptr, out_ptr,
                K: tl.constexpr, N: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
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
        acc += tl.dot(tl.trans(a), d)
    out_g = out_ptr + tl.cast(g, tl.int64) * (K * N)
    tl.store(out_g + rk[:, None] * N + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rk[:, None] < K) & (rn[None, :] < N))


def group_bounds(group_sizes, m: int):
    """starts, ends [G] int32 row bounds of each group (ends clipped to m). Works for jnp and np."""
    xp = jnp if isinstance(group_sizes, jax.Array) else __import__("numpy")
    ends = xp.minimum(xp.cumsum(group_sizes.astype(xp.int32)), m).astype(xp.int32)
    starts = (ends - xp.minimum(group_sizes.astype(xp.int32), ends)).astype(xp.int32)
    return starts, ends


def tile_group_range(group_sizes, m: int, bm: int):
    """[first, last) groups whose rows meet each row tile, [m_tiles] int32 each (empty range past the rows)."""
    xp = jnp if isinstance(group_sizes, jax.Array) else __import__("numpy")
    starts, ends = group_bounds(group_sizes, m)
    total = ends[-1]
    lo = xp.arange(-(-m // bm), dtype=xp.int32) * bm
    hi = xp.minimum(lo + bm, total)
    first = xp.searchsorted(ends, lo, side="right").astype(xp.int32)
    last = xp.where(hi > lo, xp.searchsorted(ends, hi - 1, side="right") + 1, first).astype(xp.int32)
    return first, xp.minimum(last, group_sizes.shape[0]).astype(xp.int32)


def gmm(lhs, rhs, group_sizes, *, transpose_rhs: bool = False, tiling: Tiling | None = None):
    """lhs [m, k] @ rhs[g] ([G, k, n], or [G, n, k] used transposed) per row group -> [m, n] (lhs dtype)."""
    import jax_triton as jt

    tiling = fit_shared_memory(tiling or GMM_TILING, lhs.dtype.itemsize, ("bm", "bk"), ("bk", "bn"))
    m, k = lhs.shape
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    first, last = tile_group_range(group_sizes, m, tiling.bm)
    starts, ends = group_bounds(group_sizes, m)
    return jt.triton_call(
        lhs, rhs, first, last, starts, ends,
        kernel=gmm_kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), lhs.dtype),
        grid=(first.shape[0], triton.cdiv(n, tiling.bn)),
        num_warps=tiling.num_warps, num_stages=tiling.num_stages,
        M=m, K=k, N=n, TRANSPOSE_RHS=transpose_rhs, BM=tiling.bm, BN=tiling.bn, BK=tiling.bk,
    )


def tgmm(lhs, dout, group_sizes, *, tiling: Tiling | None = None):
    """out[g] = lhs_g^T @ dout_g: lhs [m, k], dout [m, n] -> [G, k, n] (lhs dtype); empty groups give 0."""
    import jax_triton as jt

    tiling = fit_shared_memory(tiling or TGMM_TILING, lhs.dtype.itemsize, ("bm", "bk"), ("bm", "bn"))
    m, k = lhs.shape
    n = dout.shape[1]
    g = group_sizes.shape[0]
    starts, ends = group_bounds(group_sizes, m)
    return jt.triton_call(
        lhs, dout, starts, ends,
        kernel=tgmm_kernel,
        out_shape=jax.ShapeDtypeStruct((g, k, n), lhs.dtype),
        grid=(triton.cdiv(k, tiling.bk) * triton.cdiv(n, tiling.bn), g),
        num_warps=tiling.num_warps, num_stages=tiling.num_stages,
        K=k, N=n, BM=tiling.bm, BN=tiling.bn, BK=tiling.bk,
    )
