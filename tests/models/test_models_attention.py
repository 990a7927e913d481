"""Attention: causal + segment mask vs a float64 oracle, GQA == MHA with repeated K/V, dispatch errors."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from axlearn_like.config import ConfigError, apply_overrides
from models.attention import Attention, AttentionConfig, choose_implementation, dot_product_attention as _dpa
from tests.models.model_helpers import fake_init, randn
from tests.oracle import assert_close

# jitted: eager dispatch of the many small ops costs seconds on CPU
dot_product_attention = jax.jit(_dpa, static_argnames=("implementation",))


def np_attention(q, k, v, seg):
    q, k, v = (np.asarray(t.astype(jnp.float32), np.float64) for t in (q, k, v))
    b, s, h, d = q.shape
    g = h // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)
    allowed = np.tril(np.ones((s, s), bool))[None, None]
    if seg is not None:
        seg = np.asarray(seg)
        allowed = allowed & (seg[:, None, :, None] == seg[:, None, None, :])
    logits = np.where(allowed, logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


def _qkv(b, s, h, kv, d, dtype, seed=0):
    q = randn(seed, (b, s, h, d), dtype=dtype)
    k = randn(seed + 1, (b, s, kv, d), dtype=dtype)
    v = randn(seed + 2, (b, s, kv, d), dtype=dtype)
    return q, k, v


@pytest.mark.parametrize(
    "dtype,heads,kv_heads", [(jnp.float32, 6, 2), (jnp.bfloat16, 6, 2), (jnp.float32, 4, 1), (jnp.bfloat16, 3, 3)]
)
def test_attention_matches_oracle(dtype, heads, kv_heads):
    q, k, v = _qkv(2, 13, heads, kv_heads, 10, dtype)
    seg = jnp.array([[1] * 5 + [2] * 8, [7] * 13])
    out = dot_product_attention(q, k, v, seg)
    assert out.shape == q.shape and out.dtype == dtype
    assert_close(out.astype(jnp.float32), np_attention(q, k, v, seg), dtype, "attention")
    out_noseg = dot_product_attention(q, k, v, None)
    assert_close(out_noseg.astype(jnp.float32), np_attention(q, k, v, None), dtype, "attention (no segments)")


def test_gqa_equals_mha_with_repeated_kv():
    q, k, v = _qkv(2, 9, 6, 2, 8, jnp.float32, seed=3)
    seg = jnp.array([[1] * 4 + [2] * 5, [1] * 9])
    gqa = dot_product_attention(q, k, v, seg)
    mha = dot_product_attention(q, jnp.repeat(k, 3, axis=2), jnp.repeat(v, 3, axis=2), seg)
    np.testing.assert_allclose(np.asarray(gqa), np.asarray(mha), rtol=1e-5, atol=1e-6)
    # and the mapping is head h -> kv head h // 3, not h % 2:
    wrong = dot_product_attention(q, jnp.tile(k, (1, 1, 3, 1)), jnp.tile(v, (1, 1, 3, 1)), seg)
    assert not np.allclose(np.asarray(gqa), np.asarray(wrong), atol=1e-3)


def test_attention_module_grad_and_qk_norm():
    cfg = AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=6, qk_norm=True)
    x = randn(0, (2, 7, 12))
    pos = jnp.broadcast_to(jnp.arange(7), (2, 7))
    mod = Attention(cfg, dtype=jnp.float32)
    boxed = fake_init(lambda: mod.init(jax.random.key(1), x, positions=pos, segment_ids=None))
    assert set(boxed["params"]) == {"query", "key", "value", "out", "query_norm", "key_norm"}
    assert boxed["params"]["key"]["kernel"].names == ("embed", "kv_heads", "head_dim")
    p = nn.unbox(boxed)["params"]
    f = lambda p: jnp.sum(mod.apply({"params": p}, x, positions=pos, segment_ids=None) ** 2)
    g = jax.jit(jax.grad(f))(p)
    assert all(bool(jnp.all(jnp.isfinite(t))) and float(jnp.abs(t).sum()) > 0 for t in jax.tree.leaves(g))


def test_implementation_dispatch_and_errors():
    assert choose_implementation(None, jnp.bfloat16, 64) == "xla"  # CPU
    assert choose_implementation("xla", jnp.float32, 64) == "xla"
    with pytest.raises(ValueError, match="does not run on backend"):
        choose_implementation("cudnn", jnp.bfloat16, 64)
    with pytest.raises(ValueError, match="unknown implementation"):
        choose_implementation("flash", jnp.bfloat16, 64)


@pytest.mark.parametrize(
    "override,key",
    [
        ("num_kv_heads=3", "num_kv_heads"),
        ("head_dim=7", "head_dim"),
        ("implementation=flash", "implementation"),
    ],
)
def test_attention_config_errors_are_one_line(override, key):
    with pytest.raises(ConfigError) as e:
        apply_overrides(AttentionConfig(num_heads=4, num_kv_heads=2), [override])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(key)


@pytest.mark.gpu
@pytest.mark.parametrize("length", [256, 257])  # 257: a packed odd row (the EBT's time token), padded for cuDNN
def test_cudnn_matches_xla_on_gpu(length):
    q, k, v = _qkv(2, length, 8, 2, 64, jnp.bfloat16)
    seg = jnp.concatenate([jnp.ones((2, 100), jnp.int32), 2 * jnp.ones((2, length - 100), jnp.int32)], 1)
    for s in (None, seg):
        a = dot_product_attention(q, k, v, s, implementation="cudnn")
        b = dot_product_attention(q, k, v, s, implementation="xla")
        assert_close(a.astype(jnp.float32), np_attention(q, k, v, s), jnp.bfloat16, "cudnn")
        assert_close(b.astype(jnp.float32), np_attention(q, k, v, s), jnp.bfloat16, "xla")
        def summed(q, k, v, s, impl):
            return dot_product_attention(q, k, v, s, implementation=impl).astype(jnp.float32).sum()

        grads = [jax.grad(summed, argnums=(0, 1, 2))(q, k, v, s, i) for i in ("cudnn", "xla")]
        for g_cudnn, g_xla in zip(*grads):
            assert_close(g_cudnn.astype(jnp.float32), g_xla.astype(jnp.float32), jnp.bfloat16, "cudnn grad", factor=2.0)
