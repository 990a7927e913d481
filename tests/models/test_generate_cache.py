"""Cached generation (LanguageModel.prefill + decode_step, Task.generate(cached=True)) for every mixer kind.

Per kind: greedy cached decoding equals the full-recompute loop token for token; the cached logits (a prefill,
then one decode_step per token) equal one full forward; a batch of ragged (right-padded) prompts equals the
same prompts decoded one by one. Sampling: top-k / top-p only ever return allowed tokens.
"""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from axlearn_like.task import sample_logits
from models.kinds import NoFFNConfig
from models.layers import MLPConfig
from models.mla import MLAConfig
from models.moe import MoEConfig
from models.simplicial import SimplicialConfig
from models.ssm import Mamba2Config
from tests.models.model_helpers import VOCAB, attention, fake_init, make_batch, small_cfg

SSM = Mamba2Config(d_state=8, head_dim=8, expand=2, ngroups=2, chunk_size=4)
SIMPLICIAL = SimplicialConfig(num_heads=4, num_kv_heads=2, head_dim=6, w1=4, w2=3, rope="q_k1", implementation="xla")
MLA = MLAConfig(num_heads=2, kv_lora_rank=8, q_lora_rank=12, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5,
                implementation="xla")
r = dataclasses.replace

CASES = {
    "attention_gqa": lambda: small_cfg(),
    "mla": lambda: small_cfg(layer_pattern=(r(MLA),)),
    "simplicial_hybrid": lambda: small_cfg(layer_pattern=(r(SIMPLICIAL), attention())),
    "mamba2": lambda: small_cfg(layer_pattern=(r(SSM),), ffn_pattern=(NoFFNConfig(),)),
    "mamba2_attention_hybrid": lambda: small_cfg(layer_pattern=(r(SSM), attention())),
    "moe": lambda: small_cfg(ffn_pattern=(MLPConfig(mlp_dim=40), MoEConfig(num_experts=4, top_k=2, expert_dim=8))),
    "scanned_hybrid": lambda: small_cfg(num_layers=4, scan_layers=True,  # 2 repeats of the 2-layer period
                                        layer_pattern=(r(SSM), attention())),
}
NEW = 4


@functools.lru_cache(maxsize=None)
def _model(name):
    lm = CASES[name]().build()
    v = nn.unbox(fake_init(lambda: lm.init(jax.random.key(0), make_batch(2, 4)), std=0.3))
    return lm, {k: v[k] for k in ("params", "stats")}


@functools.lru_cache(maxsize=None)
def _forward(name):
    lm, _ = _model(name)
    return jax.jit(lambda v, t: lm.logits(v, t, None))


def _teacher_forced(lm, v, seq, n_prefill):
    """Cached logits of seq [B, T]: prefill n_prefill tokens (cache for T), then one decode_step per token."""

    @jax.jit
    def run(v, seq):
        logits, cache = lm.prefill(v, seq[:, :n_prefill], max_len=seq.shape[1])

        def step(cache, tok):
            out, cache = lm.decode_step(v, tok[:, None], cache)
            return cache, out[:, 0]

        cache, rest = jax.lax.scan(step, cache, jnp.moveaxis(seq[:, n_prefill:], 1, 0))
        return jnp.concatenate([logits, jnp.moveaxis(rest, 0, 1)], axis=1), cache["position"]

    return run(v, seq)


@pytest.mark.parametrize("name", list(CASES))
def test_cached_decode_equals_full_recompute(name):
    lm, v = _model(name)
    assert lm.supports_cached_decoding
    prompt = make_batch(2, 5, seed=3)["inputs"]
    key = jax.random.key(0)
    cached = np.asarray(lm.generate(v, prompt, NEW, key, temperature=0.0, cached=True))
    full = np.asarray(lm.generate(v, prompt, NEW, key, temperature=0.0, cached=False))
    np.testing.assert_array_equal(cached, full)

    # logits: a prefill of 3 tokens, then one decode_step per token, vs one full forward
    forward = _forward(name)
    ref = np.asarray(forward(v, jnp.asarray(cached)))
    logits, position = _teacher_forced(lm, v, jnp.asarray(cached), 3)
    np.testing.assert_allclose(np.asarray(logits), ref, rtol=2e-4, atol=2e-4)
    np.testing.assert_array_equal(np.asarray(position), [cached.shape[1]] * 2)

    # ragged prompts (right-padded, per-row lengths): each row is its own prompt's greedy decoding (each token
    # the argmax of a forward over that row's prefix alone; rows of a forward never interact), zeros after
    lengths = np.asarray([5, 2], np.int32)
    batched = np.asarray(lm.generate(v, prompt, NEW, key, temperature=0.0, lengths=lengths))
    ref = np.asarray(forward(v, jnp.asarray(batched)))
    for row, n in enumerate(lengths):
        np.testing.assert_array_equal(batched[row, :n], prompt[row, :n])
        np.testing.assert_array_equal(batched[row, n:n + NEW], ref[row, n - 1:n + NEW - 1].argmax(-1))
        assert not batched[row, n + NEW:].any()
    if name == "mamba2_attention_hybrid":  # and literally: the short prompt decoded alone
        alone = np.asarray(lm.generate(v, prompt[1:, :2], NEW, key, temperature=0.0))[0]
        np.testing.assert_array_equal(batched[1, :2 + NEW], alone)


def _allowed(logits, temperature, top_k, top_p):
    """bool [B, V]: tokens sample_logits may return (float64 NumPy)."""
    z = np.asarray(logits, np.float64) / temperature
    ok = np.ones(z.shape, bool)
    if top_k is not None:
        kth = -np.sort(-z, axis=-1)[:, top_k - 1:top_k]
        ok &= z >= kth
    if top_p is not None:
        zm = np.where(ok, z, -np.inf)
        p = np.exp(zm - zm.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        for b in range(z.shape[0]):
            order = np.argsort(-zm[b], kind="stable")
            before = np.cumsum(p[b, order]) - p[b, order]
            cut = zm[b, order][before < top_p + 1e-6].min()
            ok[b] &= zm[b] >= cut - 1e-6
    return ok


@pytest.mark.parametrize("top_k,top_p", [(3, None), (None, 0.5), (5, 0.7)])
def test_top_k_top_p_only_return_allowed_tokens(top_k, top_p):
    logits = jnp.asarray(2.0 * np.random.default_rng(0).standard_normal((64, VOCAB)), jnp.float32)
    draw = jax.jit(lambda k: sample_logits(logits, k, 0.8, top_k, top_p))
    ok = _allowed(logits, 0.8, top_k, top_p)
    seen = np.zeros_like(ok)
    for i in range(8):
        tok = np.asarray(draw(jax.random.key(i)))
        assert ok[np.arange(len(tok)), tok].all()
        seen[np.arange(len(tok)), tok] = True
    assert seen.sum() > len(tok)  # it does sample (not just the argmax)


def test_generate_samples_inside_top_k_top_p():
    """Through the cached loop: each new token lies in the allowed set of the logits at its step."""
    lm, v = _model("attention_gqa")
    prompt = make_batch(2, 5, seed=5)["inputs"]
    out = lm.generate(v, prompt, NEW, jax.random.key(1), temperature=1.5, top_k=6, top_p=0.6,
                      lengths=np.asarray([5, 3]))
    logits = np.asarray(_forward("attention_gqa")(v, out))
    for row, n in enumerate([5, 3]):
        ok = _allowed(logits[row, n - 1:n + NEW - 1], 1.5, 6, 0.6)
        assert ok[np.arange(NEW), np.asarray(out)[row, n:n + NEW]].all()
    with pytest.raises(ValueError, match="top_p"):
        lm.generate(v, prompt, 2, jax.random.key(0), top_p=0.0)
    with pytest.raises(ValueError, match="lengths"):
        lm.generate(v, prompt, 2, jax.random.key(0), lengths=np.asarray([4, 0, 3]))


# --- EBT: the observed stream in a KV cache, thinking at the new position only -------------------------------
def _ebt(**kw):
    from models.ebt import EBTConfig, System2AttentionConfig

    cfg = EBTConfig(vocab_size=VOCAB, d_model=16, num_layers=2, dtype="float32", think_steps=2,
                    layer_pattern=(System2AttentionConfig(**dataclasses.asdict(attention(head_dim=4))),),
                    ffn_pattern=(MLPConfig(mlp_dim=24),), **kw)
    task = cfg.build()
    v = nn.unbox(fake_init(lambda: task.init(jax.random.key(0), make_batch(2, 4)), std=0.3))
    return task, {"params": v["params"]}


def test_ebt_cached_generation_equals_recompute():
    """init_logit_std ~ 0 makes thinking deterministic (every start ~ uniform), so the cached path (observed
    stream encoded once, thinking at the new position only) and the recompute path (re-thinking the whole
    buffer per token) must agree token for token; the cached logits match `EBT.think` on the whole sequence."""
    task, v = _ebt(init_logit_std=1e-6)
    assert task.supports_cached_decoding
    prompt = make_batch(2, 5, seed=3)["inputs"]
    key = jax.random.key(0)
    cached = np.asarray(task.generate(v, prompt, NEW, key, temperature=0.0, num_candidates=2))
    full = np.asarray(task.generate(v, prompt, NEW, key, temperature=0.0, num_candidates=2, cached=False))
    np.testing.assert_array_equal(cached, full)
    ref = np.asarray(task.think(v, jnp.asarray(cached), jax.random.key(1))["logits"])
    logits, _ = _teacher_forced(task, v, jnp.asarray(cached), 3)
    np.testing.assert_allclose(np.asarray(logits), ref, rtol=1e-3, atol=1e-3)
    lengths = np.asarray([5, 2], np.int32)
    batched = np.asarray(task.generate(v, prompt, NEW, key, temperature=0.0, num_candidates=2, lengths=lengths))
    ref = np.asarray(task.think(v, jnp.asarray(batched), jax.random.key(1))["logits"])
    for row, n in enumerate(lengths):
        np.testing.assert_array_equal(batched[row, n:n + NEW], ref[row, n - 1:n + NEW - 1].argmax(-1))


def test_ebt_self_verification_encodes_the_observed_stream_once():
    """G candidates share one encoding of the observed stream (scanned stack: the cache's batch axis is 1): the
    energies equal those of the stream encoded for each candidate separately."""
    task, v = _ebt(scan_layers=True)
    tokens = make_batch(2, 5, seed=4)["inputs"]
    g = 3
    p = jax.nn.softmax(jnp.asarray(np.random.default_rng(0).standard_normal((g * 2, 5, VOCAB)), jnp.float32))
    shared = task._energy_fn(v["params"], tokens, {}, candidates=g)
    separate = task._energy_fn(v["params"], jnp.concatenate([tokens] * g), {})
    assert jax.tree.leaves(shared.theta["cache"])[0].shape[1] == g * 2
    np.testing.assert_allclose(np.asarray(shared(p)), np.asarray(separate(p)), rtol=1e-5, atol=1e-6)
