"""MoE layer: grouped dispatch vs dense reference and a float64 NumPy oracle, expert parallelism ==
single device (outputs and gradients), token dropping, balance losses, aux-loss-free balancing."""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from axlearn_like import sharding as shd
from axlearn_like.state import finalize_step_statistics
from models.moe import MoE, MoEConfig
from tests.oracle import assert_close

D = 12


def _init(cfg, x):
    """Jitted init with an RBG key: threefry's compile alone costs seconds per shape on CPU."""
    v = jax.jit(lambda k: MoE(cfg, D, jnp.float32).init(k, x, train=False))(jax.random.key(0, impl="rbg"))
    return nn.meta.unbox(v)


def _x(seed, shape, shift=0.0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) + shift, jnp.float32)


def _np_moe(x, p, bias, cfg):
    """float64 oracle of the whole layer (V3 gate, SwiGLU routed + shared experts), dropless."""
    x = np.asarray(x, np.float64).reshape(-1, D)
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    silu = lambda z: z / (1.0 + np.exp(-z))
    s = 1.0 / (1.0 + np.exp(-(x @ p["gate"])))
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        chosen = np.argsort(-(s[t] + bias), kind="stable")[: cfg.top_k]
        w = s[t, chosen] / s[t, chosen].sum() * cfg.route_scale
        for j, wj in zip(chosen, w):
            out[t] += wj * (silu(x[t] @ p["w_gate"][j]) * (x[t] @ p["w_up"][j])) @ p["w_down"][j]
        out[t] += (silu(x[t] @ p["shared_gate"]) * (x[t] @ p["shared_up"])) @ p["shared_down"]
    return out


CFG = MoEConfig(num_experts=8, top_k=2, expert_dim=8, num_shared=1, route_scale=1.5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_grouped_matches_dense_and_numpy(dtype):
    x = _x(0, (3, 7, D))
    v = _init(CFG, x)
    v["stats"]["router"] = v["stats"]["router"].replace(bias=jnp.asarray(np.linspace(-0.2, 0.2, 8), jnp.float32))

    def run(disp):
        def loss(v, x):
            y = MoE(dataclasses.replace(CFG, dispatch=disp), D, dtype).apply(v, x, train=False)
            return jnp.sum(y.astype(jnp.float32) ** 2), y

        if dtype == jnp.bfloat16:  # forward only: the f32 case covers the gradients (and CPU time is scarce)
            return (None, jax.jit(loss)(v, x)[1]), (None, None)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(v, x)

    (_, yg), (gg, gxg) = run("grouped")
    (_, yd), (gd, gxd) = run("dense")
    assert yg.dtype == dtype and yg.shape == x.shape
    ref = _np_moe(x.astype(dtype).astype(jnp.float32), v["params"], np.asarray(v["stats"]["router"].bias), CFG)
    assert_close(yg.reshape(-1, D), ref, dtype, "grouped vs numpy")
    assert_close(yg, yd, dtype, "grouped vs dense")
    if gg is None:
        return
    assert_close(gxg, gxd, dtype, "dx")
    for name in ("gate", "w_gate", "w_up", "w_down", "shared_down"):
        assert_close(gg["params"][name], gd["params"][name], dtype, f"d{name}")


def _mesh(expert):
    mcfg = shd.MeshConfig(data=8 // expert, expert=expert)
    return shd.make_mesh(mcfg), shd.logical_rules(mcfg)


def _loss_and_grads(cfg, v, x, mesh=None, rules=None):
    def loss(params, x):
        y, mut = MoE(cfg, D, jnp.float32).apply({**v, "params": params}, x, train=True,
                                                mutable=["stats", "intermediates"])
        aux = sum(jax.tree.leaves(mut["intermediates"]["aux_loss"]))
        return jnp.sum(y * jnp.cos(jnp.arange(D))) + aux, (y, mut["stats"]["router"].load)

    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    if mesh is None:
        return f(v["params"], x)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return f(v["params"], x)


_EP_CFG = dataclasses.replace(CFG, num_experts=16, top_k=3, expert_aux_alpha=0.01)


@functools.cache
def _single_device_ep_case():
    x = _x(1, (8, 5, D))
    v = _init(_EP_CFG, x)
    return x, v, _loss_and_grads(_EP_CFG, v, x)


@pytest.mark.parametrize("expert", [4, 8])
def test_expert_parallel_equals_single_device(expert):
    cfg = _EP_CFG
    x, v, ((l1, (y1, load1)), (g1, gx1)) = _single_device_ep_case()
    (l2, (y2, load2)), (g2, gx2) = _loss_and_grads(cfg, v, x, *_mesh(expert))
    np.testing.assert_array_equal(load1, load2)
    assert_close(y2, y1, jnp.float32, "y")
    assert_close(l2, l1, jnp.float32, "loss")
    assert_close(gx2, gx1, jnp.float32, "dx")
    for name in g1:
        assert_close(g2[name], g1[name], jnp.float32, f"d{name}")


def test_expert_parallel_dropping_device_limited_equals_dense():
    """Capacity + device-limited routing under expert axis 4: the all-to-all path == the dense reference."""
    cfg = dataclasses.replace(CFG, num_experts=16, top_k=4, capacity_factor=0.6, device_limited_m=2)
    x = _x(2, (8, 4, D))
    v = _init(cfg, x)
    mesh, rules = _mesh(4)
    (_, (ye, _)), (ge, _) = _loss_and_grads(cfg, v, x, mesh, rules)
    (_, (yd, _)), (gd, _) = _loss_and_grads(dataclasses.replace(cfg, dispatch="dense"), v, x, mesh, rules)
    assert_close(ye, yd, jnp.float32, "y")
    for name in ge:
        assert_close(ge[name], gd[name], jnp.float32, f"d{name}")


def test_dropping_train_only_and_residual_path():
    cfg = dataclasses.replace(CFG, num_shared=0, capacity_factor=0.25)
    x = _x(3, (2, 8, D))
    v = _init(cfg, x)

    @jax.jit
    def run(v, x):
        out = {}
        for train in (True, False):
            y, mut = MoE(cfg, D, jnp.float32).apply(v, x, train=train, mutable=["stats", "intermediates"])
            out[train] = (y, mut["intermediates"]["metrics"][0]["dropped_fraction"])
        return out

    out = run(v, x)
    (y_tr, drop_tr), (y_ev, drop_ev) = out[True], out[False]
    assert float(drop_ev) == 0.0
    np.testing.assert_allclose(float(drop_tr), 0.75, atol=1e-6)  # capacity 0.25 * T * K on the one device
    # Tokens with every assignment dropped contribute nothing (the decoder's residual carries them).
    zero_rows = np.all(np.asarray(y_tr).reshape(-1, D) == 0, axis=-1)
    assert zero_rows.sum() >= 16 - 8 and not np.all(zero_rows)
    assert not np.any(np.all(np.asarray(y_ev).reshape(-1, D) == 0, axis=-1))


def test_sequence_balance_loss_matches_numpy():
    cfg = dataclasses.replace(CFG, seq_aux_alpha=0.3)
    x = _x(4, (3, 5, D))
    v = _init(cfg, x)
    _, mut = jax.jit(lambda v, x: MoE(cfg, D, jnp.float32).apply(v, x, train=False, mutable=["intermediates"]))(v, x)
    got = float(mut["intermediates"]["aux_loss"][0])
    xs = np.asarray(x, np.float64).reshape(3, 5, D)
    s = 1.0 / (1.0 + np.exp(-(xs @ np.asarray(v["params"]["gate"], np.float64))))
    total = 0.0
    for b in range(3):
        chosen = np.argsort(-s[b], axis=-1, kind="stable")[:, :2]
        f = np.bincount(chosen.ravel(), minlength=8) * 8 / (2 * 5)
        p = (s[b] / s[b].sum(-1, keepdims=True)).mean(0)
        total += (f * p).sum()
    np.testing.assert_allclose(got, 0.3 * total / 3, rtol=1e-5)


def test_aux_free_balancing_lowers_maxvio():
    """Fixed synthetic regression task whose inputs share a mean direction, so the initial router is
    skewed. With gamma > 0 (no aux loss) MaxVio_batch must end clearly below the gamma = 0 run."""
    r = np.random.default_rng(5)
    mu = r.normal(size=D) * 1.5
    xs = jnp.asarray(r.normal(size=(20, 4, 16, D)) + mu, jnp.float32)  # 20 steps of [4, 16, D]
    target = jnp.asarray(r.normal(size=(D, D)) / np.sqrt(D), jnp.float32)

    def train(gamma):
        cfg = dataclasses.replace(CFG, num_experts=8, top_k=2, gamma=gamma, seq_aux_alpha=0.0, num_shared=0)
        v = _init(cfg, xs[0])
        opt = optax.adam(3e-3)

        @jax.jit
        def step(params, stats, opt_state, x, i):
            def loss(p):
                y, mut = MoE(cfg, D, jnp.float32).apply({"params": p, "stats": stats}, x, train=True,
                                                       mutable=["stats", "intermediates"])
                return jnp.mean((y - x @ target) ** 2), mut

            (l, mut), g = jax.value_and_grad(loss, has_aux=True)(params)
            upd, opt_state = opt.update(g, opt_state, params)
            stats = finalize_step_statistics(mut["stats"], i)
            return (optax.apply_updates(params, upd), stats, opt_state,
                    mut["intermediates"]["metrics"][0]["maxvio_batch"])

        params, stats, opt_state = v["params"], v["stats"], opt.init(v["params"])
        vios = []
        for _ in range(3):  # 60 steps
            for i in range(20):
                params, stats, opt_state, vio = step(params, stats, opt_state, xs[i], jnp.int32(i))
                vios.append(float(vio))
        return np.mean(vios[:5]), np.mean(vios[-10:])

    start_free, end_free = train(0.0)
    start_bal, end_bal = train(0.02)
    print(f"MaxVio_batch first/last: gamma=0 {start_free:.3f}/{end_free:.3f}, gamma=0.02 {start_bal:.3f}/{end_bal:.3f}")
    assert start_free > 1.0, "the task must start imbalanced for this test to mean anything"
    assert end_bal < 0.5 * end_free, (end_bal, end_free)


def test_grouped_dropping_equals_dense():
    """Single-device grouped dispatch with dropped assignments (id E, sorted past every group, weight 0)
    matches the dense one-hot reference in outputs and gradients."""
    cfg = dataclasses.replace(CFG, capacity_factor=0.5)
    x = _x(8, (2, 9, D))
    v = _init(cfg, x)
    (l1, (y1, _)), (g1, gx1) = _loss_and_grads(cfg, v, x)
    (l2, (y2, _)), (g2, gx2) = _loss_and_grads(dataclasses.replace(cfg, dispatch="dense"), v, x)
    assert_close(y1, y2, jnp.float32, "y")
    assert_close(gx1, gx2, jnp.float32, "dx")
    for name in ("gate", "w_gate", "w_up", "w_down"):
        assert_close(g1[name], g2[name], jnp.float32, f"d{name}")


def test_gather_only_dispatch_grads():
    """The custom-VJP row gathers of the grouped dispatch (backward = gather through the inverse
    permutation) give the same values and gradients as plain jnp indexing (whose backward scatter-adds)."""
    from models.moe import _dispatch_rows, _permute_rows

    t, k, d = 7, 3, 5
    r = np.random.default_rng(9)
    x = jnp.asarray(r.normal(size=(t, d)), jnp.float32)
    y = jnp.asarray(r.normal(size=(t * k, d)), jnp.float32)
    order = jnp.asarray(r.permutation(t * k), jnp.int32)
    inv = jnp.zeros_like(order).at[order].set(jnp.arange(t * k, dtype=jnp.int32))
    c1 = jnp.asarray(r.normal(size=(t * k, d)), jnp.float32)
    f_custom = lambda x, y: jnp.sum(c1 * (_dispatch_rows(x, order, inv, k) + 2 * _permute_rows(y, inv, order)))
    f_plain = lambda x, y: jnp.sum(c1 * (x[order // k] + 2 * y[inv]))
    np.testing.assert_allclose(f_custom(x, y), f_plain(x, y), rtol=1e-6)
    for a, b in zip(jax.grad(f_custom, argnums=(0, 1))(x, y), jax.grad(f_plain, argnums=(0, 1))(x, y)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
def test_layer_triton_matches_dense_gpu():
    cfg = dataclasses.replace(CFG, num_experts=16, top_k=4, expert_dim=64, implementation="triton")
    x = _x(6, (4, 64, D))
    v = _init(cfg, x)

    def run(c):
        def loss(p, x):
            y = MoE(c, D, jnp.bfloat16).apply({**v, "params": p}, x, train=False)
            return jnp.sum(y.astype(jnp.float32) ** 2), y

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(v["params"], x)

    (_, yt), (gt, gxt) = run(cfg)
    (_, yd), (gd, gxd) = run(dataclasses.replace(cfg, dispatch="dense"))
    assert_close(yt, yd, jnp.bfloat16, "y")
    assert_close(gxt, gxd, jnp.bfloat16, "dx")
    for name in ("w_gate", "w_up", "w_down", "gate"):
        assert_close(gt[name], gd[name], jnp.bfloat16, f"d{name}")


def test_router_init_std():
    """router_init_std draws the gate from N(0, std) (DeepSeek's 0.006); None keeps fan-in scaling, 1/sqrt(D).
    A wide gate (D x 256 experts) so the sample std is within a few percent of the drawn one."""
    x = _x(0, (1, 3, D))
    wide = dataclasses.replace(CFG, num_experts=256, top_k=2)
    for std, want in ((None, 1 / np.sqrt(D)), (0.006, 0.006)):
        gate = np.asarray(_init(dataclasses.replace(wide, router_init_std=std), x)["params"]["gate"])
        assert abs(gate.std() / want - 1) < 0.12, (std, gate.std())
