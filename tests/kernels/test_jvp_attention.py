"""jvp_attention: the forward and its JVP against a float64 NumPy oracle (finite differences for the tangent),
the reverse-mode rule against float64 central differences, grad-of-JVP (the forward-mode rule) against
autodiff of the plain jnp attention, and the one-line errors. GPU: the Triton kernels against the jnp
implementation on the same inputs (run with AXL_TEST_GPU=1 ... -m gpu)."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.jvp_attention import OP, api, attention, forward_mode, reference
from tests.kernels.attention_oracle import np_attention_vjp
from tests.kernels.op_test_base import Call, OpTestBase
from tests.oracle import assert_close, rel_err

# (batch, seq, heads, kv_heads, head_dim, segmented)
CASES = [(2, 13, 4, 2, 8, False), (1, 21, 3, 1, 16, True)]


@pytest.fixture(autouse=True)
def small_pallas_tiles(monkeypatch):
    """8-position Pallas tiles, so the odd lengths above span 2-3 query and key tiles (causal skipping,
    partial last tile, segments across tiles)."""
    from kernels.jvp_attention import pallas_tpu

    monkeypatch.setattr(pallas_tpu, "MAX_TILE", 8)


def _inputs(b, s, h, kv, d, segmented, dtype, seed=None):
    ks = jax.random.split(jax.random.key(int(time.time() * 1e3) % 100_000 if seed is None else seed), 4)
    q = jax.random.normal(ks[0], (b, s, h, d)).astype(dtype)
    k = jax.random.normal(ks[1], (b, s, kv, d)).astype(dtype)
    v = jax.random.normal(ks[2], (b, s, kv, d)).astype(dtype)
    tq = jax.random.normal(ks[3], (b, s, h, d)).astype(dtype)
    seg = None
    if segmented:
        seg = jnp.asarray(np.repeat(np.arange(3), -(-s // 3))[None, :s].repeat(b, 0), jnp.int32)
    return q, k, v, tq, seg


def _np_attention(q, k, v, seg):
    """float64 oracle: (o [B,S,H,D], lse [B,H,S])."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, s, h, d = q.shape
    g = h // k.shape[2]
    o, lse = np.zeros_like(q), np.zeros((b, h, s))
    allowed = np.tril(np.ones((s, s), bool))
    for bi in range(b):
        m = allowed if seg is None else allowed & (np.asarray(seg)[bi][:, None] == np.asarray(seg)[bi][None, :])
        for hi in range(h):
            sc = np.where(m, q[bi, :, hi] @ k[bi, :, hi // g].T / np.sqrt(d), -np.inf)
            mx = sc.max(-1, keepdims=True)
            w = np.exp(sc - mx)
            o[bi, :, hi] = w @ v[bi, :, hi // g] / w.sum(-1, keepdims=True)
            lse[bi, hi] = (mx + np.log(w.sum(-1, keepdims=True)))[:, 0]
    return o, lse


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_forward_and_jvp_match_oracle(case, dtype, impl):
    q, k, v, tq, seg = _inputs(*case, dtype)
    o, lse, to, tlse = api._kernels(impl)[0](q, k, v, tq, seg)
    no, nl = _np_attention(q, k, v, seg)
    eps = 1e-5  # central differences of the float64 oracle along tq: O(eps^2) error
    qd, tqd = np.asarray(q, np.float64), np.asarray(tq, np.float64)
    (op, lp), (om, lm) = _np_attention(qd + eps * tqd, k, v, seg), _np_attention(qd - eps * tqd, k, v, seg)
    for got, want, what in ((o, no, "o"), (lse, nl, "lse"), (to, (op - om) / (2 * eps), "to"),
                            (tlse, (lp - lm) / (2 * eps), "tlse")):
        assert_close(got, want, dtype, what)
    o2, lse2 = attention(q, k, v, seg, implementation=impl)
    assert rel_err(o2, o) < 1e-6 and rel_err(lse2, lse) < 1e-6


class TestJVPAttention(OpTestBase):
    """Reverse mode (the custom VJP, with an lse cotangent) vs the hand-written float64 VJP."""

    OP = OP
    CASES = {f"{i}_{jnp.dtype(d).name}": (c, d) for i, c in enumerate(CASES) for d in (jnp.float32, jnp.bfloat16)}
    OUT_NAMES = ("o", "lse")
    GRAD_NAMES = ("q", "k", "v")
    AUTO_CASE = "0_float32"  # head_dim 8: Triton needs a power of two >= 16
    AUTO = {("cpu", False): "xla", ("tpu", False): "pallas", ("gpu", True): "xla", ("gpu", False): "xla"}

    def make(self, case, rng):
        shape, dtype = self.CASES[case]
        q, k, v, _, seg = _inputs(*shape, dtype, seed=int(rng.integers(1 << 30)))
        go = jnp.asarray(rng.standard_normal(q.shape), jnp.float32).astype(dtype)
        glse = jnp.asarray(rng.standard_normal((q.shape[0], q.shape[2], q.shape[1])), jnp.float32)
        return Call((q, k, v), (go, glse), dtype, {"seg": seg})

    def apply(self, impl, call, *args):
        return attention(*args, call.extra["seg"], implementation=impl)

    def oracle(self, case, call):
        f32 = lambda x: np.asarray(x.astype(jnp.float32))
        return np_attention_vjp(*map(f32, call.args), call.extra["seg"], *map(f32, call.cotangent))

    def facts(self, call):
        return OP.facts(*call.args, call.extra["seg"])

    def test_gpu_picks_triton_for_power_of_two_head_dims(self, monkeypatch):
        from kernels import common

        monkeypatch.setattr(common, "has_jax_triton", lambda: True)
        with common.target_backend("gpu"):
            assert OP.pick(None, head_dim=64) == "triton"
            with pytest.raises(ValueError, match="implementation='triton' needs a power-of-two head_dim"):
                OP.pick("triton", head_dim=48)


def _weights(o_like, lse_like, seed):
    ks = jax.random.split(jax.random.key(seed), 2)
    return jax.random.normal(ks[0], o_like.shape), jax.random.normal(ks[1], lse_like.shape)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("case", CASES)
def test_reverse_mode_matches_float64_differences(case, impl):
    """<grad L, u> of the custom VJP equals float64 central differences of the oracle's L along u."""
    q, k, v, _, seg = _inputs(*case, jnp.float32)
    wo, wl = _weights(q, jnp.zeros((q.shape[0], q.shape[2], q.shape[1])), 5)
    loss = lambda q, k, v: sum(jnp.sum(x * w) for x, w in zip(attention(q, k, v, seg, implementation=impl), (wo, wl)))
    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    u = [np.asarray(jax.random.normal(jax.random.key(i), x.shape), np.float64) for i, x in enumerate((q, k, v))]
    np_loss = lambda xs: sum(np.sum(a * np.asarray(w, np.float64)) for a, w in zip(_np_attention(*xs, seg), (wo, wl)))
    base = [np.asarray(x, np.float64) for x in (q, k, v)]
    for i in range(3):
        eps = 1e-5
        plus = [x + eps * u[j] if j == i else x for j, x in enumerate(base)]
        minus = [x - eps * u[j] if j == i else x for j, x in enumerate(base)]
        fd = (np_loss(plus) - np_loss(minus)) / (2 * eps)
        got = float(np.sum(np.asarray(grads[i], np.float64) * u[i]))
        assert abs(got - fd) <= 1e-4 * max(1.0, abs(fd)), (i, got, fd)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("case", CASES)
def test_grad_of_jvp_matches_autodiff(case, impl):
    """The forward-mode rule: grad over (q, k, v, tq) of <w, jvp outputs> equals autodiff of plain attention."""
    q, k, v, tq, seg = _inputs(*case, jnp.float32)
    wo, wl = _weights(q, jnp.zeros((q.shape[0], q.shape[2], q.shape[1])), 6)
    wto, wtl = _weights(q, wl, 7)

    def phi(att):
        def f(q, k, v, tq):
            (o, lse), (to, tlse) = jax.jvp(lambda x: att(x, k, v), (q,), (tq,))
            return jnp.sum(o * wo) + jnp.sum(lse * wl) + jnp.sum(to * wto) + jnp.sum(tlse * wtl)
        return f

    want = jax.grad(phi(lambda q, k, v: reference.attention(q, k, v, seg)), argnums=(0, 1, 2, 3))(q, k, v, tq)
    with forward_mode():  # the context picks the forward-mode rules for calls without forward_mode=
        got = jax.grad(phi(lambda q, k, v: attention(q, k, v, seg, implementation=impl)), argnums=(0, 1, 2, 3))(
            q, k, v, tq)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 2e-5
    # a tangent on the keys takes the autodiff fallback (not an EBT case) and stays exact
    (_, _), (to, _) = jax.jvp(lambda x, y: attention(x, y, v, seg, implementation="xla", forward_mode=True),
                              (q, k), (tq, k))
    (_, _), (to_ref, _) = jax.jvp(lambda x, y: reference.attention(x, y, v, seg), (q, k), (tq, k))
    assert rel_err(to, to_ref) < 1e-6


def test_errors_are_one_line():
    q, k, v, _, _ = _inputs(1, 5, 4, 2, 8, False, jnp.float32, seed=0)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        attention(q[:, :, :3], k, v)
    with pytest.raises(ValueError, match="agree in batch, seq and head_dim"):
        attention(q, k[:, :4], v[:, :4])
    with pytest.raises(ValueError, match="segment_ids must be"):
        attention(q, k, v, jnp.zeros((1, 4), jnp.int32))
    with pytest.raises(ValueError, match="does not run on backend 'cpu'.*implementation=None"):
        attention(q, k, v, implementation="triton")
    with pytest.raises(ValueError, match="unknown implementation"):
        attention(q, k, v, implementation="cuda")


# --- GPU: Triton kernels vs the jnp implementation ---------------------------------------------------------
GPU_CASES = {"ebt_like_bf16": (2, 512, 8, 8, 64, False, jnp.bfloat16),
             "gqa_odd_segments_bf16": (2, 301, 6, 2, 64, True, jnp.bfloat16),
             "odd_f32": (1, 77, 4, 1, 32, False, jnp.float32)}


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_triton_matches_reference(case):
    *shape, dtype = GPU_CASES[case]
    q, k, v, tq, seg = _inputs(*shape, dtype)
    f32 = lambda *xs: [None if x is None else x.astype(jnp.float32) for x in xs]
    assert api.choose_implementation(None, q.shape[-1]) == "triton"
    # forward with and without the tangent
    got = jax.jit(lambda *a: attention(*a, implementation="triton"))(q, k, v, seg)
    with jax.default_matmul_precision("highest"):  # XLA's float32 dots on a GPU default to tf32
        ref_o, ref_l, ref_to, ref_tl = reference.forward(*f32(q, k, v, tq), seg)
    assert_close(got[0], ref_o, dtype, "o")
    assert_close(got[1], ref_l, dtype, "lse")

    def phi(impl):
        def f(q, k, v, tq):
            (o, lse), (to, tlse) = jax.jvp(lambda x: attention(x, k, v, seg, implementation=impl, forward_mode=True),
                                           (q,), (tq,))
            return jnp.sum(o * w[0]) + jnp.sum(lse * w[1]) + jnp.sum(to * w[2]) + jnp.sum(tlse * w[3]), (to, tlse)
        return f

    w = [jax.random.normal(jax.random.key(i), x.shape) for i, x in enumerate((ref_o, ref_l, ref_o, ref_l))]
    (_, (to, tlse)), g_tri = jax.jit(jax.value_and_grad(phi("triton"), argnums=(0, 1, 2, 3), has_aux=True))(q, k, v, tq)
    with jax.default_matmul_precision("highest"):
        (_, _), g_ref = jax.value_and_grad(phi("xla"), argnums=(0, 1, 2, 3), has_aux=True)(*f32(q, k, v, tq))
    assert_close(to, ref_to, dtype, "to")
    assert_close(tlse, ref_tl, dtype, "tlse")
    for name, a, b in zip(("gq", "gk", "gv", "gtq"), g_tri, g_ref):
        assert_close(a, b, dtype, f"grad-of-jvp {name}", factor=2.0)
    # reverse mode (first order)
    loss = lambda impl: lambda q, k, v: sum(
        jnp.sum(x * ww) for x, ww in zip(attention(q, k, v, seg, implementation=impl), w[:2])
    )
    g_tri = jax.jit(jax.grad(loss("triton"), argnums=(0, 1, 2)))(q, k, v)
    with jax.default_matmul_precision("highest"):
        g_ref = jax.grad(loss("xla"), argnums=(0, 1, 2))(*f32(q, k, v))
    for name, a, b in zip(("dq", "dk", "dv"), g_tri, g_ref):
        assert_close(a, b, dtype, f"vjp {name}", factor=2.0)
