"""Effective Remembrance (Buitrago & Gu 2025): how much the next-token distribution still depends on old tokens.

    EffRem_T(t) = TV(p(. | x[0:T]), p(. | x[t:T])),   TV(p, q) = 1/2 sum_v |p_v - q_v|

    python -m tools.effrem RUN_DIR [RUN_DIR ...] --T 512 [--points 24] [--num-seqs 4]

For t on a grid in [0, T), the suffix x[t:T] is placed at the start of a length-T row (right padding cannot
reach earlier positions of a causal model) and p(. | x[t:T]) is read at position T - t - 1; all suffixes of
one sequence run as one batch, chunked with the carried state for pure Mamba-2 models. Averages over
`num-seqs` held-out sequences, prints a table and writes a PNG. A healthy model rises gradually with t
(recent tokens matter most); one that fails beyond its training length jumps near 1 at small t.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from axlearn_like.cli import tool_main
from tools.length_eval import held_out, load_run


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def effrem(task, variables, seq: np.ndarray, ts: np.ndarray, chunk: int) -> np.ndarray:
    """seq int [T] -> EffRem_T(t) for each t in ts (ts[0] must be 0, the full context)."""
    from models.ssm import chunked_logits

    T = seq.shape[0]
    rows = np.zeros((len(ts), T), np.int32)
    for i, t in enumerate(ts):
        rows[i, : T - t] = seq[t:]
    want = T - 1 - np.asarray(ts)  # position of the last real token in each row
    probs = np.zeros((len(ts), task.cfg.vocab_size))

    def consume(logits, start):
        n = logits.shape[1]
        for i in np.nonzero((want >= start) & (want < start + n))[0]:
            probs[i] = _softmax(logits[i, want[i] - start])

    chunked_logits(task, variables, rows, chunk, callback=consume)
    return 0.5 * np.abs(probs - probs[0:1]).sum(-1)


def run(run_dirs, T: int, *, points: int = 24, num_seqs: int = 4, chunk: int | None = None, out: str | None = None,
        step: int | None = None, stream=None) -> dict:
    stream = sys.stdout if stream is None else stream  # read at call time: sys.stdout may be replaced
    if T < 2:
        raise ValueError(f"--T must be >= 2, got {T}")
    ts = np.unique(np.concatenate([[0], np.geomspace(1, T - 1, max(points - 1, 1)).astype(int)]))
    results, seqs = {}, None
    for rd in run_dirs:
        task, variables, cfg = load_run(rd, step)
        if seqs is None:
            seqs = held_out(cfg, T, num_seqs)["inputs"]
        curve = np.mean([effrem(task, variables, s, ts, chunk or max(cfg.data.seq_len, 256)) for s in seqs], axis=0)
        results[rd] = {"label": os.path.basename(os.path.normpath(rd)), "train_len": cfg.data.seq_len,
                       "t": ts.tolist(), "effrem": curve.tolist()}
    print(f"EffRem_T(t), T={T}", file=stream)
    print(f"{'t':>8} " + " ".join(f"{r['label'][:16]:>16}" for r in results.values()), file=stream)
    for i, t in enumerate(ts):
        print(f"{t:>8} " + " ".join(f"{r['effrem'][i]:>16.4f}" for r in results.values()), file=stream)
    out = out or os.path.join(run_dirs[0], f"effrem_T{T}.png")
    _plot(results, T, out)
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {out}", file=stream)
    return results


def _plot(results: dict, T: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results.values():
        ax.plot(r["t"], r["effrem"], marker=".", label=f"{r['label']} (trained at {r['train_len']})")
    ax.set_xlabel("t (tokens x[0:t] dropped from the context)")
    ax.set_ylabel("EffRem_T(t)  (total variation)")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"Effective Remembrance, T = {T}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@tool_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.effrem", description=__doc__.splitlines()[0])
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--T", type=int, required=True, help="context length T")
    p.add_argument("--points", type=int, default=24, help="number of t values (log-spaced, t=0 included)")
    p.add_argument("--num-seqs", type=int, default=4)
    p.add_argument("--chunk", type=int, default=None)
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--out", default=None, help="PNG path (default RUN_DIR/effrem_T<T>.png)")
    a = p.parse_args(argv)
    run(a.run_dirs, a.T, points=a.points, num_seqs=a.num_seqs, chunk=a.chunk, out=a.out, step=a.step)
    return 0


if __name__ == "__main__":
    sys.exit(main())
