"""`python -m recipes NAME` (what `make train RECIPE=NAME` runs) behaves exactly like `python -m recipes.NAME`:
both resolve the same config for every recipe and preset, and every recipe's default trains through the generic
entry point, recipe-specific runs (`run(cfg)`: simplicial's compare, ebt_denoise's EBT-vs-denoiser) included."""
import contextlib
import io
import json
import os
import runpy
import sys

import pytest

import recipes.__main__ as recipes_main
from tests.core import helpers

COMMON = ["trainer.steps=2", "trainer.log_every=1", "checkpoint.every_steps=2", "trainer.progress=false"]
# Compiles dominate: only dense_lm and ebt_denoise (whose table needs it) also compile eval and sampling.
QUIET = ["trainer.eval_batches=0", "model.sample.tokens=0"]
TEXT = ["data.global_batch_size=8", "data.seq_len=32", "data.max_bytes=200000"]
TINY = {  # each recipe's default, made cheap by keys every config of that kind has
    "dense_lm": TEXT + ["trainer.eval_every=2", "trainer.eval_batches=1", "model.sample.tokens=3"],
    "moe": TEXT + QUIET, "mamba2": TEXT + QUIET, "simplicial": TEXT + QUIET,
    "ebt": ["data.global_batch_size=8"] + QUIET,
    "ebt_denoise": ["data.global_batch_size=16", "trainer.eval_every=2", "trainer.eval_batches=1"],
}


def test_every_recipe_has_a_tiny_setting():
    assert sorted(TINY) == recipes_main.available()


def _generic(name, run_dir, sets, *pre):
    cmd = [sys.executable, "-m", "recipes", name, *pre, "--run-dir", str(run_dir)]
    for s in COMMON + sets:
        cmd += ["--set", s]
    return helpers.run(cmd)


def _assert_trained(run_dir, steps=2, evaluated=False):
    assert (run_dir / "config.json").is_file()
    assert os.path.isdir(run_dir / "checkpoints" / str(steps)), os.listdir(run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(r["step"] == steps and "train/loss" in r for r in rows), rows[-1]
    assert not evaluated or any(r["step"] == steps and "eval/loss" in r for r in rows), rows[-1]


@pytest.mark.parametrize("name", sorted(TINY))
def test_recipe_default_trains_through_the_generic_entry_point(name, tmp_path):
    run_dir = tmp_path / name
    r = _generic(name, run_dir, TINY[name])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    if name == "ebt_denoise":  # its run(cfg): both models, then the PSNR table
        for kind in ("ebt", "denoiser"):
            _assert_trained(run_dir / kind, evaluated=True)
        results = json.loads((run_dir / "denoise_results.json").read_text())
        assert {"psnr_1x", "psnr_2x", "psnr_1x_2x_steps", "psnr_2x_2x_steps"} <= set(results["ebt"])
        assert "| denoiser |" in r.stdout and "| EBT, 6 steps |" in r.stdout
    else:
        _assert_trained(run_dir, evaluated=name == "dense_lm")
        saved = json.loads((run_dir / "config.json").read_text())
        assert saved["_type"].split(":")[0] in ("axlearn_like.trainer", f"recipes.{name}"), saved["_type"]
    if name == "dense_lm":  # the LM task's hooks: bits/byte at eval, the sample after training
        assert "final eval: loss" in r.stdout and "bits/byte" in r.stdout and "sample:" in r.stdout


def test_simplicial_compare_trains_both_models_through_the_generic_entry_point(tmp_path):
    r = _generic("simplicial", tmp_path / "cmp", TEXT + QUIET, "--preset", "compare")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    for name in ("dense", "hybrid"):
        _assert_trained(tmp_path / "cmp" / name)
    dense = json.loads((tmp_path / "cmp" / "dense" / "config.json").read_text())
    hybrid = json.loads((tmp_path / "cmp" / "hybrid" / "config.json").read_text())
    kinds = lambda c: {e["_type"] for e in c["model"]["layer_pattern"]}
    assert kinds(dense) == {"models.attention:AttentionConfig"}
    assert "models.simplicial:SimplicialConfig" in kinds(hybrid)
    table = r.stdout[r.stdout.index("train loss"):]
    assert "\ndense " in table and "\nhybrid " in table


def _print_config_generic(name, argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert recipes_main.main([name, *argv]) == 0
    return out.getvalue()


def _print_config_module(name, argv, monkeypatch):
    """What `python -m recipes.NAME argv` prints: the module run as __main__."""
    monkeypatch.setattr(sys, "argv", [f"recipes/{name}.py", *argv])
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        runpy.run_module(f"recipes.{name}", run_name="__main__")
    assert e.value.code == 0
    return out.getvalue()


@pytest.mark.parametrize("name", sorted(TINY))
def test_both_entry_points_resolve_the_same_config(name, monkeypatch, tmp_path):
    import importlib

    presets = sorted(getattr(importlib.import_module(f"recipes.{name}"), "PRESETS", None) or {}) or [None]
    for preset in presets:
        argv = ["--run-dir", str(tmp_path / "unused"), "--print-config"] + (["--preset", preset] if preset else [])
        generic = _print_config_generic(name, argv)
        assert generic == _print_config_module(name, argv, monkeypatch), preset
        assert '"__main__:' not in generic
