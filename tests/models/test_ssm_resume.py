"""recipes.mamba2: the state-passing carry and the fitted-noise statistics survive SIGKILL + resume bitwise,
and a post-training stage can switch `initial_state` when resuming the same run directory."""
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests.core import helpers

N = 8
TINY = [
    "model.d_model=32", "model.num_layers=1", "model.ffn_pattern.mlp.mlp_dim=32",
    "model.layer_pattern.mamba2.d_state=8", "model.layer_pattern.mamba2.head_dim=16",
    "model.layer_pattern.mamba2.chunk_size=16", "data.seq_len=32", "data.global_batch_size=4", "data.max_bytes=100000",
    "model.sample.tokens=0", "trainer.progress=false", "trainer.eval_batches=0", "optimizer.warmup_steps=2",
    "trainer.log_every=1", "trainer.eval_every=1000", "checkpoint.every_steps=4",
]


def _recipe(run_dir, extra):
    args = [sys.executable, "-m", "recipes.mamba2", "--run-dir", str(run_dir)]
    for s in TINY + list(extra):
        args += ["--set", s]
    return args


def _steps(run_dir):
    d = os.path.join(run_dir, "checkpoints")
    return sorted(int(x) for x in os.listdir(d) if x.isdigit()) if os.path.isdir(d) else []


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("m2_ref")
    r = helpers.run(_recipe(run_dir, [f"trainer.steps={N}", "model.layer_pattern.mamba2.initial_state=state_passing"]))
    assert r.returncode == 0, r.stderr[-3000:]
    return run_dir


def test_state_passing_kill_and_resume_bitwise(reference, tmp_path):
    run_dir = tmp_path / "killed"
    cmd = _recipe(run_dir, [f"trainer.steps={N}", "model.layer_pattern.mamba2.initial_state=state_passing"])
    proc = subprocess.Popen(cmd, cwd=helpers.REPO, env=helpers.env(1, AXL_FAULT_SLEEP_S=0.5),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and 4 not in _steps(run_dir) and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "run finished before it could be killed:\n" + proc.stdout.read()[-2000:]
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    saved = _steps(run_dir)
    assert saved and max(saved) < N, saved
    r = helpers.run(cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"Resuming from checkpoint at step {max(saved)}" in r.stdout
    a, b = helpers.losses(reference), helpers.losses(run_dir)
    for s in range(max(saved) + 1, N + 1):
        assert a[s] == b[s], f"step {s}: {b[s]!r} after resume != {a[s]!r}"
    sa, sb = helpers.raw_state(reference, N), helpers.raw_state(run_dir, N)
    for part in ("carry", "stats", "params"):
        la, lb = jax.tree.leaves(sa[part]), jax.tree.leaves(sb[part])
        assert la and len(la) == len(lb), part
        for x, y in zip(la, lb):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    carry = jax.tree.leaves(sa["carry"])[0]
    assert carry.shape[0] == 4 and np.abs(carry).max() > 0  # [global batch, H, P, N], written by training
    count = [x for x in jax.tree.leaves(sa["stats"]) if np.ndim(x) == 0]
    assert count and float(count[0]) == N  # fitted-noise moments tracked once per step (grad_accum 1)


def test_post_training_stage_switches_mode_on_resume(reference, tmp_path):
    """Stage 2 of the lengthgen recipe: same run dir, more steps, initial_state=fitted_noise."""
    run_dir = tmp_path / "stage2"
    shutil.copytree(reference, run_dir)
    r = helpers.run(_recipe(run_dir, [f"trainer.steps={N + 2}",
                                      "model.layer_pattern.mamba2.initial_state=fitted_noise"]))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"Resuming from checkpoint at step {N}" in r.stdout
    losses = helpers.losses(run_dir)
    assert np.isfinite(losses[N + 2])
    before, after = helpers.raw_state(reference, N), helpers.raw_state(run_dir, N + 2)
    count = [x for x in jax.tree.leaves(after["stats"]) if np.ndim(x) == 0]
    assert float(count[0]) == N + 2
    assert not np.array_equal(jax.tree.leaves(before["carry"])[0], jax.tree.leaves(after["carry"])[0])
