"""Guards of a training run against bad input and bad numbers.

- `preflight(cfg)`: user errors that would otherwise surface mid-run (a vocabulary smaller than the
  tokenizer's, an evaluation with no eval data, an XLA option XLA does not know), as one ConfigError line
  before the model compiles.
- `all_finite(*trees)`: inside the jitted train step, one fused reduction telling whether every float leaf
  of the updated state is finite, so a step whose update overflows (learning rate 1e39: finite loss and
  gradient, infinite parameters) is treated like a non-finite loss under `trainer.nan_policy`.
- `SkipLedger`: the host-side count of the steps `nan_policy=skip` dropped; past `trainer.max_skipped_steps`
  the run stops, and the end of the run prints which steps were skipped.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from axlearn_like.config import ConfigError


def all_finite(*trees: Any) -> jax.Array:
    """bool[]: True iff every inexact (float) leaf of `trees` is finite (integer leaves always are)."""
    leaves = [x for t in trees for x in jax.tree.leaves(t) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    if not leaves:
        return jnp.asarray(True)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def check_xla_options(options: dict) -> dict | None:
    """-> `options` for jax.jit's compiler_options (None when empty), after compiling a one-op function with
    them, so a misspelt name is one line naming the key here rather than an XLA error after the model traced."""
    if not options:
        return None
    try:
        jax.jit(lambda: jnp.zeros(()), compiler_options=options).lower().compile()
    except Exception as e:  # XLA raises a runtime error per bad name or value: report its first line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"trainer.xla_options: {first} (names as in XLA_FLAGS without the leading --)") from None
    return dict(options)


def preflight(cfg: Any, *, process_index: int = 0, process_count: int = 1) -> None:
    """Checks a run's config against its data before step 1 (see the module doc); raises ConfigError."""
    from axlearn_like.data import DataConfig, make_iterator, make_tokenizer

    check_xla_options(cfg.trainer.xla_options)
    data = cfg.data
    if not isinstance(data, DataConfig):
        return  # a task that brings its own data config validates it itself
    vocab = getattr(cfg.model, "vocab_size", None)
    if isinstance(vocab, int):
        tok = make_tokenizer(data)
        if tok.vocab_size > vocab:
            raise ConfigError(
                f"model.vocab_size: {vocab} is smaller than the vocabulary of data.tokenizer={data.tokenizer!r} "
                f"({tok.vocab_size} ids); set model.vocab_size >= {tok.vocab_size}")
    if cfg.trainer.eval_batches > 0:
        if data.eval_fraction == 0:
            raise ConfigError(f"data.eval_fraction: 0 holds out no eval data but trainer.eval_batches="
                              f"{cfg.trainer.eval_batches}; set data.eval_fraction > 0 or trainer.eval_batches=0")
        # Builds (without reading) the eval split, which raises the pipeline's own one-line errors now.
        make_iterator(data, split="eval", process_index=process_index, process_count=process_count)


class SkipLedger:
    """Steps dropped by nan_policy=skip. `add` keeps the step's device-side `finite` flag without waiting for
    it; `settle` (at log steps and the end) reads the flags, and raises FloatingPointError once more than
    `limit` steps of this run attempt were skipped."""

    def __init__(self, limit: int):
        self.limit = limit
        self.skipped: list[int] = []
        self._pending: list[tuple[int, Any]] = []

    def add(self, step: int, finite: Any) -> None:
        self._pending.append((step, finite))

    def settle(self) -> None:
        pending, self._pending = self._pending, []
        flags = jax.device_get([f for _, f in pending])
        self.skipped += [s for (s, _), ok in zip(pending, flags) if not bool(ok)]
        if len(self.skipped) > self.limit:
            raise FloatingPointError(
                f"nan_policy=skip dropped {len(self.skipped)} non-finite steps ({self._steps()}), more than "
                f"trainer.max_skipped_steps={self.limit}; nothing from those steps was saved; lower "
                f"optimizer.learning_rate, or raise trainer.max_skipped_steps")

    def _steps(self) -> str:
        s = self.skipped
        return ", ".join(map(str, s[:8])) + (f", ... {s[-1]}" if len(s) > 8 else "")

    def summary(self) -> str | None:
        """One line for the end of the run, or None when nothing was skipped."""
        if not self.skipped:
            return None
        return (f"nan_policy=skip: skipped {len(self.skipped)} non-finite step(s) ({self._steps()}); "
                f"their updates were dropped (limit trainer.max_skipped_steps={self.limit})")
