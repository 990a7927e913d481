"""Decoder language model as an axlearn_like.task.Task: init, loss with layer aux losses, FLOPs, sampling.

Loss (training objective, per micro-batch):
    L = CE + z_loss_weight * mean(logsumexp(logits)^2) + sum of every 'aux_loss' leaf sown into 'intermediates'
where CE = sum(loss_mask * -log softmax(logits)[target]) / max(sum(loss_mask), 1), softmax in float32.

Layer conventions read here (generic, never by parameter path):
  * `self.sow("intermediates", "aux_loss", scalar)`: added to L (under scan: summed over the layers axis);
    also reported as metric "<module path>/aux_loss".
  * `self.sow("intermediates", "metrics", {name: scalar or small array})`: reported as
    "<module path>/<name>" (e.g. "stack/layer_3/ffn/expert_load"); not part of the loss.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.traverse_util
import jax
import jax.numpy as jnp

from axlearn_like.params import unbox_values
from models.decoder import FFN_FLOPS, MIXER_FLOPS, Decoder, DecoderConfig

Batch = dict[str, jax.Array]
_MUTABLE = ["intermediates", "stats", "carry"]


def cross_entropy(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """logits [..., V] (cast to float32), int targets [...] -> (per-token CE [...], logsumexp [...])."""
    logits = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return logz - target_logit, logz


def collect_intermediates(intermediates: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
    """'intermediates' tree -> (sum of all 'aux_loss' leaves, {"<path>/<name>": value} metrics)."""
    aux = jnp.zeros((), jnp.float32)
    metrics: dict[str, jax.Array] = {}
    flat = flax.traverse_util.flatten_dict(dict(intermediates or {}))
    for keys, value in flat.items():
        *path, kind = keys
        prefix = "/".join(str(k) for k in path)
        sown = value if isinstance(value, tuple) else (value,)
        if kind == "aux_loss":
            total = sum(jnp.sum(jnp.asarray(v, jnp.float32)) for v in sown)
            aux = aux + total
            metrics[f"{prefix}/aux_loss"] = total
        elif kind == "metrics":
            for i, entry in enumerate(sown):
                suffix = "" if len(sown) == 1 else f"/{i}"
                entries = flax.traverse_util.flatten_dict(entry, sep="/") if isinstance(entry, dict) else {"value": entry}
                for name, v in entries.items():
                    metrics[f"{prefix}/{name}{suffix}"] = v
    return aux, metrics


def _inputs(batch: Batch) -> tuple[jax.Array, dict[str, Any]]:
    return batch["inputs"], {"positions": batch.get("positions"), "segment_ids": batch.get("segment_ids")}


class LanguageModel:
    """Task for a next-token decoder LM (see module doc). Batch keys: "inputs", "targets" int32 [B,S],
    "loss_mask" float32 [B,S], optional "positions" and "segment_ids" int32 [B,S]."""

    def __init__(self, cfg: DecoderConfig):
        self.cfg = cfg
        self.module = Decoder(cfg)

    def init(self, rng: jax.Array, batch: Batch) -> dict[str, Any]:
        """-> boxed {'params', 'stats', 'carry'} ('stats'/'carry' are {} when no layer owns any)."""
        params_rng, dropout_rng = jax.random.split(rng)
        tokens, kw = _inputs(batch)
        variables = dict(self.module.init({"params": params_rng, "dropout": dropout_rng}, tokens, train=False, **kw))
        variables.pop("intermediates", None)
        variables.setdefault("stats", {})
        variables.setdefault("carry", {})
        return variables

    def apply(self, variables: dict[str, Any], batch: Batch, rng: jax.Array | None = None, *, train: bool = False, **kw):
        """-> (logits float32 [B,S,V] (or hidden with return_hidden=True), mutated collections dict)."""
        rng = jax.random.key(0) if rng is None else rng
        params_rng, dropout_rng = jax.random.split(rng)  # 'params' is flax's fallback stream for make_rng
        tokens, inputs = _inputs(batch)
        variables = {k: v for k, v in variables.items() if k != "intermediates"}
        return self.module.apply(
            variables,
            tokens,
            train=train,
            rngs={"params": params_rng, "dropout": dropout_rng},
            mutable=_MUTABLE,
            **inputs,
            **kw,
        )

    def loss(self, variables: dict[str, Any], batch: Batch, rng: jax.Array, *, train: bool):
        logits, mutated = self.apply(variables, batch, rng, train=train)
        ce, logz = cross_entropy(logits, batch["targets"])
        mask = batch["loss_mask"].astype(jnp.float32)
        tokens = jnp.sum(mask)
        denom = jnp.maximum(tokens, 1.0)
        ce_loss = jnp.sum(ce * mask) / denom
        z_loss = self.cfg.z_loss_weight * jnp.sum(jnp.square(logz) * mask) / denom
        aux_loss, layer_metrics = collect_intermediates(mutated.get("intermediates", {}))
        total = ce_loss + z_loss + aux_loss
        correct = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(jnp.float32)
        metrics = {
            "loss": ce_loss,
            "aux_loss": aux_loss,
            "z_loss": z_loss,
            "total_loss": total,
            "tokens": tokens,
            "accuracy": jnp.sum(correct * mask) / denom,
            **layer_metrics,
        }
        new = {
            "stats": mutated.get("stats", {}) if train else variables.get("stats", {}),
            "carry": mutated.get("carry", variables.get("carry", {})),
        }
        return total, metrics, new

    def param_count(self, seq_len: int = 8) -> int:
        shapes = jax.eval_shape(lambda: self.init(jax.random.key(0), _dummy_batch(1, seq_len)))
        return int(sum(x.size for x in jax.tree.leaves(unbox_values(shapes["params"]))))

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 * N + attention-like terms (Kaplan et al. 2020 / Chinchilla convention).

        N = non-embedding params + the output matrix (vocab x d_model, counted once whether tied or not;
        the input lookup is a gather, not a matmul). Norm scales are included (negligible). Each layer kind
        adds MIXER_FLOPS/FFN_FLOPS[name](cfg, seq_len); for "attention" that is
        12 * seq_len * heads * head_dim / 2 (QK^T and PV, 2 FLOPs/MAC, x3 for backward, /2 causal).
        """
        cfg = self.cfg
        n = self.param_count(seq_len)
        if not cfg.tie_embeddings:
            n -= cfg.vocab_size * cfg.d_model
        flops = 6.0 * n
        for i in range(cfg.num_layers):
            mixer, ffn = cfg.layer_kinds(i)
            flops += MIXER_FLOPS.get(mixer, lambda c, s: 0.0)(cfg, seq_len)
            flops += FFN_FLOPS.get(ffn, lambda c, s: 0.0)(cfg, seq_len)
        return flops

    def generate(
        self,
        variables: dict[str, Any],
        prompt_tokens: jax.Array,
        num_new: int,
        rng: jax.Array,
        temperature: float = 1.0,
        top_k: int | None = None,
    ) -> jax.Array:
        """Samples num_new tokens after prompt_tokens int32 [B,P] -> int32 [B, P + num_new] (prompt included).

        Full recompute: each step re-runs the decoder on the fixed-size buffer (causality makes the not yet
        written tail irrelevant), so cost is num_new full forwards; no KV cache yet. temperature <= 0 is
        greedy; top_k keeps the k most likely tokens. 'carry' is not used (each prompt starts fresh).
        """
        if num_new < 0:
            raise ValueError(f"generate: num_new must be >= 0, got {num_new}")
        if prompt_tokens.ndim != 2 or prompt_tokens.shape[1] < 1:
            raise ValueError(f"generate: prompt_tokens must be int [B, P] with P >= 1, got shape {prompt_tokens.shape}")
        if top_k is not None and not 1 <= top_k <= self.cfg.vocab_size:
            raise ValueError(f"generate: top_k must be in [1, vocab_size={self.cfg.vocab_size}], got {top_k}")
        variables = {k: v for k, v in variables.items() if k in ("params", "stats")}
        return _generate(self, variables, jnp.asarray(prompt_tokens, jnp.int32), rng, num_new, float(temperature), top_k)


def _dummy_batch(batch: int, seq_len: int) -> Batch:
    z = jnp.zeros((batch, seq_len), jnp.int32)
    return {"inputs": z, "targets": z, "loss_mask": z.astype(jnp.float32), "positions": z, "segment_ids": z}


def sample_logits(logits: jax.Array, rng: jax.Array, temperature: float, top_k: int | None) -> jax.Array:
    """logits [B, V] -> int32 [B]: greedy for temperature <= 0, else softmax(logits / T) over the top_k."""
    logits = logits.astype(jnp.float32)
    if temperature <= 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(rng, logits / temperature, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
def _generate(lm: LanguageModel, variables, prompt, rng, num_new: int, temperature: float, top_k: int | None):
    b, p = prompt.shape
    buf = jnp.zeros((b, p + num_new), jnp.int32).at[:, :p].set(prompt)

    def step(i, state):
        buf, rng = state
        rng, sub = jax.random.split(rng)
        logits, _ = lm.module.apply(variables, buf, train=False, mutable=_MUTABLE)
        last = jax.lax.dynamic_index_in_dim(logits, p + i - 1, axis=1, keepdims=False)
        tok = sample_logits(last, sub, temperature, top_k)
        return jax.lax.dynamic_update_slice(buf, tok[:, None], (0, p + i)), rng

    buf, _ = jax.lax.fori_loop(0, num_new, step, (buf, rng))
    return buf
