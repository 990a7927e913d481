"""Tile tables of the Triton grouped matmul (pure jnp / NumPy, so the CPU tests can check them)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kernels import common


def group_bounds(group_sizes, m: int):
    """starts, ends [G] int32 row bounds of each group (ends clipped to m). Works for jnp and np."""
    xp = jnp if isinstance(group_sizes, jax.Array) else np
    ends = xp.minimum(xp.cumsum(group_sizes.astype(xp.int32)), m).astype(xp.int32)
    starts = (ends - xp.minimum(group_sizes.astype(xp.int32), ends)).astype(xp.int32)
    return starts, ends


def work_items(group_sizes, m: int, bm: int):
    """Tile table: (group, first row, end row) [V] int32 each, V = cdiv(m, bm) + G + 1 (a static bound).

    Each non-empty group's rows are cut into tiles of bm starting at the group's first row (group-major
    order, so consecutive items share rhs[g] in L2); then rows past sum(group_sizes) in tiles of group -1
    (stored as zeros); then empty padding items. Items never share a row, so no program's store overlaps
    another's. Works for jnp (traced) and np.
    """
    xp = jnp if isinstance(group_sizes, jax.Array) else np
    g = group_sizes.shape[0]
    starts, ends = group_bounds(group_sizes, m)
    per = (ends - starts + bm - 1) // bm
    cum = xp.cumsum(per)
    n_group_items = cum[-1]
    total = ends[-1]
    n_tail = (m - total + bm - 1) // bm
    v = xp.arange(common.cdiv(m, bm) + g + 1, dtype=xp.int32)
    # compare_all: one small fused compare-and-count on GPU instead of a while loop of launches
    kw = {"method": "compare_all"} if xp is jnp else {}
    gi = xp.minimum(xp.searchsorted(cum, v, side="right", **kw), g - 1)
    r0_group = starts[gi] + (v - (cum[gi] - per[gi])) * bm
    r0_tail = total + (v - n_group_items) * bm
    in_group = v < n_group_items
    in_tail = (v >= n_group_items) & (v < n_group_items + n_tail)
    group = xp.where(in_group, gi, -1).astype(xp.int32)
    r0 = xp.where(in_group, r0_group, xp.where(in_tail, r0_tail, 0)).astype(xp.int32)
    r1 = xp.where(in_group, xp.minimum(r0_group + bm, ends[gi]), xp.where(in_tail, xp.minimum(r0_tail + bm, m), 0))
    return group, r0, r1.astype(xp.int32)
