"""Evaluation during training: the eval split through the jitted eval step, then the Task's eval hooks.

    ev = task.eval_metrics(sums, cfg)  with sums = {"loss_sum", "tokens", means of the other metrics (arrays too)}
    ev.update(task.eval_hook(cfg, variables, step))
"""
from __future__ import annotations

import jax
import numpy as np

from axlearn_like.state import TrainState
from axlearn_like.task import Task


def global_batch(local: dict, batch_sh: dict) -> dict:
    """This process's rows of a batch -> global jax.Arrays with the batch shardings (keys outside them dropped)."""
    return {k: jax.make_array_from_process_local_data(batch_sh[k], np.asarray(v))
            for k, v in local.items() if k in batch_sh}


def to_host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def variables_of(state: TrainState) -> dict:
    return {"params": state.params, "stats": state.stats, "carry": state.carry}


def evaluate(cfg, task: Task, state: TrainState, eval_step, batch_sh) -> dict[str, float]:
    """Runs up to cfg.trainer.eval_batches batches of the eval split and the task's eval hooks -> metrics."""
    it = cfg.data.make_iterator(split="eval", process_index=jax.process_index(), process_count=jax.process_count())
    loss_sum = tokens = 0.0
    extra: dict[str, list] = {}
    for i, local in enumerate(it):
        if i >= cfg.trainer.eval_batches:
            break
        out = to_host(eval_step(state, global_batch(local, batch_sh)))
        loss_sum += float(out.pop("loss_sum"))
        tokens += float(out.pop("tokens"))
        for k, v in out.items():
            extra.setdefault(k, []).append(np.asarray(v, np.float64))
    means = {k: np.mean(np.stack(v), axis=0) for k, v in extra.items()}  # elementwise for array metrics
    sums = {"loss_sum": loss_sum, "tokens": tokens, **{k: float(v) if v.ndim == 0 else v for k, v in means.items()}}
    ev = dict(task.eval_metrics(sums, cfg))
    ev.update(task.eval_hook(cfg, variables_of(state), int(jax.device_get(state.step))))
    return ev
