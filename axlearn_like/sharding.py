"""Device mesh and the logical-axis rules: the one place that maps parameter/activation names to mesh axes.

Parameters carry logical axis names (`nn.with_logical_partitioning`), activations get
`nn.with_logical_constraint`; these rules (MaxText-style) turn names into mesh axes. A recipe may override
rules through `MeshConfig.rules`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from axlearn_like.config import ConfigError, config_class, require

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# logical name -> mesh axis (or tuple of axes, or None = replicated). Order matters only for readability.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp", "expert")),  # tokens are data-parallel over every non-model axis
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("q_lora", "fsdp"),  # MLA's query / key-value latent widths (their matrices' other axis is embed or heads)
    ("kv_lora", "fsdp"),
    ("vocab", "tensor"),
    ("expert", "expert"),
    ("expert_mlp", "tensor"),
    ("layers", None),
    ("ssm_heads", "tensor"),
    ("ssm_state", None),
    ("conv", None),
    ("norm", None),
)


@config_class
class MeshConfig:
    """Mesh axis sizes; -1 on one axis means 'fill with the remaining devices'.

    `rules` overrides entries of DEFAULT_RULES: {"embed": null, "mlp": ["tensor", "fsdp"]}.
    For multi-host / multi-slice: `dcn_*` give how many granules (TPU slices; processes on GPU/CPU) the axis
    spans, through mesh_utils.create_hybrid_device_mesh; the plain sizes stay the axis totals, so the
    in-granule factor is size / dcn (e.g. 4 GPU nodes: data=-1, fsdp=8, dcn_data=4). Used only multi-process.
    """

    data: int = -1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    rules: dict[str, Any] = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        sizes = [self.data, self.fsdp, self.expert, self.tensor]
        require(sum(s == -1 for s in sizes) <= 1, "mesh", "at most one axis may be -1 (fill)")
        for name, s in zip(MESH_AXES, sizes):
            require(s == -1 or s >= 1, f"mesh.{name}", f"must be >= 1 or -1 (fill), got {s}")
        known = {k for k, _ in DEFAULT_RULES}
        for k in self.rules:
            require(k in known, "mesh.rules", f"unknown logical axis {k!r}; known: {sorted(known)}")


def axis_sizes(cfg: MeshConfig, num_devices: int) -> dict[str, int]:
    """Resolves -1 and checks the product against the device count (one-line error naming the fix)."""
    sizes = {"data": cfg.data, "fsdp": cfg.fsdp, "expert": cfg.expert, "tensor": cfg.tensor}
    fixed = math.prod(s for s in sizes.values() if s != -1)
    fill = [k for k, s in sizes.items() if s == -1]
    if fill:
        if num_devices % fixed:
            raise ConfigError(
                f"mesh: the fixed axes multiply to {fixed}, which does not divide the {num_devices} available devices; "
                f"change mesh.* so their product divides {num_devices}"
            )
        sizes[fill[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ConfigError(
            f"mesh: axes {sizes} use {math.prod(sizes.values())} devices but {num_devices} are available; "
            f"set one axis to -1 or make the product {num_devices}"
        )
    return sizes


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    devices = list(jax.devices()) if devices is None else list(devices)
    sizes = axis_sizes(cfg, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    dcn = (cfg.dcn_data, cfg.dcn_fsdp, 1, 1)
    if jax.process_count() > 1 and math.prod(dcn) > 1:
        from jax.experimental import mesh_utils

        # Granules (the units across the slow network): TPU slices where devices know them, else processes.
        by_slice = len({getattr(d, "slice_index", 0) for d in devices}) > 1
        granules = len({getattr(d, "slice_index" if by_slice else "process_index") for d in devices})
        if math.prod(dcn) != granules or any(s % d for s, d in zip(shape, dcn)):
            raise ConfigError(
                f"mesh.dcn_data/mesh.dcn_fsdp: {cfg.dcn_data} x {cfg.dcn_fsdp} must multiply to the {granules} "
                f"{'slices' if by_slice else 'processes'} and divide mesh.data={sizes['data']} / "
                f"mesh.fsdp={sizes['fsdp']}"
            )
        ici = tuple(s // d for s, d in zip(shape, dcn))
        arr = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices, process_is_granule=not by_slice)
    elif len(devices) == jax.device_count() and devices == list(jax.devices()):
        from jax.experimental import mesh_utils

        try:
            arr = mesh_utils.create_device_mesh(shape, devices=devices)
        except Exception:  # CPU / unusual topologies: plain order is fine
            arr = np.asarray(devices).reshape(shape)
    else:
        arr = np.asarray(devices).reshape(shape)
    return Mesh(arr, MESH_AXES)


def use_mesh(mesh):
    """Context that makes `mesh` the current mesh: `jax.set_mesh` for a concrete Mesh; for an AbstractMesh
    (tracing for devices this host does not have, e.g. a TPU pod slice in tools.tpu_compile)
    `jax.sharding.use_abstract_mesh`, which set_mesh refuses."""
    if isinstance(mesh, jax.sharding.AbstractMesh):
        return jax.sharding.use_abstract_mesh(mesh)
    return jax.set_mesh(mesh)


def logical_rules(cfg: MeshConfig) -> tuple[tuple[str, Any], ...]:
    rules = dict(DEFAULT_RULES)
    for k, v in cfg.rules.items():
        rules[k] = tuple(v) if isinstance(v, list) else v
    return tuple(rules.items())


def logical_to_spec(axes: tuple[str | None, ...], rules, mesh: Mesh) -> P:
    """Logical axis names -> PartitionSpec; mesh axes of size 1 are dropped, each mesh axis used once."""
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in axes:
        target = table.get(name) if name is not None else None
        if target is None:
            out.append(None)
            continue
        targets = (target,) if isinstance(target, str) else tuple(target)
        keep = tuple(t for t in targets if mesh.shape[t] > 1 and t not in used)
        used.update(keep)
        out.append(None if not keep else keep[0] if len(keep) == 1 else keep)
    return P(*out)


def batch_sharding(mesh: Mesh, rules, ndim: int) -> NamedSharding:
    """Sharding of a [batch, ...] array: batch over the data-parallel axes, the rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules, mesh))


def data_parallel_size(mesh: Mesh, rules) -> int:
    spec = logical_to_spec(("batch",), rules, mesh)[0]
    if spec is None:
        return 1
    axes = (spec,) if isinstance(spec, str) else spec
    return math.prod(mesh.shape[a] for a in axes)
