"""`python -m tools.bench_train [--preset gpu_1b] [--steps 20] [--set k=v ...]`: train-step time, tokens/s and
MFU of a recipe preset on the present devices (synthetic tokens, so the input pipeline is not measured), plus
the async-checkpoint stall: the time a save blocks the loop, as a share of the step time between saves.

Anchor measured in the same run: a bf16 matmul of 8192^3 through jax.jit (the achievable matmul ceiling).

`--json PATH` also writes every number as one JSON object (read by tools.bench_scaling); `--profile-steps N`
traces N more steps with jax.profiler and reports the share of step time spent in each collective kind
(all-to-all, all-gather, reduce-scatter, all-reduce; parsed from the Perfetto trace, see `collective_seconds`).
"""
from __future__ import annotations

import argparse
import importlib
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

from tools.benchutil import capture_trace


def _matmul_anchor(n: int = 8192, reps: int = 10) -> float:
    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.bfloat16)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


COLLECTIVES = ("all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute")


def _union_seconds(spans: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total * 1e-6  # trace times are microseconds


def collective_seconds(events: list[dict], device_pids: set) -> tuple[dict[str, float], int]:
    """Perfetto trace events (`benchutil.capture_trace` / `load_perfetto`) -> ({collective kind: seconds summed
    over devices}, number of device tracks seen, 0 if none). An event counts for a kind if its name or an argument (GPU kernels
    carry the HLO op name, e.g. 'all-to-all-start.3', in their args) names it; overlapping events of one kind
    on one device are counted once. Device tracks (pid named '/device:...') are used where present, else the
    host's (the CPU backend runs collectives as host thunks)."""
    keys = {k: k.replace("-", "") for k in COLLECTIVES}
    spans: dict[tuple[str, int], list] = {}
    for e in events:
        if e.get("ph") != "X" or "dur" not in e or str(e.get("name", "")).startswith("end:"):
            continue
        if device_pids and e.get("pid") not in device_pids:
            continue
        text = (str(e.get("name", "")) + " " + " ".join(str(v) for v in (e.get("args") or {}).values()))
        text = text.lower().replace("-", "").replace("_", "")
        for kind, key in keys.items():
            if key in text:
                spans.setdefault((kind, e.get("pid")), []).append((float(e["ts"]), float(e["ts"]) + float(e["dur"])))
                break
    out = {k: 0.0 for k in COLLECTIVES}
    for (kind, _), sp in spans.items():
        out[kind] += _union_seconds(sp)
    return out, len(device_pids)


def _write_json(path: str, res: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(res, f, indent=1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_train")
    p.add_argument("--recipe", default="dense_lm")
    p.add_argument("--preset", default="gpu_1b")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--save-every", type=int, default=100, help="checkpoint interval the stall is quoted for")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--no-anchor", action="store_true")
    p.add_argument("--no-save", action="store_true", help="skip the async-checkpoint stall measurement")
    p.add_argument("--profile-steps", type=int, default=0, help="trace N more steps; report collective shares")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    a = p.parse_args(argv)

    from axlearn_like import config as config_lib, sharding as sharding_lib, trainer
    from axlearn_like.evaluation import global_batch
    from axlearn_like.checkpoint import CheckpointConfig, Checkpointer

    mod = importlib.import_module(f"recipes.{a.recipe}")
    cfg = config_lib.apply_overrides(mod.PRESETS[a.preset](), a.set)
    mesh = sharding_lib.make_mesh(cfg.mesh)
    setup = trainer.build_state_setup(cfg, mesh=mesh)
    g, s = cfg.data.global_batch_size, cfg.data.seq_len
    vocab = getattr(cfg.model, "vocab_size", 256)
    rng = np.random.default_rng(0)
    with jax.set_mesh(mesh), nn.logical_axis_rules(setup.rules):
        step_fn, batch_sh = trainer.make_train_step(setup, cfg)
        state = jax.jit(setup.init_fn, out_shardings=setup.state_sharding)(jax.random.PRNGKey(0))
        batches = []
        for _ in range(4):  # rotate a few random batches (never time on zeros)
            toks = rng.integers(0, vocab, (g, s + 1), dtype=np.int32)
            local = {"inputs": toks[:, :-1], "targets": toks[:, 1:], "loss_mask": np.ones((g, s), np.float32),
                     "segment_ids": np.ones((g, s), np.int32), "positions": np.tile(np.arange(s, dtype=np.int32), (g, 1))}
            batches.append(global_batch(local, batch_sh))
        t0 = time.perf_counter()
        state, m = step_fn(state, batches[0])
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t0
        for i in range(a.warmup):
            state, m = step_fn(state, batches[i % 4])
        jax.block_until_ready(m)
        times = []
        for i in range(a.steps):
            t = time.perf_counter()
            state, m = step_fn(state, batches[i % 4])
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t)
        step_s = statistics.median(times)
        # Async checkpoint stall: time the save call blocks, then the next step's extra time. The first save
        # also creates the directory tree and handlers; the second is what a long run pays every interval.
        blocks, slowdowns = [0.0], [0.0]
        if not a.no_save:
            blocks, slowdowns = [], []
            with tempfile.TemporaryDirectory() as d:
                ck = Checkpointer(d, CheckpointConfig(async_save=True, max_to_keep=2))
                for i in range(2):
                    t = time.perf_counter()
                    ck.save(i + 1, state, None, config_lib.to_dict(cfg), {})
                    blocks.append(time.perf_counter() - t)
                    t = time.perf_counter()
                    state, m = step_fn(state, batches[i % 4])
                    jax.block_until_ready(m)
                    slowdowns.append(max(0.0, time.perf_counter() - t - step_s))
                    ck.wait()
                ck.close()
        host_metrics = {k: np.asarray(jax.device_get(v)) for k, v in m.items()}
    block_s, next_step_s = blocks[-1], step_s + slowdowns[-1]
    stall_s = block_s + max(0.0, next_step_s - step_s)
    tokens = g * s
    fpt = setup.task.flops_per_token(s)
    peak = trainer.peak_flops_per_device()
    ndev = jax.device_count()
    nparams = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    mem = None
    try:
        stats = jax.devices()[0].memory_stats()
        mem = stats.get("peak_bytes_in_use") if stats else None
    except Exception:
        pass
    anchor = None if a.no_anchor or jax.default_backend() == "cpu" else _matmul_anchor()
    print(f"\ndevice: {jax.devices()[0].device_kind} x{ndev}  jax {jax.__version__}")
    print(f"model: {a.recipe}:{a.preset}  params {nparams/1e9:.3f}B  batch {g} x seq {s}  FLOPs/token {fpt/1e9:.2f} G")
    print("| metric | value |\n|---|---|")
    print(f"| compile (first step) | {compile_s:.1f} s |")
    print(f"| step time (median of {a.steps}) | {step_s*1e3:.1f} ms |")
    print(f"| tokens/s | {tokens/step_s:,.0f} |")
    print(f"| model TFLOP/s per device | {fpt*tokens/step_s/ndev/1e12:.1f} |")
    if peak:
        print(f"| MFU (vs {peak/1e12:.0f} TFLOP/s datasheet bf16) | {100*fpt*tokens/step_s/(peak*ndev):.1f}% |")
    if anchor:
        print(f"| anchor: jax bf16 matmul 8192^3 | {anchor/1e12:.0f} TFLOP/s |")
        print(f"| share of the measured matmul ceiling | {100*fpt*tokens/step_s/ndev/anchor:.1f}% |")
    if not a.no_save:
        print(f"| async save: blocking time (first save / warm save) | {blocks[0]*1e3:.0f} / {block_s*1e3:.0f} ms |")
        print(f"| async save: next-step slowdown | {max(0.0, next_step_s-step_s)*1e3:.0f} ms |")
        print(f"| checkpoint stall at a save every {a.save_every} steps (warm save) | {100*stall_s/(a.save_every*step_s):.2f}% of step time |")
    if mem:
        print(f"| peak device memory | {mem/2**30:.1f} GiB |")
    res = None
    if a.json:
        maxvio = [float(v) for k, v in host_metrics.items() if k.endswith("maxvio_batch") and v.ndim == 0]
        res = {
            "recipe": a.recipe, "preset": a.preset, "overrides": a.set, "device_kind": jax.devices()[0].device_kind,
            "backend": jax.default_backend(), "num_devices": ndev, "mesh": {k: int(v) for k, v in mesh.shape.items()},
            "jax": jax.__version__, "params": nparams, "global_batch": g, "seq_len": s, "flops_per_token": fpt,
            "steps": a.steps, "compile_s": compile_s, "step_s": step_s, "step_times_s": times,
            "tokens_per_s": tokens / step_s, "tokens_per_s_per_device": tokens / step_s / ndev,
            "model_tflops_per_device": fpt * tokens / step_s / ndev / 1e12,
            "mfu": (fpt * tokens / step_s / (peak * ndev)) if peak else None,
            "anchor_matmul_tflops": anchor / 1e12 if anchor else None,
            "peak_memory_bytes": mem, "save_block_s": None if a.no_save else block_s,
            # loss of the last step run (the 4 rotating random batches: how fast they are fitted, not quality)
            "final_loss": float(host_metrics["objective"]),
            "final_step": int(jax.device_get(state.step)),
            "maxvio_batch_mean": float(np.mean(maxvio)) if maxvio else None,
            "maxvio_batch_max": float(np.max(maxvio)) if maxvio else None,
            "collective_share": None, "profile_steps": a.profile_steps,
            "profile_error": "profiling did not finish" if a.profile_steps > 0 else "not profiled",
        }
        _write_json(a.json, res)  # written before profiling, so a profiler crash keeps the timings
    if a.profile_steps > 0:
        # Traced after the timings, so the trace cannot slow the timed steps.
        shares, profile_error = {}, None
        try:
            def run():
                nonlocal state
                for i in range(a.profile_steps):
                    state, m = step_fn(state, batches[i % 4])
                    jax.block_until_ready(m)

            with jax.set_mesh(mesh), nn.logical_axis_rules(setup.rules):
                secs, ndev_seen = collective_seconds(*capture_trace(run))
            # per-device seconds in each kind over the traced steps, as a share of their median step time
            per = ndev_seen or jax.device_count()
            shares = {k: v / per / (a.profile_steps * step_s) for k, v in secs.items()}
        except Exception as e:  # a profiler failure must not lose the timing results
            profile_error = f"{type(e).__name__}: {e}"
        for k, v in shares.items():
            print(f"| {k} share of step time (profiled, {a.profile_steps} steps) | {100*v:.1f}% |")
        if profile_error:
            print(f"| collective shares | n/a ({profile_error}) |")
        if res is not None:
            res.update(collective_share=shares or None, profile_error=profile_error)
            _write_json(a.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
