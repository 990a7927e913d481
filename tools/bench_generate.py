"""Cached generation speed: `python -m tools.bench_generate [--recipe dense_lm] [--preset gpu_1b] [--batch 1,32]
[--prompt-len 512] [--new-tokens 256] [--unroll K] [--kernel-profile N] [--set k=v ...] [--no-anchor] [--vs-recompute
[--candidates G]] [--out FILE]`, or `--all [--only R:P,...] [--preset-timeout S]`: every GPU preset with cached
decoding (`ALL`), each in its own process, one table.

For each batch size: prefill tokens/s (one jit-compiled `prefill` of batch x prompt-len random tokens into a
cache sized prompt-len + new-tokens) and decode tokens/s (one jit-compiled loop of new-tokens greedy
`decode_step`s from that cache: batch x new-tokens / loop time), on the recipe preset's model with random
weights cast to its compute dtype (timing does not depend on the values; the prompt never contains padding).

Anchor, same run, same weights: Hugging Face transformers `generate` with its static KV cache
(cache_implementation="static"; greedy, new-tokens forced; where transformers' generate fails for the model,
HF's forward on its own cache one token per call, named in the row: tools/hf_anchor.py) on the model exported
to a temporary folder by the `tools.export_hf` family code (tools/hf; in bf16 when the preset computes in
bf16): prefill = a generate of 1 new token, decode = (time of new-tokens - time of 1) over the new-tokens - 1
later tokens. Skipped with a printed note when torch / transformers / a CUDA device are missing or no HF family
writes the model.
Timing: tools.benchutil.timeit (warm-up, back-to-back calls, median) for ours; medians of `--reps` synchronised
generate calls for HF.

`--vs-recompute` also times `Task.generate` end to end (greedy) with cached decoding and with the whole buffer
re-run per new token (cached=False), for any model with cached decoding (the EBT included: its observed stream
is encoded once instead of once per token and candidate; `--candidates G` for its self-verification).
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import statistics
import sys
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tools import benchutil
from tools.hf_anchor import time_hf


def _model(recipe: str, preset: str, overrides: list[str]):
    from axlearn_like import config as config_lib

    mod = importlib.import_module(f"recipes.{recipe}")
    if preset not in mod.PRESETS:
        raise SystemExit(f"error: --preset {preset!r} is not one of {sorted(mod.PRESETS)} (recipes.{recipe})")
    cfg = config_lib.apply_overrides(mod.PRESETS[preset](), overrides)
    task = cfg.model.build()
    if not task.supports_cached_decoding:
        raise SystemExit(f"error: {recipe}/{preset}: {type(task).__name__} has no cached decoding")
    variables = nn.meta.unbox(jax.jit(lambda r: task.init(r, task.example_batch(1, 8)))(jax.random.key(0)))
    return cfg, task, {k: variables[k] for k in ("params", "stats") if k in variables}


def _cast(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def time_ours(task, params, prompt: np.ndarray, new_tokens: int, reps: int, unroll: int = 1,
              kernel_profile: int = 0) -> dict:
    """Prefill and decode timings of the cached path (module doc); `unroll` decode steps per loop iteration;
    `kernel_profile` N > 0 also prints the device time per kernel of N decode loops, per decode step."""
    b, p = prompt.shape
    max_len = p + new_tokens
    prefill = jax.jit(lambda v, t: task.prefill(v, t, max_len=max_len))

    @jax.jit
    def decode(v, cache, tok):
        def step(carry, _):
            tok, cache = carry
            logits, cache = task.decode_step(v, tok[:, None], cache)
            return (jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32), cache), None

        (tok, _), _ = jax.lax.scan(step, (tok, cache), None, length=new_tokens, unroll=unroll)
        return tok

    tokens = jnp.asarray(prompt)
    t0 = time.perf_counter()
    logits, cache = jax.block_until_ready(prefill(params, tokens))
    first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    jax.block_until_ready(decode(params, cache, first))
    compile_s = time.perf_counter() - t0
    prefill_ms = benchutil.timeit(prefill, (params, tokens), reps=reps, warmup=1, rounds=min(reps, 5))[0]
    decode_ms = benchutil.timeit(decode, (params, cache, first), reps=max(1, reps // 2), warmup=1,
                                 rounds=min(max(1, reps // 2), 3))[0]
    out = {}
    if kernel_profile > 0:
        prof = benchutil.device_ops(decode, (params, cache, first), calls=kernel_profile, top=25)
        prof = {"per_call_ms": prof["per_call_ms"] / new_tokens, "kinds": {k: v / new_tokens for k, v in
                prof["kinds"].items()}, "ops": [(n, ms / new_tokens, c / new_tokens) for n, ms, c in prof["ops"]]}
        benchutil.print_device_ops(f"decode step, batch {b} (per step, averaged over {new_tokens})", prof,
                                   decode.lower(params, cache, first).compile().as_text())
        out["device_busy_ms_per_step"] = prof["per_call_ms"]
    return {**out, "prefill_ms": prefill_ms, "prefill_tok_s": b * p / (prefill_ms / 1e3),
            "decode_ms_per_step": decode_ms / new_tokens, "decode_tok_s": b * new_tokens / (decode_ms / 1e3),
            "compile_s": compile_s}


def time_generate(task, params, prompt: np.ndarray, new_tokens: int, reps: int, **kw) -> dict:
    """`Task.generate` end to end (greedy), cached decoding vs re-running the whole buffer per new token
    (cached=False), same prompt and kw (e.g. the EBT's num_candidates): median seconds of `reps` calls after one
    warm-up (the compile) each."""
    b = prompt.shape[0]
    out = {}
    for name, cached in (("cached", True), ("recompute", False)):
        def call(cached=cached):
            return jax.block_until_ready(task.generate(params, prompt, new_tokens, jax.random.key(1), temperature=0.0,
                                                       cached=cached, **kw))
        call()
        ts = []
        for _ in range(max(1, reps)):
            t0 = time.perf_counter()
            call()
            ts.append(time.perf_counter() - t0)
        s = statistics.median(ts)
        out[name] = {"s": s, "tok_s": b * new_tokens / s}
    out["speedup"] = out["recompute"]["s"] / out["cached"]["s"]
    return out


def export_hf_folder(model_cfg, params, stats, out_dir: str, dtype: str) -> str:
    """The model as a Hugging Face folder via the tools.export_hf family code (what `python -m tools.export_hf`
    writes from a run dir's checkpoint), from in-memory variables. -> model_type."""
    from models.decoder import unstack_layer_params
    from tools.hf.common import EXPORT_DTYPES, choose_family, write_folder

    params = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), params)
    stats = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), stats or {})
    if getattr(model_cfg, "scan_layers", False):
        params = jax.tree.map(np.asarray, unstack_layer_params(params, model_cfg))
        stats = jax.tree.map(np.asarray, unstack_layer_params(stats, model_cfg))
    family = choose_family(model_cfg, None, None)
    hf_cfg, tensors = family.to_hf(model_cfg, params, stats, None, None)
    out_dt = EXPORT_DTYPES[dtype]
    tensors = {k: np.asarray(v).astype(out_dt) if np.asarray(v).dtype.kind == "f" else np.asarray(v)
               for k, v in tensors.items()}
    write_folder(out_dir, tensors, 5 << 30)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump({**hf_cfg, "dtype": dtype}, f, indent=2)
    return hf_cfg["model_type"]


def hf_anchor_setup(model_cfg, params, stats, dtype: str):
    """-> (loaded HF model on the GPU, torch module, info dict), or (None, None, {"note": why not})."""
    try:
        import torch
        import transformers
    except ImportError as e:
        return None, None, {"note": f"HF anchor skipped: {e.name} is not installed"}
    if not torch.cuda.is_available():
        return None, None, {"note": "HF anchor skipped: torch sees no CUDA device"}
    if os.environ.get("TRITON_CACHE_DIR") == "":
        # jax_triton blanks it at import (it compiles in memory); the static cache's torch.compile needs a directory
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench_generate_triton_")
    tmp = tempfile.mkdtemp(prefix="bench_generate_hf_")
    try:
        model_type = export_hf_folder(model_cfg, params, stats, tmp, dtype)
    except Exception as e:  # noqa: BLE001 - any unsupported model: note and go on
        return None, None, {"note": f"HF anchor skipped: no export ({type(e).__name__}: {e})"}
    tdt = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[dtype]
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=tdt).to("cuda").eval()
    return model, torch, {"model_type": model_type, "transformers": transformers.__version__,
                          "torch": torch.__version__, "attn_implementation": model.config._attn_implementation}


# The GPU presets `--all` runs: (recipe, preset), each with cached decoding; HF anchors where tools.export_hf
# writes the model (dense_lm, moe, mamba2); the others print the anchor's skip note.
ALL = (("dense_lm", "gpu_1b"), ("moe", "deepseek_v3_gpu"), ("mamba2", "gpu_340m"), ("simplicial", "gpu_1b"),
       ("ebt", "gpu"))


def run_all(a) -> int:
    """Each preset of ALL (or --only) in its own process (`--out`), then one table; a preset that fails keeps its
    row with the error's last line. The parent never touches a device (each child preallocates its own)."""
    entries = benchutil.select_entries(ALL, a.only)
    results = []
    with tempfile.TemporaryDirectory() as d:
        for recipe, preset in entries:
            path = os.path.join(d, f"{recipe}_{preset}.json")
            cmd = [sys.executable, "-m", "tools.bench_generate", "--recipe", recipe, "--preset", preset, "--batch",
                   a.batch, "--prompt-len", str(a.prompt_len), "--new-tokens", str(a.new_tokens), "--reps",
                   str(a.reps), "--out", path] + (["--no-anchor"] if a.no_anchor else [])
            for kv in a.set:
                cmd += ["--set", kv]
            results.append((f"{recipe}:{preset}", benchutil.run_child(f"{recipe}:{preset}", cmd, path,
                                                                       a.preset_timeout)))
    print(f"\nprompt {a.prompt_len}, {a.new_tokens} new tokens, greedy")
    print("| preset | batch | prefill tok/s | decode tok/s | decode ms/step | HF decode tok/s | decode vs HF |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results:
        if "error" in r:
            print(f"| {name} | failed: {r['error']} | | | | | |")
            continue
        for key in sorted((k for k in r if k.startswith("batch")), key=lambda k: int(k[5:])):
            ours, hf = r[key]["ours"], r[key].get("hf")
            loop = " (HF forward loop)" if hf and hf.get("method", "").startswith("forward") else ""
            anchor = (f"{hf['decode_tok_s']:.0f}{loop} | {r[key]['decode_speedup_vs_hf']:.2f}x" if hf
                      else "- | " + r[key].get("anchor_error", r.get("anchor", {}).get("note", "-")))
            print(f"| {name} | {key[5:]} | {ours['prefill_tok_s']:.0f} | {ours['decode_tok_s']:.0f} "
                  f"| {ours['decode_ms_per_step']:.2f} | {anchor} |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(results), f, indent=2)
    return 0 if all("error" not in r for _, r in results) else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="dense_lm")
    p.add_argument("--preset", default="gpu_1b")
    p.add_argument("--batch", default="1,32", help="comma list of batch sizes")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--unroll", type=int, default=1,
                   help="decode steps per iteration of the jitted loop (fewer loop round trips per token)")
    p.add_argument("--set", action="append", default=[], help="config overrides on the preset")
    p.add_argument("--kernel-profile", type=int, default=0, metavar="N",
                   help="trace N decode loops; print device time per kernel per decode step")
    p.add_argument("--no-anchor", action="store_true", help="skip the Hugging Face anchor")
    p.add_argument("--vs-recompute", action="store_true",
                   help="also time Task.generate cached vs recompute (any model with cached decoding, e.g. the EBT)")
    p.add_argument("--candidates", type=int, default=1,
                   help="with --vs-recompute: num_candidates, for a generate that takes it (EBT self-verification)")
    p.add_argument("--out", default=None, help="also write the results as JSON")
    p.add_argument("--all", action="store_true", help="every GPU preset with cached decoding (ALL), one process each")
    p.add_argument("--only", default=None, metavar="R:P,...", help="with --all: only these recipe:preset entries")
    p.add_argument("--preset-timeout", type=float, default=None, metavar="S",
                   help="with --all: give up on a preset after S seconds (its row says so)")
    a = p.parse_args(argv)
    if a.prompt_len < 1 or a.new_tokens < 1:
        raise SystemExit("error: --prompt-len and --new-tokens must be >= 1")
    if a.all:
        return run_all(a)
    batches = [int(x) for x in a.batch.split(",") if x]
    cfg, task, variables = _model(a.recipe, a.preset, list(a.set))
    gen_kw = {}
    if a.candidates != 1:
        if "num_candidates" not in inspect.signature(task.generate).parameters:
            raise SystemExit(f"error: --candidates: {type(task).__name__}.generate takes no num_candidates; drop it")
        gen_kw["num_candidates"] = a.candidates
    dtype = cfg.model.dtype
    params = {**variables, "params": _cast(variables["params"], task.cfg.compute_dtype)}  # inference weights
    rows = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "recipe": a.recipe, "preset": a.preset,
            "dtype": dtype, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "unroll": a.unroll,
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "param_count":
            int(sum(x.size for x in jax.tree.leaves(variables["params"])))}
    hf_model = torch = None
    if a.no_anchor:
        rows["anchor"] = {"note": "HF anchor skipped (--no-anchor)"}
    else:
        hf_model, torch, rows["anchor"] = hf_anchor_setup(cfg.model, variables["params"], variables.get("stats"),
                                                          "bfloat16" if dtype == "bfloat16" else "float32")
        if hf_model is None:
            print(rows["anchor"]["note"], flush=True)
    rng = np.random.default_rng(0)
    table = []
    for b in batches:
        prompt = rng.integers(1, cfg.model.vocab_size, (b, a.prompt_len), dtype=np.int32)
        ours = time_ours(task, params, prompt, a.new_tokens, a.reps, a.unroll, a.kernel_profile)
        rows[f"batch{b}"] = {"ours": ours}
        line = [b, ours["prefill_tok_s"], ours["decode_tok_s"], ours["decode_ms_per_step"]]
        if hf_model is not None:
            try:
                hf = time_hf(hf_model, torch, prompt, a.new_tokens, max(1, a.reps // 2))
            except Exception as e:  # noqa: BLE001 - the anchor failing must not lose our row
                rows[f"batch{b}"]["anchor_error"] = f"HF anchor failed: {type(e).__name__}: {str(e)[:200]}"
                print(rows[f"batch{b}"]["anchor_error"], flush=True)
                line += [None] * 3
            else:
                rows[f"batch{b}"]["hf"] = hf
                rows[f"batch{b}"]["decode_speedup_vs_hf"] = ours["decode_tok_s"] / hf["decode_tok_s"]
                line += [hf["prefill_tok_s"], hf["decode_tok_s"], ours["decode_tok_s"] / hf["decode_tok_s"]]
        if a.vs_recompute:
            rows[f"batch{b}"]["generate"] = time_generate(task, params, prompt, a.new_tokens, a.reps, **gen_kw)
        table.append(line)
        print(f"batch {b}: {json.dumps(rows[f'batch{b}'])}", flush=True)
    benchutil.report(rows, a.out)
    hf_cols = " HF prefill tok/s | HF decode tok/s | decode vs HF |" if hf_model is not None else ""
    print(f"\n{a.recipe}/{a.preset} on {rows['device']}: prompt {a.prompt_len}, {a.new_tokens} new tokens")
    print("| batch | prefill tok/s | decode tok/s | decode ms/step |" + hf_cols)
    print("|---|---|---|---|" + ("---|---|---|" if hf_cols else ""))
    for line in table:
        cells = [str(line[0]), f"{line[1]:.0f}", f"{line[2]:.0f}", f"{line[3]:.2f}"]
        if len(line) > 4:
            cells += ([f"{line[4]:.0f}", f"{line[5]:.0f}", f"{line[6]:.2f}x"] if line[4] is not None
                      else ["-", "-", "anchor failed"])
        print("| " + " | ".join(cells) + " |")
    if a.vs_recompute:
        print(f"\nTask.generate, {a.new_tokens} new tokens (num_candidates {a.candidates}): cached vs recompute")
        print("| batch | cached tok/s | recompute tok/s | cached speedup |\n|---|---|---|---|")
        for b in batches:
            g = rows[f"batch{b}"]["generate"]
            print(f"| {b} | {g['cached']['tok_s']:.1f} | {g['recompute']['tok_s']:.1f} | {g['speedup']:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
