"""The generic trainer: `run(cfg)` trains an `ExperimentConfig` with auto-resume. It knows no model math: the
model is an `axlearn_like.task.Task` built from `cfg.model.build()`, and the data any config with
`global_batch_size` and `make_iterator(split=, process_index=, process_count=)`.

The pieces (docs/architecture.md, "Tasks and the trainer"):
  state_setup       the sharded train state from the config (shared with checkpoint.load and tools)
  train_step        the jitted train / eval steps (gradient accumulation, non-finite steps dropped)
  evaluation        the eval split, then the Task's eval hooks
  train_checkpoint  restore at the start, the save policy
  signals           SIGTERM -> save and exit
  rundir, guards    the run dir's lock and saved config; preflight checks, the finiteness check, skip accounting
  trainer (here)    the configs and the loop: prepare -> restore or init -> steps (log, eval, save) -> finish
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from axlearn_like import config as config_lib, guards, rundir, sharding as sharding_lib
from axlearn_like.checkpoint import CheckpointConfig
from axlearn_like.config import ConfigError, config_class, require
from axlearn_like.data import DataConfig
from axlearn_like.evaluation import evaluate, global_batch, to_host, variables_of
from axlearn_like.metrics import MetricsWriter
from axlearn_like.optimizers import OptimizerConfig
from axlearn_like.sharding import MeshConfig
from axlearn_like.signals import SigtermFlag
from axlearn_like.state_setup import StateSetup, build_state_setup
from axlearn_like.train_checkpoint import RunCheckpoints
from axlearn_like.train_step import make_eval_step, make_train_step

__all__ = ["ExperimentConfig", "TrainerConfig", "UserError", "run", "evaluate", "build_state_setup", "StateSetup",
           "make_train_step", "make_eval_step", "peak_flops_per_device"]

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
    max_skipped_steps: int = 20  # nan_policy=skip: more skipped steps than this in one run attempt stops it
    seed: int = 0
    progress: bool = True
    # XLA compiler options of the jitted train and eval steps (jax.jit's compiler_options): XLA_FLAGS names
    # without the leading "--", e.g. {"xla_gpu_enable_triton_gemm": false}. Unlike XLA_FLAGS they are per run,
    # saved in config.json, and checked by name before the step compiles (guards.check_xla_options).
    xla_options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        require(self.steps >= 1, "trainer.steps", "must be >= 1")
        for k, v in self.xla_options.items():
            require(isinstance(v, (bool, int, float, str)), f"trainer.xla_options.{k}",
                    f"must be a bool, number or string, got {v!r}")
        require(self.grad_accum >= 1, "trainer.grad_accum", "must be >= 1")
        require(self.log_every >= 1, "trainer.log_every", "must be >= 1")
        require(self.eval_every >= 1, "trainer.eval_every", "must be >= 1")
        require(self.nan_policy in ("stop", "skip"), "trainer.nan_policy",
                f"{self.nan_policy!r} is not 'stop' or 'skip'")
        require(self.max_skipped_steps >= 0, "trainer.max_skipped_steps", "must be >= 0")


# Saved by earlier versions as trainer.sample_*; now the model's `sample` section (axlearn_like.task.SampleConfig).
_MOVED_SAMPLE_KEYS = {"sample_tokens": "tokens", "sample_prompt": "prompt", "sample_temperature": "temperature"}


@config_class
class ExperimentConfig:
    """The root config. `model`: a model config whose `build()` returns a Task; `data`: a DataConfig (token
    pipelines) or any config with `global_batch_size` and `make_iterator(split=, process_index=, process_count=)`."""

    name: str = "experiment"
    model: Any = None
    data: Any = dataclasses.field(default_factory=DataConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = dataclasses.field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    run_dir: str = ""  # "" = runs/<name>

    def validate(self) -> None:
        require(self.model is not None and hasattr(self.model, "build"), "model", "must be a model config with build()")
        require(hasattr(self.data, "make_iterator") and hasattr(self.data, "global_batch_size"), "data",
                "must be a data config with global_batch_size and make_iterator()")
        require(self.data.global_batch_size % self.trainer.grad_accum == 0, "trainer.grad_accum",
                f"global_batch_size {self.data.global_batch_size} is not divisible by grad_accum "
                f"{self.trainer.grad_accum}")

    def resolved_run_dir(self) -> str:
        return self.run_dir or os.path.join("runs", self.name)

    @classmethod
    def migrate_dict(cls, d: dict) -> dict:
        """Moves trainer.sample_* (saved by earlier versions) into the model's `sample` section."""
        trainer = d.get("trainer")
        if not isinstance(trainer, dict) or not any(k in trainer for k in _MOVED_SAMPLE_KEYS):
            return d
        d["trainer"] = {k: v for k, v in trainer.items() if k not in _MOVED_SAMPLE_KEYS}
        model = d.get("model")
        if isinstance(model, dict) and "_type" in model and "sample" not in model:
            model_cls = config_lib._resolve_type(model["_type"])
            if "sample" in {f.name for f in dataclasses.fields(model_cls)}:
                sample = {"_type": "axlearn_like.task:SampleConfig"}
                sample.update({new: trainer[old] for old, new in _MOVED_SAMPLE_KEYS.items() if old in trainer})
                d["model"] = dict(model, sample=sample)
        return d


# ---------------------------------------------------------------------------------------------------------
# Preparation
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
        raise UserError(f"run dir {run_dir!r} is not writable ({e.strerror}); "
                        "pass --run-dir DIR pointing to a writable directory") from None


def _check_batch_layout(cfg: ExperimentConfig, mesh) -> None:
    """The global batch must split over processes and each micro-batch over the data-parallel devices."""
    pcount, g, m = jax.process_count(), cfg.data.global_batch_size, cfg.trainer.grad_accum
    if g % pcount:
        raise ConfigError(f"data.global_batch_size: {g} is not divisible by the {pcount} processes")
    dp = sharding_lib.data_parallel_size(mesh, sharding_lib.logical_rules(cfg.mesh))
    if (g // m) % dp:
        raise ConfigError(
            f"data.global_batch_size: micro-batch of {g // m} rows (global {g} / grad_accum {m}) is not divisible "
            f"by the data-parallel size {dp} (mesh {dict(mesh.shape)}); use a multiple of {dp * m}"
        )


@dataclasses.dataclass
class _Run:
    """Everything one `run` holds while it trains."""

    cfg: ExperimentConfig
    run_dir: str
    setup: StateSetup
    train_iter: Any
    checkpoints: RunCheckpoints
    is_main: bool
    lock: rundir.RunDirLock
    writer: MetricsWriter | None = None


def _prepare(cfg: ExperimentConfig) -> _Run:
    """Validates, takes the run dir's lock and builds the state setup; writes nothing else in the run dir."""
    config_lib.validate_tree(cfg)
    guards.preflight(cfg, process_index=jax.process_index(), process_count=jax.process_count())
    run_dir = cfg.resolved_run_dir()
    _check_writable(run_dir)
    lock = rundir.lock_all_processes(run_dir)
    try:
        mesh = sharding_lib.make_mesh(cfg.mesh)
        _check_batch_layout(cfg, mesh)
        train_iter = cfg.data.make_iterator(split="train", process_index=jax.process_index(),
                                            process_count=jax.process_count())
        setup = build_state_setup(cfg, mesh=mesh)
        meta = {"mesh": dict(mesh.shape), "process_count": jax.process_count(), "jax": jax.__version__,
                "global_batch_size": cfg.data.global_batch_size, "seq_len": getattr(cfg.data, "seq_len", None)}
        checkpoints = RunCheckpoints(cfg, run_dir, config_lib.to_dict(cfg), meta)
    except BaseException:
        lock.release()
        raise
    return _Run(cfg, run_dir, setup, train_iter, checkpoints, jax.process_index() == 0, lock)


def _restore_or_init(r: _Run):
    """-> the train state: the latest checkpoint's (data iterator positioned after it), else a fresh init.
    Only once the resume is validated does the run dir's config.json become this run's config."""
    _, state = r.checkpoints.restore_latest(r.setup.abstract_state, r.train_iter)
    if r.is_main:
        rundir.write_config(r.run_dir, config_lib.to_json(r.cfg))
    if state is None:
        state = jax.jit(r.setup.init_fn, out_shardings=r.setup.state_sharding)(jax.random.PRNGKey(r.cfg.trainer.seed))
        if r.is_main:
            n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
            print(f"Starting {r.cfg.name}: {n/1e6:.2f}M parameters, mesh {dict(r.setup.mesh.shape)}, "
                  f"run dir {r.run_dir}", flush=True)
    return state


# ---------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------

class _Throughput:
    """Per-log-interval step time, tokens/s and MFU."""

    def __init__(self, r: _Run, start_step: int):
        cfg, task = r.cfg, r.setup.task
        self.tokens_per_step = cfg.data.global_batch_size * task.tokens_per_example(cfg.data)
        self.flops_per_token = task.flops_per_token(task.tokens_per_example(cfg.data))
        self.peak = peak_flops_per_device()
        self.last_t, self.last_step = time.perf_counter(), start_step

    def row(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        dt = (now - self.last_t) / max(1, step - self.last_step)
        self.last_t, self.last_step = now, step
        row = {"perf/step_time_s": dt, "perf/tokens_per_s": self.tokens_per_step / dt}
        if self.peak:
            row["perf/mfu"] = self.flops_per_token * self.tokens_per_step / dt / (self.peak * jax.device_count())
        return row


def _check_finite(metrics, step: int) -> None:
    if not bool(jax.device_get(metrics["finite"])):
        raise FloatingPointError(
            f"non-finite loss, gradient or updated state at step {step}; nothing was saved from this step "
            f"(set trainer.nan_policy=skip to skip such steps, or lower optimizer.learning_rate)"
        )


def run(cfg: ExperimentConfig) -> dict:
    """Trains `cfg` to cfg.trainer.steps, resuming from the latest complete checkpoint in the run dir.

    Holds the run dir's lock (axlearn_like.rundir) throughout; a checkpoint that does not fit `cfg` fails
    before anything is written, a corrupt one is moved aside (axlearn_like.checkpoint).

    Returns {"start_step", "final_step", "state", "last_train" (the last logged row), "eval" (the last eval
    metrics), plus what the task's final_hook returns (e.g. "sample")}.
    """
    r = _prepare(cfg)
    interrupted = False
    try:
        return _train(r)
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:  # after an error too: wait for the save in flight (no half-written step), flush metrics, unlock
        r.checkpoints.close(interrupted=interrupted)
        if r.writer is not None:
            r.writer.close()
        r.lock.release()


def _train(r: _Run) -> dict:
    cfg = r.cfg
    tcfg, task = cfg.trainer, r.setup.task
    with jax.set_mesh(r.setup.mesh), nn.logical_axis_rules(r.setup.rules):
        train_step, batch_sh = make_train_step(r.setup, cfg)
        eval_step = make_eval_step(r.setup, batch_sh, tcfg.xla_options)
        state = _restore_or_init(r)
        start_step = step = int(jax.device_get(state.step))
        writer = r.writer = MetricsWriter(r.run_dir, resume_step=start_step)
        skips = guards.SkipLedger(tcfg.max_skipped_steps)
        result: dict = {"start_step": start_step}
        bar = None
        if r.is_main and tcfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=tcfg.steps, initial=start_step, desc=cfg.name, dynamic_ncols=True, file=sys.stdout)
        throughput = _Throughput(r, start_step)
        # Fault-injection tests slow the loop down so a kill lands between two known checkpoints.
        fault_sleep = float(os.environ.get("AXL_FAULT_SLEEP_S", "0") or 0)
        with SigtermFlag() as sigterm:
            while step < tcfg.steps:
                state, metrics = train_step(state, global_batch(next(r.train_iter), batch_sh))
                step += 1
                if bar is not None:
                    bar.update(1)
                final = step == tcfg.steps
                want_log = step % tcfg.log_every == 0 or final
                if tcfg.nan_policy == "stop":
                    _check_finite(metrics, step)
                else:
                    skips.add(step, metrics["finite"])
                if want_log:
                    skips.settle()
                    host = to_host(metrics)
                    row = {f"train/{k}": v for k, v in host.items() if k != "finite"}
                    row["train/skipped"] = float(not bool(host["finite"]))
                    row.update(throughput.row(step))
                    writer.write(step, row)
                    if bar is not None:
                        bar.set_postfix(loss=f"{float(host.get('loss', host['objective'])):.3f}",
                                        lr=f"{float(host['lr']):.1e}")
                    result["last_train"] = row
                if tcfg.eval_batches > 0 and (step % tcfg.eval_every == 0 or final):
                    ev = evaluate(cfg, task, state, eval_step, batch_sh)
                    writer.write(step, {f"eval/{k}": v for k, v in ev.items()})
                    result["eval"] = ev
                    if bar is not None:
                        bar.write(f"step {step}: eval {task.describe_eval(ev)}")
                writer.flush()  # a step's metrics are on disk before its checkpoint
                # Read the flag once: a SIGTERM arriving after this point (during the save or the fault sleep) is
                # handled at the end of the next step, so "saved checkpoint at step N" is always true.
                stop = sigterm.set
                if r.checkpoints.should_save(step, final=final, preempted=stop):
                    r.checkpoints.save(step, state, r.train_iter, force=stop)
                if fault_sleep:
                    time.sleep(fault_sleep)
                if stop:
                    if r.is_main:
                        print(f"SIGTERM: saved checkpoint at step {step}; exiting", flush=True)
                    break
        if bar is not None:
            bar.close()
        skips.settle()
        if skips.summary() and r.is_main:
            print(skips.summary(), flush=True)
        if start_step >= tcfg.steps and r.is_main:
            print(f"Already trained to step {start_step} (trainer.steps={tcfg.steps}); "
                  f"pass --set trainer.steps=N with N > {start_step} to train further", flush=True)
        if "eval" not in result and tcfg.eval_batches > 0 and not sigterm.set:
            result["eval"] = evaluate(cfg, task, state, eval_step, batch_sh)
        r.checkpoints.close()
        writer.close()
        result["final_step"] = step
        result["state"] = state
        if not sigterm.set:
            result.update(task.final_hook(cfg, variables_of(state)))
            if "eval" in result and r.is_main:
                print(f"final eval: {task.describe_eval(result['eval'])}", flush=True)
    return result
