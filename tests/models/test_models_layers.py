"""models.layers vs float64 NumPy oracles: RMSNorm, DenseGeneral, SwiGLU MLP, RoPE, Embed/attend."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from axlearn_like.params import Param, weight_decay_mask
from models.layers import MLP, DenseGeneral, Embed, RMSNorm, apply_rope, get_dtype
from tests.models.model_helpers import fake_init, randn
from tests.oracle import assert_close

DTYPES = [jnp.float32, jnp.bfloat16]


def _rand(seed, shape, scale=1.0):
    return randn(seed, shape, scale)


def np_rope(x, pos, theta):
    x = np.asarray(x, np.float64)
    d = x.shape[-1]
    inv = theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    ang = np.asarray(pos, np.float64)[..., None, None] * inv  # [B,S,1,D/2]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm_matches_oracle(dtype):
    x = _rand(0, (3, 7, 13), 3.0).astype(dtype)
    mod = RMSNorm(eps=1e-5, dtype=dtype)
    boxed = jax.eval_shape(lambda: mod.init(jax.random.key(1), x))
    assert boxed["params"]["scale"].names == ("norm",) and not weight_decay_mask(boxed["params"])["scale"]
    scale = _rand(2, (13,))
    v = {"params": {"scale": scale}}
    out = jax.jit(mod.apply)(v, x)
    assert out.dtype == dtype
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    ref = x64 / np.sqrt(np.mean(x64**2, -1, keepdims=True) + 1e-5) * np.asarray(scale, np.float64)
    assert_close(out.astype(jnp.float32), ref, dtype, "rmsnorm")


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_general_matches_oracle(dtype):
    x = _rand(0, (2, 5, 3, 4))
    mod = DenseGeneral((6, 7), ("heads", "head_dim", "embed", "mlp"), axis=(-2, -1), use_bias=True, dtype=dtype)
    boxed = jax.eval_shape(lambda: mod.init(jax.random.key(1), x))
    k = boxed["params"]["kernel"]
    assert isinstance(k, Param) and k.names == ("heads", "head_dim", "embed", "mlp") and k.value.shape == (3, 4, 6, 7)
    assert k.value.dtype == jnp.float32
    mask = weight_decay_mask(boxed["params"])
    assert mask == {"kernel": True, "bias": False}
    params = {"kernel": _rand(2, (3, 4, 6, 7)), "bias": _rand(3, (6, 7))}
    out = jax.jit(mod.apply)({"params": params}, x)
    assert out.dtype == dtype and out.shape == (2, 5, 6, 7)
    ref = np.einsum("bsij,ijkl->bskl", np.float64(x), np.float64(params["kernel"])) + np.float64(params["bias"])
    assert_close(out.astype(jnp.float32), ref, dtype, "dense")


@pytest.mark.parametrize("batch", [1, 2])
def test_dense_general_one_row_on_gpu_stays_a_matrix_product(batch):
    """Traced for GPU, one row (batch-1 decoding) goes through two identical rows behind an optimization barrier
    (so XLA:GPU keeps a matrix product instead of its multiply + reduce rewrite); same values as the plain dot;
    more rows are untouched."""
    from kernels import common

    x = _rand(0, (batch, 1, 3, 4))
    mod = DenseGeneral(6, ("heads", "head_dim", "embed"), axis=(-2, -1), dtype=jnp.float32)
    params = {"kernel": _rand(2, (3, 4, 6))}
    plain = mod.apply({"params": params}, x)
    with common.target_backend("gpu"):
        hlo = jax.jit(mod.apply).lower({"params": params}, x).as_text()
        out = mod.apply({"params": params}, x)
    assert ("optimization_barrier" in hlo) == (batch == 1), hlo
    assert out.shape == (batch, 1, 6)
    np.testing.assert_allclose(np.asarray(out), np.asarray(plain), rtol=1e-6, atol=1e-6)
    ref = np.einsum("bsij,ijk->bsk", np.float64(x), np.float64(params["kernel"]))
    assert_close(out, ref, jnp.float32, "dense one row")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head", ["dense", "tied"])
def test_float32_logits_head_gradients_and_backward_dtype(head, dtype):
    """Both logits heads (DenseGeneral with out_dtype=float32; the tied Embed.attend): float32 values forward;
    gradients and a forward-over-reverse product (the EBT's second order) against float64 for an odd shape; and in
    bf16 the backward's two GEMMs take bf16 operands (a float32 cotangent against the bf16 weights made XLA run
    them as TF32 GEMMs, 12% of an MoE step)."""
    x = _rand(0, (3, 5, 13), 0.5)
    ct = _rand(2, (3, 5, 37))
    if head == "dense":  # kernel [D, V]
        mod, name, method, w, tw = DenseGeneral(37, ("embed", "vocab"), dtype=dtype, out_dtype=jnp.float32), \
            "kernel", None, _rand(1, (13, 37), 0.5), _rand(3, (13, 37), 0.5)
    else:  # embedding [V, D]
        mod, name, method, w, tw = Embed(num_embeddings=37, features=13, dtype=dtype), "embedding", Embed.attend, \
            _rand(1, (37, 13), 0.5), _rand(3, (37, 13), 0.5)

    def f(xx, ww):
        return jnp.sum(mod.apply({"params": {name: ww}}, xx, method=method) * ct)

    def f64(a):  # what the layer computes with: the operands rounded to its dtype
        return np.float64(np.asarray(jnp.asarray(a).astype(dtype).astype(jnp.float32)))

    x64, c64 = f64(x), np.float64(ct)
    m64, t64 = (f64(a) if head == "dense" else f64(a).T for a in (w, tw))  # as [D, V]
    out = mod.apply({"params": {name: w}}, x, method=method)
    assert out.dtype == jnp.float32
    assert_close(out, x64 @ m64, jnp.float32 if dtype == jnp.float32 else dtype, "logits")
    gx, gw = jax.jit(jax.grad(f, argnums=(0, 1)))(x, w)
    assert gx.dtype == jnp.float32 and gw.dtype == jnp.float32
    assert_close(gx, c64 @ m64.T, dtype, "d logits / dx")
    gw_ref = np.einsum("bsd,bsv->dv", x64, c64)
    assert_close(gw, gw_ref if head == "dense" else gw_ref.T, dtype, "d logits / dW")
    # forward over reverse: d/dW (dL/dx) . tW = ct . tW^T
    _, hvp = jax.jvp(lambda ww: jax.grad(f)(x, ww), (w,), (tw,))
    assert_close(hvp, c64 @ t64.T, dtype, "forward over reverse")
    hlo = jax.jit(jax.grad(f, argnums=(0, 1))).lower(x, w).as_text()
    operand_types = re.findall(r"dot_general.*: \(tensor<[^>]*x(\w+)>, tensor<[^>]*x(\w+)>\)", hlo)
    want = "bf16" if dtype == jnp.bfloat16 else "f32"
    assert len(operand_types) == 2 and all(t == (want, want) for t in operand_types), operand_types


def test_dense_general_bad_axes_is_one_clear_error():
    with pytest.raises(ValueError, match="kernel_axes"):
        jax.eval_shape(lambda: DenseGeneral(4, ("embed",)).init(jax.random.key(0), jnp.ones((2, 3))))


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_mlp_matches_oracle(dtype):
    x = _rand(0, (2, 5, 12))
    mod = MLP(hidden_dim=20, dtype=dtype)
    p = nn.unbox(fake_init(lambda: mod.init(jax.random.key(1), x), std=1.0))["params"]  # gate far from linear
    out = jax.jit(mod.apply)({"params": p}, x)
    assert out.dtype == dtype and out.shape == x.shape
    x64 = np.float64(x)
    g = x64 @ np.float64(p["wi_gate"]["kernel"])
    u = x64 @ np.float64(p["wi_up"]["kernel"])
    ref = (g / (1 + np.exp(-g)) * u) @ np.float64(p["wo"]["kernel"])
    assert_close(out.astype(jnp.float32), ref, dtype, "mlp")


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_matches_oracle(dtype):
    x = _rand(0, (2, 7, 3, 10)).astype(dtype)
    pos = jnp.asarray(np.random.default_rng(1).integers(0, 500, (2, 7)), jnp.int32)
    out = jax.jit(apply_rope, static_argnums=2)(x, pos, 500.0)
    assert out.dtype == dtype
    assert_close(out.astype(jnp.float32), np_rope(x.astype(jnp.float32), pos, 500.0), dtype, "rope")


def test_rope_relative_position_property():
    q = _rand(0, (1, 1, 1, 16))
    k = _rand(1, (1, 1, 1, 16))

    @jax.jit
    def _score(pq, pk):
        rq = apply_rope(q, jnp.full((1, 1), pq), 10000.0)
        rk = apply_rope(k, jnp.full((1, 1), pk), 10000.0)
        return jnp.sum(rq * rk)

    score = lambda pq, pk: float(_score(pq, pk))

    base = score(3, 1)
    for shift in (7, 100, 1234):
        assert abs(score(3 + shift, 1 + shift) - base) < 1e-4 * max(1.0, abs(base))
    assert abs(score(5, 1) - base) > 1e-3  # a different offset does change the score
    assert abs(score(0, 0) - float(jnp.sum(q * k))) < 1e-5  # position 0 is the identity


def test_rope_odd_head_dim_rejected():
    with pytest.raises(ValueError, match="even head_dim"):
        apply_rope(jnp.ones((1, 2, 1, 5)), jnp.zeros((1, 2), jnp.int32))


def test_embed_lookup_and_attend():
    mod = Embed(num_embeddings=11, features=6, dtype=jnp.float32)
    tokens = jnp.array([[1, 4, 10], [0, 0, 3]])
    boxed = fake_init(lambda: mod.init(jax.random.key(0), tokens))
    e = boxed["params"]["embedding"]
    assert e.names == ("vocab", "embed") and e.value.shape == (11, 6)
    emb = np.float64(e.value)
    out = mod.apply(nn.unbox(boxed), tokens)
    assert_close(out, emb[np.asarray(tokens)], jnp.float32, "embed")
    h = _rand(3, (2, 3, 6))
    logits = mod.apply(nn.unbox(boxed), h, method=Embed.attend)
    assert logits.dtype == jnp.float32 and logits.shape == (2, 3, 11)
    assert_close(logits, np.float64(h) @ emb.T, jnp.float32, "attend")


def test_unknown_dtype_is_config_error():
    from axlearn_like.config import ConfigError

    with pytest.raises(ConfigError, match="float16x"):
        get_dtype("float16x")
