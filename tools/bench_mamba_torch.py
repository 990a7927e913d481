"""`python -m tools.bench_mamba_torch --src .anchors/mamba [--preset gpu_340m] [--steps 5] [--warmup 2] [--set k=v ...]
[--json PATH]`: issue 18's PyTorch anchor for `mamba2:gpu_340m`: the same model trained in PyTorch with mamba_ssm's
own model code and Triton kernels, timed like `tools.bench_train` (tokens/s, step time, peak memory).

The mamba_ssm sources are never part of the project: `bash scripts/fetch_anchors.sh MIRROR` extracts the package
into the git-ignored `.anchors/mamba/`, and `load_mamba_ssm` imports it from there at run time. The package's
`__init__` (it imports the selective-scan CUDA extension) never runs: `mamba_ssm` and its subpackages are registered
as bare packages whose `__path__` points at the sources, and the four modules `models.mixer_seq_simple` imports
that a Mamba-2 LM never uses are stubs (`modules.mamba_simple` / `modules.mamba3`: the Mamba-1/-3 mixers;
`utils.generation` / `utils.hf`: decoding and Hub loading). What runs is mamba_ssm's: `MambaLMHeadModel` /
`MixerModel` / `Block` with `fused_add_norm` and RMSNorm (Triton `ops/triton/layer_norm`), `Mamba2` mixers with
`use_mem_eff_path=False` (the fused path needs causal_conv1d's CUDA extension, absent on the device machine),
i.e. in_proj, the causal depthwise conv through `nn.Conv1d` (mamba_ssm's own fallback when `causal_conv1d_fn`
is None; said as `conv1d: torch fallback` in the output), Triton `mamba_chunk_scan_combined` (SSD) and Triton
gated RMSNorm (`ops/triton/layernorm_gated`), and `GatedMLP` (SwiGLU). Nothing else needs a CUDA extension.

The shapes come from our preset through `torch_config` (a one-line error for anything it cannot map). Parameter
counts agree exactly (`torch_param_count`, printed next to our JAX model's, built abstractly with
jax.eval_shape) with `pad_vocab_size_multiple=1`; differences that change neither shapes nor the work of a
step: mamba_ssm's norms use eps 1e-5 (ours `norm_eps`), its residual stream is float32 (`residual_in_fp32`,
mamba_ssm's default; ours is the compute dtype), initialisation, and our preset's full rematerialisation
(`remat_policy`), which PyTorch does not do (mamba_ssm's default: activations kept). Our SSD also records the
final states (`track_states`) and masks documents (segment_ids of one document per row); PyTorch gets no
`seq_idx`. Training: float32 parameters under `torch.autocast("cuda", bfloat16)` (our `dtype`), AdamW(fused) at
the preset's lr, betas, eps and weight decay (none on 1-D parameters and mamba_ssm's `_no_weight_decay` ones),
gradient clipping at `clip_norm`, cross-entropy in float32 on random tokens (4 rotating batches), eager mode.
The tool exits 2 with one line when --src is missing or incomplete, torch / triton / einops is missing, or
there is no CUDA device.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.machinery
import importlib.util
import json
import os
import statistics
import sys
import time
import types

# the files load_mamba_ssm imports (relative to <src>/mamba_ssm); a src without one of them is incomplete
REQUIRED = (
    "models/mixer_seq_simple.py", "models/config_mamba.py", "modules/mamba2.py", "modules/block.py",
    "modules/mlp.py", "modules/mha.py", "distributed/tensor_parallel.py", "distributed/distributed_utils.py",
    "utils/torch.py", "utils/determinism.py", "ops/triton/layer_norm.py", "ops/triton/layernorm_gated.py",
    "ops/triton/ssd_combined.py", "ops/triton/ssd_bmm.py", "ops/triton/ssd_chunk_scan.py",
    "ops/triton/ssd_chunk_state.py", "ops/triton/ssd_state_passing.py", "ops/triton/k_activations.py",
    "ops/triton/softplus.py", "ops/triton/selective_state_update.py",
)
PACKAGES = ("mamba_ssm", "mamba_ssm.models", "mamba_ssm.modules", "mamba_ssm.ops", "mamba_ssm.ops.triton",
            "mamba_ssm.utils", "mamba_ssm.distributed")
GATED_MLP_MULTIPLE = 128  # mamba_ssm's GatedMLP rounds its hidden width up to a multiple of this

# Fields of our config that change neither the PyTorch model's shapes nor a step's work, or that the anchor
# deliberately leaves at mamba_ssm's defaults (module doc); any other field must be mapped by torch_config.
DECODER_NOT_MAPPED = ("scan_layers", "remat_policy", "norm_eps", "init_std", "scale_out_init", "sample")
MAMBA2_NOT_MAPPED = ("implementation", "track_states", "document_reset", "noise_std", "stats_momentum",
                     "fitted_noise_scope")


class AnchorError(Exception):
    """A one-line user error (the tool prints it and exits 2)."""


def _fail(key: str, why: str):
    raise AnchorError(f"cannot map model{'.' + key if key else ''} to mamba_ssm: {why}")


def check_src(src: str) -> None:
    """AnchorError (one line) unless <src>/mamba_ssm holds every file load_mamba_ssm imports."""
    if not os.path.isdir(src):
        raise AnchorError(f"--src {src} does not exist; run bash scripts/fetch_anchors.sh MIRROR_GIT_DIR")
    missing = [p for p in REQUIRED if not os.path.isfile(os.path.join(src, "mamba_ssm", p))]
    if missing:
        raise AnchorError(f"--src {src} holds no complete mamba_ssm sources (missing mamba_ssm/{missing[0]}); run "
                          "bash scripts/fetch_anchors.sh MIRROR_GIT_DIR")


def torch_config(model) -> dict:
    """Our DecoderConfig (a pure Mamba-2 stack) -> `MambaConfig` keyword arguments of the same model in mamba_ssm;
    AnchorError (one line) for anything it cannot map."""
    from axlearn_like.config import ConfigError
    from models.decoder import DecoderConfig
    from models.kinds import NoFFNConfig
    from models.layers import MLPConfig
    from models.ssm import Mamba2Config

    if not isinstance(model, DecoderConfig):
        _fail("", f"{type(model).__name__} is not a DecoderConfig")
    known = {"vocab_size", "d_model", "num_layers", "layer_pattern", "ffn_pattern", "tie_embeddings", "dtype",
             "z_loss_weight", "loss_chunk", *DECODER_NOT_MAPPED}
    for f in dataclasses.fields(model):
        if f.name not in known:
            _fail(f.name, "a field this mapping does not know (extend tools.bench_mamba_torch.torch_config)")
    mixers = model.layer_pattern
    for i, m in enumerate(mixers):
        if not isinstance(m, Mamba2Config):
            _fail(f"layer_pattern[{i}]", f"{type(m).__name__}: only Mamba-2 layers map (one ssm_cfg for every layer)")
        if m != mixers[0]:
            _fail(f"layer_pattern[{i}]", "differs from layer_pattern[0]; mamba_ssm takes one ssm_cfg for every layer")
    m = mixers[0]
    known = {"d_state", "head_dim", "expand", "d_conv", "ngroups", "chunk_size", "dt_min", "dt_max",
             "dt_init_floor", "A_init_range", "initial_state", *MAMBA2_NOT_MAPPED}
    for f in dataclasses.fields(m):
        if f.name not in known:
            _fail(f"layer_pattern.mamba2.{f.name}", "a field this mapping does not know")
    if m.initial_state != "zeros":
        _fail("layer_pattern.mamba2.initial_state", f"{m.initial_state!r}: mamba_ssm trains from a zero state only")
    try:
        m.dims(model.d_model)  # ConfigError when head_dim / ngroups do not fit d_model
    except ConfigError as e:
        _fail("layer_pattern.mamba2", str(e))
    ffns = model.ffn_pattern
    if any(type(f) is not type(ffns[0]) or f != ffns[0] for f in ffns):
        _fail("ffn_pattern", "entries differ; mamba_ssm takes one d_intermediate for every layer")
    if isinstance(ffns[0], NoFFNConfig):
        d_intermediate = 0
    elif isinstance(ffns[0], MLPConfig):
        d_intermediate = ffns[0].mlp_dim
        if d_intermediate % GATED_MLP_MULTIPLE:
            _fail("ffn_pattern.mlp.mlp_dim", f"{d_intermediate}: mamba_ssm's GatedMLP rounds it up to a multiple of "
                  f"{GATED_MLP_MULTIPLE}")
    else:
        _fail("ffn_pattern", f"{type(ffns[0]).__name__}: only the SwiGLU MLP (mlp) or none (none) maps")
    if model.dtype not in ("bfloat16", "float32"):
        _fail("dtype", f"{model.dtype!r}: the anchor runs bfloat16 autocast or float32")
    if model.z_loss_weight:
        _fail("z_loss_weight", f"{model.z_loss_weight}: the anchor's loss is plain cross-entropy")
    if model.loss_chunk:
        _fail("loss_chunk", f"{model.loss_chunk}: the anchor computes the whole logits at once")
    return {
        "d_model": model.d_model, "n_layer": model.num_layers, "d_intermediate": d_intermediate,
        "vocab_size": model.vocab_size, "pad_vocab_size_multiple": 1, "tie_embeddings": model.tie_embeddings,
        "rms_norm": True, "fused_add_norm": True, "residual_in_fp32": True, "attn_layer_idx": [], "attn_cfg": {},
        "ssm_cfg": {
            "layer": "Mamba2", "d_state": m.d_state, "d_conv": m.d_conv, "expand": m.expand, "headdim": m.head_dim,
            "ngroups": m.ngroups, "chunk_size": m.chunk_size, "dt_min": m.dt_min, "dt_max": m.dt_max,
            "dt_init_floor": m.dt_init_floor, "A_init_range": tuple(m.A_init_range), "rmsnorm": True,
            "norm_before_gate": False, "D_has_hdim": False, "bias": False, "conv_bias": True,
            "use_mem_eff_path": False,
        },
    }


def torch_param_count(tc: dict) -> int:
    """Parameters of mamba_ssm's MambaLMHeadModel for the torch_config dict `tc`, by its modules' shapes (tied
    embedding counted once)."""
    d, s = tc["d_model"], tc["ssm_cfg"]
    v = -(-tc["vocab_size"] // tc["pad_vocab_size_multiple"]) * tc["pad_vocab_size_multiple"]
    norm = d if tc["rms_norm"] else 2 * d  # RMSNorm: weight; LayerNorm: weight + bias
    di = s["expand"] * d
    heads, gn = di // s["headdim"], s["ngroups"] * s["d_state"]
    conv_dim = di + 2 * gn
    mixer = (d * (2 * di + 2 * gn + heads) + (2 * di + 2 * gn + heads if s["bias"] else 0)  # in_proj
             + conv_dim * s["d_conv"] + (conv_dim if s["conv_bias"] else 0)  # depthwise conv
             + 2 * heads + (di if s["D_has_hdim"] else heads)  # dt_bias, A_log, D
             + (di if s["rmsnorm"] else 0)  # gated norm
             + di * d + (d if s["bias"] else 0))  # out_proj
    h = tc["d_intermediate"]
    h = -(-h // GATED_MLP_MULTIPLE) * GATED_MLP_MULTIPLE
    mlp = norm + 3 * d * h if h else 0
    per_layer = norm + mixer + mlp
    return v * d * (1 if tc["tie_embeddings"] else 2) + tc["n_layer"] * per_layer + norm


def jax_model(cfg):
    """(param count, training FLOPs/token at the preset's seq_len) of our JAX model, built abstractly."""
    task = cfg.model.build()
    return task.param_count(), task.flops_per_token(cfg.data.seq_len)


def load_mamba_ssm(src: str):
    """-> (MambaConfig, MambaLMHeadModel, info {"version", "commit", "conv1d"}) imported from <src>/mamba_ssm without
    running its package __init__ (module doc). AnchorError when src is incomplete or an import fails."""
    check_src(src)
    root = os.path.join(src, "mamba_ssm")
    for name in PACKAGES:
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [os.path.join(root, *name.split(".")[1:])]
        sys.modules[name] = importlib.util.module_from_spec(spec)

    def unused(what):
        def f(*args, **kwargs):
            raise RuntimeError(f"{what} is stubbed out by tools.bench_mamba_torch (not used by a Mamba-2 LM)")
        return f

    stubs = {
        "mamba_ssm.modules.mamba_simple": {"Mamba": unused("Mamba (Mamba-1)")},
        "mamba_ssm.modules.mamba3": {"Mamba3": unused("Mamba3")},
        "mamba_ssm.utils.generation": {"GenerationMixin": type("GenerationMixin", (), {})},
        "mamba_ssm.utils.hf": {"load_config_hf": unused("load_config_hf"),
                               "load_state_dict_hf": unused("load_state_dict_hf")},
    }
    for name, attrs in stubs.items():
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        sys.modules[name] = mod
    if importlib.util.find_spec("huggingface_hub") is None:  # modules/mamba2.py's Hub mixin base class only
        hub = types.ModuleType("huggingface_hub")
        hub.PyTorchModelHubMixin = type("PyTorchModelHubMixin", (), {})
        sys.modules["huggingface_hub"] = hub
    try:
        from mamba_ssm.models.config_mamba import MambaConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    except Exception as e:  # noqa: BLE001 - one line for any import failure of the anchor's sources
        raise AnchorError(f"importing mamba_ssm from {src} failed: {type(e).__name__}: {e}".splitlines()[0]) from None
    info = {"version": None, "commit": None}
    with open(os.path.join(root, "__init__.py")) as f:
        for line in f:
            if line.startswith("__version__"):
                info["version"] = line.split("=", 1)[1].strip().strip("\"'")
    commit = os.path.join(src, "COMMIT")
    if os.path.isfile(commit):
        with open(commit) as f:
            info["commit"] = f.read().strip()
    fused = sys.modules["mamba_ssm.modules.mamba2"].causal_conv1d_fn is not None
    info["conv1d"] = "causal_conv1d CUDA" if fused else "torch fallback"
    return MambaConfig, MambaLMHeadModel, info


def _check_runtime() -> None:
    for name, why in (("torch", "PyTorch"), ("triton", "mamba_ssm's kernels"), ("einops", "mamba_ssm's modules")):
        if importlib.util.find_spec(name) is None:
            raise AnchorError(f"{name} is not installed ({why}); the anchor needs torch, triton and einops")
    import torch

    if not torch.cuda.is_available():
        raise AnchorError("no CUDA device: mamba_ssm's Triton kernels need a GPU")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_mamba_torch")
    p.add_argument("--src", default=".anchors/mamba", help="folder holding mamba_ssm/ (scripts/fetch_anchors.sh)")
    p.add_argument("--recipe", default="mamba2")
    p.add_argument("--preset", default="gpu_340m")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--json", default=None, metavar="PATH")
    a = p.parse_args(argv)
    try:
        return _run(a)
    except AnchorError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(a) -> int:
    check_src(a.src)
    _check_runtime()
    if "jax" not in sys.modules:  # our model is only built abstractly here: keep JAX from preallocating the GPU
        os.environ["JAX_PLATFORMS"] = "cpu"
    from axlearn_like import config as config_lib
    from axlearn_like.config import ConfigError

    try:
        presets = getattr(importlib.import_module(f"recipes.{a.recipe}"), "PRESETS", {})
    except ModuleNotFoundError as e:
        raise AnchorError(f"--recipe {a.recipe}: {e}") from None
    if a.preset not in presets:
        raise AnchorError(f"--preset {a.preset}: recipe {a.recipe} has {', '.join(presets) or 'no presets'}")
    try:
        cfg = config_lib.apply_overrides(presets[a.preset](), a.set)
    except ConfigError as e:
        raise AnchorError(str(e)) from None
    tc = torch_config(cfg.model)
    opt_cfg, g, s = cfg.optimizer, cfg.data.global_batch_size, cfg.data.seq_len
    if opt_cfg.param_dtype != "float32":
        raise AnchorError(f"optimizer.param_dtype={opt_cfg.param_dtype}: the anchor keeps float32 parameters")
    jax_params, fpt = jax_model(cfg)
    formula = torch_param_count(tc)
    MambaConfig, MambaLMHeadModel, info = load_mamba_ssm(a.src)

    import torch
    import torch.nn.functional as F
    import triton

    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = MambaLMHeadModel(MambaConfig(**tc), device=dev, dtype=torch.float32)
    nparams = sum(p.numel() for p in model.parameters())
    params = [p for p in model.parameters() if p.requires_grad]
    decays = [p.ndim >= 2 and not getattr(p, "_no_weight_decay", False) for p in params]
    opt = torch.optim.AdamW([{"params": [p for p, w in zip(params, decays) if w], "weight_decay": opt_cfg.weight_decay},
                             {"params": [p for p, w in zip(params, decays) if not w], "weight_decay": 0.0}],
                            lr=opt_cfg.learning_rate, betas=(opt_cfg.b1, opt_cfg.b2), eps=opt_cfg.eps, fused=True)
    amp = cfg.model.dtype == "bfloat16"
    gen = torch.Generator(device=dev).manual_seed(0)
    batches = [torch.randint(0, tc["vocab_size"], (g, s + 1), device=dev, generator=gen) for _ in range(4)]

    def step(toks):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            logits = model(toks[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), toks[:, 1:].reshape(-1))
        loss.backward()
        if opt_cfg.clip_norm:
            torch.nn.utils.clip_grad_norm_(params, opt_cfg.clip_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(max(1, a.warmup)):  # the first step also autotunes the Triton kernels
        loss = step(batches[i % 4])
        torch.cuda.synchronize()
        if i == 0:
            first_s = time.perf_counter() - t0
    times = []
    for i in range(a.steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        loss = step(batches[i % 4])
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    mem = torch.cuda.max_memory_allocated()
    tokens = g * s
    name = f"{a.recipe}:{a.preset}"
    print(f"\ndevice: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  "
          f"mamba_ssm {info['version']} ({(info['commit'] or 'commit unknown')[:12]})  conv1d: {info['conv1d']}")
    print(f"model: {name} in PyTorch + mamba_ssm  params {nparams/1e6:.3f}M (ours, JAX: {jax_params/1e6:.3f}M"
          f"{', the same' if nparams == jax_params else f', differs by {nparams - jax_params:+,}'})  "
          f"batch {g} x seq {s}")
    if nparams != formula:
        print(f"note: torch_param_count says {formula:,}, the built model has {nparams:,}")
    print("| metric | value |\n|---|---|")
    print(f"| first step (Triton autotuning included) | {first_s:.1f} s |")
    print(f"| step time (median of {a.steps}) | {step_s*1e3:.1f} ms |")
    print(f"| tokens/s | {tokens/step_s:,.0f} |")
    print(f"| model TFLOP/s (our FLOPs/token, {fpt/1e9:.2f} G) | {fpt*tokens/step_s/1e12:.1f} |")
    print(f"| peak memory (torch.cuda.max_memory_allocated) | {mem/2**30:.1f} GiB |")
    print(f"| loss after the last step | {float(loss):.3f} |")
    if a.json:
        res = {"recipe": a.recipe, "preset": a.preset, "overrides": a.set, "framework": "pytorch+mamba_ssm",
               "device_kind": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
               "mamba_ssm": info["version"], "mamba_ssm_commit": info["commit"], "conv1d": info["conv1d"],
               "torch_config": tc, "params": nparams, "params_formula": formula, "params_jax": jax_params,
               "global_batch": g, "seq_len": s, "flops_per_token": fpt, "steps": a.steps, "first_step_s": first_s,
               "step_s": step_s, "step_times_s": times, "tokens_per_s": tokens / step_s,
               "model_tflops_per_device": fpt * tokens / step_s / 1e12, "peak_memory_bytes": mem,
               "final_loss": float(loss)}
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
