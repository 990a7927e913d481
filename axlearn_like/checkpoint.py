"""Checkpointing with orbax: async CheckpointManager over {state, data iterator, config, meta} items.

Layout of RUN_DIR/checkpoints/<step>/: `state` (the TrainState: params, opt_state, step, rng, stats, carry),
`data` (grain iterator state, one file per process), `config` (resolved config JSON), `meta` (versions,
mesh, process count). orbax writes each step to a temporary directory and renames it when complete, so a
half-written checkpoint is never listed; a complete one that fails to restore (corrupt file) is skipped with
a warning and the previous one is used.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from axlearn_like import config as config_lib
from axlearn_like.config import config_class, require

log = logging.getLogger("axlearn_like")


@config_class
class CheckpointConfig:
    every_steps: int = 100
    max_to_keep: int = 3  # keep the last N ...
    keep_period: int | None = None  # ... plus every K-th step forever
    async_save: bool = True
    enabled: bool = True

    def validate(self) -> None:
        require(self.every_steps >= 1, "checkpoint.every_steps", "must be >= 1")
        require(self.max_to_keep >= 1, "checkpoint.max_to_keep", "must be >= 1")
        require(self.keep_period is None or self.keep_period >= 1, "checkpoint.keep_period", "must be >= 1 or None")


def _grain_handler():
    import grain

    return grain.checkpoint.CheckpointHandler()


class Checkpointer:
    """Thin wrapper over ocp.CheckpointManager that knows our four items."""

    def __init__(self, directory: str, cfg: CheckpointConfig, *, read_only: bool = False):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.max_to_keep,
            keep_period=cfg.keep_period,
            enable_async_checkpointing=cfg.async_save,
            create=not read_only,
            read_only=read_only,
        )
        handlers = {
            "state": ocp.StandardCheckpointHandler(),
            "data": _grain_handler(),
            "config": ocp.JsonCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        }
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, iterator: Any, config_dict: dict, meta: dict, *, force: bool = False) -> bool:
        args = dict(
            state=ocp.args.StandardSave(state),
            config=ocp.args.JsonSave(config_dict),
            meta=ocp.args.JsonSave(meta),
        )
        if iterator is not None:
            import grain

            args["data"] = grain.checkpoint.CheckpointSave(iterator)
        return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

    def restore(self, step: int, abstract_state: Any, iterator: Any = None) -> Any:
        args = dict(state=ocp.args.StandardRestore(abstract_state))
        if iterator is not None:
            import grain

            args["data"] = grain.checkpoint.CheckpointRestore(iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        return restored["state"]

    def restore_latest(self, abstract_state: Any, iterator: Any = None) -> tuple[int | None, Any]:
        """Restores the newest step that restores cleanly; returns (step, state) or (None, None)."""
        for step in reversed(self.all_steps()):
            try:
                return step, self.restore(step, abstract_state, iterator)
            except Exception as e:  # corrupt/truncated files: fall back to the previous checkpoint
                msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
                log.warning("checkpoint step %d in %s could not be restored (%s); trying the previous one", step, self.directory, msg)
                print(f"warning: checkpoint step {step} is unreadable ({type(e).__name__}); falling back to an earlier one", flush=True)
        return None, None

    def read_json(self, step: int, item: str) -> dict:
        path = os.path.join(self.directory, str(step), item, "metadata")
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
        restored = self.manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))
        return restored[item]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def load(run_dir: str, step: int | None = None, *, mesh=None):
    """Research entry point: returns (task, variables, config) from any saved step, no data pipeline needed.

    variables = {'params', 'stats', 'carry'} unboxed, placed on the present devices with the config's
    sharding rules (or replicated on one device when the saved mesh does not fit).
    """
    from axlearn_like import trainer as trainer_lib

    ckpt = Checkpointer(checkpoint_dir(run_dir), CheckpointConfig(), read_only=True)
    steps = ckpt.all_steps()
    if not steps:
        raise FileNotFoundError(f"no checkpoints under {checkpoint_dir(run_dir)}; train first or pass the right run dir")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ValueError(f"step {step} is not saved in {run_dir}; saved steps: {steps}")
    cfg = config_lib.from_dict(ckpt.read_json(step, "config"))
    setup = trainer_lib.build_state_setup(cfg, mesh=mesh, for_restore=True)
    state = ckpt.restore(step, setup.abstract_state)
    ckpt.close()
    variables = {"params": state.params, "stats": state.stats, "carry": state.carry}
    return setup.task, variables, cfg
