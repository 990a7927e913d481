"""Plot the metrics of several runs on shared axes and print a final-value table.

    python -m tools.compare_runs RUN_DIR [RUN_DIR ...] [--metrics train/loss,eval/loss] [--x step|tokens|flops]
                                 [--logx] [--logy] [--labels a,b] [--min-step N] [--smooth K] [--out plot.png]

Reads each RUN_DIR/metrics.jsonl (one JSON object per line with "step"; a later line wins for a repeated step
and key) and, for `--x tokens|flops`, RUN_DIR/config.json (tokens/step = data.global_batch_size x data.seq_len;
FLOPs/token = the model's `flops_per_token`, as the trainer's MFU uses). One subplot per metric, one line per
run. A metric is a key, a bare name that resolves to "train/<name>" (`loss` -> `train/loss`), or an fnmatch
pattern averaged over the keys it matches in each record (`train/*/maxvio_batch`: MaxVio_batch averaged over
the MoE layers; `--agg max` takes the maximum instead). Non-scalar values are skipped. `--smooth K` draws
training metrics as a moving average over K logged points and eval metrics as they are. Prints, per run and
metric, the last value and its step (and the minimum for loss-like metrics); writes the PNG (default
compare_runs.png in the current directory) and the table as JSON beside it.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import sys

import numpy as np

from axlearn_like.cli import tool_main
from axlearn_like.metrics import read_rows

DEFAULT_METRICS = "train/loss,eval/loss"


def read_metrics(run_dir: str) -> dict[int, dict[str, float]]:
    """{step: {key: scalar}} from RUN_DIR/metrics.jsonl; later lines win."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found; pass run directories written by the trainer")
    out: dict[int, dict[str, float]] = {}
    for rec in read_rows(path):
        row = out.setdefault(int(rec["step"]), {})
        for k, v in rec.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                row[k] = float(v)
    return out


def resolve_key(metric: str, keys: set[str]) -> str | None:
    """A metric name -> the key (or pattern) to read: exact key, else train/<name>, else a pattern."""
    if metric in keys:
        return metric
    if any(c in metric for c in "*?["):
        return metric
    if f"train/{metric}" in keys:
        return f"train/{metric}"
    return None


def series(rows: dict[int, dict[str, float]], key: str, agg: str = "mean") -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one metric; a pattern is reduced over its matching keys per step."""
    steps, vals = [], []
    pattern = any(c in key for c in "*?[")
    for step in sorted(rows):
        row = rows[step]
        if pattern:
            hit = [v for k, v in row.items() if fnmatch.fnmatchcase(k, key)]
            if not hit:
                continue
            v = float(np.max(hit) if agg == "max" else np.mean(hit))
        elif key in row:
            v = row[key]
        else:
            continue
        steps.append(step)
        vals.append(v)
    return np.asarray(steps, np.int64), np.asarray(vals, np.float64)


def x_scale(run_dir: str, x: str) -> float:
    """Multiplier from steps to the x axis: 1 (step), tokens per step, or training FLOPs per step."""
    if x == "step":
        return 1.0
    from axlearn_like import rundir

    cfg = rundir.read_config_file(os.path.join(run_dir, "config.json"))
    data = cfg.data
    if not hasattr(data, "seq_len"):
        raise ValueError(f"{run_dir}: --x {x} needs a token data config (data.seq_len); use --x step")
    tokens = float(data.global_batch_size * data.seq_len)
    if x == "tokens":
        return tokens
    task = cfg.model.build()
    return tokens * float(task.flops_per_token(data.seq_len))


def curve(key: str, v: np.ndarray, k: int) -> np.ndarray:
    """The values drawn for metric `key`: a moving average over k logged points for training metrics; eval
    metrics as they are (each point evaluates one model state, logged a few times a run: a moving average
    would mix the start of training into the final point)."""
    return v if key.startswith("eval/") else _smooth(v, k)


def _smooth(v: np.ndarray, k: int) -> np.ndarray:
    if k <= 1 or len(v) < 2:
        return v
    k = min(k, len(v))
    c = np.cumsum(np.insert(v, 0, 0.0))
    head = c[1:k] / np.arange(1, k)  # growing window at the start, so the curve keeps its first points
    return np.concatenate([head, (c[k:] - c[:-k]) / k])


def compare(run_dirs, metrics, *, x: str = "step", logx: bool = False, logy: bool = False, labels=None,
            min_step: int = 0, smooth: int = 1, agg: str = "mean", out: str = "compare_runs.png",
            title: str | None = None, stream=None) -> dict:
    """Plots and tabulates; returns {label: {metric: {"step", "last", "min", "n"}}}."""
    if x not in ("step", "tokens", "flops"):
        raise ValueError(f"--x must be step, tokens or flops, got {x!r}")
    if agg not in ("mean", "max"):
        raise ValueError(f"--agg must be mean or max, got {agg!r}")
    labels = list(labels) if labels else [os.path.basename(os.path.normpath(r)) for r in run_dirs]
    if len(labels) != len(run_dirs):
        raise ValueError(f"--labels has {len(labels)} names for {len(run_dirs)} run dirs")
    data = {lab: (read_metrics(rd), x_scale(rd, x)) for lab, rd in zip(labels, run_dirs)}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(metrics)
    cols = min(n, 2)
    rows_ = math.ceil(n / cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(6.0 * cols, 3.6 * rows_), squeeze=False)
    table: dict = {lab: {} for lab in labels}
    for ax, metric in zip(axes.ravel(), metrics):
        drawn = 0
        for lab, (rows, scale) in data.items():
            keys = {k for r in rows.values() for k in r}
            key = resolve_key(metric, keys)
            if key is None:
                continue
            steps, vals = series(rows, key, agg)
            keep = steps >= min_step
            steps, vals = steps[keep], vals[keep]
            if not len(steps):
                continue
            xs = steps * scale
            if logx:
                xs = np.maximum(xs, scale)  # step 0 has no place on a log axis
            ax.plot(xs, curve(key, vals, smooth), label=lab, marker="." if len(steps) < 30 else None)
            drawn += 1
            table[lab][metric] = {"step": int(steps[-1]), "last": float(vals[-1]), "min": float(vals.min()),
                                  "n": int(len(steps))}
        ax.set_title(metric + (f" ({agg} over matching keys)" if any(c in metric for c in "*?[") else ""), fontsize=9)
        ax.set_xlabel({"step": "step", "tokens": "training tokens", "flops": "training FLOPs"}[x])
        if logx:
            ax.set_xscale("log")
        if logy:
            ax.set_yscale("log")
        if drawn:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    missing = [m for m in metrics if not any(m in t for t in table.values())]
    if missing:
        print(f"note: no run has {', '.join(missing)}", file=stream)
    width = max([len(lab) for lab in labels] + [3])
    print(f"{'run':<{width}}  {'metric':<28} {'step':>8} {'last':>12} {'min':>12}", file=stream)
    for lab in labels:
        for m, r in table[lab].items():
            print(f"{lab:<{width}}  {m[:28]:<28} {r['step']:>8} {r['last']:>12.5g} {r['min']:>12.5g}", file=stream)
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump({"x": x, "runs": dict(zip(labels, map(os.path.abspath, run_dirs))), "final": table}, f, indent=1)
    print(f"wrote {out}", file=stream)
    return table


@tool_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.compare_runs", description=__doc__.splitlines()[0])
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--metrics", default=DEFAULT_METRICS, help="comma-separated keys, names or fnmatch patterns")
    p.add_argument("--x", default="step", choices=("step", "tokens", "flops"))
    p.add_argument("--logx", action="store_true")
    p.add_argument("--logy", action="store_true")
    p.add_argument("--labels", default=None, help="comma-separated, one per run dir (default: dir names)")
    p.add_argument("--min-step", type=int, default=0, help="drop points before this step")
    p.add_argument("--smooth", type=int, default=1,
                   help="moving average over K logged points of the training metrics (eval points drawn as they are)")
    p.add_argument("--agg", default="mean", choices=("mean", "max"), help="reduction over a pattern's keys")
    p.add_argument("--title", default=None)
    p.add_argument("--out", default="compare_runs.png")
    a = p.parse_args(argv)
    compare(a.run_dirs, [m for m in a.metrics.split(",") if m], x=a.x, logx=a.logx, logy=a.logy,
            labels=a.labels.split(",") if a.labels else None, min_step=a.min_step, smooth=a.smooth, agg=a.agg,
            out=a.out, title=a.title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
