"""Heatmap of MoE expert load over training steps, one panel per MoE layer.

    python -m tools.plot_moe RUN_DIR [--out PATH]

Reads RUN_DIR/metrics.jsonl (one JSON object per line with "step" and, per MoE layer, a key
"<prefix>/<module path>/expert_load" holding the [E] load fractions) and writes RUN_DIR/moe_expert_load.png
(expert on the y axis, step on the x axis, colour = load / mean load, so 1.0 is perfect balance).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from collections import defaultdict

SUFFIX = "/expert_load"


def read_loads(path: str) -> dict[str, tuple[list[int], list[list[float]]]]:
    """{layer key (without the suffix): (steps, loads [steps][E])}; later lines win for a repeated step."""
    from axlearn_like.metrics import read_rows

    per: dict[str, dict[int, list[float]]] = defaultdict(dict)
    for rec in read_rows(path):
        for k, v in rec.items():
            if k.endswith(SUFFIX) and isinstance(v, list):
                per[k[: -len(SUFFIX)]][int(rec["step"])] = [float(x) for x in v]
    return {k: (sorted(d), [d[s] for s in sorted(d)]) for k, d in sorted(per.items())}


def plot(loads, out_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(loads)
    cols = min(n, 2)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 3.2 * rows), squeeze=False)
    for ax, (name, (steps, vals)) in zip(axes.ravel(), loads.items()):
        arr = np.asarray(vals, dtype=np.float64)  # [steps, E]
        rel = arr / np.maximum(arr.mean(axis=1, keepdims=True), 1e-12)
        im = ax.imshow(rel.T, aspect="auto", origin="lower", cmap="magma", interpolation="nearest",
                       extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, arr.shape[1] - 0.5), vmin=0.0)
        maxvio = rel.max(axis=1) - 1.0
        ax.set_title(f"{name}  (MaxVio first {maxvio[0]:.2f}, last {maxvio[-1]:.2f})", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("expert")
        fig.colorbar(im, ax=ax, label="load / mean")
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.plot_moe", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--out", default=None, help="PNG path (default RUN_DIR/moe_expert_load.png)")
    args = ap.parse_args(argv)
    path = os.path.join(args.run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        print(f"plot_moe: {path} not found; pass the run directory the trainer wrote", file=sys.stderr)
        return 2
    try:
        loads = read_loads(path)
    except ValueError as e:
        print(f"plot_moe: {e}", file=sys.stderr)
        return 2
    if not loads:
        print(f"plot_moe: no '*{SUFFIX}' metrics in {path}; is the model an MoE and are its metrics logged?",
              file=sys.stderr)
        return 2
    out = args.out or os.path.join(args.run_dir, "moe_expert_load.png")
    plot(loads, out)
    print(f"wrote {out} ({len(loads)} MoE layer(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
