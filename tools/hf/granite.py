"""GraniteMoeHybrid (`GraniteMoeHybridForCausalLM`, the IBM Granite 4.0-H layout) <-> the `mamba2` recipe's
Mamba-2 + attention stacks (its `hybrid` preset; a Mamba-2 + MLP stack is the all-Mamba case), where the two
compute the same function.

Each Granite layer is x <- x + r * mixer(RMSNorm(x)); x <- x + r * shared_mlp(RMSNorm(x)) (+ routed experts),
the mixer a Mamba-2 layer (layer type "mamba" / "linear_attention") or GQA attention ("attention" /
"full_attention"); embeddings are scaled by embedding_multiplier, attention scores by attention_multiplier
and the logits divided by logits_scaling. It maps exactly onto the project's pre-norm decoder (layer_pattern:
one period of the layer types, Mamba2Config / AttentionConfig; ffn_pattern: one SwiGLU MLPConfig) when:
  embedding_multiplier = residual_multiplier = logits_scaling = 1, attention_multiplier = 1/sqrt(head_dim)
  (the project's attention scale), num_local_experts = 0 (no routed experts: the shared MLP is the FFN),
  position_embedding_type "rope" (when there are attention layers), hidden_act silu, no Mamba projection
  biases, a conv bias, time_step_limit (0, inf), head_dim = hidden_size / num_attention_heads.
Every other value of those fields is a one-line UnsupportedError naming the field.
config.json fields:
  hidden_size, num_hidden_layers, vocab_size, tie_word_embeddings, rms_norm_eps (every RMSNorm, the Mamba
  gated norm included) -> d_model, num_layers, vocab_size, tie_embeddings, norm_eps
  layer_types (or layers_block_type) -> layer_pattern (its shortest period dividing num_layers)
  mamba_d_state, mamba_d_head, mamba_expand, mamba_d_conv, mamba_n_groups, mamba_chunk_size
      -> Mamba2Config d_state, head_dim, expand, d_conv, ngroups, chunk_size (mamba_n_heads is implied)
  num_attention_heads, num_key_value_heads, attention_bias (q, k, v and o), rope_theta + rope_scaling /
      rope_parameters -> AttentionConfig (as the llama family reads them)
  shared_intermediate_size -> MLPConfig.mlp_dim (intermediate_size is the routed experts' width: unused)
The gated norm inside the Mamba-2 mixer normalises each of the n_groups groups, as the mamba2 family does
(mamba_ssm's kernels); transformers' CPU path normalises all of d_inner, which differs when n_groups > 1.
Tensors (torch Linear weights are [out, in]; ours [in, ..., out]):
  model.embed_tokens.weight, lm_head.weight (absent when tied), model.norm.weight  as the llama family
  model.layers.i.input_layernorm.weight            stack/layer_i/mixer_norm/scale
  model.layers.i.mamba.*                           stack/layer_i/mixer/* (as the mamba2 family's mixer.*)
  model.layers.i.self_attn.{q,k,v,o}_proj.*        stack/layer_i/mixer/{query,key,value,out} (as llama)
  model.layers.i.post_attention_layernorm.weight   stack/layer_i/ffn_norm/scale
  shared_mlp.input_linear.weight [2F, D] (gate rows, then up rows)   ffn/wi_gate, wi_up [D, F]
  shared_mlp.output_linear.weight [D, F]           ffn/wo [F, D]
An export writes the legacy layer-type names "mamba" / "attention" (IBM's checkpoints' spelling, which
every transformers version reads).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from models.attention import AttentionConfig
from models.decoder import DecoderConfig
from models.layers import MLPConfig
from models.ssm import Mamba2Config
from tools.hf import llama, mamba2
from tools.hf.common import base_fields, check, linear_in, linear_out

MODEL_TYPES = {"granitemoehybrid": "GraniteMoeHybridForCausalLM"}
RECIPE = "mamba2"
MAMBA_TYPES = ("mamba", "linear_attention")
ATTENTION_TYPES = ("attention", "full_attention")
# Fields an export writes itself (never copied from the imported source's config.json).
_OWN = ("rope_theta", "rope_scaling", "rope_parameters", "layers_block_type", "layer_types", "head_dim",
        "transformers_version")


# ---------------------------------------------------------------------------------------- HF -> project
def layer_types(hf: dict) -> list[str]:
    """Per layer "mamba" or "attention" (either spelling in config.json; default all Mamba, as transformers)."""
    n = hf["num_hidden_layers"]
    types = hf.get("layer_types") or hf.get("layers_block_type") or ["mamba"] * n
    check(isinstance(types, list) and len(types) == n, "layer_types", f"needs {n} entries (num_hidden_layers)")
    out = []
    for t in types:
        check(t in MAMBA_TYPES + ATTENTION_TYPES, "layer_types",
              f"{t!r} has no counterpart; only {list(MAMBA_TYPES + ATTENTION_TYPES)} map")
        out.append("mamba" if t in MAMBA_TYPES else "attention")
    return out


def _one(hf: dict, key: str, default: float, what: str) -> None:
    v = hf.get(key, default)
    check(v is not None and float(v) == 1.0, key, f"{v}: the project's decoder has no {what}; only 1.0 maps")


def _check_supported(hf: dict, types: list[str]) -> None:
    check(hf.get("hidden_act", "silu") == "silu", "hidden_act", f"{hf.get('hidden_act')!r}: only 'silu' maps")
    _one(hf, "embedding_multiplier", 1.0, "embedding multiplier")
    _one(hf, "residual_multiplier", 1.0, "residual-branch multiplier")
    _one(hf, "logits_scaling", 1.0, "logits divisor")
    experts = hf.get("num_local_experts", 8)  # transformers' default: 8 routed experts
    check(not experts, "num_local_experts",
          f"{experts}: Granite's routed experts (softmax top-k, no shared-expert gating) have no exact counterpart; "
          f"only 0 (the shared MLP alone) maps")
    check(not hf.get("mamba_proj_bias", False), "mamba_proj_bias",
          "true is not supported (the Mamba-2 mixer's projections have no biases)")
    check(hf.get("mamba_conv_bias", True), "mamba_conv_bias", "false is not supported (the mixer's conv has a bias)")
    lo, hi = (list(hf.get("time_step_limit") or (0.0, math.inf)) + [math.inf])[:2]
    check(mamba2._float(lo) == 0.0 and mamba2._float(hi) == math.inf, "time_step_limit",
          f"{hf.get('time_step_limit')}: dt clamping is not supported; only (0.0, inf) maps")
    expand = hf.get("mamba_expand", 2)
    check(float(expand).is_integer(), "mamba_expand", f"{expand}: only integer expansion factors map")
    if "attention" not in types:
        return
    pe = hf.get("position_embedding_type")
    check(pe == "rope", "position_embedding_type",
          f"{pe!r}: attention without rotary embeddings (NoPE) has no counterpart; only 'rope' maps")
    check(not hf.get("attention_dropout"), "attention_dropout", "must be 0 (the project's attention has no dropout)")
    heads, d = hf["num_attention_heads"], hf["hidden_size"]
    check(d % heads == 0 and hf.get("head_dim") in (None, d // heads), "head_dim",
          f"{hf.get('head_dim')}: only hidden_size / num_attention_heads maps (what every transformers version uses)")
    mult, want = hf.get("attention_multiplier", 1.0), (d // heads) ** -0.5
    check(mult is not None and math.isclose(float(mult), want, rel_tol=1e-7), "attention_multiplier",
          f"{mult}: the project's attention scales scores by 1/sqrt(head_dim) = {want!r}; only that value maps")


def mamba_config(hf: dict) -> Mamba2Config:
    d_inner = int(hf.get("mamba_expand", 2)) * hf["hidden_size"]
    n_heads = hf.get("mamba_n_heads", 128)
    d_head = hf.get("mamba_d_head", "auto")
    if d_head == "auto":
        d_head = d_inner // n_heads
    check(n_heads * d_head == d_inner, "mamba_n_heads",
          f"{n_heads} x mamba_d_head {d_head} != mamba_expand x hidden_size = {d_inner}")
    return Mamba2Config(d_state=hf.get("mamba_d_state", 256), head_dim=d_head, expand=int(hf.get("mamba_expand", 2)),
                        d_conv=hf.get("mamba_d_conv", 4), ngroups=hf.get("mamba_n_groups", 1),
                        chunk_size=hf.get("mamba_chunk_size", 256))


def _period(types: list[str]) -> int:
    """The shortest p dividing len(types) with types[i] == types[i % p] (so scan_layers works too)."""
    n = len(types)
    return next(p for p in range(1, n + 1) if n % p == 0 and all(types[i] == types[i % p] for i in range(n)))


def model_fields(hf: dict) -> dict[str, Any]:
    types = layer_types(hf)
    _check_supported(hf, types)
    m = mamba_config(hf)
    a = llama.attention_config({**hf, "model_type": "llama"}) if "attention" in types else None
    pattern = tuple(dataclasses.replace(m if t == "mamba" else a) for t in types[:_period(types)])
    return dict(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        layer_pattern=pattern, ffn_pattern=(MLPConfig(mlp_dim=hf.get("shared_intermediate_size", 1024)),),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        init_std=float(hf.get("initializer_range", 0.02)),
    )


def from_hf(hf: dict, model: DecoderConfig, tensors) -> tuple[dict, None]:
    params = llama.embeddings_from_hf(hf, model, tensors)
    stack: dict[str, Any] = {"final_norm": {"scale": tensors.get("model.norm.weight")}}
    for i in range(model.num_layers):
        mixer, _ = model.layer_kinds(i)
        pre = f"model.layers.{i}."
        w = tensors.get(pre + "shared_mlp.input_linear.weight")  # [2F, D]: gate rows, then up rows
        f = w.shape[0] // 2
        stack[f"layer_{i}"] = {
            "mixer_norm": {"scale": tensors.get(pre + "input_layernorm.weight")},
            "mixer": (mamba2.mixer_from_hf(tensors, pre + "mamba.") if isinstance(mixer, Mamba2Config)
                      else llama.attention_from_hf(tensors, pre + "self_attn.", mixer)),
            "ffn_norm": {"scale": tensors.get(pre + "post_attention_layernorm.weight")},
            "ffn": {"wi_gate": {"kernel": linear_in(w[:f])}, "wi_up": {"kernel": linear_in(w[f:])},
                    "wo": {"kernel": linear_in(tensors.get(pre + "shared_mlp.output_linear.weight"))}},
        }
    params["stack"] = stack
    return params, None


# ---------------------------------------------------------------------------------------- project -> HF
def accepts(model: Any) -> str | None:
    if not isinstance(model, DecoderConfig):
        return f"{type(model).__name__} is not a DecoderConfig"
    if not all(type(m) in (Mamba2Config, AttentionConfig) for m in model.layer_pattern):
        return "needs every mixer to be 'mamba2' or 'attention'"
    ssms = [m for m in model.layer_pattern if type(m) is Mamba2Config]
    if len({mamba2._structure(m) for m in ssms}) > 1:
        return "needs every mamba2 mixer to have the same d_state, head_dim, expand, d_conv and ngroups"
    atts = [dataclasses.replace(m, implementation=None) for m in model.layer_pattern if type(m) is AttentionConfig]
    if any(a != atts[0] for a in atts):
        return "needs every attention mixer to be the same"
    if atts and (atts[0].qk_norm or atts[0].qkv_bias != atts[0].out_bias):
        return "needs attention without q/k norm and with qkv_bias == out_bias (attention_bias)"
    if atts and atts[0].num_heads * atts[0].head_dim != model.d_model:
        return "needs attention head_dim x num_heads == d_model"
    if not all(type(f) is MLPConfig for f in model.ffn_pattern) or len({f.mlp_dim for f in model.ffn_pattern}) != 1:
        return "needs every FFN to be the same 'mlp' kind"
    return None


def to_hf(model: DecoderConfig, params: dict, stats: dict, base: dict | None, model_type: str | None):
    del stats  # fitted-noise moments and carried states are training state; HF has none
    check(model_type in (None, "granitemoehybrid"), "model_type", f"{model_type} is not written by the granite family")
    kinds = [model.layer_kinds(i)[0] for i in range(model.num_layers)]
    ssm = next((m for m in kinds if type(m) is Mamba2Config), Mamba2Config())
    att = next((m for m in kinds if type(m) is AttentionConfig), None)
    _, mamba_heads = ssm.dims(model.d_model)
    cfg = dict(base_fields(base, "granitemoehybrid", keep=lambda k: k not in _OWN))
    if att is not None:
        cfg.setdefault("max_position_embeddings",
                       max(4096, att.rope_original_max_len if att.rope_type != "default" else 0))
        cfg.update(num_attention_heads=att.num_heads, num_key_value_heads=att.num_kv_heads,
                   attention_bias=att.qkv_bias, attention_multiplier=att.head_dim ** -0.5,
                   position_embedding_type="rope", **llama.rope_fields(att, cfg["max_position_embeddings"]))
    cfg.update(
        architectures=[MODEL_TYPES["granitemoehybrid"]], model_type="granitemoehybrid", vocab_size=model.vocab_size,
        hidden_size=model.d_model, num_hidden_layers=model.num_layers,
        layer_types=["mamba" if type(m) is Mamba2Config else "attention" for m in kinds],
        shared_intermediate_size=model.ffn_pattern[0].mlp_dim, intermediate_size=model.ffn_pattern[0].mlp_dim,
        num_local_experts=0, rms_norm_eps=model.norm_eps, hidden_act="silu", tie_word_embeddings=model.tie_embeddings,
        initializer_range=model.init_std, attention_dropout=0.0, embedding_multiplier=1.0, residual_multiplier=1.0,
        logits_scaling=1.0, mamba_n_heads=mamba_heads, mamba_n_groups=ssm.ngroups, mamba_d_state=ssm.d_state,
        mamba_d_head=ssm.head_dim, mamba_d_conv=ssm.d_conv, mamba_expand=ssm.expand, mamba_chunk_size=ssm.chunk_size,
        mamba_conv_bias=True, mamba_proj_bias=False, time_step_limit=[0.0, float("inf")],
    )
    out = llama.embeddings_to_hf(model, params)
    out["model.norm.weight"] = params["stack"]["final_norm"]["scale"]
    for i, mixer in enumerate(kinds):
        p, pre = params["stack"][f"layer_{i}"], f"model.layers.{i}."
        out[pre + "input_layernorm.weight"] = p["mixer_norm"]["scale"]
        if type(mixer) is Mamba2Config:
            out.update(mamba2.mixer_to_hf(p["mixer"], pre + "mamba."))
        else:
            out.update(llama.attention_to_hf(p["mixer"], pre + "self_attn.", mixer))
        out[pre + "post_attention_layernorm.weight"] = p["ffn_norm"]["scale"]
        ffn = p["ffn"]
        out[pre + "shared_mlp.input_linear.weight"] = np.concatenate(
            [linear_out(ffn["wi_gate"]["kernel"]), linear_out(ffn["wi_up"]["kernel"])], axis=0)
        out[pre + "shared_mlp.output_linear.weight"] = linear_out(ffn["wo"]["kernel"])
    return cfg, out
