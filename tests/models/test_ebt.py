"""EBT: System-2 attention vs the dense 2S x 2S mask and a float64 NumPy oracle, no leakage, the inner-loop
gradient vs finite differences, second-order gradients, self-verification, thinking lowers energy after a
short training, replay buffer + alpha across kill-and-resume."""
import dataclasses
import os
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from axlearn_like.config import ConfigError, validate_tree
from axlearn_like.params import unbox_values
from models.attention import AttentionConfig
from models.ebt import (
    EBTConfig,
    System2AttentionConfig,
    alpha_value,
    predicted_attention,
    system2_attention,
    system2_attention_dense,
    system2_mask,
    think,
)
from models.layers import MLPConfig
from tests.oracle import rel_err

V = 13


# keyword -> the System2AttentionConfig field it sets
_ATTENTION_KW = {"attention_form": "form", "attention_query_block": "query_block", "predicted_attention": "predicted"}


def small_cfg(attention: AttentionConfig | None = None, **kw) -> EBTConfig:
    """A tiny EBT; `attention` (projection sizes) and the _ATTENTION_KW keywords set its System-2 layers."""
    dims = dataclasses.asdict(attention or AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=4))
    dims.update({field: kw.pop(key) for key, field in _ATTENTION_KW.items() if key in kw})
    base = dict(vocab_size=V, d_model=16, num_layers=2, dtype="float32",
                layer_pattern=(System2AttentionConfig(**dims),), ffn_pattern=(MLPConfig(mlp_dim=24),))
    base.update(kw)
    cfg = EBTConfig(**base)
    validate_tree(cfg)
    return cfg


def batch(b, s, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    x = jax.random.randint(k1, (b, s + 1), 0, V, jnp.int32)
    return {"inputs": x[:, :-1], "targets": x[:, 1:], "loss_mask": jnp.ones((b, s), jnp.float32)}


@pytest.fixture(scope="module")
def model():
    cfg = small_cfg()
    task = cfg.build()
    params = unbox_values(task.init(jax.random.key(0), batch(2, 7)))["params"]
    return task, params


# --- attention ---------------------------------------------------------------------------------------------
def _numpy_system2(q, k, v, seg):
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    b, s2, h, d = q.shape
    s, g = s2 // 2, h // k.shape[2]
    mask = np.asarray(system2_mask(s))
    out = np.zeros_like(q)
    for bi in range(b):
        seg2 = np.concatenate([seg[bi], seg[bi]])
        m = mask & (seg2[:, None] == seg2[None, :])
        for hi in range(h):
            sc = q[bi, :, hi] @ k[bi, :, hi // g].T / np.sqrt(d)
            sc = np.where(m, sc, -np.inf)
            w = np.exp(sc - sc.max(-1, keepdims=True))
            out[bi, :, hi] = (w / w.sum(-1, keepdims=True)) @ v[bi, :, hi // g]
    return out


def test_system2_mask_semantics():
    m = np.asarray(system2_mask(3))
    # observed i sees observed 0..i; prediction i sees observed 0..i and itself, never another prediction
    want = np.zeros((6, 6), bool)
    for i in range(3):
        want[i, : i + 1] = True
        want[3 + i, : i + 1] = True
        want[3 + i, 3 + i] = True
    np.testing.assert_array_equal(m, want)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 2e-2)])
def test_efficient_attention_matches_dense_and_oracle(dtype, tol):
    b, s, h, kv, d = 2, 5, 4, 2, 6
    ks = jax.random.split(jax.random.key(int(time.time()) % 1000), 4)
    q = jax.random.normal(ks[0], (b, 2 * s, h, d)).astype(dtype)
    k = jax.random.normal(ks[1], (b, 2 * s, kv, d)).astype(dtype)
    v = jax.random.normal(ks[2], (b, 2 * s, kv, d)).astype(dtype)
    seg = jnp.array([[1, 1, 1, 2, 2], [1, 1, 1, 1, 1]], jnp.int32)
    eff = system2_attention(q, k, v, seg)
    dense = system2_attention_dense(q, k, v, seg)
    oracle = _numpy_system2(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), np.asarray(seg))
    assert rel_err(np.asarray(eff, np.float64), oracle) < tol
    assert rel_err(np.asarray(dense, np.float64), oracle) < tol
    blocked = predicted_attention(q[:, s:], k[:, s:], v[:, s:], k[:, :s], v[:, :s], seg, query_block=2)  # 2+2+1
    assert rel_err(np.asarray(blocked, np.float64), oracle[:, s:]) < tol
    if dtype != jnp.float32:
        return
    ct = jax.random.normal(ks[3], eff.shape)
    g_eff = jax.vjp(lambda *a: system2_attention(*a, seg), q, k, v)[1](ct)
    g_dense = jax.vjp(lambda *a: system2_attention_dense(*a, seg), q, k, v)[1](ct)
    for a, bb in zip(g_eff, g_dense):
        assert rel_err(np.asarray(a, np.float64), np.asarray(bb, np.float64)) < 1e-4


@pytest.mark.parametrize("query_block", [None, 3])
def test_model_efficient_equals_dense_form(model, query_block):
    _, params = model
    task = small_cfg(attention_query_block=query_block).build()
    dense_task = small_cfg(attention_form="dense").build()
    bt = batch(2, 7, seed=3)
    p = jax.nn.softmax(jax.random.normal(jax.random.key(4), (2, 7, V)))
    f = lambda t: jax.value_and_grad(lambda pr, pp: jnp.sum(jnp.sin(t.energy(pr, bt["inputs"], pp))),
                                     argnums=(0, 1))(params, p)
    (e1, (gp1, gx1)), (e2, (gp2, gx2)) = f(task), f(dense_task)
    assert rel_err(np.asarray(e1), np.asarray(e2)) < 1e-5
    assert rel_err(np.asarray(gx1), np.asarray(gx2)) < 1e-4
    for a, b in zip(jax.tree.leaves(gp1), jax.tree.leaves(gp2)):
        assert rel_err(np.asarray(a), np.asarray(b)) < 1e-4


# --- leakage ----------------------------------------------------------------------------------------------
def test_no_leakage(model):
    task, params = model
    s, i = 7, 3
    bt = batch(2, s, seed=5)
    p = jax.nn.softmax(jax.random.normal(jax.random.key(6), (2, s, V)))
    tok2 = bt["inputs"].at[:, i + 1:].set((bt["inputs"][:, i + 1:] + 5) % V)
    p2 = p.at[:, i + 1:].set(jax.nn.softmax(jax.random.normal(jax.random.key(7), (2, s - i - 1, V))))
    e1, e2 = task.energy(params, bt["inputs"], p), task.energy(params, tok2, p2)
    np.testing.assert_allclose(e1[:, : i + 1], e2[:, : i + 1], rtol=1e-6, atol=1e-6)
    assert np.abs(np.asarray(e1[:, i + 1:] - e2[:, i + 1:])).max() > 1e-6  # the test can see a change
    v = {"params": params}
    t1 = task.think(v, bt["inputs"], jax.random.key(8), steps=3, num_candidates=2)
    t2 = task.think(v, tok2, jax.random.key(8), steps=3, num_candidates=2)
    np.testing.assert_allclose(t1["logits"][:, : i + 1], t2["logits"][:, : i + 1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(t1["energies"][:, :, : i + 1], t2["energies"][:, :, : i + 1], rtol=1e-5, atol=1e-6)


# --- inner loop -------------------------------------------------------------------------------------------
def test_inner_gradient_matches_finite_differences(model):
    task, params = model
    bt = batch(2, 7, seed=9)
    efn = jax.jit(lambda p: task.energy(params, bt["inputs"], p))
    y0 = jax.random.normal(jax.random.key(10), (2, 7, V))
    alpha = alpha_value(params)
    res = think(efn, y0, alpha, 1)
    p0 = jax.nn.softmax(y0)
    g = (np.asarray(p0, np.float64) - np.asarray(res.logits[0], np.float64)) / float(alpha)  # the step's dE/dp
    rng = np.random.default_rng(0)
    f = lambda p: float(jnp.sum(efn(jnp.asarray(p, jnp.float32))))
    for _ in range(3):
        u = rng.normal(size=p0.shape)
        cd = lambda h, u=u: (f(np.asarray(p0) + h * u) - f(np.asarray(p0) - h * u)) / (2 * h)
        fd = (4 * cd(5e-3) - cd(1e-2)) / 3  # Richardson: O(h^4) truncation, float32 round-off stays small
        np.testing.assert_allclose(np.sum(g * u), fd, rtol=2e-3, atol=1e-5)


def test_second_order_grads_finite_and_nonzero(loss_steps="last"):
    """S2 loss; the S1 ("all") loss is covered by test_second_order_jvp_mode_equals_reverse."""
    cfg = small_cfg(loss_steps=loss_steps, think_steps=2, think_steps_random=1, step_size_spread=2.0, langevin_std=0.3)
    task = cfg.build()
    bt = batch(2, 5, seed=11)
    params = unbox_values(task.init(jax.random.key(1), bt))["params"]
    grads = jax.grad(lambda p: task.loss({"params": p, "stats": {}}, bt, jax.random.key(2), train=True)[0])(params)
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)
    assert abs(float(grads["alpha"])) > 0
    # the CE reaches the energy head only through dE/dp: a nonzero gradient there is second-order
    assert float(jnp.abs(grads["energy_head"]["kernel"]).max()) > 0
    assert float(jnp.abs(grads["stack"]["layer_0"]["mixer"]["query"]["kernel"]).max()) > 0


@pytest.mark.parametrize("second_order, predicted, detach", [("jvp", "jnp", False), ("jvp", "xla", False),
                                                              ("jvp", "pallas", False), ("reverse", "xla", False),
                                                              ("jvp", "jnp", True)])
def test_second_order_jvp_mode_equals_reverse(second_order, predicted, detach, form="efficient"):
    """second_order="jvp" (custom VJP: gradient of a JVP) gives the reverse-over-reverse gradients, also with the
    predicted stream's attention through kernels.jvp_attention (its forward-mode rules; reverse mode
    differentiates its jnp backward), and with second order through the last step only (detach_earlier)."""
    kw = dict(loss_steps="all", think_steps=2, think_steps_random=1, step_size_spread=2.0, langevin_std=0.3,
              attention_form=form, detach_earlier=detach)
    bt = batch(2, 5, seed=21)
    rev = small_cfg(**kw).build()
    fwd = small_cfg(second_order=second_order, predicted_attention=predicted, **kw).build()
    params = unbox_values(rev.init(jax.random.key(3), bt))["params"]
    g = lambda t: jax.grad(lambda p: t.loss({"params": p, "stats": {}}, bt, jax.random.key(4), train=True)[0])(params)
    g_rev, g_fwd = g(rev), g(fwd)
    for a, b in zip(jax.tree.leaves(g_rev), jax.tree.leaves(g_fwd)):
        assert bool(jnp.all(jnp.isfinite(a)))
        assert rel_err(np.asarray(b, np.float64), np.asarray(a, np.float64)) < 1e-4
    assert abs(float(g_rev["alpha"])) > 0
    assert float(jnp.abs(g_fwd["energy_head"]["kernel"]).max()) > 0  # the second-order path is exercised
    with pytest.raises(ConfigError, match="second_order"):
        small_cfg(second_order="forward")
    with pytest.raises(ConfigError, match="set model.second_order=jvp"):
        small_cfg(predicted_attention="triton")


def _unrolled_truncated(energy, params, y0, alpha, steps, noise, scale):
    """The reference's --truncate_mcmc --no_mcmc_detach written out step by step: every step but the last
    takes dE/dp as a constant (create_graph=False), the last one differentiably; y stays attached."""
    y = y0
    for k in range(steps):
        p = jax.nn.softmax(y + noise[k], axis=-1)
        if k < steps - 1:
            g = jax.grad(lambda q: jnp.sum(energy(jax.lax.stop_gradient(params), q)))(jax.lax.stop_gradient(p))
            g = jax.lax.stop_gradient(g)
        else:
            g = jax.grad(lambda q: jnp.sum(energy(params, q)))(p)
        y = p - alpha * scale[..., None] * g
    return y


@pytest.mark.parametrize("steps, active", [(3, None), (4, 2), (1, None)])
def test_detach_earlier_is_second_order_through_the_last_step_only(model, steps, active):
    task, params = model
    bt = batch(2, 5, seed=31)
    y0 = jax.random.normal(jax.random.key(32), (2, 5, V))
    scale = jax.random.uniform(jax.random.key(33), (2, 5), minval=0.5, maxval=2.0)
    std, rng = 0.3, jax.random.key(34)
    n = steps if active is None else active
    noise = [std * jax.random.normal(jax.random.fold_in(rng, k), y0.shape) for k in range(n)]
    w = jax.random.normal(jax.random.key(35), (2, 5, V))
    energy = lambda pr, p: task.energy(pr, bt["inputs"], p)

    def via_think(pr, a, detach):
        res = think(lambda p: energy(pr, p), y0, a, steps, active_steps=None if active is None else jnp.int32(active),
                    step_scale=scale, langevin_std=std, rng=rng, detach_earlier=detach)
        return jnp.sum(res.logits[-1] * w)

    alpha = jnp.float32(2.0)
    want = jax.grad(lambda pr, a: jnp.sum(_unrolled_truncated(energy, pr, y0, a, n, noise, scale) * w),
                    argnums=(0, 1))(params, alpha)
    got = jax.grad(lambda pr, a: via_think(pr, a, True), argnums=(0, 1))(params, alpha)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert rel_err(np.asarray(a, np.float64), np.asarray(b, np.float64)) < 1e-4
    # same forward
    np.testing.assert_allclose(via_think(params, alpha, True), via_think(params, alpha, False), rtol=1e-5)
    if n > 1:  # the full second-order gradient differs: the test can tell the two apart
        full = jax.grad(lambda pr: via_think(pr, alpha, False))(params)
        assert rel_err(np.asarray(full["energy_head"]["kernel"], np.float64),
                       np.asarray(want[0]["energy_head"]["kernel"], np.float64)) > 1e-2


def test_detach_chain_starts_every_step_from_detached_logits(model):
    """detach_chain (the reference's S1 between-step detach): the mean over steps of a loss on y_k has the gradient
    of an explicit unrolled chain in which every step starts from stop_gradient(y_{k-1}) (second order through
    each step's own inner gradient only), and differs from the attached chain's."""
    task, params = model
    bt = batch(2, 5, seed=41)
    y0 = jax.random.normal(jax.random.key(42), (2, 5, V))
    std, rng, steps = 0.3, jax.random.key(44), 3
    noise = [std * jax.random.normal(jax.random.fold_in(rng, k), y0.shape) for k in range(steps)]
    w = jax.random.normal(jax.random.key(45), (steps, 2, 5, V))
    energy = lambda pr, p: task.energy(pr, bt["inputs"], p)

    def unrolled(pr, a):
        y, out = y0, []
        for k in range(steps):
            p = jax.nn.softmax(jax.lax.stop_gradient(y) + noise[k], axis=-1)
            g = jax.grad(lambda q: jnp.sum(energy(pr, q)))(p)
            y = p - a * g
            out.append(y)
        return jnp.sum(jnp.stack(out) * w)

    def via_think(pr, a, detach_chain):
        res = think(lambda p: energy(pr, p), y0, a, steps, langevin_std=std, rng=rng, detach_chain=detach_chain)
        return jnp.sum(res.logits * w)

    alpha = jnp.float32(2.0)
    want = jax.grad(unrolled, argnums=(0, 1))(params, alpha)
    got = jax.grad(lambda pr, a: via_think(pr, a, True), argnums=(0, 1))(params, alpha)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert rel_err(np.asarray(a, np.float64), np.asarray(b, np.float64)) < 1e-4
    np.testing.assert_allclose(via_think(params, alpha, True), via_think(params, alpha, False), rtol=1e-5)
    attached = jax.grad(lambda pr: via_think(pr, alpha, False))(params)
    assert rel_err(np.asarray(attached["energy_head"]["kernel"], np.float64),
                   np.asarray(want[0]["energy_head"]["kernel"], np.float64)) > 1e-2
    # the config field reaches the loss: one gradient step of the task differs with and without it
    cfg = dataclasses.replace(task.cfg, loss_steps="all", think_steps=3)
    grads = []
    for dc in (False, True):
        t = dataclasses.replace(cfg, detach_chain=dc).build()
        grads.append(jax.grad(lambda pr, t=t: t.loss({"params": pr}, bt, jax.random.key(3), train=True)[0])(params))
    assert rel_err(np.asarray(grads[0]["energy_head"]["kernel"], np.float64),
                   np.asarray(grads[1]["energy_head"]["kernel"], np.float64)) > 1e-3


def test_alpha_clamp_and_lr_scale():
    from axlearn_like.params import lr_scales

    cfg = small_cfg(alpha_lr_scale=7.0)
    boxed = cfg.build().init(jax.random.key(0), batch(1, 3))
    assert lr_scales(boxed["params"])["alpha"] == 7.0
    assert float(alpha_value({"alpha": jnp.float32(-3.0)})) == pytest.approx(1e-4)
    # the update the optimizer applies: alpha's is 7x what it would be at scale 1, every other one unchanged
    from axlearn_like.optimizers import OptimizerConfig, make_optimizer
    from axlearn_like.params import weight_decay_mask

    params = unbox_values(boxed["params"])
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.01, p.dtype), params)
    ocfg = OptimizerConfig(learning_rate=1e-3, warmup_steps=0, weight_decay=0.0)
    decay = weight_decay_mask(boxed["params"])
    ones = jax.tree.map(lambda s: 1.0, lr_scales(boxed["params"]))
    updates = {}
    for name, scales in (("scaled", lr_scales(boxed["params"])), ("plain", ones)):
        opt, _ = make_optimizer(ocfg, 10, decay_mask=decay, lr_scales=scales)
        updates[name], _ = opt.update(grads, opt.init(params), params)
    assert float(updates["plain"]["alpha"]) != 0.0
    np.testing.assert_allclose(float(updates["scaled"]["alpha"]), 7.0 * float(updates["plain"]["alpha"]), rtol=1e-6)
    rest = lambda u: [x for path, x in jax.tree_util.tree_leaves_with_path(u) if path[0].key != "alpha"]
    for a, b in zip(rest(updates["scaled"]), rest(updates["plain"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ConfigError, match="layer_pattern"):
        small_cfg(layer_pattern=(AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=4),))


# --- inference --------------------------------------------------------------------------------------------
def test_self_verification_picks_min_energy(model):
    task, params = model
    bt = batch(3, 6, seed=12)
    out = task.think({"params": params}, bt["inputs"], jax.random.key(13), steps=2, num_candidates=5)
    ce = np.asarray(out["candidate_energy"])
    assert ce.shape == (5, 3, 6)
    np.testing.assert_array_equal(np.asarray(out["candidate"]), ce.argmin(0))
    np.testing.assert_allclose(np.asarray(out["energy"]), ce.min(0), rtol=1e-6)
    assert len(np.unique(np.asarray(out["candidate"]))) > 1  # positions really choose different candidates
    # the returned logits are that candidate's: re-scoring them gives the reported energy
    e = task.energy(params, bt["inputs"], jax.nn.softmax(out["logits"]))
    np.testing.assert_allclose(np.asarray(e), np.asarray(out["energy"]), rtol=1e-4, atol=1e-5)


def test_step_losses_is_the_thinking_curve_of_think(model):
    """EBT.step_losses (one run, the CE after each step) equals think(steps=k)'s masked CE for every k with the
    same rng and no noise: the same start, the same steps."""
    from models.lm import cross_entropy

    task, params = model
    bt = {**batch(3, 6, seed=21), "loss_mask": jnp.asarray(np.random.default_rng(2).random((3, 6)) > 0.3,
                                                             jnp.float32)}
    rng = jax.random.key(22)
    curve = np.asarray(task.step_losses({"params": params}, bt, rng, 3))
    for k in (1, 2, 3):
        out = task.think({"params": params}, bt["inputs"], rng, steps=k, langevin_std=0.0)
        want = float(jnp.sum(cross_entropy(out["logits"], bt["targets"])[0] * bt["loss_mask"]))
        np.testing.assert_allclose(curve[k - 1], want, rtol=1e-5)
    assert curve[0] != curve[2]


def test_more_thinking_lowers_energy_after_training():
    cfg = small_cfg(num_layers=1, think_steps=1, think_steps_random=2, alpha_init=10.0)  # trained on K in {1,2,3}
    task = cfg.build()
    rng = np.random.default_rng(0)
    # a learnable sequence: x_{t+1} = (x_t + 1) mod V
    start = rng.integers(0, V, (16, 1))
    seq = (start + np.arange(9)) % V
    bt = {"inputs": jnp.asarray(seq[:, :-1], jnp.int32), "targets": jnp.asarray(seq[:, 1:], jnp.int32),
          "loss_mask": jnp.ones((16, 8), jnp.float32)}
    params = unbox_values(task.init(jax.random.key(0), bt))["params"]
    opt = optax.adam(3e-3)
    state = opt.init(params)

    @jax.jit
    def step(params, state, i):
        key = jax.random.fold_in(jax.random.key(1), i)
        l, g = jax.value_and_grad(lambda p, key=key: task.loss({"params": p, "stats": {}}, bt, key, train=True)[0])(
            params)
        g = dict(g, alpha=g["alpha"] * 30.0)
        up, state = opt.update(g, state)
        return optax.apply_updates(params, up), state, l

    losses = []
    for i in range(40):
        params, state, l = step(params, state, i)
        losses.append(float(l))
    assert losses[-1] < losses[0] - 0.3, losses
    out = task.think({"params": params}, bt["inputs"], jax.random.key(2), steps=3)
    mean_e = np.asarray(out["energies"]).mean(axis=(1, 2))  # mean energy after 0, 1, 2, 3 thinking steps
    assert mean_e[0] > mean_e[1] > mean_e[3], mean_e


# --- fidelity to the reference code (issue 22) --------------------------------------------------------------
def _replay_setup(**kw):
    cfg = small_cfg(num_layers=1, think_steps=2, replay_size=4, replay_fraction=1.0, **kw)
    task = cfg.build()
    bt = batch(4, 6, seed=41)
    v = unbox_values(task.init(jax.random.key(0), bt))
    return task, v


def test_replay_buffer_replays_rows_whole():
    """The ring stores each training row's tokens, targets and mask with the final logits it reached; a later
    step appends the stored rows (their own text, restarting from their logits) to its fresh batch, as the
    reference's CausalReplayBuffer does. Checked against an explicit think on the stored rows."""
    from models.ebt import think as think_fn

    task, v = _replay_setup()
    a, b = batch(4, 6, seed=42), batch(4, 6, seed=43)
    b["loss_mask"] = b["loss_mask"].at[:, :2].set(0.0)
    rng1, rng2 = jax.random.key(5), jax.random.key(6)
    total1, m1, st1 = task.loss(v, a, rng1, train=True)
    assert float(m1["replay_rows"]) == 0 and float(total1) == pytest.approx(float(m1["loss"]), rel=1e-6)  # empty ring
    buf = st1["stats"]["replay"]
    assert int(buf["count"]) == 4
    for k in ("inputs", "targets", "loss_mask"):
        np.testing.assert_array_equal(np.asarray(buf[k]), np.asarray(a[k]))
    alpha = alpha_value(v["params"])
    y0 = task.initial_logits(jax.random.split(rng1, 5)[0], (4, 6))
    want = think_fn(task._energy_fn(v["params"], a["inputs"], {}), y0, alpha, 2).logits[-1]
    np.testing.assert_allclose(np.asarray(buf["logits"]), np.asarray(want), rtol=1e-5, atol=1e-6)

    total2, m2, st2 = task.loss({**v, "stats": st1["stats"]}, b, rng2, train=True)
    assert float(m2["replay_rows"]) == 4 and int(st2["stats"]["replay"]["count"]) == 8
    np.testing.assert_array_equal(np.asarray(st2["stats"]["replay"]["inputs"]), np.asarray(b["inputs"]))
    # the replayed rows' CE (all four rows, any order): think on their own tokens from their stored logits
    rep = think_fn(task._energy_fn(v["params"], buf["inputs"], {}), buf["logits"], alpha, 2).logits[-1]
    from models.lm import cross_entropy

    ce_rep = float(jnp.sum(cross_entropy(rep, buf["targets"])[0] * buf["loss_mask"]))
    n_a, n_b = float(jnp.sum(a["loss_mask"])), float(jnp.sum(b["loss_mask"]))
    assert float(m2["tokens"]) == n_b  # the reported loss and token count are the fresh rows'
    assert float(total2) == pytest.approx((float(m2["loss"]) * n_b + ce_rep) / (n_a + n_b), rel=1e-5)


def test_replay_sample_draws_distinct_filled_rows():
    from models.ebt import replay_sample

    r = 6
    buf = {"inputs": jnp.arange(r)[:, None] * jnp.ones((1, 3), jnp.int32), "logits": jnp.zeros((r, 3, 2)),
           "count": jnp.int32(3)}
    seen = set()
    for i in range(20):
        rows, valid = replay_sample(buf, 4, jax.random.key(i))
        ids = np.asarray(rows["inputs"][:, 0])
        assert len(set(ids)) == 4 and sorted(ids[np.asarray(valid) > 0]) == [0, 1, 2]  # 3 filled, 1 invalid
        seen.update(ids[np.asarray(valid) > 0][:1].tolist())
    assert seen == {0, 1, 2}  # every filled row gets drawn first sometimes
    rows, valid = replay_sample({**buf, "count": jnp.int32(40)}, 4, jax.random.key(0))
    assert float(jnp.sum(valid)) == 4 and len(set(np.asarray(rows["inputs"][:, 0]))) == 4


def test_eval_thinks_the_trained_maximum_and_reports_each_step():
    cfg = small_cfg(think_steps=2, think_steps_random=1, eval_report_steps=5)
    task = cfg.build()
    bt = batch(2, 6, seed=44)
    v = unbox_values(task.init(jax.random.key(0), bt))
    _, m, _ = task.loss(v, bt, jax.random.key(1), train=False)
    assert cfg.eval_steps() == 3 and float(m["loss"]) == float(m["loss_think3"])
    assert [k for k in m if k.startswith("loss_think")] == [f"loss_think{k}" for k in range(1, 6)]
    _, m1, _ = small_cfg(eval_think_steps=1, eval_report_steps=0).build().loss(v, bt, jax.random.key(1), train=False)
    assert float(m1["loss"]) == pytest.approx(float(m["loss_think1"]), rel=1e-6)
    assert not any(k.startswith("loss_think") for k in m1)
    out = task.think(v, bt["inputs"], jax.random.key(2))
    assert out["energies"].shape[0] == 4  # 3 steps (+ the final energy)


def test_think_defaults_to_the_inference_langevin_noise():
    """think/generate add Langevin noise to every step by default (infer_langevin_std, else langevin_std), as the
    reference infers with noise; self-verification's candidates then differ by noise, not only by start."""
    bt = batch(2, 6, seed=45)
    v = unbox_values(small_cfg().build().init(jax.random.key(0), bt))
    run = lambda cfg, **kw: np.asarray(cfg.build().think(v, bt["inputs"], jax.random.key(3), steps=3, num_candidates=4,
                                                         **kw)["logits"])
    quiet, noisy = run(small_cfg(), langevin_std=0.0), run(small_cfg(), langevin_std=1.0)
    assert np.abs(quiet - noisy).max() > 1e-3
    np.testing.assert_array_equal(run(small_cfg(langevin_std=1.0)), noisy)  # training noise as the fallback
    np.testing.assert_array_equal(run(small_cfg(langevin_std=0.2, infer_langevin_std=1.0)), noisy)
    np.testing.assert_array_equal(run(small_cfg(langevin_std=1.0, infer_langevin_std=0.0)), quiet)
    gen = lambda cfg: np.asarray(cfg.build().generate(v, bt["inputs"][:, :3], 2, jax.random.key(4), temperature=0.0,
                                                      num_candidates=2))
    assert (gen(small_cfg(langevin_std=0.0)) != gen(small_cfg(langevin_std=3.0))).any()


def test_fixed_alpha_gets_no_gradient():
    bt = batch(2, 5, seed=46)
    for learnable in (True, False):
        task = small_cfg(alpha_learnable=learnable).build()
        params = unbox_values(task.init(jax.random.key(1), bt))["params"]
        g = jax.grad(lambda p, task=task: task.loss({"params": p, "stats": {}}, bt, jax.random.key(2),
                                                    train=True)[0])(params)
        assert (abs(float(g["alpha"])) > 0) == learnable


def test_time_embed_conditions_on_the_thinking_step():
    """time_embed = L: a learned token per landscape opens the observed stream; step k uses min(k, L-1). The
    efficient form equals the dense reference, and causality still holds."""
    from models.ebt import think as think_fn

    task = small_cfg(time_embed=2).build()
    dense = small_cfg(time_embed=2, attention_form="dense").build()
    bt = batch(2, 7, seed=47)
    params = unbox_values(task.init(jax.random.key(0), bt))["params"]
    assert params["time_embed"].shape == (2, 16)
    p = jax.nn.softmax(jax.random.normal(jax.random.key(4), (2, 7, V)))
    e0, e1 = (task.energy(params, bt["inputs"], p, landscape=l) for l in (0, 1))
    assert float(jnp.abs(e0 - e1).max()) > 1e-4
    f = lambda t: jax.value_and_grad(lambda pr, pp: jnp.sum(jnp.sin(t.energy(pr, bt["inputs"], pp, landscape=1))),
                                     argnums=(0, 1))(params, p)
    (a1, (ga, gpa)), (a2, (gb, gpb)) = f(task), f(dense)
    assert rel_err(np.asarray(a1), np.asarray(a2)) < 1e-5 and rel_err(np.asarray(gpa), np.asarray(gpb)) < 1e-4
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        assert rel_err(np.asarray(x), np.asarray(y)) < 1e-4
    tok2 = bt["inputs"].at[:, 4:].set((bt["inputs"][:, 4:] + 3) % V)
    np.testing.assert_allclose(task.energy(params, tok2, p, landscape=1)[:, :4], e1[:, :4], rtol=1e-6, atol=1e-6)
    # think: steps 0, 1, 2 on landscapes 0, 1, 1
    y0 = jax.random.normal(jax.random.key(5), (2, 7, V))
    alpha = alpha_value(params)
    res = think_fn(task._energy_fn(params, bt["inputs"], {}), y0, alpha, 3, final_energy=True)
    y = y0
    for land in (0, 1, 1):
        pk = jax.nn.softmax(y)
        g = jax.grad(lambda q, land=land: jnp.sum(task.energy(params, bt["inputs"], q, landscape=land)))(pk)
        y = pk - alpha * g
    np.testing.assert_allclose(np.asarray(res.logits[-1]), np.asarray(y), rtol=1e-4, atol=1e-5)


def test_text_ref_s2_preset_has_the_reference_s2_settings():
    """recipes.ebt text_ref_s2 = alexiglad/EBT job_scripts/nlp/pretrain/ebt_s2.sh (+ inference/ebt.sh's noise):
    Langevin 3.0 (1.0 at inference), fixed alpha 5 with spread 2, 2 + U{0, 1} steps evaluated at 3, second order
    through the last step, one time-embedded landscape, replay 50 % from 192 rows, weight decay 0.01; and its
    training loss is finite with no gradient reaching the fixed alpha."""
    from recipes import ebt as ebt_recipe

    cfg = ebt_recipe.text_ref_s2()
    validate_tree(cfg)
    m = cfg.model
    assert (m.langevin_std, m.inference_noise(), m.alpha_init, m.alpha_learnable, m.step_size_spread) == \
        (3.0, 1.0, 5.0, False, 2.0)
    assert (m.think_steps, m.think_steps_random, m.eval_steps(), m.detach_earlier, m.loss_steps, m.time_embed) == \
        (2, 1, 3, True, "last", 1)
    assert (m.replay_size, m.replay_fraction, cfg.optimizer.weight_decay) == (192, 0.5, 0.01)
    m = dataclasses.replace(m, replay_size=4)
    task = m.build()
    x = jax.random.randint(jax.random.key(48), (2, 9), 0, m.vocab_size, jnp.int32)
    bt = {"inputs": x[:, :-1], "targets": x[:, 1:], "loss_mask": jnp.ones((2, 8), jnp.float32)}
    v = unbox_values(task.init(jax.random.key(0), bt))
    loss, g = jax.value_and_grad(lambda p: task.loss({**v, "params": p}, bt, jax.random.key(1), train=True)[0])(
        v["params"])
    assert np.isfinite(float(loss)) and float(g["alpha"]) == 0.0
    assert float(jnp.abs(g["time_embed"]).max()) > 0


def test_text_presets_use_their_swept_learning_rates():
    """docs/notes/ebt.md "Learning rates of the text presets": each model at its own best stable lr over the same
    450 steps; the Dyck default's 2e-3 / 20 warmup steps (it spikes to ~4e4 grad norm on text) is not inherited."""
    from recipes import ebt as ebt_recipe

    ebt, dec = ebt_recipe.text(), ebt_recipe.decoder_text()
    assert (ebt.optimizer.learning_rate, ebt.optimizer.warmup_steps) == (1e-3, 100)
    assert (dec.optimizer.learning_rate, dec.optimizer.warmup_steps) == (4e-3, 100)
    for cfg in (ebt, dec, ebt_recipe.text_ref_s2()):
        assert (cfg.trainer.steps, cfg.data, cfg.optimizer.clip_norm) == (450, ebt.data, 1.0)


# --- resume -----------------------------------------------------------------------------------------------
TINY = ["model.d_model=16", "model.num_layers=1", "model.ffn_pattern.mlp.mlp_dim=24",
        "model.layer_pattern.*.head_dim=4", "data.seq_len=16", "data.global_batch_size=4", "model.replay_size=6",
        "model.replay_fraction=0.5",
        "model.sample.tokens=0", "trainer.progress=false", "trainer.eval_batches=0", "trainer.log_every=1",
        "checkpoint.every_steps=3", "trainer.steps=9"]


def _cmd(run_dir):
    import sys

    args = [sys.executable, "-m", "recipes.ebt", "--run-dir", str(run_dir)]
    for s in TINY:
        args += ["--set", s]
    return args


@pytest.mark.slow
def test_replay_buffer_and_alpha_survive_kill_and_resume(tmp_path):
    from tests.core import helpers

    ref = tmp_path / "ref"
    r = helpers.run(_cmd(ref))
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(run_dir), cwd=helpers.REPO, env=helpers.env(1, AXL_FAULT_SLEEP_S=0.5),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ck = run_dir / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not (ck / "3").is_dir():
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read()[-2000:]
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    saved = sorted(int(x) for x in os.listdir(ck) if x.isdigit())
    assert saved and max(saved) < 9
    r = helpers.run(_cmd(run_dir))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"Resuming from checkpoint at step {max(saved)}" in r.stdout
    a, b = helpers.raw_state(ref, 9), helpers.raw_state(run_dir, 9)
    assert int(a["stats"]["replay"]["count"]) == 9 * 4
    np.testing.assert_array_equal(a["stats"]["replay"]["logits"], b["stats"]["replay"]["logits"])
    np.testing.assert_array_equal(a["params"]["alpha"], b["params"]["alpha"])
    assert float(a["params"]["alpha"]) != 10.0  # alpha trained
    la, lb = helpers.losses(ref), helpers.losses(run_dir)
    for s in range(max(saved) + 1, 10):
        assert la[s] == lb[s]


@pytest.mark.gpu
def test_triton_predicted_attention_matches_jnp_on_gpu():
    """On the GPU the jvp-mode default is the fused Triton attention; its training gradients equal the jnp
    path's (float32 model: the kernels use full-precision dots)."""
    kw = dict(loss_steps="all", think_steps=2, step_size_spread=2.0, langevin_std=0.3, second_order="jvp",
              attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=16), d_model=32)
    bt = batch(2, 37, seed=22)
    tri, ref = small_cfg(**kw), small_cfg(predicted_attention="jnp", **kw)
    assert tri.layer_pattern[0].predicted_implementation(tri.second_order) == "triton"
    params = unbox_values(ref.build().init(jax.random.key(3), bt))["params"]
    g = lambda t: jax.jit(jax.grad(lambda p: t.loss({"params": p, "stats": {}}, bt, jax.random.key(4),
                                                    train=True)[0]))(params)
    with jax.default_matmul_precision("highest"):  # XLA's float32 dots on a GPU default to tf32
        pairs = list(zip(jax.tree.leaves(g(tri.build())), jax.tree.leaves(g(ref.build()))))
    for a, b in pairs:
        assert rel_err(np.asarray(a, np.float64), np.asarray(b, np.float64)) < 1e-3
