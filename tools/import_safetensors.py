"""`python -m tools.import_safetensors IN_DIR RUN_DIR [--step N]`: turns `model.safetensors` + `config.json`
(as written by tools.export_safetensors, or converted from another framework with the same names) into a
checkpoint in RUN_DIR that `checkpoint.load` reads and a recipe resumes from (fresh optimizer state)."""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from axlearn_like.cli import tool_main


def import_(in_dir: str, run_dir: str, step: int = 0) -> str:
    import flax.linen as nn
    import jax
    from safetensors.numpy import load_file

    from axlearn_like import config as config_lib, trainer
    from axlearn_like.checkpoint import CheckpointConfig, Checkpointer, checkpoint_dir
    from tools.export_safetensors import flatten, unflatten

    st_path, cfg_path = os.path.join(in_dir, "model.safetensors"), os.path.join(in_dir, "config.json")
    for pth in (st_path, cfg_path):
        if not os.path.exists(pth):
            raise FileNotFoundError(f"{pth} is missing; IN_DIR must hold model.safetensors and config.json")
    with open(cfg_path) as f:
        cfg = config_lib.from_json(f.read())
    cfg.run_dir = run_dir
    loaded = load_file(st_path)
    setup = trainer.build_state_setup(cfg)
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
        state = jax.jit(setup.init_fn, out_shardings=setup.state_sharding)(jax.random.PRNGKey(cfg.trainer.seed))
    want = flatten(jax.tree.map(np.asarray, state.params))
    missing, extra = sorted(set(want) - set(loaded)), sorted(set(loaded) - set(want))
    if missing or extra:
        raise ValueError(f"tensor names do not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    for k in want:
        if want[k].shape != loaded[k].shape:
            raise ValueError(f"{k}: shape {loaded[k].shape} in the file, {want[k].shape} in the model")
    # as float32, then to the stored dtype: with optimizer.param_dtype=bfloat16 the masters keep the file's values
    params = unflatten({k: loaded[k].astype(np.float32 if jax.numpy.issubdtype(want[k].dtype, jax.numpy.floating) else want[k].dtype)
                        for k in want})
    params = jax.tree.map(lambda ref, x: jax.device_put(x, ref.sharding), state.params, params)
    opt_state = setup.optimizer.init(params)
    params = jax.tree.map(lambda ref, x: x.astype(ref.dtype), state.params, params)
    state = state.replace(params=params, opt_state=opt_state, step=jax.numpy.asarray(step, jax.numpy.int32))
    ck = Checkpointer(checkpoint_dir(run_dir), CheckpointConfig(async_save=False))
    ck.save(step, state, None, config_lib.to_dict(cfg), {"imported_from": os.path.abspath(in_dir)}, force=True)
    ck.close()
    return checkpoint_dir(run_dir)


@tool_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.import_safetensors")
    p.add_argument("in_dir")
    p.add_argument("run_dir")
    p.add_argument("--step", type=int, default=0)
    a = p.parse_args(argv)
    path = import_(a.in_dir, a.run_dir, a.step)
    print(f"wrote checkpoint step {a.step} under {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
