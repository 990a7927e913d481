"""The jitted steps: `make_train_step` (gradient accumulation, the model's mutable collections threaded
through, non-finite steps dropped) and `make_eval_step`."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from axlearn_like import sharding as sharding_lib
from axlearn_like.guards import all_finite, check_xla_options
from axlearn_like.state import TrainState, finalize_step_statistics
from axlearn_like.state_setup import StateSetup


def split_micro(x, m: int):
    """[G, ...] -> [m, G/m, ...] taking every m-th row, so each micro-batch spans every data shard."""
    return x.reshape((x.shape[0] // m, m) + x.shape[1:]).swapaxes(0, 1)


def join_micro(x):
    return x.swapaxes(0, 1).reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def batch_shardings(setup: StateSetup) -> dict:
    return {k: sharding_lib.batch_sharding(setup.mesh, setup.rules, len(v.shape)) for k, v in setup.batch_spec.items()}


def make_train_step(setup: StateSetup, cfg):
    """-> (jitted train_step(state, batch) -> (state, metrics), batch shardings). `cfg`: the experiment config.

    Over m = trainer.grad_accum micro-batches, the update uses the mean gradient (1/m) sum_i grad L_i; metrics
    report the mean loss, the summed "tokens", grad_norm = ||mean gradient||, and `finite`.
    """
    task, optimizer = setup.task, setup.optimizer
    m = cfg.trainer.grad_accum

    def loss_fn(params, stats, carry, batch, rng):
        variables = {"params": params, "stats": stats, "carry": carry}
        loss, metrics, mutated = task.loss(variables, batch, rng, train=True)
        return loss, (metrics, mutated.get("stats", stats), mutated.get("carry", carry))

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        micro_batches = jax.tree.map(lambda x: split_micro(x, m), batch)
        micro_carry = jax.tree.map(lambda x: split_micro(x, m), state.carry)

        def micro(acc, xs):
            stats, grads_acc = acc
            mb, carry_m, i = xs
            (loss, (metrics, new_stats, new_carry)), grads = grad_fn(
                state.params, stats, carry_m, mb, jax.random.fold_in(rng, i))
            grads_acc = jax.tree.map(lambda a, g: a + g.astype(a.dtype), grads_acc, grads)  # float32 sums
            return (new_stats, grads_acc), (loss, metrics, new_carry)

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)), state.params)
        (stats, grads), (losses, metrics, carries) = jax.lax.scan(
            micro, (state.stats, zeros), (micro_batches, micro_carry, jnp.arange(m))
        )
        grads = jax.tree.map(lambda g: g / m, grads)
        stats = finalize_step_statistics(stats, state.step)
        carry = jax.tree.map(join_micro, carries)
        loss = jnp.mean(losses)
        metrics = {k: (jnp.sum(v, 0) if k == "tokens" else jnp.mean(v, 0)) for k, v in metrics.items()}

        grad_norm = optax.global_norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, stats=stats, carry=carry)
        # An update can overflow with a finite loss and gradient (learning rate 1e39), so the updated state
        # itself is checked too: one fused reduction over its float leaves.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(params, opt_state, stats, carry)
        # Under both nan policies a non-finite step changes nothing but the step counter, so a NaN never
        # reaches the state (or a checkpoint); "stop" then halts on the host, "skip" carries on.
        kept = state.replace(step=state.step + 1)
        new_state = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new_state, kept)
        metrics = dict(metrics)
        metrics.update(objective=loss, grad_norm=grad_norm, param_norm=optax.global_norm(params),
                       lr=setup.schedule(state.step), finite=finite)
        return new_state, metrics

    batch_sh = batch_shardings(setup)
    return jax.jit(
        train_step,
        in_shardings=(setup.state_sharding, batch_sh),
        out_shardings=(setup.state_sharding, None),
        donate_argnums=(0,),
        compiler_options=check_xla_options(cfg.trainer.xla_options),
    ), batch_sh


def make_eval_step(setup: StateSetup, batch_sh, xla_options: dict | None = None):
    """-> jitted eval_step(state, batch) -> {"loss_sum": loss x tokens, "tokens", the other metrics (scalars and
    small arrays, e.g. an MoE layer's expert loads, which the task's eval_metrics may aggregate)}.
    `xla_options`: trainer.xla_options, as checked by preflight and make_train_step."""
    task = setup.task

    def eval_step(state: TrainState, batch):
        variables = {"params": state.params, "stats": state.stats, "carry": state.carry}
        loss, metrics, _ = task.loss(variables, batch, jax.random.PRNGKey(0), train=False)
        tokens = metrics.get("tokens", jnp.asarray(1.0))
        return {"loss_sum": metrics.get("loss", loss) * tokens, "tokens": tokens,
                **{k: v for k, v in metrics.items() if k not in ("loss", "tokens")}}

    return jax.jit(eval_step, in_shardings=(setup.state_sharding, batch_sh),
                   compiler_options=xla_options or None)
