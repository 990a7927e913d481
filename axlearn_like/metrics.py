"""Metric sinks: metrics.jsonl (one JSON object per step) and TensorBoard event files. Process 0 only.

Also the metrics.jsonl readers (`read_rows`, `train_losses`), which tools use without importing JAX."""
from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

METRICS_NAME = "metrics.jsonl"
SUPERSEDED_NAME = "metrics.superseded.jsonl"


def _jsonable(v: Any) -> Any:
    a = np.asarray(v)
    if a.ndim == 0:
        x = a.item()
        return x if not isinstance(x, float) or math.isfinite(x) else str(x)
    return a.tolist()


def supersede_rows(run_dir: str, resume_step: int) -> int:
    """Moves the rows of metrics.jsonl with step > resume_step to metrics.superseded.jsonl; returns how many.

    Those rows were written by an attempt that was killed after the checkpoint a run resumes from; the resumed
    run writes those steps again. Each moved row gains `"superseded_at_resume": resume_step`, nothing is
    dropped, and the rewrite is atomic (the moved rows are on disk before the main file is replaced).
    """
    path = os.path.join(run_dir, METRICS_NAME)
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = f.read().splitlines(keepends=True)
    keep, moved = [], []
    for line in lines:
        try:
            row = json.loads(line)
            late = int(row["step"]) > resume_step
        except (ValueError, KeyError, TypeError):  # not a metrics row: leave it where it is
            row, late = None, False
        if late:
            moved.append(json.dumps(dict(row, superseded_at_resume=int(resume_step))) + "\n")
        elif line.strip():
            keep.append(line if line.endswith("\n") else line + "\n")
    if not moved:
        return 0
    with open(os.path.join(run_dir, SUPERSEDED_NAME), "a") as f:
        f.writelines(moved)
        f.flush()
        os.fsync(f.fileno())
    from axlearn_like.rundir import write_atomic

    write_atomic(path, "".join(keep))
    return len(moved)


class MetricsWriter:
    """Writes metrics of a run: everything logged for one step (train, eval, ...) becomes one row.

    `write(step, metrics)` merges into the pending row of `step` (a new step writes the pending one out first);
    `flush()` writes it now. resume_step: the step this run starts from (0 = from scratch); rows an earlier,
    killed attempt wrote past it are moved aside (`supersede_rows`) and TensorBoard purges its events from
    there (`purge_step`), so a reader sees one row per step.
    """

    def __init__(self, run_dir: str, *, enabled: bool = True, resume_step: int | None = None):
        import jax

        self.enabled = enabled and jax.process_index() == 0
        self._tb = None
        self._jsonl = None
        self._pending: dict | None = None
        self.superseded = 0
        if not self.enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        if resume_step is not None:
            self.superseded = supersede_rows(run_dir, resume_step)
        self._jsonl = open(os.path.join(run_dir, METRICS_NAME), "a", buffering=1)
        try:
            from tensorboardX import SummaryWriter

            purge = None if resume_step is None else int(resume_step) + 1
            self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"), flush_secs=10, purge_step=purge)
        except ImportError:  # metrics.jsonl still has everything
            self._tb = None

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._pending is not None and self._pending["step"] != int(step):
            self.flush()
        if self._pending is None:
            self._pending = {"step": int(step)}
        self._pending.update({k: _jsonable(v) for k, v in metrics.items()})
        if self._tb is not None:
            for k, v in metrics.items():
                a = np.asarray(v)
                if a.ndim == 0 and np.issubdtype(a.dtype, np.number):
                    self._tb.add_scalar(k, float(a), step)
                elif a.ndim == 1 and a.size > 1:
                    self._tb.add_histogram(k, a, step)

    def flush(self) -> None:
        if self._pending is not None and self._jsonl is not None:
            self._jsonl.write(json.dumps(self._pending) + "\n")
        self._pending = None

    def close(self) -> None:
        self.flush()
        if self._jsonl:
            self._jsonl.close()
            self._jsonl = None
        if self._tb:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_jsonl(path: str) -> list[Any]:
    """The JSON values of a JSON-lines file, in order (blank lines skipped); a line that is not JSON raises
    ValueError("<path>:<line number>: not JSON (<reason>)")."""
    out = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON ({e.msg})") from None
    return out


def read_rows(path: str) -> list[dict]:
    """The metric rows of a metrics.jsonl (JSON objects with a "step"), in file order, so a later row for a
    repeated step comes later; other lines are skipped, a line that is not JSON fails as in `read_jsonl`."""
    return [r for r in read_jsonl(path) if isinstance(r, dict) and "step" in r]


def train_losses(run_dir: str) -> dict[int, float]:
    """step -> train objective from RUN_DIR/metrics.jsonl (the last row wins if a step was logged twice)."""
    rows = read_rows(os.path.join(run_dir, METRICS_NAME))
    return {int(r["step"]): r["train/objective"] for r in rows if "train/objective" in r}
