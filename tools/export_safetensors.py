"""`python -m tools.export_safetensors RUN_DIR OUT_DIR [--step N]`: writes the parameters of a checkpoint as
`model.safetensors` (flat names like `stack.layer_0.mixer.query.kernel`, float32, JAX layout: a Dense kernel
is [in, out], the transpose of torch.nn.Linear.weight), the `stats` collection the outputs depend on (e.g.
MoE routing biases) as `stats.<path>` tensors, plus `config.json` (the resolved axlearn_like config),
loadable with `safetensors.torch.load_file` / HF tooling. `tools.import_safetensors` reverses it. Works on a
checkpoint written by any number of processes (it is read in one process)."""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from axlearn_like.cli import tool_main

SEP = "."


def flatten(tree, prefix=()) -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        if SEP in str(k):  # the flat name could not be split back into the same tree
            raise ValueError(f"parameter name {SEP.join(prefix + (str(k),))!r}: key {str(k)!r} contains {SEP!r}; "
                             f"cannot export unambiguously")
        path = prefix + (str(k),)
        if isinstance(v, dict):
            out.update(flatten(v, path))
        else:
            out[SEP.join(path)] = np.asarray(v)
    return out


STATS_PREFIX = "stats" + SEP  # tensors of the `stats` collection: "stats.<leaf path>"


def stats_tensors(stats) -> dict[str, np.ndarray]:
    """The `stats` collection (non-gradient state the outputs depend on, e.g. MoE routing biases) as
    `stats.<leaf path>` tensors (path as checkpoint.leaf_name writes it: dict keys and struct fields) in
    their own dtype."""
    import jax

    from axlearn_like.checkpoint import leaf_name

    return {STATS_PREFIX + leaf_name(p): np.asarray(jax.device_get(x))
            for p, x in jax.tree_util.tree_flatten_with_path(stats)[0]}


def unflatten(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for name, v in flat.items():
        node = tree
        parts = name.split(SEP)
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return tree


def check_out_dir(out_dir: str, names: tuple[str, ...], overwrite: bool = False) -> None:
    """Raises one ValueError line unless `out_dir` can take the export files `names` (checked before loading)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"OUT_DIR {out_dir} is a file; pass a directory (it is created if missing)")
    if os.path.isdir(os.path.join(out_dir, "checkpoints")):
        raise ValueError(f"OUT_DIR {out_dir} is a run dir (it has checkpoints/); export into another directory")
    present = [n for n in names if os.path.exists(os.path.join(out_dir, n))]
    if present and not overwrite:
        raise ValueError(f"OUT_DIR {out_dir} already holds {', '.join(present)}; pass --overwrite to replace them, "
                         f"or export into another directory")


def _write_atomic(path: str, write) -> None:
    """write(tmp_path), then rename over `path`: a crash never leaves a half-written export."""
    tmp = f"{path}.tmp-{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def export(run_dir: str, out_dir: str, step: int | None = None, *, overwrite: bool = False) -> str:
    import jax
    from safetensors.numpy import save_file

    from axlearn_like import checkpoint, config as config_lib

    check_out_dir(out_dir, ("model.safetensors", "config.json"), overwrite)
    task, variables, cfg = checkpoint.load(run_dir, step, masters=True)  # float32 masters where the run keeps them
    params = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), variables["params"])
    if "stats" in params:
        raise ValueError("a top-level parameter named 'stats' would collide with the exported stats tensors")
    flat = flatten(params)
    flat.update(stats_tensors(variables.get("stats") or {}))
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "model.safetensors")
    _write_atomic(path, lambda p: save_file(flat, p, metadata={"format": "axlearn_like", "name": cfg.name}))
    text = config_lib.to_json(cfg)
    _write_atomic(os.path.join(out_dir, "config.json"), lambda p: _write_text(p, text))
    return path


@tool_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.export_safetensors")
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--overwrite", action="store_true", help="replace model.safetensors / config.json in OUT_DIR")
    a = p.parse_args(argv)
    path = export(a.run_dir, a.out_dir, a.step, overwrite=a.overwrite)
    print(f"wrote {path} and {os.path.join(a.out_dir, 'config.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
