"""Mamba-2 mixer: float64 NumPy oracle of the whole block, init, weight decay, recurrent decode and chunked
evaluation, and the length-generalization initial states (stats / carry semantics)."""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from axlearn_like.config import ConfigError
from axlearn_like.params import weight_decay_mask
from models.decoder import DecoderConfig
from models.layers import MLPConfig
from models.ssm import Mamba2, Mamba2Config, chunked_logits, decode_step, fitted_noise_moments, generate
from tests.oracle import assert_close, rel_err

SSM = Mamba2Config(d_state=8, head_dim=8, expand=2, ngroups=2, chunk_size=8)


def _layer_oracle(p, u, cfg: Mamba2Config, eps, h0=None):
    """float64 NumPy Mamba-2 block, token by token (docs/equations.md §2)."""
    f = lambda a: np.asarray(a, np.float64)
    u = f(u)
    b, L, d = u.shape
    d_inner, H = cfg.expand * d, cfg.expand * d // cfg.head_dim
    G, N, P, K = cfg.ngroups, cfg.d_state, cfg.head_dim, cfg.d_conv
    zxbcdt = u @ f(p["in_proj"]["kernel"])
    z, xBC, dtr = zxbcdt[..., :d_inner], zxbcdt[..., d_inner:2 * d_inner + 2 * G * N], zxbcdt[..., -H:]
    xp = np.concatenate([np.zeros((b, K - 1, xBC.shape[-1])), xBC], 1)
    conv = f(p["conv_bias"]) + sum(xp[:, k:k + L] * f(p["conv_kernel"])[k] for k in range(K))
    act = conv / (1 + np.exp(-conv))
    x = act[..., :d_inner].reshape(b, L, H, P)
    Bm = act[..., d_inner:d_inner + G * N].reshape(b, L, G, N)
    Cm = act[..., d_inner + G * N:].reshape(b, L, G, N)
    dt = np.log1p(np.exp(dtr + f(p["dt_bias"])))
    A = -np.exp(f(p["A_log"]))
    state = np.zeros((b, H, P, N)) if h0 is None else f(h0)
    ys = np.zeros((b, L, H, P))
    g_of = np.arange(H) // (H // G)
    for t in range(L):
        state = np.exp(dt[:, t, :, None, None] * A[None, :, None, None]) * state + \
            dt[:, t, :, None, None] * x[:, t, :, :, None] * Bm[:, t, g_of, None, :]
        ys[:, t] = np.einsum("bhpn,bhn->bhp", state, Cm[:, t, g_of]) + f(p["D"])[None, :, None] * x[:, t]
    y = ys.reshape(b, L, d_inner) * (z / (1 + np.exp(-z)))
    yg = y.reshape(b, L, G, d_inner // G)
    yg = yg / np.sqrt(np.mean(yg ** 2, -1, keepdims=True) + eps)
    y = yg.reshape(b, L, d_inner) * f(p["norm"])
    return y @ f(p["out_proj"]["kernel"]), state


def _init_layer(cfg, u, dtype=jnp.float32):
    layer = Mamba2(cfg, dtype)
    v = nn.meta.unbox(layer.init({"params": jax.random.key(0)}, u))
    return layer, v


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_layer_matches_float64_oracle(dtype):
    """Odd seq (13, not a multiple of chunk 8), groups = 2, both dtypes; output shape/dtype and values."""
    u = jax.random.normal(jax.random.key(1), (2, 13, 16), jnp.float32)
    layer, v = _init_layer(SSM, u.astype(dtype), dtype)
    out = layer.apply(v, u.astype(dtype))
    assert out.shape == u.shape and out.dtype == dtype
    ref, _ = _layer_oracle(v["params"], u, SSM, 1e-6)
    assert_close(out, ref, dtype, "mamba2 layer", factor=2.0)


def test_short_inputs_take_whole_16_row_chunks(monkeypatch):
    """Inputs shorter than chunk_size (init, prompts) run with the chunk rounded up to a multiple of 16 (the Triton
    kernels' tile; a chunk of exactly L = 8 made them refuse the mamba2 GPU preset's init), and the padded tail
    leaves output and state exact. Observed where kernels.ssd runs its chunks."""
    from kernels.ssd import api

    seen = []
    real = api._ssd_segments
    monkeypatch.setattr(api, "_ssd_segments", lambda chunk_size, *a: seen.append(chunk_size) or real(chunk_size, *a))
    cfg = dataclasses.replace(SSM, chunk_size=64)
    for L, want in ((8, 16), (13, 16), (40, 48), (70, 64)):
        u = jax.random.normal(jax.random.key(L), (2, L, 16), jnp.float32)
        layer, v = _init_layer(cfg, u)
        seen.clear()
        out = layer.apply(v, u)
        assert seen == [want], (L, seen)
        assert_close(out, _layer_oracle(v["params"], u, cfg, 1e-6)[0], jnp.float32, f"mamba2 layer, L={L}")


def test_save_named_remat_keeps_the_in_projection(capsys):
    """remat "save_named" keeps the mixer's in_proj output (the widest GEMM of a Mamba-2 block) instead of
    recomputing it in the backward; "full" keeps nothing of the block."""
    from models.decoder import remat_policy

    u = jax.random.normal(jax.random.key(1), (2, 13, 16), jnp.float32)
    layer, v = _init_layer(SSM, u)
    for name, kept in (("save_named", True), ("full", False)):
        f = jax.checkpoint(lambda v, u: layer.apply(v, u).sum(), policy=remat_policy(name))
        jax.ad_checkpoint.print_saved_residuals(f, v, u)
        assert ("named 'ssm_in_proj'" in capsys.readouterr().out) == kept, name


def test_init_and_no_weight_decay():
    cfg = dataclasses.replace(SSM, dt_min=0.01, dt_max=0.05)
    u = jnp.zeros((1, 4, 32))
    layer = Mamba2(cfg, jnp.float32)
    boxed = layer.init({"params": jax.random.key(3)}, u)["params"]
    mask = weight_decay_mask(boxed)
    for name in ("dt_bias", "A_log", "D", "norm", "conv_bias"):
        assert mask[name] is False, name
    assert mask["in_proj"]["kernel"] and mask["out_proj"]["kernel"] and mask["conv_kernel"]
    p = nn.meta.unbox(boxed)
    dt = np.log1p(np.exp(np.asarray(p["dt_bias"], np.float64)))  # softplus(dt_bias) recovers dt
    assert np.all(dt >= 0.01 - 1e-6) and np.all(dt <= 0.05 + 1e-6) and np.ptp(dt) > 0
    A = np.exp(np.asarray(p["A_log"]))
    assert np.all(A >= 1 - 1e-5) and np.all(A <= 16 + 1e-4) and np.ptp(A) > 0
    np.testing.assert_array_equal(np.asarray(p["D"]), 1.0)


def test_config_errors():
    with pytest.raises(ConfigError, match="head_dim"):
        Mamba2Config(head_dim=48).dims(40)
    with pytest.raises(ConfigError, match="initial_state"):
        Mamba2Config(initial_state="noise").validate()
    with pytest.raises(ConfigError, match="ngroups"):
        Mamba2Config(head_dim=8, ngroups=3).dims(16)


# ---------------------------------------------------------------------------------------------- model level
def _model(initial_state="zeros", scan=False, layers=2, **ssm_kw):
    ssm = dataclasses.replace(SSM, initial_state=initial_state, **ssm_kw)
    cfg = DecoderConfig(vocab_size=40, d_model=16, num_layers=layers, layer_pattern=(ssm,),
                        ffn_pattern=(MLPConfig(mlp_dim=32),), dtype="float32", scan_layers=scan)
    return cfg.build()


def _batch(b=4, s=19, seed=0, positions=None):
    tok = jax.random.randint(jax.random.key(seed), (b, s + 1), 0, 40)
    out = {"inputs": tok[:, :-1], "targets": tok[:, 1:], "loss_mask": jnp.ones((b, s))}
    if positions is not None:
        out["positions"] = positions
    return out


def _vars(lm, batch, seed=0):
    return nn.meta.unbox(lm.init(jax.random.key(seed), batch))


def test_decode_and_chunked_match_parallel_forward():
    """Scanned stack (decode unstacks it); prefill 6 tokens, then 15 one-token steps; chunks of 5."""
    lm = _model(scan=True)
    batch = _batch(3, 21)
    v = _vars(lm, batch)
    full = np.asarray(lm.apply(v, batch)[0])
    tok = batch["inputs"]
    logits, cache = decode_step(lm, v, tok[:, :6])  # prefill, then one token at a time
    outs = [np.asarray(logits)]
    step = jax.jit(lambda c, t: decode_step(lm, v, t, c))
    for t in range(6, tok.shape[1]):
        logits, cache = step(cache, tok[:, t:t + 1])
        outs.append(np.asarray(logits))
    assert_close(np.concatenate(outs, 1), full, jnp.float32, "decode vs parallel")
    assert_close(chunked_logits(lm, v, tok, 5), full, jnp.float32, "chunked vs one forward")
    # generate: greedy recurrent sampling == greedy argmax of the parallel forward on its own output
    out = np.asarray(generate(lm, v, tok[:, :4], 3, jax.random.key(0), temperature=0.0))
    re = np.asarray(lm.apply(v, {"inputs": jnp.asarray(out[:, :-1])})[0]).argmax(-1)
    np.testing.assert_array_equal(out[:, 4:], re[:, 3:])


def _leaves(tree, name):
    return [x for path, x in jax.tree_util.tree_leaves_with_path(tree) if path[-1].key == name]


def test_fitted_noise_stats_update_in_training_only():
    lm = _model("fitted_noise")
    batch = _batch()
    v = _vars(lm, batch)
    _, _, ev = lm.loss(v, batch, jax.random.key(1), train=False)
    for a, b in zip(jax.tree.leaves(ev["stats"]), jax.tree.leaves(v["stats"])):
        np.testing.assert_array_equal(a, b)
    _, _, tr = lm.loss(v, batch, jax.random.key(1), train=True)
    assert all(float(c) == 1.0 for c in _leaves(tr["stats"], "fs_count"))
    # after one update the moments are the batch moments of the final states
    means = _leaves(tr["stats"], "fs_mean")
    assert all(float(jnp.abs(m).max()) > 0 for m in means)
    sq = _leaves(tr["stats"], "fs_sq")
    assert all(float(jnp.min(s - jnp.square(m))) >= -1e-6 for s, m in zip(sq, means))
    # the noise drawn from the stats changes the training loss (and is deterministic in the rng)
    v2 = {**v, "stats": tr["stats"]}
    l_zero = lm.loss(v, batch, jax.random.key(2), train=True)[0]  # count 0: starts from zeros
    l_a = lm.loss(v2, batch, jax.random.key(2), train=True)[0]
    l_b = lm.loss(v2, batch, jax.random.key(2), train=True)[0]
    assert float(l_a) == float(l_b) and abs(float(l_a) - float(l_zero)) > 1e-6
    # eval ignores the stats: zero initial state
    loss = lambda variables: float(lm.loss(variables, batch, jax.random.key(2), train=False)[0])
    assert loss(v2) == loss(v)


def test_state_passing_carry_changes_and_stops_gradient():
    lm = _model("state_passing")
    b1, b2 = _batch(seed=0), _batch(seed=1)
    v = _vars(lm, b1)
    _, _, m1 = lm.loss(v, b1, jax.random.key(0), train=True)
    _, _, m2 = lm.loss({**v, "carry": m1["carry"]}, b2, jax.random.key(0), train=True)
    c0, c1, c2 = (_leaves(c, "ssm_state") for c in (v["carry"], m1["carry"], m2["carry"]))
    assert all(float(jnp.abs(x).max()) == 0 for x in c0)
    assert all(float(jnp.abs(x - y).max()) > 0 for x, y in zip(c1, c2))
    # the carry is used (loss depends on it) but no gradient flows into it
    logits = lambda carry: lm.apply({**v, "carry": carry}, b2, train=True)[0]
    assert float(jnp.abs(logits(m1["carry"]) - logits(v["carry"])).max()) > 1e-5
    f = lambda carry: lm.loss({**v, "carry": carry}, b2, jax.random.key(0), train=True)[0]
    g = jax.grad(f)(m1["carry"])
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(g))
    # eval never writes the carry
    _, _, ev = lm.loss({**v, "carry": m1["carry"]}, b2, jax.random.key(0), train=False)
    for x, y in zip(_leaves(ev["carry"], "ssm_state"), c1):
        np.testing.assert_array_equal(x, y)


def test_tbtt_resets_rows_that_start_a_document():
    lm = _model("tbtt")
    s = 19
    pos_cont = jnp.broadcast_to(jnp.arange(s) + 7, (4, s))  # continuing a document
    pos = pos_cont.at[1].set(jnp.arange(s))  # row 1 starts a new document
    b1 = _batch(s=s, positions=pos_cont)
    v = _vars(lm, b1)
    _, _, m1 = lm.loss(v, b1, jax.random.key(0), train=True)
    assert _leaves(m1["carry"], "conv_state"), "tbtt carries the conv window too"
    b2 = _batch(s=s, seed=1, positions=pos)
    _, _, m2 = lm.loss({**v, "carry": m1["carry"]}, b2, jax.random.key(0), train=True)
    _, _, fresh = lm.loss(v, b2, jax.random.key(0), train=True)  # zero carry
    for x, y in zip(_leaves(m2["carry"], "ssm_state"), _leaves(fresh["carry"], "ssm_state")):
        np.testing.assert_allclose(x[1], y[1], rtol=1e-6, atol=1e-7)  # row 1 restarted from zero
        assert float(jnp.abs(x[0] - y[0]).max()) > 1e-6  # row 0 continued
    # tbtt continuation == one long forward (state and conv window both carried)
    b_first = _batch(s=s, positions=pos_cont)
    b_next = _batch(s=s, seed=1, positions=pos_cont + s)
    _, _, n1 = lm.loss(v, b_first, jax.random.key(0), train=True)
    logits2 = lm.apply({**v, "carry": n1["carry"]}, b_next, train=True)[0]
    long = lm.apply(v, {"inputs": jnp.concatenate([b_first["inputs"], b_next["inputs"]], 1)})[0]
    assert_close(logits2, long[:, s:], jnp.float32, "tbtt chunk vs long forward")


def test_random_noise_only_in_training():
    lm = _model("random_noise", noise_std=0.5, track_states=False)
    batch = _batch()
    v = _vars(lm, batch)
    assert v["stats"] == {} and v["carry"] == {}
    zero = _model("zeros", track_states=False)
    l_noise = float(lm.loss(v, batch, jax.random.key(0), train=True)[0])
    l_zero = float(zero.loss(v, batch, jax.random.key(0), train=True)[0])
    assert abs(l_noise - l_zero) > 1e-6
    key = jax.random.key(0)
    assert float(lm.loss(v, batch, key, train=False)[0]) == float(zero.loss(v, batch, key, train=False)[0])


def test_hybrid_pattern_and_flops():
    from models.attention import AttentionConfig

    cfg = DecoderConfig(vocab_size=40, d_model=16, num_layers=2,
                        layer_pattern=(dataclasses.replace(SSM),
                                       AttentionConfig(num_heads=2, num_kv_heads=2, head_dim=8)),
                        ffn_pattern=(MLPConfig(mlp_dim=32),), dtype="float32")
    cfg.validate()
    lm = cfg.build()
    batch = _batch(2, 9)
    v = _vars(lm, batch)
    assert lm.apply(v, batch)[0].shape == (2, 9, 40)
    with pytest.raises(ValueError, match="pure 'mamba2'"):
        decode_step(lm, v, batch["inputs"])
    assert_close(chunked_logits(lm, v, batch["inputs"], 4), lm.apply(v, batch)[0], jnp.float32, "fallback")
    pure = _model()
    assert pure.flops_per_token(64) > 6 * pure.param_count()  # the SSD term is counted


# ------------------------------------------------------------------------------------- packed rows (resets)
def test_document_reset_isolates_packed_documents():
    """Rows 0/1 pack doc A (length 7 / 8: B starts inside chunk 0 / exactly at the chunk-8 boundary), doc B
    (length 10, crossing a chunk boundary) and padding; rows 2/3 hold B alone. Training apply with a nonzero
    carried state (state_passing) in rows 0/1 and zero in rows 2/3. With document_reset, B's outputs equal B alone
    (conv window and SSM state both isolated) and A (before any reset) is unchanged; without it B differs."""
    starts, L = (7, 8), 20
    u = jax.random.normal(jax.random.key(5), (4, L, 16), jnp.float32)
    u = u.at[2, :10].set(u[0, 7:17]).at[3, :10].set(u[1, 8:18])
    seg = np.array([[1] * s + [2] * 10 + [0] * (L - s - 10) for s in starts] + [[1] * 10 + [0] * 10] * 2, np.int32)
    cfg = dataclasses.replace(SSM, document_reset=True, initial_state="state_passing")
    layer, v = _init_layer(cfg, u)
    carry = jax.tree.map(lambda a: jax.random.normal(jax.random.key(6), a.shape).at[2:].set(0), v["carry"])

    def run(seg, reset):
        m = layer.clone(cfg=dataclasses.replace(cfg, document_reset=reset))
        return m.apply({**v, "carry": carry}, u, segment_ids=seg, train=True, mutable=["carry", "stats"])[0]

    run = jax.jit(run, static_argnums=1)
    packed, leaky = run(seg, True), run(seg, False)
    doc_b = lambda out: jnp.stack([out[r, s:s + 10] for r, s in enumerate(starts)])
    assert_close(doc_b(packed), packed[2:, :10], jnp.float32, "doc B packed vs alone")
    assert_close(packed[:, :7], leaky[:, :7], jnp.float32, "doc A (carried state, no reset yet)")
    assert rel_err(doc_b(leaky), leaky[2:, :10]) > 1e-2
    # document_reset=False ignores segment_ids bit for bit
    np.testing.assert_array_equal(leaky, run(None, False))


def test_document_reset_model_level_and_config():
    """Through LanguageModel (scanned stack) the batch's segment_ids reach the mixers: row 0 packs two documents
    of 9 tokens, row 1 holds the second alone (then padding). Every SSD implementation takes the resets now
    (issue 18: the Triton and Pallas kernels mask per document), so the config accepts them with the fused ones
    (it used to refuse document_reset=True with implementation="triton")."""
    lm = _model(scan=True)  # document_reset None, the default: resets at real documents
    batch = _batch(2, 18)
    tok = batch["inputs"].at[1, :9].set(batch["inputs"][0, 9:])
    seg = jnp.asarray(np.array([[1] * 9 + [2] * 9, [1] * 9 + [0] * 9], np.int32))
    v = _vars(lm, batch)
    logits = lm.apply(v, {**batch, "inputs": tok, "segment_ids": seg})[0]
    assert_close(logits[0, 9:], logits[1, :9], jnp.float32, "doc 2 packed vs alone")
    for reset in (None, True):
        for impl in ("triton", "pallas", "xla"):
            dataclasses.replace(SSM, document_reset=reset, implementation=impl).validate()
    with pytest.raises(ConfigError, match="document_reset"):
        dataclasses.replace(SSM, document_reset="yes").validate()


def test_default_document_reset_isolates_packed_rows_and_keeps_unpacked_ones():
    """document_reset=None (the default): packed rows restart at every real document (as True), while padding
    continues the document before it, so a row of one document then padding (unpacked data) computes exactly
    what it does with no segment_ids, final (carried) state included; True restarts the padding run instead."""
    from models.ssm import padding_continues

    np.testing.assert_array_equal(padding_continues(np.array([[0, 0, 3, 3, 0, 2, 0, 0]])), [[0, 0, 3, 3, 3, 2, 2, 2]])
    assert SSM.document_reset is None
    L = 20
    u = jax.random.normal(jax.random.key(8), (3, L, 16), jnp.float32)
    seg = np.array([[1] * 7 + [2] * 10 + [0] * 3, [5] * 13 + [0] * 7, [4] * L], np.int32)  # packed; unpacked
    cfg = dataclasses.replace(SSM, initial_state="state_passing")
    layer, v = _init_layer(cfg, u)
    carry = jax.tree.map(lambda a: jax.random.normal(jax.random.key(9), a.shape), v["carry"])

    @functools.partial(jax.jit, static_argnums=1)
    def run(seg, reset):
        m = layer.clone(cfg=dataclasses.replace(cfg, document_reset=reset))
        y, new = m.apply({**v, "carry": carry}, u, segment_ids=seg, train=True, mutable=["carry", "stats"])
        return y, new["carry"]["ssm_state"]

    (auto, auto_final), (full, full_final), (plain, plain_final) = run(seg, None), run(seg, True), run(None, None)
    assert_close(auto[0, :17], full[0, :17], jnp.float32, "packed row: real documents as with True")
    assert rel_err(auto[0, 7:17], plain[0, 7:17]) > 1e-2  # ... and the second document was reset
    assert_close(auto[1:], plain[1:], jnp.float32, "one document + padding, and one document: as no segment_ids")
    assert_close(auto_final[1:], plain_final[1:], jnp.float32, "their final states too")
    assert rel_err(full_final[1], plain_final[1]) > 1e-2  # True: the final state is the padding run's own


# --- fitted noise: fitted to zero-initialised states only, one Gaussian per layer and head ---------------------
@pytest.mark.parametrize("mode, reset", [("fitted_noise", False), ("random_noise", False), ("state_passing", True),
                                         ("tbtt", False)])
def test_moments_record_only_zero_initialised_final_states(mode, reset):
    """Whatever initial state a training apply starts from, the moments it records are those of the same rows
    started from h_{-1} = 0 (the paper fits the final states of zero-initialised sequences); so fitted noise never
    absorbs its own noise. tbtt (a carried conv window: not linear) records only the rows that restarted."""
    cfg0 = dataclasses.replace(SSM, document_reset=reset)
    cfg = dataclasses.replace(cfg0, initial_state=mode, noise_std=2.0)
    b, L = 3, 13
    u = jax.random.normal(jax.random.key(1), (b, L, 16))
    layer, v = _init_layer(cfg, u)
    rng = np.random.default_rng(0)
    H, P, N = v["stats"]["fs_mean"].shape
    mean = jnp.asarray(rng.normal(size=(H, P, N)), jnp.float32)
    stats = {"fs_count": jnp.float32(3.0), "fs_mean": mean,
             "fs_sq": mean ** 2 + jnp.asarray(rng.uniform(0.5, 2.0, size=(H, P, N)), jnp.float32)}
    carry = {k: jnp.asarray(rng.normal(size=x.shape), jnp.float32) for k, x in v["carry"].items()}
    v = {**v, "stats": stats, "carry": carry}
    positions = jnp.broadcast_to(jnp.arange(L) + 5, (b, L)).at[0].set(jnp.arange(L)) if mode == "tbtt" else None
    seg = jnp.asarray([[1] * L, [1] * 6 + [2] * (L - 6), [1] * L], jnp.int32) if reset else None

    def apply(m, v, u, pos, sg):
        return m.apply(v, u, positions=pos, segment_ids=sg, train=True, rngs={"dropout": jax.random.key(7)},
                       mutable=["stats", "carry"])[1]

    got = apply(layer, v, u, positions, seg)
    rows = slice(0, 1) if mode == "tbtt" else slice(None)  # tbtt: only row 0 restarted
    zero = Mamba2(dataclasses.replace(cfg0, initial_state="zeros"), jnp.float32)
    want = apply(zero, v, u[rows], None if positions is None else positions[rows], None if seg is None else seg[rows])
    assert float(got["stats"]["fs_count"]) == float(want["stats"]["fs_count"]) == 4.0
    for k in ("fs_mean", "fs_sq"):
        assert rel_err(np.asarray(got["stats"][k]), np.asarray(want["stats"][k])) < 1e-5, k
    # the initial state did change the final states (the carry holds them as they are)
    started = slice(1, None) if mode == "tbtt" else slice(None)
    want_all = apply(zero, v, u, positions, seg)["carry"]["ssm_state"]
    assert rel_err(np.asarray(got["carry"]["ssm_state"][started]), np.asarray(want_all[started])) > 1e-2


def test_fitted_noise_is_one_gaussian_per_layer_and_head():
    """scope "head": each head's P x N entries share the pooled mean and std of their moments (the paper's IID
    Gaussian per layer and head); "element" keeps each entry's own; each layer keeps its own stats."""
    rng = np.random.default_rng(1)
    mean = rng.normal(size=(3, 4, 5))
    var = rng.uniform(0.1, 3.0, size=(3, 4, 5))
    mu, sd = (np.asarray(x, np.float64) for x in fitted_noise_moments(jnp.asarray(mean), jnp.asarray(mean ** 2 + var)))
    for h in range(3):
        pooled = np.concatenate([rng.normal(mean[h].ravel()[i], np.sqrt(var[h].ravel()[i]), 20000) for i in range(20)])
        np.testing.assert_allclose(mu[h], mean[h].mean(), rtol=1e-5)
        np.testing.assert_allclose(sd[h], np.sqrt((mean[h] ** 2 + var[h]).mean() - mean[h].mean() ** 2), rtol=1e-5)
        np.testing.assert_allclose(sd[h], pooled.std(), rtol=2e-2)  # = the std of all the head's state entries
    mu_e, sd_e = fitted_noise_moments(jnp.asarray(mean), jnp.asarray(mean ** 2 + var), "element")
    np.testing.assert_allclose(np.asarray(mu_e), mean, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(sd_e), np.sqrt(var), rtol=1e-4)
    assert Mamba2Config().fitted_noise_scope == "head"
    with pytest.raises(ConfigError, match="fitted_noise_scope"):
        dataclasses.replace(SSM, fitted_noise_scope="layer").validate()
    lm = _model("fitted_noise")  # per layer: every layer keeps (and updates) its own moments
    batch = _batch()
    _, _, tr = lm.loss(_vars(lm, batch), batch, jax.random.key(1), train=True)
    means = _leaves(tr["stats"], "fs_mean")
    assert len(means) == 2 and rel_err(np.asarray(means[0]), np.asarray(means[1])) > 1e-2


@pytest.mark.parametrize("scope", ["head", "element"])
def test_fitted_noise_layer_draws_the_scoped_gaussian(scope):
    """The initial state a fitted_noise training apply draws is the scoped Gaussian of the layer's moments. With
    A ~ 0 (no decay) the SSD adds h_{-1} to the final state unchanged, so h_{-1} = final(fitted) - final(zeros).
    Moments: entry means far apart inside a head, small per-entry variances; "head" draws every entry of a head
    from one N(pooled mean, pooled std), "element" each entry from its own."""
    cfg = dataclasses.replace(SSM, initial_state="fitted_noise", fitted_noise_scope=scope)
    b, L = 64, 5
    u = jax.random.normal(jax.random.key(2), (b, L, 16))
    layer, v = _init_layer(cfg, u)
    H, P, N = v["stats"]["fs_mean"].shape
    rng = np.random.default_rng(3)
    mean = 3.0 * rng.normal(size=(H, P, N)) + 10.0 * np.arange(H)[:, None, None]
    params = {**v["params"], "A_log": jnp.full((H,), -30.0)}
    stats = {"fs_count": jnp.float32(5.0), "fs_mean": jnp.asarray(mean, jnp.float32),
             "fs_sq": jnp.asarray(mean ** 2 + 0.01, jnp.float32)}
    final = lambda m: m.apply({**v, "params": params, "stats": stats}, u, train=True, mutable=["stats", "carry"],
                              rngs={"dropout": jax.random.key(4)})[1]["carry"]["ssm_state"]
    zero = layer.clone(cfg=dataclasses.replace(cfg, initial_state="zeros"))
    h0 = np.asarray(final(layer) - final(zero), np.float64)  # [b, H, P, N]
    entry_mean = h0.mean(0)
    for h in range(H):
        pooled_mu, pooled_sd = mean[h].mean(), np.sqrt((mean[h] ** 2 + 0.01).mean() - mean[h].mean() ** 2)
        if scope == "head":
            assert np.abs(entry_mean[h] - pooled_mu).max() < 5 * pooled_sd / np.sqrt(b)
            np.testing.assert_allclose(h0[:, h].std(), pooled_sd, rtol=0.05)
        else:
            assert np.abs(entry_mean[h] - mean[h]).max() < 5 * 0.1 / np.sqrt(b) + 1e-3
            np.testing.assert_allclose(h0[:, h].std(0), 0.1, rtol=0.5)


def test_lengthgen_zeros_control_starts_every_packed_document_from_zero():
    """recipes.mamba2 lengthgen packs documents into rows; its zeros control (the default initial_state) must
    run each document exactly as if it were alone in its row: zero state, empty conv window (issue 22, item 8)."""
    from recipes import mamba2

    cfg = mamba2.lengthgen()
    assert cfg.data.packing and all(m.initial_state == "zeros" for m in cfg.model.layer_pattern)
    lm = cfg.model.build()
    s, cut = cfg.data.seq_len, 23
    tok = jax.random.randint(jax.random.key(3), (1, s), 0, 256)
    packed = {"inputs": tok, "segment_ids": jnp.asarray([[1] * cut + [2] * (s - cut)], jnp.int32),
              "positions": jnp.concatenate([jnp.arange(cut), jnp.arange(s - cut)])[None]}
    alone = {"inputs": jnp.zeros_like(tok).at[0, :s - cut].set(tok[0, cut:]),
             "segment_ids": jnp.asarray([[1] * (s - cut) + [0] * cut], jnp.int32),
             "positions": jnp.concatenate([jnp.arange(s - cut), jnp.zeros(cut, jnp.int32)])[None]}
    v = _vars(lm, packed)
    run = lambda b: lm.apply(v, b, jax.random.key(0), train=True)[0]
    assert_close(run(packed)[0, cut:], run(alone)[0, :s - cut], jnp.float32, "2nd packed document vs alone")
