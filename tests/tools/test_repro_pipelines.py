"""Issue 20's reproduction pipelines end to end at tiny CPU scale, by the same commands as the GPU runs
(docs/results/lengthgen.md, docs/results/moe_balance.md) with --set for size: tools.repro_lengthgen (BPE
tokenizer -> pretrain -> a tbtt post-training, whose state gains a carried conv window -> eval with every PNG)
and tools.repro_moe (two balance presets, 4 steps each -> report) + tools.compare_runs.

The training and evaluation stages run as the commands themselves, in subprocesses on one CPU device (no
8-thread collectives on a loaded 2-core machine); the stages that compute nothing run in-process."""
import dataclasses
import json
import os
import time

import numpy as np
import pytest

from axlearn_like import config as config_lib
from tests.core import helpers
from tools.repro_util import sets_argv

# The GPU presets at toy size: 1 scanned Mamba-2 layer of d_model 32, a 300-id BPE, rows of 16 tokens.
LG_SETS = ["model.d_model=32", "model.num_layers=1", "model.vocab_size=300", "model.dtype=float32",
           "model.layer_pattern.mamba2.d_state=8", "model.layer_pattern.mamba2.head_dim=16",
           "model.layer_pattern.mamba2.chunk_size=16", "data.paths=stdlib", "data.max_bytes=120000", "data.seq_len=16",
           "data.global_batch_size=4", "trainer.steps=4", "optimizer.warmup_steps=1", "trainer.log_every=2",
           "trainer.eval_every=4", "trainer.eval_batches=1", "checkpoint.every_steps=4", "checkpoint.async_save=false",
           "trainer.progress=false"]
# 2 layers (dense, MoE), 8 experts top-2; the balance fields stay the presets'.
MOE_SETS = ["model.d_model=32", "model.num_layers=2", "model.vocab_size=300", "model.dtype=float32",
            "optimizer.param_dtype=float32", "model.layer_pattern.attention.num_heads=2",
            "model.layer_pattern.attention.num_kv_heads=1", "model.layer_pattern.attention.head_dim=16",
            "model.ffn_pattern.mlp.mlp_dim=64", "model.ffn_pattern.moe.num_experts=8", "model.ffn_pattern.moe.top_k=2",
            "model.ffn_pattern.moe.expert_dim=16", "data.paths=stdlib", "data.max_bytes=120000", "data.seq_len=16",
            "data.global_batch_size=4", "trainer.steps=4", "optimizer.warmup_steps=1", "trainer.log_every=2",
            "trainer.eval_every=2", "trainer.eval_batches=1", "checkpoint.every_steps=4", "checkpoint.async_save=false",
            "trainer.progress=false"]


def test_lengthgen_pipeline(tmp_path, capsys):
    from axlearn_like import rundir
    from tools import repro_lengthgen as rl
    from tools.repro_util import latest_step

    root = str(tmp_path / "lg")
    helpers.run_tool("repro_lengthgen", "pretrain", root, *sets_argv(LG_SETS))
    assert os.path.isfile(os.path.join(root, "tokenizer.json")) and latest_step(os.path.join(root, "pretrain")) == 4
    assert rl.main(["pretrain", root]) == 0  # finished: skipped, with the remembered --set
    assert "already at step 4 of 4" in capsys.readouterr().out
    assert rl.main(["pretrain", root, "--set", "trainer.steps=8"]) == 2  # another config: refused
    assert "was started with --set" in capsys.readouterr().err
    assert rl.main(["posttrain", str(tmp_path / "none"), "--init", "zeros"]) == 2  # no pretraining there
    assert rl.main(["posttrain", root, "--init", "bogus"]) == 2
    capsys.readouterr()

    out = helpers.run_tool("repro_lengthgen", "posttrain", root, "--init", "tbtt", "--steps", "2")
    post = rl.post_dir(root, "tbtt")
    assert latest_step(post) == 6
    cfg = rundir.read_config_file(os.path.join(post, "config.json"))
    assert cfg.data.mode == "tbtt" and cfg.model.layer_pattern[0].initial_state == "tbtt"
    assert cfg.optimizer.decay_steps == 4  # the pretraining's schedule, held at its floor
    assert "carried array(s) it lacks at zero" in out and "Resuming from checkpoint at step 4" in out

    args = ["eval", root, "--multiples", "1,4", "--num-seqs", "2", "--chunk", "16", "--effrem-T", "32",
            "--effrem-points", "4", "--effrem-seqs", "1", "--passkey-multiples", "8", "--passkey-depths", "0,1",
            "--passkey-trials", "2"]
    helpers.run_tool("repro_lengthgen", *args)
    ev = os.path.join(root, "eval")
    for name in ("length_eval", "effrem", "passkey_pretrain", "passkey_post_tbtt", "pretrain_curves",
                 "posttrain_curves"):
        helpers.assert_png(os.path.join(ev, f"{name}.png"))
    with open(os.path.join(ev, "summary.json")) as f:
        s = json.load(f)
    assert list(s["runs"]) == ["pretrain", "post_tbtt"] and s["steps"] == {"pretrain": 4, "post_tbtt": 6}
    assert [r["length"] for r in s["length"]["post_tbtt"]] == [16, 64]
    assert all(0 < r["last_half_loss"] < 10 for rows in s["length"].values() for r in rows)
    assert "| post_tbtt | 6 |" in open(os.path.join(ev, "summary.md")).read()
    stamps = {n: os.path.getmtime(os.path.join(ev, n)) for n in os.listdir(ev) if n.endswith(".json")}
    assert rl.main(args) == 0  # nothing changed: the evaluations are not recomputed
    for n in ("length_eval.json", "effrem.json", "passkey_pretrain.json", "passkey_post_tbtt.json"):
        assert os.path.getmtime(os.path.join(ev, n)) == stamps[n], n
    capsys.readouterr()
    assert rl.main(["status", root]) == 0
    out = capsys.readouterr().out
    assert "post_tbtt            step 6 of 6" in out and "posttrain" in out


def test_moe_balance_pipeline_and_compare_runs(tmp_path, capsys):
    from tools import compare_runs, repro_moe

    root = str(tmp_path / "moe")
    helpers.run_tool("repro_moe", "train", root, "--runs", "aux_free,no_balance", *sets_argv(MOE_SETS))
    assert repro_moe.main(["report", root]) == 0
    rep = os.path.join(root, "report")
    for name in ("loss", "maxvio", "maxvio_batch_max", "expert_load_aux_free", "expert_load_no_balance"):
        helpers.assert_png(os.path.join(rep, f"{name}.png"))
    with open(os.path.join(rep, "summary.json")) as f:
        s = json.load(f)["runs"]
    assert set(s) == {"aux_free", "no_balance"}
    for r in s.values():
        assert r["steps"] == 4 and r["tokens"] == 4 * 4 * 16 and 0 < r["eval_loss"] < 10
        assert r["maxvio_global"] >= 0 and r["maxvio_batch_mean"] >= 0
    capsys.readouterr()

    out = str(tmp_path / "cmp.png")
    runs = [os.path.join(root, "aux_free"), os.path.join(root, "no_balance")]
    assert compare_runs.main([*runs, "--metrics", "loss,eval/loss,train/*/maxvio_batch,nope", "--x", "tokens",
                              "--logx", "--out", out]) == 0
    helpers.assert_png(out)
    text = capsys.readouterr().out
    assert "no run has nope" in text and "train/*/maxvio_batch" in text
    with open(out[:-4] + ".json") as f:
        table = json.load(f)
    assert table["x"] == "tokens" and table["final"]["aux_free"]["loss"]["step"] == 4
    assert compare_runs.main([runs[0], "--x", "flops", "--out", str(tmp_path / "f.png")]) == 0
    assert compare_runs.main([str(tmp_path / "missing")]) == 2


def test_compare_runs_reads_patterns_and_later_rows(tmp_path):
    from tools import compare_runs

    d = tmp_path / "run"
    d.mkdir()
    rows = [{"step": 1, "train/loss": 3.0, "train/a/maxvio_batch": 1.0, "train/b/maxvio_batch": 3.0, "v": [1, 2]},
            {"step": 2, "train/loss": 2.0, "eval/loss": 2.5},
            {"step": 2, "train/loss": 1.5}]  # a resumed attempt rewrote step 2: the later line wins
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    m = compare_runs.read_metrics(str(d))
    assert m[2] == {"train/loss": 1.5, "eval/loss": 2.5} and "v" not in m[1]
    assert compare_runs.resolve_key("loss", set(m[1])) == "train/loss"
    steps, v = compare_runs.series(m, "train/*/maxvio_batch")
    assert steps.tolist() == [1] and v.tolist() == [2.0]
    assert compare_runs.series(m, "train/*/maxvio_batch", agg="max")[1].tolist() == [3.0]
    v = np.array([4.0, 2.0, 1.0])  # --smooth averages training points, never evaluations of other model states
    assert compare_runs.curve("eval/maxvio_global", v, 5).tolist() == [4.0, 2.0, 1.0]
    assert compare_runs.curve("train/loss", v, 2).tolist() == [4.0, 3.0, 1.5]
    with pytest.raises(ValueError, match="--labels"):
        compare_runs.compare([str(d)], ["loss"], labels=["a", "b"], out=str(tmp_path / "x.png"))


def test_time_budget_marks_a_sigterm_outside_the_training_loop():
    from tools.repro_util import time_budget

    with time_budget(0.001) as b:  # 60 ms; the SIGTERM must not kill this process
        deadline = time.time() + 5
        while not b["expired"] and time.time() < deadline:
            time.sleep(0.02)
    assert b["expired"]


def test_gpu_presets_share_one_base():
    """The *_gpu balance presets differ from aux_free_seq_gpu only in the balance fields (equal tokens, same
    model); limited_gpu only in routing; repro_lengthgen keeps the default mamba2 config untouched."""
    from recipes import mamba2, moe

    base = config_lib.to_dict(moe.aux_free_seq_gpu())

    def diff(a, b, path=""):
        if isinstance(a, dict) and isinstance(b, dict):
            return [p for k in sorted(set(a) | set(b)) for p in diff(a.get(k), b.get(k), f"{path}.{k}")]
        if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            return [p for i, (x, y) in enumerate(zip(a, b)) for p in diff(x, y, f"{path}.{i}")]
        return [] if a == b else [path]

    allowed = {"gamma", "seq_aux_alpha", "expert_aux_alpha", "num_groups", "topk_groups", "device_limited_m"}
    for name in ("aux_free_gpu", "aux_loss_gpu", "no_balance_gpu", "limited_gpu"):
        d = diff(base, config_lib.to_dict(moe.PRESETS[name]()))
        assert {".name", ".run_dir"} <= set(d), name
        assert {p.rsplit(".", 1)[-1] for p in d} - {"name", "run_dir"} <= allowed, (name, d)
    assert {p.rsplit(".", 1)[-1] for p in diff(base, config_lib.to_dict(moe.limited_gpu()))} - {"name", "run_dir"} \
        == {"num_groups", "topk_groups", "device_limited_m"}
    cfg = mamba2.repro_lengthgen()
    ssm = cfg.model.layer_pattern[0]
    assert ssm.d_state == 128 and ssm.initial_state == "zeros" and not ssm.document_reset
    assert cfg.data.seq_len == 256 and cfg.data.paths == ("python_install",) and not cfg.data.packing
    assert cfg.optimizer.decay_steps is None  # = trainer.steps; tools.repro_lengthgen pins it for post-training
    assert dataclasses.asdict(mamba2.config().model.layer_pattern[0])["d_state"] == 32  # default untouched


def test_python_install_corpus_holds_the_stdlib_and_site_packages():
    from axlearn_like.data.sources import PYTHON_INSTALL_MAX_FILE_BYTES, resolve_paths, stdlib_files

    files = resolve_paths(["python_install"])
    assert set(stdlib_files()) <= set(files)  # the stdlib corpus is a part of it
    assert any("site-packages" in f and f.endswith(".py") for f in files)
    assert any(f.endswith("METADATA") for f in files) and not any("__pycache__" in f for f in files)
    assert all(os.path.getsize(f) <= PYTHON_INSTALL_MAX_FILE_BYTES for f in files[:: max(1, len(files) // 200)])


def test_train_tokenizer_is_deterministic_and_chunked_encoding_exact(tmp_path, monkeypatch):
    import numpy as np

    from axlearn_like.data import make_tokenizer, sources
    from tools import train_tokenizer

    a, b = str(tmp_path / "a.json"), str(tmp_path / "b.json")
    for out in (a, b):
        s = train_tokenizer.train(["stdlib"], out, vocab_size=320, max_bytes=60_000)
    assert open(a, "rb").read() == open(b, "rb").read() and s["vocab_size"] == 320
    tok = make_tokenizer(a)
    assert (tok.eos_id, tok.pad_id, tok.vocab_size) == (0, 1, 320)
    docs = sources._read_text_docs(sources.resolve_paths(["stdlib"])[:40], 200_000)
    whole = sources._tokenize(docs, tok)
    monkeypatch.setattr(sources, "_ENCODE_DOCS", 7)
    pieces = sources._tokenize(docs, tok)
    np.testing.assert_array_equal(whole.tokens, pieces.tokens)
    np.testing.assert_array_equal(whole.doc_starts, pieces.doc_starts)
    with pytest.raises(ValueError, match="vocab-size"):
        train_tokenizer.train(["stdlib"], a, vocab_size=100)
