"""GPU kernels (jax-triton) against the jnp reference run on float32 copies of the same inputs.

Every case checks the fused one-pass backward (`triton_gpu.BACKWARD = "fused"`, atomics); the paper-like case
also a second fused tiling and the two-kernel path, all against one reference evaluation.
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
# (BACKWARD, BWD_FUSED_LAUNCH overrides) per case: the default fused path everywhere; on the paper-like case
# (16 head tiles) also a fused tiling with 2 head-tile splits and M = 128 rows, and the two-kernel path.
PATHS = {"paper_like_bf16": [("fused", {}), ("fused", dict(ROWS=128, SPLITS=2)), ("two_kernel", {})]}


@pytest.mark.parametrize("case", list(CASES))
def test_triton_matches_reference(case, monkeypatch):
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU")
    from kernels.simplicial import triton_gpu

    b, s, hq, hkv, d, w1, w2, dtype, variant = CASES[case]
    rng = np.random.default_rng()
    mk = lambda h: jnp.asarray(rng.standard_normal((b, s, h, d)), dtype)
    args = (mk(hq), mk(hkv), mk(hkv), mk(hkv), mk(hkv))
    do = mk(hq)
    kw = dict(w1=w1, w2=w2, variant=variant)
    ref = lambda *a: two_simplicial_attention(*a, implementation="xla", **kw)
    up = [a.astype(jnp.float32) for a in args]
    with jax.default_matmul_precision("highest"):  # no TF32 in the reference
        ref_out, ref_vjp = jax.vjp(jax.jit(ref), *up)
        ref_grads = ref_vjp(do.astype(jnp.float32))
    base = dict(triton_gpu.BWD_FUSED_LAUNCH)
    for path, launch in PATHS.get(case, [("fused", {})]):
        monkeypatch.setattr(triton_gpu, "BACKWARD", path)
        monkeypatch.setattr(triton_gpu, "BWD_FUSED_LAUNCH", {**base, **launch})
        # A fresh function per path: the static launch settings are read when tracing.
        tri = lambda *a: two_simplicial_attention(*a, implementation="triton", **kw)
        out, vjp = jax.vjp(jax.jit(tri), *args)
        grads = vjp(do)
        assert out.dtype == dtype
        assert_close(out, ref_out, dtype, "triton output")
        for name, g, rg in zip(("dq", "dk1", "dv1", "dk2", "dv2"), grads, ref_grads):
            assert g.dtype == dtype
            assert_close(g, rg, dtype, f"triton {path} {launch} {name}", factor=2.0)
