"""Passkey retrieval accuracy by context length and key depth (axlearn_like.data.passkey_example).

    python -m tools.passkey_eval RUN_DIR --lengths 256,1024,4096 --depths 0,0.25,0.5,0.75,1 [--trials 8]

Each trial hides a random 5-digit key at `depth` in filler text of `length` tokens and asks for it; a trial
counts as solved when greedy prediction gets every answer token right (teacher-forced argmax on the answer
positions, which equals greedy decoding of the key). Long contexts run in chunks with the carried state
(pure Mamba-2 models). Prints a depth x length table and writes a PNG heatmap.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from axlearn_like.cli import tool_main
from tools.length_eval import load_run


def accuracy(task, variables, tokenizer, length: int, depth: float, trials: int, seed: int, chunk: int) -> float:
    from axlearn_like.data import passkey_example
    from models.ssm import chunked_logits

    ex = [passkey_example(np.random.default_rng([seed, length, int(depth * 1000), i]), length, depth, tokenizer)
          for i in range(trials)]
    toks = np.stack([t for t, _ in ex])
    answer = np.stack([w for _, w in ex])[:, 1:] > 0  # weights index the predicted token
    inputs, targets = toks[:, :-1], toks[:, 1:]
    ok = np.ones(trials, bool)

    def consume(logits, start):
        n = logits.shape[1]
        pred = logits.argmax(-1)
        a = answer[:, start:start + n]
        ok[:] &= np.all((pred == targets[:, start:start + n]) | ~a, axis=1)

    chunked_logits(task, variables, inputs, chunk, callback=consume)
    return float(ok.mean())


def run(run_dir: str, lengths, depths, *, trials: int = 8, seed: int = 0, chunk: int | None = None,
        out: str | None = None, step: int | None = None, stream=None) -> np.ndarray:
    stream = sys.stdout if stream is None else stream  # read at call time: sys.stdout may be replaced
    from axlearn_like.data import make_tokenizer

    task, variables, cfg = load_run(run_dir, step)
    tok = make_tokenizer(cfg.data)
    chunk = chunk or max(cfg.data.seq_len, 256)
    acc = np.zeros((len(depths), len(lengths)))
    for j, L in enumerate(lengths):
        for i, d in enumerate(depths):
            acc[i, j] = accuracy(task, variables, tok, int(L), float(d), trials, seed, chunk)
    print(f"passkey accuracy ({trials} trials each; training length {cfg.data.seq_len})", file=stream)
    print(f"{'depth':>6} " + " ".join(f"{L:>8}" for L in lengths), file=stream)
    for i, d in enumerate(depths):
        print(f"{d:>6.2f} " + " ".join(f"{acc[i, j]:>8.2f}" for j in range(len(lengths))), file=stream)
    out = out or os.path.join(run_dir, "passkey.png")
    _plot(acc, lengths, depths, cfg.data.seq_len, out)
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump({"lengths": list(map(int, lengths)), "depths": list(map(float, depths)), "accuracy": acc.tolist(),
                   "trials": trials}, f, indent=1)
    print(f"wrote {out}", file=stream)
    return acc


def _plot(acc, lengths, depths, train_len, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.2 + 0.5 * len(depths)))
    im = ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths])
    for i in range(acc.shape[0]):
        for j in range(acc.shape[1]):
            ax.text(j, i, f"{acc[i, j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("key depth")
    ax.set_title(f"passkey retrieval (trained at {train_len})", fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@tool_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.passkey_eval", description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--lengths", default="256,1024,4096")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk", type=int, default=None)
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--out", default=None, help="PNG path (default RUN_DIR/passkey.png)")
    a = p.parse_args(argv)
    run(a.run_dir, [int(x) for x in a.lengths.split(",") if x], [float(x) for x in a.depths.split(",") if x],
        trials=a.trials, seed=a.seed, chunk=a.chunk, out=a.out, step=a.step)
    return 0


if __name__ == "__main__":
    sys.exit(main())
