"""Llama / Mistral / Qwen2 / Qwen2.5 / Qwen3 (`*ForCausalLM`) <-> the `dense_lm` recipe.

Every layer an "attention" mixer (GQA, RoPE in the half-split layout both sides use, optional q/k/v and
output biases, Qwen3's per-head q/k RMSNorm before RoPE) and an "mlp" FFN (SwiGLU). config.json fields:
  hidden_size, num_hidden_layers, vocab_size, intermediate_size -> d_model, num_layers, vocab_size, mlp_dim
  num_attention_heads, num_key_value_heads, head_dim (default hidden_size / heads) -> num_heads, num_kv_heads, head_dim
  rms_norm_eps -> norm_eps (every RMSNorm, q/k norms included); tie_word_embeddings -> tie_embeddings
  rope_theta + rope_scaling (or rope_parameters): default, linear, llama3, yarn -> rope_type, rope_factor, ...
  attention_bias (Llama, Qwen3: q, k, v and o) / always q, k, v (Qwen2) -> qkv_bias, out_bias
Tensors (torch Linear weights are [out, in]; ours [in, ..., out]):
  model.embed_tokens.weight [V, D]                 embed/embedding
  model.layers.i.input_layernorm.weight            stack/layer_i/mixer_norm/scale
  self_attn.{q,k,v}_proj.weight [H*Dh, D] (+ bias) mixer/{query,key,value}/kernel [D, H, Dh] (+ bias [H, Dh])
  self_attn.o_proj.weight [D, H*Dh] (+ bias)       mixer/out/kernel [H, Dh, D] (+ bias [D])
  self_attn.{q,k}_norm.weight [Dh] (Qwen3)         mixer/{query,key}_norm/scale
  model.layers.i.post_attention_layernorm.weight   stack/layer_i/ffn_norm/scale
  mlp.{gate,up}_proj.weight [F, D], down_proj [D, F]   ffn/wi_gate, wi_up [D, F], wo [F, D]
  model.norm.weight                                stack/final_norm/scale
  lm_head.weight [V, D]                            lm_head/kernel [D, V] (absent when tied)
Not mapped (one-line errors): sliding-window attention, other rope types, partial rotary, biases on the MLP,
activations other than SiLU, attention dropout.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from models.attention import AttentionConfig
from models.decoder import DecoderConfig
from models.layers import MLPConfig
from tools.hf.common import (
    UnsupportedError,
    base_fields,
    check,
    heads_in,
    heads_out,
    linear_in,
    linear_out,
    rope_parameters,
)

MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM"}
RECIPE = "dense_lm"
IGNORED = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)
ROPE_KEYS = ("rope_theta", "rope_scaling", "rope_parameters")


# ---------------------------------------------------------------------------------------- HF -> project
def _biases(hf: dict) -> tuple[bool, bool]:
    mt = hf["model_type"]
    if mt == "qwen2":
        return True, False
    if mt == "mistral":
        return False, False
    bias = bool(hf.get("attention_bias", False))
    return bias, bias


def _check_supported(hf: dict) -> None:
    mt = hf["model_type"]
    check(mt in MODEL_TYPES, "model_type", f"{mt!r} is not one of {list(MODEL_TYPES)}")
    check(hf.get("hidden_act", "silu") == "silu", "hidden_act", f"{hf.get('hidden_act')!r}: only 'silu' (SwiGLU) maps")
    check(not hf.get("mlp_bias", False), "mlp_bias", "true is not supported (the SwiGLU MLP has no biases)")
    check(not hf.get("attention_dropout"), "attention_dropout", "must be 0 (the project's attention has no dropout)")
    check(hf.get("pretraining_tp", 1) == 1, "pretraining_tp", "must be 1")
    if mt == "mistral":
        window = hf.get("sliding_window")
        check(window is None, "sliding_window",
              f"{window} (attention to the last {window} tokens only) has no counterpart; set it to null in "
              f"config.json "
              f"to import with full causal attention (the same model on sequences of up to {window} tokens)")
    if mt in ("qwen2", "qwen3"):
        types = hf.get("layer_types") or []
        sliding = bool(hf.get("use_sliding_window", False)) and (
            not types or "sliding_attention" in types or hf.get("max_window_layers", 0) < hf["num_hidden_layers"])
        check(not sliding and "sliding_attention" not in types, "use_sliding_window",
              "sliding-window attention layers have no counterpart; set use_sliding_window false (full attention)")


def attention_config(hf: dict) -> AttentionConfig:
    heads = hf["num_attention_heads"]
    rp = rope_parameters(hf)
    kind = rp["rope_type"]
    check(kind in ("default", "linear", "llama3", "yarn"), "rope_scaling",
          f"rope type {kind!r} has no counterpart; 'default', 'linear', 'llama3' and 'yarn' map exactly")
    check(rp.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) in (None, 1.0), "partial_rotary_factor",
          "only 1.0 (every head dim rotates) maps")
    qkv_bias, out_bias = _biases(hf)
    kw: dict[str, Any] = {}
    if kind != "default":
        factor = rp.get("factor")
        if factor is None and kind == "yarn":
            factor = hf["max_position_embeddings"] / rp["original_max_position_embeddings"]
        check(factor is not None, "rope_scaling.factor", f"rope type {kind!r} needs a factor")
        kw.update(rope_type=kind, rope_factor=float(factor))
    if kind in ("llama3", "yarn"):
        orig = rp.get("original_max_position_embeddings")
        check(orig is not None, "rope_scaling.original_max_position_embeddings", f"rope type {kind!r} needs it")
        kw["rope_original_max_len"] = int(orig)
    if kind == "llama3":
        kw.update(rope_low_freq_factor=float(rp["low_freq_factor"]),
                  rope_high_freq_factor=float(rp["high_freq_factor"]))
    if kind == "yarn":
        kw.update(yarn_beta_fast=float(rp.get("beta_fast") or 32), yarn_beta_slow=float(rp.get("beta_slow") or 1),
                  yarn_mscale=float(rp.get("mscale") or 0.0),
                  yarn_mscale_all_dim=float(rp.get("mscale_all_dim") or 0.0),
                  yarn_attention_factor=None if rp.get("attention_factor") is None else float(rp["attention_factor"]),
                  yarn_truncate=bool(rp.get("truncate", True)))
    return AttentionConfig(
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, rope_theta=float(rp["rope_theta"]),
        qk_norm=hf["model_type"] == "qwen3", qkv_bias=qkv_bias, out_bias=out_bias, **kw)


def model_fields(hf: dict) -> dict[str, Any]:
    _check_supported(hf)
    return dict(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        layer_pattern=(attention_config(hf),), ffn_pattern=(MLPConfig(mlp_dim=hf["intermediate_size"]),),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        init_std=float(hf.get("initializer_range", 0.02)),
    )


def embeddings_from_hf(hf: dict, model: DecoderConfig, tensors) -> dict:
    """embed and lm_head of any `model.embed_tokens` / `lm_head` checkpoint (a tied lm_head must equal the table)."""
    emb = tensors.get("model.embed_tokens.weight")
    out = {"embed": {"embedding": emb}}
    if model.tie_embeddings:
        if tensors.has("lm_head.weight") and not np.array_equal(tensors.get("lm_head.weight"), emb):
            raise UnsupportedError("tie_word_embeddings: true, but lm_head.weight differs from "
                                   "model.embed_tokens.weight")
    else:
        out["lm_head"] = {"kernel": linear_in(tensors.get("lm_head.weight"))}
    return out


def attention_from_hf(tensors, prefix: str, c: AttentionConfig) -> dict:
    """`...self_attn.` tensors -> the Attention module's params."""
    p: dict[str, Any] = {}
    for ours, theirs, heads in (("query", "q_proj", c.num_heads), ("key", "k_proj", c.num_kv_heads),
                                ("value", "v_proj", c.num_kv_heads)):
        p[ours] = {"kernel": heads_in(tensors.get(f"{prefix}{theirs}.weight"), heads)}
        if c.qkv_bias:
            p[ours]["bias"] = tensors.get(f"{prefix}{theirs}.bias").reshape(heads, c.head_dim)
    p["out"] = {"kernel": linear_in(tensors.get(f"{prefix}o_proj.weight")).reshape(c.num_heads, c.head_dim, -1)}
    if c.out_bias:
        p["out"]["bias"] = tensors.get(f"{prefix}o_proj.bias")
    if c.qk_norm:
        p["query_norm"] = {"scale": tensors.get(f"{prefix}q_norm.weight")}
        p["key_norm"] = {"scale": tensors.get(f"{prefix}k_norm.weight")}
    return p


def mlp_from_hf(tensors, prefix: str) -> dict:
    return {"wi_gate": {"kernel": linear_in(tensors.get(prefix + "gate_proj.weight"))},
            "wi_up": {"kernel": linear_in(tensors.get(prefix + "up_proj.weight"))},
            "wo": {"kernel": linear_in(tensors.get(prefix + "down_proj.weight"))}}


def from_hf(hf: dict, model: DecoderConfig, tensors) -> tuple[dict, None]:
    params = embeddings_from_hf(hf, model, tensors)
    stack: dict[str, Any] = {"final_norm": {"scale": tensors.get("model.norm.weight")}}
    for i in range(model.num_layers):
        mixer, _ = model.layer_kinds(i)
        pre = f"model.layers.{i}."
        stack[f"layer_{i}"] = {
            "mixer_norm": {"scale": tensors.get(pre + "input_layernorm.weight")},
            "mixer": attention_from_hf(tensors, pre + "self_attn.", mixer),
            "ffn_norm": {"scale": tensors.get(pre + "post_attention_layernorm.weight")},
            "ffn": mlp_from_hf(tensors, pre + "mlp."),
        }
    params["stack"] = stack
    return params, None


# ---------------------------------------------------------------------------------------- project -> HF
def _uniform(pattern) -> Any:
    """The single kind config of a pattern whose entries are all equal (else None)."""
    first = pattern[0]
    norm = lambda e: dataclasses.replace(e, implementation=None) if hasattr(e, "implementation") else e
    return first if all(norm(e) == norm(first) for e in pattern) else None


def accepts(model: Any) -> str | None:
    if not isinstance(model, DecoderConfig):
        return f"{type(model).__name__} is not a DecoderConfig"
    mixer, ffn = _uniform(model.layer_pattern), _uniform(model.ffn_pattern)
    if type(mixer) is not AttentionConfig:
        return "needs every mixer to be the same 'attention' kind"
    if type(ffn) is not MLPConfig:
        return "needs every FFN to be the same 'mlp' kind"
    return None


def choose_model_type(c: AttentionConfig, wanted: str | None) -> str:
    """The model_type that writes attention `c`: `wanted` if it can, else the first of qwen3 / qwen2 / llama."""
    def why_not(mt: str) -> str | None:
        if mt == "qwen3":
            return None if c.qk_norm and c.qkv_bias == c.out_bias else "needs qk_norm and qkv_bias == out_bias"
        if c.qk_norm:
            return "has no q/k norm (qwen3 has)"
        if mt == "qwen2":
            return None if c.qkv_bias and not c.out_bias else "needs qkv_bias and no out_bias"
        if mt == "mistral":
            return None if not (c.qkv_bias or c.out_bias) else "has no biases"
        return None if c.qkv_bias == c.out_bias else "needs qkv_bias == out_bias (attention_bias)"

    if wanted is not None:
        reason = why_not(wanted)
        check(reason is None, "model_type", f"{wanted} cannot express this attention: it {reason}")
        return wanted
    for mt in ("qwen3", "qwen2", "llama"):
        if why_not(mt) is None:
            return mt
    raise UnsupportedError("model: qk_norm with qkv_bias != out_bias has no Hugging Face counterpart")


def rope_fields(c: AttentionConfig, max_len: int) -> dict:
    """rope_theta + rope_scaling (the spelling every transformers version reads)."""
    out: dict[str, Any] = {"rope_theta": c.rope_theta}
    if c.rope_type == "default":
        out["rope_scaling"] = None
    elif c.rope_type == "linear":
        out["rope_scaling"] = {"rope_type": "linear", "factor": c.rope_factor}
    elif c.rope_type == "llama3":
        out["rope_scaling"] = {"rope_type": "llama3", "factor": c.rope_factor,
                               "low_freq_factor": c.rope_low_freq_factor,
                               "high_freq_factor": c.rope_high_freq_factor,
                               "original_max_position_embeddings": c.rope_original_max_len}
    else:
        out["rope_scaling"] = {
            "rope_type": "yarn", "factor": c.rope_factor, "original_max_position_embeddings": c.rope_original_max_len,
            "beta_fast": c.yarn_beta_fast, "beta_slow": c.yarn_beta_slow, "truncate": c.yarn_truncate,
            **({"mscale": c.yarn_mscale} if c.yarn_mscale else {}),
            **({"mscale_all_dim": c.yarn_mscale_all_dim} if c.yarn_mscale_all_dim else {}),
            **({"attention_factor": c.yarn_attention_factor} if c.yarn_attention_factor is not None else {}),
        }
    del max_len
    return out


def hf_config(model: DecoderConfig, base: dict | None, model_type: str | None) -> dict:
    c, ffn = model.layer_pattern[0], model.ffn_pattern[0]
    mt = choose_model_type(c, model_type or (base or {}).get("model_type"))
    cfg = {k: v for k, v in base_fields(base, mt).items() if k not in ROPE_KEYS}
    cfg.setdefault("max_position_embeddings", max(4096, c.rope_original_max_len if c.rope_type != "default" else 0))
    cfg.update(
        architectures=[MODEL_TYPES[mt]], model_type=mt, vocab_size=model.vocab_size, hidden_size=model.d_model,
        intermediate_size=ffn.mlp_dim, num_hidden_layers=model.num_layers, num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, rms_norm_eps=model.norm_eps, hidden_act="silu",
        tie_word_embeddings=model.tie_embeddings, initializer_range=model.init_std, attention_dropout=0.0,
        **rope_fields(c, cfg["max_position_embeddings"]),
    )
    if mt in ("llama", "qwen3"):
        cfg["attention_bias"] = c.qkv_bias
    if mt == "llama":
        cfg["mlp_bias"] = False
    if mt == "mistral":
        cfg["sliding_window"] = None
    if mt in ("qwen2", "qwen3"):
        cfg["use_sliding_window"] = False
        cfg.pop("layer_types", None)
    return cfg


def embeddings_to_hf(model: DecoderConfig, params: dict) -> dict[str, np.ndarray]:
    out = {"model.embed_tokens.weight": params["embed"]["embedding"]}
    if not model.tie_embeddings:
        out["lm_head.weight"] = linear_out(params["lm_head"]["kernel"])
    return out


def attention_to_hf(p: dict, prefix: str, c: AttentionConfig) -> dict[str, np.ndarray]:
    out = {}
    for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        out[f"{prefix}{theirs}.weight"] = heads_out(p[ours]["kernel"])
        if c.qkv_bias:
            out[f"{prefix}{theirs}.bias"] = p[ours]["bias"].reshape(-1)
    k = p["out"]["kernel"]
    out[f"{prefix}o_proj.weight"] = linear_out(k.reshape(-1, k.shape[-1]))
    if c.out_bias:
        out[f"{prefix}o_proj.bias"] = p["out"]["bias"]
    if c.qk_norm:
        out[f"{prefix}q_norm.weight"] = p["query_norm"]["scale"]
        out[f"{prefix}k_norm.weight"] = p["key_norm"]["scale"]
    return out


def mlp_to_hf(p: dict, prefix: str) -> dict[str, np.ndarray]:
    return {prefix + "gate_proj.weight": linear_out(p["wi_gate"]["kernel"]),
            prefix + "up_proj.weight": linear_out(p["wi_up"]["kernel"]),
            prefix + "down_proj.weight": linear_out(p["wo"]["kernel"])}


def to_hf(model: DecoderConfig, params: dict, stats: dict, base: dict | None, model_type: str | None):
    del stats  # a dense model has none
    cfg = hf_config(model, base, model_type)
    c = model.layer_pattern[0]
    out = embeddings_to_hf(model, params)
    out["model.norm.weight"] = params["stack"]["final_norm"]["scale"]
    for i in range(model.num_layers):
        p, pre = params["stack"][f"layer_{i}"], f"model.layers.{i}."
        out[pre + "input_layernorm.weight"] = p["mixer_norm"]["scale"]
        out.update(attention_to_hf(p["mixer"], pre + "self_attn.", c))
        out[pre + "post_attention_layernorm.weight"] = p["ffn_norm"]["scale"]
        out.update(mlp_to_hf(p["ffn"], pre + "mlp."))
    return cfg, out
