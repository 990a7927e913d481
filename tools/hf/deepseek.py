"""DeepSeek-V2 / V2-Lite / V3 (`DeepseekV2ForCausalLM`, `DeepseekV3ForCausalLM`) <-> the `moe` recipe.

The project model: every layer an "mla" mixer (models/mla.py), the first `first_k_dense_replace` FFNs an
"mlp" (SwiGLU, width intermediate_size), the rest "moe" (models/moe.py: n_shared_experts shared + routed
experts of width moe_intermediate_size). The gate, as Hugging Face transformers computes it:
  V3: s = sigmoid(logits); groups scored by the sum of their top-2 of s + e_score_correction_bias, the best
      topk_group of n_group kept, Top-K of s + b among them; weights s (/ their sum if norm_topk_prob)
      * routed_scaling_factor  ->  score_func "sigmoid", group_score "top2_sum", the bias = our routing bias
      (the `stats` RoutingBias of each MoE layer).
  V2: s = softmax(logits); topk_method "greedy" (no groups) or "group_limited_greedy" (groups scored by
      their max); weights s * routed_scaling_factor, never normalised (transformers' DeepseekV2 ignores
      norm_topk_prob)  ->  score_func "softmax", group_score "max", normalize False, no bias.
Training-only settings (no checkpoint holds them): V3 imports train with the aux-loss-free bias update
(gamma 1e-3) and the sequence-wise balance loss (alpha 1e-4) as in the V3 paper; V2 imports with
aux_loss_alpha as a sequence-wise (`seq_aux`, the default) or expert-level balance loss and no bias update.

Tensors (torch Linear weights are [out, in]; ours [in, ..., out]; i = layer, j = expert):
  model.embed_tokens.weight [V, D], lm_head.weight [V, D]   embed/embedding, lm_head/kernel [D, V] (tied: none)
  model.norm.weight                                stack/final_norm/scale
  model.layers.i.input_layernorm / post_attention_layernorm   stack/layer_i/mixer_norm, ffn_norm
  self_attn.q_proj [H*(dn+dr), D]                  mixer/query [D, H, dn+dr]       (q_lora_rank null)
  self_attn.q_a_proj [Rq, D], q_a_layernorm, q_b_proj [H*(dn+dr), Rq]   mixer/q_a, q_a_norm, q_b [Rq, H, dn+dr]
  self_attn.kv_a_proj_with_mqa [R+dr, D], kv_a_layernorm [R]            mixer/kv_a [D, R+dr], kv_a_norm
  self_attn.kv_b_proj [H*(dn+dv), R]               mixer/kv_b [R, H, dn+dv]
  self_attn.o_proj [D, H*dv]                       mixer/out [H, dv, D]
  mlp.{gate,up,down}_proj                          ffn/wi_gate, wi_up, wo              (the first-k dense layers)
  mlp.gate.weight [E, D]                           ffn/gate [D, E]
  mlp.gate.e_score_correction_bias [E] (V3)        stats: stack/layer_i/ffn/router (RoutingBias.bias)
  mlp.experts.j.{gate,up,down}_proj (or transformers' fused experts.gate_up_proj [E, 2F, D], down_proj [E, D, F])
                                                   ffn/w_gate, w_up [E, D, F], w_down [E, F, D]
  mlp.shared_experts.{gate,up,down}_proj           ffn/shared_gate, shared_up [D, Ks F], shared_down [Ks F, D]
Rotary dims: V2 always, V3 when rope_interleave (DeepSeek's own checkpoints), rotate interleaved pairs; their
rows of q_b_proj / q_proj and kv_a_proj_with_mqa are permuted to our half-split layout on import (evens, then
odds; the same model, see models/mla.py) and back on export. An export keeps the imported source's
rope_interleave and writes V3 interleaved otherwise, like DeepSeek's checkpoints.
Multi-token-prediction layers (index >= num_hidden_layers: DeepSeek-V3's layer 61) are not part of
transformers' *ForCausalLM either and are skipped. Anything else that does not map exactly is a one-line
UnsupportedError naming the config field (FP8-quantized weights, biases, other activations or rope types,
moe_layer_freq != 1, ...).
"""
from __future__ import annotations

import dataclasses
import re
import sys
from typing import Any

import numpy as np

from models.decoder import DecoderConfig
from models.layers import MLPConfig
from models.mla import MLAConfig
from models.moe import MoEConfig, RoutingBias
from tools.hf.common import UnsupportedError, base_fields, check, linear_in, linear_out, rope_parameters
from tools.hf.llama import embeddings_from_hf, embeddings_to_hf, mlp_from_hf, mlp_to_hf

MODEL_TYPES = {"deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}
RECIPE = "moe"
_LAYER = re.compile(r"model\.layers\.(\d+)\.")
# Fields an export writes itself (never copied from the imported source's config.json).
_OWN = ("rope_theta", "rope_scaling", "rope_parameters", "num_nextn_predict_layers", "head_dim", "qk_head_dim",
        "quantization_config", "moe_layer_freq", "scoring_func", "topk_method", "n_group", "topk_group",
        "norm_topk_prob", "routed_scaling_factor", "aux_loss_alpha", "seq_aux", "auto_map", "transformers_version")


# ---------------------------------------------------------------------------------------- HF -> project
def mla_config(hf: dict) -> MLAConfig:
    """The MLA mixer of a DeepSeek config.json (rope in either spelling; only default and yarn map)."""
    rp = rope_parameters(hf)
    kind = rp["rope_type"]
    check(kind in ("default", "yarn"), "rope_scaling",
          f"rope type {kind!r} has no MLA counterpart; 'default' and 'yarn' map")
    check(rp.get("partial_rotary_factor", 1.0) in (None, 1.0), "partial_rotary_factor",
          "only 1.0 maps (MLA rotates all qk_rope_head_dim dims)")
    kw: dict[str, Any] = {}
    if kind == "yarn":
        orig = rp.get("original_max_position_embeddings")
        check(orig is not None, "rope_scaling.original_max_position_embeddings", "YaRN needs it")
        factor = rp.get("factor")
        if factor is None:  # transformers' rule: the ratio of the two context lengths
            factor = hf["max_position_embeddings"] / orig
        kw = dict(
            rope_factor=float(factor), rope_original_max_len=int(orig),
            yarn_beta_fast=float(rp.get("beta_fast") or 32), yarn_beta_slow=float(rp.get("beta_slow") or 1),
            yarn_mscale=float(rp.get("mscale") or 0.0), yarn_mscale_all_dim=float(rp.get("mscale_all_dim") or 0.0),
            yarn_attention_factor=None if rp.get("attention_factor") is None else float(rp["attention_factor"]),
            yarn_truncate=bool(rp.get("truncate", True)),
        )
    return MLAConfig(
        num_heads=hf["num_attention_heads"], kv_lora_rank=hf["kv_lora_rank"], q_lora_rank=hf.get("q_lora_rank"),
        qk_nope_head_dim=hf["qk_nope_head_dim"], qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"],
        rope_theta=float(rp.get("rope_theta", 10000.0)), **kw,
    )


def _check_supported(hf: dict) -> None:
    mt = hf.get("model_type")
    check(mt in MODEL_TYPES, "model_type", f"{mt!r} is not one of {list(MODEL_TYPES)}")
    check(hf.get("quantization_config") is None, "quantization_config",
          "quantized checkpoints (e.g. DeepSeek-V3's FP8 weights) are not supported; dequantize to bf16 first")
    check(hf.get("hidden_act", "silu") == "silu", "hidden_act", f"{hf.get('hidden_act')!r}: only 'silu' (SwiGLU) maps")
    check(not hf.get("attention_bias", False), "attention_bias", "true is not supported (MLA has no projection biases)")
    check(not hf.get("mlp_bias", False), "mlp_bias", "true is not supported (the FFNs have no biases)")
    check(not hf.get("attention_dropout"), "attention_dropout", "must be 0 (the project's attention has no dropout)")
    check(hf.get("pretraining_tp", 1) == 1, "pretraining_tp", "must be 1")
    heads = hf["num_attention_heads"]
    check(hf.get("num_key_value_heads") in (None, heads), "num_key_value_heads",
          f"{hf.get('num_key_value_heads')} != num_attention_heads={heads}: MLA keys and values are per head")
    check(hf.get("moe_layer_freq", 1) == 1, "moe_layer_freq",
          "only 1 maps (transformers' DeepSeek models make every layer from first_k_dense_replace on a MoE layer)")
    check(hf.get("n_routed_experts") is not None, "n_routed_experts",
          "a DeepSeek model without routed experts is not supported")
    if mt == "deepseek_v3":
        check(hf.get("scoring_func", "sigmoid") == "sigmoid", "scoring_func", "DeepseekV3 gates with sigmoid only")
        check(hf.get("topk_method", "noaux_tc") == "noaux_tc", "topk_method", "DeepseekV3 routes with 'noaux_tc' only")
        check(hf.get("n_group") is not None and hf.get("topk_group") is not None, "n_group",
              "n_group and topk_group must be set (1 and 1 = no group-limited routing)")
    else:
        check(hf.get("scoring_func", "softmax") == "softmax", "scoring_func", "DeepseekV2 gates with softmax only")
        check(hf.get("topk_method", "greedy") in ("greedy", "group_limited_greedy"), "topk_method",
              f"{hf.get('topk_method')!r}: DeepseekV2 maps 'greedy' and 'group_limited_greedy'")
        check(not hf.get("norm_topk_prob", False), "norm_topk_prob",
              "true is ambiguous for DeepseekV2 (transformers ignores it, DeepSeek's code normalises); set it false")


def moe_config(hf: dict) -> MoEConfig:
    """The routed-expert FFN of a DeepSeek config.json (training-only settings: see the module doc)."""
    v3 = hf["model_type"] == "deepseek_v3"
    e = hf["n_routed_experts"]
    if v3 or hf.get("topk_method", "greedy") == "group_limited_greedy":
        groups, topk_groups = hf.get("n_group"), hf.get("topk_group")
        check(bool(groups) and bool(topk_groups), "n_group", "group-limited routing needs n_group and topk_group")
    else:
        groups, topk_groups = 1, 1
    check(e % groups == 0, "n_group", f"{groups} must divide n_routed_experts={e}")
    check(1 <= topk_groups <= groups, "topk_group", f"{topk_groups} must lie in [1, n_group={groups}]")
    check(not v3 or groups == 1 or e // groups >= 2, "n_group",
          f"DeepseekV3 scores a group by its top-2 experts; {e // groups} per group is too few")
    k = hf["num_experts_per_tok"]
    check(1 <= k <= topk_groups * (e // groups), "num_experts_per_tok",
          f"{k} must lie in [1, topk_group * experts per group = {topk_groups * (e // groups)}]")
    if v3:
        train = dict(gamma=1e-3, seq_aux_alpha=1e-4)
    else:
        alpha, seq = float(hf.get("aux_loss_alpha", 0.001)), bool(hf.get("seq_aux", True))
        train = dict(gamma=0.0, seq_aux_alpha=alpha if seq else 0.0, expert_aux_alpha=0.0 if seq else alpha)
    return MoEConfig(
        num_experts=e, top_k=k, num_shared=int(hf.get("n_shared_experts") or 0), expert_dim=hf["moe_intermediate_size"],
        score_func="sigmoid" if v3 else "softmax", num_groups=groups, topk_groups=topk_groups,
        group_score="top2_sum" if v3 else "max", route_scale=float(hf.get("routed_scaling_factor", 1.0)),
        normalize=bool(hf.get("norm_topk_prob", True)) if v3 else False, **train,
    )


def model_fields(hf: dict) -> dict[str, Any]:
    _check_supported(hf)
    n = hf["num_hidden_layers"]
    k = min(int(hf.get("first_k_dense_replace") or 0), n)
    dense, moe = MLPConfig(mlp_dim=hf["intermediate_size"]), moe_config(hf) if k < n else None
    # one config object per layer (the decoder refuses shared entries: an override must change one layer)
    ffn = tuple(dataclasses.replace(dense if i < k else moe) for i in range(n))
    return dict(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], num_layers=n, layer_pattern=(mla_config(hf),),
        ffn_pattern=ffn, tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), init_std=float(hf.get("initializer_range", 0.02)),
    )


def rope_perm(dr: int) -> np.ndarray:
    """Interleaved pairs (0, 1), (2, 3), ... -> half-split: [0, 2, 4, ..., 1, 3, 5, ...]."""
    return np.concatenate([np.arange(0, dr, 2), np.arange(1, dr, 2)])


def interleaved(hf: dict) -> bool:
    """Whether the config's rope rows are interleaved pairs (V2 always; V3 unless rope_interleave is false)."""
    return hf["model_type"] == "deepseek_v2" or bool(hf.get("rope_interleave", True))


def _perms(c: MLAConfig, inter: bool) -> tuple[np.ndarray, np.ndarray]:
    """(row order of one query head [dn + dr], row order of kv_a [R + dr]) taking HF rows to ours."""
    dn, dr, r = c.qk_nope_head_dim, c.qk_rope_head_dim, c.kv_lora_rank
    perm = rope_perm(dr) if inter else np.arange(dr)
    return np.concatenate([np.arange(dn), dn + perm]), np.concatenate([np.arange(r), r + perm])


def mla_from_hf(tensors, prefix: str, c: MLAConfig, inter: bool) -> dict:
    """`...self_attn.` tensors (a reader with .get) -> the MLA module's params."""
    h, dn, dr, dv, r = c.num_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
    qperm, kvperm = _perms(c, inter)

    def q_heads(w):  # [H (dn + dr), in] -> [in, H, dn + dr]
        return np.ascontiguousarray(np.transpose(w.reshape(h, dn + dr, -1)[:, qperm], (2, 0, 1)))

    p: dict[str, Any] = {}
    if c.q_lora_rank is None:
        p["query"] = {"kernel": q_heads(tensors.get(prefix + "q_proj.weight"))}
    else:
        p["q_a"] = {"kernel": linear_in(tensors.get(prefix + "q_a_proj.weight"))}
        p["q_a_norm"] = {"scale": tensors.get(prefix + "q_a_layernorm.weight")}
        p["q_b"] = {"kernel": q_heads(tensors.get(prefix + "q_b_proj.weight"))}
    p["kv_a"] = {"kernel": linear_in(tensors.get(prefix + "kv_a_proj_with_mqa.weight")[kvperm])}
    p["kv_a_norm"] = {"scale": tensors.get(prefix + "kv_a_layernorm.weight")}
    p["kv_b"] = {"kernel": np.ascontiguousarray(
        np.transpose(tensors.get(prefix + "kv_b_proj.weight").reshape(h, dn + dv, r), (2, 0, 1)))}
    p["out"] = {"kernel": linear_in(tensors.get(prefix + "o_proj.weight")).reshape(h, dv, -1)}
    return p


def moe_from_hf(tensors, prefix: str, c: MoEConfig) -> tuple[dict, np.ndarray]:
    """`...mlp.` tensors of a MoE layer -> (MoE params, routing bias [E] float32; zeros without one)."""
    e, f = c.num_experts, c.expert_dim
    if tensors.has(prefix + "experts.gate_up_proj"):  # transformers' in-memory fused layout
        gu = tensors.get(prefix + "experts.gate_up_proj")  # [E, 2F, D]: the gate rows, then the up rows
        w_gate, w_up = np.transpose(gu[:, :f], (0, 2, 1)), np.transpose(gu[:, f:], (0, 2, 1))
        w_down = np.transpose(tensors.get(prefix + "experts.down_proj"), (0, 2, 1))
    else:  # DeepSeek's checkpoints and transformers' save_pretrained: one tensor per expert
        stack = lambda n: np.stack([linear_in(tensors.get(f"{prefix}experts.{j}.{n}.weight")) for j in range(e)])
        w_gate, w_up, w_down = stack("gate_proj"), stack("up_proj"), stack("down_proj")
    p = {"gate": linear_in(tensors.get(prefix + "gate.weight")), "w_gate": np.ascontiguousarray(w_gate),
         "w_up": np.ascontiguousarray(w_up), "w_down": np.ascontiguousarray(w_down)}
    if c.num_shared:
        s = prefix + "shared_experts."
        p.update(shared_gate=linear_in(tensors.get(s + "gate_proj.weight")),
                 shared_up=linear_in(tensors.get(s + "up_proj.weight")),
                 shared_down=linear_in(tensors.get(s + "down_proj.weight")))
    name = prefix + "gate.e_score_correction_bias"
    bias = tensors.get(name).astype(np.float32) if tensors.has(name) else np.zeros((e,), np.float32)
    return p, bias


def from_hf(hf: dict, model: DecoderConfig, tensors) -> tuple[dict, dict | None]:
    params = embeddings_from_hf(hf, model, tensors)
    inter = interleaved(hf)
    stack: dict[str, Any] = {"final_norm": {"scale": tensors.get("model.norm.weight")}}
    stats: dict[str, Any] = {}
    for i in range(model.num_layers):
        mixer, ffn = model.layer_kinds(i)
        pre = f"model.layers.{i}."
        layer = {"mixer_norm": {"scale": tensors.get(pre + "input_layernorm.weight")},
                 "mixer": mla_from_hf(tensors, pre + "self_attn.", mixer, inter),
                 "ffn_norm": {"scale": tensors.get(pre + "post_attention_layernorm.weight")}}
        if isinstance(ffn, MoEConfig):
            layer["ffn"], bias = moe_from_hf(tensors, pre + "mlp.", ffn)
            stats[f"layer_{i}"] = {"ffn": {"router": RoutingBias(
                bias=bias, load=np.zeros_like(bias), gamma=ffn.gamma, gamma_zero_after_step=ffn.gamma_zero_after_step)}}
        else:
            layer["ffn"] = mlp_from_hf(tensors, pre + "mlp.")
        stack[f"layer_{i}"] = layer
    params["stack"] = stack
    mtp = [n for n in tensors.names if (m := _LAYER.match(n)) and int(m.group(1)) >= model.num_layers]
    if mtp:  # mapped, not read: transformers' *ForCausalLM has no multi-token-prediction module either
        for n in mtp:
            tensors.raw(n)
        print(f"note: skipped {len(mtp)} tensors of layers >= num_hidden_layers={model.num_layers} "
              f"(the multi-token-prediction module)", file=sys.stderr)
    return params, ({"stack": stats} if stats else None)


# ---------------------------------------------------------------------------------------- project -> HF
_MOE_MODEL_FIELDS = ("num_experts", "top_k", "num_shared", "expert_dim", "score_func", "num_groups", "topk_groups",
                     "group_score", "route_scale", "normalize", "device_limited_m")


def _layers(model: DecoderConfig) -> tuple[MLAConfig, MLPConfig | None, MoEConfig | None, int]:
    """(the MLA config, the dense MLP config, the MoE config, k = number of leading dense layers), checking
    that the model has DeepSeek's layout; UnsupportedError naming the model field otherwise."""
    check(isinstance(model, DecoderConfig), "model", f"{type(model).__name__} is not a DecoderConfig")
    n = model.num_layers
    mixers = [model.layer_kinds(i)[0] for i in range(n)]
    ffns = [model.layer_kinds(i)[1] for i in range(n)]
    check(all(type(m) is MLAConfig for m in mixers), "model.layer_pattern", "needs an 'mla' mixer in every layer")
    norm = lambda m: dataclasses.replace(m, implementation=None)
    check(all(norm(m) == norm(mixers[0]) for m in mixers), "model.layer_pattern",
          "DeepSeek checkpoints hold one MLA config for every layer; these layers differ")
    mla = mixers[0]
    check(mla.latent_norm_eps == 1e-6, "model.layer_pattern.mla.latent_norm_eps",
          "transformers' DeepSeek latent RMSNorms use eps 1e-6 only")
    k = next((i for i, f in enumerate(ffns) if type(f) is not MLPConfig), n)
    check(all(type(f) is MoEConfig for f in ffns[k:]), "model.ffn_pattern",
          "needs 'mlp' FFNs first, then 'moe' FFNs only")
    check(all(f == ffns[0] for f in ffns[:k]), "model.ffn_pattern", "the dense layers' mlp_dim differ")
    key = lambda f: tuple(getattr(f, a) for a in _MOE_MODEL_FIELDS)
    check(all(key(f) == key(ffns[k]) for f in ffns[k:]), "model.ffn_pattern",
          "DeepSeek checkpoints hold one MoE config for every MoE layer; these layers differ")
    moe = ffns[k] if k < n else None
    if moe is not None:
        check(moe.device_limited_m is None, "model.ffn_pattern.moe.device_limited_m",
              "routing that depends on the expert mesh axis has no HF counterpart; set num_groups/topk_groups instead")
        if moe.score_func == "sigmoid":
            check(moe.num_groups == 1 or moe.group_score == "top2_sum", "model.ffn_pattern.moe.group_score",
                  "DeepseekV3 scores groups by 'top2_sum' only")
        else:
            check(not moe.normalize, "model.ffn_pattern.moe.normalize",
                  "DeepseekV2 (softmax gate) never normalises the top-k weights; set it false")
            check(moe.num_groups == 1 or moe.group_score == "max", "model.ffn_pattern.moe.group_score",
                  "DeepseekV2 scores groups by 'max' only")
    return mla, (ffns[0] if k else None), moe, k


def accepts(model: Any) -> str | None:
    try:
        _layers(model)
    except UnsupportedError as e:
        return str(e)
    return None


def _model_type(moe: MoEConfig | None, wanted: str | None) -> str:
    natural = "deepseek_v2" if moe is not None and moe.score_func == "softmax" else "deepseek_v3"
    if wanted is not None:
        check(wanted in MODEL_TYPES, "model_type", f"{wanted!r} is not one of {list(MODEL_TYPES)}")
        check(wanted == natural, "model_type",
              f"{wanted} gates with {'softmax' if wanted == 'deepseek_v2' else 'sigmoid'}; "
              f"this model's gate is {moe.score_func}")
    return natural


def hf_config(model: DecoderConfig, base: dict | None, model_type: str | None) -> dict:
    mla, dense, moe, k = _layers(model)
    mt = _model_type(moe, model_type or (base or {}).get("model_type"))
    cfg = {kk: v for kk, v in base_fields(base, mt).items() if kk not in _OWN}
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": mla.rope_theta}
    if mla.rope_factor != 1.0:
        rope.update(rope_type="yarn", factor=mla.rope_factor,
                    original_max_position_embeddings=mla.rope_original_max_len,
                    beta_fast=mla.yarn_beta_fast, beta_slow=mla.yarn_beta_slow, truncate=mla.yarn_truncate)
        for key, v in (("mscale", mla.yarn_mscale), ("mscale_all_dim", mla.yarn_mscale_all_dim),
                       ("attention_factor", mla.yarn_attention_factor)):
            if v:
                rope[key] = v
    cfg.setdefault("max_position_embeddings", int(mla.rope_original_max_len * mla.rope_factor))
    cfg.update(
        architectures=[MODEL_TYPES[mt]], model_type=mt, vocab_size=model.vocab_size, hidden_size=model.d_model,
        num_hidden_layers=model.num_layers, num_attention_heads=mla.num_heads, num_key_value_heads=mla.num_heads,
        q_lora_rank=mla.q_lora_rank, kv_lora_rank=mla.kv_lora_rank, qk_nope_head_dim=mla.qk_nope_head_dim,
        qk_rope_head_dim=mla.qk_rope_head_dim, v_head_dim=mla.v_head_dim, hidden_act="silu",
        rms_norm_eps=model.norm_eps, tie_word_embeddings=model.tie_embeddings, attention_bias=False,
        attention_dropout=0.0, first_k_dense_replace=k, initializer_range=model.init_std,
        intermediate_size=dense.mlp_dim if dense else (moe.expert_dim if moe else model.d_model),
        rope_theta=mla.rope_theta, rope_scaling=None if rope["rope_type"] == "default" else rope,
    )
    if mt == "deepseek_v3":
        cfg.update(rope_interleave=bool(cfg.get("rope_interleave", True)), num_nextn_predict_layers=0)
    else:
        cfg["mlp_bias"] = False
    if moe is None:  # an all-dense model: transformers still needs the MoE fields
        moe = MoEConfig(num_experts=1, top_k=1, num_shared=0, expert_dim=1)
    cfg.update(n_routed_experts=moe.num_experts, num_experts_per_tok=moe.top_k, n_shared_experts=moe.num_shared,
               moe_intermediate_size=moe.expert_dim, routed_scaling_factor=moe.route_scale, n_group=moe.num_groups,
               topk_group=moe.topk_groups)
    if mt == "deepseek_v3":
        cfg.update(norm_topk_prob=moe.normalize, topk_method="noaux_tc", scoring_func="sigmoid")
    else:
        cfg.update(norm_topk_prob=False, scoring_func="softmax",
                   topk_method="group_limited_greedy" if moe.num_groups > 1 else "greedy")
    return cfg


def mla_to_hf(p: dict, prefix: str, c: MLAConfig, inter: bool) -> dict[str, np.ndarray]:
    """Inverse of mla_from_hf."""
    h, dn, dr, dv, r = c.num_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
    qperm, kvperm = _perms(c, inter)
    qinv, kvinv = np.argsort(qperm), np.argsort(kvperm)

    def q_rows(kernel):  # [in, H, dn + dr] -> [H (dn + dr), in]
        return np.transpose(kernel, (1, 2, 0))[:, qinv].reshape(h * (dn + dr), -1)

    out = {}
    if c.q_lora_rank is None:
        out[prefix + "q_proj.weight"] = q_rows(p["query"]["kernel"])
    else:
        out[prefix + "q_a_proj.weight"] = linear_out(p["q_a"]["kernel"])
        out[prefix + "q_a_layernorm.weight"] = p["q_a_norm"]["scale"]
        out[prefix + "q_b_proj.weight"] = q_rows(p["q_b"]["kernel"])
    out[prefix + "kv_a_proj_with_mqa.weight"] = linear_out(p["kv_a"]["kernel"])[kvinv]
    out[prefix + "kv_a_layernorm.weight"] = p["kv_a_norm"]["scale"]
    out[prefix + "kv_b_proj.weight"] = np.transpose(p["kv_b"]["kernel"], (1, 2, 0)).reshape(h * (dn + dv), r)
    out[prefix + "o_proj.weight"] = linear_out(p["out"]["kernel"].reshape(h * dv, -1))
    return out


def moe_to_hf(p: dict, bias: np.ndarray | None, prefix: str, c: MoEConfig) -> dict[str, np.ndarray]:
    """Inverse of moe_from_hf in the per-expert layout of DeepSeek's checkpoints; bias None (V2): not written."""
    out = {prefix + "gate.weight": linear_out(p["gate"])}
    if bias is not None:
        out[prefix + "gate.e_score_correction_bias"] = np.asarray(bias, np.float32)
    for j in range(c.num_experts):
        for n, w in (("gate_proj", p["w_gate"]), ("up_proj", p["w_up"]), ("down_proj", p["w_down"])):
            out[f"{prefix}experts.{j}.{n}.weight"] = linear_out(w[j])
    if c.num_shared:
        s = prefix + "shared_experts."
        out.update({s + "gate_proj.weight": linear_out(p["shared_gate"]),
                    s + "up_proj.weight": linear_out(p["shared_up"]),
                    s + "down_proj.weight": linear_out(p["shared_down"])})
    return out


def _bias(stats: dict, i: int) -> np.ndarray:
    router = stats["stack"][f"layer_{i}"]["ffn"]["router"]
    return np.asarray(getattr(router, "bias", router), np.float32)


def to_hf(model: DecoderConfig, params: dict, stats: dict, base: dict | None, model_type: str | None):
    cfg = hf_config(model, base, model_type)
    v3, inter = cfg["model_type"] == "deepseek_v3", interleaved(cfg)
    out = embeddings_to_hf(model, params)
    out["model.norm.weight"] = params["stack"]["final_norm"]["scale"]
    for i in range(model.num_layers):
        mixer, ffn = model.layer_kinds(i)
        lp, pre = params["stack"][f"layer_{i}"], f"model.layers.{i}."
        out[pre + "input_layernorm.weight"] = lp["mixer_norm"]["scale"]
        out[pre + "post_attention_layernorm.weight"] = lp["ffn_norm"]["scale"]
        out.update(mla_to_hf(lp["mixer"], pre + "self_attn.", mixer, inter))
        if isinstance(ffn, MoEConfig):
            bias = _bias(stats, i)
            check(v3 or not np.any(bias != 0), "model.ffn_pattern.moe.gamma",
                  f"layer {i} has a non-zero routing bias, but DeepseekV2 has no e_score_correction_bias "
                  f"(softmax-gated models export only when trained with gamma=0)")
            out.update(moe_to_hf(lp["ffn"], bias if v3 else None, pre + "mlp.", ffn))
        else:
            out.update(mlp_to_hf(lp["ffn"], pre + "mlp."))
    return cfg, {k: np.ascontiguousarray(v) for k, v in out.items()}
