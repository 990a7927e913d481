"""tools.bench_scaling on simulated CPU devices with the tiny dense/MoE configs: the tables and JSON carry
the expected rows with finite values, the collective shares come from a parsed trace, and kill-and-resume
on 2 devices reproduces the uninterrupted losses bitwise."""
import gzip
import json
import math
import os
import subprocess
import sys

import pytest

from tests.core import helpers
from tools import bench_scaling, bench_train, benchutil

CACHE = dict(JAX_COMPILATION_CACHE_DIR=helpers.env()["JAX_COMPILATION_CACHE_DIR"],
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


@pytest.fixture(autouse=True)
def _cpu_children(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # never pick up a GPU in these tests
    for k, v in CACHE.items():
        monkeypatch.setenv(k, v)


def _sets(extra=()):
    out = []
    for s in list(helpers.TINY) + list(extra):
        out += ["--set", s]
    return out


def _finite(*xs):
    return all(isinstance(x, (int, float)) and math.isfinite(x) for x in xs)


def test_child_env_turns_multicast_off_and_limits_devices():
    e = bench_scaling.child_env(4, gpus=8)
    assert e["NCCL_NVLS_ENABLE"] == "0" and e["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
    e = bench_scaling.child_env(2, gpus=0)
    assert "--xla_force_host_platform_device_count=2" in e["XLA_FLAGS"] and e["NCCL_NVLS_ENABLE"] == "0"
    assert bench_scaling.usable_counts([1, 2, 4, 8], gpus=2) == [1, 2]


def test_collective_seconds_parses_a_perfetto_trace(tmp_path):
    ev = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
          {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/host:CPU"}},
          {"ph": "X", "pid": 1, "name": "ncclDevKernel_SendRecv", "ts": 0, "dur": 10,
           "args": {"hlo_op": "all-to-all-start.1"}},
          {"ph": "X", "pid": 1, "name": "nccl_all_to_all", "ts": 5, "dur": 10, "args": {}},  # overlaps: counted once
          {"ph": "X", "pid": 1, "name": "ncclDevKernel_AllGather_RING", "ts": 30, "dur": 4},
          {"ph": "X", "pid": 2, "name": "all-to-all", "ts": 0, "dur": 999}]  # host track ignored when devices exist
    d = tmp_path / "plugins" / "profile" / "x"
    d.mkdir(parents=True)
    with gzip.open(d / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": ev}, f)
    secs, ndev = bench_train.collective_seconds(*benchutil.load_perfetto(str(tmp_path)))
    assert ndev == 1
    assert secs["all-to-all"] == pytest.approx(15e-6) and secs["all-gather"] == pytest.approx(4e-6)
    assert secs["reduce-scatter"] == 0.0


def test_weak_and_moe_tables(tmp_path, capsys):
    out = tmp_path / "weak"
    rc = bench_scaling.main(["weak", "--devices", "1,2", "--recipe", "dense_lm", "--preset", "default",
                             "--per-device-batch", "2", "--steps", "2", "--warmup", "0", "--out", str(out)] + _sets())
    text = capsys.readouterr().out
    assert rc == 0, text
    res = json.loads((out / "weak.json").read_text())
    assert [r["devices"] for r in res["rows"]] == [1, 2]
    for r in res["rows"]:
        assert r["mesh"]["fsdp"] == r["devices"] and r["global_batch"] == 2 * r["devices"]
        assert _finite(r["step_s"], r["tokens_per_s_per_device"], r["relative_per_device"], r["final_loss"])
    assert res["rows"][0]["relative_per_device"] == 1.0
    md = (out / "weak.md").read_text()
    assert md.count("\n| 1 |") + md.count("\n| 2 |") == 2 and "per-device vs 1" in md

    out = tmp_path / "moe"
    rc = bench_scaling.main(["moe", "--devices", "2", "--limited-m", "1", "--recipe", "moe", "--preset", "default",
                             "--per-device-batch", "2", "--steps", "1", "--warmup", "0", "--profile-steps", "1",
                             "--out", str(out)] + _sets(["data.seq_len=16"]))
    text = capsys.readouterr().out
    assert rc == 0, text
    res = json.loads((out / "moe.json").read_text())
    assert [r["routing"] for r in res["rows"]] == ["unrestricted", "device-limited M=1"]
    for r in res["rows"]:
        assert r["mesh"]["expert"] == 2
        assert _finite(r["tokens_per_s"], r["maxvio_batch_mean"], r["maxvio_batch_max"], r["final_loss"])
        share = r["collective_share"]["all-to-all"]
        assert 0.0 < share < 1.0 + 1e-6, r  # the expert exchange shows up in the trace
    md = (out / "moe.md").read_text()
    assert "device-limited M=1" in md and "unrestricted" in md


def test_resume_on_two_devices_is_bitwise(tmp_path, capsys):
    rc = bench_scaling.main(["resume", "--devices", "2", "--resume-steps", "5", "--checkpoint-every", "2",
                             "--fault-sleep", "0.3", "--out", str(tmp_path)] + _sets(["data.global_batch_size=4"]))
    text = capsys.readouterr().out
    res = json.loads((tmp_path / "resume.json").read_text())
    assert rc == 0 and res["bitwise_equal"] is True, (res, text)
    assert res["killed"] and 2 <= res["resumed_from"] < 5
    assert res["compared_steps"] == list(range(res["resumed_from"] + 1, 6))
    assert res["losses_reference"] == res["losses_resumed"] and _finite(*res["losses_reference"])
    assert "| yes |" in (tmp_path / "resume.md").read_text()


def test_bench_train_all_only_rejects_an_unknown_entry_before_running_anything(capsys):
    with pytest.raises(SystemExit, match=r"--only dense_lm:nope not in ALL; choose from simplicial:gpu_1b"):
        bench_train.main(["--all", "--only", "dense_lm:gpu_1b,dense_lm:nope"])


def test_bench_train_all_starts_no_backend_before_the_presets_run():
    """The parent of --all must not initialise a device backend before its preset processes run: on a GPU that
    preallocates the parent's share of memory and the presets fail with cudaErrorMemoryAllocation."""
    code = """
import subprocess, sys
from jax._src import xla_bridge
from tools import bench_train
seen = []
def fake_run(cmd, **kw):
    seen.append(xla_bridge.backends_are_initialized())
    return subprocess.CompletedProcess(cmd, 1, "", "preset failed")
subprocess.run = fake_run
bench_train.main(["--all", "--only", "dense_lm:gpu_1b,moe:gpu_0p8b"])
print("SEEN", seen)
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert "SEEN [False, False]" in p.stdout, p.stdout + p.stderr
