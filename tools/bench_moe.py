"""Benchmark grouped matmul and the MoE layer: `python -m tools.bench_moe [--out bench.json] [--quick]` (GPU).

1. grouped matmul, 64 experts, m = 32768 routed rows, k = d_model 2048, n = expert width 1408, bf16,
   uniform (512 rows each) and skewed (Zipf, p_i ~ 1/(i+1)) group sizes: Triton tiling sweep (gmm, tgmm),
   then fwd and fwd+bwd (dlhs, drhs) per implementation, vs a dense bf16 matmul [m, k] @ [k, n] of the
   same FLOPs. FLOPs: fwd 2mkn; fwd+bwd 3 x fwd (loss 0.5 * sum(out^2), so the forward product is kept).
2. MoE layer (E=64, top-6, 2 shared, F=1408, d_model 2048, 8192 tokens, bf16) fwd+bwd vs a dense SwiGLU
   FFN of equal active width (6 + 2) x 1408. FLOPs per token fwd: 6 * d_model * F_active (three matrices)
   + 2 * d_model * E (gate); fwd+bwd 3 x fwd.
"""
from __future__ import annotations

import argparse
import json

import jax

from tools import benchutil
import jax.numpy as jnp
import numpy as np

from kernels.common import backend, has_jax_triton
from kernels.grouped_matmul import grouped_matmul

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


def bench_gmm(m, k, n, g, reps, quick, rows):
    r = np.random.default_rng(0)
    lhs = jnp.asarray(r.normal(size=(m, k)), jnp.bfloat16)
    rhs = jnp.asarray(r.normal(size=(g, k, n)) / np.sqrt(k), jnp.bfloat16)
    dout = jnp.asarray(r.normal(size=(m, n)), jnp.bfloat16)
    fl = 2.0 * m * k * n
    impls = ["xla"] + (["triton"] if backend() == "gpu" and has_jax_triton() else [])

    dense_b = jnp.asarray(r.normal(size=(k, n)) / np.sqrt(k), jnp.bfloat16)
    f = jax.jit(lambda a, b: a @ b)
    ms, spread = timeit(f, (lhs, dense_b), reps)
    rows.append(dict(what="dense bf16 matmul", loads="-", pass_="fwd", ms=ms, spread_ms=spread, tflops=fl / ms / 1e9))
    # The loss is quadratic in the product: with a linear loss XLA may drop the forward product entirely.
    f = jax.jit(jax.grad(lambda a, b: 0.5 * jnp.sum((a @ b).astype(jnp.float32) ** 2), argnums=(0, 1)))
    ms, spread = timeit(f, (lhs, dense_b), reps)
    rows.append(dict(what="dense bf16 matmul", loads="-", pass_="fwd+bwd", ms=ms, spread_ms=spread, tflops=3 * fl / ms / 1e9))

    if "triton" in impls:
        from kernels.grouped_matmul import triton_gpu as tg

        gs = jnp.asarray(group_sizes("uniform", m, g))
        sweep_g = [tg.Tiling(128, 128, 64, 8, 3), tg.Tiling(128, 128, 64, 4, 4), tg.Tiling(128, 256, 64, 8, 3),
                   tg.Tiling(64, 128, 64, 4, 4), tg.Tiling(128, 128, 128, 8, 3)]
        sweep_t = [tg.Tiling(64, 128, 128, 8, 3), tg.Tiling(32, 128, 128, 4, 4), tg.Tiling(64, 128, 64, 4, 3),
                   tg.Tiling(128, 128, 128, 8, 3), tg.Tiling(64, 256, 128, 8, 3)]
        if quick:
            sweep_g, sweep_t = sweep_g[:2], sweep_t[:2]
        best = {}
        for name, sweep, fn, args in (
            ("gmm", sweep_g, lambda t: jax.jit(lambda a, b, s: tg.gmm(a, b, s, tiling=t)), (lhs, rhs, gs)),
            ("gmm_T", sweep_g, lambda t: jax.jit(lambda a, b, s: tg.gmm(a, b, s, transpose_rhs=True, tiling=t)),
             (dout, rhs, gs)),  # the dlhs launch: dout [m, n] @ rhs[g]^T with rhs stored [G, k, n]
            ("tgmm", sweep_t, lambda t: jax.jit(lambda a, d, s: tg.tgmm(a, d, s, tiling=t)), (lhs, dout, gs)),
        ):
            for t in sweep:
                try:
                    ms, spread = timeit(fn(t), args, reps)
                except Exception as e:  # a tiling that does not fit shared memory, say
                    print(f"  {name} {tuple(t)} failed: {type(e).__name__}: {str(e)[:200]}")
                    continue
                rows.append(dict(what=f"triton {name} sweep {tuple(t)}", loads="uniform", pass_="fwd", ms=ms,
                                 spread_ms=spread, tflops=fl / ms / 1e9))
                print(f"  {name} {tuple(t)}: {ms:.3f} ms {fl / ms / 1e9:.0f} TFLOP/s", flush=True)
                if name not in best or ms < best[name][0]:
                    best[name] = (ms, t)
        if "gmm" in best:
            tg.GMM_TILING = best["gmm"][1]
        if "tgmm" in best:
            tg.TGMM_TILING = best["tgmm"][1]
        rows.append(dict(what=f"chosen tilings gmm={tuple(tg.GMM_TILING)} tgmm={tuple(tg.TGMM_TILING)}", loads="-",
                         pass_="-", ms=0.0, spread_ms=0.0, tflops=0.0))

    for loads in ("uniform", "skewed"):
        gs = jnp.asarray(group_sizes(loads, m, g))
        for impl in impls:
            f = jax.jit(lambda a, b, s, impl=impl: grouped_matmul(a, b, s, implementation=impl))
            out = f(lhs, rhs, gs)
            err = _check(out, lhs, rhs, np.asarray(gs))
            ms, spread = timeit(f, (lhs, rhs, gs), reps)
            rows.append(dict(what=f"grouped_matmul {impl}", loads=loads, pass_="fwd", ms=ms, spread_ms=spread,
                             tflops=fl / ms / 1e9, rel_err=err))
            loss = lambda a, b, s, impl=impl: 0.5 * jnp.sum(
                grouped_matmul(a, b, s, implementation=impl).astype(jnp.float32) ** 2)
            f = jax.jit(jax.grad(loss, argnums=(0, 1)))
            ms, spread = timeit(f, (lhs, rhs, gs), reps)
            rows.append(dict(what=f"grouped_matmul {impl}", loads=loads, pass_="fwd+bwd", ms=ms, spread_ms=spread,
                             tflops=3 * fl / ms / 1e9))


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


def bench_layer(reps, rows, impls, small=False):
    import flax.linen as nn

    from models.moe import MoE, MoEConfig

    b, s, d, e, k, f, shared = (1, 256, 128, 16, 6, 64, 2) if small else (4, 2048, 2048, 64, 6, 1408, 2)
    t = b * s
    x = jnp.asarray(np.random.default_rng(1).normal(size=(b, s, d)), jnp.bfloat16)
    fwd_flops = t * (6.0 * d * f * (k + shared) + 2.0 * d * e)
    for impl in impls:
        cfg = MoEConfig(num_experts=e, top_k=k, num_shared=shared, expert_dim=f, implementation=impl)
        layer = MoE(cfg, d, jnp.bfloat16)
        v = nn.meta.unbox(jax.jit(lambda key: layer.init(key, x[:1, :8], train=False))(jax.random.key(0)))

        def loss(params, x):
            y, _ = layer.apply({**v, "params": params}, x, train=True, mutable=["stats", "intermediates"])
            return jnp.mean(y.astype(jnp.float32) ** 2)

        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        ms, spread = timeit(step, (v["params"], x), reps)
        rows.append(dict(what=f"MoE layer ({impl})", loads="routed", pass_="fwd+bwd", ms=ms, spread_ms=spread,
                         tflops=3 * fwd_flops / ms / 1e9))
        fwd = jax.jit(lambda p, x: layer.apply({**v, "params": p}, x, train=False))
        ms, spread = timeit(fwd, (v["params"], x), reps)
        rows.append(dict(what=f"MoE layer ({impl})", loads="routed", pass_="fwd", ms=ms, spread_ms=spread,
                         tflops=fwd_flops / ms / 1e9))

    fa = (k + shared) * f
    r = np.random.default_rng(2)
    wd = {n: jnp.asarray(r.normal(size=sh) / np.sqrt(sh[0]), jnp.float32)
          for n, sh in (("g", (d, fa)), ("u", (d, fa)), ("o", (fa, d)))}

    def dense_loss(w, x):
        c = {n: a.astype(jnp.bfloat16) for n, a in w.items()}
        y = (jax.nn.silu(x @ c["g"]) * (x @ c["u"])) @ c["o"]
        return jnp.mean(y.astype(jnp.float32) ** 2)

    step = jax.jit(jax.value_and_grad(dense_loss, argnums=(0, 1)))
    ms, spread = timeit(step, (wd, x.reshape(t, d)), reps)
    dense_flops = t * 6.0 * d * fa
    rows.append(dict(what=f"dense SwiGLU FFN width {fa}", loads="-", pass_="fwd+bwd", ms=ms, spread_ms=spread,
                     tflops=3 * dense_flops / ms / 1e9))


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.bench_moe")
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="fewer tilings and repetitions")
    ap.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke run of this script)")
    args = ap.parse_args(argv)
    reps = 5 if args.quick else 20
    rows = []
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    if args.small:
        bench_gmm(1024, 128, 96, 16, reps, args.quick, rows)
    else:
        bench_gmm(32768, 2048, 1408, 64, reps, args.quick, rows)
    impls = ["triton", "xla"] if backend() == "gpu" and has_jax_triton() else ["xla"]
    bench_layer(reps, rows, impls, args.small)
    print(f"\n{'what':58s} {'loads':8s} {'pass':8s} {'ms':>9s} {'spread':>8s} {'TFLOP/s':>8s}")
    for r in rows:
        if "sweep" in r["what"]:
            continue
        extra = f"  rel_err {r['rel_err']:.1e}" if "rel_err" in r else ""
        print(f"{r['what']:58s} {r['loads']:8s} {r['pass_']:8s} {r['ms']:9.3f} {r['spread_ms']:8.3f} {r['tflops']:8.1f}{extra}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, anchors=ANCHORS, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
