"""Decoder stack: shapes, causality, packed-document isolation, scan == unscanned, remat, tying, patterns,
parameter metadata and config errors."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from axlearn_like.config import ConfigError, apply_overrides
from axlearn_like.params import Param, logical_axes, weight_decay_mask
from models.decoder import (
    REMAT_POLICY_NAMES,
    Decoder,
    DecoderConfig,
    stack_layer_params,
    unstack_layer_params,
)
from tests.models.model_helpers import VOCAB, DummyMixerConfig, attention, fake_init, make_batch, randn, small_cfg
from tests.oracle import assert_close


def _init(cfg, tokens, seed=0):
    return fake_init(lambda: Decoder(cfg).init(jax.random.key(0), tokens), seed)


def test_shapes_dtypes_and_tied_output_default_bf16():
    cfg = small_cfg(dtype="bfloat16", tie_embeddings=True)
    tokens = make_batch(2, 11)["inputs"]
    params = nn.unbox(_init(cfg, tokens))["params"]
    assert "lm_head" not in params
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    apply = jax.jit(lambda p, t, h: Decoder(cfg).apply({"params": p}, t, return_hidden=h), static_argnums=2)
    logits = apply(params, tokens, False)
    hidden = apply(params, tokens, True)
    assert logits.shape == (2, 11, VOCAB) and logits.dtype == jnp.float32
    assert hidden.shape == (2, 11, cfg.d_model) and hidden.dtype == jnp.bfloat16
    # tied output: logits = hidden . E^T (bf16 operands, f32 accumulation)
    emb = np.float64(params["embed"]["embedding"].astype(jnp.bfloat16).astype(jnp.float32))
    ref = np.einsum("bsd,vd->bsv", np.float64(hidden.astype(jnp.float32)), emb)
    assert_close(logits, ref, jnp.bfloat16, "tied logits")


def test_untied_output_has_its_own_matrix():
    toks = make_batch(2, 7, seed=5)["inputs"]
    tied = _init(small_cfg(tie_embeddings=True), toks)["params"]
    untied = _init(small_cfg(tie_embeddings=False), toks)["params"]
    assert untied["lm_head"]["kernel"].names == ("embed", "vocab")
    n = lambda t: sum(x.size for x in jax.tree.leaves(nn.unbox(t)))
    assert n(untied) - n(tied) == VOCAB * 24


def test_causality():
    cfg = small_cfg(num_layers=2)
    b = make_batch(2, 12, seed=1)
    params = nn.unbox(_init(cfg, b["inputs"]))["params"]
    t = 6
    changed = b["inputs"].at[:, t + 1 :].set((b["inputs"][:, t + 1 :] + 5) % VOCAB)
    fn = jax.jit(lambda p, x: Decoder(cfg).apply({"params": p}, x))
    a, c = np.asarray(fn(params, b["inputs"])), np.asarray(fn(params, changed))
    np.testing.assert_allclose(a[:, : t + 1], c[:, : t + 1], rtol=1e-6, atol=1e-6)
    assert np.abs(a[:, t + 1 :] - c[:, t + 1 :]).max() > 1e-4  # the change is visible later


def test_packed_documents_are_isolated():
    cfg = small_cfg()
    toks = make_batch(1, 13, seed=2)["inputs"]
    params = nn.unbox(_init(cfg, toks))["params"]
    fn = jax.jit(lambda p, x, pos, seg: Decoder(cfg).apply({"params": p}, x, positions=pos, segment_ids=seg))
    seg = jnp.array([[1] * 5 + [2] * 8])
    pos = jnp.array([list(range(5)) + list(range(8))])
    packed = np.asarray(fn(params, toks, pos, seg))
    for lo, hi in ((0, 5), (5, 13)):
        # the document alone at the start of a row (the tail is other tokens, invisible by causality)
        n = hi - lo
        alone_toks = jnp.roll(toks, -lo, axis=1)
        alone = fn(params, alone_toks, jnp.arange(13)[None], jnp.ones((1, 13), jnp.int32))
        np.testing.assert_allclose(packed[:, lo:hi], np.asarray(alone)[:, :n], rtol=1e-5, atol=1e-5)
    # without segment ids the second document does see the first one
    leaky = np.asarray(fn(params, toks, pos, jnp.ones_like(seg)))
    assert np.abs(leaky[:, 5:] - packed[:, 5:]).max() > 1e-4


def test_scan_equals_unscanned_with_restacked_params():
    kw = dict(num_layers=4, remat_policy="save_qkv_proj")
    cfg = small_cfg(layer_pattern=(attention(), DummyMixerConfig()), **kw)
    cfg_scan = small_cfg(layer_pattern=(attention(), DummyMixerConfig()), scan_layers=True, **kw)
    b = make_batch(2, 9, seed=3)
    variables = nn.unbox(_init(cfg, b["inputs"]))
    params = variables["params"]
    # make the dummy's per-layer weights distinct, so a wrong layer order shows
    for i in (1, 3):
        params["stack"][f"layer_{i}"]["mixer"]["w"] = 1.0 + randn(i, (cfg.d_model,), 0.3)
    stacked = stack_layer_params(params, cfg)
    scan_init = nn.unbox(_init(cfg_scan, b["inputs"]))["params"]
    assert jax.tree.map(jnp.shape, stacked) == jax.tree.map(jnp.shape, scan_init)
    extra = {k: stack_layer_params(variables[k], cfg, axis=1 if k == "carry" else 0) for k in ("stats", "carry")}

    def fn(c):
        return jax.jit(lambda p, x: Decoder(c).apply({"params": p, **extra_for[c.scan_layers]}, x, mutable=True)[0])

    extra_for = {False: {k: variables[k] for k in ("stats", "carry")}, True: extra}
    ref = np.asarray(fn(cfg)(params, b["inputs"]))
    scan_fn = fn(cfg_scan)
    out = np.asarray(scan_fn(stacked, b["inputs"]))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    # a wrong restacking (repeats swapped) gives different logits
    swapped = jax.tree.map(lambda x: x[::-1], stacked["stack"]["layers"])
    bad = np.asarray(scan_fn({**stacked, "stack": {**stacked["stack"], "layers": swapped}}, b["inputs"]))
    assert np.abs(bad - ref).max() > 1e-4
    back = unstack_layer_params(stacked, cfg)
    assert all(bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(params)))


def test_named_checkpoints_exist_and_policy_names_resolve():
    lm = small_cfg(num_layers=1).build()
    b = make_batch(1, 4)
    params = nn.unbox(fake_init(lambda: lm.init(jax.random.key(0), b)))["params"]
    jaxpr = str(jax.make_jaxpr(lambda p: lm.loss({"params": p}, b, jax.random.key(1), train=True)[0])(params))
    for name in ("qkv_proj", "attn_context", "attn_out", "mlp_gate", "mlp_up", "mlp_hidden"):
        assert f"name={name}" in jaxpr, name
    for name in REMAT_POLICY_NAMES:
        small_cfg(remat_policy=name).validate()


def test_remat_policies_give_identical_loss_and_grads():
    """Unscanned policies vs no remat, and a scanned remat stack vs the unscanned grads (restacked)."""
    # each variant is one more grad compile (~3 s on CPU): jax's own policies need no exhaustive sweep
    b = make_batch(2, 8, seed=4)
    base = small_cfg(num_layers=2)
    params = nn.unbox(fake_init(lambda: base.build().init(jax.random.key(0), b)))["params"]

    def loss_and_grad(cfg, p):
        lm = cfg.build()
        return jax.jit(jax.value_and_grad(lambda p: lm.loss({"params": p}, b, jax.random.key(1), train=True)[0]))(p)

    loss0, g0 = loss_and_grad(base, params)
    variants = [(small_cfg(num_layers=2, remat_policy=n), params, lambda g: g) for n in ("full",)]
    scan_cfg = small_cfg(num_layers=2, remat_policy="save_named", scan_layers=True)
    variants.append((scan_cfg, stack_layer_params(params, base), lambda g: unstack_layer_params(g, base)))
    for cfg, p, to_unscanned in variants:
        loss, g = loss_and_grad(cfg, p)
        g = to_unscanned(g)
        what = f"{cfg.remat_policy} scan={cfg.scan_layers}"
        np.testing.assert_allclose(float(loss), float(loss0), rtol=1e-6, err_msg=what)
        assert jax.tree.structure(g) == jax.tree.structure(g0), what
        for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(g0)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6, err_msg=what)


@pytest.mark.parametrize("scan", [False, True])
def test_mixed_pattern_with_a_test_defined_mixer(scan):
    cfg = small_cfg(num_layers=4, layer_pattern=(attention(), DummyMixerConfig()), scan_layers=scan,
                    remat_policy="full")
    b = make_batch(3, 6, seed=6)
    lm = cfg.build()
    variables = fake_init(lambda: lm.init(jax.random.key(0), b))
    assert set(variables) == {"params", "stats", "carry"}
    stack_carry = variables["carry"]["stack"]
    last = stack_carry["layers"]["block_1"]["mixer"]["last"] if scan else stack_carry["layer_1"]["mixer"]["last"]
    assert last.shape == ((3, 2, cfg.d_model) if scan else (3, cfg.d_model))  # global batch leads
    unboxed = nn.unbox(variables)
    step = jax.jit(lambda v, train: lm.loss(v, b, jax.random.key(1), train=train), static_argnums=1)
    loss, metrics, new = step(unboxed, True)
    stack = unboxed["params"]["stack"]
    ws = list(stack["layers"]["block_1"]["mixer"]["w"]) if scan else [stack[f"layer_{i}"]["mixer"]["w"] for i in (1, 3)]
    np.testing.assert_allclose(float(metrics["aux_loss"]), sum(0.5 * float(jnp.mean(w)) for w in ws), rtol=1e-5)
    np.testing.assert_allclose(float(loss), float(metrics["loss"] + metrics["aux_loss"]), rtol=1e-6)
    key = "stack/layers/block_1/mixer/mean_abs" if scan else "stack/layer_3/mixer/mean_abs"
    assert key in metrics and np.all(np.asarray(metrics[key]) > 0)
    counts = jax.tree.leaves(new["stats"])
    assert counts and all(np.all(np.asarray(c) == 1.0) for c in counts)
    new_last = jax.tree.leaves(new["carry"])[0]
    assert new_last.shape == last.shape and float(jnp.abs(new_last).sum()) > 0
    _, _, new_eval = step(unboxed, False)
    assert all(np.all(np.asarray(c) == 0.0) for c in jax.tree.leaves(new_eval["stats"]))


@pytest.mark.parametrize("scan", [False, True])
def test_param_metadata_weight_decay_and_logical_axes(scan):
    cfg = small_cfg(scan_layers=scan, layer_pattern=(attention(qk_norm=True),))
    boxed = _init(cfg, make_batch(1, 4)["inputs"])["params"]
    leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves
    mask = dict(jax.tree_util.tree_leaves_with_path(weight_decay_mask(boxed)))
    axes = dict(jax.tree_util.tree_leaves_with_path(logical_axes(boxed), is_leaf=lambda x: isinstance(x, tuple)))
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path)
        assert isinstance(leaf, Param), name
        assert len(leaf.names) == leaf.value.ndim and all(isinstance(a, str) for a in leaf.names), name
        if scan and "'layers'" in name:
            assert leaf.names[0] == "layers", name
        is_norm = "norm" in name
        assert mask[path] is (not is_norm), f"{name}: weight_decay={mask[path]}"
        assert axes[path] == tuple(leaf.names), name


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["layer_pattern=attention,nope"], "layer_pattern"),
        (["ffn_pattern=mlp,bogus_ffn"], "ffn_pattern"),
        (["layer_pattern.attention.num_kv_heads=3"], "layer_pattern.0.num_kv_heads"),
        (["remat_policy=everything"], "remat_policy"),
        (["layer_pattern=attention,attention", "num_layers=3", "scan_layers=true"], "scan_layers"),
        (["dtype=float16"], "dtype"),
        (["d_model=0"], "d_model"),
    ],
)
def test_config_errors_are_one_line(overrides, key):
    with pytest.raises(ConfigError) as e:
        apply_overrides(DecoderConfig(), overrides)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(key + ":"), msg
    if key == "remat_policy":
        assert "dots_saveable" in msg and "save_qkv_proj" in msg  # lists the valid names


def test_unscannable_layer_count_allowed_without_scan():
    cfg = apply_overrides(DecoderConfig(), ["layer_pattern=attention,attention", "num_layers=3"])
    assert [tuple(k.kind for k in cfg.layer_kinds(i)) for i in range(3)] == [("attention", "mlp")] * 3


def test_sharded_forward_matches_single_device():
    """Logical names resolve through axlearn_like.sharding rules on a (data 2, fsdp 2, tensor 2) CPU mesh."""
    from jax.sharding import NamedSharding

    from axlearn_like.sharding import DEFAULT_RULES, MeshConfig, logical_rules, logical_to_spec, make_mesh

    cfg = small_cfg(vocab_size=40, scan_layers=True, layer_pattern=(attention(),))
    b = make_batch(4, 8, seed=9, vocab=40)
    boxed = _init(cfg, b["inputs"])["params"]
    known = {k for k, _ in DEFAULT_RULES}
    assert all(set(a) <= known for a in jax.tree.leaves(logical_axes(boxed), is_leaf=lambda x: isinstance(x, tuple)))
    params = nn.unbox(boxed)
    fn = lambda p, t: Decoder(cfg).apply({"params": p}, t, segment_ids=jnp.ones_like(t))
    ref = np.asarray(jax.jit(fn)(params, b["inputs"]))
    mesh_cfg = MeshConfig(data=2, fsdp=2, tensor=2)
    mesh, rules = make_mesh(mesh_cfg), logical_rules(mesh_cfg)
    shard = jax.tree.map(
        lambda x: NamedSharding(mesh, logical_to_spec(x.names, rules, mesh)),
        boxed,
        is_leaf=lambda x: isinstance(x, nn.Partitioned),
    )
    assert shard["embed"]["embedding"].spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    tokens = jax.device_put(b["inputs"], NamedSharding(mesh, logical_to_spec(("batch", "length"), rules, mesh)))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        out = jax.jit(fn)(jax.device_put(params, shard), tokens)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)
