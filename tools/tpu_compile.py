"""Compile for TPU on a CPU host: Pallas kernels through Mosaic, a recipe's whole train step through XLA:TPU.

    python -m tools.tpu_compile RECIPE [--preset P] [--chip v5p] [--topology 2x4x4] [--set KEY=VALUE ...]

compiles the recipe's train step for that pod slice (v5p 2x4x4 = v5p-64, 32 chips; the mesh is the config's
`mesh.*`) and prints the Mosaic kernels in it, the per-chip memory XLA plans (arguments, outputs,
temporaries) against the chip's HBM, and the compile time. No TPU is needed.

Two levels, both used by the tests:
  export_for_tpu(fn, *args, chip=)   `jax.export` for platforms=["tpu"] inside an AbstractMesh whose device is
      the chip: the Pallas -> Mosaic lowering with Pallas's block-shape rules. Needs only jax.
  compile_for_tpu / compile_train_step   libtpu's compiler on a deviceless topology: Mosaic's own checks
      (provable alignment of dynamic slices, vector layouts, VMEM), XLA's SPMD partitioning and memory plan.
      Needs libtpu: scripts/bootstrap.sh installs it into .venv/libtpu, outside sys.path, so that ordinary
      runs never start a TPU client; `ensure_libtpu()` points JAX at it when a compile asks for it.
Kernels are traced under kernels.common.target_backend("tpu"), so implementation=None picks the TPU kernels
and Pallas kernels lower compiled, never in interpret mode (`check_mosaic` asserts both).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend.core  # noqa: F401  (Jaxpr types for pallas_calls)
import numpy as np
from jax.sharding import AbstractDevice, AbstractMesh, Mesh, NamedSharding, PartitionSpec as P

from kernels import common

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation: the JAX device kind and Google's datasheet numbers per chip (docs/benchmarks.md cites
    the pages): peak dense bf16 FLOP/s, HBM bandwidth (bytes/s) and capacity (bytes)."""

    name: str
    device_kind: str
    cores_per_device: int  # TensorCores behind one JAX device (v5p: megacore)
    dims: int  # topology rank: "AxB" (v5e, v6e) or "AxBxC" (v5p)
    bf16_flops: float
    hbm_bandwidth: float
    hbm_bytes: float


CHIPS = {
    "v5e": Chip("v5e", "TPU v5 lite", 1, 2, 197e12, 819e9, 16e9),
    "v5p": Chip("v5p", "TPU v5", 2, 3, 459e12, 2765e9, 95e9),
    "v6e": Chip("v6e", "TPU v6 lite", 1, 2, 918e12, 1638e9, 32e9),
}


def chip(name: str | Chip) -> Chip:
    if isinstance(name, Chip):
        return name
    if name not in CHIPS:
        raise ValueError(f"unknown TPU chip {name!r}; choose one of {sorted(CHIPS)}")
    return CHIPS[name]


# ------------------------------------------------------------------------------------------------ libtpu
def libtpu_path() -> str | None:
    """libtpu.so: $TPU_LIBRARY_PATH, an importable libtpu package (a TPU VM), or bootstrap's .venv/libtpu."""
    env = os.environ.get("TPU_LIBRARY_PATH")
    if env and os.path.isfile(env):
        return env
    try:
        import libtpu  # noqa: F401  (on a TPU VM)

        return libtpu.get_library_path()
    except ImportError:
        pass
    side = os.path.join(sys.prefix, "libtpu", "libtpu", "libtpu.so")
    return side if os.path.isfile(side) else None


def ensure_libtpu() -> None:
    """Lets JAX load libtpu's compiler for deviceless topologies (the CPU backend stays the default)."""
    path = libtpu_path()
    if path is None:
        raise ValueError("compiling for TPU needs libtpu: run `make venv` (scripts/bootstrap.sh installs libtpu "
                         f"into {sys.prefix}/libtpu) or set TPU_LIBRARY_PATH to a libtpu.so")
    os.environ["TPU_LIBRARY_PATH"] = path
    # No metadata-server lookups on a machine that is not a TPU VM.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")


@functools.cache
def topology_devices(chip_name: str, topology: str) -> tuple:
    """Compile-only devices of a TPU slice, e.g. ("v5p", "2x4x4") -> 32 devices; no TPU needed."""
    from jax.experimental import topologies

    c = chip(chip_name)
    dims = tuple(int(x) for x in topology.split("x"))
    if len(dims) != c.dims or min(dims) < 1:
        raise ValueError(f"topology {topology!r} for {c.name} must be {'x'.join('N' * c.dims)} (chips per axis)")
    ensure_libtpu()
    full = dims + (1,) * (3 - len(dims))
    host = tuple(min(d, 2) for d in full[:2]) + (1,)  # the 4-chip host of every generation here
    topo = topologies.get_topology_desc(topology_name=f"{c.name}:{topology}", platform="tpu",
                                        chip_config_name="default", chips_per_host_bounds=host, num_slices=1)
    return tuple(topo.devices)


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
    return AbstractMesh(tuple(axis_sizes), tuple(axis_names), abstract_device=dev)


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
                info = eqn.params.get("name_and_src_info")
                out.append((getattr(info, "name", str(info)), bool(eqn.params.get("interpret"))))
            stack.extend(_sub_jaxprs(eqn.params))
    return out


def check_mosaic(report: MosaicReport, expected: Sequence[str] = ()) -> None:
    """Every Pallas kernel is a compiled Mosaic custom call (none interpreted, none missing), and every name in
    `expected` is among them; raises AssertionError naming what is wrong."""
    interpreted = [n for n, interp in report.pallas_calls if interp]
    assert not interpreted, f"Pallas kernels traced in interpret mode (no Mosaic): {interpreted}"
    assert len(report.kernels) == len(report.pallas_calls), (
        f"{len(report.pallas_calls)} pallas_calls but {len(report.kernels)} Mosaic custom calls: {report.kernels}")
    missing = sorted(set(expected) - set(report.kernels))
    assert not missing, f"expected Mosaic kernels {missing} not in the program (have {sorted(set(report.kernels))})"


# --------------------------------------------------------------------------------------------- programs
def export_for_tpu(fn: Callable, *args, chip_name: str = "v5p") -> tuple[jax.export.Exported, MosaicReport]:
    """jax.export of jit(fn) for TPU on any host: args are arrays or ShapeDtypeStructs (no shardings: one chip)."""
    with jax.sharding.use_abstract_mesh(abstract_mesh(chip_name)), common.target_backend("tpu"):
        jitted = jax.jit(fn)
        traced = jitted.trace(*args)
        exported = jax.export.export(jitted, platforms=["tpu"])(*args)
    return exported, MosaicReport(mosaic_kernels(exported.mlir_module()), pallas_calls(traced.jaxpr))


def compile_exported(exported: jax.export.Exported, chip_name: str = "v5p"):
    """Compiles an exported one-chip TPU program with libtpu (Mosaic's checks run here) -> jax Compiled."""
    mesh = topology_mesh(chip_name, "x".join(["1"] * chip(chip_name).dims), (1,), ("x",))
    rep = NamedSharding(mesh, P())
    args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep) for a in exported.in_avals]
    return jax.jit(exported.call).lower(*args).compile()


def compile_for_tpu(fn: Callable, *args, chip_name: str = "v5p"):
    """export_for_tpu + compile_exported -> (Compiled, MosaicReport)."""
    exported, report = export_for_tpu(fn, *args, chip_name=chip_name)
    return compile_exported(exported, chip_name), report


@dataclasses.dataclass
class TrainStepReport:
    chip: Chip
    topology: str
    mesh: dict
    mosaic: MosaicReport
    memory: Any  # CompiledMemoryStats per device
    compile_s: float  # trace + lower + compile
    lower_s: float  # trace + lower

    @property
    def hbm_per_chip(self) -> int:
        """Bytes XLA plans per device: arguments + outputs + temporaries - donated aliases (+ generated code)."""
        m = self.memory
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                   - m.alias_size_in_bytes + m.generated_code_size_in_bytes)

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for k in self.mosaic.kernels:
            counts[k] = counts.get(k, 0) + 1
        kern = ", ".join(f"{k} x{n}" for k, n in sorted(counts.items())) or "none"
        return (f"{self.chip.name} {self.topology} mesh {self.mesh}: compiled in {self.compile_s:.1f} s "
                f"({self.lower_s:.1f} s tracing and lowering); "
                f"HBM per chip {self.hbm_per_chip / GIB:.2f} GiB of {self.chip.hbm_bytes / GIB:.1f} GiB "
                f"(args {self.memory.argument_size_in_bytes / GIB:.2f}, temp {self.memory.temp_size_in_bytes / GIB:.2f}); "
                f"Mosaic kernels: {kern}")


def compile_train_step(cfg, *, chip_name: str = "v5p", topology: str = "2x4x4") -> TrainStepReport:
    """Builds the experiment's sharded state and train step on a deviceless TPU slice and compiles it (XLA SPMD
    over cfg.mesh, Mosaic for the Pallas kernels). Raises ValueError (ConfigError) for a mesh that does not fit."""
    import flax.linen as nn

    from axlearn_like import sharding as sharding_lib
    from axlearn_like.trainer import build_state_setup, make_train_step

    devices = topology_devices(chip_name, topology)
    sizes = sharding_lib.axis_sizes(cfg.mesh, len(devices))
    mesh = topology_mesh(chip_name, topology, [sizes[a] for a in sharding_lib.MESH_AXES], sharding_lib.MESH_AXES)
    t0 = time.perf_counter()
    with common.target_backend("tpu"):
        setup = build_state_setup(cfg, mesh=mesh)
        with jax.set_mesh(mesh), nn.logical_axis_rules(setup.rules):
            step, batch_sh = make_train_step(setup, cfg)
            batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh[k]) for k, v in setup.batch_spec.items()}
            traced = step.trace(setup.abstract_state, batch)
            lowered = traced.lower()
    t_lower = time.perf_counter() - t0
    compiled = lowered.compile()
    report = MosaicReport(mosaic_kernels(lowered.as_text()), pallas_calls(traced.jaxpr))
    return TrainStepReport(chip(chip_name), topology, {k: v for k, v in sizes.items() if v > 1}, report,
                           compiled.memory_analysis(), time.perf_counter() - t0, t_lower)


# ---------------------------------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    from axlearn_like import config as config_lib
    from axlearn_like.cli import tool_main

    @tool_main
    def run(argv):
        p = argparse.ArgumentParser(prog="python -m tools.tpu_compile", description=__doc__.split("\n\n")[0])
        p.add_argument("recipe", help="recipe module name, e.g. moe")
        p.add_argument("--preset", default="default")
        p.add_argument("--chip", default="v5p", choices=sorted(CHIPS))
        p.add_argument("--topology", default="2x4x4", help="chips per axis (v5p: AxBxC, v5e/v6e: AxB)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
        a = p.parse_args(argv)
        try:
            mod = importlib.import_module(f"recipes.{a.recipe}")
        except ModuleNotFoundError as e:
            raise ValueError(f"no recipe {a.recipe!r} (recipes/{a.recipe}.py)") from e
        if a.preset not in mod.PRESETS:
            raise ValueError(f"recipe {a.recipe} has no preset {a.preset!r}; choose one of {sorted(mod.PRESETS)}")
        cfg = config_lib.apply_overrides(mod.PRESETS[a.preset](), a.set)
        report = compile_train_step(cfg, chip_name=a.chip, topology=a.topology)
        print(report.summary())
        if report.hbm_per_chip > report.chip.hbm_bytes:
            print(f"error: the step needs {report.hbm_per_chip / GIB:.1f} GiB per chip, more than the "
                  f"{report.chip.hbm_bytes / GIB:.1f} GiB of a {report.chip.name}", file=sys.stderr)
            return 1
        return 0

    return run(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
