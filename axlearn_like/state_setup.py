"""The sharded train state of an experiment, built without data: shared by the trainer, `checkpoint.load` and
tools. `build_state_setup(cfg)` returns the Task, mesh, optimizer, the state's shardings and abstract shapes, and
an `init_fn` that creates the state (jit it with `out_shardings=setup.state_sharding`)."""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from axlearn_like import params as params_lib, sharding as sharding_lib
from axlearn_like.config import ConfigError
from axlearn_like.optimizers import cast_params, make_optimizer
from axlearn_like.state import ResettableState, TrainState
from axlearn_like.task import Task


@dataclasses.dataclass
class StateSetup:
    task: Task
    mesh: jax.sharding.Mesh
    rules: tuple
    optimizer: optax.GradientTransformation
    schedule: Any
    state_sharding: TrainState
    abstract_state: TrainState
    batch_spec: dict
    init_fn: Any


def is_axes(x) -> bool:
    """True for a logical-axes tuple leaf (see axlearn_like.params.logical_axes)."""
    return isinstance(x, tuple) and all(isinstance(e, (str, type(None))) for e in x)


def sharding_for(shape, axes, mesh, rules) -> NamedSharding:
    """Logical axes -> NamedSharding, dropping any mesh axis that does not divide its dimension."""
    spec = sharding_lib.logical_to_spec(tuple(axes), rules, mesh)
    fixed = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if entry is None:
            fixed.append(None)
            continue
        names = (entry,) if isinstance(entry, str) else tuple(entry)
        keep, size = [], 1
        for n in names:
            if dim % (size * mesh.shape[n]) == 0:
                keep.append(n)
                size *= mesh.shape[n]
        fixed.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
    return NamedSharding(mesh, P(*fixed))


def build_task(model_cfg: Any) -> Task:
    task = model_cfg.build()
    if not isinstance(task, Task):
        raise ConfigError(f"model: {type(model_cfg).__name__}.build() must return an axlearn_like.task.Task, "
                          f"got {type(task).__name__}")
    return task


def resettable_state(cfg: Any, task: Task | None = None) -> ResettableState:
    """What of the train state a restore may start from its initial values (axlearn_like.state): the `stats`
    subtrees the Task declares training-time caches (`Task.resettable_stats`), as leaf-name prefixes, and their
    initial values from the same `task.init` as `build_state_setup`'s init_fn on the experiment's seed (only
    the leaves asked for are computed). `task`: the experiment's Task (default: built from cfg.model)."""
    from axlearn_like.checkpoint import leaf_name

    task = build_task(cfg.model) if task is None else task
    declared = {".".join(("stats",) + tuple(path)): what for path, what in task.resettable_stats().items()}

    def init(wanted: dict[str, Any]) -> dict[str, Any]:
        names = list(wanted)
        if not names:
            return {}
        batch_spec = task.batch_spec(cfg.data)

        def initial():
            dummy = {k: jnp.zeros(v.shape, v.dtype) for k, v in batch_spec.items()}
            stats = nn.meta.unbox(task.init(jax.random.PRNGKey(cfg.trainer.seed), dummy)).get("stats", {})
            flat = {"stats." + leaf_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(stats)[0]}
            return [flat[n] for n in names]

        return dict(zip(names, jax.jit(initial, out_shardings=[wanted[n].sharding for n in names])()))

    return ResettableState(declared, init)


def build_state_setup(cfg: Any, *, mesh=None, for_restore: bool = False) -> StateSetup:
    """`cfg`: the experiment config (axlearn_like.trainer.ExperimentConfig: model, data, mesh, optimizer, trainer)."""
    del for_restore
    task = build_task(cfg.model)
    if mesh is None:
        mesh = sharding_lib.make_mesh(cfg.mesh)
    rules = sharding_lib.logical_rules(cfg.mesh)
    batch_spec = dict(task.batch_spec(cfg.data))
    dummy = {k: jnp.zeros(v.shape, v.dtype) for k, v in batch_spec.items()}
    init_rng = jax.random.PRNGKey(cfg.trainer.seed)

    with sharding_lib.use_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(lambda r: task.init(r, dummy), init_rng)
    boxed_params = boxed["params"]
    optimizer, schedule = make_optimizer(
        cfg.optimizer, cfg.trainer.steps,
        decay_mask=params_lib.weight_decay_mask(boxed_params), lr_scales=params_lib.lr_scales(boxed_params),
    )

    def shard_tree(boxed_tree):
        axes = params_lib.logical_axes(boxed_tree)
        shapes = params_lib.unbox_values(boxed_tree)
        return jax.tree.map(lambda a, s: sharding_for(s.shape, a, mesh, rules), axes, shapes, is_leaf=is_axes)

    replicated = NamedSharding(mesh, P())
    param_sh = shard_tree(boxed_params)
    stats_sh = shard_tree(boxed.get("stats", {}))
    carry_abs = params_lib.unbox_values(boxed.get("carry", {}))
    carry_sh = jax.tree.map(lambda s: sharding_for(s.shape, ("batch",) + (None,) * (s.ndim - 1), mesh, rules),
                            carry_abs)

    def init_fn(rng):
        variables = nn.meta.unbox(task.init(rng, dummy))
        params = cast_params(variables["params"], cfg.optimizer)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            rng=jax.random.key_data(jax.random.fold_in(rng, 1)),
            params=params,
            opt_state=optimizer.init(params),
            stats=variables.get("stats", {}),
            carry=variables.get("carry", {}),
        )

    with sharding_lib.use_mesh(mesh), nn.logical_axis_rules(rules):
        abstract_unsharded = jax.eval_shape(init_fn, init_rng)
    opt_sh = optax.tree_map_params(
        optimizer, lambda _, s: s, abstract_unsharded.opt_state, param_sh,
        transform_non_params=lambda _: replicated,
    )
    state_sharding = TrainState(step=replicated, rng=replicated, params=param_sh, opt_state=opt_sh, stats=stats_sh,
                                carry=carry_sh)
    abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_unsharded, state_sharding
    )
    return StateSetup(task, mesh, rules, optimizer, schedule, state_sharding, abstract_state, batch_spec, init_fn)
