"""Scale-out on jax.distributed (CPU, gloo): 2 processes x 4 devices against 1 process x 8 devices.

Every subprocess gets XLA_FLAGS=--xla_force_host_platform_device_count=<devices> and JAX_PLATFORMS=cpu.
Bitwise comparisons use the same collective implementation on both sides: a 1-process run also joins a
(1-process) jax.distributed job, so its all-reduces go through gloo like the 2-process run's. With XLA's
in-process CPU collectives instead, the sums are ordered differently and agree only to float rounding.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import time

import jax
import numpy as np
import pytest

from tests.core import helpers

pytestmark = [pytest.mark.multiprocess, pytest.mark.xdist_group("multiprocess")]

N = 8
EXTRA = ["trainer.steps=8", "checkpoint.every_steps=4", "trainer.log_every=1", "trainer.eval_batches=0",
         "checkpoint.max_to_keep=5"]
TWO = ["mesh.dcn_data=2"]  # 2-process runs use the hybrid mesh: data spans the processes (granules)
HEARTBEAT_S = 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(run_dir, devices, **more):
    # A compilation cache shared by the runs of this module: restarts reuse the first runs' executables.
    cache = os.path.join(os.path.dirname(run_dir), "jax_cache")
    return helpers.env(devices, AXL_HEARTBEAT_TIMEOUT_S=HEARTBEAT_S, JAX_COMPILATION_CACHE_DIR=cache,
                       JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0, JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0,
                       **more)


def _start(run_dir, num_processes, devices, extra=(), **env):
    """Starts one job of `num_processes` processes on a fresh localhost coordinator port; returns the Popens."""
    port = _free_port()
    procs = []
    for i in range(num_processes):
        cmd = helpers.recipe_cmd(run_dir, EXTRA + list(extra)) + [
            "--coordinator", f"localhost:{port}", "--num-processes", str(num_processes), "--process-id", str(i)]
        log = open(f"{run_dir}.p{i}.log", "w")
        procs.append(subprocess.Popen(cmd, cwd=helpers.REPO, env=_env(run_dir, devices, **env),
                                      stdout=log, stderr=subprocess.STDOUT, text=True))
    return procs


def _log(run_dir, i=0) -> str:
    with open(f"{run_dir}.p{i}.log") as f:
        return f.read()


def _wait_ok(run_dir, procs, timeout=240):
    for i, p in enumerate(procs):
        rc = p.wait(timeout=timeout)
        assert rc == 0, f"process {i} exited {rc}:\n" + _log(run_dir, i)[-3000:]


def _steps(run_dir):
    d = os.path.join(run_dir, "checkpoints")
    return sorted(int(x) for x in os.listdir(d) if x.isdigit()) if os.path.isdir(d) else []


def _raw_state(run_dir, step):
    """A saved TrainState as host arrays, whatever process count wrote it (targets on one local device)."""
    import orbax.checkpoint as ocp

    path = os.path.join(run_dir, "checkpoints", str(step), "state")
    ck = ocp.StandardCheckpointer()
    tree = ck.metadata(path)
    tree = getattr(tree, "item_metadata", tree)
    tree = getattr(tree, "tree", tree)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return ck.restore(path, jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), tree))


def _assert_bitwise(ref_dir, run_dir, steps, final_step=N):
    a, b = helpers.losses(ref_dir), helpers.losses(run_dir)
    for s in steps:
        assert a[s] == b[s], f"step {s}: loss {b[s]!r} != {a[s]!r} (reference)"
    la = jax.tree.leaves(_raw_state(ref_dir, final_step))
    lb = jax.tree.leaves(_raw_state(run_dir, final_step))
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Started together: the uninterrupted 2 x 4 run, the 1 x 8 run (both on gloo), and a 2 x 4 run whose
    process 1 gets SIGKILLed once checkpoint 4 is complete (slowed down so the kill lands before step 8)."""
    root = tmp_path_factory.mktemp("mp")
    two, one, killed = root / "two", root / "one", root / "killed"
    p2 = _start(two, 2, 4, extra=TWO)
    p1 = _start(one, 1, 8)
    pk = _start(killed, 2, 4, extra=TWO, AXL_FAULT_SLEEP_S=1.0)
    kill = {}
    deadline = time.time() + 300
    while time.time() < deadline and "rc" not in kill:
        if "t" not in kill and any(p.poll() is not None for p in pk):
            break  # ended before the kill; the test reports it
        if "t" not in kill and 4 in _steps(killed):
            kill["alive"] = all(p.poll() is None for p in pk)
            pk[1].send_signal(signal.SIGKILL)
            kill["t"] = time.time()
        if "t" in kill and pk[0].poll() is not None:
            kill["rc"], kill["took"] = pk[0].returncode, time.time() - kill["t"]
        if "t" in kill and time.time() - kill["t"] > 90:
            break
        time.sleep(0.1)
    for p in pk:
        if p.poll() is None:
            p.kill()
        p.wait()
    _wait_ok(two, p2)
    _wait_ok(one, p1)
    return {"two": two, "one": one, "root": root, "killed": killed, "kill": kill}


def test_two_processes_match_one_process_bitwise(runs):
    two = runs["two"]
    assert sorted(helpers.losses(two)) == list(range(1, N + 1))
    assert "multi-process: 2 processes, 8 devices (4 per process)" in _log(two)
    meta = json.load(open(os.path.join(two, "checkpoints", str(N), "meta", "metadata")))
    assert meta["process_count"] == 2
    assert sorted(os.listdir(os.path.join(two, "checkpoints", str(N), "data"))) == [
        "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
    _assert_bitwise(runs["one"], two, range(1, N + 1))


def test_sigkill_one_process_then_resume_exactly(runs):
    run_dir, kill = runs["killed"], runs["kill"]
    assert kill.get("alive"), "a process ended before the kill:\n" + _log(run_dir, 0)[-2000:]
    assert "rc" in kill, "process 0 still running 90 s after process 1 was killed"
    assert kill["took"] < 60, kill
    assert kill["rc"] != 0, "process 0 exited 0 after its peer died"
    log = _log(run_dir, 0)
    assert "detected fatal errors" in log and "another task died" in log, log[-2000:]
    saved = _steps(run_dir)
    assert saved and max(saved) < N, saved
    print(f"process 0 exited {kill['rc']} {kill['took']:.1f} s after the kill; resuming from step {max(saved)}")

    procs = _start(run_dir, 2, 4, extra=TWO)
    _wait_ok(run_dir, procs)
    assert f"Resuming from checkpoint at step {max(saved)}" in _log(run_dir)
    _assert_bitwise(runs["two"], run_dir, range(max(saved) + 1, N + 1))


def test_two_process_checkpoint_restores_in_one_process(runs):
    """Model state and the (process-count independent) iterator position map onto 1 process exactly."""
    run_dir = runs["root"] / "onto_one"
    shutil.copytree(runs["two"], run_dir, ignore=shutil.ignore_patterns("metrics.jsonl", "tensorboard"))
    shutil.rmtree(run_dir / "checkpoints" / str(N))
    procs = _start(run_dir, 1, 8)
    _wait_ok(run_dir, procs)
    assert "Resuming from checkpoint at step 4" in _log(run_dir)
    _assert_bitwise(runs["two"], run_dir, range(5, N + 1))


def test_unmappable_data_state_is_one_line_error_then_restore_data_false(runs):
    run_dir = runs["root"] / "unmappable"
    shutil.copytree(runs["two"], run_dir, ignore=shutil.ignore_patterns("metrics.jsonl", "tensorboard"))
    shutil.rmtree(run_dir / "checkpoints" / str(N))
    data = run_dir / "checkpoints" / "4" / "data"
    (data / "process_1-of-2.json").write_text(json.dumps({"next_index": 4, "file_offset": 123}))
    t0 = time.time()
    r = subprocess.run(helpers.recipe_cmd(run_dir, EXTRA), cwd=helpers.REPO, env=_env(run_dir, 8), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-3000:]
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "checkpoint.restore_data=false" in err[0] and "2 process(es)" in err[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert time.time() - t0 < 120

    procs = _start(run_dir, 1, 8, extra=["checkpoint.restore_data=false"])
    _wait_ok(run_dir, procs)
    assert "Resuming from checkpoint at step 4" in _log(run_dir)
    # The iterator restarts at batch `step`: exact for the map-style pipeline.
    _assert_bitwise(runs["two"], run_dir, range(5, N + 1))
