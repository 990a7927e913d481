"""Benchmark the SSD op: `python -m tools.bench_ssd [--sweep] [--set k=v ...] [--out bench.json]` (GPU).

Prints the Triton per-stage breakdown (chunk_cb, chunk_state, state_passing, chunk_scan, backward stages), then
a table of every implementation; --sweep first times each Triton stage group under launch variants (SWEEP) and
keeps the best; --set overrides triton_gpu.CONFIG (tile sizes, warps, stages), e.g. --set scan_bm=128.

Times forward and forward+backward (gradients into x, dt, A, B, C, D) of every implementation that runs on the
backend, for the Mamba-2 shape b8 L8192 h32 P64 N128 g1 chunk 256 in bf16. FLOPs (docs/benchmarks.md conventions):
forward per (batch, chunk) = groups*2Q^2N + heads*(2Q^2P + 4QNP); forward+backward = 3x forward.
Memory: XLA's compiled temp buffer size (scratch beyond inputs and outputs) per jitted function.
"""
from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from kernels.common import backend
from kernels.ssd import ssd
from tools import benchutil

ANCHOR = {"fwd_ms": 1.23, "fwdbwd_ms": 5.23, "what": "mamba_ssm mamba_chunk_scan_combined, H200 (docs/benchmarks.md)"}


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


# Each group is timed alone (the stage's kernels only) under each variant; the best of a group stays in
# triton_gpu.CONFIG for the groups after it. The first variant of each group is the current default (the best
# of the 2026-11-29 sweep, docs/notes/ssd.md); chunk_scan and bwd times include the chunk_cb kernel they call.
SWEEP = {
    "cb": [dict(cb_bm=m, cb_bk=k, cb_warps=w) for m, k, w in [(128, 64, 4), (64, 64, 4)]],
    "chunk_state": [dict(state_warps=w, state_stages=st) for w, st in [(4, 2), (4, 3)]],
    "state_passing": [dict(pass_block=b, pass_warps=w) for b, w in [(256, 4), (128, 4), (512, 4)]],
    "chunk_scan": [dict(scan_bm=bm, scan_bk=bk, scan_warps=w, scan_stages=st) for bm, bk, w, st in
                   [(64, 32, 4, 2), (64, 32, 4, 3), (128, 32, 4, 3)]],
    "bwd": [dict(bwd_blk=b, bwd_warps=w, bwd_stages=st, head_split=hs) for b, w, st, hs in
            [(64, 4, 1, 4), (64, 4, 2, 4), (64, 4, 1, 2)]],
}


def _stage_inputs(args, Q):
    """Chunked inputs and intermediate tensors of one forward+backward, for timing stages alone."""
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
    return dict(xc=xc, dtc=dtc, cs=cs, Bc=Bc, Cc=Cc, init=init, w=w, decay=decay, dyc=dyc, st=st,
                states=states, dstates=dstates, D=D)


def _group_calls(v):
    """Per sweep group: the (function, args) pairs whose summed time ranks its variants."""
    from kernels.ssd import triton_gpu as tg

    rev = lambda *a: tg.state_passing(*a[:3], reverse=True, fwd_states=a[3])
    return {
        "cb": [(tg.chunk_cb, (v["Bc"], v["Cc"]))],
        "chunk_state": [(tg.chunk_state, (v["xc"], v["Bc"], v["w"]))],
        "state_passing": [(tg.state_passing, (v["st"], v["decay"], v["init"])),
                          (rev, (v["st"], v["decay"], v["init"], v["states"]))],
        "chunk_scan": [(tg.chunk_scan, (v["xc"], v["dtc"], v["cs"], v["Bc"], v["Cc"], v["states"], v["D"]))],
        "bwd": [(tg.chunk_bwd_dx_dB, (v["xc"], v["dtc"], v["cs"], v["Bc"], v["Cc"], v["dyc"], v["dstates"],
                                      v["D"])),
                (tg.chunk_bwd_dC, (v["xc"], v["dtc"], v["cs"], v["Bc"], v["Cc"], v["dyc"], v["states"]))],
    }


def sweep_triton(args, Q, reps, groups=None):
    """Times each Triton stage alone under each launch variant; leaves triton_gpu.CONFIG at the best ones."""
    from kernels.ssd import triton_gpu as tg

    calls = _group_calls(_stage_inputs(args, Q))
    log = []
    for group, variants in SWEEP.items():
        if groups and group not in groups:
            continue
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
            print(f"sweep {group} BEST {best[1]}: {best[0]:.3f} ms", flush=True)
    print("best triton CONFIG:", tg.CONFIG, flush=True)
    return log, dict(tg.CONFIG)


def stage_breakdown(args, Q, reps):
    """Each Triton stage alone at the current CONFIG (back-to-back timing, so launch overhead overlapped);
    the XLA glue (cumsum, exp, reductions, reshapes) is the remainder of the end-to-end time."""
    from kernels.ssd import triton_gpu as tg

    v = _stage_inputs(args, Q)
    cb = jax.jit(tg.chunk_cb)(v["Bc"], v["Cc"])
    scan = lambda *a: tg.chunk_scan(*a[:7], cb=a[7])
    dxdb = lambda *a: tg.chunk_bwd_dx_dB(*a[:8], cb=a[8])
    rev = lambda *a: tg.state_passing(*a[:3], reverse=True, fwd_states=a[3])
    rows = [
        ("fwd", "chunk_cb (C B^T per group)", tg.chunk_cb, (v["Bc"], v["Cc"])),
        ("fwd", "chunk_state", tg.chunk_state, (v["xc"], v["Bc"], v["w"])),
        ("fwd", "state_passing", tg.state_passing, (v["st"], v["decay"], v["init"])),
        ("fwd", "chunk_scan (cb given)", scan, (v["xc"], v["dtc"], v["cs"], v["Bc"], v["Cc"], v["states"], v["D"], cb)),
        ("bwd", "chunk_cb (recomputed)", tg.chunk_cb, (v["Bc"], v["Cc"])),
        ("bwd", "chunk_state (dy, C)", tg.chunk_state, (v["dyc"], v["Cc"], v["w"])),
        ("bwd", "state_passing reverse + <dS,S>", rev, (v["st"], v["decay"], v["init"], v["states"])),
        ("bwd", "chunk_bwd_dx_dB (cb given)", dxdb, (v["xc"], v["dtc"], v["cs"], v["Bc"], v["Cc"], v["dyc"],
                                                     v["dstates"], v["D"], cb)),
        ("bwd", "chunk_bwd_dC", tg.chunk_bwd_dC, (v["xc"], v["dtc"], v["cs"], v["Bc"], v["Cc"], v["dyc"],
                                                   v["states"])),
    ]
    out, tot = [], {"fwd": 0.0, "bwd": 0.0}
    print(f"\nTriton stages alone (CONFIG {tg.CONFIG}):", flush=True)
    for part, name, f, a_ in rows:
        ms = timeit(jax.jit(lambda *a, f=f: f(*a)), a_, reps)[0]
        tot[part] += ms
        out.append({"part": part, "stage": name, "ms": ms})
        print(f"  {part} {name:42s} {ms:.3f} ms", flush=True)
    print(f"  sum fwd stages {tot['fwd']:.3f} ms; sum bwd stages {tot['bwd']:.3f} ms", flush=True)
    return out


def _parse_set(items):
    """--set key=value overrides of triton_gpu.CONFIG (ints, true/false, or strings)."""
    out = {}
    for it in items:
        k, _, val = it.partition("=")
        low = val.lower()
        out[k] = True if low == "true" else False if low == "false" else int(val) if val.lstrip("-").isdigit() else val
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shape", default="8,8192,32,64,1,128,256", help="b,L,h,P,g,N,chunk")
    p.add_argument("--impls", default=None, help="comma list; default: all that run here")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--out", default=None)
    p.add_argument("--sweep", action="store_true", help="sweep Triton launch parameters first (GPU)")
    p.add_argument("--groups", default=None, help=f"comma list of sweep groups (default all: {','.join(SWEEP)})")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override triton_gpu.CONFIG before everything, e.g. --set scan_bm=128 bwd_stages=2")
    p.add_argument("--no-stages", action="store_true", help="skip the per-stage breakdown of the Triton path")
    a = p.parse_args(argv)
    b, L, h, P, g, N, Q = (int(v) for v in a.shape.split(","))
    impls = a.impls.split(",") if a.impls else (["triton", "xla"] if backend() == "gpu" else ["xla"])
    args = make(b, L, h, P, g, N, jnp.bfloat16)
    fl = ssd_flops(b, L, h, P, g, N, Q)
    w = jax.random.normal(jax.random.key(9), (b, L, h, P), jnp.float32)
    rows, outs = [], {}
    sweep_log, best_cfg, stages = ([], None, [])
    if "triton" in impls and (a.set or a.sweep or not a.no_stages):
        from kernels.ssd import triton_gpu as tg

        tg.CONFIG.update(_parse_set(a.set))
    if a.sweep and "triton" in impls:
        try:
            groups = a.groups.split(",") if a.groups else None
            sweep_log, best_cfg = sweep_triton(args, Q, max(5, a.reps // 3), groups)
        except Exception as e:  # the sweep is optional; the table below still runs
            print(f"sweep failed: {type(e).__name__}: {str(e)[:1000]}", flush=True)
    if "triton" in impls and not a.no_stages:
        try:
            stages = stage_breakdown(args, Q, max(5, a.reps // 3))
        except Exception as e:
            print(f"stage breakdown failed: {type(e).__name__}: {str(e)[:1000]}", flush=True)
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
    hdr = ("| impl | fwd ms | fwd TFLOP/s | fwd Mtok/s | fwd temp GiB | f+b ms | f+b TFLOP/s | f+b Mtok/s "
           "| f+b temp GiB |")
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
                       "triton_config": best_cfg, "stages": stages}, f, indent=1)


if __name__ == "__main__":
    main()
