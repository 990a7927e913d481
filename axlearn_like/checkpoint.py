"""Checkpointing with orbax: async CheckpointManager over {state, data iterator, config, meta} items.

Layout of RUN_DIR/checkpoints/<step>/: `state` (the TrainState: params, opt_state, step, rng, stats, carry),
`data` (grain iterator state, one file per process: `process_<i>-of-<n>.json`), `config` (resolved config
JSON), `meta` (versions, mesh, process count). orbax writes each step to a temporary directory and renames it
when complete, so a half-written checkpoint is never listed; a complete one that fails to restore (corrupt
file) is skipped with a warning and the previous one is used.

Restoring onto another process count: the model state restores onto any mesh (abstract targets). The data
iterator state of the map-style pipeline is the next *global* batch index, the same in every process file, so
it maps exactly onto any process count; any other saved state that cannot be mapped raises `DataStateError`
(one line) naming `--set checkpoint.restore_data=false` (model state only; the iterator restarts at the batch
derived from the step, which is exact for the map-style pipeline).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from axlearn_like import config as config_lib
from axlearn_like.config import ConfigError, config_class, require

log = logging.getLogger("axlearn_like")


@config_class
class CheckpointConfig:
    every_steps: int = 100
    max_to_keep: int = 3  # keep the last N ...
    keep_period: int | None = None  # ... plus every K-th step forever
    async_save: bool = True
    enabled: bool = True
    restore_data: bool = True  # False: restore the model state only; the data iterator seeks to batch `step`

    def validate(self) -> None:
        require(self.every_steps >= 1, "checkpoint.every_steps", "must be >= 1")
        require(self.max_to_keep >= 1, "checkpoint.max_to_keep", "must be >= 1")
        require(self.keep_period is None or self.keep_period >= 1, "checkpoint.keep_period", "must be >= 1 or None")


class DataStateError(ConfigError):
    """The saved data iterator states cannot be mapped onto this run's processes (printed as one line)."""


_PORTABLE_KEYS = {"next_index"}  # grain map-style iterator: the next global batch index (process independent)


def _data_file(process_index: int, process_count: int) -> str:
    return f"process_{process_index}-of-{process_count}.json"  # grain.checkpoint.CheckpointHandler's naming


def mapped_data_state(directory: str, process_index: int, process_count: int) -> dict:
    """This process's iterator state from a checkpoint's `data` folder, saved by any number of processes.

    Same process count: this process's own file. Otherwise the states must be portable (all files equal,
    holding only the global batch index); anything else raises DataStateError.
    """
    own = os.path.join(directory, _data_file(process_index, process_count))
    if os.path.exists(own):
        with open(own) as f:
            return json.loads(f.read())
    names = sorted(n for n in os.listdir(directory) if n.startswith("process_") and n.endswith(".json")) if os.path.isdir(directory) else []
    states = []
    for n in names:
        with open(os.path.join(directory, n)) as f:
            states.append(json.loads(f.read()))
    saved_by = names[0].split("-of-")[-1][:-5] if names else "0"
    if states and all(s == states[0] for s in states) and isinstance(states[0], dict) and set(states[0]) <= _PORTABLE_KEYS:
        return states[0]
    step = os.path.basename(os.path.dirname(os.path.abspath(directory)))
    raise DataStateError(
        f"checkpoint step {step}: the data iterator state saved by {saved_by} process(es) cannot be mapped onto "
        f"{process_count} process(es) (per-process states differ); rerun with --set checkpoint.restore_data=false "
        f"to restore the model state and restart the data iterator at the batch of step {step}, or use {saved_by} processes"
    )


def seek_to_step(iterator: Any, step: int) -> None:
    """Positions a map-style iterator at global batch `step` (one global batch per optimizer step)."""
    state = iterator.get_state()
    if not (isinstance(state, dict) and set(state) <= _PORTABLE_KEYS):
        raise DataStateError(f"checkpoint.restore_data=false needs a map-style data iterator (state {{next_index}}); "
                             f"this one has state keys {sorted(state) if isinstance(state, dict) else type(state).__name__}")
    iterator.set_state({"next_index": int(step)})


def _grain_handler():
    import grain

    return grain.checkpoint.CheckpointHandler()  # saves; restore reads the files itself (mapped_data_state)


class Checkpointer:
    """Thin wrapper over ocp.CheckpointManager that knows our four items."""

    def __init__(self, directory: str, cfg: CheckpointConfig, *, read_only: bool = False):
        self.directory = os.path.abspath(directory)
        self.restore_data = cfg.restore_data
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
        data_dir = os.path.join(self.directory, str(step), "data")
        with_data = iterator is not None and self.restore_data and os.path.isdir(data_dir)
        data_state = None
        if with_data:
            # Read before any array, so every process fails fast with the same one-line error.
            data_state = mapped_data_state(data_dir, jax.process_index(), jax.process_count())
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        if data_state is not None:
            iterator.set_state(data_state)
        elif iterator is not None:  # restore_data=false, or a checkpoint saved without data state
            seek_to_step(iterator, step)
        return restored["state"]

    def restore_latest(self, abstract_state: Any, iterator: Any = None) -> tuple[int | None, Any]:
        """Restores the newest step that restores cleanly; returns (step, state) or (None, None)."""
        for step in reversed(self.all_steps()):
            try:
                return step, self.restore(step, abstract_state, iterator)
            except DataStateError:
                raise  # every older step has the same layout: falling back would silently restart from scratch
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


def load(run_dir: str, step: int | None = None, *, mesh=None, masters: bool = False):
    """Research entry point: returns (task, variables, config) from any saved step, no data pipeline needed.

    variables = {'params', 'stats', 'carry'} unboxed, placed on the present devices with the config's
    sharding rules (or replicated on one device when the saved mesh does not fit). Runs with
    optimizer.param_dtype=bfloat16 store bf16 params (what the model computed with); masters=True returns the
    optimizer's float32 master weights as 'params' instead.
    """
    from axlearn_like.optimizers import master_weights
    from axlearn_like.state_setup import build_state_setup

    ckpt = Checkpointer(checkpoint_dir(run_dir), CheckpointConfig(), read_only=True)
    steps = ckpt.all_steps()
    if not steps:
        raise FileNotFoundError(f"no checkpoints under {checkpoint_dir(run_dir)}; train first or pass the right run dir")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ValueError(f"step {step} is not saved in {run_dir}; saved steps: {steps}")
    cfg = config_lib.from_dict(ckpt.read_json(step, "config"))
    setup = build_state_setup(cfg, mesh=mesh, for_restore=True)
    state = ckpt.restore(step, setup.abstract_state)
    ckpt.close()
    master = master_weights(state.opt_state) if masters else None
    variables = {"params": state.params if master is None else master, "stats": state.stats, "carry": state.carry}
    return setup.task, variables, cfg
