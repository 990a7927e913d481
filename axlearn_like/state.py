"""The train state and the protocol for non-gradient state that layers own.

Model variables are split by collection, each with one meaning (docs/architecture.md, "State collections"):
  params         trained by the optimizer (f32 master copy).
  stats          non-gradient state a layer updates itself during the training apply (MoE routing
                 bias, fitted-noise statistics, the EBT replay buffer). Within one step the micro-batches
                 run in sequence and each sees the `stats` the previous one wrote.
  carry          recurrent state handed from one step to the next (SSM state passing / TBTT). Every carry
                 leaf has the *global batch* as its leading axis: the trainer splits and re-joins it with
                 the batch for gradient accumulation and shards it like the batch.
  intermediates  aux losses and metrics a layer sows; never stored.

Statistics that must see the whole global batch before they take effect (e.g. the aux-loss-free bias
update uses the load counted over all micro-batches) are `StepStatistic` nodes inside `stats`: the layer
accumulates into them during the training apply, and the trainer calls `finalize(step)` on every such
node once per optimizer step. The trainer finds them by type, never by parameter path.

A Task may declare `stats` subtrees that are training-time caches, not model state (`Task.resettable_stats`,
e.g. the EBT replay buffer): a checkpoint whose arrays differ from the state this code builds only inside such
subtrees (written before the cache's layout changed) restores with them at their initial values and one
printed note (`ResettableState`, `axlearn_like.checkpoint.Checkpointer.restore`); any other difference still
fails the restore.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.struct
import jax


class StepStatistic(flax.struct.PyTreeNode):
    """Base for `stats` nodes that are finalized once per optimizer step (see module doc).

    Subclasses are flax.struct dataclasses: array fields are state (checkpointed); static fields
    (`flax.struct.field(pytree_node=False)`) are configuration. `finalize` must be a pure jnp function, and
    must treat extra leading axes as independent copies: under `scan_layers` the node of every layer is
    stacked into one node with a leading [layers] axis.
    """

    def finalize(self, step: jax.Array) -> "StepStatistic":
        raise NotImplementedError


def finalize_step_statistics(stats: Any, step: jax.Array) -> Any:
    """Calls `finalize(step)` on every StepStatistic node of a `stats` tree."""
    is_stat = lambda x: isinstance(x, StepStatistic)
    return jax.tree.map(lambda x: x.finalize(step) if is_stat(x) else x, stats, is_leaf=is_stat)


class TrainState(flax.struct.PyTreeNode):
    """Everything that is checkpointed, so that a resume is exact.

    step: int32 scalar, optimizer steps taken. rng: PRNG key (raw uint32[2]) for dropout/noise; the key of
    step t is fold_in(rng, t), so it never needs updating. params/opt_state: f32. stats/carry: see above.
    """

    step: jax.Array
    rng: jax.Array
    params: Any
    opt_state: Any
    stats: Any
    carry: Any


@dataclasses.dataclass(frozen=True)
class ResettableState:
    """The parts of a train state that a restore may start from their initial values when the checkpoint's
    differ (see module doc); built by `axlearn_like.state_setup.resettable_state` from the Task's declaration.

    subtrees: leaf-name prefix in the state (`stats.replay`, as `checkpoint.leaf_name` writes paths) -> what it
    is, ending the note the restore prints (e.g. "a training-time cache, not model state: starting it empty").
    init: {leaf name: abstract array (shape, dtype, sharding)} -> {leaf name: its initial value, so placed}.
    """

    subtrees: Mapping[str, str]
    init: Callable[[dict[str, Any]], dict[str, Any]]

    def owner(self, name: str) -> str | None:
        """The declared subtree that holds leaf `name`, or None."""
        return next((p for p in self.subtrees if name == p or name.startswith(p + ".")), None)
