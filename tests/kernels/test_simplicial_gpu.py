"""GPU implementations (jax-triton kernels, the cuDNN decomposition) against the jnp reference run on float32
copies of the same inputs.

Every case checks the default launch settings; the paper-like case also a second tiling of every kernel (the
bench sweeps them), all against one reference evaluation.
Run on the device machine: AXL_TEST_GPU=1 python3 -m pytest -m gpu -o addopts="" tests/kernels/test_simplicial_gpu.py
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.simplicial import two_simplicial_attention
from tests.oracle import assert_close

pytestmark = pytest.mark.gpu

# (batch, seq, q_heads, kv_heads, head_dim, w1, w2, dtype, variant)
CASES = {
    "paper_like_bf16": (2, 389, 64, 1, 128, 128, 32, jnp.bfloat16, "trilinear"),
    "gqa_odd_bf16": (1, 301, 12, 3, 64, 70, 20, jnp.bfloat16, "trilinear"),
    "seq_lt_w1_w2_gt_w1_f32": (2, 45, 8, 2, 32, 100, 60, jnp.float32, "trilinear"),
    "determinant_bf16": (1, 131, 16, 2, 96, 40, 8, jnp.bfloat16, "determinant"),
}
# k2/v2 biases per case: {} = the op's defaults (Meta's reference k2 + 1/head_dim, v2 + 1); both forms and
# custom values reach every GPU backend.
BIASES = {
    "paper_like_bf16": {},
    "gqa_odd_bf16": {"k2_bias": 0.0, "v2_bias": 0.0},
    "seq_lt_w1_w2_gt_w1_f32": {"k2_bias": 0.3, "v2_bias": -0.5},
    "determinant_bf16": {},
}
# Launch overrides per case: on the paper-like case also BJ = 128 (whole and partial k1 blocks: w1 = 128 over
# 389 positions) in the forward and M = 64 rows in both backward kernels; on the GQA case a 4-warp forward
# and unpipelined (num_stages 1) backward kernels.
PATHS = {"paper_like_bf16": [{}, dict(FWD_LAUNCH=dict(BJ=128, ROWS=128, num_warps=8, num_stages=2),
                                      BWD_Q_LAUNCH=dict(BJ=64, ROWS=64, num_warps=8, num_stages=2),
                                      BWD_K_LAUNCH=dict(BJ=64, ROWS=64, num_warps=8, num_stages=2))],
         "gqa_odd_bf16": [{}, dict(FWD_LAUNCH=dict(BJ=64, ROWS=128, num_warps=4, num_stages=3),
                                   BWD_Q_LAUNCH=dict(BJ=64, ROWS=128, num_warps=8, num_stages=1),
                                   BWD_K_LAUNCH=dict(BJ=64, ROWS=128, num_warps=8, num_stages=1))]}


def _case(case):
    """Fresh inputs of a case and the jnp reference's output and gradients on float32 copies of them."""
    b, s, hq, hkv, d, w1, w2, dtype, variant = CASES[case]
    rng = np.random.default_rng()
    mk = lambda h: jnp.asarray(rng.standard_normal((b, s, h, d)), dtype)
    args = (mk(hq), mk(hkv), mk(hkv), mk(hkv), mk(hkv))
    do = mk(hq)
    kw = dict(w1=w1, w2=w2, variant=variant, **BIASES[case])
    ref = lambda *a: two_simplicial_attention(*a, implementation="xla", **kw)
    with jax.default_matmul_precision("highest"):  # no TF32 in the reference
        ref_out, ref_vjp = jax.vjp(jax.jit(ref), *[a.astype(jnp.float32) for a in args])
        ref_grads = ref_vjp(do.astype(jnp.float32))
    return args, do, kw, dtype, ref_out, ref_grads


@pytest.mark.parametrize("case", list(CASES))
def test_triton_matches_reference(case, monkeypatch):
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU")
    from kernels.simplicial import triton_gpu

    args, do, kw, dtype, ref_out, ref_grads = _case(case)
    for launch in PATHS.get(case, [{}]):
        for name, value in launch.items():
            monkeypatch.setattr(triton_gpu, name, value)
        # A fresh function per path: the static launch settings are read when tracing.
        tri = lambda *a: two_simplicial_attention(*a, implementation="triton", **kw)
        out, vjp = jax.vjp(jax.jit(tri), *args)
        grads = vjp(do)
        assert out.dtype == dtype
        assert_close(out, ref_out, dtype, "triton output")
        for name, g, rg in zip(("dq", "dk1", "dv1", "dk2", "dv2"), grads, ref_grads):
            assert g.dtype == dtype
            assert_close(g, rg, dtype, f"triton {launch} {name}", factor=2.0)


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][7] != jnp.float32])
def test_cudnn_matches_reference(case, monkeypatch):
    """The cuDNN backend (per-offset flash attention, merged; backward through cuDNN's primitive with the joint
    statistics), with its default offset groups and with one offset per call."""
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU")
    from kernels.simplicial import cudnn_gpu

    args, do, kw, dtype, ref_out, ref_grads = _case(case)
    for group_bytes in (cudnn_gpu.GROUP_BYTES, 1):
        monkeypatch.setattr(cudnn_gpu, "GROUP_BYTES", group_bytes)
        fn = lambda *a: two_simplicial_attention(*a, implementation="cudnn", **kw)
        out, vjp = jax.vjp(jax.jit(fn), *args)
        grads = vjp(do)
        assert out.dtype == dtype
        assert_close(out, ref_out, dtype, f"cudnn output (GROUP_BYTES {group_bytes})")
        for name, g, rg in zip(("dq", "dk1", "dv1", "dk2", "dv2"), grads, ref_grads):
            assert g.dtype == dtype
            assert_close(g, rg, dtype, f"cudnn GROUP_BYTES {group_bytes} {name}", factor=2.0)


def test_gpu_default_picks_cudnn_for_bf16_and_triton_for_float32():
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU")
    x = jnp.ones((1, 16, 2, 64), jnp.float32)
    with pytest.raises(ValueError, match="needs bfloat16"):
        two_simplicial_attention(x, x[:, :, :1], x[:, :, :1], x[:, :, :1], x[:, :, :1], w1=4, w2=2,
                                 implementation="cudnn")
    for dtype in (jnp.float32, jnp.bfloat16):
        y = x.astype(dtype)
        out = two_simplicial_attention(y, y[:, :, :1], y[:, :, :1], y[:, :, :1], y[:, :, :1], w1=4, w2=2,
                                       k2_bias=0.0, v2_bias=0.0)
        np.testing.assert_allclose(np.asarray(out, np.float32), 1.0, rtol=1e-2)  # all-ones values average to 1


def test_cudnn_backward_keeps_one_offset_group_alive(monkeypatch):
    """In one jit (a train step) the cuDNN path's temporaries stay O(group), not O(w2): the backward recomputes
    each group's rows and outputs instead of XLA merging them with the forward pass's calls (which kept every
    offset's rows b^t and o^t alive, 166 GiB for the simplicial:gpu_1b preset)."""
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU")
    from kernels.simplicial import cudnn_gpu

    b, s, hq, d, w1, w2 = 1, 2048, 64, 128, 256, 32
    per_offset = b * s * hq * d * 2  # one offset's rows b^t in bf16: 32 MiB
    monkeypatch.setattr(cudnn_gpu, "GROUP_BYTES", 2 * per_offset)
    x = jax.ShapeDtypeStruct((b, s, hq, d), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((b, s, 1, d), jnp.bfloat16)

    def loss(*a):
        return two_simplicial_attention(*a, w1=w1, w2=w2, implementation="cudnn").astype(jnp.float32).sum()

    temp = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(x, kv, kv, kv, kv).compile()
    temp = temp.memory_analysis().temp_size_in_bytes
    # all offsets' rows and outputs alive would be >= 2 * w2 * per_offset = 2 GiB; one group's plus the float32
    # accumulators (dq, o, the per-query t2/u2 rows: ~20 per_offset) stay under half of that (765 MiB measured
    # on an H100, 2026-12-07)
    assert temp < w2 * per_offset, f"temporaries {temp / 2**20:.0f} MiB"


def _packed_segments(b, s, rng, recur=True):
    """Random packing: documents of 1..3*w-ish tokens, ids increasing per row, a padding (0) tail on row 0, and
    with `recur` one recurring id on row 1 (equal ids are one document; the dq kernel's RECUR variant)."""
    seg = np.cumsum(rng.uniform(size=(b, s)) < 0.02, axis=1).astype(np.int32) + 1
    seg[0, s // 2] = seg[0, s // 2 - 1] + 1000  # a one-token document (with recur, its document goes on after it)
    if not recur:
        seg[0, s // 2 + 1:] += 2000  # a new document after it: every id one run
    seg[0, -7:] = 0
    if b > 1 and recur:
        seg[1, s // 3: s // 3 + 40] = seg[1, 0]  # the first document's id again
    return seg


@pytest.mark.parametrize("case,recur", [("paper_like_bf16", True), ("gqa_odd_bf16", True),
                                        ("seq_lt_w1_w2_gt_w1_f32", True), ("paper_like_bf16", False),
                                        ("seq_lt_w1_w2_gt_w1_f32", False)])
def test_triton_packed_matches_reference(case, recur):
    """Exact document masking (segment_ids) in the Triton kernels, fwd and every gradient, against the jnp
    reference with the same segment ids; implementation=None must pick Triton for it (cuDNN cannot mask).
    recur=False: every id one run, as packing gives (the dq kernel's plain variant)."""
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU")
    b, s, hq, hkv, d, w1, w2, dtype, variant = CASES[case]
    rng = np.random.default_rng()
    mk = lambda h: jnp.asarray(rng.standard_normal((b, s, h, d)), dtype)
    args, do = (mk(hq), mk(hkv), mk(hkv), mk(hkv), mk(hkv)), mk(hq)
    seg = jnp.asarray(_packed_segments(b, s, rng, recur))
    kw = dict(w1=w1, w2=w2, variant=variant, segment_ids=seg, **BIASES[case])
    with jax.default_matmul_precision("highest"):
        ref_out, ref_vjp = jax.vjp(jax.jit(lambda *a: two_simplicial_attention(*a, implementation="xla", **kw)),
                                   *[a.astype(jnp.float32) for a in args])
        ref_grads = ref_vjp(do.astype(jnp.float32))
    for impl in ("triton", None):
        out, vjp = jax.vjp(jax.jit(lambda *a, impl=impl: two_simplicial_attention(*a, implementation=impl, **kw)),
                           *args)
        grads = vjp(do)
        assert_close(out, ref_out, dtype, f"triton packed output ({impl})")
        for name, g, rg in zip(("dq", "dk1", "dv1", "dk2", "dv2"), grads, ref_grads):
            assert g.dtype == dtype
            assert_close(g, rg, dtype, f"triton packed {name} ({impl})", factor=2.0)
    with pytest.raises(ValueError, match="cannot mask packed documents"):
        two_simplicial_attention(*args, implementation="cudnn", **kw)

