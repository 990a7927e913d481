"""The protocol between the generic trainer and a model: the trainer knows no model math.

A Task is built from the model config (`cfg.model.build()`), so checkpoints can rebuild it from the
saved config alone (`axlearn_like.checkpoint.load`).
"""
from __future__ import annotations

from typing import Any, Protocol

import jax

Batch = dict[str, jax.Array]
Variables = dict[str, Any]


class Task(Protocol):
    def init(self, rng: jax.Array, batch: Batch) -> Variables:
        """Returns boxed variables {'params', and optionally 'stats', 'carry'} (see axlearn_like.state).

        `batch` has the *global* batch shape (carry leaves must lead with the global batch axis).
        """

    def loss(
        self, variables: Variables, batch: Batch, rng: jax.Array, *, train: bool
    ) -> tuple[jax.Array, dict[str, Any], Variables]:
        """Returns (scalar loss to minimize, metrics, mutated collections {'stats', 'carry'}).

        `variables` holds unboxed 'params', 'stats', 'carry'. Metrics: scalars (or small arrays) averaged over
        micro-batches; must include 'loss' (the main objective, without aux losses) and 'tokens' (count
        of target tokens). Eval (train=False) must not change 'stats'.
        """

    def flops_per_token(self, seq_len: int) -> float:
        """Training (forward + backward) FLOPs per token, for the MFU estimate."""
