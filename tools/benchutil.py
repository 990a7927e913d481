"""Timing shared by the `tools.bench_*` scripts (METHOD.md: warm up, synchronise, repeat, take the median)."""
from __future__ import annotations

import statistics
import time

import jax


def timeit(f, args, reps: int = 20, warmup: int = 3) -> tuple[float, float]:
    """(median ms, spread ms = max - min) of `reps` calls of f(*args), each synchronised with
    block_until_ready, after `warmup` untimed calls (compilation, autotuning, allocator warm-up)."""
    for _ in range(warmup):
        jax.block_until_ready(f(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3, (max(ts) - min(ts)) * 1e3
