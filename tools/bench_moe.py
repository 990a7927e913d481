"""Benchmark grouped matmul and the MoE layer (GPU): `python -m tools.bench_moe [--out J] [--sweep] [--xla] [--quick]`.

1. Grouped matmul, 64 experts, m = 32768 routed rows, k = d_model 2048, n = expert width 1408, bf16, uniform
   (512 rows each) and skewed (Zipf, p_i ~ 1/(i+1)) group sizes, vs a dense bf16 matmul [m, k] @ [k, n] of the
   same FLOPs. FLOPs: fwd 2mkn; fwd+bwd 3 x fwd (loss 0.5 * sum(out^2), so the forward product is kept).
   `--xla` adds lax.ragged_dot (slow: ~16 ms fwd). `--sweep` first times candidate tilings of each launch on
   uniform loads and keeps the best for the rest. Tiling = (BM, BN, BK, warps, stages, persistent programs
   or 0); H200: 132 SMs.
2. MoE layer (E=64, top-6, 2 shared, F=1408, d_model 2048, 8192 tokens, bf16) fwd+bwd and fwd with the
   gather-only dispatch, and (fwd+bwd) with a scatter-add dispatch/combine for comparison; vs a dense SwiGLU FFN of
   equal active width (6 + 2) x 1408. Breakdown rows (fwd+bwd): the routed experts alone (3 gmm + SwiGLU on
   T*k = 49152 expert-sorted rows), the shared experts alone (dense SwiGLU width 2 x 1408), and the rest
   (layer minus both: router, sort, gathers, combine, balance statistics).
   FLOPs per token fwd: 6 * d_model * F_active (three matrices) + 2 * d_model * E (gate); fwd+bwd 3 x fwd.
   Weights float32 (cast to bf16 in the step, the trainer's default) and, for the layer and the dense FFN,
   bf16 (the trainer with optimizer.param_dtype=bfloat16); the ratio layer / dense FFN is printed for both.
Timing: tools.benchutil.timeit (calls back to back, median of 5 rounds).
"""
from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from kernels.common import backend, has_jax_triton
from kernels.grouped_matmul import grouped_matmul
from tools import benchutil

ANCHORS = {"ragged_dot_fwd_tflops": 11.0, "dense_bf16_jax_tflops": 608.0, "source": "docs/benchmarks.md anchors, H200"}


def timeit(f, args, reps=20, warmup=3):
    return benchutil.timeit(f, args, reps, warmup)


def group_sizes(kind: str, m: int, g: int) -> np.ndarray:
    if kind == "uniform":
        sizes = np.full(g, m // g)
    else:
        p = 1.0 / np.arange(1, g + 1)
        sizes = np.floor(p / p.sum() * m).astype(int)
    sizes[0] += m - sizes.sum()
    return sizes.astype(np.int32)


def _row(rows, what, loads, pass_, ms, spread, flops, **extra):
    rows.append(dict(what=what, loads=loads, pass_=pass_, ms=ms, spread_ms=spread, tflops=flops / ms / 1e9, **extra))
    print(f"  {what} {loads} {pass_}: {ms:.3f} ms", flush=True)  # progress (a killed run still shows rows)


def _guarded(rows, what, fn):
    """Runs one measurement; a failure becomes a row with the error, so one broken launch costs one row
    (not the whole GPU call)."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        msg = f"{type(e).__name__}: {str(e)[:300]}"
        print(f"  FAILED {what}: {msg}", flush=True)
        rows.append(dict(what=f"FAILED {what}", loads="-", pass_="-", ms=float("nan"), spread_ms=0.0,
                         tflops=float("nan"), error=msg))


def sweep(lhs, rhs, dout, gs, fl, reps, quick, rows):
    """Times candidate tilings per launch (uniform loads); sets the module defaults to the best of each."""
    from kernels.grouped_matmul import triton_gpu as tg

    T = tg.Tiling
    cands = {
        "gmm": [T(128, 128, 64, 8, 3, 264), T(128, 256, 64, 8, 3), T(128, 128, 64, 8, 4, 264),
                T(128, 128, 64, 8, 3, 132)],
        "gmm_T": [T(256, 128, 64, 8, 3), T(128, 256, 64, 8, 3), T(256, 128, 64, 8, 3, 264)],
        "tgmm": [T(32, 128, 128, 4, 4), T(64, 256, 128, 8, 3), T(64, 128, 128, 8, 3)],
    }
    launches = {  # name -> (fn(tiling), args, flops)
        "gmm": (lambda t: jax.jit(lambda a, b, s: tg.gmm(a, b, s, tiling=t)), (lhs, rhs, gs), fl),
        # the dlhs launch: dout [m, n] @ rhs[g]^T with rhs stored [G, k, n]
        "gmm_T": (lambda t: jax.jit(lambda a, b, s: tg.gmm(a, b, s, transpose_rhs=True, tiling=t)),
                  (dout, rhs, gs), fl),
        "tgmm": (lambda t: jax.jit(lambda a, d, s: tg.tgmm(a, d, s, tiling=t)), (lhs, dout, gs), fl),
    }
    best = {}
    for name, (fn, args, flops) in launches.items():
        for t in cands[name][: 2 if quick else None]:
            try:
                ms, spread = timeit(fn(t), args, reps)
            except Exception as e:  # a tiling that does not fit shared memory, say
                print(f"  sweep {name} {tuple(t)} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            _row(rows, f"triton {name} sweep {tuple(t)}", "uniform", "fwd", ms, spread, flops)
            print(f"  sweep {name:7s} {str(tuple(t)):36s} {ms:7.3f} ms {flops / ms / 1e9:6.0f} TFLOP/s", flush=True)
            if name not in best or ms < best[name][0]:
                best[name] = (ms, t)
    for name, (ms, t) in best.items():
        print(f"  best {name:7s} {str(tuple(t)):36s} {ms:7.3f} ms {launches[name][2] / ms / 1e9:6.0f} TFLOP/s",
              flush=True)
    for name, attr in (("gmm", "GMM_TILING"), ("gmm_T", "GMM_T_TILING"), ("tgmm", "TGMM_TILING")):
        if name in best:
            setattr(tg, attr, best[name][1])


def bench_gmm(m, k, n, g, reps, args, rows):
    r = np.random.default_rng(0)
    lhs = jnp.asarray(r.normal(size=(m, k)), jnp.bfloat16)
    rhs = jnp.asarray(r.normal(size=(g, k, n)) / np.sqrt(k), jnp.bfloat16)
    dout = jnp.asarray(r.normal(size=(m, n)), jnp.bfloat16)
    fl = 2.0 * m * k * n
    triton_ok = backend() == "gpu" and has_jax_triton()
    impls = (["triton"] if triton_ok else []) + (["xla"] if args.xla or not triton_ok else [])

    dense_b = jnp.asarray(r.normal(size=(k, n)) / np.sqrt(k), jnp.bfloat16)
    ms, spread = timeit(jax.jit(lambda a, b: a @ b), (lhs, dense_b), reps)
    _row(rows, "dense bf16 matmul", "-", "fwd", ms, spread, fl)
    # The loss is quadratic in the product: with a linear loss XLA may drop the forward product entirely.
    f = jax.jit(jax.grad(lambda a, b: 0.5 * jnp.sum((a @ b).astype(jnp.float32) ** 2), argnums=(0, 1)))
    ms, spread = timeit(f, (lhs, dense_b), reps)
    _row(rows, "dense bf16 matmul", "-", "fwd+bwd", ms, spread, 3 * fl)

    if triton_ok:
        from kernels.grouped_matmul import triton_gpu as tg

        if args.sweep:
            gs = jnp.asarray(group_sizes("uniform", m, g))
            _guarded(rows, "sweep", lambda: sweep(lhs, rhs, dout, gs, fl, reps, args.quick, rows))
        eff = lambda t, c: tuple(tg.fit_columns(t, c))
        rows.append(dict(what=f"tilings gmm={eff(tg.GMM_TILING, n)} gmm_T={eff(tg.GMM_T_TILING, k)} "
                              f"tgmm={tuple(tg.TGMM_TILING)}", loads="-", pass_="-", ms=0.0, spread_ms=0.0, tflops=0.0))

    for loads in ("uniform", "skewed"):
        gs = jnp.asarray(group_sizes(loads, m, g))
        for impl in impls:
            _guarded(rows, f"grouped_matmul {impl} {loads}",
                     lambda impl=impl, loads=loads, gs=gs: _gmm_rows(impl, loads, lhs, rhs, gs, fl, reps, rows))


def _gmm_rows(impl, loads, lhs, rhs, gs, fl, reps, rows):
    f = jax.jit(lambda a, b, s, impl=impl: grouped_matmul(a, b, s, implementation=impl))
    err = _check(f(lhs, rhs, gs), lhs, rhs, np.asarray(gs))
    ms, spread = timeit(f, (lhs, rhs, gs), reps)
    _row(rows, f"grouped_matmul {impl}", loads, "fwd", ms, spread, fl, rel_err=err)
    loss = lambda a, b, s, impl=impl: 0.5 * jnp.sum(
        grouped_matmul(a, b, s, implementation=impl).astype(jnp.float32) ** 2)
    ms, spread = timeit(jax.jit(jax.grad(loss, argnums=(0, 1))), (lhs, rhs, gs), reps)
    _row(rows, f"grouped_matmul {impl}", loads, "fwd+bwd", ms, spread, 3 * fl)


def _check(out, lhs, rhs, gs):
    """Relative error of a few groups against a float32 XLA matmul (spot check of the timed output)."""
    out = np.asarray(out, np.float32)
    ends = np.cumsum(gs)
    errs = []
    for gi in (0, len(gs) // 2, len(gs) - 1):
        s, e = ends[gi] - gs[gi], ends[gi]
        if e > s:
            ref = np.asarray(lhs[s:e], np.float32) @ np.asarray(rhs[gi], np.float32)
            errs.append(np.linalg.norm(out[s:e] - ref) / np.linalg.norm(ref))
    return float(max(errs))


def _grouped_local_round1(x, ids, w, w_gate, w_up, w_down, implementation):
    """Round 1's dispatch (comparison only): x[tok] gather (backward: scatter-add) and an f32 scatter-add
    combine over [T*K, D]."""
    import models.moe as moe_mod

    t, k = ids.shape
    flat = ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    tok = order // k
    gs = jnp.zeros((w_gate.shape[0],), jnp.int32).at[flat].add(1, mode="drop")
    y = moe_mod._swiglu_grouped(x[tok], w_gate, w_up, w_down, gs, implementation)
    wy = y.astype(jnp.float32) * w.reshape(-1)[order][:, None]
    return jnp.zeros((t, x.shape[1]), jnp.float32).at[tok].add(wy)


def bench_layer(reps, rows, variants, small=False, profile=False):
    """variants: (label, implementation, scatter-add dispatch instead of the gather-only one)."""
    import models.moe as moe_mod

    dims = (1, 256, 128, 16, 6, 64, 2) if small else (4, 2048, 2048, 64, 6, 1408, 2)
    b, s, d, e, k, f, shared = dims
    t = b * s
    x = jnp.asarray(np.random.default_rng(1).normal(size=(b, s, d)), jnp.bfloat16)
    fwd_flops = t * (6.0 * d * f * (k + shared) + 2.0 * d * e)
    new = moe_mod._grouped_local
    for label, impl, round1 in variants:
        moe_mod._grouped_local = _grouped_local_round1 if round1 else new  # read at trace time
        try:
            _guarded(rows, f"MoE layer ({label})",
                     lambda label=label, impl=impl, round1=round1: _layer_rows(
                         label, impl, x, reps, rows, fwd_flops, dims, fwd=not round1, profile=profile and not round1))
        finally:
            moe_mod._grouped_local = new
    impl = variants[0][1]
    _guarded(rows, "routed experts", lambda: _routed_rows(impl, reps, rows, dims))
    _dense_ffn_rows(x, reps, rows, dims, shared * f, "shared experts: dense SwiGLU")
    _dense_ffn_rows(x, reps, rows, dims, (k + shared) * f, "dense SwiGLU FFN")
    by = {r["what"]: r["ms"] for r in rows if r["pass_"] == "fwd+bwd"}
    layer = by.get(f"MoE layer ({variants[0][0]})")
    parts = [by.get(f"routed experts: 3 gmm + SwiGLU, m={t * k}"),
             by.get(f"shared experts: dense SwiGLU width {shared * f}")]
    if layer is not None and None not in parts:
        _row(rows, "rest = layer - routed - shared (router, sort, gathers, combine, stats)", "-", "fwd+bwd",
             layer - sum(parts), 0.0, 0.0)
    # bf16-stored weights, as the trainer keeps them with optimizer.param_dtype=bfloat16 (float32 masters in the
    # optimizer state): no per-step cast of float32 weights (0.78 ms for the MoE layer's 553 M expert weights,
    # 0.1 ms for the dense FFN's 69 M).
    bf = "bf16 weights"
    _guarded(rows, f"MoE layer ({variants[0][0]}, {bf})", lambda: _layer_rows(
        f"{variants[0][0]}, {bf}", impl, x, reps, rows, fwd_flops, dims, fwd=False, weights=jnp.bfloat16))
    _dense_ffn_rows(x, reps, rows, dims, (k + shared) * f, f"dense SwiGLU FFN, {bf},", weights=jnp.bfloat16)
    by = {r["what"]: r["ms"] for r in rows if r["pass_"] == "fwd+bwd"}
    for what, num, den in (("float32 master weights", layer, by.get(f"dense SwiGLU FFN width {(k + shared) * f}")),
                           (bf, by.get(f"MoE layer ({variants[0][0]}, {bf})"),
                            by.get(f"dense SwiGLU FFN, {bf}, width {(k + shared) * f}"))):
        if num and den:
            rows.append(dict(what=f"ratio MoE layer / dense FFN, {what} (goal <= 1.5)", loads="-", pass_="ratio",
                             ms=num / den, spread_ms=0.0, tflops=0.0))
            print(f"  MoE layer / dense FFN fwd+bwd, {what}: {num / den:.3f}x (goal <= 1.5)", flush=True)


def _layer_rows(label, impl, x, reps, rows, fwd_flops, dims, fwd=True, profile=False, weights=jnp.float32):
    import flax.linen as nn

    from models.moe import MoE, MoEConfig

    b, s, d, e, k, f, shared = dims
    cfg = MoEConfig(num_experts=e, top_k=k, num_shared=shared, expert_dim=f, implementation=impl)
    layer = MoE(cfg, d, jnp.bfloat16)
    v = nn.meta.unbox(jax.jit(lambda key: layer.init(key, x[:1, :8], train=False))(jax.random.key(0)))
    v = {**v, "params": jax.tree.map(lambda a: a.astype(weights), v["params"])}

    def loss(params, x):
        y, _ = layer.apply({**v, "params": params}, x, train=True, mutable=["stats", "intermediates"])
        return jnp.mean(y.astype(jnp.float32) ** 2)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    ms, spread = timeit(step, (v["params"], x), reps)
    _row(rows, f"MoE layer ({label})", "routed", "fwd+bwd", ms, spread, 3 * fwd_flops)
    if weights != jnp.float32:
        return
    if profile:
        benchutil.print_device_ops(f"MoE layer ({label}) fwd+bwd", benchutil.device_ops(step, (v["params"], x)))
    if fwd:
        f = jax.jit(lambda p, x: layer.apply({**v, "params": p}, x, train=False))
        ms, spread = timeit(f, (v["params"], x), reps)
        _row(rows, f"MoE layer ({label})", "routed", "fwd", ms, spread, fwd_flops)


def _routed_rows(impl, reps, rows, dims):
    """The routed experts alone on expert-sorted rows (uniform loads), fwd+bwd."""
    import models.moe as moe_mod

    b, s, d, e, k, f, shared = dims
    m = b * s * k
    r = np.random.default_rng(3)
    xs = jnp.asarray(r.normal(size=(m, d)), jnp.bfloat16)
    ws = [jnp.asarray(r.normal(size=sh) / np.sqrt(sh[1]), jnp.float32) for sh in ((e, d, f), (e, d, f), (e, f, d))]
    gs = jnp.asarray(group_sizes("uniform", m, e))

    def loss(ws, xs):
        y = moe_mod._swiglu_grouped(xs, *ws, gs, impl)
        return jnp.mean(y.astype(jnp.float32) ** 2)

    ms, spread = timeit(jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), (ws, xs), reps)
    _row(rows, f"routed experts: 3 gmm + SwiGLU, m={m}", "uniform", "fwd+bwd", ms, spread, 3 * 6.0 * m * d * f)


def _dense_ffn_rows(x, reps, rows, dims, fa, label, weights=jnp.float32):
    b, s, d, e, k, f, shared = dims
    t = b * s
    r = np.random.default_rng(2)
    wd = {n: jnp.asarray(r.normal(size=sh) / np.sqrt(sh[0]), weights)
          for n, sh in (("g", (d, fa)), ("u", (d, fa)), ("o", (fa, d)))}

    def dense_loss(w, x):
        c = {n: a.astype(jnp.bfloat16) for n, a in w.items()}
        y = (jax.nn.silu(x @ c["g"]) * (x @ c["u"])) @ c["o"]
        return jnp.mean(y.astype(jnp.float32) ** 2)

    ms, spread = timeit(jax.jit(jax.value_and_grad(dense_loss, argnums=(0, 1))), (wd, x.reshape(t, d)), reps)
    _row(rows, f"{label} width {fa}", "-", "fwd+bwd", ms, spread, 3 * t * 6.0 * d * fa)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.bench_moe")
    ap.add_argument("--out", default=None)
    ap.add_argument("--sweep", action="store_true", help="time candidate Triton tilings first and keep the best")
    ap.add_argument("--xla", action="store_true", help="also time lax.ragged_dot (slow) at kernel and layer level")
    ap.add_argument("--quick", action="store_true", help="fewer tilings and repetitions")
    ap.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke run of this script)")
    ap.add_argument("--layer-only", action="store_true", help="skip the grouped-matmul kernel rows")
    ap.add_argument("--profile", action="store_true",
                    help="print the MoE layer's device time per kernel kind and top kernels")
    args = ap.parse_args(argv)
    reps = 5 if args.quick else 20
    rows = []
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    if args.layer_only:
        pass
    elif args.small:
        bench_gmm(1024, 128, 96, 16, reps, args, rows)
    else:
        bench_gmm(32768, 2048, 1408, 64, reps, args, rows)
    triton_ok = backend() == "gpu" and has_jax_triton()
    variants = ([("triton", "triton", False), ("triton, scatter-add dispatch", "triton", True)] if triton_ok else [])
    if args.xla or not triton_ok:
        variants.append(("xla", "xla", False))
    bench_layer(reps, rows, variants, args.small, args.profile)
    print(f"\n{'what':62s} {'loads':8s} {'pass':8s} {'ms':>9s} {'spread':>8s} {'TFLOP/s':>8s}")
    for r in rows:
        if "sweep" in r["what"]:
            continue
        extra = f"  rel_err {r['rel_err']:.1e}" if "rel_err" in r else ""
        print(f"{r['what']:62s} {r['loads']:8s} {r['pass_']:8s} {r['ms']:9.3f} {r['spread_ms']:8.3f} "
              f"{r['tflops']:8.1f}{extra}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, anchors=ANCHORS, rows=rows), f,
                      indent=1)


if __name__ == "__main__":
    main()
