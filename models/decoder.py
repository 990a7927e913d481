"""The decoder-only stack that mixes layer kinds by a cyclic pattern, and its config.

Layer i is a pre-norm residual block (GPT-2/LLaMA style):
    x <- x + mixer_i(RMSNorm(x));   x <- x + ffn_i(RMSNorm(x))
with mixer_i = layer_pattern[i % len(layer_pattern)] and ffn_i = ffn_pattern[i % len(ffn_pattern)], config
instances of the layer kinds of models/kinds.py that build their own layers (an FFN kind that builds None,
e.g. NoFFNConfig, leaves the block as its mixer half: no ffn_norm, no FFN). Adding a kind is one new module;
see docs/architecture.md. Layers may own 'stats'/'carry' variables and sow into 'intermediates'
(axlearn_like/state.py).

Scanned stacks (scan_layers=True) run nn.scan over num_layers / period repeats of one pattern period
(period = lcm of the two pattern lengths). Every 'params'/'stats'/'intermediates' leaf then has a leading
"layers" axis; 'carry' leaves are stacked on axis 1 so the global batch stays their leading axis. A kind
built under scan sees the layer index of the first repeat (i.e. the index within the period).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from axlearn_like.config import ConfigError, config_class, require
from axlearn_like.sharding import DEFAULT_RULES
from axlearn_like.task import SampleConfig
from models.attention import AttentionConfig
from models.kinds import FFNConfig, LayerContext, MixerConfig
from models.layers import DTYPES, Dense, Embed, MLPConfig, RMSNorm, get_dtype


def _remat_policies() -> dict[str, Any]:
    cp = jax.checkpoint_policies
    names = ("qkv_proj", "attn_context", "attn_out", "mlp_gate", "mlp_up", "mlp_hidden", "ssm_in_proj")
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


# The DecoderConfig fields that held the kinds' settings before layer kinds were typed configs.
_LEGACY_SECTIONS = ("attention", "mlp_dim", "simplicial", "moe", "ssm")


@config_class
class DecoderConfig:
    """Decoder-only LM. `build()` returns the Task (models.lm.LanguageModel) the trainer runs.

    layer_pattern / ffn_pattern: mixer and FFN kind configs (models/kinds.py), repeated cyclically.
    init_std: std of every input-side matrix and the embeddings; output projections (attention out, MLP
    down) use init_std / sqrt(2 * num_layers) when scale_out_init (GPT-2). z_loss_weight: weight of
    mean(logsumexp(logits)^2) added to the training loss (PaLM). loss_chunk: 0, or compute the loss's logits
    (and cross-entropy, z-loss, accuracy) `loss_chunk` positions at a time under rematerialization, so the
    float32 [B, S, vocab] logits and their gradient never exist at once (models.lm.LanguageModel.loss; the
    head's matmul runs once more in the backward). sample: the text sample printed after training
    (models.lm.NextTokenTask.final_hook).
    """

    vocab_size: int = 256
    d_model: int = 256
    num_layers: int = 4
    layer_pattern: tuple[MixerConfig, ...] = dataclasses.field(default_factory=lambda: (AttentionConfig(),))
    ffn_pattern: tuple[FFNConfig, ...] = dataclasses.field(default_factory=lambda: (MLPConfig(),))
    tie_embeddings: bool = False
    scan_layers: bool = False
    remat_policy: str = "none"
    dtype: str = "bfloat16"
    norm_eps: float = 1e-6
    init_std: float = 0.02
    scale_out_init: bool = True
    z_loss_weight: float = 0.0
    loss_chunk: int = 0
    sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)

    # Kind names of the string patterns saved before layer kinds were typed configs -> (config class, the old
    # section holding its fields); migrate_dict rewrites such saved configs on load. Subclasses extend it.
    _LEGACY_KINDS: ClassVar[dict[str, tuple[str, str]]] = {
        "attention": ("models.attention:AttentionConfig", "attention"),
        "simplicial": ("models.simplicial:SimplicialConfig", "simplicial"),
        "mamba2": ("models.ssm:Mamba2Config", "ssm"),
        "mlp": ("models.layers:MLPConfig", "mlp_dim"),
        "moe": ("models.moe:MoEConfig", "moe"),
    }

    @property
    def period(self) -> int:
        return math.lcm(len(self.layer_pattern), len(self.ffn_pattern))

    def layer_kinds(self, layer_index: int) -> tuple[MixerConfig, FFNConfig]:
        """(mixer config, ffn config) of layer `layer_index`."""
        return (
            self.layer_pattern[layer_index % len(self.layer_pattern)],
            self.ffn_pattern[layer_index % len(self.ffn_pattern)],
        )

    def layer_context(self, layer_index: int) -> LayerContext:
        return LayerContext(
            d_model=self.d_model, dtype=self.compute_dtype, init_std=self.init_std, out_init_std=self.out_init_std,
            norm_eps=self.norm_eps, layer_index=layer_index, num_layers=self.num_layers,
        )

    @property
    def recurrent(self) -> bool:
        """True when every mixer carries its context in a fixed-size state (the stack decodes recurrently)."""
        return all(m.recurrent for m in self.layer_pattern)

    @property
    def compute_dtype(self) -> Any:
        return get_dtype(self.dtype)

    @property
    def out_init_std(self) -> float:
        return self.init_std / math.sqrt(2 * self.num_layers) if self.scale_out_init else self.init_std

    def validate(self) -> None:
        for key in ("vocab_size", "d_model", "num_layers"):
            require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        require(self.dtype in DTYPES, "dtype", f"unknown dtype {self.dtype!r}; choose one of {sorted(DTYPES)}")
        known_axes = {k for k, _ in DEFAULT_RULES}
        entries = [*self.layer_pattern, *self.ffn_pattern]
        require(len({id(e) for e in entries}) == len(entries), "layer_pattern",
                "a layer-kind config object appears twice in the patterns; give each entry its own copy "
                "(dataclasses.replace(entry)), so an override of one entry does not change the others")
        for key, pattern, base in (("layer_pattern", self.layer_pattern, MixerConfig),
                                   ("ffn_pattern", self.ffn_pattern, FFNConfig)):
            require(len(pattern) >= 1, key, f"needs at least one {base.__name__}")
            for i, entry in enumerate(pattern):
                require(isinstance(entry, base), f"{key}.{i}",
                        f"expected a {base.__name__} (a layer kind, models/kinds.py), got {entry!r}")
                unknown = sorted(set(entry.logical_axes) - known_axes)
                require(not unknown, f"{key}.{i}", f"kind {entry.kind!r} uses logical axes {unknown} that "
                        f"axlearn_like.sharding.DEFAULT_RULES does not map; add rules for them")
                try:
                    entry.validate_in(self.layer_context(i))
                except ConfigError as e:
                    raise ConfigError(f"{key}.{i}.{e}") from None
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
        require(self.loss_chunk >= 0, "loss_chunk", f"must be 0 (off) or a number of positions, got {self.loss_chunk}")

    @classmethod
    def migrate_dict(cls, d: dict) -> dict:
        """A saved config dict with string patterns and the old per-kind sections -> the typed-pattern form."""
        if not any(k in d for k in _LEGACY_SECTIONS) and not any(
            isinstance(e, str) for key in ("layer_pattern", "ffn_pattern") for e in d.get(key, ())
        ):
            return d
        sections = {k: d.pop(k) for k in _LEGACY_SECTIONS if k in d}
        defaults = cls()
        for key in ("layer_pattern", "ffn_pattern"):
            names = d.get(key, [type(e).kind for e in getattr(defaults, key)])
            d[key] = [cls._legacy_entry(name, sections, key) for name in names]
        return d

    @classmethod
    def _legacy_entry(cls, name: Any, sections: dict, key: str) -> Any:
        if not isinstance(name, str):
            return name
        if name not in cls._LEGACY_KINDS:
            raise ConfigError(f"saved config: {key} names an unknown layer kind {name!r} (written by another version?)")
        type_name, section = cls._LEGACY_KINDS[name]
        if section == "mlp_dim":
            fields = {"mlp_dim": sections.get("mlp_dim", 1024)}
        else:
            saved = sections.get(section)
            if saved is None and section != "attention":
                raise ConfigError(f"saved config: {key} uses {name!r} layers but its {section!r} section is missing")
            fields = {k: v for k, v in (saved or {}).items() if k != "_type"}
        return {"_type": type_name, **fields}

    def build(self):
        from models.lm import LanguageModel

        return LanguageModel(self)


# --- the stack ------------------------------------------------------------------------------------------
class Block(nn.Module):
    """One pre-norm residual layer: x + mixer(norm(x)), then + ffn(norm(x)). [B,S,D] -> [B,S,D]."""

    cfg: DecoderConfig
    layer_index: int

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None, train: bool) -> jax.Array:
        cfg = self.cfg
        mixer_cfg, ffn_cfg = cfg.layer_kinds(self.layer_index)
        ctx = cfg.layer_context(self.layer_index)
        mixer = mixer_cfg.build(ctx, "mixer")
        if mixer is not None:
            h = RMSNorm(cfg.norm_eps, ctx.dtype, name="mixer_norm")(x)
            x = x + mixer(h, positions=positions, segment_ids=segment_ids, train=train).astype(x.dtype)
            x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        ffn = ffn_cfg.build(ctx, "ffn")
        if ffn is not None:
            h = RMSNorm(cfg.norm_eps, ctx.dtype, name="ffn_norm")(x)
            x = x + ffn(h, train=train).astype(x.dtype)
            x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return x


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
            x = block(self.cfg, j, name=block_name(j))(x, positions, segment_ids, self.train)
        return x, None


class DecoderStack(nn.Module):
    """The block stack plus the final RMSNorm: embeddings [B,S,D] -> normed hidden states [B,S,D] (dtype).

    Use it directly to feed your own embeddings (e.g. an energy-based transformer).
    Params: unscanned {layer_name(i): Block, "final_norm"}; scanned {"layers": {block_name(j): Block with a
    leading "layers" axis}, "final_norm"} (see stack_layer_params / unstack_layer_params, which find this
    subtree in a model's variables by that layout).
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
                x = block(cfg, i, name=layer_name(i))(x, positions, segment_ids, train)
        return RMSNorm(cfg.norm_eps, cfg.compute_dtype, name="final_norm")(x)


def default_positions(tokens: jax.Array) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)


class Decoder(nn.Module):
    """Token embedding -> DecoderStack -> output projection (tied to the embedding or a separate matrix).

    __call__(tokens int32 [B,S], *, positions [B,S] (default 0..S-1), segment_ids [B,S] (None: one
    document per row), train, return_hidden) -> float32 logits [B,S,vocab], or the final normed hidden
    states [B,S,D] when return_hidden. `logits(h)`: the output projection alone, hidden [..., D] -> float32
    logits [..., vocab] (`apply(..., method=Decoder.logits)`; the chunked loss calls it per chunk).
    """

    cfg: DecoderConfig

    def setup(self):
        cfg = self.cfg
        self.embed = Embed(cfg.vocab_size, cfg.d_model, cfg.compute_dtype, cfg.init_std)
        self.stack = DecoderStack(cfg)
        if not cfg.tie_embeddings:
            self.lm_head = Dense(cfg.vocab_size, ("embed", "vocab"), dtype=cfg.compute_dtype, out_dtype=jnp.float32,
                                 kernel_init=nn.initializers.normal(cfg.init_std))

    def __call__(
        self,
        tokens: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        train: bool = False,
        return_hidden: bool = False,
    ) -> jax.Array:
        if positions is None:
            positions = default_positions(tokens)
        h = self.stack(self.embed(tokens), positions=positions, segment_ids=segment_ids, train=train)
        if return_hidden:
            return h
        return nn.with_logical_constraint(self.logits(h), ("batch", "length", "vocab"))

    def logits(self, h: jax.Array) -> jax.Array:
        return self.embed.attend(h) if self.cfg.tie_embeddings else self.lm_head(h)


# --- converting between scanned and unscanned layouts ----------------------------------------------------
def layer_name(i: int) -> str:
    """Name of layer i's Block in an unscanned DecoderStack."""
    return f"layer_{i}"


def block_name(j: int) -> str:
    """Name of pattern-period position j's Block inside a scanned DecoderStack's "layers"."""
    return f"block_{j}"


def _is_stack(d: dict, cfg: DecoderConfig, scanned: bool) -> bool:
    """Whether d has the layout of this cfg's DecoderStack (or a collection's part of it; a collection such
    as 'stats' may hold only some layers): its children are exactly the stack's own, nothing else."""
    if scanned:
        inner = d.get("layers")
        blocks = {block_name(j) for j in range(cfg.period)}
        return isinstance(inner, dict) and bool(inner) and set(inner) <= blocks and set(d) <= {"layers", "final_norm"}
    children = set(d) - {"final_norm"}
    return bool(children) and children <= {layer_name(i) for i in range(cfg.num_layers)}


def _find_stack(tree: dict, cfg: DecoderConfig, scanned: bool) -> tuple[list[str], dict]:
    """(path, subtree) of the first dict (depth-first) laid out as this cfg's DecoderStack."""
    if _is_stack(tree, cfg, scanned):
        return [], tree
    for k, v in tree.items():
        if isinstance(v, dict):
            try:
                path, sub = _find_stack(v, cfg, scanned)
                return [k] + path, sub
            except KeyError:
                pass
    raise KeyError("no DecoderStack layers in this tree")


def _replace_at(tree: dict, path: list[str], new: dict) -> dict:
    if not path:
        return new
    return {**tree, path[0]: _replace_at(tree[path[0]], path[1:], new)}


def stack_layer_params(tree: dict, cfg: DecoderConfig, axis: int = 0) -> dict:
    """Unscanned collection (unboxed, e.g. params) -> the scanned layout: layer r*period+j -> block_j[r]."""
    try:
        path, stack = _find_stack(tree, cfg, scanned=False)
    except KeyError:
        return tree  # e.g. a collection no layer of the stack owns
    n_rep = cfg.num_layers // cfg.period
    blocks = {}
    for j in range(cfg.period):  # a collection (e.g. stats) may exist for some layer kinds only
        names = [layer_name(r * cfg.period + j) for r in range(n_rep)]
        if any(n in stack for n in names):
            blocks[block_name(j)] = jax.tree.map(lambda *xs: jnp.stack(xs, axis=axis), *[stack[n] for n in names])
    new = {k: v for k, v in stack.items() if k == "final_norm"}
    new["layers"] = blocks
    return _replace_at(tree, path, new)


def unstack_layer_params(tree: dict, cfg: DecoderConfig, axis: int = 0) -> dict:
    """Inverse of stack_layer_params."""
    try:
        path, stack = _find_stack(tree, cfg, scanned=True)
    except KeyError:
        return tree
    n_rep = cfg.num_layers // cfg.period
    new = {k: v for k, v in stack.items() if k != "layers"}
    for j in range(cfg.period):
        if block_name(j) not in stack["layers"]:
            continue
        for r in range(n_rep):
            new[layer_name(r * cfg.period + j)] = jax.tree.map(
                lambda x, r=r: jnp.take(x, r, axis=axis), stack["layers"][block_name(j)]
            )
    return _replace_at(tree, path, new)
