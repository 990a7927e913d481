"""The training loop's checkpoint policy over `axlearn_like.checkpoint.Checkpointer`: restore the latest
complete checkpoint at the start, save every `checkpoint.every_steps`, at the last step and on SIGTERM."""
from __future__ import annotations

from typing import Any

import jax

from axlearn_like.checkpoint import Checkpointer, checkpoint_dir


class RunCheckpoints:
    """One run directory's checkpoints (a no-op when cfg.checkpoint.enabled is false).

    `config_dict` (the resolved config) and `meta` are written with every step.
    """

    def __init__(self, cfg, run_dir: str, config_dict: dict, meta: dict):
        self.cfg = cfg
        self.config_dict = config_dict
        self.meta = meta
        self.ckpt = Checkpointer(checkpoint_dir(run_dir), cfg.checkpoint) if cfg.checkpoint.enabled else None

    @property
    def directory(self) -> str | None:
        return None if self.ckpt is None else self.ckpt.directory

    def restore_latest(self, abstract_state: Any, iterator: Any) -> tuple[int | None, Any]:
        """-> (step, state) of the newest checkpoint that restores (iterator positioned after it), or (None, None)."""
        if self.ckpt is None or not self.ckpt.all_steps():
            return None, None
        step, state = self.ckpt.restore_latest(abstract_state, iterator)
        if state is not None and jax.process_index() == 0:
            print(f"Resuming from checkpoint at step {step} in {self.ckpt.directory}", flush=True)
        return step, state

    def should_save(self, step: int, *, final: bool, preempted: bool) -> bool:
        return self.ckpt is not None and (step % self.cfg.checkpoint.every_steps == 0 or final or preempted)

    def save(self, step: int, state: Any, iterator: Any, *, force: bool = False) -> None:
        self.ckpt.save(step, state, iterator, self.config_dict, dict(self.meta, step=step), force=force)

    def close(self) -> None:
        if self.ckpt is not None:
            self.ckpt.close()
