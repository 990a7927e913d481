"""Benchmark grouped matmul and the MoE layer (GPU): `python -m tools.bench_moe [--out J] [--sweep] [--xla] [--quick]`.

1. Grouped matmul, 64 experts, m = 32768 routed rows, k = d_model 2048, n = expert width 1408, bf16, uniform
   (512 rows each) and skewed (Zipf, p_i ~ 1/(i+1)) group sizes, vs a dense bf16 matmul [m, k] @ [k, n] of the
   same FLOPs. FLOPs: fwd 2mkn; fwd+bwd 3 x fwd (loss 0.5 * sum(out^2), so the forward product is kept).
   Rows: dense fwd / fwd+bwd; Triton gmm fwd / fwd+bwd and the fused SwiGLU gate+up (2 x 2mkn) fwd / fwd+bwd
   for the chosen tilings; `--xla` adds lax.ragged_dot (slow: ~16 ms fwd). `--sweep` first times candidate
   tilings of each launch on uniform loads (one line each, then the best of each) and keeps the best for the
   rest. Tiling = (BM, BN, BK, warps, stages, column-fastest raster, persistent programs or 0); H200: 132 SMs.
2. MoE layer (E=64, top-6, 2 shared, F=1408, d_model 2048, 8192 tokens, bf16) fwd+bwd and fwd, with the fused
   gate+up (default) and the previous two-gmm path, vs a dense SwiGLU FFN of equal active width (6 + 2) x 1408.
   FLOPs per token fwd: 6 * d_model * F_active (three matrices) + 2 * d_model * E (gate); fwd+bwd 3 x fwd.
Timing: tools.benchutil.timeit (calls back to back, median of 5 rounds).
"""
from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from kernels.common import backend, has_jax_triton
from kernels.grouped_matmul import grouped_matmul, swiglu_grouped_matmul
from tools import benchutil

ANCHORS = {"ragged_dot_fwd_tflops": 11.0, "dense_bf16_jax_tflops": 608.0, "source": "shared/GPU.md, H200"}


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


def sweep(lhs, rhs, rhs2, dout, gs, fl, reps, quick, rows):
    """Times candidate tilings per launch (uniform loads); sets the module defaults to the best of each."""
    from kernels.grouped_matmul import triton_gpu as tg

    T = tg.Tiling
    cands = {
        "gmm": [T(128, 256, 64, 8, 3), T(128, 256, 64, 8, 3, False), T(128, 128, 64, 8, 4), T(256, 128, 64, 8, 3),
                T(128, 256, 64, 8, 3, True, 132), T(128, 128, 64, 8, 3, True, 264)],
        "gmm_T": [T(128, 256, 64, 8, 3), T(256, 128, 64, 8, 3)],
        "swiglu": [T(128, 128, 64, 8, 3), T(128, 128, 64, 8, 4), T(64, 128, 64, 4, 4), T(256, 64, 64, 8, 3),
                   T(128, 128, 64, 8, 3, True, 132)],
        "tgmm": [T(64, 128, 128, 8, 3), T(64, 256, 128, 8, 3)],
    }
    launches = {  # name -> (fn(tiling), args, flops)
        "gmm": (lambda t: jax.jit(lambda a, b, s: tg.gmm(a, b, s, tiling=t)), (lhs, rhs, gs), fl),
        # the dlhs launch: dout [m, n] @ rhs[g]^T with rhs stored [G, k, n]
        "gmm_T": (lambda t: jax.jit(lambda a, b, s: tg.gmm(a, b, s, transpose_rhs=True, tiling=t)), (dout, rhs, gs), fl),
        "swiglu": (lambda t: jax.jit(lambda a, b, c, s: tg.gmm_swiglu(a, b, c, s, store_hu=True, tiling=t)),
                   (lhs, rhs, rhs2, gs), 2 * fl),
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
        print(f"  best {name:7s} {str(tuple(t)):36s} {ms:7.3f} ms {launches[name][2] / ms / 1e9:6.0f} TFLOP/s", flush=True)
    if "gmm" in best:  # the dlhs launch shares GMM_TILING; keep the fwd winner unless gmm_T disagrees strongly
        tg.GMM_TILING = best["gmm"][1]
    if "swiglu" in best:
        tg.SWIGLU_TILING = best["swiglu"][1]
    if "tgmm" in best:
        tg.TGMM_TILING = best["tgmm"][1]


def bench_gmm(m, k, n, g, reps, args, rows):
    r = np.random.default_rng(0)
    lhs = jnp.asarray(r.normal(size=(m, k)), jnp.bfloat16)
    rhs = jnp.asarray(r.normal(size=(g, k, n)) / np.sqrt(k), jnp.bfloat16)
    rhs2 = jnp.asarray(r.normal(size=(g, k, n)) / np.sqrt(k), jnp.bfloat16)
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
            _guarded(rows, "sweep", lambda: sweep(lhs, rhs, rhs2, dout, gs, fl, reps, args.quick, rows))
        eff = lambda t: tuple(tg.fit_columns(t, n))
        rows.append(dict(what=f"tilings gmm={eff(tg.GMM_TILING)} swiglu={eff(tg.SWIGLU_TILING)} "
                              f"tgmm={tuple(tg.TGMM_TILING)} (at n={n})", loads="-", pass_="-", ms=0.0, spread_ms=0.0,
                         tflops=0.0))

    for loads in ("uniform", "skewed"):
        gs = jnp.asarray(group_sizes(loads, m, g))
        for impl in impls:
            _guarded(rows, f"grouped_matmul {impl} {loads}", lambda: _gmm_rows(impl, loads, lhs, rhs, rhs2, gs, fl, reps, rows))


def _gmm_rows(impl, loads, lhs, rhs, rhs2, gs, fl, reps, rows):
    f = jax.jit(lambda a, b, s, impl=impl: grouped_matmul(a, b, s, implementation=impl))
    err = _check(f(lhs, rhs, gs), lhs, rhs, np.asarray(gs))
    ms, spread = timeit(f, (lhs, rhs, gs), reps)
    _row(rows, f"grouped_matmul {impl}", loads, "fwd", ms, spread, fl, rel_err=err)
    loss = lambda a, b, s, impl=impl: 0.5 * jnp.sum(
        grouped_matmul(a, b, s, implementation=impl).astype(jnp.float32) ** 2)
    ms, spread = timeit(jax.jit(jax.grad(loss, argnums=(0, 1))), (lhs, rhs, gs), reps)
    _row(rows, f"grouped_matmul {impl}", loads, "fwd+bwd", ms, spread, 3 * fl)
    if impl != "triton":
        return
    f = jax.jit(lambda a, b, c, s: swiglu_grouped_matmul(a, b, c, s, implementation="triton"))
    ms, spread = timeit(f, (lhs, rhs, rhs2, gs), reps)
    _row(rows, "swiglu_grouped_matmul triton (gate+up)", loads, "fwd", ms, spread, 2 * fl)
    loss = lambda a, b, c, s: 0.5 * jnp.sum(
        swiglu_grouped_matmul(a, b, c, s, implementation="triton").astype(jnp.float32) ** 2)
    ms, spread = timeit(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), (lhs, rhs, rhs2, gs), reps)
    _row(rows, "swiglu_grouped_matmul triton (gate+up)", loads, "fwd+bwd", ms, spread, 6 * fl)


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


def bench_layer(reps, rows, variants, small=False):
    """variants: (label, implementation, fused gate+up)."""
    import models.moe as moe_mod

    dims = (1, 256, 128, 16, 6, 64, 2) if small else (4, 2048, 2048, 64, 6, 1408, 2)
    b, s, d, e, k, f, shared = dims
    t = b * s
    x = jnp.asarray(np.random.default_rng(1).normal(size=(b, s, d)), jnp.bfloat16)
    fwd_flops = t * (6.0 * d * f * (k + shared) + 2.0 * d * e)
    for label, impl, fused in variants:
        _guarded(rows, f"MoE layer ({label})", lambda: _layer_rows(label, impl, fused, x, reps, rows, fwd_flops, dims))
    moe_mod.FUSED_GATE_UP = True
    _dense_ffn_rows(x, reps, rows, dims)


def _layer_rows(label, impl, fused, x, reps, rows, fwd_flops, dims):
    import flax.linen as nn

    import models.moe as moe_mod
    from models.moe import MoE, MoEConfig

    b, s, d, e, k, f, shared = dims
    moe_mod.FUSED_GATE_UP = fused  # read at trace time: each variant traces its own jitted functions
    cfg = MoEConfig(num_experts=e, top_k=k, num_shared=shared, expert_dim=f, implementation=impl)
    layer = MoE(cfg, d, jnp.bfloat16)
    v = nn.meta.unbox(jax.jit(lambda key: layer.init(key, x[:1, :8], train=False))(jax.random.key(0)))

    def loss(params, x):
        y, _ = layer.apply({**v, "params": params}, x, train=True, mutable=["stats", "intermediates"])
        return jnp.mean(y.astype(jnp.float32) ** 2)

    ms, spread = timeit(jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), (v["params"], x), reps)
    _row(rows, f"MoE layer ({label})", "routed", "fwd+bwd", ms, spread, 3 * fwd_flops)
    fwd = jax.jit(lambda p, x: layer.apply({**v, "params": p}, x, train=False))
    ms, spread = timeit(fwd, (v["params"], x), reps)
    _row(rows, f"MoE layer ({label})", "routed", "fwd", ms, spread, fwd_flops)


def _dense_ffn_rows(x, reps, rows, dims):
    b, s, d, e, k, f, shared = dims
    t = b * s
    fa = (k + shared) * f
    r = np.random.default_rng(2)
    wd = {n: jnp.asarray(r.normal(size=sh) / np.sqrt(sh[0]), jnp.float32)
          for n, sh in (("g", (d, fa)), ("u", (d, fa)), ("o", (fa, d)))}

    def dense_loss(w, x):
        c = {n: a.astype(jnp.bfloat16) for n, a in w.items()}
        y = (jax.nn.silu(x @ c["g"]) * (x @ c["u"])) @ c["o"]
        return jnp.mean(y.astype(jnp.float32) ** 2)

    ms, spread = timeit(jax.jit(jax.value_and_grad(dense_loss, argnums=(0, 1))), (wd, x.reshape(t, d)), reps)
    _row(rows, f"dense SwiGLU FFN width {fa}", "-", "fwd+bwd", ms, spread, 3 * t * 6.0 * d * fa)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.bench_moe")
    ap.add_argument("--out", default=None)
    ap.add_argument("--sweep", action="store_true", help="time candidate Triton tilings first and keep the best")
    ap.add_argument("--xla", action="store_true", help="also time lax.ragged_dot (slow) at kernel and layer level")
    ap.add_argument("--quick", action="store_true", help="fewer tilings and repetitions")
    ap.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke run of this script)")
    args = ap.parse_args(argv)
    reps = 5 if args.quick else 20
    rows = []
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    if args.small:
        bench_gmm(1024, 128, 96, 16, reps, args, rows)
    else:
        bench_gmm(32768, 2048, 1408, 64, reps, args, rows)
    triton_ok = backend() == "gpu" and has_jax_triton()
    variants = ([("triton, fused gate+up", "triton", True), ("triton, two gmm", "triton", False)] if triton_ok else [])
    if args.xla or not triton_ok:
        variants.append(("xla", "xla", True))
    bench_layer(reps, rows, variants, args.small)
    print(f"\n{'what':62s} {'loads':8s} {'pass':8s} {'ms':>9s} {'spread':>8s} {'TFLOP/s':>8s}")
    for r in rows:
        if "sweep" in r["what"]:
            continue
        extra = f"  rel_err {r['rel_err']:.1e}" if "rel_err" in r else ""
        print(f"{r['what']:62s} {r['loads']:8s} {r['pass_']:8s} {r['ms']:9.3f} {r['spread_ms']:8.3f} {r['tflops']:8.1f}{extra}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, anchors=ANCHORS, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
