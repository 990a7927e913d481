"""Small configs, batches and a test-only mixer that owns stats/carry and sows aux losses and metrics."""
import flax.linen as nn
import jax
import jax.numpy as jnp

from axlearn_like.config import validate_tree
from axlearn_like.params import param_init
from models.attention import AttentionConfig
from models.decoder import DecoderConfig

VOCAB = 37


def small_cfg(**kw) -> DecoderConfig:
    base = dict(
        vocab_size=VOCAB,
        d_model=24,
        num_layers=2,
        mlp_dim=40,
        attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=6),
        dtype="float32",
    )
    base.update(kw)
    cfg = DecoderConfig(**base)
    validate_tree(cfg)
    return cfg


def make_batch(b: int, s: int, seed: int = 0, vocab: int = VOCAB) -> dict:
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return {
        "inputs": jax.random.randint(k1, (b, s), 0, vocab, jnp.int32),
        "targets": jax.random.randint(k2, (b, s), 0, vocab, jnp.int32),
        "loss_mask": (jax.random.uniform(k3, (b, s)) > 0.3).astype(jnp.float32),
        "positions": jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s)),
        "segment_ids": jnp.ones((b, s), jnp.int32),
    }


class DummyMixer(nn.Module):
    """Causal (per-token) mixer y = x * w that counts training calls in 'stats', keeps the last token in
    'carry', sows aux_loss = 0.5 * mean(w) and a metric. Branches on `train` (must be a Python bool)."""

    @nn.compact
    def __call__(self, x, *, positions, segment_ids, train):
        w = self.param("w", param_init(nn.initializers.ones, ("embed",), weight_decay=False), (x.shape[-1],), jnp.float32)
        count = self.variable("stats", "count", lambda: jnp.zeros((), jnp.float32))
        last = self.variable("carry", "last", lambda: jnp.zeros((x.shape[0], x.shape[-1]), jnp.float32))
        if train and not self.is_initializing():
            count.value = count.value + 1.0
        last.value = x[:, -1].astype(jnp.float32)
        self.sow("intermediates", "aux_loss", 0.5 * jnp.mean(w))
        self.sow("intermediates", "metrics", {"mean_abs": jnp.mean(jnp.abs(x)).astype(jnp.float32)})
        return x * w.astype(x.dtype)


def dummy_factory(cfg, layer_index, name):
    return DummyMixer(name=name)
