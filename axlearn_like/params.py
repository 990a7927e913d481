"""Parameter metadata: logical sharding axes plus the per-parameter weight-decay flag.

Layers create parameters with `param_init(init_fn, axes, weight_decay=...)` (instead of bare
`nn.with_logical_partitioning`), so the optimizer's weight-decay mask is read from the metadata the
layer attached, never from parameter paths. Default rule: decay matrices (ndim >= 2) only, so norm
scales and biases are never decayed; a layer passes weight_decay=False to exempt anything else
(e.g. Mamba-2's A_log, dt_bias, D).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax


@flax.struct.dataclass
class Param(nn.LogicallyPartitioned):
    """nn.LogicallyPartitioned (logical axis names, resolved by the rules in axlearn_like.sharding) plus a
    weight-decay flag and a learning-rate multiplier (static metadata)."""

    weight_decay: bool = flax.struct.field(pytree_node=False, default=True)
    lr_scale: float = flax.struct.field(pytree_node=False, default=1.0)


def param_init(init_fn, axes: tuple[str | None, ...], *, weight_decay: bool = True, lr_scale: float = 1.0):
    """Wraps an initializer so the created parameter carries logical axes, the decay flag and a
    learning-rate multiplier (e.g. EBT's learnable step size trains at its own rate)."""

    def wrapped(*args, **kwargs):
        value = init_fn(*args, **kwargs)
        if value.ndim != len(axes):
            raise ValueError(f"param_init: value of rank {value.ndim} but axes {axes}")
        return Param(value, names=tuple(axes), weight_decay=weight_decay, lr_scale=lr_scale)

    return wrapped


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.Partitioned)


def weight_decay_mask(boxed_params: Any) -> Any:
    """Boxed params -> pytree of bools (True = apply weight decay), with the unboxed structure."""

    def flag(x):
        if isinstance(x, Param):
            return bool(x.weight_decay) and x.value.ndim >= 2
        if _is_box(x):
            return x.value.ndim >= 2
        return getattr(x, "ndim", 0) >= 2

    return jax.tree.map(flag, boxed_params, is_leaf=_is_box)


def logical_axes(boxed: Any) -> Any:
    """Boxed variables -> pytree of logical-axis tuples (None entries = replicated) per leaf."""
    return jax.tree.map(
        lambda x: tuple(x.names) if _is_box(x) else (None,) * getattr(x, "ndim", 0), boxed, is_leaf=_is_box
    )


def lr_scales(boxed_params: Any) -> Any:
    """Boxed params -> pytree of float learning-rate multipliers (1.0 unless a layer set lr_scale)."""
    return jax.tree.map(lambda x: float(getattr(x, "lr_scale", 1.0)), boxed_params, is_leaf=_is_box)


def unbox_values(boxed: Any) -> Any:
    """Strips metadata boxes without applying sharding constraints (for abstract/eval_shape trees and
    host-side code; inside a traced function `nn.meta.unbox` is fine)."""
    return jax.tree.map(lambda x: x.value if _is_box(x) else x, boxed, is_leaf=_is_box)
