"""`python -m tools.inspect_checkpoint RUN_DIR [--step N]`: saved steps, parameter tree (shape, dtype,
sharding), the saved config and the data-iterator position, without building a model or a pipeline."""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np

from axlearn_like.cli import tool_main


def _ckpt_dir(path: str) -> str:
    sub = os.path.join(path, "checkpoints")
    return sub if os.path.isdir(sub) else path


def _steps(directory: str) -> list[int]:
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit() and os.path.isdir(os.path.join(directory, d)))


def inspect(path: str, step: int | None = None, out=sys.stdout) -> dict:
    import orbax.checkpoint as ocp

    directory = os.path.abspath(_ckpt_dir(path))  # orbax wants absolute paths
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{path} is not a run dir or checkpoint dir (no such directory)")
    steps = _steps(directory)
    if not steps:
        raise FileNotFoundError(f"no complete checkpoints in {directory}")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise ValueError(f"step {step} not saved; saved steps: {steps}")
    print(f"checkpoint dir: {directory}", file=out)
    print(f"steps: {steps}  (showing {step})", file=out)
    sdir = os.path.join(directory, str(step))
    from etils import epath

    meta = ocp.StandardCheckpointHandler().metadata(epath.Path(sdir) / "state")
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    rows = []

    def visit(kp, leaf):
        name = jax.tree_util.keystr(kp)
        shape = tuple(getattr(leaf, "shape", ()) or ())
        dtype = str(getattr(leaf, "dtype", ""))
        sh = getattr(leaf, "sharding", None)
        spec = getattr(sh, "partition_spec", None) or getattr(sh, "spec", None)
        if spec is not None:
            axes = getattr(sh, "axis_names", None)
            sizes = getattr(sh, "shape", None)
            mesh = "" if axes is None else " mesh " + "x".join(f"{a}={int(n)}" for a, n in zip(axes, list(sizes)))
            spec = f"{tuple(spec)}{mesh}"
        rows.append((name, shape, dtype, str(spec) if spec is not None else "-"))

    jax.tree_util.tree_map_with_path(visit, tree)
    params = [r for r in rows if r[0].startswith("['params']")]
    others = [r for r in rows if not r[0].startswith("['params']") and not r[0].startswith("['opt_state']")]
    opt = [r for r in rows if r[0].startswith("['opt_state']")]
    nparams = sum(int(np.prod(s)) for _, s, _, _ in params)
    width = max(len(r[0]) for r in params + others) if params or others else 10
    print(f"\nparameters ({len(params)} arrays, {nparams/1e6:.3f}M values; sharding = saved partition spec and mesh):",
          file=out)
    for name, shape, dtype, spec in params:
        print(f"  {name:<{width}}  {str(shape):<20} {dtype:<9} {spec}", file=out)
    print("\nother state (step, rng, stats, carry):", file=out)
    for name, shape, dtype, spec in others:
        print(f"  {name:<{width}}  {str(shape):<20} {dtype:<9} {spec}", file=out)
    nopt = sum(int(np.prod(s)) for _, s, _, _ in opt)
    print(f"\noptimizer state: {len(opt)} arrays, {nopt/1e6:.3f}M values", file=out)
    cfg_path = os.path.join(sdir, "config", "metadata")
    cfg = json.load(open(cfg_path)) if os.path.exists(cfg_path) else None
    print("\nconfig:", file=out)
    print(json.dumps(cfg, indent=2) if cfg is not None else "  (missing)", file=out)
    data_dir = os.path.join(sdir, "data")
    positions = {}
    if os.path.isdir(data_dir):
        for fname in sorted(os.listdir(data_dir)):
            if not fname.endswith(".json"):
                continue
            fpath = os.path.join(data_dir, fname)
            try:
                positions[fname] = json.load(open(fpath))
            except (OSError, json.JSONDecodeError):
                positions[fname] = open(fpath).read()[:200]
    print("\ndata iterator state:", file=out)
    for k, v in positions.items():
        print(f"  {k}: {v}", file=out)
    if not positions:
        print("  (none saved)", file=out)
    meta_path = os.path.join(sdir, "meta", "metadata")
    if os.path.exists(meta_path):
        print("\nmeta: " + open(meta_path).read(), file=out)
    return {"steps": steps, "step": step, "arrays": rows, "config": cfg, "data": positions}


@tool_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.inspect_checkpoint")
    p.add_argument("path", help="run dir (containing checkpoints/) or a checkpoints dir")
    p.add_argument("--step", type=int, default=None)
    a = p.parse_args(argv)
    inspect(a.path, a.step)
    return 0


if __name__ == "__main__":
    sys.exit(main())
