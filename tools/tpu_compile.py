"""TPU readiness on a CPU host: the Pallas kernels and every recipe's train step, lowered (and compiled) for TPU.

    python -m tools.tpu_compile kernels [--chip v5e,v5p,v6e] [--compile]
    python -m tools.tpu_compile recipe NAME [--preset P] [--chip v5p] [--chips 32] [--set KEY=VALUE ...] [--compile]
    python -m tools.tpu_compile recipes [--chip v5p] [--compile]
    python -m tools.tpu_compile estimate

`kernels`: every Pallas kernel's passes (forward, backward; jvp_attention's jvp and grad-of-jvp too) at
production shapes (KERNEL_SHAPES), per chip; one line each with the Mosaic kernels in the program, then the
roofline estimate. `recipe`: one recipe's whole train step on a pod slice (default: TPU_RUNS, 32 chips, the
preset with the mesh it would use there), with the Mosaic kernels in it. `estimate`: the roofline table only.
No TPU is needed. Two levels:

  export (always)    `jax.export` for platforms=["tpu"] under an AbstractMesh whose device is the chip: Pallas ->
      Mosaic lowering with Pallas's block-shape rules, XLA sharding of the step, shard_map checks. Needs only jax.
  --compile          libtpu's compiler on a deviceless topology: Mosaic's own checks (tile-aligned loads, vector
      layouts, VMEM), XLA:TPU's SPMD partitioning and per-chip memory plan (`recipe` prints it). Needs libtpu, which
      scripts/bootstrap.sh installs into .venv/libtpu, outside sys.path (an importable libtpu would make every
      JAX program probe for a TPU); `libtpu_env()` points JAX at it while a compile loads it.

Kernels are traced under kernels.common.target_backend("tpu"), so implementation=None picks the TPU kernels and
Pallas lowers compiled, never in interpret mode (`check_mosaic` asserts both). Estimates are rooflines from FLOP
and byte counts (`kernel_costs`), not measurements: docs/benchmarks.md, "TPU estimates".
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend.core  # noqa: F401  (Jaxpr types for pallas_calls)
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractDevice, AbstractMesh, Mesh, NamedSharding, PartitionSpec as P

from kernels import common

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation: the JAX device kind and Google's datasheet numbers per chip (cloud.google.com/tpu/docs/
    v5e, v5p, v6e): peak dense bf16 FLOP/s, HBM bandwidth (bytes/s) and capacity (bytes); `slice` is a 32-chip
    pod slice's topology (v5p-64 = 2x4x4: 64 TensorCores, 32 chips; v5e-32 / v6e-32 = 4x8)."""

    name: str
    device_kind: str
    cores_per_device: int  # TensorCores behind one JAX device (v5p: megacore)
    dims: int  # topology rank: "AxB" (v5e, v6e) or "AxBxC" (v5p)
    bf16_flops: float
    hbm_bandwidth: float
    hbm_bytes: float
    slice: str


CHIPS = {
    "v5e": Chip("v5e", "TPU v5 lite", 1, 2, 197e12, 819e9, 16e9, "4x8"),
    "v5p": Chip("v5p", "TPU v5", 2, 3, 459e12, 2765e9, 95e9, "2x4x4"),
    "v6e": Chip("v6e", "TPU v6 lite", 1, 2, 918e12, 1640e9, 32e9, "4x8"),
}


def chip(name: str | Chip) -> Chip:
    if isinstance(name, Chip):
        return name
    if name not in CHIPS:
        raise ValueError(f"unknown TPU chip {name!r}; choose one of {sorted(CHIPS)}")
    return CHIPS[name]


# ------------------------------------------------------------------------------------------------ libtpu
def libtpu_path() -> str | None:
    """libtpu.so: $TPU_LIBRARY_PATH, bootstrap's <venv>/libtpu, or an importable libtpu package (a TPU VM)."""
    env = os.environ.get("TPU_LIBRARY_PATH")
    if env and os.path.isfile(env):
        return env
    side = os.path.join(sys.prefix, "libtpu", "libtpu", "libtpu.so")
    if os.path.isfile(side):
        return side
    try:
        import libtpu  # noqa: F401  (on a TPU VM)

        return libtpu.get_library_path()
    except ImportError:
        return None


@contextlib.contextmanager
def libtpu_env():
    """Inside, JAX can load libtpu's compiler for deviceless topologies (the CPU backend stays the default). The
    environment is restored after: processes started later (tests that spawn JAX children) never see libtpu."""
    path = libtpu_path()
    if path is None:
        raise ValueError("--compile needs libtpu: run `make venv` (scripts/bootstrap.sh installs it into "
                         f"{sys.prefix}/libtpu) or set TPU_LIBRARY_PATH to a libtpu.so")
    # A CPU host is no TPU VM: no metadata-server lookups, and no worker list to find; and no chip to guard, so
    # no /tmp/libtpu_lockfile either (two test processes compiling at once failed on it: "ABORTED ... lockfile").
    env = {"TPU_LIBRARY_PATH": path, "TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost",
           "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
           "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3")}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@functools.cache
def topology_devices(chip_name: str, topology: str) -> tuple:
    """Compile-only devices of a TPU slice, e.g. ("v5p", "2x4x4") -> 32 devices; no TPU needed (libtpu)."""
    from jax.experimental import topologies

    c = chip(chip_name)
    dims = parse_topology(c, topology)
    full = dims + (1,) * (3 - len(dims))
    host = tuple(min(d, 2) for d in full[:2]) + (1,)  # the 4-chip host of every generation here
    with libtpu_env():
        topo = topologies.get_topology_desc(topology_name=f"{c.name}:{topology}", platform="tpu",
                                            chip_config_name="default", chips_per_host_bounds=host, num_slices=1)
    return tuple(topo.devices)


def parse_topology(c: Chip, topology: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(x) for x in topology.split("x"))
    except ValueError:
        dims = ()
    if len(dims) != c.dims or min(dims) < 1:
        raise ValueError(f"topology {topology!r} for {c.name} must be {'x'.join('N' * c.dims)} (chips per axis)")
    return dims


def topology_mesh(chip_name: str, topology: str, axis_sizes: Sequence[int], axis_names: Sequence[str]) -> Mesh:
    from jax.experimental import mesh_utils

    devices = topology_devices(chip_name, topology)
    if int(np.prod(axis_sizes)) != len(devices):
        raise ValueError(f"mesh {dict(zip(axis_names, axis_sizes))} needs {int(np.prod(axis_sizes))} devices; "
                         f"{chip_name} {topology} has {len(devices)}")
    return Mesh(mesh_utils.create_device_mesh(tuple(axis_sizes), devices=list(devices)), tuple(axis_names))


def abstract_mesh(chip_name: str, axis_sizes: Sequence[int] = (1,), axis_names: Sequence[str] = ("x",)) -> AbstractMesh:
    c = chip(chip_name)
    dev = AbstractDevice(device_kind=c.device_kind, num_cores=c.cores_per_device, platform="tpu")
    auto = (jax.sharding.AxisType.Auto,) * len(axis_names)  # as Mesh(...) has: sharding constraints are hints
    return AbstractMesh(tuple(axis_sizes), tuple(axis_names), axis_types=auto, abstract_device=dev)


# ------------------------------------------------------------------------------------------ inspection
@dataclasses.dataclass
class MosaicReport:
    kernels: list[str]  # kernel_name of every tpu_custom_call in the module, in order
    pallas_calls: list[tuple[str, bool]]  # (name, interpret) of every pallas_call in the traced program


_KERNEL_NAME = re.compile(r'tpu_custom_call.*?kernel_name = "([^"]+)"')


def mosaic_kernels(module_text: str) -> list[str]:
    """Kernel names of the Mosaic custom calls in a StableHLO / HLO module text."""
    return _KERNEL_NAME.findall(module_text)


def _sub_jaxprs(params):
    for v in params.values():
        for x in v if isinstance(v, (list, tuple)) else (v,):
            if isinstance(x, jax.extend.core.ClosedJaxpr):
                yield x.jaxpr
            elif isinstance(x, jax.extend.core.Jaxpr):
                yield x


def pallas_calls(jaxpr) -> list[tuple[str, bool]]:
    """(kernel name, interpret flag) of every pallas_call in a (closed) jaxpr, sub-jaxprs included."""
    out = []
    stack = [getattr(jaxpr, "jaxpr", jaxpr)]
    while stack:
        j = stack.pop()
        for eqn in j.eqns:
            if eqn.primitive.name == "pallas_call":
                name = eqn.params.get("name") or getattr(eqn.params.get("name_and_src_info"), "name", None)
                out.append((str(name), bool(eqn.params.get("interpret"))))
            stack.extend(_sub_jaxprs(eqn.params))
    return out


def check_mosaic(report: MosaicReport, expected: Sequence[str] = ()) -> None:
    """Every Pallas kernel lowered to a compiled Mosaic custom call (none traced in interpret mode, every custom
    call one of the traced pallas_calls; dead ones may be gone), and every name in `expected` is among them;
    raises AssertionError naming what is wrong."""
    interpreted = sorted({n for n, interp in report.pallas_calls if interp})
    assert not interpreted, f"Pallas kernels traced in interpret mode (no Mosaic): {interpreted}"
    stray = sorted(set(report.kernels) - {n for n, _ in report.pallas_calls})
    assert not stray, f"Mosaic custom calls {stray} are none of the traced pallas_calls {report.pallas_calls}"
    missing = sorted(set(expected) - set(report.kernels))
    assert not missing, f"expected Mosaic kernels {missing} not in the program (have {sorted(set(report.kernels))})"


def kernel_counts(names: Sequence[str]) -> str:
    counts: dict[str, int] = {}
    for k in names:
        counts[k] = counts.get(k, 0) + 1
    return ", ".join(f"{k} x{n}" for k, n in sorted(counts.items())) or "none"


# --------------------------------------------------------------------------------------------- programs
def export_for_tpu(fn: Callable, *args, chip_name: str = "v5p") -> tuple[jax.export.Exported, MosaicReport]:
    """jax.export of jit(fn) for TPU on any host: args are arrays or ShapeDtypeStructs (no shardings: one chip)."""
    with jax.sharding.use_abstract_mesh(abstract_mesh(chip_name)), common.target_backend("tpu"):
        jitted = jax.jit(fn)
        traced = jitted.trace(*args)
        exported = jax.export.export(jitted, platforms=["tpu"])(*args)
    return exported, MosaicReport(mosaic_kernels(exported.mlir_module()), pallas_calls(traced.jaxpr))


@contextlib.contextmanager
def _not_persisted():
    """Keeps libtpu's deviceless executables out of JAX's persistent compilation cache (the tests set one): a
    process without a TPU client cannot read them back, and they are big."""
    key = "jax_persistent_cache_min_compile_time_secs"
    old = getattr(jax.config, key)
    jax.config.update(key, 1e12)
    try:
        yield
    finally:
        jax.config.update(key, old)


def compile_exported(exported: jax.export.Exported, chip_name: str = "v5p"):
    """Compiles an exported one-chip TPU program with libtpu (Mosaic's checks run here) -> jax Compiled."""
    mesh = topology_mesh(chip_name, "x".join(["1"] * chip(chip_name).dims), (1,), ("x",))
    rep = NamedSharding(mesh, P())
    args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep) for a in exported.in_avals]
    with _not_persisted():
        return jax.jit(exported.call).lower(*args).compile()


# ------------------------------------------------------------------------------------- kernel programs
S = jax.ShapeDtypeStruct
BF16 = jnp.bfloat16

# Production shapes: the GPU benchmarks' anchors (docs/benchmarks.md), bf16.
KERNEL_SHAPES = {
    "simplicial": dict(b=2, s=8192, hq=64, hkv=1, d=128, w1=512, w2=32),  # Roy et al.'s setting
    "ssd": dict(b=8, L=8192, h=32, P=64, g=1, N=128, Q=256),  # Mamba-2 (bench_ssd)
    "grouped_matmul": dict(m=32768, k=2048, n=1408, G=64),  # 64 experts, uniform loads (bench_moe)
    "jvp_attention": dict(b=16, s=512, h=8, kv=8, d=64),  # the EBT gpu preset's attention (bench_jvp_attention)
}


@dataclasses.dataclass
class KernelCase:
    """One op at its production shape: `args` (ShapeDtypeStructs: inputs, then the cotangent / tangent inputs the
    passes read), `passes` {pass: (fn(*args), Mosaic kernels expected in its program)}; `full` returns every pass's
    outputs in one program (what --compile compiles: every kernel of the op, one compile per chip)."""

    op: str
    args: tuple
    passes: dict[str, tuple[Callable, tuple[str, ...]]]

    def full(self, *args):
        return tuple(fn(*args) for fn, _ in self.passes.values())

    @property
    def kernels(self) -> tuple[str, ...]:
        return tuple(sorted({k for _, ks in self.passes.values() for k in ks}))


def _vjp_of(f, nargs: int):
    """(*args, ct) -> gradients of <f(*args[:nargs]), ct> (f's first output if it has several)."""

    def g(*a):
        def loss(*x):
            out = f(*x)
            out = out[0] if isinstance(out, tuple) else out
            return jnp.vdot(out.astype(jnp.float32), a[nargs].astype(jnp.float32))

        return jax.grad(loss, argnums=tuple(range(nargs)))(*a[:nargs])

    return g


def kernel_cases() -> dict[str, KernelCase]:
    from kernels import jvp_attention as ja
    from kernels.grouped_matmul import grouped_matmul
    from kernels.simplicial import two_simplicial_attention
    from kernels.ssd import ssd

    cases = {}
    c = KERNEL_SHAPES["simplicial"]
    q, kv = S((c["b"], c["s"], c["hq"], c["d"]), BF16), S((c["b"], c["s"], c["hkv"], c["d"]), BF16)
    simp = lambda *a, c=c: two_simplicial_attention(*a[:5], w1=c["w1"], w2=c["w2"])  # noqa: E731
    cases["simplicial"] = KernelCase("simplicial", (q, kv, kv, kv, kv, q), {
        "fwd": (simp, ("simplicial_fwd",)),
        "bwd": (_vjp_of(simp, 5), ("simplicial_fwd", "simplicial_bwd_q", "simplicial_bwd_k1")),
    })

    c = KERNEL_SHAPES["ssd"]
    x = S((c["b"], c["L"], c["h"], c["P"]), BF16)
    bc = S((c["b"], c["L"], c["g"], c["N"]), BF16)
    ssd_f = lambda *a, c=c: ssd(*a[:5], chunk_size=c["Q"], D=a[5])  # noqa: E731
    cases["ssd"] = KernelCase("ssd", (x, S(x.shape[:3], BF16), S((c["h"],), jnp.float32), bc, bc,
                                      S((c["h"],), jnp.float32), x), {
        "fwd": (ssd_f, ("ssd_chunk_state", "ssd_chunk_scan")),
        "bwd": (_vjp_of(ssd_f, 6), ("ssd_chunk_state", "ssd_bwd_dx_dB", "ssd_bwd_dC")),
    })

    c = KERNEL_SHAPES["grouped_matmul"]
    gmm = lambda *a: grouped_matmul(*a[:3])  # noqa: E731

    def gmm_bwd(lhs, rhs, gs, ct):
        return jax.grad(lambda l, r: jnp.vdot(gmm(l, r, gs).astype(jnp.float32), ct.astype(jnp.float32)),
                        argnums=(0, 1))(lhs, rhs)

    cases["grouped_matmul"] = KernelCase("grouped_matmul", (
        S((c["m"], c["k"]), BF16), S((c["G"], c["k"], c["n"]), BF16), S((c["G"],), jnp.int32),
        S((c["m"], c["n"]), BF16)), {
        "fwd": (gmm, ("grouped_matmul_gmm",)),
        "bwd": (gmm_bwd, ("grouped_matmul_gmm", "grouped_matmul_tgmm")),
    })

    c = KERNEL_SHAPES["jvp_attention"]
    qa, ka = S((c["b"], c["s"], c["h"], c["d"]), BF16), S((c["b"], c["s"], c["kv"], c["d"]), BF16)
    att = lambda *a: ja.attention(*a[:3])  # noqa: E731

    def jvp(q, k, v, ct, tq):  # forward mode: the tangent along q (the EBT's candidate)
        return jax.jvp(lambda q_: ja.attention(q_, k, v, forward_mode=True), (q,), (tq,))

    def grad_jvp(q, k, v, ct, tq):  # the EBT's jvp second order: reverse mode through the jvp
        def loss(q, k, v, tq):
            return jnp.vdot(jvp(q, k, v, ct, tq)[1][0].astype(jnp.float32), ct.astype(jnp.float32))

        return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, tq)

    cases["jvp_attention"] = KernelCase("jvp_attention", (qa, ka, ka, qa, qa), {
        "fwd": (att, ("jvp_attention_fwd",)),
        "bwd": (_vjp_of(att, 3), ("jvp_attention_fwd", "jvp_attention_bwd_q", "jvp_attention_bwd_kv")),
        "jvp": (jvp, ("jvp_attention_fwd_tangent",)),
        "grad_jvp": (grad_jvp, ("jvp_attention_fwd_tangent", "jvp_attention_bwd_q_tangent",
                                "jvp_attention_bwd_kv_tangent")),
    })
    return cases


# ------------------------------------------------------------------------------------------- estimates
@dataclasses.dataclass(frozen=True)
class Cost:
    """One pallas_call of one pass: MXU FLOPs it executes (padded tiles and masked blocks included), the HBM
    bytes its BlockSpecs move (a block is fetched whenever its index changes between grid steps), and the MXU
    passes per FLOP: 1 for bf16 operands, 6 for float32 operands at Precision.HIGHEST (kernels.common.mxu_dot:
    six bf16 passes on a TPU)."""

    op: str
    pass_: str
    kernel: str
    flops: float
    bytes: float
    mxu_passes: int = 1

    def seconds(self, c: Chip) -> float:
        return max(self.flops * self.mxu_passes / c.bf16_flops, self.bytes / c.hbm_bandwidth)

    def mxu_bound(self, c: Chip) -> bool:
        return self.flops * self.mxu_passes / c.bf16_flops >= self.bytes / c.hbm_bandwidth


def kernel_costs() -> list[Cost]:
    """FLOP and byte counts of every kernel pass at KERNEL_SHAPES (bf16 operands; f32 statistics and the
    accumulators the kernels write as f32), from each kernel's own tiling. A backward pass counts its backward
    kernels only (the forward's are in "fwd"; the EBT's grad-of-jvp is "jvp" + "grad_jvp"). XLA glue around the
    kernels (layout transposes, the SSD state recurrence, simplicial's diagonal sum of t2/u2) is not counted."""
    from kernels.jvp_attention import pallas_tpu as ja_tpu
    from kernels.simplicial import pallas_tpu as simp_tpu

    e, f4 = 2, 4
    out: list[Cost] = []

    # 2-simplicial: grid (b, kv, query tile) forward / dq kernel, (b, kv, k1 block, query chunk) dk1/dv1 kernel.
    c = KERNEL_SHAPES["simplicial"]
    b, s, d, hkv = c["b"], c["s"], c["d"], c["hkv"]
    g = c["hq"] // hkv
    tq, bj, w1p, w2p = simp_tpu._tiles(s, c["w1"], c["w2"])
    a, tc = 16, min(32, bj)
    sq, sj = common.round_up(s, tq), common.round_up(s, bj)
    nt, nb, nc = sq // tq, sj // bj, (bj + w1p) // tc
    win1, win2, win2c = (tq + 2 * w1p + a) * d * e, (tq + 2 * w2p + a) * d * e, (tc + 2 * w2p + a) * d * e
    rows = tq * g * d * e
    out.append(Cost("simplicial", "fwd", "simplicial_fwd", b * hkv * sq * 4 * g * w2p * w1p * d,
                    b * hkv * nt * (2 * rows + 2 * win1 + 2 * win2 + tq * g * f4)))
    out.append(Cost("simplicial", "bwd", "simplicial_bwd_q", b * hkv * sq * 8 * g * w2p * w1p * d,
                    b * hkv * nt * (3 * rows + 2 * win1 + 2 * win2 + 2 * tq * g * f4 + 2 * tq * w2p * d * f4)))
    out.append(Cost("simplicial", "bwd", "simplicial_bwd_k1", b * hkv * nb * (bj + w1p) * 8 * g * w2p * bj * d,
                    b * hkv * nb * (nc * (2 * tc * g * d * e + 2 * win2c + 2 * tc * g * f4) + 4 * bj * d * e)))

    # SSD: one program per (batch, chunk, head), heads innermost: a group's B / C blocks are fetched once for
    # its heads. The dB / dC kernels write per-head float32 rows (summed over the group's heads in XLA). Every
    # product is float32 (the kernels upcast their bf16 blocks): 6 MXU passes.
    c = KERNEL_SHAPES["ssd"]
    b, h, P_, N, Q = c["b"], c["h"], c["P"], c["N"], c["Q"]
    progs, gprogs = b * h * (c["L"] // Q), b * c["g"] * (c["L"] // Q)
    xq, bq, sc, st = Q * P_ * e, Q * N * e, Q * f4, P_ * N * f4
    state = Cost("ssd", "fwd", "ssd_chunk_state", progs * 2 * Q * P_ * N, progs * (xq + sc + st) + gprogs * bq, 6)
    out.append(state)
    out.append(Cost("ssd", "fwd", "ssd_chunk_scan", progs * (2 * Q * Q * N + 2 * Q * Q * P_ + 2 * Q * N * P_),
                    progs * (2 * xq + 2 * sc + st) + gprogs * 2 * bq, 6))
    out.append(dataclasses.replace(state, pass_="bwd"))  # the reverse state recurrence's chunk states (dy, C)
    out.append(Cost("ssd", "bwd", "ssd_bwd_dx_dB", progs * (4 * Q * Q * N + 4 * Q * Q * P_ + 4 * Q * N * P_),
                    progs * (3 * xq + 4 * sc + st + Q * N * f4) + gprogs * 2 * bq, 6))
    out.append(Cost("ssd", "bwd", "ssd_bwd_dC", progs * (2 * Q * Q * N + 2 * Q * Q * P_ + 2 * Q * N * P_),
                    progs * (2 * xq + 3 * sc + st + Q * N * f4) + gprogs * 2 * bq, 6))

    # Grouped matmul, tiles (tm, tk, tn) = pallas_tpu.Tiling(): gmm grid (n tile, visit, k tile) re-reads the
    # lhs row tile for every n tile and rhs[g] for every row tile of g; tgmm grid (k tile, n tile, visit).
    from kernels.grouped_matmul.pallas_tpu import Tiling

    c = KERNEL_SHAPES["grouped_matmul"]
    m, k, n = c["m"], c["k"], c["n"]
    t = Tiling()
    visits = m // t.tm  # uniform loads of m / G rows, a multiple of tm: no tile shared by two groups

    def gmm_cost(pass_, kk, nn):
        return Cost("grouped_matmul", pass_, "grouped_matmul_gmm", 2 * m * kk * nn,
                    common.cdiv(nn, t.tn) * visits * common.cdiv(kk, t.tk) * (t.tm * t.tk + t.tk * t.tn) * e
                    + m * nn * e)

    out.append(gmm_cost("fwd", k, n))
    out.append(gmm_cost("bwd", n, k))  # dlhs = dout @ rhs^T
    out.append(Cost("grouped_matmul", "bwd", "grouped_matmul_tgmm", 2 * m * k * n,
                    common.cdiv(k, t.tk) * common.cdiv(n, t.tn) * visits * (t.tm * t.tk + t.tm * t.tn) * e
                    + c["G"] * k * n * e))

    # jvp_attention: grid (b, kv, tile); the causal loops visit nt (nt + 1) / 2 (query tile, key tile) pairs;
    # whole-sequence blocks (K/V forward, the query side in the dk/dv kernel) are fetched once per (b, kv).
    c = KERNEL_SHAPES["jvp_attention"]
    b, s, d, kvh = c["b"], c["s"], c["d"], c["kv"]
    g = c["h"] // kvh
    tt = min(ja_tpu.MAX_TILE, common.round_up(s, 8))
    sp = common.round_up(s, tt)
    pairs = (sp // tt) * (sp // tt + 1) // 2
    mm = 2 * tt * g * tt * d  # one [T*G, D] x [D, T] tile product
    qs, ks, st = sp * g * d * e, sp * d * e, sp * g * f4  # one query-side / key-side tensor, one row statistic
    for tangent in (False, True):
        x = 2 if tangent else 1  # the tangent doubles the query-side tensors, statistics and tile products
        sfx, passes = ("_tangent", ("jvp", "grad_jvp")) if tangent else ("", ("fwd", "bwd"))
        out.append(Cost("jvp_attention", passes[0], "jvp_attention_fwd" + sfx, b * kvh * pairs * 2 * x * mm,
                        b * kvh * (x * (2 * qs + st) + 2 * ks + sp * f4)))  # q[, tq] in; o, lse[, to, tlse] out
        ins = 2 * x * qs + 2 * x * st + 2 * ks + sp * f4  # q, go[, tq, gto]; lse, r[, tlse, gd]; k, v; seg
        out.append(Cost("jvp_attention", passes[1], "jvp_attention_bwd_q" + sfx, b * kvh * pairs * 3 * x * mm,
                        b * kvh * (ins + x * qs)))
        out.append(Cost("jvp_attention", passes[1], "jvp_attention_bwd_kv" + sfx, b * kvh * pairs * 4 * x * mm,
                        b * kvh * (ins + 2 * ks)))
    return out


def estimate_table(costs: Sequence[Cost] | None = None, chips: Sequence[str] = tuple(CHIPS)) -> str:
    """Markdown: per op and pass, FLOPs, bytes, arithmetic intensity and the roofline time on each chip."""
    costs = kernel_costs() if costs is None else costs
    shapes = {op: ", ".join(f"{k}={v}" for k, v in KERNEL_SHAPES[op].items()) for op in KERNEL_SHAPES}
    groups: dict[tuple[str, str], list[Cost]] = {}
    for cost in costs:
        groups.setdefault((cost.op, cost.pass_), []).append(cost)
    head = "| op (shape, bf16) | pass | kernels | GFLOP | MXU passes | GB | FLOP/B | " + " | ".join(
        f"{c} ms (bound)" for c in chips) + " |"
    lines = [head, "|" + "---|" * (7 + len(chips))]
    for (op, pass_), cs in groups.items():
        flops, nbytes = sum(x.flops for x in cs), sum(x.bytes for x in cs)
        cells = []
        for name in chips:
            ch = chip(name)
            secs = sum(x.seconds(ch) for x in cs)
            bounds = {"MXU" if x.mxu_bound(ch) else "HBM" for x in cs}
            cells.append(f"{secs * 1e3:.2f} ({'/'.join(sorted(bounds))})")
        passes = "/".join(str(p) for p in sorted({x.mxu_passes for x in cs}))
        lines.append(f"| {op} ({shapes[op]}) | {pass_} | {', '.join(x.kernel for x in cs)} | {flops / 1e9:,.0f} | "
                     f"{passes} | {nbytes / 1e9:.2f} | {flops / nbytes:,.0f} | " + " | ".join(cells) + " |")
    peaks = "; ".join(f"{c}: {chip(c).bf16_flops / 1e12:.0f} TFLOP/s bf16, {chip(c).hbm_bandwidth / 1e9:.0f} GB/s HBM"
                      for c in chips)
    return "\n".join(lines) + f"\n\nRoofline per chip ({peaks}); time = sum over the pass's kernels of " \
                              "max(FLOPs x MXU passes / peak, bytes / bandwidth). An estimate, not a measurement."


# ---------------------------------------------------------------------------------------- train steps
# Each recipe as it would run on a 32-chip pod slice (v5p-64 = 2x4x4): its production preset, the mesh axes
# that preset's layers shard over (fsdp x tensor for dense stacks, fsdp x expert for MoE), the global batch a
# multiple of the data-parallel size; the EBT also with its fused predicted-stream kernels (`pallas`; None picks
# jnp on a TPU until the kernels are measured there).
_FSDP_TP = ("mesh.data=1", "mesh.fsdp=8", "mesh.tensor=4")
_FSDP_EP = ("mesh.data=1", "mesh.fsdp=4", "mesh.expert=8", "data.global_batch_size=32")
TPU_RUNS: dict[str, tuple[str, str, tuple[str, ...], tuple[str, ...]]] = {
    # name: (recipe, preset, overrides, Mosaic kernels expected in the step)
    "dense_lm": ("dense_lm", "gpu_1b", _FSDP_TP, ()),
    "moe": ("moe", "gpu_0p8b", _FSDP_EP, ("grouped_matmul_gmm", "grouped_matmul_tgmm")),
    "moe_mla": ("moe", "deepseek_v3_gpu", _FSDP_EP, ("grouped_matmul_gmm", "grouped_matmul_tgmm")),
    "simplicial": ("simplicial", "gpu_1b", _FSDP_TP, ("simplicial_fwd", "simplicial_bwd_q", "simplicial_bwd_k1")),
    "mamba2": ("mamba2", "gpu_340m", _FSDP_TP,
               ("ssd_chunk_state", "ssd_chunk_scan", "ssd_bwd_dx_dB", "ssd_bwd_dC")),
    "ebt": ("ebt", "gpu", _FSDP_TP, ()),
    "ebt_pallas": ("ebt", "gpu", _FSDP_TP + ("model.layer_pattern.*.predicted=pallas",),
                   ("jvp_attention_fwd_tangent", "jvp_attention_bwd_q_tangent", "jvp_attention_bwd_kv_tangent")),
    "ebt_denoise": ("ebt_denoise", "default", _FSDP_TP, ()),
}


def recipe_config(recipe: str, preset: str = "default", overrides: Sequence[str] = ()):
    from axlearn_like import config as config_lib

    try:
        mod = importlib.import_module(f"recipes.{recipe}")
    except ModuleNotFoundError as e:
        raise ValueError(f"no recipe {recipe!r} (recipes/{recipe}.py)") from e
    presets = getattr(mod, "PRESETS", {"default": mod.config})
    if preset not in presets:
        raise ValueError(f"recipe {recipe} has no preset {preset!r}; choose one of {sorted(presets)}")
    return config_lib.apply_overrides(presets[preset](), list(overrides))


def tpu_run_config(name: str, extra: Sequence[str] = ()):
    """The config of TPU_RUNS[name] (plus `extra` overrides) and its expected Mosaic kernels."""
    if name not in TPU_RUNS:
        raise ValueError(f"no TPU run {name!r}; choose one of {sorted(TPU_RUNS)}")
    recipe, preset, overrides, expected = TPU_RUNS[name]
    return recipe_config(recipe, preset, (*overrides, *extra)), expected


def _step_program(cfg, mesh):
    """(jitted train step, abstract state, abstract batch) on `mesh` (concrete or abstract), traced for TPU."""
    import flax.linen as nn

    from axlearn_like import sharding as sharding_lib
    from axlearn_like.state_setup import build_state_setup
    from axlearn_like.train_step import make_train_step

    setup = build_state_setup(cfg, mesh=mesh)
    with sharding_lib.use_mesh(mesh), nn.logical_axis_rules(setup.rules):
        step, batch_sh = make_train_step(setup, cfg)
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh[k]) for k, v in setup.batch_spec.items()}
        return step, setup, batch


@dataclasses.dataclass
class TrainStepReport:
    chip: Chip
    topology: str
    mesh: dict
    mosaic: MosaicReport
    lower_s: float  # trace + lower (export)
    memory: Any = None  # CompiledMemoryStats per device (--compile)
    compile_s: float | None = None  # trace + lower + compile (--compile)

    @property
    def hbm_per_chip(self) -> int:
        """Bytes XLA plans per device: arguments + outputs + temporaries - donated aliases (+ generated code)."""
        m = self.memory
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                   - m.alias_size_in_bytes + m.generated_code_size_in_bytes)

    def summary(self) -> str:
        line = f"{self.chip.name} {self.topology} mesh {self.mesh}: "
        if self.memory is None:
            line += f"lowered in {self.lower_s:.1f} s; "
        else:
            line += (f"compiled in {self.compile_s:.1f} s ({self.lower_s:.1f} s tracing and lowering); "
                     f"HBM per chip {self.hbm_per_chip / GIB:.2f} GiB of {self.chip.hbm_bytes / GIB:.1f} GiB "
                     f"(args {self.memory.argument_size_in_bytes / GIB:.2f}, temp "
                     f"{self.memory.temp_size_in_bytes / GIB:.2f}); ")
        return line + f"Mosaic kernels: {kernel_counts(self.mosaic.kernels)}"


def _mesh_sizes(cfg, num_chips: int) -> dict[str, int]:
    from axlearn_like import sharding as sharding_lib

    return sharding_lib.axis_sizes(cfg.mesh, num_chips)


def export_train_step(
    cfg, *, chip_name: str = "v5p", num_chips: int = 32
) -> tuple[jax.export.Exported, TrainStepReport]:
    """jax.export of the experiment's whole train step for a pod slice of `num_chips` chips (an AbstractMesh of
    cfg.mesh's axes; no devices, no libtpu): XLA sharding annotations, the kernels' shard_maps and the Pallas ->
    Mosaic lowering of every kernel at its per-chip shapes."""
    from axlearn_like import sharding as sharding_lib

    sizes = _mesh_sizes(cfg, num_chips)
    mesh = abstract_mesh(chip_name, [sizes[a] for a in sharding_lib.MESH_AXES], sharding_lib.MESH_AXES)
    t0 = time.perf_counter()
    with common.target_backend("tpu"):
        step, setup, batch = _step_program(cfg, mesh)
        with sharding_lib.use_mesh(mesh):
            traced = step.trace(setup.abstract_state, batch)
            exported = jax.export.export(step, platforms=["tpu"])(setup.abstract_state, batch)
    report = MosaicReport(mosaic_kernels(exported.mlir_module()), pallas_calls(traced.jaxpr))
    c = chip(chip_name)
    return exported, TrainStepReport(c, f"{num_chips} chips", {k: v for k, v in sizes.items() if v > 1}, report,
                                     time.perf_counter() - t0)


def compile_train_step(cfg, *, chip_name: str = "v5p", topology: str | None = None) -> TrainStepReport:
    """Builds the experiment's sharded state and train step on a deviceless TPU slice (libtpu) and compiles it
    (XLA SPMD over cfg.mesh, Mosaic for the Pallas kernels): the per-chip memory plan. Raises ValueError
    (ConfigError) for a mesh that does not fit the slice."""
    from axlearn_like import sharding as sharding_lib

    topology = topology or chip(chip_name).slice
    devices = topology_devices(chip_name, topology)
    sizes = _mesh_sizes(cfg, len(devices))
    mesh = topology_mesh(chip_name, topology, [sizes[a] for a in sharding_lib.MESH_AXES], sharding_lib.MESH_AXES)
    t0 = time.perf_counter()
    with common.target_backend("tpu"):
        step, setup, batch = _step_program(cfg, mesh)
        with sharding_lib.use_mesh(mesh):
            traced = step.trace(setup.abstract_state, batch)
            lowered = traced.lower()
    t_lower = time.perf_counter() - t0
    with _not_persisted():
        compiled = lowered.compile()
    report = MosaicReport(mosaic_kernels(lowered.as_text()), pallas_calls(traced.jaxpr))
    return TrainStepReport(chip(chip_name), topology, {k: v for k, v in sizes.items() if v > 1}, report, t_lower,
                           compiled.memory_analysis(), time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------------- CLI
def _chips(arg: str) -> list[str]:
    names = [c.strip() for c in arg.split(",") if c.strip()]
    for n in names:
        chip(n)
    return names


def _run_kernels(chips: Sequence[str], compile_: bool) -> int:
    failed = 0
    for op, case in kernel_cases().items():
        for name in chips:
            for pass_, (fn, expected) in case.passes.items():
                t0 = time.perf_counter()
                try:
                    _, report = export_for_tpu(fn, *case.args, chip_name=name)
                    check_mosaic(report, expected)
                    print(f"{op} {pass_} {name}: lowered ({time.perf_counter() - t0:.1f} s): "
                          f"{kernel_counts(report.kernels)}", flush=True)
                except Exception as e:  # noqa: BLE001 - one line per failing program, then the rest
                    failed += 1
                    print(f"{op} {pass_} {name}: FAILED: {type(e).__name__}: {str(e)[:2000]}", flush=True)
            if compile_:
                t0 = time.perf_counter()
                try:
                    exported, _ = export_for_tpu(case.full, *case.args, chip_name=name)
                    compile_exported(exported, name)
                    print(f"{op} all passes {name}: compiled by libtpu ({time.perf_counter() - t0:.1f} s)", flush=True)
                except Exception as e:  # noqa: BLE001
                    failed += 1
                    print(f"{op} all passes {name}: compile FAILED: {type(e).__name__}: {str(e)[:2000]}", flush=True)
    print()
    print(estimate_table())
    return 1 if failed else 0


def _run_recipe(name: str, cfg, expected, chip_name: str, chips: int, topology: str | None, compile_: bool) -> bool:
    try:
        if compile_:
            report = compile_train_step(cfg, chip_name=chip_name, topology=topology)
        else:
            report = export_train_step(cfg, chip_name=chip_name, num_chips=chips)[1]
        check_mosaic(report.mosaic, expected)
    except (ValueError, AssertionError, NotImplementedError) as e:
        print(f"{name}: FAILED: {type(e).__name__}: {str(e)[:2000]}", flush=True)
        return False
    print(f"{name}: {report.summary()}", flush=True)
    if report.memory is not None and report.hbm_per_chip > report.chip.hbm_bytes:
        print(f"{name}: error: the step needs {report.hbm_per_chip / GIB:.1f} GiB per chip, more than the "
              f"{report.chip.hbm_bytes / GIB:.1f} GiB of a {report.chip.name}", flush=True)
        return False
    return True


def main(argv=None) -> int:
    from axlearn_like.cli import tool_main

    @tool_main
    def run(argv):
        p = argparse.ArgumentParser(prog="python -m tools.tpu_compile", description=__doc__.split("\n\n")[0])
        sub = p.add_subparsers(dest="cmd", required=True)
        k = sub.add_parser("kernels", help="lower (--compile: and compile) every Pallas kernel pass; roofline table")
        k.add_argument("--chip", default="v5e,v5p,v6e", help="comma-separated: v5e, v5p, v6e")
        k.add_argument("--compile", action="store_true", help="also compile each op's passes with libtpu")
        sub.add_parser("estimate", help="the roofline estimate table of every kernel pass")
        for cmd in ("recipe", "recipes"):
            r = sub.add_parser(cmd, help="one recipe's train step on a pod slice" if cmd == "recipe"
                               else f"every TPU run ({', '.join(TPU_RUNS)})")
            if cmd == "recipe":
                r.add_argument("name", help=f"a TPU run ({', '.join(TPU_RUNS)}) or a recipe module (with --preset)")
                r.add_argument("--preset", default=None, help="a recipe preset instead of the TPU run's")
                r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
            r.add_argument("--chip", default="v5p", choices=sorted(CHIPS))
            r.add_argument("--chips", type=int, default=32, help="chips in the slice (export level)")
            r.add_argument("--topology", default=None,
                           help="--compile: chips per axis (default: the chip's 32-chip slice)")
            r.add_argument("--compile", action="store_true", help="compile with libtpu: per-chip memory plan")
        a = p.parse_args(argv)
        if a.cmd == "estimate":
            print(estimate_table())
            return 0
        if a.cmd == "kernels":
            return _run_kernels(_chips(a.chip), a.compile)
        if a.topology is not None:
            a.chips = math.prod(parse_topology(chip(a.chip), a.topology))
        if a.cmd == "recipes":
            ok = [_run_recipe(n, *tpu_run_config(n), a.chip, a.chips, a.topology, a.compile) for n in TPU_RUNS]
            return 0 if all(ok) else 1
        if a.preset is not None or a.name not in TPU_RUNS:
            cfg, expected = recipe_config(a.name, a.preset or "default", a.set), ()
        else:
            cfg, expected = tpu_run_config(a.name, a.set)
        return 0 if _run_recipe(a.name, cfg, expected, a.chip, a.chips, a.topology, a.compile) else 1

    return run(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
