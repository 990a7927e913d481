"""The training loop's checkpoint policy over `axlearn_like.checkpoint.Checkpointer`: restore the latest
complete checkpoint at the start, save every `checkpoint.every_steps`, at the last step and on SIGTERM."""
from __future__ import annotations

import os
import sys
from typing import Any

import jax

from axlearn_like import rundir
from axlearn_like.checkpoint import Checkpointer, checkpoint_dir
from axlearn_like.signals import DeferSigint
from axlearn_like.state_setup import resettable_state


class RunCheckpoints:
    """One run directory's checkpoints (a no-op when cfg.checkpoint.enabled is false).

    `config_dict` (the resolved config) and `meta` are written with every step.
    """

    def __init__(self, cfg, run_dir: str, config_dict: dict, meta: dict):
        self.cfg = cfg
        self.run_dir = run_dir
        self.config_dict = config_dict
        self.meta = meta
        self.last_saved: int | None = None
        self._closed = False
        self.ckpt = Checkpointer(checkpoint_dir(run_dir), cfg.checkpoint) if cfg.checkpoint.enabled else None

    @property
    def directory(self) -> str | None:
        return None if self.ckpt is None else self.ckpt.directory

    def restore_latest(self, abstract_state: Any, iterator: Any, resettable: Any = None) -> tuple[int | None, Any]:
        """-> (step, state) of the newest checkpoint that restores (iterator positioned after it), or (None, None).

        resettable: the state's declared caches (axlearn_like.state.ResettableState; default: this config's Task's,
        `state_setup.resettable_state`), which start from their initial values when only they differ.
        """
        if self.ckpt is None or not self.ckpt.all_steps():
            return None, None
        # A checkpoint that does not fit this config fails naming the fix; nothing is read, moved or written.
        # The run's config: RUN_DIR/config.json, else (deleted or never written) the latest step's own copy.
        saved = os.path.join(self.run_dir, "config.json")
        if not os.path.isfile(saved):
            saved = rundir.latest_checkpoint_config(self.run_dir) or saved
        advice = (f"; to resume it, undo the change or use its config (--config {saved} --run-dir {self.run_dir}"
                  f", --set on top); to train this config, pass a new --run-dir")
        if resettable is None:
            resettable = resettable_state(self.cfg)
        step, state = self.ckpt.restore_latest(abstract_state, iterator, config_dict=self.config_dict, advice=advice,
                                               resettable=resettable)
        if state is not None and jax.process_index() == 0:
            print(f"Resuming from checkpoint at step {step} in {self.ckpt.directory}", flush=True)
        return step, state

    def should_save(self, step: int, *, final: bool, preempted: bool) -> bool:
        return self.ckpt is not None and (step % self.cfg.checkpoint.every_steps == 0 or final or preempted)

    def save(self, step: int, state: Any, iterator: Any, *, force: bool = False) -> None:
        self.last_saved = step
        with DeferSigint():
            self.ckpt.save(step, state, iterator, self.config_dict, dict(self.meta, step=step), force=force)

    def close(self, *, interrupted: bool = False) -> None:
        """Waits for an async save in flight, then closes. interrupted (Ctrl-C): says it waits; a second Ctrl-C
        abandons that save (its temporary directory is never taken for a checkpoint) and says so."""
        if self.ckpt is None or self._closed:
            return
        self._closed = True
        if interrupted and self.ckpt.manager.is_saving_in_progress() and jax.process_index() == 0:
            print(f"interrupted: waiting for the checkpoint of step {self.last_saved} to finish writing "
                  f"(Ctrl-C again abandons it)", file=sys.stderr, flush=True)
        try:
            self.ckpt.close()
        except KeyboardInterrupt:
            done = [s for s in self.ckpt.all_steps() if s != self.last_saved]
            print(f"abandoned the checkpoint of step {self.last_saved}; the latest complete one is "
                  f"{done[-1] if done else 'none'}", file=sys.stderr, flush=True)
            raise
