"""Benchmark of 2-simplicial attention on one GPU:
`python -m tools.bench_simplicial [--sweep] [--contrast]`.

Paper setting (Roy et al. 2025): w1=512, w2=32, head_dim 128, 64 query heads per K/V head, B=2, S=8192,
bf16. FLOPs count only the two tensor-core GEMMs (FBGEMM's convention): 4*D*w1*w2 per query head per
token forward, the causal ramps (min(i+1, w1), min(i+1, w2)) counted exactly; fwd+bwd = 3.5x fwd.
Times the Triton kernels (forward, two-kernel backward) and the cuDNN backend (one flash-attention call per k2
offset, kernels/simplicial/cudnn_gpu.py); --sweep tries the Triton FWD_SWEEP / BWD_SWEEP launch settings
(~1.5 min with compiles) and the cuDNN GROUP_SWEEP offset-group sizes, and reports the best of each.
--contrast adds the XLA reference (smaller S) and cuDNN causal attention at S = 3*w1*w2 = 49152.
Prints one line per setting as it goes and a table last.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from kernels.simplicial import two_simplicial_attention
from tools import benchutil


def simplicial_flops(b, s, hq, d, w1, w2):
    i = np.arange(s, dtype=np.float64)
    return 4.0 * d * b * hq * float(np.sum(np.minimum(i + 1, w1) * np.minimum(i + 1, w2)))


def bench(fn, *args, reps=10):
    """Median ms of `reps` synchronised calls after two warm-up calls."""
    return benchutil.timeit(fn, args, reps, warmup=2)[0]


def inputs(key, b, s, hq, hkv, d, dtype):
    ks = jax.random.split(key, 6)
    q = jax.random.normal(ks[0], (b, s, hq, d), dtype)
    kv = [jax.random.normal(k, (b, s, hkv, d), dtype) for k in ks[1:5]]
    do = jax.random.normal(ks[5], (b, s, hq, d), dtype)
    return (q, *kv), do


def prefix_check(name, fwd, args, w1, w2, n=256):
    """Sanity at full size: the first n queries only see the first n positions (causal), so they are compared
    with the float32 XLA reference on that prefix. Prints and returns the relative error."""
    out = fwd(*args)
    with jax.default_matmul_precision("highest"):
        ref = two_simplicial_attention(*[x[:, :n].astype(jnp.float32) for x in args], w1=w1, w2=w2,
                                       implementation="xla")
    err = float(jnp.linalg.norm(out[:, :n].astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
    print(f"{name} vs xla (first {n} queries at full size): rel err {err:.2e}; finite {bool(jnp.isfinite(out).all())}")
    return err


def packed_segments(b, s, mean, seed=0):
    """int32 [b, s] document ids 1, 2, ... per row, lengths uniform in [mean/2, 3 mean/2] (the last one cut)."""
    rng = np.random.default_rng(seed)
    out = np.zeros((b, s), np.int32)
    for r in range(b):
        pos, doc = 0, 1
        while pos < s:
            n = int(rng.integers(max(1, mean // 2), 3 * mean // 2 + 1))
            out[r, pos:pos + n] = doc
            pos, doc = pos + n, doc + 1
    return jnp.asarray(out)


def packed_cost(unpacked, packed, args, rounds=3):
    """(packed fwd ms, packed fwd+bwd ms, fwd ratio, fwd+bwd ratio): each a median over `rounds` rounds that time
    the unpacked and the packed function back to back, so clock drift between them cancels in the ratio
    (issue 18: the cost of segment_ids is a few percent, the size of run-to-run drift)."""
    out = []
    for (u, p), reps in zip(zip(unpacked, packed), (5, 3)):
        tp, ratio = [], []
        for _ in range(rounds):
            tu, tp_ = bench(u, *args, reps=reps), bench(p, *args, reps=reps)
            tp.append(tp_)
            ratio.append(tp_ / tu)
        out.append((statistics.median(tp), statistics.median(ratio)))
    (tp, r), (tpb, rb) = out
    return tp, tpb, r, rb


def peak_gib():
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use", 0) / 2**30


# Launch configurations tried by --sweep (the first of each list is the module default). Forward: deeper
# k1/v1 pipelining (stages 4: 128 KB smem), BJ 128 (fewer online-softmax rescales), 4 warps (spills 128 B).
FWD_SWEEP = [dict(BJ=64, ROWS=128, num_warps=8, num_stages=3), dict(BJ=64, ROWS=128, num_warps=8, num_stages=4),
             dict(BJ=128, ROWS=128, num_warps=8, num_stages=2), dict(BJ=128, ROWS=128, num_warps=8, num_stages=3),
             dict(BJ=64, ROWS=128, num_warps=4, num_stages=3)]
# Backward (per-query kernel launch, per-k1-block kernel launch): pipelining, and M = 64 rows (halves the
# per-step register tiles; both kernels spill at M = 128).
BWD_SWEEP = [(dict(BJ=64, ROWS=128, num_warps=8, num_stages=2), dict(BJ=64, ROWS=128, num_warps=8, num_stages=2)),
             (dict(BJ=64, ROWS=128, num_warps=8, num_stages=1), dict(BJ=64, ROWS=128, num_warps=8, num_stages=1)),
             (dict(BJ=64, ROWS=64, num_warps=8, num_stages=2), dict(BJ=64, ROWS=64, num_warps=8, num_stages=2)),
             (dict(BJ=64, ROWS=64, num_warps=8, num_stages=1), dict(BJ=64, ROWS=128, num_warps=8, num_stages=1))]


def _contrast(rows, b, hq, hkv, d, w1, w2, dtype):
    """XLA reference at a smaller sequence; cuDNN causal attention at the FLOP-equivalent context 3*w1*w2."""
    # XLA reference at a smaller sequence.
    sx = 2048
    xargs, xdo = inputs(jax.random.PRNGKey(1), b, sx, hq, hkv, d, dtype)
    fx = lambda *x: two_simplicial_attention(*x, w1=w1, w2=w2, implementation="xla")
    xf = simplicial_flops(b, sx, hq, d, w1, w2)
    try:
        t_xf = bench(jax.jit(fx), *xargs, reps=3)
        t_xb = bench(jax.jit(lambda *x: jax.vjp(fx, *x)[1](xdo)), *xargs, reps=3)
        rows.append(("xla reference", f"B{b} S{sx} Hq{hq} Hkv{hkv} D{d}", t_xf, xf / t_xf / 1e9, t_xb,
                     3.5 * xf / t_xb / 1e9))
    except Exception as e:
        print("xla reference failed:", str(e).splitlines()[0][:200])

    # cuDNN causal attention at the FLOP-equivalent context 3*w1*w2 = 49152 (B1, H16, D128).
    sc, hc = 3 * w1 * w2, 16
    ks = jax.random.split(jax.random.PRNGKey(2), 4)
    qc, kc, vc, dc = (jax.random.normal(k, (1, sc, hc, d), dtype) for k in ks)
    att = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    cf = 4.0 * hc * sc * sc * d / 2
    try:
        t_cf = bench(jax.jit(att), qc, kc, vc)
        t_cb = bench(jax.jit(lambda q, k, v: jax.vjp(att, q, k, v)[1](dc)), qc, kc, vc, reps=5)
        rows.append(("cuDNN causal attention", f"B1 S{sc} H{hc} D{d}", t_cf, cf / t_cf / 1e9, t_cb,
                     3.5 * cf / t_cb / 1e9))
    except Exception as e:
        print("cudnn failed:", str(e).splitlines()[0][:200])



def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true", help="also time the FWD_SWEEP / BWD_SWEEP launch settings")
    ap.add_argument("--contrast", action="store_true", help="also time the XLA reference and cuDNN attention")
    ap.add_argument("--cudnn-sweep", action="store_true",
                    help="time the cuDNN backend's GROUP_SWEEP (the Triton launches at their defaults)")
    ap.add_argument("--profile", action="store_true", help="print the fwd+bwd device time per kernel")
    ap.add_argument("--packed", default="", metavar="L,...",
                    help="also time triton with segment_ids: packed documents of mean length L (issue 18: <= 5%% cost)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    from kernels.simplicial import triton_gpu  # needs triton: GPU machine only
    b, s, hq, hkv, d, w1, w2 = 2, 8192, 64, 1, 128, 512, 32
    dtype = jnp.bfloat16
    args, do = inputs(jax.random.PRNGKey(0), b, s, hq, hkv, d, dtype)
    flops = simplicial_flops(b, s, hq, d, w1, w2)
    rows, log = [], {"flops_fwd": flops, "device": str(jax.devices()[0])}

    def make(impl):
        f = lambda *x: two_simplicial_attention(*x, w1=w1, w2=w2, implementation=impl)
        fwd = jax.jit(f)
        fb = jax.jit(lambda *x: jax.vjp(f, *x)[1](do))
        return fwd, fb

    log["prefix_rel_err"] = prefix_check("triton", make("triton")[0], args, w1, w2)

    sweep = []

    def timed(kind, settings, fn, reps):
        try:
            t = bench(fn, *args, reps=reps)
        except Exception as e:  # a setting that does not compile (shared memory) is skipped
            print(kind, settings, "failed:", str(e).splitlines()[0][:200], flush=True)
            return None
        rate = (1.0 if kind.endswith("fwd") else 3.5) * flops / t / 1e9
        sweep.append((kind, settings, t))
        print(f"{kind:20s} {settings}: {t:.2f} ms  {rate:.0f} TFLOP/s", flush=True)
        return t

    best = None
    for opt in FWD_SWEEP if a.sweep else [triton_gpu.FWD_LAUNCH]:
        triton_gpu.FWD_LAUNCH = opt
        t = timed("fwd", opt, make("triton")[0], 10)
        if t is not None and (best is None or t < best[1]):
            best = (opt, t)
    triton_gpu.FWD_LAUNCH, t_fwd = best
    best_b = None
    for qk in BWD_SWEEP if a.sweep else [(triton_gpu.BWD_Q_LAUNCH, triton_gpu.BWD_K_LAUNCH)]:
        triton_gpu.BWD_Q_LAUNCH, triton_gpu.BWD_K_LAUNCH = qk
        t = timed("fwd+bwd", qk, make("triton")[1], 5)
        if t is not None and (best_b is None or t < best_b[1]):
            best_b = (qk, t)
    (triton_gpu.BWD_Q_LAUNCH, triton_gpu.BWD_K_LAUNCH), t_fb = best_b
    print(f"best fwd+bwd: {t_fb:.2f} ms (bwd ~{t_fb - t_fwd:.2f} ms) with q {triton_gpu.BWD_Q_LAUNCH} "
          f"k {triton_gpu.BWD_K_LAUNCH}")
    print(f"best fwd: {t_fwd:.2f} ms with {triton_gpu.FWD_LAUNCH}")
    if a.profile:
        benchutil.print_device_ops("fwd+bwd (best settings)", benchutil.device_ops(make("triton")[1], args))
    peak = peak_gib()
    log.update(sweep=[(k, str(o), t) for k, o, t in sweep], best_fwd=str(triton_gpu.FWD_LAUNCH),
               best_bwd=(str(best_b[0]), t_fb), peak_gib_after_triton=peak)
    rows.append(("triton", f"B{b} S{s} Hq{hq} Hkv{hkv} D{d}", t_fwd, flops / t_fwd / 1e9, t_fb,
                 3.5 * flops / t_fb / 1e9))
    packed = [(f"docs ~{m}", packed_segments(b, s, m)) for m in (int(x) for x in a.packed.split(",") if x)]
    if packed:  # one document given as segment_ids: the pure masking cost
        packed.insert(0, ("one document", jnp.ones((b, s), jnp.int32)))
    unpacked = make("triton")
    for name, seg in packed:
        f = lambda *x, seg=seg: two_simplicial_attention(*x, w1=w1, w2=w2, segment_ids=seg, implementation="triton")
        pf, pfb = jax.jit(f), jax.jit(lambda *x, f=f: jax.vjp(f, *x)[1](do))
        tp, tpb, r, rb = packed_cost(unpacked, (pf, pfb), args)
        log[f"packed {name}"] = {"fwd_ms": tp, "fwd_bwd_ms": tpb, "fwd_ratio": r, "fwd_bwd_ratio": rb}
        print(f"packed {name:14s}: fwd {tp:.2f} ms ({r:.3f}x), fwd+bwd {tpb:.2f} ms ({rb:.3f}x) the unpacked kernel "
              "timed alternately", flush=True)
        rows.append((f"triton, packed {name}", f"B{b} S{s} Hq{hq} Hkv{hkv} D{d}", tp, flops / tp / 1e9, tpb,
                     3.5 * flops / tpb / 1e9))
    _cudnn(rows, log, a, args, make, timed, flops, (b, s, hq, hkv, d))
    rows.append(("FBGEMM Triton (anchor)", f"B{b} S{s} Hq{hq} Hkv{hkv} D{d}", 28.3, 8.47e12 / 28.3e-3 / 1e12,
                 375.0, 3.5 * 8.47e12 / 375e-3 / 1e12))

    if a.contrast:
        _contrast(rows, b, hq, hkv, d, w1, w2, dtype)

    log["rows"] = rows
    with open(os.path.join(a.out, "bench_simplicial.json"), "w") as fh:
        json.dump(log, fh, indent=1, default=str)
    print(f"\n2-simplicial attention, w1={w1} w2={w2}, bf16, {jax.devices()[0].device_kind}; "
          f"fwd FLOPs {flops / 1e12:.2f} T (tensor-core GEMMs, causal ramp exact), fwd+bwd = 3.5x fwd")
    print(f"{'implementation':32s} {'shape':26s} {'fwd ms':>8s} {'TFLOP/s':>8s} {'fwd+bwd ms':>11s} {'TFLOP/s':>8s}")
    for name, shape, tf, rf, tb, rb in rows:
        print(f"{name:32s} {shape:26s} {tf:8.2f} {rf:8.0f} {tb:11.2f} {rb:8.0f}")
    print(f"peak device memory after the triton runs (inputs included): {peak:.2f} GiB")
    if "peak_gib_after_cudnn" in log:
        print(f"peak device memory after the cudnn runs (inputs included): {log['peak_gib_after_cudnn']:.2f} GiB")


GROUP_SWEEP = [1 << 30, 512 << 20, 256 << 20]  # cudnn_gpu.GROUP_BYTES: 4, 2, 1 offsets per call here


def _cudnn(rows, log, a, args, make, timed, flops, shape):
    """The cuDNN backend: prefix check against the reference, fwd and fwd+bwd per offset-group size."""
    from kernels.simplicial import cudnn_gpu

    b, s, hq, hkv, d = shape
    log["cudnn_prefix_rel_err"] = prefix_check("cudnn", make("cudnn")[0], args, 512, 32)
    best = None
    for g in GROUP_SWEEP if a.sweep or a.cudnn_sweep else [cudnn_gpu.GROUP_BYTES]:
        cudnn_gpu.GROUP_BYTES = g
        fwd, fb = make("cudnn")
        tf = timed("cudnn fwd", f"GROUP_BYTES={g >> 20} MiB", fwd, 10)
        tb = timed("cudnn fwd+bwd", f"GROUP_BYTES={g >> 20} MiB", fb, 5)
        if tf is not None and tb is not None and (best is None or tb < best[2]):
            best = (g, tf, tb)
    g, tf, tb = best
    cudnn_gpu.GROUP_BYTES = g
    print(f"cudnn best: fwd {tf:.2f} ms, fwd+bwd {tb:.2f} ms (bwd ~{tb - tf:.2f}) with GROUP_BYTES {g >> 20} MiB")
    if a.profile:
        benchutil.print_device_ops("cudnn fwd+bwd", benchutil.device_ops(make("cudnn")[1], args))
    log.update(cudnn_best=(g, tf, tb), peak_gib_after_cudnn=peak_gib())
    rows.append(("cudnn (per-offset flash attention)", f"B{b} S{s} Hq{hq} Hkv{hkv} D{d}", tf, flops / tf / 1e9,
                 tb, 3.5 * flops / tb / 1e9))


if __name__ == "__main__":
    main()
