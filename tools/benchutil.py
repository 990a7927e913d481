"""Timing shared by the `tools.bench_*` scripts (METHOD.md: warm up, synchronise, repeat, take the median).

Two clocks, both on the host:
- `timeit` (the default in every bench): `rounds` rounds of `reps` calls dispatched back to back, one
  `block_until_ready` per round; per-call time = round time / reps, median over rounds. Launch latency of the
  next call overlaps the running one, as with CUDA-event timers (triton.testing.do_bench, which measured the
  anchors), so sub-millisecond kernels are not charged ~50-100 us of host round trip each.
- `timeit_sync`: every call synchronised on its own; median and spread. What a single blocking call costs.
"""
from __future__ import annotations

import statistics
import time

import jax


def timeit(f, args, reps: int = 20, warmup: int = 3, rounds: int = 5) -> tuple[float, float]:
    """(median ms per call, spread ms = max - min over rounds) of f(*args) dispatched back to back."""
    for _ in range(warmup):
        jax.block_until_ready(f(*args))
    per = []
    n = max(1, reps // rounds) if reps >= rounds else reps
    for _ in range(rounds):
        t0 = time.perf_counter()
        out = None
        for _ in range(n):
            out = f(*args)  # one device stream: the last result ready implies all earlier ones ran
        jax.block_until_ready(out)
        per.append((time.perf_counter() - t0) / n)
    return statistics.median(per) * 1e3, (max(per) - min(per)) * 1e3


def timeit_sync(f, args, reps: int = 20, warmup: int = 3) -> tuple[float, float]:
    """(median ms, spread ms = max - min) of `reps` calls of f(*args), each synchronised on its own."""
    for _ in range(warmup):
        jax.block_until_ready(f(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3, (max(ts) - min(ts)) * 1e3
