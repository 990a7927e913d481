"""The decoder-only stack that mixes layer kinds by a cyclic pattern, and its config.

Layer i is a pre-norm residual block (GPT-2/LLaMA style):
    x <- x + mixer_i(RMSNorm(x));   x <- x + ffn_i(RMSNorm(x))
with mixer_i = MIXERS[layer_pattern[i % len(layer_pattern)]] and ffn_i = FFNS[ffn_pattern[i % len(ffn_pattern)]].

Extending: a new layer kind registers one factory line in its own module, e.g. in models/moe.py
    FFNS["moe"] = lambda cfg, layer_index, name: MoE(cfg.moe, ..., name=name)
A factory returns an unbound linen Module named `name`; mixers are called as
`mixer(x, *, positions, segment_ids, train)` and FFNs as `ffn(x, *, train)`, both [B,S,D] -> [B,S,D].
Its own hyper-parameters live in a config section the factory reads from `cfg` (a DecoderConfig subclass
adding e.g. `moe: MoEConfig`, or a field the lead adds here). Modules listed in PLUGIN_MODULES are imported
on the first unknown name, so a config saved with "moe" in its pattern rebuilds without extra imports.
Layers may own 'stats'/'carry' variables and sow into 'intermediates' (axlearn_like/state.py).

Scanned stacks (scan_layers=True) run nn.scan over num_layers / period repeats of one pattern period
(period = lcm of the two pattern lengths). Every 'params'/'stats'/'intermediates' leaf then has a leading
"layers" axis; 'carry' leaves are stacked on axis 1 so the global batch stays their leading axis. A factory
called under scan sees the layer index of the first repeat (i.e. the index within the period).
"""
from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from axlearn_like.config import ConfigError, config_class, require
from axlearn_like.task import SampleConfig
from models.attention import Attention, AttentionConfig
from models.layers import DTYPES, MLP, Dense, Embed, RMSNorm, get_dtype

LayerFactory = Callable[["DecoderConfig", int, str], nn.Module]

# pattern name -> factory(cfg, layer_index, name) -> nn.Module.
MIXERS: dict[str, LayerFactory] = {}
FFNS: dict[str, LayerFactory] = {}
# pattern name -> fn(cfg, seq_len) -> training FLOPs per token of ONE such layer *beyond* 6 x its parameter
# count (e.g. the attention score/value matmuls; negative for MoE experts a token does not use).
MIXER_FLOPS: dict[str, Callable[["DecoderConfig", int], float]] = {}
FFN_FLOPS: dict[str, Callable[["DecoderConfig", int], float]] = {}

PLUGIN_MODULES: tuple[str, ...] = ("models.simplicial", "models.moe", "models.ssm", "models.ebt")


def _import_plugins() -> None:
    for mod in PLUGIN_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:  # the plugin exists but one of its own imports is missing: surface that
                raise


def lookup(kind: str, name: str) -> LayerFactory:
    """kind: 'mixer' | 'ffn'. Unknown names raise a one-line ConfigError listing the registered ones."""
    registry = MIXERS if kind == "mixer" else FFNS
    if name not in registry:
        _import_plugins()
    if name not in registry:
        key = "layer_pattern" if kind == "mixer" else "ffn_pattern"
        raise ConfigError(
            f"{key}: unknown {kind} {name!r}; registered: {sorted(registry)} "
            f"(register it with {'MIXERS' if kind == 'mixer' else 'FFNS'}[{name!r}] = factory in its module)"
        )
    return registry[name]


def _remat_policies() -> dict[str, Any]:
    cp = jax.checkpoint_policies
    names = ("qkv_proj", "attn_context", "attn_out", "mlp_gate", "mlp_up", "mlp_hidden")
    return {
        "none": None,  # no rematerialisation
        "full": cp.nothing_saveable,  # keep only each block's input
        "dots_saveable": cp.dots_saveable,
        "dots_with_no_batch_dims_saveable": cp.dots_with_no_batch_dims_saveable,
        "save_qkv_proj": cp.save_only_these_names("qkv_proj"),
        "save_attn": cp.save_only_these_names("qkv_proj", "attn_context", "attn_out"),
        "save_mlp": cp.save_only_these_names("mlp_gate", "mlp_up", "mlp_hidden"),
        "save_named": cp.save_only_these_names(*names),  # recompute only elementwise work
    }


REMAT_POLICY_NAMES: tuple[str, ...] = tuple(_remat_policies())


def remat_policy(name: str) -> Any:
    policies = _remat_policies()
    if name not in policies:
        raise ConfigError(f"remat_policy: unknown policy {name!r}; choose one of {list(policies)}")
    return policies[name]


@config_class
class DecoderConfig:
    """Decoder-only LM. `build()` returns the Task (models.lm.LanguageModel) the trainer runs.

    init_std: std of every input-side matrix and the embeddings; output projections (attention out, MLP
    down) use init_std / sqrt(2 * num_layers) when scale_out_init (GPT-2). z_loss_weight: weight of
    mean(logsumexp(logits)^2) added to the training loss (PaLM).
    """

    vocab_size: int = 256
    d_model: int = 256
    num_layers: int = 4
    layer_pattern: tuple[str, ...] = ("attention",)
    ffn_pattern: tuple[str, ...] = ("mlp",)
    attention: AttentionConfig = dataclasses.field(default_factory=AttentionConfig)
    mlp_dim: int = 1024
    tie_embeddings: bool = False
    scan_layers: bool = False
    remat_policy: str = "none"
    dtype: str = "bfloat16"
    norm_eps: float = 1e-6
    init_std: float = 0.02
    scale_out_init: bool = True
    z_loss_weight: float = 0.0
    sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)
    # Config sections of the plugin layer kinds (set by recipes that use them; None when unused):
    # models.simplicial.SimplicialConfig, models.moe.MoEConfig, models.ssm.Mamba2Config.
    simplicial: Any = None
    moe: Any = None
    ssm: Any = None

    @property
    def period(self) -> int:
        return math.lcm(len(self.layer_pattern), len(self.ffn_pattern))

    def layer_kinds(self, layer_index: int) -> tuple[str, str]:
        """(mixer name, ffn name) of layer `layer_index`."""
        return (
            self.layer_pattern[layer_index % len(self.layer_pattern)],
            self.ffn_pattern[layer_index % len(self.ffn_pattern)],
        )

    @property
    def compute_dtype(self) -> Any:
        return get_dtype(self.dtype)

    @property
    def out_init_std(self) -> float:
        return self.init_std / math.sqrt(2 * self.num_layers) if self.scale_out_init else self.init_std

    def validate(self) -> None:
        for key in ("vocab_size", "d_model", "num_layers", "mlp_dim"):
            require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        require(len(self.layer_pattern) >= 1, "layer_pattern", "needs at least one mixer name")
        require(len(self.ffn_pattern) >= 1, "ffn_pattern", "needs at least one ffn name")
        for name in self.layer_pattern:
            lookup("mixer", name)
        for name in self.ffn_pattern:
            lookup("ffn", name)
        for section, kinds in (("simplicial", self.layer_pattern), ("moe", self.ffn_pattern), ("ssm", self.layer_pattern)):
            used = any(k == section or k.startswith(section) or (section == "ssm" and k == "mamba2") for k in kinds)
            require(not used or getattr(self, section) is not None, section,
                    f"the layer pattern uses {section!r} layers but model.{section} is not set (the recipe must set it)")
        require(self.dtype in DTYPES, "dtype", f"unknown dtype {self.dtype!r}; choose one of {sorted(DTYPES)}")
        remat_policy(self.remat_policy)
        require(
            not self.scan_layers or self.num_layers % self.period == 0,
            "scan_layers",
            f"num_layers={self.num_layers} must be a multiple of the pattern period {self.period} "
            f"(lcm of layer_pattern and ffn_pattern lengths) to scan; set scan_layers=false or change num_layers",
        )
        require(self.norm_eps > 0, "norm_eps", f"must be > 0, got {self.norm_eps}")
        require(self.init_std > 0, "init_std", f"must be > 0, got {self.init_std}")
        require(self.z_loss_weight >= 0, "z_loss_weight", f"must be >= 0, got {self.z_loss_weight}")

    def build(self):
        from models.lm import LanguageModel

        return LanguageModel(self)


# --- built-in layer kinds -------------------------------------------------------------------------------
def _attention_factory(cfg: DecoderConfig, layer_index: int, name: str) -> nn.Module:
    del layer_index
    return Attention(cfg.attention, cfg.compute_dtype, cfg.init_std, cfg.out_init_std, cfg.norm_eps, name=name)


def _mlp_factory(cfg: DecoderConfig, layer_index: int, name: str) -> nn.Module:
    del layer_index
    return MLP(cfg.mlp_dim, cfg.compute_dtype, cfg.init_std, cfg.out_init_std, name=name)


def _attention_flops(cfg: DecoderConfig, seq_len: int) -> float:
    # q.k and p.v: 2 matmuls x 2 FLOPs x seq_len x H*D_h per token forward, x3 with backward, /2 causal.
    return 12.0 * seq_len * cfg.attention.num_heads * cfg.attention.head_dim / 2


MIXERS["attention"] = _attention_factory
FFNS["mlp"] = _mlp_factory
MIXER_FLOPS["attention"] = _attention_flops


# --- the stack ------------------------------------------------------------------------------------------
class Block(nn.Module):
    """One pre-norm residual layer: x + mixer(norm(x)), then + ffn(norm(x)). [B,S,D] -> [B,S,D]."""

    cfg: DecoderConfig
    layer_index: int

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None, train: bool) -> jax.Array:
        cfg = self.cfg
        mixer_name, ffn_name = cfg.layer_kinds(self.layer_index)
        dtype = cfg.compute_dtype
        h = RMSNorm(cfg.norm_eps, dtype, name="mixer_norm")(x)
        mixer = lookup("mixer", mixer_name)(cfg, self.layer_index, "mixer")
        x = x + mixer(h, positions=positions, segment_ids=segment_ids, train=train).astype(x.dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        h = RMSNorm(cfg.norm_eps, dtype, name="ffn_norm")(x)
        ffn = lookup("ffn", ffn_name)(cfg, self.layer_index, "ffn")
        x = x + ffn(h, train=train).astype(x.dtype)
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))


def _block_class(cfg: DecoderConfig) -> type[nn.Module]:
    policy = remat_policy(cfg.remat_policy)
    if cfg.remat_policy == "none":
        return Block
    # argnums count the module as 0: (x=1, positions=2, segment_ids=3, train=4).
    return nn.remat(Block, policy=policy, prevent_cse=not cfg.scan_layers, static_argnums=(4,))


class _PatternRepeat(nn.Module):
    """One period of the layer pattern; the body of the scanned stack. Returns (x, None) for nn.scan."""

    cfg: DecoderConfig
    train: bool

    @nn.compact
    def __call__(self, x, positions, segment_ids):
        block = _block_class(self.cfg)
        for j in range(self.cfg.period):
            x = block(self.cfg, j, name=f"block_{j}")(x, positions, segment_ids, self.train)
        return x, None


class DecoderStack(nn.Module):
    """The block stack plus the final RMSNorm: embeddings [B,S,D] -> normed hidden states [B,S,D] (dtype).

    Use it directly to feed your own embeddings (e.g. an energy-based transformer).
    Params: unscanned {"layer_<i>": Block, "final_norm"}; scanned {"layers": {"block_<j>": Block with a
    leading "layers" axis}, "final_norm"} (see stack_layer_params / unstack_layer_params).
    """

    cfg: DecoderConfig

    @nn.compact
    def __call__(
        self, x: jax.Array, *, positions: jax.Array, segment_ids: jax.Array | None = None, train: bool = False
    ) -> jax.Array:
        cfg = self.cfg
        x = nn.with_logical_constraint(x.astype(cfg.compute_dtype), ("batch", "length", "embed"))
        if cfg.scan_layers:
            if cfg.num_layers % cfg.period:
                raise ConfigError(
                    f"scan_layers: num_layers={cfg.num_layers} is not a multiple of the pattern period {cfg.period}"
                )
            scanned = nn.scan(
                _PatternRepeat,
                variable_axes={"params": 0, "stats": 0, "intermediates": 0, "carry": 1, "cache": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast),
                length=cfg.num_layers // cfg.period,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, _ = scanned(cfg, train, name="layers")(x, positions, segment_ids)
        else:
            block = _block_class(cfg)
            for i in range(cfg.num_layers):
                x = block(cfg, i, name=f"layer_{i}")(x, positions, segment_ids, train)
        return RMSNorm(cfg.norm_eps, cfg.compute_dtype, name="final_norm")(x)


def default_positions(tokens: jax.Array) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)


class Decoder(nn.Module):
    """Token embedding -> DecoderStack -> output projection (tied to the embedding or a separate matrix).

    __call__(tokens int32 [B,S], *, positions [B,S] (default 0..S-1), segment_ids [B,S] (None: one
    document per row), train, return_hidden) -> float32 logits [B,S,vocab], or the final normed hidden
    states [B,S,D] when return_hidden.
    """

    cfg: DecoderConfig

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        train: bool = False,
        return_hidden: bool = False,
    ) -> jax.Array:
        cfg = self.cfg
        if positions is None:
            positions = default_positions(tokens)
        embed = Embed(cfg.vocab_size, cfg.d_model, cfg.compute_dtype, cfg.init_std, name="embed")
        h = DecoderStack(cfg, name="stack")(embed(tokens), positions=positions, segment_ids=segment_ids, train=train)
        if return_hidden:
            return h
        if cfg.tie_embeddings:
            return embed.attend(h)
        logits = Dense(
            cfg.vocab_size,
            ("embed", "vocab"),
            dtype=cfg.compute_dtype,
            out_dtype=jnp.float32,
            kernel_init=nn.initializers.normal(cfg.init_std),
            name="lm_head",
        )(h)
        return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))


# --- converting between scanned and unscanned layouts ----------------------------------------------------
def _find_stack(tree: dict, marker) -> tuple[list[str], dict]:
    """Path to the first dict (depth-first) for which marker(dict) holds: the DecoderStack's subtree."""
    if marker(tree):
        return [], tree
    for k, v in tree.items():
        if isinstance(v, dict):
            try:
                path, sub = _find_stack(v, marker)
                return [k] + path, sub
            except KeyError:
                pass
    raise KeyError("no DecoderStack layers in this tree")


_UNSCANNED = lambda d: any(k.startswith("layer_") for k in d)
_SCANNED = lambda d: isinstance(d.get("layers"), dict) and any(k.startswith("block_") for k in d["layers"])


def _replace_at(tree: dict, path: list[str], new: dict) -> dict:
    if not path:
        return new
    return {**tree, path[0]: _replace_at(tree[path[0]], path[1:], new)}


def stack_layer_params(tree: dict, cfg: DecoderConfig, axis: int = 0) -> dict:
    """Unscanned collection (unboxed, e.g. params) -> the scanned layout: layer r*period+j -> block_j[r]."""
    try:
        path, stack = _find_stack(tree, _UNSCANNED)
    except KeyError:
        return tree  # e.g. a collection no layer of the stack owns
    n_rep = cfg.num_layers // cfg.period
    blocks = {}
    for j in range(cfg.period):  # a collection (e.g. stats) may exist for some layer kinds only
        names = [f"layer_{r * cfg.period + j}" for r in range(n_rep)]
        if any(n in stack for n in names):
            blocks[f"block_{j}"] = jax.tree.map(lambda *xs: jnp.stack(xs, axis=axis), *[stack[n] for n in names])
    new = {k: v for k, v in stack.items() if not k.startswith("layer_")}
    new["layers"] = blocks
    return _replace_at(tree, path, new)


def unstack_layer_params(tree: dict, cfg: DecoderConfig, axis: int = 0) -> dict:
    """Inverse of stack_layer_params."""
    try:
        path, stack = _find_stack(tree, _SCANNED)
    except KeyError:
        return tree
    n_rep = cfg.num_layers // cfg.period
    new = {k: v for k, v in stack.items() if k != "layers"}
    for j in range(cfg.period):
        if f"block_{j}" not in stack["layers"]:
            continue
        for r in range(n_rep):
            new[f"layer_{r * cfg.period + j}"] = jax.tree.map(
                lambda x: jnp.take(x, r, axis=axis), stack["layers"][f"block_{j}"]
            )
    return _replace_at(tree, path, new)
