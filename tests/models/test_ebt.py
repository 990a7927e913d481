"""EBT: System-2 attention vs the dense 2S x 2S mask and a float64 NumPy oracle, no leakage, the inner-loop
gradient vs finite differences, second-order gradients, self-verification, thinking lowers energy after a
short training, replay buffer + alpha across kill-and-resume."""
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
from models.ebt import EBTConfig, alpha_value, predicted_attention, system2_attention, system2_attention_dense, system2_mask, think
from tests.oracle import rel_err

V = 13


def small_cfg(**kw) -> EBTConfig:
    base = dict(vocab_size=V, d_model=16, num_layers=2, mlp_dim=24, dtype="float32",
                attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=4))
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
    f = lambda t: jax.value_and_grad(lambda pr, pp: jnp.sum(jnp.sin(t.energy(pr, bt["inputs"], pp))), argnums=(0, 1))(params, p)
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
        cd = lambda h: (f(np.asarray(p0) + h * u) - f(np.asarray(p0) - h * u)) / (2 * h)
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
    np.testing.assert_allclose(via_think(params, alpha, True), via_think(params, alpha, False), rtol=1e-5)  # same forward
    if n > 1:  # the full second-order gradient differs: the test can tell the two apart
        full = jax.grad(lambda pr: via_think(pr, alpha, False))(params)
        assert rel_err(np.asarray(full["energy_head"]["kernel"], np.float64),
                       np.asarray(want[0]["energy_head"]["kernel"], np.float64)) > 1e-2


def test_alpha_clamp_and_lr_scale():
    from axlearn_like.params import lr_scales

    cfg = small_cfg(alpha_lr_scale=7.0)
    boxed = cfg.build().init(jax.random.key(0), batch(1, 3))
    assert lr_scales(boxed["params"])["alpha"] == 7.0
    assert float(alpha_value({"alpha": jnp.float32(-3.0)})) == pytest.approx(1e-4)
    with pytest.raises(ConfigError, match="layer_pattern"):
        small_cfg(layer_pattern=("attention",))


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
        l, g = jax.value_and_grad(lambda p: task.loss({"params": p, "stats": {}}, bt, jax.random.fold_in(jax.random.key(1), i), train=True)[0])(params)
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


# --- resume -----------------------------------------------------------------------------------------------
TINY = ["model.d_model=16", "model.num_layers=1", "model.mlp_dim=24", "model.attention.head_dim=4",
        "data.seq_len=16", "data.global_batch_size=4", "model.replay_size=6", "model.replay_fraction=0.5",
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
    from models.ebt import predicted_implementation

    kw = dict(loss_steps="all", think_steps=2, step_size_spread=2.0, langevin_std=0.3, second_order="jvp",
              attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=16), d_model=32)
    bt = batch(2, 37, seed=22)
    tri, ref = small_cfg(**kw), small_cfg(predicted_attention="jnp", **kw)
    assert predicted_implementation(tri) == "triton"
    params = unbox_values(ref.build().init(jax.random.key(3), bt))["params"]
    g = lambda t: jax.jit(jax.grad(lambda p: t.loss({"params": p, "stats": {}}, bt, jax.random.key(4), train=True)[0]))(params)
    with jax.default_matmul_precision("highest"):  # XLA's float32 dots on a GPU default to tf32
        pairs = list(zip(jax.tree.leaves(g(tri.build())), jax.tree.leaves(g(ref.build()))))
    for a, b in pairs:
        assert rel_err(np.asarray(a, np.float64), np.asarray(b, np.float64)) < 1e-3
