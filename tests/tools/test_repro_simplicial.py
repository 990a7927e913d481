"""Issue 21's 2-simplicial reproduction pipeline (tools.repro_simplicial) end to end at tiny CPU scale, by the same
commands as the GPU runs (docs/results/simplicial.md) with --set for size: an interrupted `train` call (time budget
spent in the middle of the first run), a second call that resumes it and trains the dense twin, `report` (PNGs,
summary) and `status`; plus the GPU presets' equal parameter counts and the gap bookkeeping."""
import json
import os
import sys

import pytest

from tests.core import helpers
from tools.repro_util import sets_argv

# The GPU presets at toy size: 4 layers of d_model 32 (layer 3 simplicial, xla), a 300-id BPE, rows of 16 tokens.
TINY = ["model.d_model=32", "model.num_layers=4", "model.vocab_size=300", "model.dtype=float32",
        "model.remat_policy=none", "model.layer_pattern.attention.num_heads=2",
        "model.layer_pattern.attention.num_kv_heads=2", "model.layer_pattern.attention.head_dim=16",
        "model.layer_pattern.simplicial.num_heads=2", "model.layer_pattern.simplicial.head_dim=16",
        "model.layer_pattern.simplicial.w1=8", "model.layer_pattern.simplicial.w2=4",
        "model.layer_pattern.simplicial.implementation=xla", "model.ffn_pattern.mlp.mlp_dim=64", "data.paths=stdlib",
        "data.max_bytes=120000", "data.seq_len=16", "data.global_batch_size=4", "trainer.steps=4",
        "optimizer.warmup_steps=1", "trainer.log_every=1", "trainer.eval_every=2", "trainer.eval_batches=1",
        "checkpoint.every_steps=2", "checkpoint.async_save=false", "trainer.progress=false"]


def test_simplicial_pipeline_resumes_and_reports(tmp_path, capsys):
    from tools import repro_simplicial as rs
    from tools.repro_util import StageLog, latest_step

    root = str(tmp_path / "simp")
    hyb, dense = os.path.join(root, "s_hybrid"), os.path.join(root, "s_dense")
    # The corpus tokenizer first (what `train` does when it is missing), so that call 1's budget is not spent on it
    # on a slow machine before the first run starts.
    r = helpers.run([sys.executable, "-m", "tools.train_tokenizer", "--out", os.path.join(root, "tokenizer.json"),
                     "--paths", "stdlib", "--vocab-size", "300", "--max-bytes", "120000"], timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    # Call 1, interrupted: each step sleeps 3 s (the trainer's fault-injection hook), the 3 s budget runs out
    # while the first run compiles or steps, and its loop saves at the end of its current step (a SIGTERM that
    # arrives before the loop is kept, and it repeats every 5 s, so one lands before the 4th step); the call then
    # stops (the dense twin is left alone).
    out = helpers.run_tool("repro_simplicial", "train", root, "--sizes", "s", "--max-minutes", "0.05",
                           *sets_argv(TINY), AXL_FAULT_SLEEP_S=3)
    cut = latest_step(hyb)
    assert cut is not None and 1 <= cut < 4, out
    assert not os.path.isdir(dense) and f"s_hybrid: stopped at step {cut} of 4" in out
    assert [r["status"] for r in StageLog(root).records()] == ["paused (time budget)"]

    # call 2: the remembered --set, resumes the hybrid, trains the twin
    out = helpers.run_tool("repro_simplicial", "train", root, "--sizes", "s")
    assert f"Resuming from checkpoint at step {cut}" in out
    assert latest_step(hyb) == 4 and latest_step(dense) == 4
    from axlearn_like import rundir

    h_cfg = rundir.read_config_file(os.path.join(hyb, "config.json"))
    d_cfg = rundir.read_config_file(os.path.join(dense, "config.json"))
    assert [m.kind for m in h_cfg.model.layer_pattern] == ["attention"] * 3 + ["simplicial"]
    assert [m.kind for m in d_cfg.model.layer_pattern] == ["attention"]
    assert h_cfg.model.layer_pattern[3].w1 == 8 and h_cfg.data.tokenizer == os.path.join(root, "tokenizer.json")

    assert rs.main(["train", root, "--sizes", "s"]) == 0  # finished: both skipped
    assert "s_dense: already at step 4 of 4" in capsys.readouterr().out
    assert rs.main(["train", root, "--set", "trainer.steps=8"]) == 2  # another config: refused
    assert "was started with --set" in capsys.readouterr().err

    s = rs.report(root)
    rep = os.path.join(root, "report")
    for name in ("loss_tokens", "loss_flops", "gap"):
        helpers.assert_png(os.path.join(rep, f"{name}.png"))
    with open(os.path.join(rep, "summary.json")) as f:
        saved = json.load(f)
    assert set(saved["runs"]) == {"s_hybrid", "s_dense"} and saved["gap_grows_with_size"] is None
    h, d = saved["runs"]["s_hybrid"], saved["runs"]["s_dense"]
    assert h["params"] == d["params"] and h["non_embedding"] == d["non_embedding"]  # the twin matches exactly
    assert h["flops_per_token"] > d["flops_per_token"] and h["simplicial_flops_per_token"] > 0
    assert d["simplicial_flops_per_token"] == 0
    assert h["steps"] == d["steps"] == 4 and h["tokens"] == d["tokens"] == 4 * 4 * 16
    assert set(h["eval"]) == {"2", "4"} and 0 < h["eval_loss"] < 10 and h["wall_s"] > 0
    assert 0 < h["non_padding_fraction"] <= 1 and h["step_time_median_s"] > 0 and h["eval_bits_per_byte"] > 0
    gap = saved["sizes"]["s"]
    assert gap["step"] == 4 and gap["complete"] and gap["gap"] == pytest.approx(d["eval_loss"] - h["eval_loss"])
    assert s["sizes"]["s"]["gap"] == pytest.approx(gap["gap"])
    md = open(os.path.join(rep, "summary.md")).read()
    assert "| s_hybrid |" in md and "| s |" in md and "no trend yet" in md
    capsys.readouterr()
    assert rs.main(["status", root]) == 0
    out = capsys.readouterr().out
    assert "s_hybrid   step 4 of 4" in out and "m_dense    not started" in out and "paused (time budget)" in out


def test_gpu_presets_have_equal_parameters_and_tokens(capsys):
    """Each size's hybrid and dense twin: the same parameter count, tokens, data and optimizer; only the mixers
    differ. The plan prints a predicted time for every run."""
    from axlearn_like import config as config_lib
    from recipes import simplicial
    from tools import repro_simplicial as rs

    for size in simplicial.REPRO_SIZES:
        h, d = simplicial.repro(size), simplicial.repro_dense(size)
        assert [m.kind for m in h.model.layer_pattern] == ["attention"] * 3 + ["simplicial"]
        sm = h.model.layer_pattern[3]
        assert (sm.w1, sm.w2, sm.num_kv_heads, h.model.layer_pattern[0].num_kv_heads) == (512, 32, 1, 2)
        hd, dd = config_lib.to_dict(h), config_lib.to_dict(d)
        for k in ("data", "optimizer", "trainer", "checkpoint"):
            assert hd[k] == dd[k], (size, k)
        assert {k: v for k, v in hd["model"].items() if k != "layer_pattern"} == \
            {k: v for k, v in dd["model"].items() if k != "layer_pattern"}
        assert h.data.paths == ("python_install",) and not h.data.packing
    rows = rs.plan("unused", ["s", "m", "l"], [])
    by = {r["run"]: r for r in rows}
    for size in ("s", "m", "l"):
        assert by[f"{size}_hybrid"]["params"] == by[f"{size}_dense"]["params"]
        assert by[f"{size}_hybrid"]["tokens"] == by[f"{size}_dense"]["tokens"] == 400 * 64 * 1024
        assert by[f"{size}_hybrid"]["minutes"] > by[f"{size}_dense"]["minutes"] > 0
    assert by["s_dense"]["non_embedding"] < by["m_dense"]["non_embedding"] < by["l_dense"]["non_embedding"]
    assert "total training" in capsys.readouterr().out


def test_gaps_are_dense_minus_hybrid_at_the_last_common_eval_step():
    from tools import repro_simplicial as rs

    def run(size, variant, evals, target=4):
        return {"size": size, "variant": variant, "eval": evals, "target_steps": target, "tokens_per_step": 10,
                "non_embedding": {"s": 1, "m": 2, "l": 3}[size], "flops_per_token": 2.0 if variant == "hybrid" else 1.0}

    runs = {"s_hybrid": run("s", "hybrid", {2: 3.0, 4: 2.5}), "s_dense": run("s", "dense", {2: 3.1, 4: 2.6}),
            "m_hybrid": run("m", "hybrid", {2: 2.8, 4: 2.2}), "m_dense": run("m", "dense", {2: 2.9}),
            "l_hybrid": run("l", "hybrid", {2: 2.0})}  # l has no dense run: no gap
    g = rs._gaps(runs)
    assert list(g["sizes"]) == ["s", "m"]
    assert g["sizes"]["s"]["gap"] == pytest.approx(0.1) and g["sizes"]["s"]["complete"]
    assert g["sizes"]["m"]["step"] == 2 and g["sizes"]["m"]["gap"] == pytest.approx(0.1)
    assert not g["sizes"]["m"]["complete"] and g["sizes"]["s"]["flops_ratio"] == 2.0
    assert g["gap_grows_with_size"] is False  # equal gaps do not grow
    runs["m_dense"]["eval"] = {2: 3.0}
    assert rs._gaps(runs)["gap_grows_with_size"] is True
