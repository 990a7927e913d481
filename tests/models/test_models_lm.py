"""LanguageModel task: real init, loss vs a float64 oracle (mask, z-loss), FLOPs convention, sampling."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from axlearn_like.config import from_json, to_json
from models.decoder import Decoder
from models.lm import LanguageModel, collect_intermediates, sample_logits
from tests.models.model_helpers import VOCAB, fake_init, make_batch, small_cfg


def test_build_and_real_init():
    cfg = small_cfg(num_layers=1, init_std=0.05, scale_out_init=False)
    lm = cfg.build()
    assert isinstance(lm, LanguageModel) and lm.cfg is cfg
    b = make_batch(2, 5)
    # rbg: the threefry init graph takes seconds to compile on CPU
    v = jax.jit(lm.init)(jax.random.key(0, impl="rbg"), b)
    assert set(v) == {"params", "stats", "carry"} and v["stats"] == {} and v["carry"] == {}
    p = nn.unbox(v["params"])
    assert np.all(np.asarray(p["stack"]["final_norm"]["scale"]) == 1.0)
    emb = np.asarray(p["embed"]["embedding"])
    assert emb.shape == (VOCAB, 24) and abs(emb.std() - 0.05) < 0.01
    q = np.asarray(p["stack"]["layer_0"]["mixer"]["query"]["kernel"])
    k = np.asarray(p["stack"]["layer_0"]["mixer"]["key"]["kernel"])
    assert not np.allclose(q[:, :2], k)  # each parameter has its own random stream
    # the saved config rebuilds the same model
    again = from_json(to_json(cfg)).build()
    assert again.cfg == cfg


def test_loss_matches_oracle_with_mask_and_z_loss():
    cfg = small_cfg(z_loss_weight=1e-2)
    lm = cfg.build()
    b = make_batch(3, 9, seed=7)
    variables = nn.unbox(fake_init(lambda: lm.init(jax.random.key(0), b)))

    @jax.jit
    def run(v):
        loss, metrics, new = lm.loss(v, b, jax.random.key(1), train=True)
        return loss, metrics, new, lm.apply(v, b)[0]

    loss, metrics, new, logits = run(variables)
    lg = np.float64(logits)
    logz = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
    tgt = np.asarray(b["targets"])
    ce = logz - np.take_along_axis(lg, tgt[..., None], -1)[..., 0]
    m = np.float64(b["loss_mask"])
    ce_ref = (ce * m).sum() / m.sum()
    z_ref = 1e-2 * (logz**2 * m).sum() / m.sum()
    np.testing.assert_allclose(float(metrics["loss"]), ce_ref, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["z_loss"]), z_ref, rtol=1e-5)
    np.testing.assert_allclose(float(loss), ce_ref + z_ref, rtol=1e-5)
    assert float(metrics["tokens"]) == m.sum() and float(metrics["aux_loss"]) == 0.0
    acc = ((lg.argmax(-1) == tgt) * m).sum() / m.sum()
    np.testing.assert_allclose(float(metrics["accuracy"]), acc, rtol=1e-6)
    assert new == {"stats": {}, "carry": {}}


def test_collect_intermediates_sums_aux_and_flattens_metrics():
    inter = {
        "stack": {
            "layer_0": {
                "ffn": {"aux_loss": (jnp.float32(0.25),), "metrics": ({"load": jnp.ones(3), "sub": {"a": 1.0}},)}
            },
            "layers": {"block_1": {"mixer": {"aux_loss": (jnp.array([0.5, 1.0]),)}}},  # scanned: one per repeat
        }
    }
    aux, metrics = collect_intermediates(inter)
    np.testing.assert_allclose(float(aux), 1.75)
    assert set(metrics) == {
        "stack/layer_0/ffn/aux_loss",
        "stack/layer_0/ffn/load",
        "stack/layer_0/ffn/sub/a",
        "stack/layers/block_1/mixer/aux_loss",
    }


def test_flops_per_token_convention():
    for tie in (False, True):
        cfg = small_cfg(num_layers=3, tie_embeddings=tie)
        lm = cfg.build()
        d, f, v, h, kv, hd = 24, 40, VOCAB, 4, 2, 6
        per_layer = 3 * d * f + d * h * hd + 2 * d * kv * hd + h * hd * d + 2 * d
        n = 3 * per_layer + d + v * d  # + final norm + output matrix (once)
        expected = 6 * n + 3 * 12 * 100 * h * hd / 2
        assert lm.flops_per_token(100) == pytest.approx(expected, rel=1e-12)


def test_generate_greedy_is_consistent_with_forward():
    cfg = small_cfg()
    lm = cfg.build()
    prompt = make_batch(2, 4, seed=8)["inputs"]
    variables = nn.unbox(fake_init(lambda: lm.init(jax.random.key(0), make_batch(2, 4))))
    out = lm.generate(variables, prompt, 5, jax.random.key(0), temperature=0.0)
    assert out.shape == (2, 9) and out.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(out[:, :4]), np.asarray(prompt))
    logits = jax.jit(lambda p, t: Decoder(cfg).apply({"params": p}, t))(variables["params"], out)
    # each new token is the argmax after its prefix (the forward is causal, so one pass checks all)
    np.testing.assert_array_equal(np.asarray(out[:, 4:]), np.asarray(jnp.argmax(logits[:, 3:8], -1)))
    with pytest.raises(ValueError, match="top_k"):
        lm.generate(variables, prompt, 2, jax.random.key(0), top_k=0)


def test_sample_logits_top_k_and_temperature():
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((64, VOCAB)), jnp.float32)
    key = jax.random.key(3, impl="rbg")
    top3 = np.argsort(-np.asarray(logits), -1)[:, :3]
    s = np.asarray(jax.jit(sample_logits, static_argnums=(2, 3))(logits, key, 1.0, 3))
    assert all(s[i] in top3[i] for i in range(64))
    assert len(set(s.tolist())) > 3  # it samples, not argmax
    g = np.asarray(jax.jit(sample_logits, static_argnums=(2, 3))(logits, key, 0.0, None))
    np.testing.assert_array_equal(g, np.asarray(logits).argmax(-1))


@pytest.mark.parametrize("tie", [False, True])
def test_chunked_loss_equals_the_whole_logits_loss(tie):
    """loss_chunk: the loss, every metric and every gradient equal the one-piece loss (seq 9 is not a multiple
    of the chunk 4: the padded tail is dropped), tied and untied heads."""
    cfg = small_cfg(z_loss_weight=1e-2, tie_embeddings=tie)
    chunked = small_cfg(z_loss_weight=1e-2, tie_embeddings=tie, loss_chunk=4)
    b = make_batch(3, 9, seed=3)
    lm, lmc = cfg.build(), chunked.build()
    variables = nn.unbox(fake_init(lambda: lm.init(jax.random.key(0), b)))

    def run(task):
        f = lambda v: task.loss(v, b, jax.random.key(1), train=True)[:2]  # noqa: E731
        (loss, metrics), grads = jax.jit(jax.value_and_grad(lambda v: f(v), has_aux=True))(variables)
        return loss, metrics, grads

    loss, metrics, grads = run(lm)
    loss_c, metrics_c, grads_c = run(lmc)
    np.testing.assert_allclose(float(loss_c), float(loss), rtol=1e-6)
    for k in metrics:
        np.testing.assert_allclose(np.asarray(metrics_c[k]), np.asarray(metrics[k]), rtol=1e-6, err_msg=k)
    for (path, g), gc in zip(jax.tree_util.tree_leaves_with_path(grads["params"]), jax.tree.leaves(grads_c["params"])):
        np.testing.assert_allclose(np.asarray(gc), np.asarray(g), rtol=2e-5, atol=1e-7,
                                   err_msg=jax.tree_util.keystr(path))


def test_chunked_loss_never_holds_the_whole_logits():
    """The compiled gradient's temporaries fall below one float32 [B, S, V] logits tensor when the loss is
    chunked (the scan body is rematerialized: without jax.checkpoint they stay above it), from over twice it."""
    b, s, v = 8, 128, 8192
    batch = make_batch(b, s, seed=1, vocab=v)

    def temp(**kw):
        task = small_cfg(vocab_size=v, num_layers=1, **kw).build()
        variables = nn.unbox(fake_init(lambda: task.init(jax.random.key(0), batch)))
        g = jax.jit(jax.grad(lambda p: task.loss(p, batch, jax.random.key(1), train=True)[0]))
        return g.lower(variables).compile().memory_analysis().temp_size_in_bytes

    whole, chunked = temp(), temp(loss_chunk=16)
    logits_bytes = b * s * v * 4  # 32 MiB; measured on CPU: whole 72 MiB, chunked 17 MiB (49 MiB without remat)
    assert chunked < logits_bytes < whole / 2, (whole / 2**20, chunked / 2**20)


def test_decoder_parameter_tree_is_the_same_with_setup():
    """The Decoder's submodules keep their names (embed, stack, lm_head): checkpoints and HF layouts load."""
    for tie in (False, True):
        lm = small_cfg(tie_embeddings=tie).build()
        p = jax.eval_shape(lambda lm=lm: lm.init(jax.random.key(0), make_batch(1, 4)))["params"]
        assert set(p) == ({"embed", "stack"} if tie else {"embed", "stack", "lm_head"})
        assert set(nn.unbox(p)["embed"]) == {"embedding"}
        if not tie:
            assert set(nn.unbox(p)["lm_head"]) == {"kernel"}


def test_loss_chunk_is_refused_where_the_loss_is_no_token_cross_entropy():
    from axlearn_like.config import ConfigError, apply_overrides
    from recipes import ebt, ebt_denoise

    for mod, what in ((ebt, "EBT thinks"), (ebt_denoise, "denoiser's loss")):
        with pytest.raises(ConfigError, match=f"model.loss_chunk: the {what}"):
            apply_overrides(mod.config(), ["model.loss_chunk=8"]).model.validate()
