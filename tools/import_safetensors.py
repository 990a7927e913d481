"""`python -m tools.import_safetensors IN_DIR RUN_DIR [--step N] [--add-to-existing]`: turns `model.safetensors` +
`config.json` (as written by tools.export_safetensors, or converted from another framework with the same names)
into a checkpoint in RUN_DIR plus RUN_DIR/config.json, which `checkpoint.load` reads and
`python -m recipes.<name> --run-dir RUN_DIR` continues (fresh optimizer state). RUN_DIR must be new or empty
unless --add-to-existing."""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from axlearn_like.cli import tool_main


def write_run(run_dir: str, cfg, params: dict, *, step: int = 0, source: str, add_to_existing: bool = False,
              stats: dict | None = None) -> str:
    """Writes `params` (a float tree shaped like the model's, host arrays) as checkpoint `step` of `run_dir`, with a
    fresh optimizer state, plus RUN_DIR/config.json, so `python -m recipes.<name> --run-dir RUN_DIR` continues it.

    A run dir that already holds files is refused unless add_to_existing, and then `step` must come after its
    latest checkpoint (a resume would otherwise ignore the import); nothing is ever deleted. stats: optional
    `stats` collection values (e.g. MoE routing biases) replacing the initial ones.
    """
    import flax.linen as nn
    import jax

    from axlearn_like import config as config_lib, rundir
    from axlearn_like.checkpoint import CheckpointConfig, Checkpointer, checkpoint_dir
    from axlearn_like.state_setup import build_state_setup

    if not rundir.is_empty_run_dir(run_dir) and not add_to_existing:
        raise ValueError(f"run dir {run_dir} is not empty; import into a new run dir, or pass --add-to-existing to "
                         f"add the import as a later checkpoint of that run (nothing is deleted)")
    cfg.run_dir = run_dir
    setup = build_state_setup(cfg)
    with rundir.RunDirLock(run_dir, what="import"):
        ck = Checkpointer(checkpoint_dir(run_dir), CheckpointConfig(async_save=False), keep_all=True)
        try:
            existing = ck.all_steps()
            if existing and step <= existing[-1]:
                raise ValueError(f"run dir {run_dir} already has checkpoints up to step {existing[-1]}; pass --step "
                                 f"{existing[-1] + 1} or higher so a resume starts from the import")
            with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
                state = jax.jit(setup.init_fn, out_shardings=setup.state_sharding)(jax.random.PRNGKey(cfg.trainer.seed))
            # as float32, then to the stored dtype: with optimizer.param_dtype=bfloat16 the masters keep the
            # file's values
            host_dtype = lambda ref: np.float32 if jax.numpy.issubdtype(ref.dtype, jax.numpy.floating) else ref.dtype
            f32 = jax.tree.map(lambda ref, x: jax.device_put(np.asarray(x, host_dtype(ref)), ref.sharding),
                               state.params, params)
            opt_state = setup.optimizer.init(f32)
            new_params = jax.tree.map(lambda ref, x: x.astype(ref.dtype), state.params, f32)
            new_stats = state.stats if stats is None else jax.tree.map(
                lambda ref, x: jax.device_put(np.asarray(x, ref.dtype), ref.sharding), state.stats, stats)
            state = state.replace(params=new_params, opt_state=opt_state, stats=new_stats,
                                  step=jax.numpy.asarray(step, jax.numpy.int32))
            ck.save(step, state, None, config_lib.to_dict(cfg), {"imported_from": source}, force=True)
        finally:
            ck.close()
        rundir.write_config(run_dir, config_lib.to_json(cfg))
    return checkpoint_dir(run_dir)


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """name -> array of a .safetensors file; a damaged or foreign file is one ValueError line."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: {first})") from None


def _hf_model_type(cfg_path: str) -> str | None:
    """The `model_type` of a Hugging Face config.json (which has no `_type`), else None."""
    import json

    try:
        with open(cfg_path) as f:
            d = json.load(f)
    except (OSError, ValueError):
        return None
    return d.get("model_type") if isinstance(d, dict) and "_type" not in d else None


def import_(in_dir: str, run_dir: str, step: int = 0, *, add_to_existing: bool = False) -> str:
    import jax

    from axlearn_like import rundir
    from axlearn_like.checkpoint import leaf_name
    from axlearn_like.state_setup import build_state_setup
    from tools.export_safetensors import STATS_PREFIX, flatten, unflatten

    st_path, cfg_path = os.path.join(in_dir, "model.safetensors"), os.path.join(in_dir, "config.json")
    if _hf_model_type(cfg_path) is not None:
        raise ValueError(f"{in_dir} is a Hugging Face model folder (model_type {_hf_model_type(cfg_path)!r}); "
                         f"import it with python -m tools.import_hf {in_dir} {run_dir}")
    for pth in (st_path, cfg_path):
        if not os.path.exists(pth):
            raise FileNotFoundError(f"{pth} is missing; IN_DIR must hold model.safetensors and config.json")
    cfg = rundir.read_config_file(cfg_path)
    from axlearn_like.trainer import ExperimentConfig

    if not isinstance(cfg, ExperimentConfig):
        raise ValueError(f"{cfg_path} holds a {type(cfg).__name__}, not an experiment config (a run's config.json, "
                         f"as tools.export_safetensors writes it)")
    loaded = read_safetensors(st_path)
    state = build_state_setup(cfg).abstract_state
    # zero-stride views: names and shapes, no memory
    want = flatten(jax.tree.map(lambda s: np.broadcast_to(np.zeros((), s.dtype), s.shape), state.params))
    stats_leaves, stats_def = jax.tree_util.tree_flatten_with_path(state.stats)
    want_stats = {STATS_PREFIX + leaf_name(p): tuple(x.shape) for p, x in stats_leaves}
    got_stats = {k for k in loaded if k.startswith(STATS_PREFIX)}
    missing = sorted(set(want) - set(loaded)) + sorted(set(want_stats) - got_stats if got_stats else ())
    extra = sorted(set(loaded) - set(want) - set(want_stats))
    if missing or extra:
        raise ValueError(f"tensor names do not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    shapes = {**{k: tuple(v.shape) for k, v in want.items()}, **(want_stats if got_stats else {})}
    for k, shape in shapes.items():
        if shape != tuple(loaded[k].shape):
            raise ValueError(f"{k}: shape {loaded[k].shape} in the file, {shape} in the model")
    stats = None
    if got_stats:
        stats = jax.tree_util.tree_unflatten(stats_def, [loaded[k] for k in want_stats])
    elif want_stats:
        print(f"note: {st_path} holds no stats tensors (written before export_safetensors wrote them?); the model's "
              f"stats ({', '.join(list(want_stats)[:2])}{', ...' if len(want_stats) > 2 else ''}) start from their "
              f"initial values, so outputs that depend on them (MoE routing) can differ from the exported run's")
    return write_run(run_dir, cfg, unflatten({k: loaded[k] for k in want}), step=step, source=os.path.abspath(in_dir),
                     add_to_existing=add_to_existing, stats=stats)


@tool_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.import_safetensors")
    p.add_argument("in_dir")
    p.add_argument("run_dir")
    p.add_argument("--step", type=int, default=0)
    p.add_argument("--add-to-existing", action="store_true",
                   help="RUN_DIR already holds a run: add the import as a later checkpoint (--step after its latest)")
    a = p.parse_args(argv)
    path = import_(a.in_dir, a.run_dir, a.step, add_to_existing=a.add_to_existing)
    print(f"wrote checkpoint step {a.step} under {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
