"""2-simplicial mixer: shape/dtype, equality with a direct op call, causality, exact packed-document isolation,
RoPE choice, FLOP count, the hybrid stack (scan == unscanned, training),
config errors and the recipe."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from axlearn_like.config import ConfigError, apply_overrides
from kernels.simplicial import two_simplicial_attention
from models.decoder import Decoder, stack_layer_params
from models.layers import apply_rope
from models.simplicial import SimplicialAttention, SimplicialConfig
from tests.models.model_helpers import attention, fake_init, make_batch, randn, small_cfg

D = 16
CFG = SimplicialConfig(num_heads=4, num_kv_heads=2, head_dim=6, w1=5, w2=3)


def _layer(cfg=CFG, dtype=jnp.float32):
    return SimplicialAttention(cfg, dtype)


def _params(cfg=CFG, s=11, seed=0):
    x = jnp.zeros((1, s, D))
    pos = jnp.zeros((1, s), jnp.int32)
    return nn.unbox(fake_init(lambda: _layer(cfg).init(jax.random.key(0), x, positions=pos), seed, std=0.4))["params"]


def _pos(b, s, offset=0):
    return jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32) + offset, (b, s))


def _apply(cfg=CFG, dtype=jnp.float32):
    return jax.jit(lambda p, x, pos, seg: _layer(cfg, dtype).apply({"params": p}, x, positions=pos, segment_ids=seg))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_shape_dtype_and_params(dtype):
    p = _params()
    x = randn(1, (2, 11, D), dtype=dtype)
    y = _apply(dtype=dtype)(p, x, _pos(2, 11), None)
    assert y.shape == (2, 11, D) and y.dtype == dtype and bool(jnp.all(jnp.isfinite(y)))
    assert p["query"]["kernel"].shape == (D, 4, 6) and p["key2"]["kernel"].shape == (D, 2, 6)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(p))
    boxed = jax.eval_shape(lambda: _layer().init(jax.random.key(0), x, positions=_pos(2, 11)))["params"]
    names = {k: v["kernel"].names for k, v in boxed.items()}
    assert names["query"] == ("embed", "heads", "head_dim") and names["value2"] == ("embed", "kv_heads", "head_dim")
    assert names["out"] == ("heads", "head_dim", "embed")


@pytest.mark.parametrize(
    "cfg",
    [CFG, dataclasses.replace(CFG, rope="q_k1", num_kv_heads=1, w2=7),
     dataclasses.replace(CFG, variant="determinant", scale=0.3),
     dataclasses.replace(CFG, k2_bias=0.0, v2_bias=0.0), dataclasses.replace(CFG, k2_bias=0.4, v2_bias=-1.5)],
    ids=["trilinear", "rope_q_k1", "determinant", "bias_free", "custom_bias"],
)
def test_layer_equals_direct_op_call(cfg):
    p = _params(cfg, seed=3)
    x = randn(4, (2, 9, D))
    pos = _pos(2, 9, offset=3)
    proj = lambda n: jnp.einsum("bsd,dhk->bshk", x, p[n]["kernel"])
    q, k1, v1, k2, v2 = (proj(n) for n in ("query", "key", "value", "key2", "value2"))
    if cfg.rope == "q_k1":
        q, k1 = apply_rope(q, pos), apply_rope(k1, pos)
    ctx = two_simplicial_attention(
        q, k1, v1, k2, v2, w1=cfg.w1, w2=cfg.w2, variant=cfg.variant, scale=cfg.scale, k2_bias=cfg.k2_bias,
        v2_bias=cfg.v2_bias, implementation="xla"
    )
    want = np.asarray(jnp.einsum("bshk,hkd->bsd", ctx, p["out"]["kernel"]))
    got = np.asarray(_apply(cfg)(p, x, pos, None))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # and the same with a segment_ids row of one document (the mask removes nothing)
    got_seg = np.asarray(_apply(cfg)(p, x, pos, jnp.ones((2, 9), jnp.int32)))
    np.testing.assert_allclose(got_seg, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rope", ["none", "q_k1"])
def test_causality(rope):
    cfg = dataclasses.replace(CFG, rope=rope)
    p = _params(cfg, seed=5)
    x = randn(6, (2, 12, D))
    t = 6
    x2 = x.at[:, t + 1 :].add(randn(7, (2, 12 - t - 1, D)))
    f = _apply(cfg)
    a, b = np.asarray(f(p, x, _pos(2, 12), None)), np.asarray(f(p, x2, _pos(2, 12), None))
    np.testing.assert_array_equal(a[:, : t + 1], b[:, : t + 1])
    assert np.abs(a[:, t + 1 :] - b[:, t + 1 :]).max() > 1e-3


def test_rope_choice():
    """rope='none': the layer ignores positions; 'q_k1': it does not."""
    x = randn(8, (1, 10, D))
    for rope, depends in (("none", False), ("q_k1", True)):
        cfg = dataclasses.replace(CFG, rope=rope)
        p = _params(cfg, seed=9)
        a = np.asarray(_apply(cfg)(p, x, _pos(1, 10), None))
        b = np.asarray(_apply(cfg)(p, x, _pos(1, 10, offset=17), None))
        assert (np.abs(a - b).max() > 1e-3) == depends, rope


@pytest.mark.parametrize("rope", ["none", "q_k1"])
def test_packed_documents_are_isolated(rope):
    """Doc A = tokens 0..4, doc B = 5..11, doc C = 12 (one token), then 2 padding tokens (id 0); positions
    restart per document. The layer masks exactly: every document's outputs equal it run alone, and nothing of
    one document reaches another."""
    cfg = dataclasses.replace(CFG, rope=rope)
    p = _params(cfg, seed=11)
    f = _apply(cfg)
    x = randn(12, (1, 15, D))
    seg = jnp.array([[1] * 5 + [2] * 7 + [3] + [0] * 2], jnp.int32)
    pos = jnp.array([list(range(5)) + list(range(7)) + [0] + list(range(2))], jnp.int32)
    packed = np.asarray(f(p, x, pos, seg))
    for lo, hi in ((0, 5), (5, 12), (12, 13)):  # each document alone at the start of a row
        alone = np.asarray(f(p, x[:, lo:hi], pos[:, lo:hi], None))
        np.testing.assert_allclose(packed[:, lo:hi], alone, rtol=1e-5, atol=1e-6)
    # perturbing A leaves B and C bit-identical
    xa = x.at[:, :5].add(randn(13, (1, 5, D)))
    np.testing.assert_array_equal(np.asarray(f(p, xa, pos, seg))[:, 5:], packed[:, 5:])
    # without segment ids B does see A (the masking is what isolates)
    leaky = np.asarray(f(p, xa, pos, None))
    assert np.abs(leaky[:, 5:12] - packed[:, 5:12]).max() > 1e-3


def test_layer_with_segments_equals_direct_op_call():
    """The layer hands segment_ids to the op (the op's masking is tested against the float64 oracle in
    tests/kernels/test_simplicial.py)."""
    p = _params(CFG, seed=4)
    x = randn(5, (2, 10, D))
    seg = jnp.array([[1, 1, 1, 2, 2, 2, 2, 3, 0, 0], [4, 4, 5, 5, 5, 5, 5, 5, 5, 5]], jnp.int32)
    proj = lambda n: jnp.einsum("bsd,dhk->bshk", x, p[n]["kernel"])
    ctx = two_simplicial_attention(*(proj(n) for n in ("query", "key", "value", "key2", "value2")), w1=CFG.w1,
                                   w2=CFG.w2, segment_ids=seg, implementation="xla")
    want = np.asarray(jnp.einsum("bshk,hkd->bsd", ctx, p["out"]["kernel"]))
    np.testing.assert_allclose(np.asarray(_apply()(p, x, _pos(2, 10), seg)), want, rtol=1e-5, atol=1e-5)


def test_flops_count_window_pairs():
    simp = SimplicialConfig(num_heads=3, head_dim=6, w1=4, w2=2)
    cfg = small_cfg(layer_pattern=(attention(), simp))
    pairs = np.mean([min(4, i) * min(2, i) for i in range(1, 11)])  # 1 + 4 + 6 + 7 * 8 = 67 over 10 queries
    assert pairs == 6.7
    assert cfg.layer_kinds(1)[0].extra_flops(cfg.d_model, 10) == pytest.approx(3 * 2 * (6 + 6) * 6.7 * 3)
    det = dataclasses.replace(simp, variant="determinant")
    assert det.extra_flops(cfg.d_model, 10) == pytest.approx(3 * 2 * (12 + 6) * 6.7 * 3)
    # long sequences: O(w1 * w2) per token, independent of seq_len
    assert simp.extra_flops(cfg.d_model, 10_000) == pytest.approx(3 * 2 * 12 * 3 * 8, rel=1e-3)
    # the LM's count adds it once per simplicial layer
    lm = small_cfg(layer_pattern=(attention(),)).build()
    hybrid = cfg.build()
    extra = hybrid.flops_per_token(10) - lm.flops_per_token(10)
    params = 6.0 * (hybrid.param_count(10) - lm.param_count(10))
    attn = attention().extra_flops(cfg.d_model, 10)
    assert extra == pytest.approx(params + simp.extra_flops(cfg.d_model, 10) - attn)


def _hybrid(**kw):
    base = dict(
        num_layers=4,
        layer_pattern=(attention(), attention(), attention(),
                       SimplicialConfig(num_heads=4, num_kv_heads=1, head_dim=6, w1=5, w2=3)),
    )
    base.update(kw)
    return small_cfg(**base)


def test_hybrid_scan_equals_unscanned():
    cfg, cfg_scan = _hybrid(remat_policy="save_attn"), _hybrid(remat_policy="save_attn", scan_layers=True)
    b = make_batch(2, 9, seed=3)
    init = lambda c: nn.unbox(fake_init(lambda: Decoder(c).init(jax.random.key(0), b["inputs"]), 1))["params"]
    params = init(cfg)
    assert "key2" in params["stack"]["layer_3"]["mixer"] and "key2" not in params["stack"]["layer_2"]["mixer"]
    stacked = stack_layer_params(params, cfg)
    assert jax.tree.map(jnp.shape, stacked) == jax.tree.map(jnp.shape, init(cfg_scan))
    fn = lambda c: jax.jit(lambda p, x: Decoder(c).apply({"params": p}, x, segment_ids=b["segment_ids"]))
    ref = np.asarray(fn(cfg)(params, b["inputs"]))
    np.testing.assert_allclose(np.asarray(fn(cfg_scan)(stacked, b["inputs"])), ref, rtol=1e-5, atol=1e-5)


def test_hybrid_trains():
    cfg = _hybrid()
    b = make_batch(4, 16, seed=4)
    params = nn.unbox(fake_init(lambda: Decoder(cfg).init(jax.random.key(0), b["inputs"]), 2, std=0.05))["params"]
    opt = optax.adam(1e-2)

    def loss_fn(p):
        logits = Decoder(cfg).apply({"params": p}, b["inputs"], segment_ids=b["segment_ids"], train=True)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, b["targets"]))

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(loss_fn)(p)
        # the simplicial layer gets gradient
        gnorm = optax.global_norm(g["stack"]["layer_3"]["mixer"])
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, loss, gnorm

    state = opt.init(params)
    losses = []
    for _ in range(6):
        params, state, loss, gnorm = step(params, state)
        losses.append(float(loss))
        assert float(gnorm) > 0
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.1, losses


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["model.layer_pattern.simplicial.num_kv_heads=3"], "model.layer_pattern.3.num_kv_heads"),
        (["model.layer_pattern.simplicial.variant=determinant"], "model.layer_pattern.3.head_dim"),
        (["model.layer_pattern.simplicial.variant=quadrilinear"], "model.layer_pattern.3.variant"),
        (["model.layer_pattern.simplicial.rope=alibi"], "model.layer_pattern.3.rope"),
        (["model.layer_pattern.simplicial.w2=0"], "model.layer_pattern.3.w2"),
        (["model.layer_pattern.3.implementation=cuda"], "model.layer_pattern.3.implementation"),
        (["model.layer_pattern.simplicial.v2_bias=inf"], "model.layer_pattern.3.v2_bias"),
        (["model.layer_pattern.simplicial.k2_bias=nan"], "model.layer_pattern.3.k2_bias"),
    ],
)
def test_config_errors_are_one_line(overrides, key):
    from recipes import simplicial

    with pytest.raises(ConfigError) as e:
        apply_overrides(simplicial.config(), overrides)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(key + ":"), msg


def test_k2_v2_bias_defaults_and_legacy_configs():
    """New configs take Meta's reference biases; a config saved before the fields existed loads bias-free (what
    it was trained with), and the two layers differ."""
    from axlearn_like.config import from_dict, to_dict

    assert (CFG.k2_bias, CFG.v2_bias) == (None, 1.0)
    saved = to_dict(CFG)
    assert from_dict(saved) == CFG  # today's saved configs round-trip with their biases
    legacy = {k: v for k, v in saved.items() if k not in ("k2_bias", "v2_bias")}
    old = from_dict(legacy)
    assert (old.k2_bias, old.v2_bias) == (0.0, 0.0) and dataclasses.replace(old, k2_bias=None, v2_bias=1.0) == CFG
    p = _params(seed=5)
    x, pos = randn(6, (1, 9, D)), _pos(1, 9)
    assert np.abs(np.asarray(_apply(CFG)(p, x, pos, None)) - np.asarray(_apply(old)(p, x, pos, None))).max() > 1e-3


def test_recipe_configs():
    from recipes import simplicial

    cfg = apply_overrides(simplicial.config(), [])
    assert [m.kind for m in cfg.model.layer_pattern] == ["attention"] * 3 + ["simplicial"]
    assert cfg.data.packing is False
    twin = simplicial.dense_twin(cfg)
    assert twin.model.layer_pattern == cfg.model.layer_pattern[:1]
    apply_overrides(twin, [])
    # everything but the mixers is the dense baseline preset's
    base = simplicial.dense()
    assert dataclasses.replace(twin, name=base.name) == base
    sets = ["model.layer_pattern.simplicial.variant=determinant", "model.layer_pattern.simplicial.head_dim=30"]
    ok = apply_overrides(simplicial.config(), sets)
    assert ok.model.layer_pattern[3].head_dim == 30
    from recipes import dense_lm

    with pytest.raises(ConfigError, match=r"^model\.layer_pattern: no 'simplicial' entry to copy"):
        apply_overrides(dense_lm.config(), ["model.layer_pattern=attention,simplicial"])
    new = apply_overrides(dense_lm.config(), ["model.layer_pattern=attention,models.simplicial:SimplicialConfig"])
    assert [type(m) for m in new.model.layer_pattern] == [type(cfg.model.layer_pattern[0]), SimplicialConfig]
