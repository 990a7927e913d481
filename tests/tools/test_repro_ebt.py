"""Issue 21's EBT reproduction pipeline end to end at tiny CPU scale, by the GPU commands (docs/results/ebt.md)
with --set for size: tools.repro_ebt train (BPE tokenizer -> decoder -> EBT, the EBT call interrupted by SIGTERM
and resumed by a second call) -> report (thinking curve, self-verification, in and out of distribution, PNGs,
summary) -> status. Training runs as the command itself in a subprocess on one CPU device; the report in-process."""
import json
import os
import re
import signal
import subprocess
import sys
import time

from tests.core import helpers

# The repro presets at toy size: 1 layer of d_model 32, a 300-id BPE on the stdlib, rows of 16 tokens, 6 steps,
# a checkpoint every step. The EBT's thinking / replay settings stay the preset's (the reference's S2 run).
SETS = ["model.d_model=32", "model.num_layers=1", "model.vocab_size=300", "model.dtype=float32",
        "model.layer_pattern.*.num_heads=2", "model.layer_pattern.*.num_kv_heads=2",
        "model.layer_pattern.*.head_dim=16", "model.ffn_pattern.mlp.mlp_dim=32", "data.paths=stdlib",
        "data.max_bytes=120000", "data.seq_len=16", "data.global_batch_size=4", "trainer.steps=6",
        "optimizer.warmup_steps=1", "trainer.log_every=1", "trainer.eval_every=6", "trainer.eval_batches=1",
        "checkpoint.every_steps=1", "checkpoint.async_save=false", "trainer.progress=false"]


def _train_cmd(root, *more):
    return [sys.executable, "-m", "tools.repro_ebt", "train", str(root), "--tokenizer-bytes", "60000", *more]


def test_ebt_repro_pipeline_resumes_and_reports(tmp_path, capsys):
    from tools import repro_ebt
    from tools.repro_util import latest_step

    root = tmp_path / "ebt"
    args = [a for s in SETS for a in ("--set", s)]
    # 1. an interrupted call: SIGTERM once the EBT saved step 1; each step sleeps 0.6 s, so the 5 steps left give the
    # signal >= 3 s to land on a loaded machine
    proc = subprocess.Popen(_train_cmd(root, *args), cwd=helpers.REPO, env=helpers.env(1, AXL_FAULT_SLEEP_S=0.6),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (root / "ebt" / "checkpoints" / "1").is_dir():
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out[-3000:]
    assert latest_step(str(root / "decoder")) == 6 and 1 <= latest_step(str(root / "ebt")) < 6, out[-3000:]
    assert "ebt: stopped at step" in out
    # the GPU calls' report: the unfinished EBT is not evaluated (a later call would replace it), the decoder is
    rargs = ["--batches", "1", "--max-steps", "4", "--groups", "1,2"]
    assert repro_ebt.main(["report", str(root), *rargs, "--finished-only"]) == 0
    assert set(json.loads((root / "report" / "summary.json").read_text())["eval"]) == {"decoder"}
    assert not (root / "report" / "eval_ebt.json").exists()
    assert re.search(r"^ebt: at step [1-5] of 6; not evaluated", capsys.readouterr().out, re.M)

    # 2. the same command again (the --set are remembered): the decoder is skipped, the EBT resumes and finishes
    r = helpers.run(_train_cmd(root), timeout=240)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    assert "decoder: already at step 6 of 6" in r.stdout and "Resuming from checkpoint at step" in r.stdout
    assert latest_step(str(root / "ebt")) == 6
    stages = [json.loads(line) for line in open(root / "stages.jsonl")]
    assert [(s["run"], s["status"]) for s in stages] == [("decoder", "done"), ("ebt", "paused"),
                                                         ("decoder", "skipped (done)"), ("ebt", "done")]
    assert repro_ebt.main(["train", str(root), "--set", "trainer.steps=9"]) == 2  # another config: refused
    assert "was started with --set" in capsys.readouterr().err

    # 3. the report: thinking curves to 4 steps and G = 1, 2 on one batch of each held-out set
    assert repro_ebt.main(["report", str(root), *rargs]) == 0
    rep = root / "report"
    for name in ("thinking", "self_verification", "loss_vs_tokens"):
        helpers.assert_png(rep / f"{name}.png")
    s = json.loads((rep / "summary.json").read_text())
    assert set(s["runs"]) == {"decoder", "ebt"}
    p = [s["runs"][r]["params"] for r in ("decoder", "ebt")]
    assert abs(p[0] - p[1]) / p[0] < 0.02 and s["runs"]["ebt"]["tokens"] == s["runs"]["decoder"]["tokens"] == 6 * 64
    for name in ("id", "ood"):
        e = s["eval"]["ebt"][name]
        assert len(e["curve"]) == 4 and all(0 < v < 20 for v in e["curve"])
        assert set(e["self_verification"]["loss"]) == {"1", "2"} and e["self_verification"]["steps"] == 3
        assert e["self_verification"]["noise"] == 1.0  # the reference's inference noise (repro_text)
        assert 0 < s["eval"]["decoder"][name]["decoder_loss"] < 20
    claims = {c["claim"] for c in s["claims"]}
    assert "the thinking longer gain is larger out of distribution" in claims
    assert any(c.startswith("EBT loss approaches") for c in claims)
    md = (rep / "summary.md").read_text()
    assert "## Held-out loss, out of distribution" in md and "## Claims" in md
    stamp = os.path.getmtime(rep / "eval_ebt.json")
    assert repro_ebt.main(["report", str(root), *rargs]) == 0
    assert os.path.getmtime(rep / "eval_ebt.json") == stamp  # same checkpoint and settings: not recomputed
    # 4. another machine (the GPU calls' tarball: metrics, configs, the report's evaluations; no checkpoints):
    # the report reads the carried evaluations instead of dropping the runs
    far = tmp_path / "far"
    for rel in ("decoder/metrics.jsonl", "decoder/config.json", "ebt/metrics.jsonl", "ebt/config.json",
                "report/eval_decoder.json", "report/eval_ebt.json"):
        os.makedirs((far / rel).parent, exist_ok=True)
        (far / rel).write_bytes((root / rel).read_bytes())
    assert repro_ebt.main(["report", str(far), *rargs]) == 0
    assert json.loads((far / "report" / "summary.json").read_text())["eval"] == s["eval"]
    assert repro_ebt.main(["report", str(far), "--batches", "2", "--max-steps", "4", "--groups", "1,2"]) == 0
    assert json.loads((far / "report" / "summary.json").read_text())["eval"] == {}  # other settings: not reused
    capsys.readouterr()
    assert repro_ebt.main(["status", str(root)]) == 0
    text = capsys.readouterr().out
    assert re.search(r"^ebt +step 6 of 6$", text, re.M) and "paused" in text
    assert re.search(r"^no_replay +not started$", text, re.M)


def test_repro_presets_match_in_size_data_and_tokens():
    """repro_text and decoder_repro_text: parameters within 2 %, the same data, tokens and optimizer; the EBT has
    the reference S2 run's thinking settings; the ablations change only their regularizer."""
    from axlearn_like import config as config_lib
    from recipes import ebt

    e, d = ebt.repro_text(), ebt.decoder_repro_text()
    pe, pd = e.model.build().param_count(256), d.model.build().param_count(256)
    assert abs(pe - pd) / pd < 0.02
    for part in ("data", "optimizer", "trainer"):
        assert config_lib.to_dict(getattr(e, part)) == config_lib.to_dict(getattr(d, part)), part
    m = e.model
    assert (m.think_steps, m.think_steps_random, m.step_size_spread, m.alpha_init, m.alpha_learnable) == (2, 1, 2.0,
                                                                                                       5.0, False)
    assert (m.langevin_std, m.infer_langevin_std, m.detach_earlier, m.time_embed) == (3.0, 1.0, True, 1)
    assert (m.replay_size, m.replay_fraction, e.data.global_batch_size, e.data.seq_len) == (192, 0.5, 32, 256)
    assert e.optimizer.learning_rate == 1.2e-3 and e.optimizer.b2 == 0.999 and e.optimizer.weight_decay == 0.01
    assert all(p.endswith("*.py") for p in e.data.paths)  # code only: the prose is the OOD set
    base = config_lib.to_dict(e.model)
    for name, changed in (("repro_text_no_replay", {"replay_size", "replay_fraction"}),
                          ("repro_text_no_langevin", {"langevin_std", "infer_langevin_std"}),
                          ("repro_text_fixed_steps", {"think_steps", "think_steps_random", "step_size_spread"})):
        other = config_lib.to_dict(ebt.PRESETS[name]().model)
        assert {k for k in base if base[k] != other[k]} == changed, name
