"""Llama / Mistral / Qwen2 / Qwen2.5 / Qwen3 <-> dense_lm, against Hugging Face transformers itself.

Each case: a tiny random `*ForCausalLM` built by transformers and saved with save_pretrained (float32 or
bf16, one file or shards + index) -> tools.import_hf -> the project's logits equal HF's (float32, <= 1e-4)
-> tools.export_hf -> from_pretrained(OUT) gives the same logits with no missing/unexpected keys, and every
exported tensor equals the original bit for bit. Plus a round trip that starts from a project run, and the
one-line errors. The HF side runs in the interop venv (tests/hf_interop.py), two subprocesses per module.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tests.hf_interop import (
    CLEAN_LOADING,
    assert_same_run,
    assert_same_tensors,
    folder_tensors,
    hf_jobs,
    project_logits,
    random_run,
    run_tool,
)

BASE = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)
CASES = {
    # GQA, untied, Llama 3.1 rope scaling, sharded float32 checkpoint
    "llama3_sharded": (dict(model_type="llama", rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}, **BASE),
                       "float32", "40KB"),
    # attention_bias (q, k, v and o), tied embeddings, linear rope scaling, bf16
    "llama_bias_tied_bf16": (dict(model_type="llama", attention_bias=True, tie_word_embeddings=True, rms_norm_eps=1e-6,
                                  rope_scaling={"rope_type": "linear", "factor": 2.0}, **BASE), "bfloat16", None),
    "mistral": (dict(model_type="mistral", sliding_window=None, tie_word_embeddings=False, rope_theta=1e6, **BASE),
                "float32", None),
    # Qwen2.5: q/k/v biases, tied, YaRN
    "qwen2_yarn_bf16": (dict(model_type="qwen2", tie_word_embeddings=True, rms_norm_eps=1e-6, use_sliding_window=False,
                             rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
                             **BASE), "bfloat16", None),
    # Qwen3: per-head q/k RMSNorm, head_dim != hidden / heads, MHA
    "qwen3": (dict(model_type="qwen3", tie_word_embeddings=False, head_dim=24, rms_norm_eps=1e-6,
                   **{**BASE, "num_key_value_heads": 4}), "float32", None),
}
TOKENS = np.random.RandomState(0).randint(0, BASE["vocab_size"], (2, 12)).tolist()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Builds every HF case (one subprocess), imports each, exports each, loads the exports in HF (one more)."""
    from tools.hf.common import export_hf, import_hf

    w = str(tmp_path_factory.mktemp("hf_llama"))
    jobs = [dict(op="build", config=cfg, dir=f"{w}/{k}", dtype=dt, max_shard_size=shard, tokens=TOKENS,
                 logits=f"{w}/{k}.ref.npy") for k, (cfg, dt, shard) in CASES.items()]
    built = dict(zip(CASES, hf_jobs(jobs, f"{w}/hf1")))
    ours, exported = {}, {}
    for k in CASES:
        if k == "llama3_sharded":  # the real command line once
            r = run_tool("tools.import_hf", f"{w}/{k}", f"{w}/{k}.run")
            assert r.returncode == 0, r.stderr
            assert "fresh optimizer state" in r.stdout and "python -m recipes.dense_lm --run-dir" in r.stdout
        else:
            import_hf(f"{w}/{k}", f"{w}/{k}.run")
        ours[k] = project_logits(f"{w}/{k}.run", TOKENS)
        shard = "40KB" if k == "llama3_sharded" else "5GB"
        exported[k] = export_hf(f"{w}/{k}.run", f"{w}/{k}.out", max_shard_size=shard)
    jobs = [dict(op="logits", dir=f"{w}/{k}.out", tokens=TOKENS, logits=f"{w}/{k}.out.npy") for k in CASES]
    reloaded = dict(zip(CASES, hf_jobs(jobs, f"{w}/hf2")))
    return dict(dir=w, built=built, ours=ours, exported=exported, reloaded=reloaded)


@pytest.mark.parametrize("case", list(CASES))
def test_import_matches_hf_logits(work, case):
    ref = np.load(f"{work['dir']}/{case}.ref.npy")
    assert work["built"][case]["loading"]["missing_keys"] == []
    assert np.abs(work["ours"][case] - ref).max() <= 1e-4, case
    assert ref.std() > 0.05  # a meaningful comparison: the random model's logits are not flat


@pytest.mark.parametrize("case", list(CASES))
def test_export_loads_in_hf_with_same_logits_and_tensors(work, case):
    w = work["dir"]
    info = work["reloaded"][case]
    assert info["class"] == work["built"][case]["class"]
    assert info["loading"] == CLEAN_LOADING
    ref = np.load(f"{w}/{case}.ref.npy")
    assert np.abs(np.load(f"{w}/{case}.out.npy") - ref).max() <= 1e-5
    assert_same_tensors(f"{w}/{case}", f"{w}/{case}.out")
    with open(f"{w}/{case}/config.json") as f:
        src = json.load(f)
    with open(f"{w}/{case}.out/config.json") as f:
        dst = json.load(f)
    assert dst["model_type"] == src["model_type"] and dst["architectures"] == src["architectures"]
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_key_value_heads", "tie_word_embeddings",
                "max_position_embeddings", "bos_token_id", "eos_token_id"):
        assert dst.get(key) == src.get(key), key


def test_sharded_folder_is_written_sharded(work):
    w = work["dir"]
    files = sorted(os.listdir(f"{w}/llama3_sharded.out"))
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files
    assert sum(f.endswith(".safetensors") for f in files) > 1
    with open(f"{w}/llama3_sharded.out/model.safetensors.index.json") as f:
        index = json.load(f)
    assert set(index["weight_map"]) == set(folder_tensors(f"{w}/llama3_sharded"))


def test_imported_run_has_fresh_optimizer_and_hf_source(work):
    from axlearn_like import checkpoint

    run = f"{work['dir']}/qwen2_yarn_bf16.run"
    _, variables, cfg = checkpoint.load(run)
    att = cfg.model.layer_pattern[0]
    assert (att.qkv_bias, att.out_bias, att.rope_type, att.rope_factor) == (True, False, "yarn", 4.0)
    assert cfg.model.tie_embeddings and "lm_head" not in variables["params"]
    assert os.path.exists(os.path.join(run, "hf_source", "config.json"))
    assert os.path.exists(os.path.join(run, "config.json"))


PROJECT_RUNS = {
    "llama": [],
    "qwen2": ["model.layer_pattern.attention.qkv_bias=true", "model.tie_embeddings=false"],
    "qwen3": ["model.layer_pattern.attention.qk_norm=true", "model.layer_pattern.attention.rope_type=yarn",
              "model.layer_pattern.attention.rope_factor=2", "model.layer_pattern.attention.rope_original_max_len=64"],
}


@pytest.fixture(scope="module")
def project_runs(tmp_path_factory):
    """Random project runs -> export_hf (HF logits in one subprocess) -> import_hf back."""
    from tools.hf.common import export_hf, import_hf

    w = str(tmp_path_factory.mktemp("hf_llama_project"))
    tokens = np.random.RandomState(1).randint(0, 300, (2, 10)).tolist()
    out = {}
    for k, overrides in PROJECT_RUNS.items():
        random_run("dense_lm", f"{w}/{k}.run", overrides + ["model.vocab_size=300"])
        out[k] = dict(ours=project_logits(f"{w}/{k}.run", tokens),
                      model_type=export_hf(f"{w}/{k}.run", f"{w}/{k}.out")[0])
    jobs = [dict(op="logits", dir=f"{w}/{k}.out", tokens=tokens, logits=f"{w}/{k}.hf.npy") for k in PROJECT_RUNS]
    for k, info in zip(PROJECT_RUNS, hf_jobs(jobs, f"{w}/hf")):
        out[k].update(info=info, hf=np.load(f"{w}/{k}.hf.npy"))
        import_hf(f"{w}/{k}.out", f"{w}/{k}.back")
    return w, out


@pytest.mark.parametrize("name", list(PROJECT_RUNS))
def test_round_trip_from_a_project_run(project_runs, name):
    """project run -> export_hf -> HF logits == project logits; -> import_hf -> the same parameters and model."""
    w, runs = project_runs
    r = runs[name]
    assert r["model_type"] == name
    assert r["info"]["loading"] == CLEAN_LOADING
    assert np.abs(r["hf"] - r["ours"]).max() <= 1e-4
    assert_same_run(f"{w}/{name}.run", f"{w}/{name}.back")


def _hf_folder(tmp_path, **config) -> str:
    """A config.json-only HF folder plus the tensors of the smallest llama (errors are raised from config.json)."""
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**dict(model_type="llama", **BASE), **config}))
    from tools.hf.common import write_safetensors

    write_safetensors(str(d / "model.safetensors"), {"model.embed_tokens.weight": np.zeros((4, 4), np.float32)})
    return str(d)


@pytest.mark.parametrize("config,needle", [
    (dict(model_type="mistral", sliding_window=64), "sliding_window: 64"),
    (dict(model_type="qwen2", use_sliding_window=True, max_window_layers=0), "use_sliding_window"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "rope_scaling: rope type 'dynamic'"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
    (dict(model_type="gpt2"), "model_type: 'gpt2' has no converter"),
])
def test_unsupported_fields_are_one_line_errors(tmp_path, capsys, config, needle):
    from tools import import_hf

    assert import_hf.main([_hf_folder(tmp_path, **config), str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and needle in err, err
    assert not os.path.exists(tmp_path / "run")


def test_tool_errors_on_foreign_folders_are_one_line(tmp_path, capsys, work):
    from tools import export_hf, import_hf, import_safetensors

    w = work["dir"]
    cases = [
        (import_hf, str(tmp_path / "missing"), str(tmp_path / "r1")),
        (import_hf, f"{w}/llama3_sharded.run", str(tmp_path / "r2")),  # a run dir, not an HF folder
        (import_hf, f"{w}/mistral", f"{w}/mistral.run"),  # a non-empty run dir
        (export_hf, str(tmp_path / "norun"), str(tmp_path / "o1")),
        (export_hf, f"{w}/mistral.run", f"{w}/mistral.out"),  # would overwrite an export
        (export_hf, f"{w}/mistral.run", str(tmp_path / "o2"), "--model-type", "qwen3"),  # cannot express it
        (import_safetensors, f"{w}/mistral", str(tmp_path / "r3")),  # an HF folder
    ]
    for tool, *args in cases:
        assert tool.main(args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, (args, err)
    assert "tools.import_hf" in err  # import_safetensors names the right tool for an HF folder
    # and once as a real command line: no traceback, no log lines, one line on stderr
    r = run_tool("tools.export_hf", str(tmp_path / "norun"), str(tmp_path / "o3"))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr


@pytest.mark.parametrize("damage,needle", [
    ("garbage", "is not a readable safetensors file"),
    ("missing_shard", "named in model.safetensors.index.json are missing"),
    ("bad_index", "is not a valid safetensors index"),
    ("pickles_only", "holds PyTorch pickles only"),
    ("bad_json", "config.json is not valid JSON"),
    ("no_model_type", "has no model_type"),
    ("axlearn_export", "use python -m tools.import_safetensors"),
    ("missing_tensor", "lm_head.weight: the tensor is missing"),
])
def test_damaged_or_foreign_hf_folders_are_one_line_errors(tmp_path, capsys, damage, needle):
    """import_hf on a damaged or foreign folder: one `error:` line naming what is wrong, nothing written."""
    from tools import import_hf

    d = _hf_folder(tmp_path)
    st, cfg = os.path.join(d, "model.safetensors"), os.path.join(d, "config.json")
    if damage == "garbage":
        with open(st, "wb") as f:
            f.write(b"\xff" * 64)
    elif damage in ("missing_shard", "bad_index"):
        os.remove(st)
        with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
            f.write(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}) if damage == "missing_shard"
                    else "{")
    elif damage == "pickles_only":
        os.remove(st)
        open(os.path.join(d, "pytorch_model.bin"), "wb").close()
    elif damage == "bad_json":
        open(cfg, "w").write("{")
    elif damage == "no_model_type":
        open(cfg, "w").write(json.dumps({"architectures": ["X"]}))
    elif damage == "axlearn_export":
        open(cfg, "w").write(json.dumps({"_type": "axlearn_like.trainer:ExperimentConfig"}))
    assert import_hf.main([d, str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    assert not os.path.exists(tmp_path / "run")
