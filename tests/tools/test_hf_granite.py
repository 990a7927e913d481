"""GraniteMoeHybrid (`GraniteMoeHybridForCausalLM`) <-> the mamba2 recipe's Mamba-2 + attention stacks, against
transformers itself.

Cases: Mamba-2 / attention alternating (float32, tied, n_groups 1) and a 3-layer period with attention biases,
linear rope scaling and n_groups 2 (bf16, sharded, untied; the reference's gated norm per group as for the
mamba2 family, tests/hf_side.py "granite_group_norm", and a test pins that transformers' CPU path differs).
Then export -> from_pretrained(OUT) logits and bit-equal tensors; round trips from project runs (the `hybrid`
preset and the default Mamba-2 + MLP recipe); the imported run continues training with the recipe's command;
every Granite field without an exact counterpart is a one-line error; tools.bench_generate's HF anchor decodes
the recipe's Mamba-only export. Two HF subprocesses in all.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tests.hf_interop import (
    assert_export_reloads,
    assert_hf_loaded,
    assert_same_run,
    hf_jobs,
    project_logits,
    random_run,
)

BASE = dict(model_type="granitemoehybrid", vocab_size=300, hidden_size=64, num_attention_heads=4,
            num_key_value_heads=2, attention_multiplier=0.25, position_embedding_type="rope", num_local_experts=0,
            shared_intermediate_size=96, intermediate_size=96, mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16,
            mamba_expand=2, mamba_d_conv=4, mamba_chunk_size=8, max_position_embeddings=256, rms_norm_eps=1e-5)
CASES = {
    "alternating_f32": (dict(BASE, num_hidden_layers=4, layer_types=["mamba", "attention", "mamba", "attention"],
                             mamba_n_groups=1, tie_word_embeddings=True), "float32", None, None),
    "period3_bf16_sharded": (dict(BASE, num_hidden_layers=3, layer_types=["mamba", "mamba", "attention"],
                                  mamba_n_groups=2, tie_word_embeddings=False, attention_bias=True,
                                  rope_scaling={"rope_type": "linear", "factor": 2.0}),
                             "bfloat16", "40KB", "granite_group_norm"),
}
PROJECT = {  # name: (preset, overrides, HF-side patch)
    "hybrid": ("hybrid", ["model.layer_pattern.mamba2.ngroups=2", "model.layer_pattern.attention.qkv_bias=true",
                          "model.layer_pattern.attention.out_bias=true", "model.tie_embeddings=false"],
               "granite_group_norm"),
    "mamba2_mlp": (None, [], None),
}
TOKENS = np.random.RandomState(0).randint(0, 258, (2, 19)).tolist()  # 19: chunks of 8 plus a partial one


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from tools.hf.common import export_hf, import_hf

    w = str(tmp_path_factory.mktemp("hf_granite"))
    ours, exported = {}, {}
    for k, (preset, overrides, _) in PROJECT.items():  # project runs first: their exports join the first HF pass
        random_run("mamba2", f"{w}/{k}.run", overrides, preset=preset)
        ours[k] = project_logits(f"{w}/{k}.run", TOKENS)
        exported[k] = export_hf(f"{w}/{k}.run", f"{w}/{k}.out")[0]
    jobs = [dict(op="build", config=c, dir=f"{w}/{k}", dtype=dt, max_shard_size=shard, patch=patch, tokens=TOKENS,
                 logits=f"{w}/{k}.ref.npy") for k, (c, dt, shard, patch) in CASES.items()]
    jobs.append(dict(op="logits", dir=f"{w}/period3_bf16_sharded", tokens=TOKENS, logits=f"{w}/cpu_path.npy"))
    jobs += [dict(op="logits", dir=f"{w}/{k}.out", tokens=TOKENS, logits=f"{w}/{k}.out.npy", patch=PROJECT[k][2])
             for k in PROJECT]
    jobs += [dict(op="greedy", dir=d, tokens=TOKENS, new_tokens=4)
             for d in (f"{w}/mamba2_mlp.out", f"{w}/alternating_f32")]
    first = hf_jobs(jobs, f"{w}/hf1")
    built, project_reloaded = dict(zip(CASES, first)), dict(zip(PROJECT, first[len(CASES) + 1:]))
    greedy = dict(zip(("mamba_only", "hybrid"), first[-2:]))
    for k in CASES:
        import_hf(f"{w}/{k}", f"{w}/{k}.run")
        ours[k] = project_logits(f"{w}/{k}.run", TOKENS)
        exported[k] = export_hf(f"{w}/{k}.run", f"{w}/{k}.out", max_shard_size="40KB" if "sharded" in k else "5GB")[0]
    jobs = [dict(op="logits", dir=f"{w}/{k}.out", tokens=TOKENS, logits=f"{w}/{k}.out.npy", patch=CASES[k][3])
            for k in CASES]
    reloaded = dict(zip(CASES, hf_jobs(jobs, f"{w}/hf2")), **project_reloaded)
    for k in PROJECT:
        import_hf(f"{w}/{k}.out", f"{w}/{k}.back")
    return dict(dir=w, built=built, ours=ours, exported=exported, reloaded=reloaded, greedy=greedy)


@pytest.mark.parametrize("case", list(CASES))
def test_import_matches_hf_logits(work, case):
    ref = np.load(f"{work['dir']}/{case}.ref.npy")
    assert_hf_loaded(work["built"][case], "GraniteMoeHybridForCausalLM")
    assert np.abs(work["ours"][case] - ref).max() <= 1e-4
    assert ref.std() > 0.05


def test_cpu_path_of_transformers_ignores_groups(work):
    """Why the n_groups > 1 reference is patched: transformers' CPU gated norm is over all of d_inner."""
    w = work["dir"]
    assert np.abs(np.load(f"{w}/cpu_path.npy") - np.load(f"{w}/period3_bf16_sharded.ref.npy")).max() > 1e-3


@pytest.mark.parametrize("case", list(CASES))
def test_export_loads_in_hf_with_same_logits_and_tensors(work, case):
    w = work["dir"]
    assert work["exported"][case] == "granitemoehybrid"
    out = assert_export_reloads(w, case, work["reloaded"][case], "GraniteMoeHybridForCausalLM")
    for key, value in CASES[case][0].items():
        if key not in ("layer_types", "rope_scaling"):
            assert out[key] == value, key
    assert out["layer_types"] == CASES[case][0]["layer_types"]
    if "sharded" in case:
        assert os.path.exists(f"{w}/{case}.out/model.safetensors.index.json")


def test_bench_generate_anchor_decodes_mamba_only_exports_by_forward_calls(work):
    """tools.bench_generate's HF anchor (tools/hf_anchor.py): transformers' generate fails for a Granite stack of
    Mamba layers only (the mamba2 recipe's default export, as the mamba2:gpu_340m preset), so the anchor decodes
    by HF forward calls on HF's cache, equal to greedy re-running the whole sequence; a hybrid keeps generate."""
    mamba_only, hybrid = work["greedy"]["mamba_only"], work["greedy"]["hybrid"]
    assert mamba_only["method"].startswith("forward loop") and "get_seq_length" in mamba_only["method"], mamba_only
    assert hybrid["method"] == "generate, static cache", hybrid["method"]
    for r in (mamba_only, hybrid):
        assert r["tokens"] == r["recompute"] and len(r["tokens"][0]) == len(TOKENS[0]) + 4
        assert r["timing"]["method"] == r["method"] and r["timing"]["decode_tok_s"] > 0


def test_imported_model_is_the_hybrid_stack(work):
    from axlearn_like import checkpoint
    from models.attention import AttentionConfig
    from models.layers import MLPConfig
    from models.ssm import Mamba2Config

    _, variables, cfg = checkpoint.load(f"{work['dir']}/alternating_f32.run")
    m = cfg.model
    assert [type(e) for e in m.layer_pattern] == [Mamba2Config, AttentionConfig]  # one period of the 4 layers
    assert m.num_layers == 4 and m.tie_embeddings and m.norm_eps == 1e-5
    assert [type(e) for e in m.ffn_pattern] == [MLPConfig] and m.ffn_pattern[0].mlp_dim == 96
    assert (m.layer_pattern[1].num_heads, m.layer_pattern[1].num_kv_heads, m.layer_pattern[1].head_dim) == (4, 2, 16)
    assert set(variables["params"]["stack"]["layer_1"]["mixer"]) == {"query", "key", "value", "out"}
    _, _, cfg3 = checkpoint.load(f"{work['dir']}/period3_bf16_sharded.run")
    a = cfg3.model.layer_pattern[2]
    assert (a.qkv_bias, a.out_bias, a.rope_type, a.rope_factor) == (True, True, "linear", 2.0)
    assert cfg3.model.layer_pattern[0].ngroups == 2


@pytest.mark.parametrize("name", list(PROJECT))
def test_round_trip_from_a_project_run(work, name):
    """project run -> export_hf -> HF logits == project logits; -> import_hf -> the same parameters and model."""
    w = work["dir"]
    assert work["exported"][name] == "granitemoehybrid"
    assert_hf_loaded(work["reloaded"][name], "GraniteMoeHybridForCausalLM")
    assert np.abs(np.load(f"{w}/{name}.out.npy") - work["ours"][name]).max() <= 1e-4
    assert_same_run(f"{w}/{name}.run", f"{w}/{name}.back")


def test_imported_run_continues_training_with_the_recipe(work, tmp_path, capsys):
    """`python -m recipes.mamba2 --run-dir RUN_DIR` (its entry point, in-process) resumes the import (step 0, fresh
    optimizer state) and trains on."""
    import shutil

    from axlearn_like import cli

    run = tmp_path / "run"
    shutil.copytree(f"{work['dir']}/alternating_f32.run", run)
    argv = ["--run-dir", str(run)]
    for s in ("trainer.steps=1", "trainer.progress=false", "trainer.eval_batches=0", "model.sample.tokens=0",
              "data.seq_len=16", "data.max_bytes=200000", "checkpoint.every_steps=1"):
        argv += ["--set", s]
    assert cli.recipe_main("mamba2", argv) == 0, capsys.readouterr().err[-3000:]
    assert "Resuming from checkpoint at step 0" in capsys.readouterr().out
    assert os.path.isdir(run / "checkpoints" / "1")


def _folder(tmp_path, **config) -> str:
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**BASE, "num_hidden_layers": 2, "layer_types": ["mamba", "attention"],
                                               **config}))
    from tools.hf.common import write_safetensors

    write_safetensors(str(d / "model.safetensors"), {"model.embed_tokens.weight": np.zeros((4, 4), np.float32)})
    return str(d)


@pytest.mark.parametrize("config,needle", [
    (dict(embedding_multiplier=12.0), "embedding_multiplier: 12.0"),
    (dict(residual_multiplier=0.22), "residual_multiplier: 0.22"),
    (dict(logits_scaling=6.0), "logits_scaling: 6.0"),
    (dict(attention_multiplier=0.0078125), "attention_multiplier: 0.0078125"),
    (dict(num_local_experts=4), "num_local_experts: 4"),
    (dict(position_embedding_type=None), "position_embedding_type: None"),
    (dict(position_embedding_type="nope"), "position_embedding_type: 'nope'"),
    (dict(mamba_proj_bias=True), "mamba_proj_bias"),
    (dict(mamba_conv_bias=False), "mamba_conv_bias"),
    (dict(time_step_limit=[0.0, 0.1]), "time_step_limit"),
    (dict(layer_types=["mamba", "sliding_attention"]), "layer_types: 'sliding_attention'"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(head_dim=32), "head_dim"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "rope_scaling: rope type 'dynamic'"),
])
def test_unsupported_fields_are_one_line_errors(tmp_path, capsys, config, needle):
    from tools import import_hf

    assert import_hf.main([_folder(tmp_path, **config), str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    assert not os.path.exists(tmp_path / "run")


def test_missing_num_local_experts_means_transformers_default_of_8(tmp_path, capsys):
    from tools import import_hf

    path = _folder(tmp_path)
    cfg = json.loads(open(f"{path}/config.json").read())
    del cfg["num_local_experts"]
    open(f"{path}/config.json", "w").write(json.dumps(cfg))
    assert import_hf.main([path, str(tmp_path / "run")]) == 2
    assert "num_local_experts: 8" in capsys.readouterr().err


def test_export_refuses_stacks_granite_cannot_express():
    import dataclasses

    from models.attention import AttentionConfig
    from models.layers import MLPConfig
    from models.moe import MoEConfig
    from recipes import mamba2 as recipe
    from tools.hf import family_modules, granite

    assert granite in family_modules()
    model = recipe.hybrid().model
    assert granite.accepts(model) is None and granite.accepts(recipe.config().model) is None
    qk = dataclasses.replace(model, layer_pattern=(*model.layer_pattern[:3],
                                                   dataclasses.replace(model.layer_pattern[3], qk_norm=True)))
    assert "q/k norm" in granite.accepts(qk)
    wide = dataclasses.replace(model, layer_pattern=(*model.layer_pattern[:3],
                                                     AttentionConfig(num_heads=4, head_dim=64)))
    assert "head_dim x num_heads" in granite.accepts(wide)
    moe = dataclasses.replace(model, ffn_pattern=(MLPConfig(mlp_dim=256), MoEConfig()))
    assert "'mlp'" in granite.accepts(moe)
