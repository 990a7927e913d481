"""DeepSeek-V2 / V2-Lite / V3 against Hugging Face transformers (float32, max abs diff <= 1e-4): MLA vs
DeepseekV3Attention / DeepseekV2Attention and the MoE block vs DeepseekV3MoE / DeepseekV2Moe layer by layer,
whole *ForCausalLM models (float32 and sharded bf16 checkpoints), export back (HF reloads the same logits, the
tensors equal the originals), and the one-line errors for config fields that do not map.

The HF side (tests/tools/hf_deepseek_side.py) runs once per module in the interop venv."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from axlearn_like.config import validate_tree
from models.decoder import Decoder, DecoderConfig
from models.mla import MLA
from models.moe import MoE, RoutingBias
from tools.hf import deepseek as ds

ROOT = Path(__file__).resolve().parents[2]
SIDE = Path(__file__).with_name("hf_deepseek_side.py")
TOL = 1e-4


def _interop_python() -> str | None:
    for p in (os.environ.get("AXL_INTEROP_PYTHON"), ROOT / ".venv-interop" / "bin" / "python"):
        if p and Path(p).exists():
            return str(p)
    return None


def _side(*args):
    py = _interop_python()
    if py is None:
        pytest.skip("no interop venv (torch + transformers): run scripts/bootstrap.sh or set AXL_INTEROP_PYTHON")
    r = subprocess.run([py, str(SIDE), *map(str, args)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf_deepseek")
    _side("make", out)
    return out


def _load_dir(d):
    from safetensors.numpy import load_file

    tensors = {}
    for f in sorted(glob.glob(f"{d}/*.safetensors")):
        tensors.update(load_file(f))
    return json.load(open(f"{d}/config.json")), tensors


def _f32(tensors):
    return lambda n: np.asarray(tensors[n], np.float32)


def _routing_stats(stats):
    return jax.tree.map(lambda b: RoutingBias(bias=jnp.asarray(b), load=jnp.zeros_like(jnp.asarray(b))), stats)


def _logits(fields, params, stats, tokens):
    cfg = DecoderConfig(**fields, dtype="float32")
    validate_tree(cfg)
    out, _ = Decoder(cfg).apply({"params": params, "stats": _routing_stats(stats)}, jnp.asarray(tokens),
                                mutable=["intermediates"])
    return cfg, np.asarray(out)


@pytest.mark.parametrize("case", ["v3_qlora_yarn", "v3_fullq_plain_vwide", "v2lite_yarn_packed", "v2_qlora"])
def test_mla_matches_hf_attention(hf, case):
    d, cfg_json = np.load(hf / f"attn_{case}.npz"), json.load(open(hf / f"attn_{case}.json"))
    cfg = ds.mla_config(cfg_json)
    validate_tree(cfg)
    params = ds.mla_from_hf(lambda n: d["w." + n], "", cfg, ds._interleaved(cfg_json))
    seg = jnp.asarray(d["seg"]) if "packed" in case else None
    y = MLA(cfg, jnp.float32).apply({"params": params}, jnp.asarray(d["x"]), positions=jnp.asarray(d["pos"]), segment_ids=seg)
    err = float(np.max(np.abs(np.asarray(y) - d["y"])))
    assert err <= TOL, f"{case}: max abs diff {err:.2e} (outputs up to {np.abs(d['y']).max():.2f})"


@pytest.mark.parametrize("case", ["v3_groups", "v3_nonorm", "v2_group_limited", "v2_greedy"])
def test_moe_matches_hf_moe_block(hf, case):
    d, cfg_json = np.load(hf / f"moe_{case}.npz"), json.load(open(hf / f"moe_{case}.json"))
    cfg = ds.moe_config(cfg_json)
    names = {k[2:] for k in d.files if k.startswith("w.")}
    params, bias = ds.moe_from_hf(lambda n: d["w." + n], names.__contains__, "", cfg)  # the fused in-memory layout
    if case.startswith("v3"):
        assert np.any(bias != 0)
    stats = {"router": RoutingBias(bias=jnp.asarray(bias), load=jnp.zeros(cfg.num_experts))}
    for dispatch in ("grouped", "dense"):
        m = MoE(cfg.__class__(**{**cfg.__dict__, "dispatch": dispatch}), d_model=16, dtype=jnp.float32)
        y, _ = m.apply({"params": params, "stats": stats}, jnp.asarray(d["x"]), train=False, mutable=["intermediates"])
        err = float(np.max(np.abs(np.asarray(y) - d["y"])))
        assert err <= TOL * max(1.0, float(np.abs(d["y"]).max())), f"{case}/{dispatch}: max abs diff {err:.2e}"


@pytest.mark.parametrize("case", ["v3", "v2_lite", "v2"])
@pytest.mark.parametrize("prec", ["f32", "bf16"])
def test_model_logits_match_hf_and_export_round_trips(hf, tmp_path, case, prec):
    src = hf / case / prec
    hf_cfg, tensors = _load_dir(src)
    fields, params, stats, skipped = ds.from_hf(hf_cfg, _f32(tensors), tensors.keys())
    assert not skipped
    cfg, ours = _logits(fields, params, stats, np.load(hf / "tokens.npy"))
    ref = np.load(src / "hf_logits.npy")
    err = float(np.max(np.abs(ours - ref)))
    assert err <= TOL, f"{case}/{prec}: logits max abs diff {err:.2e} (logits up to {np.abs(ref).max():.2f})"

    out_cfg = ds.hf_config(cfg, dtype="float32", max_position_embeddings=hf_cfg["max_position_embeddings"], base=hf_cfg)
    back = ds.to_hf(cfg, params, stats, out_cfg)
    assert set(back) == set(tensors)
    for name, value in back.items():
        np.testing.assert_array_equal(value, _f32(tensors)(name), err_msg=name)
    if prec == "f32":  # HF reloads the export and computes the same logits
        from safetensors.numpy import save_file

        save_file(back, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
        (tmp_path / "config.json").write_text(json.dumps(out_cfg))
        _side("check", tmp_path)
        err = float(np.max(np.abs(np.load(tmp_path / "hf_logits.npy") - ours)))
        assert err <= TOL, f"{case}: exported model's HF logits differ by {err:.2e}"


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
    (dict(rope_scaling={"type": "yarn", "factor": 2.0}), "rope_scaling.original_max_position_embeddings"),
    (dict(model_type="deepseek_v2", topk_method="noaux_tc"), "topk_method"),
    (dict(model_type="deepseek_v2", norm_topk_prob=True), "norm_topk_prob"),
    (dict(model_type="deepseek_v2", scoring_func="sigmoid"), "scoring_func"),
])
def test_unmappable_fields_are_one_line_errors(patch, field):
    with pytest.raises(ds.DeepseekConfigError) as e:
        ds.model_kinds({**BASE_V3, **patch})
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
