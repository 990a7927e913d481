"""DeepSeek gate (`route`), token dropping and the aux-loss-free bias state, against NumPy oracles."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from axlearn_like import sharding as shd
from axlearn_like.params import weight_decay_mask
from axlearn_like.state import finalize_step_statistics
from models.moe import MoE, MoEConfig, RoutingBias, capacity_keep, route


def _np_route(logits, bias, top_k, score_func, num_groups, topk_groups, group_score, route_scale, normalize):
    """Independent float64 per-token implementation of the V2/V3 gate semantics."""
    logits = np.asarray(logits, np.float64)
    t, e = logits.shape
    if score_func == "sigmoid":
        s = 1.0 / (1.0 + np.exp(-logits))
    else:
        z = np.exp(logits - logits.max(-1, keepdims=True))
        s = z / z.sum(-1, keepdims=True)
    b = np.zeros(e) if bias is None else np.asarray(bias, np.float64)
    per = e // num_groups
    ids = np.zeros((t, top_k), int)
    w = np.zeros((t, top_k))
    for i in range(t):
        sb = s[i] + b
        gscores = []
        for g in range(num_groups):
            vals = sorted(sb[g * per : (g + 1) * per], reverse=True)
            gscores.append(vals[0] + vals[1] if group_score == "top2_sum" else vals[0])
        kept = sorted(range(num_groups), key=lambda g: -gscores[g])[:topk_groups]
        cand = [j for g in kept for j in range(g * per, (g + 1) * per)]
        chosen = sorted(cand, key=lambda j: -sb[j])[:top_k]
        ids[i] = chosen
        w[i] = s[i, chosen]
        if normalize:
            w[i] /= w[i].sum()
    return ids, w * route_scale


GATES = [  # V3: sigmoid, groups scored by top-2 sum, bias, route_scale; V2: softmax, max-scored groups
    dict(top_k=4, score_func="sigmoid", num_groups=4, topk_groups=2, group_score="top2_sum", route_scale=2.5,
         normalize=True),
    dict(top_k=3, score_func="softmax", num_groups=4, topk_groups=3, group_score="max", route_scale=1.0,
         normalize=False),
    dict(top_k=2, score_func="sigmoid", num_groups=1, topk_groups=1, group_score="top2_sum", route_scale=1.0,
         normalize=True),
    dict(top_k=2, score_func="softmax", num_groups=2, topk_groups=1, group_score="top2_sum", route_scale=1.0,
         normalize=True),
]


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("gate", range(len(GATES)))
def test_route_matches_numpy(gate, with_bias):
    kw = GATES[gate]
    r = np.random.default_rng(gate)
    logits = r.normal(size=(53, 16)).astype(np.float32)
    bias = (r.normal(size=16) * 0.3).astype(np.float32) if with_bias else None
    ids, w = route(jnp.asarray(logits), None if bias is None else jnp.asarray(bias), **kw)
    ref_ids, ref_w = _np_route(logits, bias, **kw)
    assert ids.dtype == jnp.int32 and w.dtype == jnp.float32 and ids.shape == (53, kw["top_k"])
    # Same expert set per token (order among equal-rank experts is irrelevant), same weight per expert.
    for i in range(53):
        got = dict(zip(np.asarray(ids[i]).tolist(), np.asarray(w[i]).tolist()))
        want = dict(zip(ref_ids[i].tolist(), ref_w[i].tolist()))
        assert got.keys() == want.keys(), (i, got, want)
        np.testing.assert_allclose([got[j] for j in want], list(want.values()), rtol=1e-5, atol=1e-7)


def test_route_bias_changes_selection_not_weights():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(8, 6)), jnp.float32)
    bias = jnp.zeros(6).at[5].set(100.0)
    ids, w = route(logits, bias, top_k=1, normalize=False)
    assert np.all(np.asarray(ids) == 5)
    np.testing.assert_allclose(w[:, 0], jax.nn.sigmoid(logits[:, 5]), rtol=1e-6)


def test_route_errors():
    logits = jnp.zeros((4, 8))
    with pytest.raises(ValueError, match="num_groups"):
        route(logits, None, top_k=2, num_groups=3)
    with pytest.raises(ValueError, match="top_k"):
        route(logits, None, top_k=5, num_groups=4, topk_groups=2)
    with pytest.raises(ValueError, match="score_func"):
        route(logits, None, top_k=2, score_func="relu")


def test_capacity_keeps_highest_affinity():
    r = np.random.default_rng(1)
    t, k, e, ndev, cap = 40, 2, 8, 4, 7
    ids = np.stack([r.choice(e, size=k, replace=False) for _ in range(t)])
    score = r.uniform(size=(t, k)).astype(np.float32)
    keep = np.asarray(capacity_keep(jnp.asarray(ids), jnp.asarray(score), num_experts=e, num_devices=ndev,
                                    capacity=cap))
    dev = ids // (e // ndev)
    for d in range(ndev):
        on_d = dev == d
        kept, dropped = score[on_d & keep], score[on_d & ~keep]
        assert len(kept) == min(cap, on_d.sum())
        if len(dropped):
            assert kept.min() >= dropped.max()


def _init(cfg, x, boxed=False):
    """Jitted init with an RBG key: threefry's compile alone costs seconds per shape on CPU."""
    v = jax.jit(lambda k: MoE(cfg, x.shape[-1], jnp.float32).init(k, x, train=False))(jax.random.key(0, impl="rbg"))
    return v if boxed else nn.meta.unbox(v)


def _x(seed, shape, shift=0.0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) + shift, jnp.float32)


def test_bias_update_steps_of_gamma_and_eval_is_frozen():
    cfg = MoEConfig(num_experts=8, top_k=2, expert_dim=8, gamma=0.01, gamma_zero_after_step=2)
    x = _x(1, (2, 16, 12), 1.0)
    v = _init(cfg, x)
    layer = MoE(cfg, 12, jnp.float32)
    apply = jax.jit(lambda v, train: layer.apply(v, x, train=train, mutable=["stats"])[1], static_argnums=1)
    mut = apply(v, False)
    assert np.all(np.asarray(mut["stats"]["router"].load) == 0), "eval must not count load"
    stats = v["stats"]
    for step in range(4):
        mut = apply({**v, "stats": stats}, True)
        st = mut["stats"]["router"]
        assert isinstance(st, RoutingBias) and float(st.load.sum()) == 2 * 16 * 2  # tokens * top_k
        new = finalize_step_statistics(mut["stats"], jnp.int32(step))
        delta = np.asarray(new["router"].bias - stats["router"].bias)
        gamma = 0.01 if step < 2 else 0.0
        expect = gamma * np.sign(np.mean(st.load) - np.asarray(st.load))
        np.testing.assert_allclose(delta, expect, atol=1e-7)
        assert np.all(np.isin(np.round(np.abs(delta) / 0.01, 5), [0.0, 1.0]))
        assert np.all(np.asarray(new["router"].load) == 0)
        if step == 0:
            assert np.any(delta != 0)
        stats = new
    mut = apply({**v, "stats": stats}, False)
    np.testing.assert_array_equal(mut["stats"]["router"].bias, stats["router"].bias)


def test_bias_untouched_by_adamw():
    cfg = MoEConfig(num_experts=4, top_k=2, expert_dim=8)
    x = _x(2, (2, 8, 12))
    boxed = _init(cfg, x, boxed=True)
    v = nn.meta.unbox(boxed)
    stats = jax.tree.map(lambda a: a + 0.5, v["stats"])  # non-zero bias: weight decay would shrink it
    opt = optax.adamw(1e-2, weight_decay=0.1, mask=weight_decay_mask(boxed["params"]))
    params, state = v["params"], opt.init(v["params"])
    assert "router" not in str(jax.tree_util.tree_structure(params))

    def loss(p):
        y, _ = MoE(cfg, 12, jnp.float32).apply({"params": p, "stats": stats}, x, train=True,
                                               mutable=["stats", "intermediates"])
        return jnp.sum(y**2)

    g = jax.jit(jax.grad(loss))(params)
    upd, state = opt.update(g, state, params)
    new_params = optax.apply_updates(params, upd)
    assert any(float(jnp.abs(a - b).max()) > 0 for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(params)))
    np.testing.assert_array_equal(stats["router"].bias, 0.5)


def test_device_limited_routing_under_mesh():
    """8 simulated devices, expert axis 8, M = 2: every token's experts lie on <= 2 devices."""
    mcfg = shd.MeshConfig(data=1, expert=8)
    mesh, rules = shd.make_mesh(mcfg), shd.logical_rules(mcfg)
    cfg = MoEConfig(num_experts=16, top_k=4, expert_dim=4, device_limited_m=2, num_shared=0, dispatch="dense")
    x = _x(3, (8, 4, 12))
    v = _init(cfg, x)
    v["params"]["gate"] = v["params"]["gate"] * 5.0  # spread scores: unrestricted Top-4 hits > 2 devices

    def devices_per_token(cfg_):
        def f(v, x):
            _, mut = MoE(cfg_, 12, jnp.float32).apply(v, x, train=True, mutable=["stats", "intermediates"])
            return mut["intermediates"]["metrics"][0]["max_devices_per_token"]

        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return int(jax.jit(f)(v, x))

    assert devices_per_token(cfg) <= 2
    assert devices_per_token(dataclasses.replace(cfg, device_limited_m=None)) > 2, "test must be able to fail"
