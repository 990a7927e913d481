"""Benchmark the SSD op: `python -m tools.bench_ssd [--out bench.json]` (GPU; prints a table).

Times forward and forward+backward (gradients into x, dt, A, B, C, D) of every implementation that runs on the
backend, for the Mamba-2 shape b8 L8192 h32 P64 N128 g1 chunk 256 in bf16. FLOPs (shared/GPU.md convention):
forward per (batch, chunk) = groups*2Q^2N + heads*(2Q^2P + 4QNP); forward+backward = 3x forward.
Memory: XLA's compiled temp buffer size (scratch beyond inputs and outputs) per jitted function.
"""
from __future__ import annotations

import argparse
import json

import jax

from tools import benchutil
import jax.numpy as jnp
import numpy as np

from kernels.common import backend
from kernels.ssd import ssd

ANCHOR = {"fwd_ms": 1.23, "fwdbwd_ms": 5.23, "what": "mamba_ssm mamba_chunk_scan_combined, H200 (GPU.md)"}


def ssd_flops(b, L, h, P, g, N, Q):
    nc = -(-L // Q)
    return b * nc * (g * 2 * Q * Q * N + h * (2 * Q * Q * P + 4 * Q * N * P))


def make(b, L, h, P, g, N, dtype, seed=0):
    k = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(k[0], (b, L, h, P), dtype)
    dt = jnp.exp(jax.random.uniform(k[1], (b, L, h), jnp.float32, np.log(1e-3), np.log(1e-1))).astype(dtype)
    A = -jax.random.uniform(k[2], (h,), jnp.float32, 1.0, 16.0)
    B = jax.random.normal(k[3], (b, L, g, N), dtype)
    C = jax.random.normal(k[4], (b, L, g, N), dtype)
    D = jnp.ones((h,), jnp.float32)
    return x, dt, A, B, C, D


def timeit(f, args, reps=30, warmup=3):
    return benchutil.timeit(f, args, reps, warmup)


SWEEP = {
    "chunk_scan": [dict(scan_bm=bm, scan_bk=bk, scan_warps=w, scan_stages=st) for bm, bk, w, st in
                   [(64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 2), (128, 64, 8, 2), (128, 64, 4, 2),
                    (128, 128, 8, 2)]],
    "chunk_state": [dict(state_warps=w, state_stages=st) for w, st in [(4, 2), (4, 3), (8, 2)]],
    "state_passing": [dict(pass_block=b) for b in (1024, 256, 2048)],
    "bwd": [dict(bwd_blk=b, bwd_warps=w, bwd_stages=st, head_split=hs) for b, w, st, hs in
            [(64, 8, 2, 4), (64, 4, 2, 4), (64, 8, 3, 4), (64, 8, 2, 8), (64, 8, 2, 2), (64, 8, 2, 1),
             (32, 4, 2, 8), (64, 4, 3, 8)]],
}


def sweep_triton(args, Q, reps):
    """Times each Triton stage alone under each launch variant; leaves triton_gpu.CONFIG at the best ones."""
    from kernels.ssd import api, triton_gpu as tg

    x, dt, A, B, C, D = args
    b, L, h, P = x.shape
    xc, dtc, cs, Bc, Cc = jax.jit(api._chunked, static_argnums=0)(Q, x, dt, A, B, C)
    init = jnp.zeros((b, h, P, B.shape[-1]), jnp.float32)
    w = dtc * jnp.exp(cs[..., -1:] - cs)
    decay = jnp.exp(cs[..., -1])
    dyc = jax.random.normal(jax.random.key(5), xc.shape, xc.dtype)
    st = jax.jit(tg.chunk_state)(xc, Bc, w)
    states = jax.jit(tg.state_passing)(st, decay, init)
    dstates, _ = jax.jit(lambda *a: tg.state_passing(*a, reverse=True, fwd_states=states))(st, decay, init)
    calls = {
        "chunk_state": [(tg.chunk_state, (xc, Bc, w))],
        "state_passing": [(tg.state_passing, (st, decay, init)),
                          (lambda *a: tg.state_passing(*a[:3], reverse=True, fwd_states=a[3]),
                           (st, decay, init, states))],
        "chunk_scan": [(tg.chunk_scan, (xc, dtc, cs, Bc, Cc, states, D))],
        "bwd": [(tg.chunk_bwd_dx_dB, (xc, dtc, cs, Bc, Cc, dyc, dstates, D)),
                (tg.chunk_bwd_dC, (xc, dtc, cs, Bc, Cc, dyc, states))],
    }
    log = []
    for group, variants in SWEEP.items():
        best = None
        for v in variants:
            tg.CONFIG.update(v)
            try:
                ms = sum(timeit(jax.jit(lambda *a, f=f: f(*a)), a_, reps)[0] for f, a_ in calls[group])
            except Exception as e:
                print(f"sweep {group} {v} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            print(f"sweep {group} {v}: {ms:.3f} ms", flush=True)
            log.append({"group": group, "config": dict(v), "ms": ms})
            if best is None or ms < best[0]:
                best = (ms, v)
        if best is not None:
            tg.CONFIG.update(best[1])
    print("best triton CONFIG:", tg.CONFIG, flush=True)
    return log, dict(tg.CONFIG)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shape", default="8,8192,32,64,1,128,256", help="b,L,h,P,g,N,chunk")
    p.add_argument("--impls", default=None, help="comma list; default: all that run here")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--out", default=None)
    p.add_argument("--sweep", action="store_true", help="sweep Triton launch parameters first (GPU)")
    a = p.parse_args(argv)
    b, L, h, P, g, N, Q = (int(v) for v in a.shape.split(","))
    impls = a.impls.split(",") if a.impls else (["triton", "xla"] if backend() == "gpu" else ["xla"])
    args = make(b, L, h, P, g, N, jnp.bfloat16)
    fl = ssd_flops(b, L, h, P, g, N, Q)
    w = jax.random.normal(jax.random.key(9), (b, L, h, P), jnp.float32)
    rows, outs = [], {}
    sweep_log, best_cfg = ([], None)
    if a.sweep and "triton" in impls:
        try:
            sweep_log, best_cfg = sweep_triton(args, Q, max(5, a.reps // 3))
        except Exception as e:  # the sweep is optional; the table below still runs
            print(f"sweep failed: {type(e).__name__}: {str(e)[:1000]}", flush=True)
    for impl in impls:
        fwd = jax.jit(lambda x, dt, A, B, C, D, impl=impl: ssd(x, dt, A, B, C, D=D, chunk_size=Q,
                                                                implementation=impl))
        loss = lambda x, dt, A, B, C, D, impl=impl: jnp.sum(
            ssd(x, dt, A, B, C, D=D, chunk_size=Q, implementation=impl).astype(jnp.float32) * w)
        fb = jax.jit(jax.grad(loss, argnums=tuple(range(6))))
        row = {"impl": impl}
        try:
            for name, f, flops in (("fwd", fwd, fl), ("fwdbwd", fb, 3 * fl)):
                mem = f.lower(*args).compile().memory_analysis()
                ms, spread = timeit(f, args, a.reps)
                row[f"{name}_ms"], row[f"{name}_spread_ms"] = ms, spread
                row[f"{name}_tflops"] = flops / ms / 1e9
                row[f"{name}_temp_gib"] = getattr(mem, "temp_size_in_bytes", float("nan")) / 2**30
                print(impl, name, f"{ms:.3f} ms (spread {spread:.3f})", flush=True)
            outs[impl] = (fwd(*args), fb(*args))
        except Exception as e:  # report and keep measuring the others
            print(f"{impl} failed: {type(e).__name__}: {str(e)[:2000]}", flush=True)
            continue
        row["tokens_per_s_fwd"] = b * L / row["fwd_ms"] * 1e3
        row["tokens_per_s_fwdbwd"] = b * L / row["fwdbwd_ms"] * 1e3
        rows.append(row)
    if "xla" in outs:  # same inputs, so the fast kernel must agree with the reference
        for impl in outs:
            y, gr = outs[impl]
            yr, grr = outs["xla"]
            rel = lambda u, v: float(jnp.linalg.norm((u.astype(jnp.float32) - v.astype(jnp.float32)).ravel())
                                     / jnp.linalg.norm(v.astype(jnp.float32).ravel()))
            errs = [rel(y, yr)] + [rel(u, v) for u, v in zip(gr, grr)]
            next(r for r in rows if r["impl"] == impl)["rel_err_vs_xla(y,dx,ddt,dA,dB,dC,dD)"] = errs
    dev = jax.devices()[0].device_kind
    print(f"\nSSD b{b} L{L} h{h} P{P} N{N} g{g} Q{Q} bf16 on {dev}; fwd {fl / 1e9:.1f} GFLOP, fwd+bwd "
          f"{3 * fl / 1e9:.1f} GFLOP")
    hdr = "| impl | fwd ms | fwd TFLOP/s | fwd Mtok/s | fwd temp GiB | f+b ms | f+b TFLOP/s | f+b Mtok/s | f+b temp GiB |"
    print(hdr)
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['impl']} | {r['fwd_ms']:.3f} | {r['fwd_tflops']:.1f} | {r['tokens_per_s_fwd'] / 1e6:.1f} | "
              f"{r['fwd_temp_gib']:.2f} | {r['fwdbwd_ms']:.3f} | {r['fwdbwd_tflops']:.1f} | "
              f"{r['tokens_per_s_fwdbwd'] / 1e6:.1f} | {r['fwdbwd_temp_gib']:.2f} |")
    print(f"| anchor: {ANCHOR['what']} | {ANCHOR['fwd_ms']} | {fl / ANCHOR['fwd_ms'] / 1e9:.1f} | | | "
          f"{ANCHOR['fwdbwd_ms']} | {3 * fl / ANCHOR['fwdbwd_ms'] / 1e9:.1f} | | |")
    for r in rows:
        if "rel_err_vs_xla(y,dx,ddt,dA,dB,dC,dD)" in r:
            print(r["impl"], "rel err vs xla (y,dx,ddt,dA,dB,dC,dD):",
                  ", ".join(f"{e:.1e}" for e in r["rel_err_vs_xla(y,dx,ddt,dA,dB,dC,dD)"]))
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": dev, "shape": a.shape, "rows": rows, "anchor": ANCHOR, "sweep": sweep_log,
                       "triton_config": best_cfg}, f, indent=1)


if __name__ == "__main__":
    main()
