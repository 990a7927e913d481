"""TPU readiness without a TPU (tools.tpu_compile): every Pallas kernel pass lowers to Mosaic for v5e, v5p and v6e
at production shapes, every recipe's train step lowers for a 32-chip v5p pod slice with its kernels compiled (never
in interpret mode), libtpu compiles the kernels (Mosaic's layout and VMEM checks) and one pod-slice step; the
kernels' shard_maps compute what the unpartitioned kernels do. Export and compile only, nothing runs on a TPU."""
from __future__ import annotations

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from axlearn_like import sharding as shd
from tools import tpu_compile as tc

CHIPS = tuple(tc.CHIPS)


@functools.cache
def _cases():
    return tc.kernel_cases()


_PASSES = [(op, p) for op, case in tc.kernel_cases().items() for p in case.passes]


@pytest.mark.parametrize("chip", CHIPS)
@pytest.mark.parametrize("op,pass_", _PASSES, ids=[f"{o}-{p}" for o, p in _PASSES])
def test_kernel_pass_lowers_to_mosaic(op, pass_, chip):
    case = _cases()[op]
    fn, expected = case.passes[pass_]
    exported, report = tc.export_for_tpu(fn, *case.args, chip_name=chip)
    tc.check_mosaic(report, expected)
    assert set(report.kernels) == set(expected), report.kernels
    assert exported.platforms == ("tpu",)


def _libtpu():
    if tc.libtpu_path() is None:
        if os.environ.get("CI"):
            pytest.fail("libtpu missing: scripts/bootstrap.sh installs it into .venv/libtpu")
        pytest.skip("libtpu not installed (scripts/bootstrap.sh puts it in .venv/libtpu)")


@pytest.mark.parametrize("chip", CHIPS)
@pytest.mark.parametrize("op", list(tc.KERNEL_SHAPES))
def test_kernels_compile_with_libtpu(op, chip):
    """All passes of one op in one program, compiled by libtpu for the chip: Mosaic's own checks (tile-aligned
    loads, vector layouts, the scoped-VMEM budget) on top of the export-level block-shape rules."""
    _libtpu()
    case = _cases()[op]
    exported, report = tc.export_for_tpu(case.full, *case.args, chip_name=chip)
    tc.check_mosaic(report, case.kernels)
    compiled = tc.compile_exported(exported, chip)
    assert compiled.memory_analysis().temp_size_in_bytes < tc.chip(chip).hbm_bytes


def test_jvp_attention_gqa_and_long_sequences():
    """Grouped-query heads (G = 4 query heads per kv head: one [T, D] tile per head, no in-kernel reshape) lower,
    and compile with libtpu at S = 4096; a sequence whose whole-sequence blocks cannot fit the chip's VMEM is a
    one-line error at trace time (v5p: 64 MiB per TensorCore), not a Mosaic out-of-memory."""
    from kernels import jvp_attention as ja

    def grad_jvp(s, h, kv, d):
        qa, ka = jax.ShapeDtypeStruct((1, s, h, d), jnp.bfloat16), jax.ShapeDtypeStruct((1, s, kv, d), jnp.bfloat16)

        def loss(q, k, v, t):
            _, to = jax.jvp(lambda q_: ja.attention(q_, k, v, forward_mode=True)[0], (q,), (t,))
            return jnp.sum(to.astype(jnp.float32) ** 2)

        return jax.grad(loss, argnums=(0, 1, 2, 3)), (qa, ka, ka, qa)

    fn, args = grad_jvp(4096, 8, 2, 64)
    exported, report = tc.export_for_tpu(fn, *args, chip_name="v5e")
    tc.check_mosaic(report, ("jvp_attention_fwd_tangent", "jvp_attention_bwd_q_tangent",
                             "jvp_attention_bwd_kv_tangent"))
    if tc.libtpu_path() is not None:
        tc.compile_exported(exported, "v5e")
    fn, args = grad_jvp(8192, 8, 8, 128)
    with pytest.raises(ValueError, match="needs ~.* MiB of VMEM .* more than fits this TPU's 64 MiB"):
        tc.export_for_tpu(fn, *args, chip_name="v5p")


# One pattern period of layers: every layer kind and kernel of the preset, at its per-chip shapes, in a fraction
# of the trace time (tools.tpu_compile recipes lowers the full presets).
_LEAN = {"dense_lm": 1, "moe": 2, "moe_mla": 2, "simplicial": 4, "mamba2": 1, "ebt": 1, "ebt_pallas": 1,
         "ebt_denoise": 1}


@pytest.mark.parametrize("run", list(tc.TPU_RUNS))
def test_recipe_train_step_lowers_on_v5p_pod_slice(run):
    cfg, expected = tc.tpu_run_config(run, (f"model.num_layers={_LEAN[run]}",))
    exported, report = tc.export_train_step(cfg, chip_name="v5p", num_chips=32)
    assert report.mesh and np.prod(list(report.mesh.values())) == 32
    tc.check_mosaic(report.mosaic, expected)
    if not expected:  # no Pallas kernel in this step on a TPU (attention stays XLA there)
        assert report.mosaic.kernels == [] and report.mosaic.pallas_calls == []
    assert len(exported.in_shardings_hlo) == len(exported.in_avals)


def test_pod_slice_step_compiles_with_libtpu():
    """XLA:TPU's SPMD partitioner and Mosaic on a deviceless v5p-16 slice (2x2x2, 8 chips, fsdp 4 x tensor 2): a
    Mamba-2 step (the tiny float32 preset, one layer) with its SSD kernels in their shard_map, and the per-chip
    memory plan. (`python -m tools.tpu_compile recipes --compile` compiles every full preset: minutes each.)"""
    _libtpu()
    cfg = tc.recipe_config("mamba2", "default", ("model.num_layers=1", "mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2"))
    report = tc.compile_train_step(cfg, chip_name="v5p", topology="2x2x2")
    tc.check_mosaic(report.mosaic, ("ssd_chunk_state", "ssd_chunk_scan", "ssd_bwd_dx_dB", "ssd_bwd_dC"))
    assert report.mesh == {"fsdp": 4, "tensor": 2}
    assert 0 < report.hbm_per_chip < report.chip.hbm_bytes
    assert "ssd_chunk_scan x1" in report.summary()


# --- the kernels' shard_maps (kernels.common.partitioned) compute what the unpartitioned kernels do -------
def _mesh():
    devices = np.asarray(jax.devices()[:8]).reshape(2, 2, 1, 2)
    return jax.sharding.Mesh(devices, shd.MESH_AXES)


def _under_mesh(f, *args):
    """f(*args) jitted under an 8-device CPU mesh (data 2 x fsdp 2 x tensor 2) with the default rules."""
    mesh = _mesh()
    with jax.set_mesh(mesh), nn.logical_axis_rules(shd.DEFAULT_RULES):
        return jax.jit(f)(*args)


def _close(got, want, tol=2e-5):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=tol, atol=tol)


def _grad_and_value(f, n):
    def g(*a):
        out, vjp = jax.vjp(f, *a[:n])
        return out, vjp(jax.tree.map(lambda o: jnp.cos(o.astype(jnp.float32)).astype(o.dtype), out))

    return g


def test_partitioned_kernels_match_unpartitioned():
    """simplicial, ssd and jvp_attention (Pallas, interpret mode on CPU) under a data x fsdp x tensor mesh run
    in a shard_map over batch rows and heads: outputs and gradients equal the single-program ones."""
    from kernels import jvp_attention
    from kernels.simplicial import two_simplicial_attention
    from kernels.ssd import ssd

    ks = jax.random.split(jax.random.key(0), 8)
    b, s, h, kv, d = 4, 16, 4, 2, 8
    q = jax.random.normal(ks[0], (b, s, h, d))
    k1, v1, k2, v2 = (jax.random.normal(k, (b, s, kv, d)) for k in ks[1:5])
    simp = _grad_and_value(lambda *a: two_simplicial_attention(*a, w1=8, w2=4, implementation="pallas"), 5)
    _close(_under_mesh(simp, q, k1, v1, k2, v2), jax.jit(simp)(q, k1, v1, k2, v2))

    att = _grad_and_value(lambda q, k, v: jvp_attention.attention(q, k, v, implementation="pallas"), 3)
    _close(_under_mesh(att, q, k1, v1), jax.jit(att)(q, k1, v1))

    def fwd_mode(q, k, v, t):
        return jax.jvp(lambda q: jvp_attention.attention(q, k, v, forward_mode=True, implementation="pallas")[0],
                       (q,), (t,))

    gj = jax.grad(lambda q, k, v, t: jnp.sum(jnp.sin(fwd_mode(q, k, v, t)[1])), argnums=(0, 1, 2, 3))
    _close(_under_mesh(gj, q, k1, v1, k2[:, :, :1].repeat(h, 2)), jax.jit(gj)(q, k1, v1, k2[:, :, :1].repeat(h, 2)))

    x = jax.random.normal(ks[5], (b, s, h, d))
    dt = jax.nn.softplus(jax.random.normal(ks[6], (b, s, h)))
    A = -jnp.arange(1.0, h + 1)
    Bm, Cm = (jax.random.normal(k, (b, s, 1, 8)) for k in jax.random.split(ks[7]))
    sd = _grad_and_value(lambda *a: ssd(*a, chunk_size=8, D=jnp.ones((h,)), implementation="pallas"), 5)
    _close(_under_mesh(sd, x, dt, A, Bm, Cm), jax.jit(sd)(x, dt, A, Bm, Cm))


def test_grouped_matmul_pallas_refuses_a_free_tpu_mesh():
    """Traced for TPU under a multi-device mesh outside any shard_map, the Mosaic grouped matmul cannot be
    partitioned (its row groups span the sharded batch): auto falls back to XLA's ragged_dot with a warning,
    an explicit 'pallas' is a one-line error."""
    from kernels import common
    from kernels.grouped_matmul import grouped_matmul
    from kernels.op import KernelFallbackWarning

    lhs, rhs, gs = jnp.ones((64, 128)), jnp.ones((4, 128, 128)), jnp.full((4,), 16, jnp.int32)
    mesh = tc.abstract_mesh("v5p", (2, 2, 1, 2), shd.MESH_AXES)
    with common.target_backend("tpu"), jax.sharding.use_abstract_mesh(mesh):
        with pytest.warns(KernelFallbackWarning, match="cannot be partitioned"):
            jax.jit(grouped_matmul).trace(lhs, rhs, gs)
        with pytest.raises(ValueError, match="implementation='pallas' cannot be partitioned"):
            jax.jit(functools.partial(grouped_matmul, implementation="pallas")).trace(lhs, rhs, gs)


def test_estimate_table_covers_every_pass():
    table = tc.estimate_table()
    for op, case in tc.kernel_cases().items():
        for pass_ in case.passes:
            assert f"| {pass_} |" in table and op in table
    costs = tc.kernel_costs()
    assert all(c.flops > 0 and c.bytes > 0 for c in costs)
    # the roofline: never faster than the chip's peak FLOP/s or its HBM bandwidth
    for c in costs:
        for ch in tc.CHIPS.values():
            assert c.seconds(ch) >= max(c.flops / ch.bf16_flops, c.bytes / ch.hbm_bandwidth) * (1 - 1e-12)
    assert "An estimate, not a measurement" in table


def test_cli_estimate_and_errors(capsys):
    assert tc.main(["estimate"]) == 0
    assert "simplicial" in capsys.readouterr().out
    assert tc.main(["recipe", "nosuch"]) == 2
    assert "no recipe 'nosuch'" in capsys.readouterr().err
    assert tc.main(["recipe", "dense_lm", "--topology", "4x4"]) == 2  # v5p is AxBxC
    assert "must be NxNxN" in capsys.readouterr().err
