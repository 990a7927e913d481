"""optax AdamW with warmup + cosine decay, global-norm clipping, a metadata-driven weight-decay mask and
per-parameter learning-rate multipliers (both read from `axlearn_like.params.Param` metadata)."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from axlearn_like.config import config_class, require


@config_class
class OptimizerConfig:
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    schedule: str = "cosine"  # "cosine" | "linear" | "constant" (after warmup)
    decay_steps: int | None = None  # None = trainer.steps
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float | None = 1.0

    def validate(self) -> None:
        require(self.learning_rate > 0, "optimizer.learning_rate", "must be > 0")
        require(self.warmup_steps >= 0, "optimizer.warmup_steps", "must be >= 0")
        require(self.schedule in ("cosine", "linear", "constant"), "optimizer.schedule",
                f"{self.schedule!r} is not one of cosine, linear, constant")
        require(0.0 <= self.min_lr_ratio <= 1.0, "optimizer.min_lr_ratio", "must be in [0, 1]")
        require(self.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0")
        require(self.clip_norm is None or self.clip_norm > 0, "optimizer.clip_norm", "must be > 0 or None")


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    decay = max(1, (cfg.decay_steps or total_steps) - cfg.warmup_steps)
    peak, end = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, decay, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(peak, end, decay)
    else:
        after = optax.constant_schedule(peak)
    warm = optax.linear_schedule(0.0 if cfg.warmup_steps else peak, peak, max(1, cfg.warmup_steps))
    return optax.join_schedules([warm, after], [cfg.warmup_steps])


def _scale_by_tree(scales: Any) -> optax.GradientTransformation:
    """Multiplies each update by a static per-leaf float (parameters' lr_scale metadata)."""

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, s: u if s == 1.0 else u * jnp.asarray(s, u.dtype), updates, scales), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(cfg: OptimizerConfig, total_steps: int, *, decay_mask: Any, lr_scales: Any):
    """Returns (optax transformation, schedule). decay_mask / lr_scales: pytrees matching params."""
    schedule = learning_rate_schedule(cfg, total_steps)
    parts = []
    if cfg.clip_norm is not None:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask))
    if any(s != 1.0 for s in jax.tree.leaves(lr_scales)):
        parts.append(_scale_by_tree(lr_scales))
    return optax.chain(*parts), schedule
