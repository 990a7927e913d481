"""DeepSeek-V2 / V2-Lite / V3 (`DeepseekV2ForCausalLM`, `DeepseekV3ForCausalLM`) <-> the `moe` recipe.

The project model: every layer an "mla" mixer (models/mla.py), the first `first_k_dense_replace` FFNs an
"mlp" (SwiGLU, width intermediate_size), the rest "moe" (models/moe.py: n_shared_experts shared + routed
experts of width moe_intermediate_size). Gate, per Hugging Face transformers:
  V3: s = sigmoid(logits); groups scored by the sum of their top-2 of s + e_score_correction_bias, the best
      topk_group of n_group kept, Top-K of s + b among them; weights s (/ their sum if norm_topk_prob)
      * routed_scaling_factor  ->  score_func "sigmoid", group_score "top2_sum", bias = the routing bias.
  V2: s = softmax(logits); topk_method "greedy" (no groups) or "group_limited_greedy" (groups scored by
      their max); weights s * routed_scaling_factor, never normalised (transformers' DeepseekV2 ignores
      norm_topk_prob)  ->  score_func "softmax", group_score "max", normalize False, no bias.

Tensors (HF Linear weights are [out, in]; ours [in, ..., out]):
  model.embed_tokens.weight [V, D]                 embed/embedding
  lm_head.weight [V, D]                            lm_head/kernel [D, V] (absent when tied)
  model.norm.weight                                stack/final_norm/scale
  model.layers.i.input_layernorm / post_attention_layernorm   layer_i/mixer_norm, layer_i/ffn_norm
  self_attn.q_proj [H*(dn+dr), D]                  mixer/query [D, H, dn+dr]       (q_lora_rank null)
  self_attn.q_a_proj [Rq, D], q_a_layernorm, q_b_proj [H*(dn+dr), Rq]   mixer/q_a, q_a_norm, q_b
  self_attn.kv_a_proj_with_mqa [R+dr, D], kv_a_layernorm [R]            mixer/kv_a [D, R+dr], kv_a_norm
  self_attn.kv_b_proj [H*(dn+dv), R]               mixer/kv_b [R, H, dn+dv]
  self_attn.o_proj [D, H*dv]                       mixer/out [H, dv, D]
  mlp.{gate,up,down}_proj                          ffn/wi_gate, wi_up, wo              (dense layers)
  mlp.gate.weight [E, D], mlp.gate.e_score_correction_bias [E]          ffn/gate [D, E], stats ffn/router.bias
  mlp.experts.j.{gate,up,down}_proj (or fused experts.gate_up_proj [E, 2F, D], experts.down_proj [E, D, F])
                                                   ffn/w_gate, w_up [E, D, F], w_down [E, F, D]
  mlp.shared_experts.{gate,up,down}_proj           ffn/shared_gate, shared_up, shared_down
Rotary dims: V2 always, V3 when rope_interleave, rotate interleaved pairs; their rows of q_b/q_proj and
kv_a are permuted to our half-split layout on import (evens, then odds) and back on export (models/mla.py).
Multi-token-prediction layers (index >= num_hidden_layers; DeepSeek-V3's layer 61) are not part of
`*ForCausalLM` in transformers either: they are skipped and counted. Anything else that does not map
exactly is a one-line UserError naming the config field.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from axlearn_like.config import ConfigError
from models.layers import MLPConfig
from models.mla import MLAConfig
from models.moe import MoEConfig

MODEL_TYPES = {"deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}
_MTP = re.compile(r"model\.layers\.(\d+)\.")


class DeepseekConfigError(ConfigError):
    """A DeepSeek config field with no exact counterpart (one line naming the field)."""


def _err(field: str, msg: str) -> DeepseekConfigError:
    return DeepseekConfigError(f"{field}: {msg}")


# ---------------------------------------------------------------------------------------- HF -> project
def rope_parameters(hf: dict) -> dict:
    """The rope settings of a config.json in either spelling: transformers 5 `rope_parameters`, or the
    checkpoints' own `rope_theta` + `rope_scaling` {"type" | "rope_type": ...}. -> {rope_type, rope_theta, ...}."""
    rp = hf.get("rope_parameters")
    if rp is None:
        rp = dict(hf.get("rope_scaling") or {})
        rp.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    rp = dict(rp)
    rp["rope_type"] = rp.get("rope_type") or rp.get("type") or "default"
    return rp


def mla_config(hf: dict) -> MLAConfig:
    rp = rope_parameters(hf)
    kind = rp["rope_type"]
    if kind not in ("default", "yarn"):
        raise _err("rope_scaling", f"rope type {kind!r} has no MLA counterpart; only 'default' and 'yarn' map exactly")
    if rp.get("partial_rotary_factor", 1.0) != 1.0:
        raise _err("partial_rotary_factor", f"{rp['partial_rotary_factor']} is not supported (MLA rotates all qk_rope_head_dim dims)")
    kw: dict[str, Any] = {}
    if kind == "yarn":
        orig = rp.get("original_max_position_embeddings")
        if orig is None:
            raise _err("rope_scaling.original_max_position_embeddings", "YaRN needs it; add it to config.json")
        factor = rp.get("factor")
        if factor is None:  # transformers' rule: the ratio of the context lengths
            factor = hf["max_position_embeddings"] / orig
        kw = dict(
            rope_factor=float(factor), rope_original_max_len=int(orig),
            yarn_beta_fast=float(rp.get("beta_fast") or 32), yarn_beta_slow=float(rp.get("beta_slow") or 1),
            yarn_mscale=float(rp.get("mscale") or 0.0), yarn_mscale_all_dim=float(rp.get("mscale_all_dim") or 0.0),
            yarn_attention_factor=None if rp.get("attention_factor") is None else float(rp["attention_factor"]),
            yarn_truncate=bool(rp.get("truncate", True)),
        )
    cfg = MLAConfig(
        num_heads=hf["num_attention_heads"], kv_lora_rank=hf["kv_lora_rank"], q_lora_rank=hf.get("q_lora_rank"),
        qk_nope_head_dim=hf["qk_nope_head_dim"], qk_rope_head_dim=hf["qk_rope_head_dim"],
        v_head_dim=hf["v_head_dim"], rope_theta=float(rp.get("rope_theta", 10000.0)), **kw,
    )
    return cfg


def _check_supported(hf: dict) -> None:
    mt = hf.get("model_type")
    if mt not in MODEL_TYPES:
        raise _err("model_type", f"{mt!r} is not a DeepSeek family model ({', '.join(MODEL_TYPES)})")
    checks = [
        ("quantization_config", hf.get("quantization_config") is None,
         "quantized checkpoints (e.g. DeepSeek-V3's FP8 weights) are not supported; dequantize to bf16/fp32 first"),
        ("hidden_act", hf.get("hidden_act", "silu") == "silu", f"{hf.get('hidden_act')!r}: only 'silu' (SwiGLU) maps"),
        ("attention_bias", not hf.get("attention_bias", False), "true is not supported (MLA has no projection biases)"),
        ("mlp_bias", not hf.get("mlp_bias", False), "true is not supported (the FFNs have no biases)"),
        ("attention_dropout", not hf.get("attention_dropout"), "must be 0 (the project's attention has no dropout)"),
        ("num_key_value_heads", hf.get("num_key_value_heads") in (None, hf["num_attention_heads"]),
         f"{hf.get('num_key_value_heads')} != num_attention_heads={hf['num_attention_heads']}: MLA keys are per head"),
        ("moe_layer_freq", hf.get("moe_layer_freq", 1) == 1,
         "only 1 maps (transformers' DeepSeek models make every layer from first_k_dense_replace on a MoE layer)"),
        ("n_routed_experts", hf.get("n_routed_experts") is not None, "a DeepSeek model without routed experts is not supported"),
    ]
    if mt == "deepseek_v3":
        checks += [
            ("scoring_func", hf.get("scoring_func", "sigmoid") == "sigmoid", "DeepseekV3 gates with sigmoid only"),
            ("topk_method", hf.get("topk_method", "noaux_tc") == "noaux_tc", "DeepseekV3 routes with 'noaux_tc' only"),
            ("n_group", hf.get("n_group") is not None, "must be set (1 = no group-limited routing)"),
        ]
    else:
        checks += [
            ("scoring_func", hf.get("scoring_func", "softmax") == "softmax", "DeepseekV2 gates with softmax only"),
            ("topk_method", hf.get("topk_method", "greedy") in ("greedy", "group_limited_greedy"),
             f"{hf.get('topk_method')!r}: DeepseekV2 maps 'greedy' and 'group_limited_greedy'"),
            ("norm_topk_prob", not hf.get("norm_topk_prob", False),
             "true is ambiguous for DeepseekV2 (transformers ignores it, DeepSeek's code normalises); set it false"),
        ]
    for field, ok, msg in checks:
        if not ok:
            raise _err(field, msg)


def moe_config(hf: dict) -> MoEConfig:
    """The routed-expert FFN. Training-only settings (the checkpoint holds none): V3 trains with the
    aux-loss-free bias (gamma 1e-3) and the sequence-wise loss (alpha 1e-4) as in its paper; V2 with
    aux_loss_alpha as a sequence-wise (`seq_aux`) or expert-level balance loss and no bias."""
    v3 = hf["model_type"] == "deepseek_v3"
    e = hf["n_routed_experts"]
    if v3:
        groups, topk_groups = hf["n_group"], hf["topk_group"]
    elif hf.get("topk_method", "greedy") == "group_limited_greedy":
        groups, topk_groups = hf.get("n_group"), hf.get("topk_group")
        if not groups or not topk_groups:
            raise _err("n_group", "group_limited_greedy needs n_group and topk_group")
    else:
        groups, topk_groups = 1, 1
    if groups < 1 or e % groups:
        raise _err("n_group", f"{groups} must divide n_routed_experts={e}")
    if not 1 <= topk_groups <= groups:
        raise _err("topk_group", f"{topk_groups} must lie in [1, n_group={groups}]")
    if v3 and groups > 1 and e // groups < 2:
        raise _err("n_group", f"DeepseekV3 scores a group by its top-2 experts; {e // groups} per group is too few")
    k = hf["num_experts_per_tok"]
    if not 1 <= k <= topk_groups * (e // groups):
        raise _err("num_experts_per_tok", f"{k} must lie in [1, topk_group * experts per group = {topk_groups * (e // groups)}]")
    alpha = float(hf.get("aux_loss_alpha", 0.001))
    train = (dict(gamma=1e-3, seq_aux_alpha=1e-4) if v3 else
             dict(gamma=0.0, seq_aux_alpha=alpha if hf.get("seq_aux", True) else 0.0,
                  expert_aux_alpha=0.0 if hf.get("seq_aux", True) else alpha))
    return MoEConfig(
        num_experts=e, top_k=k, num_shared=int(hf.get("n_shared_experts") or 0), expert_dim=hf["moe_intermediate_size"],
        score_func="sigmoid" if v3 else "softmax", num_groups=groups, topk_groups=topk_groups,
        group_score="top2_sum" if v3 else "max", route_scale=float(hf.get("routed_scaling_factor", 1.0)),
        normalize=bool(hf.get("norm_topk_prob", True)) if v3 else False, **train,
    )


def model_kinds(hf: dict) -> dict[str, Any]:
    """-> the DecoderConfig fields a DeepSeek config.json determines (vocab, widths, patterns, norms, tying)."""
    _check_supported(hf)
    n = hf["num_hidden_layers"]
    k = min(int(hf.get("first_k_dense_replace") or 0), n)
    dense, moe = MLPConfig(mlp_dim=hf["intermediate_size"]), moe_config(hf) if k < n else None
    # one config object per entry (the decoder refuses shared entries: an override must change one layer)
    ffn = tuple(dataclasses.replace(dense if i < k else moe) for i in range(n))
    return dict(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], num_layers=n, layer_pattern=(mla_config(hf),),
        ffn_pattern=ffn, tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), init_std=float(hf.get("initializer_range", 0.02)),
    )


def rope_perm(dr: int) -> np.ndarray:
    """Interleaved pairs (0, 1), (2, 3), ... -> half-split: [0, 2, 4, ..., 1, 3, 5, ...]."""
    return np.concatenate([np.arange(0, dr, 2), np.arange(1, dr, 2)])


def _interleaved(hf: dict) -> bool:
    return hf["model_type"] == "deepseek_v2" or bool(hf.get("rope_interleave", True))


def _mla_perms(cfg: MLAConfig, interleaved: bool) -> tuple[np.ndarray, np.ndarray]:
    """(row order of one query head [dn + dr], row order of kv_a [R + dr]) taking HF rows to ours."""
    dn, dr, r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
    perm = rope_perm(dr) if interleaved else np.arange(dr)
    return np.concatenate([np.arange(dn), dn + perm]), np.concatenate([np.arange(r), r + perm])


def mla_from_hf(get: Callable[[str], np.ndarray], prefix: str, cfg: MLAConfig, interleaved: bool) -> dict:
    """HF `...self_attn.` tensors -> the MLA module's params (numpy, float32 or the stored dtype)."""
    h, dn, dr, dv, r = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    qperm, kvperm = _mla_perms(cfg, interleaved)

    def q_heads(w):  # [H (dn + dr), in] -> [in, H, dn + dr]
        return np.transpose(w.reshape(h, dn + dr, -1)[:, qperm], (2, 0, 1))

    out: dict[str, Any] = {}
    if cfg.q_lora_rank is None:
        out["query"] = {"kernel": q_heads(get(prefix + "q_proj.weight"))}
    else:
        out["q_a"] = {"kernel": get(prefix + "q_a_proj.weight").T}
        out["q_a_norm"] = {"scale": get(prefix + "q_a_layernorm.weight")}
        out["q_b"] = {"kernel": q_heads(get(prefix + "q_b_proj.weight"))}
    out["kv_a"] = {"kernel": get(prefix + "kv_a_proj_with_mqa.weight")[kvperm].T}
    out["kv_a_norm"] = {"scale": get(prefix + "kv_a_layernorm.weight")}
    out["kv_b"] = {"kernel": np.transpose(get(prefix + "kv_b_proj.weight").reshape(h, dn + dv, r), (2, 0, 1))}
    out["out"] = {"kernel": get(prefix + "o_proj.weight").T.reshape(h, dv, -1)}
    return out


def mla_to_hf(p: dict, prefix: str, cfg: MLAConfig, interleaved: bool) -> dict[str, np.ndarray]:
    """Inverse of mla_from_hf."""
    h, dn, dr, dv, r = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    qperm, kvperm = _mla_perms(cfg, interleaved)
    qinv, kvinv = np.argsort(qperm), np.argsort(kvperm)

    def q_rows(k):  # [in, H, dn + dr] -> [H (dn + dr), in]
        return np.transpose(k, (1, 2, 0))[:, qinv].reshape(h * (dn + dr), -1)

    out = {}
    if cfg.q_lora_rank is None:
        out[prefix + "q_proj.weight"] = q_rows(p["query"]["kernel"])
    else:
        out[prefix + "q_a_proj.weight"] = p["q_a"]["kernel"].T
        out[prefix + "q_a_layernorm.weight"] = p["q_a_norm"]["scale"]
        out[prefix + "q_b_proj.weight"] = q_rows(p["q_b"]["kernel"])
    out[prefix + "kv_a_proj_with_mqa.weight"] = p["kv_a"]["kernel"].T[kvinv]
    out[prefix + "kv_a_layernorm.weight"] = p["kv_a_norm"]["scale"]
    out[prefix + "kv_b_proj.weight"] = np.transpose(p["kv_b"]["kernel"], (1, 2, 0)).reshape(h * (dn + dv), r)
    out[prefix + "o_proj.weight"] = p["out"]["kernel"].reshape(h * dv, -1).T
    return out


def moe_from_hf(get: Callable[[str], np.ndarray], has: Callable[[str], bool], prefix: str, cfg: MoEConfig) -> tuple[dict, np.ndarray]:
    """HF `...mlp.` tensors of a MoE layer -> (MoE params, routing bias [E] float32 (zeros for V2))."""
    e, f = cfg.num_experts, cfg.expert_dim
    if has(prefix + "experts.gate_up_proj"):  # transformers' in-memory fused layout
        gu = get(prefix + "experts.gate_up_proj")  # [E, 2F, D]: gate rows, then up rows
        w_gate, w_up = np.transpose(gu[:, :f], (0, 2, 1)), np.transpose(gu[:, f:], (0, 2, 1))
        w_down = np.transpose(get(prefix + "experts.down_proj"), (0, 2, 1))
    else:
        stack = lambda n: np.stack([get(f"{prefix}experts.{j}.{n}.weight").T for j in range(e)])
        w_gate, w_up, w_down = stack("gate_proj"), stack("up_proj"), stack("down_proj")
    p = {"gate": get(prefix + "gate.weight").T, "w_gate": w_gate, "w_up": w_up, "w_down": w_down}
    if cfg.num_shared:
        s = prefix + "shared_experts."
        p.update(shared_gate=get(s + "gate_proj.weight").T, shared_up=get(s + "up_proj.weight").T,
                 shared_down=get(s + "down_proj.weight").T)
    name = prefix + "gate.e_score_correction_bias"
    bias = get(name).astype(np.float32) if has(name) else np.zeros((e,), np.float32)
    return p, bias


def moe_to_hf(p: dict, bias: np.ndarray | None, prefix: str, cfg: MoEConfig) -> dict[str, np.ndarray]:
    """Inverse of moe_from_hf, per-expert tensors (the layout of DeepSeek's checkpoints); bias None = V2."""
    out = {prefix + "gate.weight": p["gate"].T}
    if bias is not None:
        out[prefix + "gate.e_score_correction_bias"] = np.asarray(bias, np.float32)
    for j in range(cfg.num_experts):
        for n, w in (("gate_proj", p["w_gate"]), ("up_proj", p["w_up"]), ("down_proj", p["w_down"])):
            out[f"{prefix}experts.{j}.{n}.weight"] = w[j].T
    if cfg.num_shared:
        s = prefix + "shared_experts."
        out.update({s + "gate_proj.weight": p["shared_gate"].T, s + "up_proj.weight": p["shared_up"].T,
                    s + "down_proj.weight": p["shared_down"].T})
    return out


def mtp_names(names, num_layers: int) -> list[str]:
    """Tensor names of layers >= num_hidden_layers (DeepSeek-V3's multi-token-prediction module)."""
    return [n for n in names if (m := _MTP.match(n)) and int(m.group(1)) >= num_layers]


# ------------------------------------------------------------------------------------------- whole model
def from_hf(hf: dict, get: Callable[[str], np.ndarray], names) -> tuple[dict, dict, dict, list[str]]:
    """config.json dict + tensor reader -> (DecoderConfig fields, params, stats, skipped tensor names).

    params / stats are the unboxed, unscanned trees of models.decoder.Decoder (numpy leaves); stats holds
    each MoE layer's routing bias as {"stack": {"layer_i": {"ffn": {"router": bias [E]}}}}."""
    fields = model_kinds(hf)
    names = set(names)
    has = names.__contains__
    mla, interleaved = fields["layer_pattern"][0], _interleaved(hf)
    ffns = [fields["ffn_pattern"][i % len(fields["ffn_pattern"])] for i in range(fields["num_layers"])]
    stack, stats = {}, {}
    for i, ffn in enumerate(ffns):
        pre = f"model.layers.{i}."
        layer = {
            "mixer_norm": {"scale": get(pre + "input_layernorm.weight")},
            "mixer": mla_from_hf(get, pre + "self_attn.", mla, interleaved),
            "ffn_norm": {"scale": get(pre + "post_attention_layernorm.weight")},
        }
        if isinstance(ffn, MoEConfig):
            layer["ffn"], bias = moe_from_hf(get, has, pre + "mlp.", ffn)
            stats[f"layer_{i}"] = {"ffn": {"router": bias}}
        else:
            layer["ffn"] = {"wi_gate": {"kernel": get(pre + "mlp.gate_proj.weight").T},
                            "wi_up": {"kernel": get(pre + "mlp.up_proj.weight").T},
                            "wo": {"kernel": get(pre + "mlp.down_proj.weight").T}}
        stack[f"layer_{i}"] = layer
    stack["final_norm"] = {"scale": get("model.norm.weight")}
    params = {"embed": {"embedding": get("model.embed_tokens.weight")}, "stack": stack}
    if not fields["tie_embeddings"]:
        params["lm_head"] = {"kernel": get("lm_head.weight").T}
    return fields, params, {"stack": stats} if stats else {}, mtp_names(names, fields["num_layers"])


def _same(entries, what: str, field: str):
    first = entries[0]
    if any(e != first for e in entries[1:]):
        raise _err(field, f"DeepSeek checkpoints hold one {what} config for every layer; these layers differ")
    return first


def hf_config(cfg, *, dtype: str, max_position_embeddings: int, base: dict | None = None) -> dict:
    """DecoderConfig of MLA + (first-k mlp, then moe) layers -> a DeepSeek config.json dict.

    The family is V3 for a sigmoid gate (or no MoE layer), V2 for a softmax gate. `base`: the config.json
    the run was imported from, if any; its V3 `rope_interleave` is kept (so the exported tensors equal the
    imported ones), else V3 exports use DeepSeek's interleaved layout."""
    n = cfg.num_layers
    mixers = [cfg.layer_pattern[i % len(cfg.layer_pattern)] for i in range(n)]
    ffns = [cfg.ffn_pattern[i % len(cfg.ffn_pattern)] for i in range(n)]
    if not all(isinstance(m, MLAConfig) for m in mixers):
        raise _err("model.layer_pattern", "a DeepSeek export needs an 'mla' mixer in every layer")
    mla = _same(mixers, "MLA", "model.layer_pattern")
    if mla.latent_norm_eps != 1e-6:
        raise _err("model.layer_pattern.mla.latent_norm_eps", "transformers' DeepSeek latent RMSNorms use 1e-6 only")
    k = next((i for i, f in enumerate(ffns) if not isinstance(f, MLPConfig)), n)
    if not all(isinstance(f, MoEConfig) for f in ffns[k:]):
        raise _err("model.ffn_pattern", "a DeepSeek export needs 'mlp' FFNs first, then 'moe' FFNs only")
    mlps, moes = ffns[:k], ffns[k:]
    dense = _same(mlps, "dense MLP", "model.ffn_pattern") if mlps else None
    moe = _same(moes, "MoE", "model.ffn_pattern") if moes else None
    v3 = moe is None or moe.score_func == "sigmoid"
    out: dict[str, Any] = {
        "architectures": [MODEL_TYPES["deepseek_v3" if v3 else "deepseek_v2"]],
        "model_type": "deepseek_v3" if v3 else "deepseek_v2",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": n,
        "num_attention_heads": mla.num_heads, "num_key_value_heads": mla.num_heads,
        "q_lora_rank": mla.q_lora_rank, "kv_lora_rank": mla.kv_lora_rank,
        "qk_nope_head_dim": mla.qk_nope_head_dim, "qk_rope_head_dim": mla.qk_rope_head_dim,
        "v_head_dim": mla.v_head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "attention_dropout": 0.0,
        "max_position_embeddings": max_position_embeddings, "first_k_dense_replace": k,
        "initializer_range": cfg.init_std, "torch_dtype": dtype, "dtype": dtype,
        "intermediate_size": dense.mlp_dim if dense else (moe.expert_dim if moe else 1),
    }
    rope = {"rope_type": "default", "rope_theta": mla.rope_theta}
    if mla.rope_factor != 1.0:
        rope.update(rope_type="yarn", factor=mla.rope_factor, original_max_position_embeddings=mla.rope_original_max_len,
                    beta_fast=mla.yarn_beta_fast, beta_slow=mla.yarn_beta_slow, truncate=mla.yarn_truncate)
        for key, v in (("mscale", mla.yarn_mscale), ("mscale_all_dim", mla.yarn_mscale_all_dim),
                       ("attention_factor", mla.yarn_attention_factor)):
            if v:
                rope[key] = v
    out["rope_parameters"] = rope
    if v3:
        out.update(rope_interleave=bool((base or {}).get("rope_interleave", True)), num_nextn_predict_layers=0)
    if moe is None:
        return out
    if moe.device_limited_m is not None:
        raise _err("model.ffn_pattern.moe.device_limited_m",
                   "routing that depends on the expert mesh axis has no HF counterpart; set num_groups/topk_groups")
    out.update(n_routed_experts=moe.num_experts, num_experts_per_tok=moe.top_k, n_shared_experts=moe.num_shared,
               moe_intermediate_size=moe.expert_dim, routed_scaling_factor=moe.route_scale,
               n_group=moe.num_groups, topk_group=moe.topk_groups)
    if v3:
        if moe.num_groups > 1 and moe.group_score != "top2_sum":
            raise _err("model.ffn_pattern.moe.group_score", "DeepseekV3 scores groups by 'top2_sum' only")
        out.update(norm_topk_prob=moe.normalize, topk_method="noaux_tc", scoring_func="sigmoid")
    else:
        if moe.normalize:
            raise _err("model.ffn_pattern.moe.normalize", "DeepseekV2 (softmax gate) never normalises the top-k weights; set it false")
        if moe.num_groups > 1 and moe.group_score != "max":
            raise _err("model.ffn_pattern.moe.group_score", "DeepseekV2 scores groups by 'max' only")
        out.update(norm_topk_prob=False, scoring_func="softmax",
                   topk_method="group_limited_greedy" if moe.num_groups > 1 else "greedy")
    return out


def to_hf(cfg, params: dict, stats: dict, hf: dict) -> dict[str, np.ndarray]:
    """Unscanned, unboxed params / stats (numpy) -> HF tensors, for the config.json `hf_config` wrote.
    stats: {"stack": {"layer_i": {"ffn": {"router": bias [E]}}}} (a V2 export needs every bias zero)."""
    n = cfg.num_layers
    v3 = hf["model_type"] == "deepseek_v3"
    interleaved = _interleaved(hf)
    out = {"model.embed_tokens.weight": params["embed"]["embedding"], "model.norm.weight": params["stack"]["final_norm"]["scale"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = params["lm_head"]["kernel"].T
    for i in range(n):
        pre, lp = f"model.layers.{i}.", params["stack"][f"layer_{i}"]
        mla, ffn = cfg.layer_pattern[i % len(cfg.layer_pattern)], cfg.ffn_pattern[i % len(cfg.ffn_pattern)]
        out[pre + "input_layernorm.weight"] = lp["mixer_norm"]["scale"]
        out[pre + "post_attention_layernorm.weight"] = lp["ffn_norm"]["scale"]
        out.update(mla_to_hf(lp["mixer"], pre + "self_attn.", mla, interleaved))
        if isinstance(ffn, MoEConfig):
            bias = np.asarray(stats["stack"][f"layer_{i}"]["ffn"]["router"], np.float32)
            if not v3 and np.any(bias != 0):
                raise _err("model.ffn_pattern.moe.gamma",
                           f"layer {i} has a non-zero routing bias but DeepseekV2 has no e_score_correction_bias "
                           "(train softmax-gated models with gamma=0 to export them)")
            out.update(moe_to_hf(lp["ffn"], bias if v3 else None, pre + "mlp.", ffn))
        else:
            f = lp["ffn"]
            out.update({pre + "mlp.gate_proj.weight": f["wi_gate"]["kernel"].T, pre + "mlp.up_proj.weight": f["wi_up"]["kernel"].T,
                        pre + "mlp.down_proj.weight": f["wo"]["kernel"].T})
    return {k: np.ascontiguousarray(v) for k, v in out.items()}
