"""Exact auto-resume: kill (SIGKILL / SIGTERM) a run after a checkpoint, rerun the same command, compare bitwise."""
import os
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from tests.core import helpers

N = 16
EXTRA = ["trainer.steps=16", "checkpoint.every_steps=4", "trainer.log_every=1", "trainer.eval_batches=0"]


def _complete_steps(run_dir):
    d = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(d):
        return []
    return sorted(int(x) for x in os.listdir(d) if x.isdigit())


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run_a")
    r = helpers.run(helpers.recipe_cmd(run_dir, EXTRA))
    assert r.returncode == 0, r.stderr[-3000:]
    return run_dir


def _assert_same_as_reference(ref_dir, run_dir, resumed_from):
    a, b = helpers.losses(ref_dir), helpers.losses(run_dir)
    assert sorted(a) == list(range(1, N + 1))
    after = [s for s in range(resumed_from + 1, N + 1)]
    assert after, "the kill happened too late to test a resume"
    for s in after:
        assert a[s] == b[s], f"step {s}: loss {b[s]!r} after resume != {a[s]!r} uninterrupted"
    sa, sb = helpers.raw_state(ref_dir, N), helpers.raw_state(run_dir, N)
    la, lb = jax.tree.leaves(sa), jax.tree.leaves(sb)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_kill_and_resume_is_bitwise_exact(reference_run, tmp_path, sig):
    run_dir = tmp_path / "run_b"
    cmd = helpers.recipe_cmd(run_dir, EXTRA)
    proc = subprocess.Popen(cmd, cwd=helpers.REPO, env=helpers.env(1, AXL_FAULT_SLEEP_S=0.25),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and 4 not in _complete_steps(run_dir):
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "run finished before it could be killed:\n" + proc.stdout.read()[-2000:]
    time.sleep(0.3)
    proc.send_signal(sig)
    out = proc.communicate(timeout=120)[0]
    if sig == signal.SIGTERM:
        assert proc.returncode == 0, out[-2000:]
        assert "SIGTERM: saved checkpoint" in out
    saved = _complete_steps(run_dir)
    assert saved and max(saved) < N, saved
    r = helpers.run(cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"Resuming from checkpoint at step {max(saved)}" in r.stdout
    _assert_same_as_reference(reference_run, run_dir, max(saved))


def test_corrupt_latest_checkpoint_falls_back(tmp_path):
    run_dir = tmp_path / "run_c"
    r = helpers.run(helpers.recipe_cmd(run_dir, ["trainer.steps=8", "checkpoint.every_steps=4",
                                                 "trainer.eval_batches=0"]))
    assert r.returncode == 0, r.stderr[-3000:]
    state_dir = os.path.join(run_dir, "checkpoints", "8", "state")
    files = [os.path.join(dp, f) for dp, _, fs in os.walk(state_dir) for f in fs]
    biggest = max(files, key=os.path.getsize)
    with open(biggest, "r+b") as f:
        f.truncate(os.path.getsize(biggest) // 3)
    r = helpers.run(helpers.recipe_cmd(run_dir, ["trainer.steps=10", "checkpoint.every_steps=4",
                                                 "trainer.eval_batches=0"]))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "falling back" in r.stdout
    assert "Resuming from checkpoint at step 4" in r.stdout


def test_restore_on_other_mesh_continues(tmp_path):
    """Saved on 8 devices (fsdp=8), restored on 4 (fsdp=4): the next losses agree to float tolerance with a
    continuation on 8. (Restoring onto 1 process from a 2-process save: tests/multiprocess.)"""
    import shutil

    base = ["checkpoint.every_steps=4", "trainer.log_every=1", "trainer.eval_batches=0", "checkpoint.async_save=false"]
    src = tmp_path / "src"
    r = helpers.run(helpers.recipe_cmd(src, base + ["trainer.steps=4", "mesh.data=1", "mesh.fsdp=-1"]), devices=8)
    assert r.returncode == 0, r.stderr[-3000:]
    results = {}
    for devices in (8, 4):
        d = tmp_path / f"on{devices}"
        shutil.copytree(src, d)
        r = helpers.run(helpers.recipe_cmd(d, base + ["trainer.steps=6", "mesh.data=1", "mesh.fsdp=-1"]),
                        devices=devices)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "Resuming from checkpoint at step 4" in r.stdout
        results[devices] = helpers.losses(d)
    for devices in (4,):
        for s in (5, 6):
            np.testing.assert_allclose(results[devices][s], results[8][s], rtol=2e-5)


def test_inspect_checkpoint_lists_everything(reference_run):
    import io

    from tools import inspect_checkpoint

    buf = io.StringIO()
    info = inspect_checkpoint.inspect(os.path.relpath(reference_run), out=buf)  # relative, as users type it
    text = buf.getvalue()
    assert info["step"] == N and N in info["steps"]
    assert any("params" in name for name, *_ in info["arrays"])
    assert info["config"]["name"] == "dense_lm" and info["config"]["trainer"]["steps"] == N
    assert info["data"], "data iterator state missing"
    assert "data iterator state" in text and "float32" in text


def test_load_for_research(reference_run):
    from axlearn_like import checkpoint

    task, variables, cfg = checkpoint.load(str(reference_run))
    assert cfg.trainer.steps == N
    saved = helpers.raw_state(reference_run, N)
    a = jax.tree.leaves(variables["params"])
    b = jax.tree.leaves(saved["params"])
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_safetensors_round_trip(reference_run, tmp_path):
    from safetensors.numpy import load_file

    from axlearn_like import checkpoint
    from tools import export_safetensors, import_safetensors

    out = tmp_path / "st"
    export_safetensors.export(str(reference_run), str(out))
    flat = load_file(str(out / "model.safetensors"))
    _, variables, _ = checkpoint.load(str(reference_run))
    want = export_safetensors.flatten(jax.tree.map(np.asarray, variables["params"]))
    assert sorted(flat) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(flat[k], want[k])
    import_safetensors.import_(str(out), str(tmp_path / "imported"), step=0)
    _, back, _ = checkpoint.load(str(tmp_path / "imported"))
    for x, y in zip(jax.tree.leaves(variables["params"]), jax.tree.leaves(back["params"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
