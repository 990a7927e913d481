"""Metric sinks: metrics.jsonl (one JSON object per log step) and TensorBoard event files. Process 0 only."""
from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import numpy as np


def _jsonable(v: Any) -> Any:
    a = np.asarray(v)
    if a.ndim == 0:
        x = a.item()
        return x if not isinstance(x, float) or math.isfinite(x) else str(x)
    return a.tolist()


class MetricsWriter:
    def __init__(self, run_dir: str, *, enabled: bool = True):
        self.enabled = enabled and jax.process_index() == 0
        self._tb = None
        self._jsonl = None
        if not self.enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a", buffering=1)
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"), flush_secs=10)
        except ImportError:  # metrics.jsonl still has everything
            self._tb = None

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        row.update({k: _jsonable(v) for k, v in metrics.items()})
        self._jsonl.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                a = np.asarray(v)
                if a.ndim == 0 and np.issubdtype(a.dtype, np.number):
                    self._tb.add_scalar(k, float(a), step)
                elif a.ndim == 1 and a.size > 1:
                    self._tb.add_histogram(k, a, step)

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tb:
            self._tb.close()


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def train_losses(run_dir: str) -> dict[int, float]:
    """step -> train objective from RUN_DIR/metrics.jsonl (the last row wins if a step was logged twice)."""
    rows = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    return {int(r["step"]): r["train/objective"] for r in rows if "train/objective" in r}
