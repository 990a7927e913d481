"""Layer kinds (models/kinds.py): a mixer defined in this file alone trains through the trainer; every
built-in kind declares the logical axes its parameters use and its FLOPs; the "none" FFN; pattern entries
on the command line (index / kind / *, whole patterns from kind names); the decoder's own checks; the stack
found by its layout."""
import dataclasses
import json
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from axlearn_like import config as config_lib
from axlearn_like.config import ConfigError, apply_overrides, config_class
from axlearn_like.params import logical_axes, param_init
from axlearn_like.sharding import DEFAULT_RULES
from models.attention import AttentionConfig
from models.decoder import Decoder, stack_layer_params, unstack_layer_params
from models.ebt import System2AttentionConfig
from models.ebt_denoise import BidirectionalAttentionConfig
from models.kinds import FFNConfig, LayerContext, MixerConfig, NoFFNConfig
from models.layers import MLPConfig
from models.moe import MoEConfig
from models.simplicial import SimplicialConfig
from models.ssm import Mamba2Config
from tests.models.model_helpers import attention, fake_init, make_batch, small_cfg


# --- a new mixer kind, in this file only ------------------------------------------------------------------
class ShiftMix(nn.Module):
    """y_t = W [x_t ; x_{t-1}] (a causal token shift): [B, S, D] -> [B, S, D]."""

    init_std: float

    @nn.compact
    def __call__(self, x, *, positions, segment_ids, train):
        del positions, segment_ids, train
        d = x.shape[-1]
        init = param_init(nn.initializers.normal(self.init_std), ("mlp", "embed"))
        w = self.param("w", init, (2 * d, d), jnp.float32)
        prev = jnp.pad(x, ((0, 0), (1, 0), (0, 0)))[:, :-1]
        return jnp.concatenate([x, prev], axis=-1) @ w.astype(x.dtype)


@config_class
class ShiftMixConfig(MixerConfig):
    kind: ClassVar[str] = "shift_mix"
    logical_axes: ClassVar[tuple[str, ...]] = ("mlp", "embed")

    def build(self, ctx: LayerContext, name: str) -> nn.Module:
        return ShiftMix(ctx.init_std, name=name)

    def extra_flops(self, d_model: int, seq_len: int) -> float:
        return 0.0


def test_a_mixer_defined_in_a_test_file_trains_two_steps(tmp_path):
    from axlearn_like import trainer
    from recipes import dense_lm
    from tests.core import helpers

    cfg = apply_overrides(dense_lm.config(), list(helpers.TINY) + [
        "model.layer_pattern=attention,tests.models.test_layer_kinds:ShiftMixConfig", "trainer.steps=2",
        "trainer.log_every=1", "trainer.eval_batches=0", "checkpoint.enabled=false", f"run_dir={tmp_path}"])
    assert [m.kind for m in cfg.model.layer_pattern] == ["attention", "shift_mix"]
    result = trainer.run(cfg)
    assert result["final_step"] == 2 and np.isfinite(result["last_train"]["train/objective"])
    state = result["state"]
    assert state.params["stack"]["layer_1"]["mixer"]["w"].shape == (2 * cfg.model.d_model, cfg.model.d_model)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model"]["layer_pattern"][1]["_type"] == "tests.models.test_layer_kinds:ShiftMixConfig"
    assert config_lib.from_json((tmp_path / "config.json").read_text()).model == cfg.model


def test_a_kind_without_its_flops_fails_at_class_creation():
    with pytest.raises(TypeError, match="extra_flops"):
        class NoFlops(MixerConfig):  # noqa: F841
            kind: ClassVar[str] = "no_flops"
            logical_axes: ClassVar[tuple[str, ...]] = ()

            def build(self, ctx, name):
                return None
    with pytest.raises(TypeError, match="kind"):
        class Unnamed(AttentionConfig):  # a subclass must name itself, or the CLI would select it as "attention"
            pass


# --- the built-in kinds -------------------------------------------------------------------------------------
BUILTIN = [
    AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=6, qk_norm=True),
    SimplicialConfig(num_heads=2, num_kv_heads=1, head_dim=6, w1=4, w2=2),
    Mamba2Config(d_state=8, head_dim=8, chunk_size=8),
    System2AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=6),
    BidirectionalAttentionConfig(num_heads=4, num_kv_heads=2, head_dim=6),
    MLPConfig(mlp_dim=40),
    MoEConfig(num_experts=4, top_k=2, expert_dim=8),
    NoFFNConfig(),
]


@pytest.mark.parametrize("kind", BUILTIN, ids=lambda k: k.kind)
def test_builtin_kind_declares_its_axes_and_flops(kind):
    ctx = LayerContext(d_model=24, dtype=jnp.float32, init_std=0.02, out_init_std=0.01, norm_eps=1e-6,
                       layer_index=0, num_layers=2)
    config_lib.validate_tree(kind)
    kind.validate_in(ctx)
    assert set(kind.logical_axes) <= {k for k, _ in DEFAULT_RULES}
    layer = kind.build(ctx, "layer")
    x = jnp.zeros((2, 5, 24), jnp.float32)
    if layer is None:
        assert isinstance(kind, NoFFNConfig) and kind.extra_flops(24, 5) == 0.0
        return
    if isinstance(kind, MixerConfig):
        pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
        call = lambda m: m(x, positions=pos, segment_ids=None, train=False)
    else:
        call = lambda m: m(x, train=False)
    mutable = ["cache"] if isinstance(kind, System2AttentionConfig) else False  # its observe pass fills the cache
    boxed = jax.eval_shape(lambda: nn.Module.init(layer, jax.random.key(0), method=call, mutable=True))["params"]
    used = {a for axes in jax.tree.leaves(logical_axes(boxed), is_leaf=lambda t: isinstance(t, tuple)) for a in axes}
    assert used - {None} <= set(kind.logical_axes), (kind.kind, used)
    y, _ = layer.apply(nn.unbox(fake_init(lambda: nn.Module.init(layer, jax.random.key(0), method=call, mutable=True))),
                       method=call, mutable=mutable or ["intermediates", "stats", "carry"])
    assert y.shape == x.shape
    assert isinstance(kind.extra_flops(24, 64), float)


def test_recurrence_comes_from_the_kind():
    ssm = Mamba2Config(d_state=8, head_dim=8, chunk_size=8)
    assert small_cfg(layer_pattern=(ssm,)).recurrent
    assert not small_cfg(layer_pattern=(dataclasses.replace(ssm), attention())).recurrent


def test_no_ffn_block_is_the_mixer_half_only():
    ssm = Mamba2Config(d_state=8, head_dim=8, chunk_size=8)
    cfg = small_cfg(layer_pattern=(ssm,), ffn_pattern=(NoFFNConfig(),))
    b = make_batch(2, 6)
    lm = cfg.build()
    params = nn.unbox(fake_init(lambda: lm.init(jax.random.key(0), b)))["params"]
    assert set(params["stack"]["layer_0"]) == {"mixer_norm", "mixer"}
    with_mlp = small_cfg(layer_pattern=(dataclasses.replace(ssm),)).build()
    assert lm.param_count() < with_mlp.param_count()
    logits = jax.jit(lambda p: lm.module.apply({"params": p}, b["inputs"]))(params)
    assert logits.shape == (2, 6, cfg.vocab_size) and bool(jnp.all(jnp.isfinite(logits)))
    # the FFN-free block is x + mixer(norm(x)): with the mixer's output projection zeroed, the stack is identity
    zeroed = jax.tree.map(lambda x: x, params)
    for layer in ("layer_0", "layer_1"):
        out = zeroed["stack"][layer]["mixer"]["out_proj"]
        out["kernel"] = jnp.zeros_like(out["kernel"])
    h = lm.module.apply({"params": zeroed}, b["inputs"], return_hidden=True)
    emb = zeroed["embed"]["embedding"][b["inputs"]]
    scale = zeroed["stack"]["final_norm"]["scale"]
    ref = emb * jax.lax.rsqrt(jnp.mean(emb ** 2, -1, keepdims=True) + cfg.norm_eps) * scale
    np.testing.assert_allclose(np.asarray(h), np.asarray(ref), rtol=1e-5, atol=1e-6)


# --- the decoder's checks --------------------------------------------------------------------------------
def test_an_entry_object_shared_by_two_layers_is_refused():
    a = attention()
    with pytest.raises(ConfigError, match="^layer_pattern: a layer-kind config object appears twice"):
        small_cfg(layer_pattern=(a, a))


def test_wrong_base_and_unknown_axes_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"^layer_pattern\.0: expected a MixerConfig"):
        small_cfg(layer_pattern=(MLPConfig(),))

    @config_class
    class OddAxes(MixerConfig):
        kind: ClassVar[str] = "odd_axes"
        logical_axes: ClassVar[tuple[str, ...]] = ("embed", "rotary_bins")

        def build(self, ctx, name):
            return None

        def extra_flops(self, d_model, seq_len):
            return 0.0

    with pytest.raises(ConfigError, match=r"^layer_pattern\.1: kind 'odd_axes' uses logical axes \['rotary_bins'\]"):
        small_cfg(layer_pattern=(attention(), OddAxes()))


def test_model_dependent_checks_name_the_entry():
    from recipes import mamba2

    with pytest.raises(ConfigError) as e:
        apply_overrides(mamba2.config(), ["model.layer_pattern.0.head_dim=48"])
    assert str(e.value).startswith("model.layer_pattern.0.head_dim: expand * d_model = 256"), str(e.value)


# --- pattern entries on the command line ----------------------------------------------------------------
def _hybrid():
    from recipes import simplicial

    return simplicial.config()


def test_set_reaches_entries_by_index_kind_and_star():
    cfg = apply_overrides(_hybrid(), ["model.layer_pattern.3.w1=16", "model.layer_pattern.attention.head_dim=16",
                                      "model.layer_pattern.*.num_kv_heads=1"])
    pat = cfg.model.layer_pattern
    assert pat[3].w1 == 16 and [m.head_dim for m in pat] == [16, 16, 16, 32]
    assert [m.num_kv_heads for m in pat] == [1, 1, 1, 1]
    one = apply_overrides(_hybrid(), ["model.layer_pattern.1.num_heads=2"])
    assert [m.num_heads for m in one.model.layer_pattern] == [6, 2, 6, 4]  # entries are independent copies
    shown = json.loads(config_lib.to_json(cfg))["model"]["layer_pattern"]
    assert shown[3]["_type"] == "models.simplicial:SimplicialConfig" and shown[3]["w1"] == 16


@pytest.mark.parametrize("override, message", [
    ("model.layer_pattern.7.w1=4", "unknown config key 'model.layer_pattern.7.w1': model.layer_pattern has 4 entries"),
    ("model.layer_pattern.mamba2.d_state=4", "has no entry of kind 'mamba2' (kinds: attention, simplicial)"),
    ("model.layer_pattern.*.d_state=4", "no entry of model.layer_pattern has a field 'd_state'"),
    ("model.layer_pattern.simplicial.nope=4", "model.layer_pattern.simplicial has no field 'nope'"),
    ("model.layer_pattern.3=attention", "model.layer_pattern.3: is a pattern entry; set its fields"),
    ("model.layer_pattern.simplicial.w1=wide", "model.layer_pattern.simplicial.w1: expected an integer"),
    ("model.ffn_pattern=mlp,moe", "model.ffn_pattern: no 'moe' entry to copy (present: mlp)"),
    ("model.ffn_pattern=models.simplicial:SimplicialConfig",
     "model.ffn_pattern: models.simplicial:SimplicialConfig is not a FFNConfig"),
    ("model.ffn_pattern=models.nope:X", "model.ffn_pattern: cannot import 'models.nope:X'"),
])
def test_pattern_override_errors_are_one_line(override, message):
    with pytest.raises(ConfigError) as e:
        apply_overrides(_hybrid(), [override])
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_whole_pattern_from_kind_names_and_classes():
    from recipes import moe

    cfg = apply_overrides(moe.config(), ["model.ffn_pattern=mlp,moe,moe", "model.num_layers=3",
                                         "model.ffn_pattern.2.top_k=1"])
    pat = cfg.model.ffn_pattern
    assert [f.kind for f in pat] == ["mlp", "moe", "moe"] and [f.top_k for f in pat[1:]] == [2, 1]
    assert pat[1] == moe.config().model.ffn_pattern[1]  # copies of the recipe's own entry
    new = apply_overrides(_hybrid(), ["model.ffn_pattern=models.kinds:NoFFNConfig"])
    assert new.model.ffn_pattern == (NoFFNConfig(),)


# --- the stack is found by its layout ---------------------------------------------------------------------
def test_stacking_finds_the_stack_by_its_layout_not_by_name_prefixes():
    cfg = small_cfg(num_layers=2)
    b = make_batch(1, 4)
    params = nn.unbox(fake_init(lambda: Decoder(cfg).init(jax.random.key(0), b["inputs"])))["params"]
    # a sibling whose keys merely start with "layer_" / hold a "layers" dict is not the stack
    tree = {"adapter": {"layer_scale": jnp.ones(3), "layers": {"block_0": jnp.ones(2)}}, **params}
    stacked = stack_layer_params(tree, cfg)
    assert stacked["adapter"] is tree["adapter"]
    assert set(stacked["stack"]) == {"layers", "final_norm"}
    assert stacked["stack"]["layers"]["block_0"]["mixer"]["query"]["kernel"].shape[0] == 2
    back = unstack_layer_params(stacked, cfg)
    assert back["adapter"] is tree["adapter"]
    assert jax.tree.map(jnp.shape, back["stack"]) == jax.tree.map(jnp.shape, params["stack"])
    # a model whose layer count differs from the config's is not mistaken for this stack
    other = {"stack": {"layer_0": {}, "layer_5": {}}}
    assert stack_layer_params(other, cfg) == other


def test_decoder_config_round_trips_patterns():
    cfg = small_cfg(layer_pattern=(attention(), SimplicialConfig(num_heads=2, head_dim=6, w1=4, w2=2)),
                    ffn_pattern=(MLPConfig(mlp_dim=8), NoFFNConfig()))
    back = config_lib.from_json(config_lib.to_json(cfg))
    assert back == cfg and isinstance(back.ffn_pattern[1], FFNConfig) and isinstance(back.layer_pattern, tuple)


def test_migrate_dict_rewrites_the_old_layout():
    old = {"_type": "models.decoder:DecoderConfig", "d_model": 24, "layer_pattern": ["attention", "mamba2"],
           "ffn_pattern": ["mlp", "moe"], "mlp_dim": 40, "attention": {"_type": "models.attention:AttentionConfig",
           "num_heads": 2, "num_kv_heads": 1, "head_dim": 12}, "simplicial": None,
           "moe": {"_type": "models.moe:MoEConfig", "num_experts": 4},
           "ssm": {"_type": "models.ssm:Mamba2Config", "d_state": 8}}
    cfg = config_lib.from_dict(old)
    assert cfg.layer_pattern == (AttentionConfig(num_heads=2, num_kv_heads=1, head_dim=12), Mamba2Config(d_state=8))
    assert cfg.ffn_pattern == (MLPConfig(mlp_dim=40), MoEConfig(num_experts=4))
    with pytest.raises(ConfigError, match="its 'ssm' section is missing"):
        config_lib.from_dict({**old, "ssm": None})
    with pytest.raises(ConfigError, match="unknown layer kind 'retnet'"):
        config_lib.from_dict({**old, "layer_pattern": ["retnet"]})
    ebt = config_lib.from_dict({"_type": "models.ebt:EBTConfig", "layer_pattern": ["ebt_attention"],
                                "attention_form": "dense", "attention_query_block": 8, "predicted_attention": "xla"})
    assert ebt.layer_pattern == (System2AttentionConfig(form="dense", query_block=8, predicted="xla"),)
    assert ebt.attention_form == "dense"


@pytest.mark.parametrize("kind, op", [
    (AttentionConfig(), "attention"), (SimplicialConfig(), "simplicial"), (Mamba2Config(), "ssd"),
    (MoEConfig(), "grouped_matmul"),
], ids=lambda x: getattr(x, "kind", x))
def test_implementation_is_checked_against_the_ops_table(kind, op):
    import importlib

    table = importlib.import_module(f"kernels.{op}").IMPLEMENTATIONS
    for name in table:
        config_lib.validate_tree(dataclasses.replace(kind, implementation=name))
    with pytest.raises(ConfigError, match=rf"^implementation: 'cuda9' is not one of None, .*kernels\.{op}\.IMPL"):
        config_lib.validate_tree(dataclasses.replace(kind, implementation="cuda9"))
