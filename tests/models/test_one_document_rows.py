"""Rows of one document (DataConfig.multi_document_rows False) reach the model without segment_ids:
(a) the loss and its gradient equal those with segment_ids for attention, simplicial and Mamba-2 stacks;
(b) the traced train and eval steps of an unpacked config build no [B, 1, S, S] segment mask, a packed one does."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from axlearn_like.data import DataConfig
from models.simplicial import SimplicialConfig
from models.ssm import Mamba2Config
from tests.models.model_helpers import VOCAB, attention, fake_init, small_cfg

B, S = 4, 16
LENGTHS = (16, 11, 4, 1)  # real tokens per row: a full row, padded rows, a one-token row

STACKS = {
    "attention": lambda: small_cfg(),
    "simplicial": lambda: small_cfg(layer_pattern=(
        attention(), SimplicialConfig(num_heads=4, num_kv_heads=2, head_dim=6, w1=5, w2=3))),
    "mamba2": lambda: small_cfg(layer_pattern=(
        Mamba2Config(d_state=8, head_dim=8, expand=2, ngroups=2, chunk_size=8),)),
}


def _rows(segment_ids: np.ndarray, seed: int = 0) -> dict:
    """A batch whose real tokens are where segment_ids > 0 (padding: token 0, no loss); positions restart per
    document as the pipeline's."""
    rng = np.random.default_rng(seed)
    real = segment_ids > 0
    starts = np.concatenate([np.ones((B, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    idx = np.arange(S)[None].repeat(B, 0)
    pos = idx - np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
    tok = lambda: np.where(real, rng.integers(1, VOCAB, (B, S)), 0)
    return {"inputs": jnp.asarray(tok(), jnp.int32), "targets": jnp.asarray(tok(), jnp.int32),
            "loss_mask": jnp.asarray(real, jnp.float32), "positions": jnp.asarray(np.where(real, pos, 0), jnp.int32),
            "segment_ids": jnp.asarray(segment_ids, jnp.int32)}


def _loss_and_grad(task, params, batch):
    fn = lambda p: task.loss({"params": p, "stats": {}, "carry": {}}, batch, jax.random.key(0), train=True)[0]
    return jax.jit(jax.value_and_grad(fn))(params)


@pytest.mark.parametrize("stack", list(STACKS))
def test_unpacked_loss_and_grad_equal_with_and_without_segment_ids(stack):
    task = STACKS[stack]().build()
    data = DataConfig(packing=False, seq_len=S, global_batch_size=B)
    keys = set(task.batch_spec(data))
    assert "segment_ids" not in keys
    one_doc = _rows((np.arange(S)[None] < np.asarray(LENGTHS)[:, None]).astype(np.int32))
    params = nn.unbox(fake_init(lambda: task.init(jax.random.key(0), one_doc), seed=1, std=0.3))["params"]
    loss_seg, grad_seg = _loss_and_grad(task, params, one_doc)
    loss, grad = _loss_and_grad(task, params, {k: v for k, v in one_doc.items() if k in keys})
    np.testing.assert_allclose(float(loss), float(loss_seg), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7),
                 grad, grad_seg)
    # Not vacuous: in a packed row (two documents) the segment ids change the loss.
    packed = _rows(np.where(np.arange(S)[None] < 7, 1, 2).repeat(B, 0).astype(np.int32))
    loss_seg, _ = _loss_and_grad(task, params, packed)
    loss, _ = _loss_and_grad(task, params, {k: v for k, v in packed.items() if k != "segment_ids"})
    assert abs(float(loss) - float(loss_seg)) > 1e-4


def _segment_masks(jaxpr, b: int, s: int) -> list:
    """Every `eq` of integers in the jaxpr (sub-jaxprs included) with a [b, ..., s, s] result: the query-key
    segment mask. (The causal mask is a `ge` of iotas without the batch axis; softmax's gradient compares
    float logits.)"""
    found = []
    for eqn in jaxpr.eqns:
        shape = tuple(eqn.outvars[0].aval.shape) if eqn.outvars else ()
        if (eqn.primitive.name == "eq" and jnp.issubdtype(eqn.invars[0].aval.dtype, jnp.integer)
                and len(shape) >= 3 and shape[0] == b and shape[-2:] == (s, s)):
            found.append(shape)
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    found += _segment_masks(sub.jaxpr, b, s)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    found += _segment_masks(sub, b, s)
    return found


@pytest.mark.parametrize("packing", [False, True])
def test_train_and_eval_steps_pass_no_segment_mask_for_unpacked_data(packing):
    from axlearn_like import sharding as sharding_lib, trainer
    from axlearn_like.evaluation import global_batch
    from axlearn_like.train_step import make_eval_step
    from tests.core.helpers import tiny_config

    cfg = tiny_config([f"data.packing={str(packing).lower()}", "model.layer_pattern.*.implementation=xla"])
    g, s = cfg.data.global_batch_size, cfg.data.seq_len
    mesh = sharding_lib.make_mesh(cfg.mesh)
    setup = trainer.build_state_setup(cfg, mesh=mesh)
    assert ("segment_ids" in setup.batch_spec) is packing
    with jax.set_mesh(mesh), nn.logical_axis_rules(setup.rules):
        step, batch_sh = trainer.make_train_step(setup, cfg)
        # the pipeline's batch goes in with exactly the spec's keys (global_batch drops the rest)
        local = next(cfg.data.make_iterator(split="train"))
        assert "segment_ids" in local and set(global_batch(local, batch_sh)) == set(setup.batch_spec)
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in setup.batch_spec.items()}
        train = _segment_masks(jax.make_jaxpr(step)(setup.abstract_state, batch).jaxpr, g, s)
        ev = _segment_masks(jax.make_jaxpr(make_eval_step(setup, batch_sh))(setup.abstract_state, batch).jaxpr, g, s)
    if packing:
        assert len(train) == len(ev) == cfg.model.num_layers  # one mask per attention layer
    else:
        assert not train and not ev
