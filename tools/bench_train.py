"""`python -m tools.bench_train [--recipe R] [--preset gpu_1b] [--steps 20] [--set k=v ...]`: train-step time,
tokens/s and MFU of a recipe preset on the present devices (synthetic tokens, so the input pipeline is not
measured), peak device memory, plus the async-checkpoint stall: the time a save blocks the loop, as a share of
the step time between saves.

Anchors measured in the same run: a bf16 matmul of 8192^3 through jax.jit (the achievable matmul ceiling), and
the preset's hot op alone (`hot_op`: the kernel of its most expensive non-GEMM layer kind at the preset's
shapes, forward + backward), so each preset's model TFLOP/s reads against its own kernel-level ceiling.

`--all` runs every recipe's GPU presets (`ALL`), each in its own process (an OOM stays that preset's row), and
prints one table. With `--mamba-anchor SRC` (default `.anchors/mamba` when it exists: scripts/fetch_anchors.sh),
`mamba2:gpu_340m` is followed by the same model in PyTorch + mamba_ssm's Triton kernels (tools.bench_mamba_torch,
its own process, same --steps): one more row and the tokens/s ratio (issue 18: >= 1.3x).

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

from tools import benchutil
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


def _timed_fwd_bwd(loss, args, reps: int = 10) -> float:
    g = jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))
    return benchutil.timeit(g, args, reps, warmup=2)[0] / 1e3  # seconds


def hot_op(model, batch: int, seq: int):
    """(name, forward+backward FLOPs, seconds) of the preset's hot op alone at its shapes, bf16 random inputs,
    or None when the stack has none (or this is the CPU). The hot op is the kernel of the layer kind whose
    extra (non-GEMM) FLOPs or expert GEMMs dominate: 2-simplicial attention, the SSD scan, the MoE grouped
    matmul, or (for plain attention stacks) cuDNN flash attention. FLOP conventions as the kernels' benches."""
    from models.attention import AttentionConfig
    from models.moe import MoEConfig
    from models.simplicial import SimplicialConfig
    from models.ssm import Mamba2Config

    if jax.default_backend() == "cpu":
        return None
    kinds = [k for i in range(model.num_layers) for k in model.layer_kinds(i)]
    ks = jax.random.split(jax.random.PRNGKey(1), 8)
    bf = jnp.bfloat16
    rnd = lambda k, shape: jax.random.normal(k, shape, bf)  # noqa: E731
    for cls in (SimplicialConfig, MoEConfig, Mamba2Config, AttentionConfig):
        kind = next((k for k in kinds if isinstance(k, cls)), None)
        if kind is None:
            continue
        if cls is SimplicialConfig:
            from kernels.simplicial import two_simplicial_attention
            from tools.bench_simplicial import simplicial_flops

            h, kv, d = kind.num_heads, kind.num_kv_heads, kind.head_dim
            args = (rnd(ks[0], (batch, seq, h, d)), *[rnd(k, (batch, seq, kv, d)) for k in ks[1:5]])
            f = lambda *a, kind=kind: two_simplicial_attention(  # noqa: E731
                *a, w1=kind.w1, w2=kind.w2, variant=kind.variant, implementation=kind.implementation
            ).astype(jnp.float32).sum()
            return "simplicial", 3.5 * simplicial_flops(batch, seq, h, d, kind.w1, kind.w2), _timed_fwd_bwd(f, args)
        if cls is MoEConfig:
            from kernels.grouped_matmul import grouped_matmul

            m, e, dm, n = batch * seq * kind.top_k, kind.num_experts, model.d_model, kind.expert_dim
            sizes = jnp.full((e,), m // e, jnp.int32).at[0].add(m - (m // e) * e)
            args = (rnd(ks[0], (m, dm)), rnd(ks[1], (e, dm, n)))
            f = lambda x, w, sizes=sizes, kind=kind: grouped_matmul(  # noqa: E731
                x, w, sizes, implementation=kind.implementation).astype(jnp.float32).sum()
            return "grouped_matmul", 3 * 2.0 * m * dm * n, _timed_fwd_bwd(f, args)
        if cls is Mamba2Config:
            from kernels.ssd import ssd
            from tools.bench_ssd import make, ssd_flops

            di = kind.expand * model.d_model
            h, p, g, n = di // kind.head_dim, kind.head_dim, kind.ngroups, kind.d_state
            x, dt, a_, b_, c_, d_ = make(batch, seq, h, p, g, n, bf)
            f = lambda x, b_, c_, dt=dt, a_=a_, d_=d_, kind=kind: ssd(  # noqa: E731
                x, dt, a_, b_, c_, chunk_size=kind.chunk_size, D=d_, implementation=kind.implementation
            ).astype(jnp.float32).sum()
            return "ssd", 3.0 * ssd_flops(batch, seq, h, p, g, n, kind.chunk_size), _timed_fwd_bwd(f, (x, b_, c_))
        h, kv, d = kind.num_heads, kind.num_kv_heads, kind.head_dim
        args = (rnd(ks[0], (batch, seq, h, d)), rnd(ks[1], (batch, seq, kv, d)), rnd(ks[2], (batch, seq, kv, d)))
        f = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,  # noqa: E731
                                                         implementation="cudnn").astype(jnp.float32).sum()
        return "attention (cudnn)", 3.5 * 4.0 * batch * h * seq * seq * d / 2, _timed_fwd_bwd(f, args)
    return None


COLLECTIVES = ("all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute")


def _union_seconds(spans: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total * 1e-6  # trace times are microseconds


def collective_seconds(events: list[dict], device_pids: set) -> tuple[dict[str, float], int]:
    """Perfetto trace events (`benchutil.capture_trace` / `load_perfetto`) -> ({collective kind: seconds summed over
    devices}, number of device tracks seen, 0 if none). An event counts for a kind if its name or an argument (GPU
    kernels carry the HLO op name, e.g. 'all-to-all-start.3', in their args) names it; overlapping events of one kind on
    one device are counted once. Device tracks (pid named '/device:...') are used where present, else the host's (the
    CPU backend runs collectives as host thunks)."""
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
    p.add_argument("--all", action="store_true", help="every recipe's GPU preset (ALL), one process each; one table")
    p.add_argument("--only", default=None, metavar="R:P,...", help="with --all: only these recipe:preset entries")
    p.add_argument("--preset-timeout", type=float, default=None, metavar="S",
                   help="with --all: give up on a preset after S seconds (its row says so)")
    p.add_argument("--no-hot-op", action="store_true", help="skip timing the preset's hot op alone")
    p.add_argument("--mamba-anchor", default=None, metavar="SRC",
                   help="with --all: mamba_ssm sources for the PyTorch anchor of mamba2:gpu_340m "
                        "(default .anchors/mamba if it exists; 'none' turns it off)")
    p.add_argument("--kernel-profile", type=int, default=0, metavar="N",
                   help="trace N more steps; print device time per kernel kind and the top kernels")
    a = p.parse_args(argv)
    if a.all:
        return run_all(a)

    from axlearn_like import config as config_lib, sharding as sharding_lib, trainer
    from axlearn_like.checkpoint import CheckpointConfig, Checkpointer
    from axlearn_like.evaluation import global_batch

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
        # global_batch keeps the keys of the step's batch spec: segment_ids only for presets whose data packs
        # documents (DataConfig.multi_document_rows), as a real run of the preset.
        for _ in range(4):  # rotate a few random batches (never time on zeros)
            toks = rng.integers(0, vocab, (g, s + 1), dtype=np.int32)
            local = {"inputs": toks[:, :-1], "targets": toks[:, 1:], "loss_mask": np.ones((g, s), np.float32),
                     "segment_ids": np.ones((g, s), np.int32),
                     "positions": np.tile(np.arange(s, dtype=np.int32), (g, 1))}
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
        if a.kernel_profile > 0:
            box = [state]

            def one_step(batch):
                box[0], metrics = step_fn(box[0], batch)
                return metrics

            prof = benchutil.device_ops(one_step, (batches[0],), calls=a.kernel_profile, top=20)
            hlo = step_fn.lower(box[0], batches[0]).compile().as_text()
            benchutil.print_device_ops(f"{a.recipe}:{a.preset} train step", prof, hlo)
            state = box[0]
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
    hot = None if a.no_hot_op else hot_op(cfg.model, g, s)
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
        print(f"| checkpoint stall at a save every {a.save_every} steps (warm save) | "
              f"{100*stall_s/(a.save_every*step_s):.2f}% of step time |")
    if hot:
        print(f"| hot op alone: {hot[0]} fwd+bwd at this shape | {hot[2]*1e3:.2f} ms, "
              f"{hot[1]/hot[2]/1e12:.0f} TFLOP/s |")
        print(f"| model TFLOP/s as a share of the hot op's | {100*fpt*tokens/step_s/ndev/(hot[1]/hot[2]):.1f}% |")
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
            "hot_op": hot[0] if hot else None, "hot_op_tflops": hot[1] / hot[2] / 1e12 if hot else None,
            "hot_op_ms": hot[2] * 1e3 if hot else None,
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


# The GPU presets `--all` runs: (recipe, preset). EBT's per-inner-step ratio is tools.bench_ebt's job.
ALL = (("simplicial", "gpu_1b"), ("moe", "deepseek_v3_gpu"), ("dense_lm", "gpu_1b"), ("moe", "gpu_0p8b"),
       ("mamba2", "gpu_340m"), ("ebt", "gpu"))
# The preset that tools.bench_mamba_torch mirrors in PyTorch + mamba_ssm (issue 18's anchor), and where --all
# looks for mamba_ssm's sources by default (scripts/fetch_anchors.sh; git-ignored, never part of the project).
MAMBA_ANCHOR = ("mamba2", "gpu_340m")
MAMBA_ANCHOR_SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".anchors", "mamba")
ANCHOR_MIN_TIMEOUT = 240.0  # seconds for the PyTorch anchor's process under --preset-timeout


def mamba_anchor_src(arg: str | None) -> str | None:
    """--mamba-anchor -> the sources' folder, or None (no anchor): the default one if it exists; 'none' / ''."""
    if arg is None:
        return MAMBA_ANCHOR_SRC if os.path.isdir(MAMBA_ANCHOR_SRC) else None
    return None if arg.strip().lower() in ("", "none") else arg


def run_mamba_anchor(a, src: str, d: str) -> dict:
    """tools.bench_mamba_torch in its own process (same --steps / --warmup / --set) -> its row, labelled, with
    `anchor` set; a failure (exit 2: no sources, torch, triton or CUDA; an OOM) keeps the row with the error."""
    recipe, preset = MAMBA_ANCHOR
    row = {"recipe": recipe, "preset": preset, "anchor": "pytorch+mamba_ssm",
           "label": f"{recipe}:{preset} (PyTorch + mamba_ssm Triton, conv1d torch fallback)"}
    path = os.path.join(d, "mamba_torch.json")
    cmd = [sys.executable, "-m", "tools.bench_mamba_torch", "--src", src, "--recipe", recipe, "--preset", preset,
           "--steps", str(a.steps), "--warmup", str(a.warmup), "--json", path]
    for kv in a.set:
        cmd += ["--set", kv]
    # its first step autotunes mamba_ssm's Triton kernels (~80 s on an H100): never less than ANCHOR_MIN_TIMEOUT
    timeout = None if a.preset_timeout is None else max(a.preset_timeout, ANCHOR_MIN_TIMEOUT)
    res = benchutil.run_child(row["label"], cmd, path, timeout)
    if "error" in res:
        return {**row, **res}
    row["label"] = f"{recipe}:{preset} (PyTorch + mamba_ssm Triton, conv1d {res.get('conv1d', 'torch fallback')})"
    print(f"  step {res['step_s']*1e3:.1f} ms, {res['tokens_per_s']:,.0f} tokens/s, peak "
          f"{(res.get('peak_memory_bytes') or 0)/2**30:.1f} GiB, params {res.get('params')} "
          f"(ours {res.get('params_jax')})", flush=True)
    return {**res, **row}


def mamba_anchor_ratio(rows: list[dict]) -> float | None:
    """tokens/s of our mamba2:gpu_340m over its PyTorch anchor's, None unless both rows ran."""
    ours = [r for r in rows if (r["recipe"], r["preset"]) == MAMBA_ANCHOR and not r.get("anchor")]
    theirs = [r for r in rows if (r["recipe"], r["preset"]) == MAMBA_ANCHOR and r.get("anchor")]
    if not ours or not theirs or "error" in ours[0] or "error" in theirs[0]:
        return None
    return ours[0]["tokens_per_s"] / theirs[0]["tokens_per_s"]


def run_all(a) -> int:
    """Each preset of ALL in its own process (`--json`), then one table; a preset that fails (OOM) keeps its
    row with the error's last line."""
    entries = benchutil.select_entries(ALL, a.only)
    jobs = [(recipe, preset, False) for recipe, preset in entries]
    anchor_src = mamba_anchor_src(a.mamba_anchor)
    if anchor_src and MAMBA_ANCHOR in entries:  # the PyTorch anchor runs right after its preset
        jobs.insert(entries.index(MAMBA_ANCHOR) + 1, (*MAMBA_ANCHOR, True))
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for recipe, preset, torch_anchor in jobs:
            if torch_anchor:
                rows.append(run_mamba_anchor(a, anchor_src, d))
                continue
            path = os.path.join(d, f"{recipe}_{preset}.json")
            cmd = [sys.executable, "-m", "tools.bench_train", "--recipe", recipe, "--preset", preset, "--steps",
                   str(a.steps), "--warmup", str(a.warmup), "--no-anchor", "--no-save", "--json", path]
            for kv in a.set:
                cmd += ["--set", kv]
            res = benchutil.run_child(f"{recipe}:{preset}", cmd, path, a.preset_timeout)
            r = {"recipe": recipe, "preset": preset, **res}
            rows.append(r)
            if "error" not in r:
                print(f"  step {r['step_s']*1e3:.1f} ms, {r['model_tflops_per_device']:.1f} TFLOP/s, peak "
                      f"{(r.get('peak_memory_bytes') or 0)/2**30:.1f} GiB, hot op {r.get('hot_op')} "
                      f"{r.get('hot_op_tflops') or 0:.0f} TFLOP/s", flush=True)
    # The anchor runs after the presets: touching the GPU here first would preallocate this process's share of
    # its memory while each preset's process runs (seen as cudaErrorMemoryAllocation in their first step).
    anchor = None if a.no_anchor or jax.default_backend() == "cpu" else _matmul_anchor()
    print(f"\ndevice: {jax.devices()[0].device_kind}  jax {jax.__version__}"
          + (f"  anchor: jax bf16 matmul 8192^3 {anchor/1e12:.0f} TFLOP/s" if anchor else ""))
    print("| preset | step | tokens/s | model TFLOP/s | MFU | of matmul anchor | hot op alone | of hot op | peak mem |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        name = r.get("label") or f"{r['recipe']}:{r['preset']}"
        if "error" in r:
            print(f"| {name} | failed: {r['error']} | | | | | | | |")
            continue
        if r.get("anchor"):  # PyTorch (TFLOP/s by our FLOPs/token of the same model); no MFU / hot op
            print(f"| {name} | {r['step_s']*1e3:.1f} ms | {r['tokens_per_s']:,.0f} "
                  f"| {r.get('model_tflops_per_device') or 0:.1f} | - | - | - | - "
                  f"| {(r.get('peak_memory_bytes') or 0)/2**30:.1f} GiB |")
            continue
        tf = r["model_tflops_per_device"]
        mfu = f"{100*r['mfu']:.1f}%" if r.get("mfu") else "-"
        anc = f"{100*tf*1e12/anchor:.1f}%" if anchor else "-"
        hot = f"{r['hot_op']} {r['hot_op_tflops']:.0f} TFLOP/s" if r.get("hot_op") else "-"
        share = f"{100*tf/r['hot_op_tflops']:.1f}%" if r.get("hot_op") else "-"
        mem = f"{r['peak_memory_bytes']/2**30:.1f} GiB" if r.get("peak_memory_bytes") else "-"
        print(f"| {name} | {r['step_s']*1e3:.1f} ms | {r['tokens_per_s']:,.0f} | {tf:.1f} | {mfu} | {anc} | {hot} "
              f"| {share} | {mem} |")
    ratio = mamba_anchor_ratio(rows)
    if any(r.get("anchor") for r in rows):
        name = ":".join(MAMBA_ANCHOR)
        print(f"{name} tokens/s vs the PyTorch anchor: " + (f"{ratio:.2f}x" if ratio else "n/a (a row failed)")
              + " (goal >= 1.3x)")
    if a.json:
        _write_json(a.json, {"anchor_matmul_tflops": anchor / 1e12 if anchor else None, "presets": rows,
                             "mamba2_vs_pytorch": ratio})
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
