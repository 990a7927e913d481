"""Layer kinds: typed configs that build the decoder's mixers and FFNs (docs/architecture.md, "Layer kinds").

A decoder layer is the pre-norm residual block
    x <- x + mixer(RMSNorm(x));   x <- x + ffn(RMSNorm(x))
and `DecoderConfig.layer_pattern` / `ffn_pattern` hold config *instances* of the kinds below, repeated
cyclically over the layers. Each kind's config lives in the module of the layer it builds and subclasses
`MixerConfig` or `FFNConfig`; it carries everything the decoder needs to know about that kind:

  kind          ClassVar[str]: a short name for display and command-line selection
                (`--set model.layer_pattern.<kind>.<field>=...`), never used for dispatch.
  build         (ctx: LayerContext, name) -> an unbound linen Module named `name` (None: no layer, e.g. the
                "none" FFN). Mixers are called `m(x, *, positions, segment_ids, train)`, FFNs `f(x, *, train)`,
                both [B, S, D] -> [B, S, D].
  extra_flops   (d_model, seq_len) -> training FLOPs per token of ONE such layer beyond 6 x its parameter
                count (attention scores, SSD chunk work; negative for MoE experts a token skips).
  logical_axes  ClassVar: every logical axis name its parameters may use (checked against the sharding rules).
  recurrent     ClassVar[bool] (mixers): True only when the mixer's context is a fixed-size state (Mamba-2),
                so a stack of such mixers decodes recurrently.
  decode_cache  ClassVar[bool] (mixers): True when the layer implements cached decoding (below). Never
                inherited: a subclass kind (which usually changes the math) declares it itself.
  validate_in   (ctx) -> None: checks that need the model around the layer (e.g. d_model divisibility).

Cached decoding (`LanguageModel.prefill` / `decode_step`): the decoder applies the stack with the `cache`
collection mutable and calls each mixer with `positions` int [B, S], the per-row position of every new token
(each row continues its own context: row b's tokens sit at slots positions[b]), and `segment_ids` int [B, S],
0 on right padding after a row's last real token (ragged prompts), 1 elsewhere. A mixer keeps whatever it
needs for later tokens in `cache` variables, created on the first such call with the shapes of a context of
that call's length (`LanguageModel.init_cache` traces one call of the maximum length and zero-fills: all-zero
cache variables must mean "empty context"). Padding tokens must not change what later tokens see.

The JSON form of a config tags every entry with its class (`_type`), so saved patterns rebuild without a
registry. A concrete kind that forgets `kind`, `build` or `extra_flops` fails at class creation.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, ClassVar

import flax.linen as nn

from axlearn_like.config import config_class, require


@dataclasses.dataclass(frozen=True)
class LayerContext:
    """What a layer kind may read from the decoder around it. dtype: the jnp compute dtype; init_std: std of
    input-side matrices; out_init_std: std of output projections (GPT-2 scaled); layer_index: the layer's
    index (under scan_layers: its index within one pattern period)."""

    d_model: int
    dtype: Any
    init_std: float
    out_init_std: float
    norm_eps: float
    layer_index: int
    num_layers: int


class _LayerKind:
    kind: ClassVar[str]
    logical_axes: ClassVar[tuple[str, ...]]

    def __init_subclass__(cls, abstract: bool = False, **kw):
        super().__init_subclass__(**kw)
        if abstract:
            return
        missing = [] if "kind" in cls.__dict__ else ["kind (its own ClassVar name)"]
        missing += [m for m in ("build", "extra_flops") if getattr(cls, m) is getattr(_LayerKind, m)]
        if not hasattr(cls, "logical_axes"):
            missing.append("logical_axes")
        if missing:
            raise TypeError(f"layer kind {cls.__qualname__} must define {', '.join(missing)} (see models/kinds.py)")

    def build(self, ctx: LayerContext, name: str) -> nn.Module | None:
        raise NotImplementedError

    def extra_flops(self, d_model: int, seq_len: int) -> float:
        raise NotImplementedError

    def validate_in(self, ctx: LayerContext) -> None:
        """Checks that need the surrounding model; raise ConfigError('<field>: ...') (the decoder adds the path)."""
        del ctx


@config_class
class MixerConfig(_LayerKind, abstract=True):
    """Base of the sequence-mixer kinds (attention-like and recurrent layers); see the module doc."""

    recurrent: ClassVar[bool] = False
    decode_cache: ClassVar[bool] = False

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if "decode_cache" not in cls.__dict__:
            cls.decode_cache = False  # cached decoding is declared by each kind, never inherited


@config_class
class FFNConfig(_LayerKind, abstract=True):
    """Base of the per-token feed-forward kinds; see the module doc."""


@config_class
class NoFFNConfig(FFNConfig):
    """The "none" FFN: the block is x + mixer(RMSNorm(x)) only, with no ffn_norm and no FFN parameters
    (pure Mamba-2 stacks as in mamba_ssm / Hugging Face Mamba2)."""

    kind: ClassVar[str] = "none"
    logical_axes: ClassVar[tuple[str, ...]] = ()

    def build(self, ctx: LayerContext, name: str) -> None:
        del ctx, name
        return None

    def extra_flops(self, d_model: int, seq_len: int) -> float:
        del d_model, seq_len
        return 0.0


def check_implementation(value: str | None, table: Iterable[str], op: str) -> None:
    """validate() helper: `implementation` must be None or a name of kernels.<op>.IMPLEMENTATIONS."""
    names = list(table)
    require(value is None or value in names, "implementation",
            f"{value!r} is not one of None, {', '.join(map(repr, names))} (kernels.{op}.IMPLEMENTATIONS)")
