"""Mamba-2 (`Mamba2ForCausalLM`, the layout of state-spaces/mamba2-130m) <-> the `mamba2` recipe with
mixer-only blocks (ffn_pattern = NoFFNConfig: x <- x + Mamba2(RMSNorm(x)), no FFN).

config.json fields:
  hidden_size, num_hidden_layers, vocab_size -> d_model, num_layers, vocab_size; tie_word_embeddings
  state_size, head_dim, expand, conv_kernel, n_groups, chunk_size
      -> d_state, head_dim, expand, d_conv, ngroups, chunk_size
  layer_norm_epsilon -> norm_eps (block norms, final norm and the gated norm inside the mixer)
  time_step_min / max / floor -> dt_min / dt_max / dt_init_floor (initialisation only)
The gated norm normalises each of the n_groups groups of d_inner / n_groups channels, as mamba_ssm and
transformers' CUDA path do (transformers' CPU path normalises all of d_inner at once, which differs from
them when n_groups > 1).
Tensors (torch Linear weights are [out, in]; ours [in, out]):
  backbone.embeddings.weight [V, D] (older files: backbone.embedding.weight)   embed/embedding
  backbone.layers.i.norm.weight                       stack/layer_i/mixer_norm/scale
  backbone.layers.i.mixer.in_proj.weight [2I+2GN+H, D]   mixer/in_proj/kernel [D, 2I+2GN+H]  (z, xBC, dt order)
  mixer.conv1d.weight [I+2GN, 1, K], conv1d.bias     mixer/conv_kernel [K, I+2GN], conv_bias
  mixer.dt_bias, A_log, D [H]; mixer.norm.weight [I]   mixer/dt_bias, A_log, D, norm
  mixer.out_proj.weight [D, I]                         mixer/out_proj/kernel [I, D]
  backbone.norm_f.weight                               stack/final_norm/scale
  lm_head.weight [V, D]                                lm_head/kernel [D, V] (absent when tied)
Not mapped (one-line errors): in/out projection biases (use_bias), a conv without bias, dt clamping
(time_step_limit other than (0, inf)), activations other than SiLU.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from models.decoder import DecoderConfig
from models.kinds import NoFFNConfig
from models.ssm import Mamba2Config
from tools.hf.common import UnsupportedError, base_fields, check, linear_in, linear_out

MODEL_TYPES = {"mamba2": "Mamba2ForCausalLM"}
RECIPE = "mamba2"
STRUCTURE = ("d_state", "head_dim", "expand", "d_conv", "ngroups")  # what the weights' meaning depends on


def _float(v: Any) -> float:
    """A config.json number, including transformers 5's {"__float__": "Infinity"} spelling."""
    if isinstance(v, dict) and "__float__" in v:
        v = v["__float__"]
    try:
        return float(v)
    except (TypeError, ValueError):
        raise UnsupportedError(f"time_step_limit: {v!r} is not a number") from None


def _check_supported(hf: dict) -> None:
    check(hf.get("hidden_act", "silu") == "silu", "hidden_act", f"{hf.get('hidden_act')!r}: only 'silu' maps")
    check(not hf.get("use_bias", False), "use_bias", "true is not supported (the mixer's projections have no biases)")
    check(hf.get("use_conv_bias", True), "use_conv_bias", "false is not supported (the mixer's conv has a bias)")
    lo, hi = (list(hf.get("time_step_limit") or (0.0, math.inf)) + [math.inf])[:2]
    check(_float(lo) == 0.0 and _float(hi) == math.inf, "time_step_limit",
          f"{hf.get('time_step_limit')}: dt clamping is not supported; only (0.0, inf) maps")
    expand = hf.get("expand", 2)
    check(float(expand).is_integer(), "expand", f"{expand}: only integer expansion factors map")
    d_inner = int(expand) * hf["hidden_size"]
    heads = hf.get("num_heads")
    check(heads is None or heads * hf.get("head_dim", 64) == d_inner, "num_heads",
          f"{heads} x head_dim {hf.get('head_dim', 64)} != expand x hidden_size = {d_inner}")


def mixer_config(hf: dict) -> Mamba2Config:
    return Mamba2Config(
        d_state=hf.get("state_size", 128), head_dim=hf.get("head_dim", 64), expand=int(hf.get("expand", 2)),
        d_conv=hf.get("conv_kernel", 4), ngroups=hf.get("n_groups", 1), chunk_size=hf.get("chunk_size", 256),
        dt_min=float(hf.get("time_step_min", 1e-3)), dt_max=float(hf.get("time_step_max", 0.1)),
        dt_init_floor=float(hf.get("time_step_floor", 1e-4)),
    )


def model_fields(hf: dict) -> dict[str, Any]:
    _check_supported(hf)
    return dict(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        layer_pattern=(mixer_config(hf),), ffn_pattern=(NoFFNConfig(),),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        init_std=float(hf.get("initializer_range", 0.02)),
    )


def mixer_from_hf(tensors, prefix: str) -> dict:
    """`...mixer.` tensors -> the Mamba2 mixer's params."""
    conv = tensors.get(prefix + "conv1d.weight")  # [C, 1, K]
    return {
        "in_proj": {"kernel": linear_in(tensors.get(prefix + "in_proj.weight"))},
        "conv_kernel": np.ascontiguousarray(conv[:, 0, :].T),
        "conv_bias": tensors.get(prefix + "conv1d.bias"),
        "dt_bias": tensors.get(prefix + "dt_bias"),
        "A_log": tensors.get(prefix + "A_log"),
        "D": tensors.get(prefix + "D"),
        "norm": tensors.get(prefix + "norm.weight"),
        "out_proj": {"kernel": linear_in(tensors.get(prefix + "out_proj.weight"))},
    }


def mixer_to_hf(p: dict, prefix: str) -> dict[str, np.ndarray]:
    return {
        prefix + "in_proj.weight": linear_out(p["in_proj"]["kernel"]),
        prefix + "conv1d.weight": np.ascontiguousarray(p["conv_kernel"].T[:, None, :]),
        prefix + "conv1d.bias": p["conv_bias"], prefix + "dt_bias": p["dt_bias"], prefix + "A_log": p["A_log"],
        prefix + "D": p["D"], prefix + "norm.weight": p["norm"],
        prefix + "out_proj.weight": linear_out(p["out_proj"]["kernel"]),
    }


def from_hf(hf: dict, model: DecoderConfig, tensors) -> tuple[dict, None]:
    emb_name = ("backbone.embeddings.weight" if tensors.has("backbone.embeddings.weight")
                else "backbone.embedding.weight")  # older files
    emb = tensors.get(emb_name)
    params: dict[str, Any] = {"embed": {"embedding": emb}}
    if model.tie_embeddings:
        if tensors.has("lm_head.weight") and not np.array_equal(tensors.get("lm_head.weight"), emb):
            raise UnsupportedError("tie_word_embeddings: true, but lm_head.weight differs from the embedding table")
    else:
        params["lm_head"] = {"kernel": linear_in(tensors.get("lm_head.weight"))}
    stack: dict[str, Any] = {"final_norm": {"scale": tensors.get("backbone.norm_f.weight")}}
    for i in range(model.num_layers):
        pre = f"backbone.layers.{i}."
        stack[f"layer_{i}"] = {"mixer_norm": {"scale": tensors.get(pre + "norm.weight")},
                               "mixer": mixer_from_hf(tensors, pre + "mixer.")}
    params["stack"] = stack
    return params, None


def _structure(m: Mamba2Config) -> tuple:
    return tuple(getattr(m, k) for k in STRUCTURE)


def accepts(model: Any) -> str | None:
    if not isinstance(model, DecoderConfig):
        return f"{type(model).__name__} is not a DecoderConfig"
    if not all(type(m) is Mamba2Config for m in model.layer_pattern):
        return "needs every mixer to be 'mamba2'"
    if len({_structure(m) for m in model.layer_pattern}) != 1:
        return "needs every mamba2 mixer to have the same d_state, head_dim, expand, d_conv and ngroups"
    if not all(type(f) is NoFFNConfig for f in model.ffn_pattern):
        return "needs mixer-only blocks (ffn_pattern = none); Mamba-2 + MLP stacks export as granitemoehybrid"
    return None


def to_hf(model: DecoderConfig, params: dict, stats: dict, base: dict | None, model_type: str | None):
    del stats  # fitted-noise moments and carried states are training state; HF has none
    check(model_type in (None, "mamba2"), "model_type", f"{model_type} is not written by the mamba2 family")
    m = model.layer_pattern[0]
    _, heads = m.dims(model.d_model)
    cfg = dict(base_fields(base, "mamba2"))
    cfg.update(
        architectures=[MODEL_TYPES["mamba2"]], model_type="mamba2", vocab_size=model.vocab_size,
        hidden_size=model.d_model, num_hidden_layers=model.num_layers, state_size=m.d_state, head_dim=m.head_dim,
        num_heads=heads, expand=m.expand, conv_kernel=m.d_conv, n_groups=m.ngroups, chunk_size=m.chunk_size,
        layer_norm_epsilon=model.norm_eps, tie_word_embeddings=model.tie_embeddings, use_bias=False,
        use_conv_bias=True, hidden_act="silu", time_step_min=m.dt_min, time_step_max=m.dt_max,
        time_step_floor=m.dt_init_floor, time_step_limit=[0.0, float("inf")], initializer_range=model.init_std,
    )
    out = {"backbone.embeddings.weight": params["embed"]["embedding"],
           "backbone.norm_f.weight": params["stack"]["final_norm"]["scale"]}
    if not model.tie_embeddings:
        out["lm_head.weight"] = linear_out(params["lm_head"]["kernel"])
    for i in range(model.num_layers):
        p, pre = params["stack"][f"layer_{i}"], f"backbone.layers.{i}."
        out[pre + "norm.weight"] = p["mixer_norm"]["scale"]
        out.update(mixer_to_hf(p["mixer"], pre + "mixer."))
    return cfg, out

