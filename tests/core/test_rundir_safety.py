"""Issue 16: a run directory's checkpoints are never silently lost or replaced. Each test runs the recipe as a
user would (a subprocess per command) on a copy of one small reference run (checkpoints 4, 6, 8)."""
import glob
import hashlib
import json
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

BASE = ["checkpoint.every_steps=2", "trainer.log_every=1", "trainer.eval_batches=0"]
EXTRA = BASE + ["trainer.steps=8"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    r = helpers.run(helpers.recipe_cmd(run_dir, EXTRA))
    assert r.returncode == 0, r.stderr[-3000:]
    assert _steps(run_dir) == [4, 6, 8]
    return run_dir


def _copy(reference, tmp_path, name="run"):
    d = tmp_path / name
    shutil.copytree(reference, d)
    return d


def _steps(run_dir):
    d = os.path.join(run_dir, "checkpoints")
    return sorted(int(x) for x in os.listdir(d) if x.isdigit())


def _snapshot(root) -> dict[str, str]:
    """relative path -> sha256 of every file (and '<dir>/' for every directory) under root."""
    out = {}
    for dp, dns, fns in os.walk(root):
        for n in dns:
            out[os.path.relpath(os.path.join(dp, n), root) + "/"] = ""
        for n in fns:
            with open(os.path.join(dp, n), "rb") as f:
                out[os.path.relpath(os.path.join(dp, n), root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _error(r) -> str:
    """The one `error: ...` line of a failed command; no traceback anywhere."""
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, r.stderr[-3000:]
    return lines[0]


def _largest_array_file(step_dir):
    files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
    return max(files, key=os.path.getsize)


def _all_leaves_finite(run_dir, step) -> bool:
    leaves = jax.tree.leaves(helpers.raw_state(run_dir, step))
    return all(np.all(np.isfinite(np.asarray(x))) for x in leaves if np.issubdtype(np.asarray(x).dtype, np.floating))


# -- item 1: a changed config never retrains over a run ------------------------------------------------------

@pytest.mark.parametrize("change,field,saved", [
    ("model.d_model=128", "model.d_model (64 -> 128)", "config.json"),
    # without RUN_DIR/config.json (deleted, or a run dir of older code) the advice names the checkpoint's copy
    ("optimizer.param_dtype=bfloat16", "optimizer.param_dtype (float32 -> bfloat16)", "checkpoints/8/config/metadata"),
])
def test_changed_structure_on_resume_fails_and_touches_nothing(reference, tmp_path, change, field, saved):
    d = _copy(reference, tmp_path)
    if saved != "config.json":
        os.remove(d / "config.json")
    before = _snapshot(d)
    r = helpers.run(helpers.recipe_cmd(d, EXTRA + [change, "trainer.steps=12"]))
    err = _error(r)
    assert "does not fit this config" in err and field in err, err
    assert f"--config {d}/{saved} --run-dir {d}," in err, err
    assert _snapshot(d) == before, "a refused resume must leave every file byte-identical"


def test_import_then_recipe_continues_the_import(reference, tmp_path):
    """The recipe's defaults (d_model 192) differ from the imported model (64): the run dir's saved config wins."""
    from tools import export_safetensors

    export_safetensors.export(str(reference), str(tmp_path / "st"))
    imported = tmp_path / "imported"
    r = helpers.run([sys.executable, "-m", "tools.import_safetensors", str(tmp_path / "st"), str(imported)])
    assert r.returncode == 0, r.stderr[-3000:]
    cmd = [sys.executable, "-m", "recipes.dense_lm", "--run-dir", str(imported), "--set", "trainer.steps=2",
           "--set", "trainer.progress=false", "--set", "trainer.eval_batches=0", "--set", "model.sample.tokens=0"]
    r = helpers.run(cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Resuming from checkpoint at step 0" in r.stdout, r.stdout[-2000:]
    saved = json.loads((imported / "config.json").read_text())
    assert saved["model"]["d_model"] == 64 and saved["trainer"]["steps"] == 2
    assert _steps(imported) == [0, 2]


def test_config_flag_reruns_a_saved_config(reference, tmp_path):
    new = tmp_path / "new"
    r = helpers.run([sys.executable, "-m", "recipes.dense_lm", "--config", str(reference / "config.json"),
                     "--run-dir", str(new), "--set", "trainer.steps=2"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Starting dense_lm" in r.stdout
    a, b = (json.loads(p.read_text()) for p in (reference / "config.json", new / "config.json"))
    assert b["model"] == a["model"] and b["trainer"]["steps"] == 2 and b["run_dir"] == str(new)
    r = helpers.run([sys.executable, "-m", "recipes.dense_lm", "--config", str(tmp_path / "missing.json")])
    assert "missing.json" in _error(r)


# -- item 2: one job per run dir -------------------------------------------------------------------------------

def test_second_job_on_a_run_dir_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    cmd = helpers.recipe_cmd(run_dir, BASE + ["trainer.steps=12"])
    first = subprocess.Popen(cmd, cwd=helpers.REPO, env=helpers.env(1, AXL_FAULT_SLEEP_S=0.5),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not os.path.exists(run_dir / "metrics.jsonl") and first.poll() is None:
            time.sleep(0.1)
        assert first.poll() is None, first.communicate()[1][-3000:]
        second = helpers.run(helpers.recipe_cmd(run_dir, BASE + ["trainer.steps=12"]))
        err = _error(second)
        assert f"is in use by pid {first.pid}" in err and "run.lock" in err, err
        out, errs = first.communicate(timeout=240)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, errs[-3000:]
    rows = [json.loads(ln)["step"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(1, 13)), rows
    assert not os.path.exists(run_dir / "run.lock")


# -- items 3 and 5: a corrupt step is moved aside, training saves that step again ---------------------------------

def test_truncated_latest_is_moved_aside_and_saved_again(reference, tmp_path):
    d = _copy(reference, tmp_path)
    f = _largest_array_file(d / "checkpoints" / "8")
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 3)
    r = helpers.run(helpers.recipe_cmd(d, EXTRA))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "moved it to 8.corrupt-" in r.stdout and "Resuming from checkpoint at step 6" in r.stdout, r.stdout[-3000:]
    # one short line naming the damaged array: no TensorStore spec, no traceback (orbax's error, then asyncio's)
    warning = next(ln for ln in r.stdout.splitlines() if "moved it to 8.corrupt-" in ln)
    assert "Error reading \"" in warning and "TensorStore" not in warning and len(warning) < 600, warning
    assert "Traceback" not in r.stderr and "TensorStore" not in r.stderr, r.stderr[-3000:]
    names = os.listdir(d / "checkpoints")
    assert "8" in names and any(n.startswith("8.corrupt-") for n in names), names
    from axlearn_like import checkpoint

    checkpoint.load(str(d), 8)  # the new step 8 reads back


def test_every_step_corrupt_starts_from_scratch_and_saves(reference, tmp_path):
    d = _copy(reference, tmp_path)
    for s in (4, 6, 8):
        meta = d / "checkpoints" / str(s) / "state" / "_METADATA"
        meta.write_text("{not json")
    r = helpers.run(helpers.recipe_cmd(d, EXTRA))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "starting from scratch" in r.stdout and "Starting dense_lm" in r.stdout, r.stdout[-3000:]
    names = sorted(os.listdir(d / "checkpoints"))
    assert _steps(d) == [4, 6, 8] and sum(".corrupt-" in n for n in names) == 3, names


def test_bit_rot_inside_an_array_file_is_caught_by_checksums(reference, tmp_path):
    d = _copy(reference, tmp_path)
    f = _largest_array_file(d / "checkpoints" / "8")
    size = os.path.getsize(f)
    with open(f, "r+b") as fh:  # one flipped bit, same size: the arrays still decode, to other values
        fh.seek(size // 2)
        b = fh.read(1)
        fh.seek(size // 2)
        fh.write(bytes([b[0] ^ 0x10]))
    r = helpers.run(helpers.recipe_cmd(d, EXTRA))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "differ from the checksums saved with them" in r.stdout, r.stdout[-3000:]
    assert "Resuming from checkpoint at step 6" in r.stdout


# -- item 4: non-finite state never reaches a checkpoint ---------------------------------------------------------

def test_overflowing_update_stops_before_any_checkpoint(tmp_path):
    d = tmp_path / "run"
    r = helpers.run(helpers.recipe_cmd(d, ["trainer.steps=3", "checkpoint.every_steps=1", "trainer.eval_batches=0",
                                           "optimizer.learning_rate=1e39"]))
    err = _error(r)  # also: no orbax / tensorboardX traceback while shutting down after the error
    assert "non-finite" in err and "step 1" in err, err
    saved = _steps(d) if os.path.isdir(d / "checkpoints") else []
    assert all(_all_leaves_finite(d, s) for s in saved), saved


def test_skip_policy_reports_skipped_steps_and_stops_past_the_limit(tmp_path):
    common = ["trainer.eval_batches=0", "optimizer.learning_rate=1e39", "trainer.nan_policy=skip",
              "checkpoint.every_steps=2", "trainer.log_every=2"]
    d = tmp_path / "ok"
    r = helpers.run(helpers.recipe_cmd(d, common + ["trainer.steps=4", "trainer.max_skipped_steps=10"]))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "skipped 4 non-finite step(s) (1, 2, 3, 4)" in r.stdout, r.stdout[-2000:]
    assert _all_leaves_finite(d, 4)
    # Past the limit at step 2, while the (async) save of step 1 is still being written: the error waits for it,
    # so step 1 is complete and no orbax / tensorboardX traceback follows the error line.
    stop = tmp_path / "stop"
    r = helpers.run(helpers.recipe_cmd(stop, common + ["trainer.steps=8", "trainer.max_skipped_steps=1",
                                                      "checkpoint.every_steps=1"]))
    err = _error(r)
    assert "trainer.max_skipped_steps=1" in err and "dropped 2 non-finite steps (1, 2)" in err, err
    assert os.listdir(stop / "checkpoints") == ["1"] and _all_leaves_finite(stop, 1)


# -- item 6: importing never deletes ----------------------------------------------------------------------------

def test_import_refuses_a_non_empty_run_dir(reference, tmp_path):
    from tools import export_safetensors

    export_safetensors.export(str(reference), str(tmp_path / "st"))
    d = _copy(reference, tmp_path)
    before = _snapshot(d)
    imp = [sys.executable, "-m", "tools.import_safetensors", str(tmp_path / "st"), str(d)]
    assert "is not empty" in _error(helpers.run(imp))
    assert "--step 9 or higher" in _error(helpers.run(imp + ["--add-to-existing"]))
    assert _snapshot(d) == before
    r = helpers.run(imp + ["--add-to-existing", "--step", "9"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert _steps(d) == [4, 6, 8, 9]


# -- item 7: tools fall back like training; user errors are one line -------------------------------------------

def test_tools_fall_back_from_a_corrupt_latest_step_without_changing_the_run(reference, tmp_path):
    d = _copy(reference, tmp_path)
    (d / "checkpoints" / "8" / "state" / "_METADATA").write_text("garbage")
    before = _snapshot(d)
    r = helpers.run([sys.executable, "-m", "tools.generate", str(d), "--tokens", "4"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "checkpoint step 8" in r.stderr and "falling back" in r.stderr and "Traceback" not in r.stderr
    r = helpers.run([sys.executable, "-m", "tools.export_safetensors", str(d), str(tmp_path / "out")])
    assert r.returncode == 0, r.stderr[-3000:]
    assert _snapshot(d) == before, "tools are read-only"
    assert "unreadable" in _error(helpers.run([sys.executable, "-m", "tools.export_safetensors", str(d),
                                               str(tmp_path / "out2"), "--step", "8"]))


def test_tool_user_errors_are_one_line(reference, tmp_path):
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "model.safetensors").write_bytes(b"\x00" * 64)
    shutil.copy(reference / "config.json", garbage / "config.json")
    err = _error(helpers.run([sys.executable, "-m", "tools.import_safetensors", str(garbage), str(tmp_path / "r1")]))
    assert "not a readable safetensors file" in err
    cfg = json.loads((reference / "config.json").read_text())
    cfg["model"]["_type"] = "models.nowhere:Nothing"
    (garbage / "config.json").write_text(json.dumps(cfg))
    err = _error(helpers.run([sys.executable, "-m", "tools.import_safetensors", str(garbage), str(tmp_path / "r2")]))
    assert "models.nowhere:Nothing" in err and "config.json" in err
    (garbage / "config.json").write_text("{")
    assert f"{garbage}/config.json is not valid JSON" in _error(
        helpers.run([sys.executable, "-m", "tools.import_safetensors", str(garbage), str(tmp_path / "r3")]))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert "is a file" in _error(helpers.run([sys.executable, "-m", "tools.export_safetensors", str(reference),
                                              str(a_file)]))
    assert "is a run dir" in _error(helpers.run([sys.executable, "-m", "tools.export_safetensors", str(reference),
                                                 str(reference)]))


@pytest.mark.parametrize("change,words", [
    ("model.vocab_size=100", ["model.vocab_size: 100 is smaller", "258"]),
    ("data.eval_fraction=0", ["data.eval_fraction", "trainer.eval_batches"]),
])
def test_data_mismatches_fail_before_step_1(tmp_path, change, words):
    d = tmp_path / "run"
    r = helpers.run(helpers.recipe_cmd(d, ["trainer.steps=4", "trainer.eval_batches=2", change]))
    assert not os.path.exists(d / "checkpoints") and not os.path.exists(d / "metrics.jsonl"), "it trained first"
    err = _error(r)
    assert all(w in err for w in words), err


def test_ctrl_c_waits_for_the_async_save(tmp_path):
    d = tmp_path / "run"
    proc = subprocess.Popen(helpers.recipe_cmd(d, BASE + ["trainer.steps=40"]), cwd=helpers.REPO,
                            env=helpers.env(1, AXL_FAULT_SLEEP_S=0.3), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (
            os.path.isdir(d / "checkpoints") and any(n.startswith("2") for n in os.listdir(d / "checkpoints"))):
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)  # while (or right after) step 2 is being written
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert "interrupted" in err
    assert not [n for n in os.listdir(d / "checkpoints") if "tmp" in n], "the in-flight save was abandoned"
    assert not os.path.exists(d / "run.lock")


# -- item 8: one metrics row per step after a resume -------------------------------------------------------------

def test_metrics_after_a_killed_attempt_have_one_row_per_step(reference, tmp_path):
    d = _copy(reference, tmp_path)
    # As if the killed attempt had logged steps 9..11 after its last checkpoint (8), then a resume from 8.
    with open(d / "metrics.jsonl", "a") as f:
        for s in (9, 10, 11):
            f.write(json.dumps({"step": s, "train/objective": 99.0}) + "\n")
    lost = helpers.run(helpers.recipe_cmd(d, BASE + ["trainer.steps=10"]))
    assert lost.returncode == 0, lost.stderr[-3000:]
    rows = [json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert all(r["train/objective"] != 99.0 for r in rows)
    moved = [json.loads(ln) for ln in (d / "metrics.superseded.jsonl").read_text().splitlines()]
    assert [r["step"] for r in moved] == [9, 10, 11] and all(r["superseded_at_resume"] == 8 for r in moved)
