"""Small configs, batches and a test-only mixer kind that owns stats/carry and sows aux losses and metrics."""
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from axlearn_like.config import config_class, validate_tree
from axlearn_like.params import param_init
from models.attention import AttentionConfig
from models.decoder import DecoderConfig
from models.kinds import LayerContext, MixerConfig
from models.layers import MLPConfig

VOCAB = 37


def attention(**kw) -> AttentionConfig:
    return AttentionConfig(**{"num_heads": 4, "num_kv_heads": 2, "head_dim": 6, **kw})


def small_cfg(**kw) -> DecoderConfig:
    base = dict(
        vocab_size=VOCAB,
        d_model=24,
        num_layers=2,
        layer_pattern=(attention(),),
        ffn_pattern=(MLPConfig(mlp_dim=40),),
        dtype="float32",
    )
    base.update(kw)
    cfg = DecoderConfig(**base)
    validate_tree(cfg)
    return cfg


# Inputs and parameters come from NumPy: compiling jax.random's threefry graphs costs ~1 s per call site on
# this 2-core CPU, more than the model itself. One test (test_models_lm.py) checks the real init.


def fake_init(init_fn, seed: int = 0, std: float = 0.2):
    """Variables with exactly the structure and metadata `init_fn()` returns (via eval_shape), filled from
    NumPy: params ~ N(0, std^2) (norm scales ~ 1 + N(0, 0.1^2)), every other collection zeros."""
    shapes = jax.eval_shape(init_fn)
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = jax.tree_util.keystr(path)
        if not name.startswith("['params']"):
            return jnp.zeros(s.shape, s.dtype)
        if "scale" in name:
            return jnp.asarray(1.0 + 0.1 * rng.standard_normal(s.shape), s.dtype)
        return jnp.asarray(std * rng.standard_normal(s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def randn(seed: int, shape, scale: float = 1.0, dtype=jnp.float32):
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32).astype(dtype)


def make_batch(b: int, s: int, seed: int = 0, vocab: int = VOCAB) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "inputs": jnp.asarray(rng.integers(0, vocab, (b, s)), jnp.int32),
        "targets": jnp.asarray(rng.integers(0, vocab, (b, s)), jnp.int32),
        "loss_mask": jnp.asarray(rng.uniform(size=(b, s)) > 0.3, jnp.float32),
        "positions": jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s)),
        "segment_ids": jnp.ones((b, s), jnp.int32),
    }


class DummyMixer(nn.Module):
    """Causal (per-token) mixer y = x * w that counts training calls in 'stats', keeps the last token in
    'carry', sows aux_loss = 0.5 * mean(w) and a metric. Branches on `train` (must be a Python bool)."""

    @nn.compact
    def __call__(self, x, *, positions, segment_ids, train):
        w = self.param("w", param_init(nn.initializers.ones, ("embed",), weight_decay=False), (x.shape[-1],),
                       jnp.float32)
        count = self.variable("stats", "count", lambda: jnp.zeros((), jnp.float32))
        last = self.variable("carry", "last", lambda: jnp.zeros((x.shape[0], x.shape[-1]), jnp.float32))
        if train and not self.is_initializing():
            count.value = count.value + 1.0
        last.value = x[:, -1].astype(jnp.float32)
        self.sow("intermediates", "aux_loss", 0.5 * jnp.mean(w))
        self.sow("intermediates", "metrics", {"mean_abs": jnp.mean(jnp.abs(x)).astype(jnp.float32)})
        return x * w.astype(x.dtype)


@config_class
class DummyMixerConfig(MixerConfig):
    """The test-only "test_dummy" mixer kind (DummyMixer)."""

    kind: ClassVar[str] = "test_dummy"
    logical_axes: ClassVar[tuple[str, ...]] = ("embed",)

    def build(self, ctx: LayerContext, name: str) -> nn.Module:
        return DummyMixer(name=name)

    def extra_flops(self, d_model: int, seq_len: int) -> float:
        return 0.0
