"""Benchmark kernels.jvp_attention: `python -m tools.bench_jvp_attention [--sweep] [--out FILE]` (GPU).

Times, per implementation (triton, xla), at the EBT gpu preset's attention shape (B16 S512 H8 D64 bf16):
  fwd            (o, lse)
  fwd+bwd        first-order gradients into q, k, v (reverse-mode rule)
  jvp            (o, lse, to, tlse) with a query tangent (forward-mode rule)
  grad-of-jvp    gradients of <w, jvp outputs> into q, k, v, tq (what the EBT's jvp second order runs)
next to the anchor measured in the same run: cuDNN causal flash attention (jax.nn.dot_product_attention)
forward and forward+backward. FLOPs count the GEMMs the kernels execute on the causal half of the scores,
in units of 2*B*H*(S^2/2)*D: fwd 2, fwd+bwd 2+7, jvp 4, grad-of-jvp 4+14. --sweep times grad-of-jvp under
launch variants first and keeps the best.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from kernels.common import backend
from kernels.jvp_attention import IMPLEMENTATIONS, OP, attention
from tools import benchutil

UNITS = {"fwd": 2, "fwd+bwd": 9, "jvp": 4, "grad-of-jvp": 18}
SWEEP = [dict(BM=bm, BN=bn, num_warps=w, num_stages=st)
         for bm, bn, w, st in [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 4, 2), (64, 32, 4, 2)]]


def make(b, s, h, kv, d, dtype, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (b, s, h, d), dtype)
    k = jax.random.normal(ks[1], (b, s, kv, d), dtype)
    v = jax.random.normal(ks[2], (b, s, kv, d), dtype)
    tq = jax.random.normal(ks[3], (b, s, h, d), dtype)
    return q, k, v, tq


def fns(impl):
    """name -> jitted f(q, k, v, tq) for one implementation."""
    def loss(q, k, v):
        o, lse = attention(q, k, v, implementation=impl)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(lse)

    def phi(q, k, v, tq):
        (o, lse), (to, tlse) = jax.jvp(lambda x: attention(x, k, v, implementation=impl, forward_mode=True),
                                       (q,), (tq,))
        return sum(jnp.sum(x.astype(jnp.float32)) for x in (o, lse, to, tlse))

    return {
        "fwd": jax.jit(lambda q, k, v, tq: attention(q, k, v, implementation=impl)),
        "fwd+bwd": jax.jit(lambda q, k, v, tq: jax.grad(loss, argnums=(0, 1, 2))(q, k, v)),
        "jvp": jax.jit(lambda q, k, v, tq: jax.jvp(
            lambda x: attention(x, k, v, implementation=impl, forward_mode=True), (q,), (tq,))),
        "grad-of-jvp": jax.jit(jax.grad(phi, argnums=(0, 1, 2, 3))),
    }


def anchor(q, k, v):
    """cuDNN causal flash attention at the same shape: (fwd ms, fwd+bwd ms)."""
    f = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    g = jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2)))
    return benchutil.timeit(jax.jit(f), (q, k, v))[0], benchutil.timeit(g, (q, k, v))[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_jvp_attention")
    p.add_argument("--shape", default="16,512,8,8,64", help="batch,seq,heads,kv_heads,head_dim")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--sweep", action="store_true", help="time Triton launch variants of grad-of-jvp, keep the best")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    b, s, h, kv, d = (int(x) for x in a.shape.split(","))
    args = make(b, s, h, kv, d, jnp.dtype(a.dtype))
    unit = 2 * b * h * (s * s / 2) * d
    rows = {"device": jax.devices()[0].device_kind, "shape": a.shape, "dtype": a.dtype}
    on_gpu = backend() == "gpu"
    if a.sweep and on_gpu:
        from kernels.jvp_attention import triton_gpu

        best = None
        for launch in SWEEP:
            triton_gpu.FWD_LAUNCH, triton_gpu.BWD_LAUNCH = dict(launch), dict(launch)
            ms = benchutil.timeit(fns("triton")["grad-of-jvp"], args)[0]
            print(f"sweep {launch}: grad-of-jvp {ms:.3f} ms", flush=True)
            best = min(best or (ms, launch), (ms, launch), key=lambda t: t[0])
        triton_gpu.FWD_LAUNCH, triton_gpu.BWD_LAUNCH = dict(best[1]), dict(best[1])
        rows["launch"] = best[1]
    print("| implementation | pass | ms | TFLOP/s (executed GEMMs) |\n|---|---|---|---|")
    for impl in IMPLEMENTATIONS:
        if not OP.supported_on(impl, backend(), head_dim=args[0].shape[-1]):
            continue
        for name, f in fns(impl).items():
            ms = benchutil.timeit(f, args)[0]
            rows[f"{impl}_{name}_ms"] = ms
            print(f"| {impl} | {name} | {ms:.3f} | {UNITS[name] * unit / ms / 1e9:.0f} |", flush=True)
    if on_gpu:
        fa, fb = anchor(*args[:3])
        rows["anchor_cudnn_fwd_ms"], rows["anchor_cudnn_fwdbwd_ms"] = fa, fb
        print(f"| anchor: cuDNN flash (causal) | fwd | {fa:.3f} | {2 * unit / fa / 1e9:.0f} |")
        print(f"| anchor: cuDNN flash (causal) | fwd+bwd | {fb:.3f} | {9 * unit / fb / 1e9:.0f} |")
    benchutil.report(rows, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
