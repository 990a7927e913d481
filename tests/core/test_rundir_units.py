"""Unit tests of the run-dir guards (issue 16) that need no training run: the lock, per-array checksums,
metrics superseding, config files with one-line errors, the checkpoint/config mismatch message."""
import json
import os
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from axlearn_like import checkpoint, metrics, rundir
from axlearn_like.config import ConfigError
from tests.core import helpers

HOLD = """
import sys, time
from axlearn_like.rundir import RunDirLock
lock = RunDirLock(sys.argv[1]); lock.acquire(); print("locked", flush=True); time.sleep(300)
"""


def _holder(run_dir):
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=helpers.REPO, env=helpers.env(1),
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_lock_refuses_a_live_holder_and_takes_over_from_a_dead_one(tmp_path):
    p = _holder(tmp_path)
    try:
        with pytest.raises(rundir.RunDirError) as e:
            rundir.RunDirLock(tmp_path).acquire()
        msg = str(e.value)
        assert "\n" not in msg and f"pid {p.pid}" in msg and socket.gethostname() in msg and "--run-dir" in msg
    finally:
        p.kill()
        p.wait()
    # SIGKILL left its lock file behind; the kernel dropped the flock and the pid is gone: provably stale.
    assert os.path.exists(tmp_path / rundir.LOCK_NAME)
    lock = rundir.RunDirLock(tmp_path)
    lock.acquire()
    assert lock.note and f"pid {p.pid}" in lock.note and "no longer running" in lock.note
    held = json.loads((tmp_path / rundir.LOCK_NAME).read_text())
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    lock.release()
    assert not os.path.exists(tmp_path / rundir.LOCK_NAME), "a released lock leaves the run dir as it was"


def test_lock_of_another_host_is_refused_until_its_heartbeat_is_stale(tmp_path):
    path = tmp_path / rundir.LOCK_NAME
    path.write_text(json.dumps({"pid": 4242, "host": "other-host", "started": time.time(), "command": "x"}))
    with pytest.raises(rundir.RunDirError) as e:
        rundir.RunDirLock(tmp_path).acquire()
    assert "other-host" in str(e.value) and "heartbeat" in str(e.value) and str(path) in str(e.value)
    old = time.time() - rundir.STALE_S - 5
    os.utime(path, (old, old))
    lock = rundir.RunDirLock(tmp_path)
    lock.acquire()
    assert "other-host" in lock.note and "no heartbeat" in lock.note
    lock.release()


def test_disabled_lock_is_a_no_op(tmp_path):
    p = _holder(tmp_path)
    try:
        lock = rundir.RunDirLock(tmp_path, enabled=False)  # processes 1.. of a job that process 0 locked
        lock.acquire()
        lock.release()
        assert os.path.exists(tmp_path / rundir.LOCK_NAME)
    finally:
        p.kill()
        p.wait()


def test_checksums_ignore_sharding_and_catch_any_change():
    mesh = jax.make_mesh((8,), ("x",))
    tree = {"a": np.arange(64 * 6, dtype=np.float32).reshape(64, 6) / 7, "b": np.arange(8, dtype=np.int32),
            "c": (np.arange(16) % 3).astype(jnp.bfloat16), "d": np.float32(3.5), "e": np.array([True, False])}
    one = checkpoint.state_checksums(jax.tree.map(jnp.asarray, tree))
    sharded = dict(tree, a=jax.device_put(tree["a"], NamedSharding(mesh, P("x", None))),
                   b=jax.device_put(tree["b"], NamedSharding(mesh, P("x"))))
    assert checkpoint.state_checksums(sharded) == one
    assert set(one) == {"a", "b", "c", "d", "e"} and all(len(v) == 16 for v in one.values())
    flipped = tree["a"].copy()
    flipped.view(np.uint32)[17, 3] ^= 1 << 7  # one bit of one element
    assert checkpoint.state_checksums(dict(tree, a=flipped))["a"] != one["a"]
    swapped = tree["b"].copy()
    swapped[[2, 5]] = swapped[[5, 2]]  # same values, other places
    assert checkpoint.state_checksums(dict(tree, b=swapped))["b"] != one["b"]


def test_supersede_rows_moves_rows_past_the_resume_step(tmp_path):
    rows = [{"step": s, "train/loss": float(s)} for s in range(1, 9)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert metrics.supersede_rows(str(tmp_path), 5) == 3
    kept = metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))
    moved = metrics.read_jsonl(str(tmp_path / metrics.SUPERSEDED_NAME))
    assert [r["step"] for r in kept] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in moved] == [6, 7, 8] and all(r["superseded_at_resume"] == 5 for r in moved)
    assert metrics.supersede_rows(str(tmp_path), 5) == 0


def test_metrics_writer_merges_a_step_into_one_row(tmp_path):
    with metrics.MetricsWriter(str(tmp_path), resume_step=0) as w:
        w.write(1, {"train/loss": 1.0})
        w.write(2, {"train/loss": 0.5})
        w.write(2, {"eval/loss": 0.7})
    rows = metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert rows == [{"step": 1, "train/loss": 1.0}, {"step": 2, "train/loss": 0.5, "eval/loss": 0.7}]


def test_config_files_fail_in_one_line_naming_the_file(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text('{"_type": "axlearn_like.trainer:ExperimentConfig", "name": ')
    for path, words in [(bad, ["not valid JSON", str(bad)]), (tmp_path / "nope.json", ["does not exist"])]:
        with pytest.raises((ConfigError, FileNotFoundError)) as e:
            rundir.read_config_file(str(path))
        assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)
    from axlearn_like import config as config_lib
    from recipes import dense_lm

    d = config_lib.to_dict(dense_lm.config())
    d["model"]["_type"] = "models.nonexistent:DecoderConfig"
    bad.write_text(json.dumps(d))
    with pytest.raises(ConfigError) as e:
        rundir.read_config_file(str(bad))
    assert "models.nonexistent:DecoderConfig" in str(e.value) and str(bad) in str(e.value) and "\n" not in str(e.value)


def test_mismatch_message_names_arrays_and_config_fields():
    from axlearn_like import config as config_lib
    from recipes import dense_lm

    saved_cfg = config_lib.apply_overrides(dense_lm.config(), ["model.d_model=64"])
    cfg = config_lib.apply_overrides(dense_lm.config(), ["model.d_model=96"])
    a = {"params.embed.embedding": ((258, 64), "float32"), "step": ((), "int32")}
    b = {"params.embed.embedding": ((258, 96), "float32"), "step": ((), "int32")}
    with pytest.raises(checkpoint.CheckpointMismatchError) as e:
        checkpoint.check_fits(a, b, where="checkpoint step 4 in X", saved_config=config_lib.to_dict(saved_cfg),
                              config=config_lib.to_dict(cfg), advice="; fix it")
    msg = str(e.value)
    assert "\n" not in msg and "params.embed.embedding saved float32[258, 64] vs float32[258, 96]" in msg
    assert "model.d_model (64 -> 96)" in msg and "1 of 2 arrays" in msg and msg.endswith("; fix it")
    checkpoint.check_fits(a, dict(a), where="x")  # equal: no error


def test_lock_without_flock_trusts_a_live_pid_and_takes_over_a_reused_one(tmp_path):
    """A filesystem without flock (or a lock file copied in): the pid and its start time decide."""
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        info = {"pid": sleeper.pid, "host": socket.gethostname(), "started": time.time(), "command": "sleep 60",
                "proc_start": rundir._process_start(sleeper.pid)}
        (tmp_path / rundir.LOCK_NAME).write_text(json.dumps(info))
        with pytest.raises(rundir.RunDirError) as e:
            rundir.RunDirLock(tmp_path).acquire()
        assert f"pid {sleeper.pid}" in str(e.value) and "the process runs" in str(e.value), str(e.value)
        # The same pid with another start time is another process now: the recorded holder is gone.
        (tmp_path / rundir.LOCK_NAME).write_text(json.dumps(dict(info, proc_start="1")))
        lock = rundir.RunDirLock(tmp_path)
        lock.acquire()
        assert "no longer running" in lock.note
        lock.release()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_lock_heartbeat_keeps_the_lock_fresh(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir, "HEARTBEAT_S", 0.05)
    lock = rundir.RunDirLock(tmp_path)
    lock.acquire()
    try:
        old = time.time() - rundir.STALE_S - 5
        os.utime(tmp_path / rundir.LOCK_NAME, (old, old))
        deadline = time.time() + 10
        while time.time() < deadline and os.path.getmtime(tmp_path / rundir.LOCK_NAME) < time.time() - 60:
            time.sleep(0.02)
        assert os.path.getmtime(tmp_path / rundir.LOCK_NAME) > time.time() - 60, "no heartbeat"
    finally:
        lock.release()


JOB = """
import sys
from axlearn_like import launch, rundir
launch.initialize(sys.argv[1], 2, int(sys.argv[2]))
import time
import jax
from jax.experimental import multihost_utils
for run_dir in sys.argv[3:]:
    if jax.process_index() == 0:
        time.sleep(1)  # process 1 comes first: it must leave the lock to process 0
    try:
        lock = rundir.lock_all_processes(run_dir)
    except rundir.RunDirError as e:
        print(f"refused {e}", flush=True)
    else:
        multihost_utils.sync_global_devices("both hold the job's lock")
        print(f"locked {lock._fd is not None}", flush=True)
        lock.release()
"""


@pytest.mark.multiprocess
def test_processes_of_one_job_share_the_lock_and_all_fail_on_a_taken_one(tmp_path):
    """Process 0 locks for the job (process 1 must not contend for it); a lock held elsewhere fails every process
    of the job with the same line."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    free, taken = tmp_path / "free", tmp_path / "taken"
    holder = rundir.RunDirLock(taken)  # this test process: another job on `taken`
    holder.acquire()
    procs = []
    try:
        procs = [subprocess.Popen([sys.executable, "-c", JOB, f"localhost:{port}", str(i), str(free), str(taken)],
                                  cwd=helpers.REPO, env=helpers.env(1), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for i in range(2)]
        outs = [p.communicate(timeout=90) for p in procs]
    finally:
        holder.release()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    lines = [[ln for ln in out.splitlines() if ln.startswith(("locked", "refused"))] for out, _ in outs]
    assert [ls[0] for ls in lines] == ["locked True", "locked False"], lines
    assert lines[0][1] == lines[1][1] and lines[0][1].startswith("refused ") and f"pid {os.getpid()}" in lines[0][1]
    assert not os.path.exists(free / rundir.LOCK_NAME)


def test_failed_restore_logs_no_asyncio_shutdown_wall(tmp_path):
    """orbax's cancelled reads can fail during asyncio.run()'s shutdown and asyncio logs each with its TensorStore
    spec; a failed restore reports one line only."""
    import logging

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Keep()
    logging.getLogger("asyncio").addHandler(handler)
    try:
        ck = checkpoint.Checkpointer(str(tmp_path), checkpoint.CheckpointConfig(async_save=False))

        def restore(*a, **kw):  # what asyncio does when a cancelled read fails while the loop shuts down
            logging.getLogger("asyncio").error("unhandled exception during asyncio.run() shutdown\ntask: <Task ...>")
            raise ValueError("FAILED_PRECONDITION: Error reading \"params.w/0\" in OCDBT database at local file "
                             "\"/x/\": Truncated Zstd-compressed stream [source locations='a.cc:1']")

        state = {"w": jnp.arange(4.0)}
        ck.save(1, state, None, {}, {}, force=True)
        ck.wait()
        ck.manager.restore = restore
        with pytest.raises(checkpoint.CorruptCheckpointError) as e:
            ck.restore(1, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state))
        ck.close()
        logging.getLogger("asyncio").error("outside a restore: kept")
    finally:
        logging.getLogger("asyncio").removeHandler(handler)
    assert records == ["outside a restore: kept"], records
    msg = str(e.value)
    assert msg == 'its arrays do not read back (ValueError: FAILED_PRECONDITION: Error reading "params.w/0": ' \
                  'Truncated Zstd-compressed stream)', msg


def test_one_line_names_the_root_cause():
    try:
        try:
            raise ValueError('DATA_LOSS: Error reading "opt_state.mu/0.0" in OCDBT database at local file "/r/": '
                             "Unknown frame descriptor [source locations='x.cc:2\\ny.cc:3']")
        except ValueError as inner:
            raise Exception("Encountered error while reading array index: (slice(0, 4, 1),). See full TensorStore "
                            "details: <bound method spec of TensorStore({\n  'base': {...\n})>.") from inner
    except Exception as e:
        line = checkpoint.one_line(e)
    assert line == 'ValueError: DATA_LOSS: Error reading "opt_state.mu/0.0": Unknown frame descriptor', line


def test_too_small_split_advice_offers_only_fixes_that_can_work(tmp_path):
    """An eval split of 3 tokens fits no batch shape: a bound below 1 ("seq_len <= 0", "global_batch_size <= 0")
    is no advice."""
    from axlearn_like.data import DataConfig, make_iterator

    for i in range(4):
        (tmp_path / f"f{i}.txt").write_text("ab" if i else "x" * 5000)
    cfg = DataConfig(source="text", paths=(str(tmp_path),), seq_len=16, global_batch_size=8, eval_fraction=0.25, seed=0)
    with pytest.raises(ConfigError) as e:
        make_iterator(cfg, split="eval")
    msg = str(e.value)
    assert "\n" not in msg and "the eval split has 3 tokens" in msg and "<= 0" not in msg, msg
    assert "raise data.eval_fraction (now 0.25) or add data" in msg, msg


def test_unreadable_run_config_names_the_checkpoint_copy(tmp_path):
    from axlearn_like import cli
    from recipes import dense_lm

    (tmp_path / "config.json").write_text('{"_type": "axlearn_like.trainer:ExperimentConfig", "name": ')
    copy = tmp_path / "checkpoints" / "8" / "config" / "metadata"
    copy.parent.mkdir(parents=True)
    copy.write_text("{}")
    with pytest.raises(ConfigError) as e:
        cli.build_config(dense_lm.config, ["--run-dir", str(tmp_path)], prog="dense_lm")
    msg = str(e.value)
    assert "\n" not in msg and f"{tmp_path}/config.json is not valid JSON" in msg, msg
    assert msg.endswith(f"its latest checkpoint keeps a copy: --config {copy}"), msg
