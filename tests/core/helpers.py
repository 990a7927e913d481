"""Shared pieces for the trainer tests: a tiny dense-LM recipe and subprocess runners."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TINY = [
    "model.d_model=64", "model.num_layers=2", "model.ffn_pattern.mlp.mlp_dim=128", "model.layer_pattern.*.num_heads=4",
    "model.layer_pattern.*.num_kv_heads=2", "model.layer_pattern.*.head_dim=16", "data.seq_len=32",
    "data.global_batch_size=8", "data.max_bytes=300000", "model.sample.tokens=0", "trainer.progress=false",
    "optimizer.decay_steps=40", "optimizer.warmup_steps=4", "trainer.eval_batches=2",
]


def tiny_config(extra=()):
    from axlearn_like import config as config_lib
    from recipes import dense_lm

    return config_lib.apply_overrides(dense_lm.config(), list(TINY) + list(extra))


def recipe_cmd(run_dir, extra=(), recipe="dense_lm"):
    args = [sys.executable, "-m", f"recipes.{recipe}", "--run-dir", str(run_dir)]
    for s in list(TINY) + list(extra):
        args += ["--set", s]
    return args


def env(devices: int = 1, **more):
    e = dict(os.environ)
    e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    e["JAX_PLATFORMS"] = "cpu"
    e["PYTHONPATH"] = REPO
    # Subprocess runs of the same tiny model share compiled programs through JAX's persistent cache.
    e.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "axl_test_jax_cache"))
    e.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    e.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    e.update({k: str(v) for k, v in more.items()})
    return e


def run(cmd, devices=1, timeout=300, **more) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=env(devices, **more), capture_output=True, text=True, timeout=timeout)


def run_tool(tool: str, *args, **more) -> str:
    """`python -m tools.<tool> args` in a subprocess (extra env vars in `more`); asserts it exits 0 -> stdout."""
    r = run([sys.executable, "-m", f"tools.{tool}", *map(str, args)], timeout=600, **more)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    return r.stdout


def assert_png(path) -> None:
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n", path


def losses(run_dir) -> dict[int, float]:
    """step -> train loss from metrics.jsonl (the last row wins if a step was logged twice)."""
    from axlearn_like.metrics import train_losses

    return train_losses(run_dir)


def raw_state(run_dir, step):
    """The saved TrainState of a step as nested numpy arrays (no model needed)."""
    import orbax.checkpoint as ocp

    path = os.path.join(run_dir, "checkpoints", str(step), "state")
    return ocp.StandardCheckpointer().restore(path)
