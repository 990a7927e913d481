"""optax AdamW with warmup + cosine decay, global-norm clipping, a metadata-driven weight-decay mask and
per-parameter learning-rate multipliers (both read from `axlearn_like.params.Param` metadata), and optional
bf16 model weights with float32 master weights kept in the optimizer state (`param_dtype`)."""
from __future__ import annotations

from typing import Any, NamedTuple

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
    # "float32": the model's params are the float32 weights (layers cast them to the compute dtype every step).
    # "bfloat16": params are stored in bf16 and the optimizer keeps float32 master weights in its state
    # (Megatron's mixed-precision scheme): every update is applied to the masters and params = bf16(master),
    # so no step casts the weights; costs 2 more bytes per parameter. Gradients are accumulated in float32.
    param_dtype: str = "float32"

    def validate(self) -> None:
        require(self.param_dtype in PARAM_DTYPES, "optimizer.param_dtype",
                f"{self.param_dtype!r} is not one of {sorted(PARAM_DTYPES)}")
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


PARAM_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class MasterWeightsState(NamedTuple):
    master: Any  # float32 copy of the params (same tree)
    inner: Any  # the wrapped transformation's state, built on the masters


def with_master_weights(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Runs `inner` on float32 master weights held in the state; the updates it returns move the (bf16) params
    to exactly bf16(new master): params + (bf16(new) - params) is exact in float32 for bf16 operands within a
    factor 2^16 of each other, and the result is cast back to the params' dtype by optax.apply_updates."""

    def init(params):
        master = jax.tree.map(lambda p: p.astype(jnp.float32), params)
        return MasterWeightsState(master, inner.init(master))

    def update(grads, state, params=None):
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        upd, inner_state = inner.update(grads, state.inner, state.master)
        master = optax.apply_updates(state.master, upd)
        out = jax.tree.map(lambda m, p: m.astype(p.dtype).astype(jnp.float32) - p.astype(jnp.float32), master, params)
        return out, MasterWeightsState(master, inner_state)

    return optax.GradientTransformation(init, update)


def master_weights(opt_state: Any) -> Any | None:
    """The float32 master weights held by a `with_master_weights` state (found by type), else None."""
    return opt_state.master if isinstance(opt_state, MasterWeightsState) else None


def cast_params(params: Any, cfg: OptimizerConfig) -> Any:
    """The model's stored params for `cfg.param_dtype` (floating leaves cast; the optimizer's init then takes
    its float32 masters from them, so params == bf16(master) from step 0)."""
    dt = PARAM_DTYPES[cfg.param_dtype]
    return jax.tree.map(lambda p: p.astype(dt) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int, *, decay_mask: Any, lr_scales: Any):
    """Returns (optax transformation, schedule). decay_mask / lr_scales: pytrees matching params."""
    schedule = learning_rate_schedule(cfg, total_steps)
    parts = []
    if cfg.clip_norm is not None:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             mask=decay_mask))
    if any(s != 1.0 for s in jax.tree.leaves(lr_scales)):
        parts.append(_scale_by_tree(lr_scales))
    opt = optax.chain(*parts)
    return (with_master_weights(opt) if cfg.param_dtype != "float32" else opt), schedule
