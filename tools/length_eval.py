"""Per-position loss far beyond the training length, with the recurrent state carried across chunks.

    python -m tools.length_eval RUN_DIR [RUN_DIR ...] --lengths 512,2048,8192 [--num-seqs 4] [--chunk 512]

Held-out text (the run's eval split, packed documents, fixed order) is cut into `num-seqs` rows of
max(lengths) tokens; each row is fed `chunk` tokens at a time through `models.ssm.chunked_logits`, which
carries the conv window and SSM state, so memory does not grow with the length (models with attention fall
back to one full forward). loss(t) = -log p(x_{t+1} | x_{0..t}), averaged over rows (document boundaries,
where the target is another document's first token, are masked). Prints, per length L, the mean loss over
[0, L) and over the last half (L/2, L], and writes a PNG of the smoothed curve (one line per run) with the
training length marked.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import numpy as np

from axlearn_like.cli import tool_main


def load_run(run_dir: str, step: int | None = None):
    """(task, variables, cfg) from a run directory (axlearn_like.checkpoint.load)."""
    from axlearn_like import checkpoint

    return checkpoint.load(run_dir, step)


def held_out(cfg, length: int, num_seqs: int) -> dict[str, np.ndarray]:
    """The first `num_seqs` rows of `length` tokens of the run's eval split (inputs, targets, loss_mask)."""
    from axlearn_like.data import make_iterator

    data = dataclasses.replace(cfg.data, seq_len=int(length), global_batch_size=int(num_seqs), packing=True,
                               mode="shuffled")
    batch = next(iter(make_iterator(data, split="eval")))
    return {k: np.asarray(batch[k]) for k in ("inputs", "targets", "loss_mask")}


def per_position_loss(task, variables, batch: dict, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (mean loss per position [T] (nan where no row counts), rows counted per position [T])."""
    from models.ssm import chunked_logits

    T = batch["inputs"].shape[1]
    loss_sum, count = np.zeros(T), np.zeros(T)

    def consume(logits, start):
        n = logits.shape[1]
        logits = logits.astype(np.float64)
        mx = logits.max(-1, keepdims=True)
        logz = (mx[..., 0] + np.log(np.exp(logits - mx).sum(-1)))
        tgt = batch["targets"][:, start:start + n]
        ce = logz - np.take_along_axis(logits, tgt[..., None], -1)[..., 0]
        m = batch["loss_mask"][:, start:start + n] > 0
        loss_sum[start:start + n] += (ce * m).sum(0)
        count[start:start + n] += m.sum(0)

    chunked_logits(task, variables, batch["inputs"], chunk, callback=consume)
    with np.errstate(invalid="ignore"):
        return loss_sum / count, count


def summarize(loss: np.ndarray, count: np.ndarray, lengths) -> list[dict]:
    rows = []
    for L in lengths:
        def mean(lo, hi):
            c = count[lo:hi]
            return float(np.nansum(loss[lo:hi] * c) / max(c.sum(), 1))
        rows.append({"length": int(L), "mean_loss": mean(0, L), "last_half_loss": mean(L // 2, L)})
    return rows


def _smooth(loss: np.ndarray, count: np.ndarray, bins: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """Token-weighted mean loss in log-spaced position bins -> (bin centers, values)."""
    T = loss.shape[0]
    edges = np.unique(np.geomspace(1, T, bins).astype(int))
    edges = np.concatenate([[0], edges[edges < T], [T]])
    xs, ys = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        c = count[lo:hi]
        if c.sum() > 0:
            xs.append((lo + hi) / 2)
            ys.append(np.nansum(loss[lo:hi] * c) / c.sum())
    return np.asarray(xs), np.asarray(ys)


def plot(curves: dict[str, tuple[np.ndarray, np.ndarray]], train_len: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, (loss, count) in curves.items():
        x, y = _smooth(loss, count)
        ax.plot(np.maximum(x, 1), y, label=label)
    ax.axvline(train_len, color="gray", ls="--", lw=1, label=f"training length {train_len}")
    ax.set_xscale("log")
    ax.set_xlabel("position t (tokens)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("per-position loss on held-out text")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate(run_dirs, lengths, *, num_seqs: int = 4, chunk: int | None = None, out: str | None = None,
             step: int | None = None, stream=None) -> dict:
    """Runs the evaluation for every run dir; returns {run_dir: {"rows": [...], "loss": [T], "count": [T]}}."""
    stream = sys.stdout if stream is None else stream  # read at call time: sys.stdout may be replaced
    lengths = sorted(int(x) for x in lengths)
    if not lengths or lengths[0] < 2:
        raise ValueError(f"--lengths must be integers >= 2, got {lengths}")
    results, curves, train_len = {}, {}, None
    batch = None
    for rd in run_dirs:
        task, variables, cfg = load_run(rd, step)
        train_len = train_len or cfg.data.seq_len
        if batch is None:
            batch = held_out(cfg, lengths[-1], num_seqs)
        loss, count = per_position_loss(task, variables, batch, chunk or max(cfg.data.seq_len, 256))
        rows = summarize(loss, count, lengths)
        from models.ssm import Mamba2Config

        states = sorted({m.initial_state for m in cfg.model.layer_pattern if isinstance(m, Mamba2Config)})
        label = f"{os.path.basename(os.path.normpath(rd))} ({','.join(states) or 'no ssm'})"
        results[rd] = {"label": label, "train_len": cfg.data.seq_len, "rows": rows, "loss": loss, "count": count}
        curves[label] = (loss, count)
    print(f"{'run':<40} {'length':>8} {'x train':>8} {'mean [0,L)':>11} {'mean (L/2,L]':>13}", file=stream)
    for r in results.values():
        for row in r["rows"]:
            print(f"{r['label'][:40]:<40} {row['length']:>8} {row['length'] / r['train_len']:>8.1f} "
                  f"{row['mean_loss']:>11.4f} {row['last_half_loss']:>13.4f}", file=stream)
    out = out or os.path.join(run_dirs[0], "length_eval.png")
    plot(curves, train_len, out)
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump({rd: {"label": r["label"], "train_len": r["train_len"], "rows": r["rows"]}
                   for rd, r in results.items()}, f, indent=1)
    print(f"wrote {out}", file=stream)
    return results


@tool_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.length_eval", description=__doc__.splitlines()[0])
    p.add_argument("run_dirs", nargs="+", help="run directories (one curve each)")
    p.add_argument("--lengths", default="512,2048,8192", help="comma-separated lengths to tabulate (max = row length)")
    p.add_argument("--num-seqs", type=int, default=4)
    p.add_argument("--chunk", type=int, default=None, help="tokens per forward piece (default max(train length, 256))")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--out", default=None, help="PNG path (default RUN_DIR/length_eval.png; numbers in .json beside)")
    a = p.parse_args(argv)
    evaluate(a.run_dirs, [int(x) for x in a.lengths.split(",") if x], num_seqs=a.num_seqs, chunk=a.chunk,
             out=a.out, step=a.step)
    return 0


if __name__ == "__main__":
    sys.exit(main())
