"""The generic trainer: sharded state, one jitted train step, eval, checkpoints, metrics, auto-resume.

It knows no model math: a model is a `Task` (axlearn_like.task) built from `cfg.model.build()`.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from axlearn_like import config as config_lib
from axlearn_like import params as params_lib
from axlearn_like import sharding as sharding_lib
from axlearn_like.checkpoint import CheckpointConfig, Checkpointer, checkpoint_dir
from axlearn_like.config import ConfigError, config_class, require
from axlearn_like.data import DataConfig, make_iterator, make_tokenizer
from axlearn_like.metrics import MetricsWriter
from axlearn_like.optimizers import OptimizerConfig, cast_params, make_optimizer
from axlearn_like.sharding import MeshConfig
from axlearn_like.state import TrainState, finalize_step_statistics

log = logging.getLogger("axlearn_like")


class UserError(Exception):
    """An error the user caused (paths, devices, data); printed as one line by the CLI."""


@config_class
class TrainerConfig:
    steps: int = 300
    grad_accum: int = 1  # micro-batches per optimizer step
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8  # 0 = no evaluation
    nan_policy: str = "stop"  # "stop": raise and save nothing; "skip": drop the update and continue
    seed: int = 0
    progress: bool = True
    sample_tokens: int = 120  # printed continuation at the end (0 = none)
    sample_prompt: str = "def "
    sample_temperature: float = 0.8

    def validate(self) -> None:
        require(self.steps >= 1, "trainer.steps", "must be >= 1")
        require(self.grad_accum >= 1, "trainer.grad_accum", "must be >= 1")
        require(self.log_every >= 1, "trainer.log_every", "must be >= 1")
        require(self.eval_every >= 1, "trainer.eval_every", "must be >= 1")
        require(self.nan_policy in ("stop", "skip"), "trainer.nan_policy", f"{self.nan_policy!r} is not 'stop' or 'skip'")


@config_class
class ExperimentConfig:
    """The root config. `model` is any model config with a `build()` method returning a Task."""

    name: str = "experiment"
    model: Any = None
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = dataclasses.field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    run_dir: str = ""  # "" = runs/<name>

    def validate(self) -> None:
        require(self.model is not None and hasattr(self.model, "build"), "model", "must be a model config with build()")
        require(self.data.global_batch_size % self.trainer.grad_accum == 0, "trainer.grad_accum",
                f"global_batch_size {self.data.global_batch_size} is not divisible by grad_accum {self.trainer.grad_accum}")

    def resolved_run_dir(self) -> str:
        return self.run_dir or os.path.join("runs", self.name)


# ---------------------------------------------------------------------------------------------------------
# State construction (shared by training, `checkpoint.load` and tools)
# ---------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class StateSetup:
    task: Any
    mesh: jax.sharding.Mesh
    rules: tuple
    optimizer: optax.GradientTransformation
    schedule: Any
    state_sharding: TrainState
    abstract_state: TrainState
    batch_spec: dict
    init_fn: Any


def _is_axes(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(e, (str, type(None))) for e in x)


def _sharding_for(shape, axes, mesh, rules) -> NamedSharding:
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


def default_batch_spec(data: DataConfig) -> dict:
    shape = (data.global_batch_size, data.seq_len)
    i32 = jax.ShapeDtypeStruct(shape, jnp.int32)
    return {"inputs": i32, "targets": i32, "loss_mask": jax.ShapeDtypeStruct(shape, jnp.float32),
            "segment_ids": i32, "positions": i32}


def build_state_setup(cfg: ExperimentConfig, *, mesh=None, for_restore: bool = False) -> StateSetup:
    del for_restore
    task = cfg.model.build()
    if mesh is None:
        mesh = sharding_lib.make_mesh(cfg.mesh)
    rules = sharding_lib.logical_rules(cfg.mesh)
    batch_spec = task.batch_spec(cfg.data) if hasattr(task, "batch_spec") else default_batch_spec(cfg.data)
    dummy = {k: jnp.zeros(v.shape, v.dtype) for k, v in batch_spec.items()}
    init_rng = jax.random.PRNGKey(cfg.trainer.seed)

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(lambda r: task.init(r, dummy), init_rng)
    boxed_params = boxed["params"]
    optimizer, schedule = make_optimizer(
        cfg.optimizer, cfg.trainer.steps,
        decay_mask=params_lib.weight_decay_mask(boxed_params), lr_scales=params_lib.lr_scales(boxed_params),
    )

    def shard_tree(boxed_tree):
        axes = params_lib.logical_axes(boxed_tree)
        shapes = params_lib.unbox_values(boxed_tree)
        return jax.tree.map(lambda a, s: _sharding_for(s.shape, a, mesh, rules), axes, shapes, is_leaf=_is_axes)

    replicated = NamedSharding(mesh, P())
    param_sh = shard_tree(boxed_params)
    stats_sh = shard_tree(boxed.get("stats", {}))
    carry_abs = params_lib.unbox_values(boxed.get("carry", {}))
    carry_sh = jax.tree.map(lambda s: _sharding_for(s.shape, ("batch",) + (None,) * (s.ndim - 1), mesh, rules), carry_abs)

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

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        abstract_unsharded = jax.eval_shape(init_fn, init_rng)
    opt_sh = optax.tree_map_params(
        optimizer, lambda _, s: s, abstract_unsharded.opt_state, param_sh,
        transform_non_params=lambda _: replicated,
    )
    state_sharding = TrainState(step=replicated, rng=replicated, params=param_sh, opt_state=opt_sh, stats=stats_sh, carry=carry_sh)
    abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_unsharded, state_sharding
    )
    return StateSetup(task, mesh, rules, optimizer, schedule, state_sharding, abstract_state, batch_spec, init_fn)


# ---------------------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------------------

def _split_micro(x, m: int):
    """[G, ...] -> [m, G/m, ...] taking every m-th row, so each micro-batch spans every data shard."""
    return x.reshape((x.shape[0] // m, m) + x.shape[1:]).swapaxes(0, 1)


def _join_micro(x):
    return x.swapaxes(0, 1).reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def make_train_step(setup: StateSetup, cfg: ExperimentConfig):
    task, optimizer = setup.task, setup.optimizer
    m = cfg.trainer.grad_accum

    def loss_fn(params, stats, carry, batch, rng):
        variables = {"params": params, "stats": stats, "carry": carry}
        loss, metrics, mutated = task.loss(variables, batch, rng, train=True)
        return loss, (metrics, mutated.get("stats", stats), mutated.get("carry", carry))

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        micro_batches = jax.tree.map(lambda x: _split_micro(x, m), batch)
        micro_carry = jax.tree.map(lambda x: _split_micro(x, m), state.carry)

        def micro(acc, xs):
            stats, grads_acc = acc
            mb, carry_m, i = xs
            (loss, (metrics, new_stats, new_carry)), grads = grad_fn(state.params, stats, carry_m, mb, jax.random.fold_in(rng, i))
            grads_acc = jax.tree.map(lambda a, g: a + g.astype(a.dtype), grads_acc, grads)  # float32 sums
            return (new_stats, grads_acc), (loss, metrics, new_carry)

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)), state.params)
        (stats, grads), (losses, metrics, carries) = jax.lax.scan(
            micro, (state.stats, zeros), (micro_batches, micro_carry, jnp.arange(m))
        )
        grads = jax.tree.map(lambda g: g / m, grads)
        stats = finalize_step_statistics(stats, state.step)
        carry = jax.tree.map(_join_micro, carries)
        loss = jnp.mean(losses)
        metrics = {k: (jnp.sum(v, 0) if k == "tokens" else jnp.mean(v, 0)) for k, v in metrics.items()}

        grad_norm = optax.global_norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, stats=stats, carry=carry)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # Under both nan policies a non-finite step changes nothing but the step counter, so a NaN never
        # reaches the state (or a checkpoint); "stop" then halts on the host, "skip" carries on.
        kept = state.replace(step=state.step + 1)
        new_state = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new_state, kept)
        metrics = dict(metrics)
        metrics.update(objective=loss, grad_norm=grad_norm, param_norm=optax.global_norm(params),
                       lr=setup.schedule(state.step), finite=finite)
        return new_state, metrics

    batch_sh = {k: sharding_lib.batch_sharding(setup.mesh, setup.rules, len(v.shape)) for k, v in setup.batch_spec.items()}
    return jax.jit(
        train_step,
        in_shardings=(setup.state_sharding, batch_sh),
        out_shardings=(setup.state_sharding, None),
        donate_argnums=(0,),
    ), batch_sh


def make_eval_step(setup: StateSetup, batch_sh):
    task = setup.task

    def eval_step(state: TrainState, batch):
        variables = {"params": state.params, "stats": state.stats, "carry": state.carry}
        loss, metrics, _ = task.loss(variables, batch, jax.random.PRNGKey(0), train=False)
        tokens = metrics.get("tokens", jnp.asarray(1.0))
        return {"loss_sum": metrics.get("loss", loss) * tokens, "tokens": tokens,
                **{k: v for k, v in metrics.items() if k not in ("loss", "tokens") and jnp.ndim(v) == 0}}

    return jax.jit(eval_step, in_shardings=(setup.state_sharding, batch_sh))


# ---------------------------------------------------------------------------------------------------------
# Helpers for the loop
# ---------------------------------------------------------------------------------------------------------

PEAK_BF16_FLOPS = {  # per chip, dense bf16, datasheet
    "h200": 989e12, "h100": 989e12, "a100": 312e12, "tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12,
    "tpu v5p": 459e12, "tpu v6 lite": 918e12, "tpu v6e": 918e12, "b200": 2250e12,
}


def peak_flops_per_device() -> float | None:
    kind = jax.devices()[0].device_kind.lower()
    for key, val in PEAK_BF16_FLOPS.items():
        if key in kind:
            return val
    return None


def _check_writable(run_dir: str) -> None:
    try:
        os.makedirs(run_dir, exist_ok=True)
        probe = os.path.join(run_dir, f".write_probe_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"run dir {run_dir!r} is not writable ({e.strerror}); pass --run-dir DIR pointing to a writable directory") from None


def _global_batch(local: dict, batch_sh: dict) -> dict:
    return {k: jax.make_array_from_process_local_data(batch_sh[k], np.asarray(v)) for k, v in local.items() if k in batch_sh}


class _SigtermFlag:
    def __init__(self):
        self.set = False
        self._prev = None

    def __enter__(self):
        if threading_is_main():
            self._prev = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.set = True

    def __exit__(self, *exc):
        if self._prev is not None:
            signal.signal(signal.SIGTERM, self._prev)


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _to_host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


# ---------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------

def run(cfg: ExperimentConfig) -> dict:
    """Trains `cfg` to cfg.trainer.steps, resuming from the latest complete checkpoint in the run dir."""
    config_lib.validate_tree(cfg)
    run_dir = cfg.resolved_run_dir()
    is_main = jax.process_index() == 0
    _check_writable(run_dir)
    tcfg = cfg.trainer
    pcount, pindex = jax.process_count(), jax.process_index()
    if cfg.data.global_batch_size % pcount:
        raise ConfigError(f"data.global_batch_size: {cfg.data.global_batch_size} is not divisible by the {pcount} processes")

    mesh = sharding_lib.make_mesh(cfg.mesh)
    rules = sharding_lib.logical_rules(cfg.mesh)
    dp = sharding_lib.data_parallel_size(mesh, rules)
    micro = cfg.data.global_batch_size // tcfg.grad_accum
    if micro % dp:
        raise ConfigError(
            f"data.global_batch_size: micro-batch of {micro} rows (global {cfg.data.global_batch_size} / grad_accum "
            f"{tcfg.grad_accum}) is not divisible by the data-parallel size {dp} (mesh {dict(mesh.shape)}); "
            f"use a multiple of {dp * tcfg.grad_accum}"
        )

    train_iter = make_iterator(cfg.data, split="train", process_index=pindex, process_count=pcount)
    setup = build_state_setup(cfg, mesh=mesh)
    config_dict = config_lib.to_dict(cfg)
    if is_main:
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            f.write(config_lib.to_json(cfg))

    ckpt = Checkpointer(checkpoint_dir(run_dir), cfg.checkpoint) if cfg.checkpoint.enabled else None
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        train_step, batch_sh = make_train_step(setup, cfg)
        eval_step = make_eval_step(setup, batch_sh)
        state = None
        if ckpt is not None and ckpt.all_steps():
            step0, state = ckpt.restore_latest(setup.abstract_state, train_iter)
            if state is not None and is_main:
                print(f"Resuming from checkpoint at step {step0} in {ckpt.directory}", flush=True)
        if state is None:
            state = jax.jit(setup.init_fn, out_shardings=setup.state_sharding)(jax.random.PRNGKey(tcfg.seed))
            if is_main:
                n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
                print(f"Starting {cfg.name}: {n/1e6:.2f}M parameters, mesh {dict(mesh.shape)}, run dir {run_dir}", flush=True)

        writer = MetricsWriter(run_dir)
        meta = {"mesh": dict(mesh.shape), "process_count": pcount, "jax": jax.__version__,
                "global_batch_size": cfg.data.global_batch_size, "seq_len": cfg.data.seq_len}
        start_step = int(jax.device_get(state.step))
        tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_len
        flops_per_token = setup.task.flops_per_token(cfg.data.seq_len)
        peak = peak_flops_per_device()
        result: dict = {"start_step": start_step}
        bar = None
        if is_main and tcfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=tcfg.steps, initial=start_step, desc=cfg.name, dynamic_ncols=True, file=sys.stdout)
        last_t, last_step = time.perf_counter(), start_step
        step = start_step
        # Fault-injection tests slow the loop down so a kill lands between two known checkpoints.
        fault_sleep = float(os.environ.get("AXL_FAULT_SLEEP_S", "0") or 0)
        with _SigtermFlag() as sigterm:
            while step < tcfg.steps:
                local = next(train_iter)
                batch = _global_batch(local, batch_sh)
                state, metrics = train_step(state, batch)
                step += 1
                if bar is not None:
                    bar.update(1)
                want_log = step % tcfg.log_every == 0 or step == tcfg.steps
                if want_log or tcfg.nan_policy == "stop":
                    finite = bool(jax.device_get(metrics["finite"]))
                    if not finite and tcfg.nan_policy == "stop":
                        raise FloatingPointError(
                            f"non-finite loss or gradient at step {step}; nothing was saved from this step "
                            f"(set trainer.nan_policy=skip to skip such steps, or lower optimizer.learning_rate)"
                        )
                if want_log:
                    host = _to_host(metrics)
                    now = time.perf_counter()
                    dt = (now - last_t) / max(1, step - last_step)
                    last_t, last_step = now, step
                    row = {f"train/{k}": v for k, v in host.items() if k != "finite"}
                    row["train/skipped"] = float(not bool(host["finite"]))
                    row["perf/step_time_s"] = dt
                    row["perf/tokens_per_s"] = tokens_per_step / dt
                    if peak:
                        row["perf/mfu"] = flops_per_token * tokens_per_step / dt / (peak * jax.device_count())
                    writer.write(step, row)
                    if bar is not None:
                        bar.set_postfix(loss=f"{float(host.get('loss', host['objective'])):.3f}", lr=f"{float(host['lr']):.1e}")
                    result["last_train"] = row
                if tcfg.eval_batches > 0 and (step % tcfg.eval_every == 0 or step == tcfg.steps):
                    ev = evaluate(cfg, state, eval_step, batch_sh)
                    writer.write(step, {f"eval/{k}": v for k, v in ev.items()})
                    result["eval"] = ev
                    if bar is not None:
                        bar.write(f"step {step}: eval loss {ev['loss']:.4f}, bits/token {ev['bits_per_token']:.3f}")
                should_save = ckpt is not None and (step % cfg.checkpoint.every_steps == 0 or step == tcfg.steps or sigterm.set)
                if should_save:
                    ckpt.save(step, state, train_iter, config_dict, dict(meta, step=step), force=sigterm.set)
                if fault_sleep:
                    time.sleep(fault_sleep)
                if sigterm.set:
                    if is_main:
                        print(f"SIGTERM: saved checkpoint at step {step}; exiting", flush=True)
                    break
        if bar is not None:
            bar.close()
        if start_step >= tcfg.steps and is_main:
            print(f"Already trained to step {start_step} (trainer.steps={tcfg.steps}); "
                  f"pass --set trainer.steps=N with N > {start_step} to train further", flush=True)
        if "eval" not in result and tcfg.eval_batches > 0 and not sigterm.set:
            result["eval"] = evaluate(cfg, state, eval_step, batch_sh)
        if ckpt is not None:
            ckpt.close()
        writer.close()
        result["final_step"] = step
        result["state"] = state
        if not sigterm.set and is_main and tcfg.sample_tokens > 0 and hasattr(setup.task, "generate"):
            result["sample"] = _print_sample(cfg, setup, state)
        if "eval" in result and is_main and not sigterm.set:
            ev = result["eval"]
            print(f"final eval: loss {ev['loss']:.4f} nats/token, {ev['bits_per_byte']:.3f} bits/byte", flush=True)
    return result


def evaluate(cfg: ExperimentConfig, state: TrainState, eval_step, batch_sh) -> dict:
    it = make_iterator(cfg.data, split="eval", process_index=jax.process_index(), process_count=jax.process_count())
    loss_sum = tokens = 0.0
    extra: dict[str, list] = {}
    for i, local in enumerate(it):
        if i >= cfg.trainer.eval_batches:
            break
        out = _to_host(eval_step(state, _global_batch(local, batch_sh)))
        loss_sum += float(out.pop("loss_sum"))
        tokens += float(out.pop("tokens"))
        for k, v in out.items():
            extra.setdefault(k, []).append(float(v))
    loss = loss_sum / max(tokens, 1.0)
    tok = make_tokenizer(cfg.data)
    bytes_per_token = float(getattr(tok, "bytes_per_token", 1.0))
    ev = {"loss": loss, "bits_per_token": loss / math.log(2), "bits_per_byte": loss / math.log(2) / bytes_per_token, "tokens": tokens}
    ev.update({k: float(np.mean(v)) for k, v in extra.items()})
    return ev


def _print_sample(cfg: ExperimentConfig, setup: StateSetup, state: TrainState) -> str:
    tok = make_tokenizer(cfg.data)
    prompt = np.asarray([tok.encode(cfg.trainer.sample_prompt)], np.int32)
    variables = {"params": state.params, "stats": state.stats, "carry": state.carry}
    out = setup.task.generate(variables, prompt, cfg.trainer.sample_tokens, jax.random.PRNGKey(cfg.trainer.seed),
                              temperature=cfg.trainer.sample_temperature)
    new_tokens = np.asarray(out)[0][prompt.shape[1]:]  # generate returns prompt + continuation
    text = tok.decode([int(t) for t in new_tokens])
    print("sample:\n" + cfg.trainer.sample_prompt + text, flush=True)
    return text
