"""The Hugging Face side of the interop tests; runs in the interop venv (Python 3.11, torch CPU, transformers),
never in the project's venv, and imports nothing of the project but `tools/hf_anchor.py` (torch only).

`python tests/hf_side.py JOBS.json RESULT.json`: JOBS.json is a list of jobs, run in order in one process:
  {"op": "build", "config": {model_type, ...}, "dir": OUT, "dtype": "float32" | "bfloat16", "seed": 0,
   "max_shard_size": null | "200KB", "tokens": [[int]], "logits": PATH.npy, "patch": null | "mamba2_group_norm"}
      a random-initialised `AutoModelForCausalLM.from_config` (transformers' own init, then every parameter
      that init left constant - norms, biases, D - perturbed so a mis-mapped one cannot hide), saved with
      save_pretrained in `dtype`, reloaded in float32 and run on `tokens`: float32 logits -> PATH.npy.
  {"op": "logits", "dir": DIR, "tokens": ..., "logits": PATH.npy, "patch": ...}
      from_pretrained(DIR) in float32 on `tokens` -> PATH.npy; the result records the loading info
      (missing / unexpected / mismatched keys) and the class that loaded.
  {"op": "greedy", "dir": DIR, "tokens": [[int]], "new_tokens": n}
      from_pretrained(DIR) in float32: tools.hf_anchor's decoding (the method it picks and its tokens, and
      time_hf on the CPU) beside greedy tokens by re-running the whole sequence per new token.
A test module that needs another kind of HF-side check adds an op to `run` here.
Patch "mamba2_group_norm": transformers' CPU Mamba2 path normalises the gated output over all of d_inner,
while its CUDA kernels (and mamba_ssm, which trained the checkpoints) normalise per group of
d_inner / n_groups; the patch makes the CPU path normalise per group like the kernels.
Patch "granite_group_norm": the same for GraniteMoeHybrid's Mamba-2 layers (mamba_n_groups).
RESULT.json: {"versions": {...}, "jobs": [per-job info]}.
"""
from __future__ import annotations

import json
import sys


def _patch_mamba2_group_norm(n_groups: int, granite: bool = False):
    """-> a function that undoes the patch (granite: GraniteMoeHybrid's gated norm, the same code)."""
    import torch
    if granite:
        from transformers.models.granitemoehybrid import modeling_granitemoehybrid as mod

        cls = mod.GraniteMoeHybridRMSNormGated
    else:
        from transformers.models.mamba2 import modeling_mamba2 as mod

        cls = mod.MambaRMSNormGated
    original = cls.forward

    def forward(self, hidden_states, gate=None):
        dtype = hidden_states.dtype
        h = hidden_states.to(torch.float32)
        if gate is not None:
            h = h * torch.nn.functional.silu(gate.to(torch.float32))
        g = h.view(*h.shape[:-1], n_groups, h.shape[-1] // n_groups)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * g.view(h.shape).to(dtype)

    cls.forward = forward

    def undo():
        cls.forward = original

    return undo


def _apply_patch(job: dict, config):
    """Applies job["patch"] (None: nothing); -> a function that undoes it."""
    if job.get("patch") == "mamba2_group_norm":
        return _patch_mamba2_group_norm(config.n_groups)
    if job.get("patch") == "granite_group_norm":
        return _patch_mamba2_group_norm(config.mamba_n_groups, granite=True)
    if job.get("patch") is not None:
        raise ValueError(f"unknown patch {job['patch']!r}")
    return lambda: None


def _perturb(model, seed: int) -> None:
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.numel() and bool(torch.all(p == p.reshape(-1)[0])):
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _logits(model, tokens) -> "object":
    import numpy as np
    import torch

    with torch.no_grad():
        out = model(torch.tensor(tokens, dtype=torch.long), use_cache=False)
    return np.asarray(out.logits.float().numpy(), np.float32)


def run(job: dict) -> dict:
    import numpy as np
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    op = job["op"]
    if op == "build":
        kw = dict(job["config"])
        config = AutoConfig.for_model(kw.pop("model_type"), **kw)
        torch.manual_seed(job.get("seed", 0))
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        _perturb(model, job.get("seed", 0))
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[job.get("dtype", "float32")]
        model = model.to(dtype)
        save_kw = {"max_shard_size": job["max_shard_size"]} if job.get("max_shard_size") else {}
        model.save_pretrained(job["dir"], safe_serialization=True, **save_kw)
        info = {"class": type(model).__name__}
        del model
        job = {**job, "op": "logits"}
        info.update(run(job))
        return info
    if op == "logits":
        config = AutoConfig.from_pretrained(job["dir"])
        undo = _apply_patch(job, config)
        try:
            model, loading = AutoModelForCausalLM.from_pretrained(job["dir"], dtype=torch.float32,
                                                                  output_loading_info=True)
            model.eval()
            np.save(job["logits"], _logits(model, job["tokens"]))
        finally:
            undo()
        return {"class": type(model).__name__,
                "loading": {k: sorted(map(str, v)) for k, v in loading.items() if k != "error_msgs"},
                "error_msgs": [str(e) for e in loading.get("error_msgs", [])]}
    if op == "greedy":
        import os

        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from tools import hf_anchor

        model = AutoModelForCausalLM.from_pretrained(job["dir"], dtype=torch.float32).eval()
        ids, n = torch.tensor(job["tokens"], dtype=torch.long), job["new_tokens"]
        method, gen = hf_anchor.decoder(model, torch, ids)
        seq = ids
        with torch.no_grad():
            for _ in range(n):
                logits = model(seq, use_cache=False).logits
                seq = torch.cat([seq, logits[:, -1:].argmax(-1)], 1)
        timing = hf_anchor.time_hf(model, torch, np.asarray(job["tokens"]), n, reps=1, device="cpu")
        return {"method": method, "tokens": gen(n).tolist(), "recompute": seq.tolist(), "timing": timing}
    raise ValueError(f"unknown op {op!r}")


def main(argv: list[str]) -> int:
    import torch
    import transformers

    jobs_path, result_path = argv
    with open(jobs_path) as f:
        jobs = json.load(f)
    torch.set_num_threads(2)
    results = [run(job) for job in jobs]
    with open(result_path, "w") as f:
        versions = {"torch": torch.__version__, "transformers": transformers.__version__}
        json.dump({"versions": versions, "jobs": results}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
