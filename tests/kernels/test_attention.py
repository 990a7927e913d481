"""kernels.attention (causal GQA attention, xla / cudnn): forward and gradients vs the float64 oracle with a
hand-written VJP, the implementation table and the picking rule (OpTestBase); argument errors are one line.
GPU (AXL_TEST_GPU=1 ... -m gpu): the same class runs "cudnn" on the bf16 cases."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.attention import OP, dot_product_attention
from tests.kernels.attention_oracle import np_attention_vjp
from tests.kernels.op_test_base import Call, OpTestBase

# (batch, seq, heads, kv_heads, head_dim, segmented, dtype)
CASES = {
    "gqa3_segments_f32": (2, 13, 6, 2, 16, True, jnp.float32),
    "gqa3_segments_bf16": (2, 13, 6, 2, 16, True, jnp.bfloat16),
    "mqa_bf16": (1, 21, 4, 1, 64, False, jnp.bfloat16),
    "mha_odd_head_dim_f32": (1, 9, 3, 3, 10, False, jnp.float32),
}


class TestDotProductAttention(OpTestBase):
    OP = OP
    CASES = CASES
    GRAD_NAMES = ("q", "k", "v")
    AUTO_CASE = "mqa_bf16"
    AUTO = {("cpu", False): "xla", ("tpu", False): "xla", ("gpu", False): "cudnn"}

    def make(self, case, rng):
        b, s, h, kv, d, segmented, dtype = CASES[case]
        mk = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)
        seg = None
        if segmented:
            seg = jnp.asarray(np.repeat(np.arange(3), -(-s // 3))[None, :s].repeat(b, 0), jnp.int32)
        return Call((mk(b, s, h, d), mk(b, s, kv, d), mk(b, s, kv, d)), mk(b, s, h, d), dtype, {"seg": seg})

    def apply(self, impl, call, *args):
        return dot_product_attention(*args, call.extra["seg"], implementation=impl)

    def oracle(self, case, call):
        f32 = [np.asarray(x.astype(jnp.float32)) for x in (*call.args, call.cotangent)]
        (o, _), grads = np_attention_vjp(*f32[:3], call.extra["seg"], f32[3])
        return (o,), grads

    def facts(self, call):
        return OP.facts(*call.args, call.extra["seg"])

    def check_outputs(self, impl, call, outs):
        assert outs[0].shape == call.args[0].shape and outs[0].dtype == call.dtype

    def test_float32_on_gpu_falls_back_with_a_warning(self, monkeypatch):
        from kernels import common
        from kernels.op import KernelFallbackWarning

        monkeypatch.setattr("kernels.op._WARNED", set())
        with common.target_backend("gpu"):
            with pytest.warns(KernelFallbackWarning, match="'cudnn' needs bfloat16 or float16"):
                assert OP.pick(None, dtype=jnp.float32, head_dim=64) == "xla"
            with pytest.warns(KernelFallbackWarning, match="'cudnn' needs head_dim a multiple of 8 and <= 128"):
                assert OP.pick(None, dtype=jnp.bfloat16, head_dim=136) == "xla"  # too wide for cuDNN
            with pytest.raises(ValueError, match="implementation='cudnn' needs head_dim a multiple of 8"):
                OP.pick("cudnn", dtype=jnp.bfloat16, head_dim=12)


def test_argument_errors_are_one_line():
    q, k = jnp.zeros((1, 5, 4, 8)), jnp.zeros((1, 5, 2, 8))
    for args, match in (((q[:, :, :3], k, k), "multiple of kv_heads"), ((q, k[:, :4], k[:, :4]), "agree in batch"),
                        ((q, k, k[..., :4]), "k, v one shape"),
                        ((q, k, k, jnp.zeros((1, 4), jnp.int32)), "segment_ids")):
        with pytest.raises(ValueError, match=match) as e:
            dot_product_attention(*args)
        assert "\n" not in str(e.value)


def test_even_length_padding_leaves_outputs_and_gradients_unchanged():
    """The cuDNN path pads packed odd-length calls by one position (pad_to_even_length); on the reference the
    padded call, sliced back, must give the same outputs and gradients as the unpadded one."""
    from kernels.attention.api import pad_to_even_length
    from kernels.attention.reference import attention

    rng = np.random.default_rng()
    b, s, h, kv, d = 2, 13, 4, 2, 16
    q, k, v = (jnp.asarray(rng.standard_normal((b, s, n, d)), jnp.float32) for n in (h, kv, kv))
    seg = jnp.asarray(np.repeat([1, 2, 3], [4, 6, 3])[None].repeat(b, 0), jnp.int32)
    ct = jnp.asarray(rng.standard_normal((b, s, h, d)), jnp.float32)
    plain = lambda *a: attention(*a, seg)
    padded = lambda *a: attention(*pad_to_even_length(*a, seg))[:, :s]
    (o1, vjp1), (o2, vjp2) = jax.vjp(plain, q, k, v), jax.vjp(padded, q, k, v)
    assert pad_to_even_length(q, k, v, seg)[0].shape[1] == s + 1
    np.testing.assert_allclose(o2, o1, rtol=1e-6, atol=1e-6)
    for g2, g1 in zip(vjp2(ct), vjp1(ct)):
        np.testing.assert_allclose(g2, g1, rtol=1e-5, atol=1e-5)
