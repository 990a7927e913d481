"""DeepSeek-V2 / V2-Lite / V3 against Hugging Face transformers (float32, max abs diff <= 1e-4).

Layer by layer: MLA vs DeepseekV3Attention / DeepseekV2Attention (q latent or full-rank q, interleaved or
half-split rope, YaRN with mscale, v wider / narrower than q.k, packed documents) and our MoE vs
DeepseekV3MoE (sigmoid, e_score_correction_bias, groups, norm_topk_prob, routed_scaling_factor) /
DeepseekV2Moe (softmax, greedy / group_limited_greedy). Whole models: tools.import_hf of *ForCausalLM
folders (float32 and sharded bf16) gives HF's logits; tools.export_hf writes the same tensors and HF reloads
the same logits; a project run of the `moe` preset deepseek_v3 (its routing bias trained away from zero)
exports to DeepseekV3ForCausalLM with the bias as e_score_correction_bias and imports back exactly.
The HF side (tests/tools/hf_deepseek_side.py) runs twice per module in the interop venv."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from axlearn_like.config import validate_tree
from models.mla import MLA
from models.moe import MoE, RoutingBias
from tests.core.helpers import REPO, env as run_env
from tests.hf_interop import folder_tensors, project_logits, run_interop, run_tool
from tools.hf import common, deepseek as ds

SIDE = Path(__file__).with_name("hf_deepseek_side.py")
TOL = 1e-4
MODELS = [(case, prec) for case in ("v3", "v2_lite", "v2") for prec in ("f32", "bf16")]
TINY_RUN = ["trainer.steps=2", "data.seq_len=32", "data.global_batch_size=4", "data.max_bytes=200000",
            "model.sample.tokens=0", "trainer.progress=false", "trainer.eval_batches=0", "checkpoint.every_steps=2",
            "model.ffn_pattern.moe.gamma=0.05"]


def _side(*args):
    r = run_interop([str(SIDE), *map(str, args)])
    assert r.returncode == 0, r.stderr[-3000:]


class _Npz:
    """The TensorReader interface (get / has) over the side's .npz layer dumps."""

    def __init__(self, path):
        self.d = np.load(path)

    def get(self, name):
        return np.asarray(self.d["w." + name], np.float32)

    def has(self, name):
        return "w." + name in self.d.files


def _bias(stats) -> list[np.ndarray]:
    leaves = jax.tree.leaves(stats, is_leaf=lambda x: isinstance(x, RoutingBias))
    return [np.asarray(x.bias) for x in leaves if isinstance(x, RoutingBias)]


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """HF layer cases and models, every model imported and exported, a trained project run exported and
    re-imported, then one HF pass over all exports."""
    root = tmp_path_factory.mktemp("hf_deepseek")
    _side("make", root)
    tokens = np.load(root / "tokens.npy")
    out = {"root": root, "tokens": tokens, "ours": {}, "exports": []}
    for case, prec in MODELS:
        run, exp = root / f"run_{case}_{prec}", root / f"export_{case}_{prec}"
        common.import_hf(str(root / case / prec), str(run))
        common.export_hf(str(run), str(exp))
        out["ours"][case, prec] = project_logits(str(run), tokens)
        out["exports"].append(exp)
    # A project run: train the tiny DeepSeek-V3 preset, export it with the command line tools, import it back.
    proj = root / "project_run"
    cmd = [sys.executable, "-m", "recipes.moe", "--preset", "deepseek_v3", "--run-dir", str(proj)]
    for s in TINY_RUN:
        cmd += ["--set", s]
    r = subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    exp = root / "export_project"
    r = run_tool("tools.export_hf", str(proj), str(exp))
    assert r.returncode == 0, r.stderr[-2000:]
    back = root / "project_reimported"
    r = run_tool("tools.import_hf", str(exp), str(back))
    assert r.returncode == 0, r.stderr[-2000:]
    out.update(project=proj, project_export=exp, project_back=back)
    out["exports"].append(exp)
    _side("check", *out["exports"])
    return out


@pytest.mark.parametrize("case", ["v3_qlora_yarn", "v3_fullq_plain_vwide", "v2lite_yarn_packed", "v2_qlora"])
def test_mla_matches_hf_attention(hf, case):
    root = hf["root"]
    d, cfg_json = np.load(root / f"attn_{case}.npz"), json.load(open(root / f"attn_{case}.json"))
    cfg = ds.mla_config(cfg_json)
    validate_tree(cfg)
    params = ds.mla_from_hf(_Npz(root / f"attn_{case}.npz"), "", cfg, ds.interleaved(cfg_json))
    seg = jnp.asarray(d["seg"]) if "packed" in case else None
    y = MLA(cfg, jnp.float32).apply({"params": params}, jnp.asarray(d["x"]), positions=jnp.asarray(d["pos"]),
                                    segment_ids=seg)
    err = float(np.max(np.abs(np.asarray(y) - d["y"])))
    assert err <= TOL, f"{case}: max abs diff {err:.2e} (outputs up to {np.abs(d['y']).max():.2f})"


@pytest.mark.parametrize("case", ["v3_groups", "v3_nonorm", "v2_group_limited", "v2_greedy"])
def test_moe_matches_hf_moe_block(hf, case):
    root = hf["root"]
    d, cfg_json = np.load(root / f"moe_{case}.npz"), json.load(open(root / f"moe_{case}.json"))
    cfg = ds.moe_config(cfg_json)
    params, bias = ds.moe_from_hf(_Npz(root / f"moe_{case}.npz"), "", cfg)  # transformers' fused in-memory layout
    assert np.any(bias != 0) == case.startswith("v3")
    stats = {"router": RoutingBias(bias=jnp.asarray(bias), load=jnp.zeros(cfg.num_experts))}
    scale = max(1.0, float(np.abs(d["y"]).max()))
    for dispatch in ("grouped", "dense"):
        m = MoE(cfg.__class__(**{**cfg.__dict__, "dispatch": dispatch}), d_model=16, dtype=jnp.float32)
        y, _ = m.apply({"params": params, "stats": stats}, jnp.asarray(d["x"]), train=False, mutable=["intermediates"])
        err = float(np.max(np.abs(np.asarray(y) - d["y"])))
        assert err <= TOL * scale, f"{case}/{dispatch}: max abs diff {err:.2e} (outputs up to {scale:.1f})"


@pytest.mark.parametrize("case,prec", MODELS)
def test_import_gives_hf_logits_and_export_round_trips(hf, case, prec):
    root = hf["root"]
    ref = np.load(root / case / prec / "hf_logits.npy")
    err = float(np.max(np.abs(hf["ours"][case, prec] - ref)))
    assert err <= TOL, f"{case}/{prec}: logits max abs diff {err:.2e} (logits up to {np.abs(ref).max():.2f})"
    src, exp = folder_tensors(str(root / case / prec)), folder_tensors(str(root / f"export_{case}_{prec}"))
    assert set(exp) == set(src)
    for name, value in src.items():
        assert exp[name].dtype == value.dtype, name
        np.testing.assert_array_equal(exp[name], value, err_msg=name)
    reloaded = np.load(root / f"export_{case}_{prec}" / "hf_logits.npy")
    assert float(np.max(np.abs(reloaded - ref))) <= TOL


def test_project_run_exports_its_routing_bias_and_imports_back(hf):
    from axlearn_like import checkpoint

    tokens = hf["tokens"]
    ours = project_logits(str(hf["project"]), tokens)
    _, variables, _ = checkpoint.load(str(hf["project"]))
    biases = _bias(variables["stats"])
    assert len(biases) == 3 and all(np.any(b != 0) for b in biases)  # trained away from zero
    exported = folder_tensors(str(hf["project_export"]))
    cfg = json.load(open(hf["project_export"] / "config.json"))
    assert cfg["model_type"] == "deepseek_v3" and cfg["first_k_dense_replace"] == 1
    for i, b in enumerate(biases, start=1):
        np.testing.assert_array_equal(exported[f"model.layers.{i}.mlp.gate.e_score_correction_bias"], b)
    err = float(np.max(np.abs(np.load(hf["project_export"] / "hf_logits.npy") - ours)))
    assert err <= TOL, f"HF logits of the exported project run differ by {err:.2e}"
    np.testing.assert_allclose(project_logits(str(hf["project_back"]), tokens), ours, atol=1e-6)
    _, back, _ = checkpoint.load(str(hf["project_back"]))
    for a, b in zip(_bias(back["stats"]), biases):
        np.testing.assert_array_equal(a, b)


BASE_V3 = dict(model_type="deepseek_v3", vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
               num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=8, q_lora_rank=None,
               qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4, n_routed_experts=4, num_experts_per_tok=2,
               n_group=2, topk_group=1, n_shared_experts=1, first_k_dense_replace=1, max_position_embeddings=4096)


@pytest.mark.parametrize("patch,field", [
    (dict(quantization_config={"quant_method": "fp8"}), "quantization_config"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(num_key_value_heads=1), "num_key_value_heads"),
    (dict(moe_layer_freq=2), "moe_layer_freq"),
    (dict(scoring_func="softmax"), "scoring_func"),
    (dict(topk_method="greedy"), "topk_method"),
    (dict(n_group=3), "n_group"),
    (dict(num_experts_per_tok=3), "num_experts_per_tok"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "rope_scaling"),
    (dict(model_type="deepseek_v2", topk_method="noaux_tc"), "topk_method"),
    (dict(model_type="deepseek_v2", norm_topk_prob=True), "norm_topk_prob"),
    (dict(model_type="deepseek_v2", scoring_func="sigmoid"), "scoring_func"),
])
def test_unmappable_fields_are_one_line_errors(patch, field):
    with pytest.raises(common.UnsupportedError) as e:
        ds.model_fields({**BASE_V3, **patch})
    msg = str(e.value)
    assert msg.startswith(field + ":") and "\n" not in msg, msg


def test_legacy_rope_spelling_maps_like_rope_parameters():
    legacy = ds.mla_config({**BASE_V3, "rope_theta": 5e4, "rope_scaling": {
        "type": "yarn", "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
        "beta_fast": 32, "beta_slow": 1}})
    new = ds.mla_config({**BASE_V3, "rope_parameters": {
        "rope_type": "yarn", "rope_theta": 5e4, "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096}})
    assert legacy == new and legacy.rope_factor == 40.0 and legacy.rope_theta == 5e4


def test_export_refuses_models_without_an_exact_deepseek_counterpart():
    import dataclasses

    from recipes import moe as moe_recipe

    gqa = moe_recipe.config().model  # GQA attention + MoE: no DeepSeek layout
    assert "mla" in ds.accepts(gqa) and "\n" not in ds.accepts(gqa)
    model = moe_recipe.deepseek_v3().model
    assert ds.accepts(model) is None
    limited = dataclasses.replace(model, ffn_pattern=tuple(
        dataclasses.replace(f, device_limited_m=2) if hasattr(f, "device_limited_m") else f for f in model.ffn_pattern))
    assert ds.accepts(limited).startswith("model.ffn_pattern.moe.device_limited_m:")
    v2 = dataclasses.replace(model, ffn_pattern=tuple(
        dataclasses.replace(f, score_func="softmax", group_score="max", normalize=False)
        if hasattr(f, "score_func") else f
        for f in model.ffn_pattern))
    assert ds.accepts(v2) is None
    stats = {"stack": {f"layer_{i}": {"ffn": {"router": np.full((16,), 0.01 * i, np.float32)}} for i in range(1, 4)}}
    params = jax.tree.map(np.asarray, jax.tree.map(lambda x: getattr(x, "value", x), v2.build().init(
        jax.random.key(0), {"inputs": jnp.zeros((1, 4), jnp.int32)})["params"], is_leaf=lambda x: hasattr(x, "value")))
    with pytest.raises(common.UnsupportedError,
                       match=r"^model\.ffn_pattern\.moe\.gamma: layer 1 has a non-zero routing bias"):
        ds.to_hf(v2, params, stats, None, None)
