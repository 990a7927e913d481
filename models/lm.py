"""Decoder language model as an axlearn_like.task.Task: init, loss with layer aux losses, FLOPs, sampling.

`NextTokenTask` holds what every next-token model (this LM, models.ebt.EBT) shares: eval metrics in bits per
token and per byte, and the sample printed after training (the model config's `sample` section).

Loss (training objective, per micro-batch):
    L = CE + z_loss_weight * mean(logsumexp(logits)^2) + sum of every 'aux_loss' leaf sown into 'intermediates'
where CE = sum(loss_mask * -log softmax(logits)[target]) / max(sum(loss_mask), 1), softmax in float32.
With `loss_chunk` (DecoderConfig) the per-position terms come from `chunked_token_losses`: the same numbers,
the logits made `loss_chunk` positions at a time and remade in the backward.

Layer conventions read here (generic, never by parameter path):
  * `self.sow("intermediates", "aux_loss", scalar)`: added to L (under scan: summed over the layers axis);
    also reported as metric "<module path>/aux_loss".
  * `self.sow("intermediates", "metrics", {name: scalar or small array})`: reported as
    "<module path>/<name>" (e.g. "stack/layer_3/ffn/expert_load"); not part of the loss.
"""
from __future__ import annotations

import math
from typing import Any

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from axlearn_like.task import Task, sample_logits
from models.decoder import Decoder, DecoderConfig, default_positions

Batch = dict[str, jax.Array]
_MUTABLE = ["intermediates", "stats", "carry"]


def cross_entropy(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """logits [..., V] (cast to float32), int targets [...] -> (per-token CE [...], logsumexp [...])."""
    logits = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return logz - target_logit, logz


def token_losses(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """logits [B, S, V], targets [B, S] -> (CE, logsumexp, argmax == target as float32), each [B, S]."""
    ce, logz = cross_entropy(logits, targets)
    return ce, logz, (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)


def chunked_token_losses(head, h: jax.Array, targets: jax.Array, chunk: int):
    """`token_losses(head(h), targets)` without the whole [B, S, V] logits: h [B, S, D] goes through `head`
    (hidden [B, c, D] -> float32 logits [B, c, V]) `chunk` positions at a time in a scan whose body is
    rematerialized, so the backward remakes one chunk's logits at a time (S padded to a multiple of chunk)."""
    b, s, d = h.shape
    chunk = min(chunk, s)
    n = -(-s // chunk)
    pad = n * chunk - s
    hc = jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, d).swapaxes(0, 1)
    tc = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one(x):
        return token_losses(head(x[0]), x[1])

    out = jax.lax.map(one, (hc, tc))  # three [n, B, chunk]
    return tuple(o.swapaxes(0, 1).reshape(b, n * chunk)[:, :s] for o in out)


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
                entries = (flax.traverse_util.flatten_dict(entry, sep="/") if isinstance(entry, dict)
                           else {"value": entry})
                for name, v in entries.items():
                    metrics[f"{prefix}/{name}{suffix}"] = v
    return aux, metrics


def _inputs(batch: Batch) -> tuple[jax.Array, dict[str, Any]]:
    return batch["inputs"], {"positions": batch.get("positions"), "segment_ids": batch.get("segment_ids")}


__all__ = ["NextTokenTask", "LanguageModel", "cross_entropy", "collect_intermediates", "sample_logits"]


class NextTokenTask(Task):
    """A Task over token batches whose loss is the next-token CE in nats ("loss" metric): reports bits per
    token and bits per byte (the data's tokenizer) at eval, and prints `cfg.sample` after training."""

    def eval_metrics(self, sums: dict[str, float], cfg: Any) -> dict[str, float]:
        from axlearn_like.data import make_tokenizer

        ev = super().eval_metrics(sums, cfg)
        bytes_per_token = float(getattr(make_tokenizer(cfg.data), "bytes_per_token", 1.0))
        ev["bits_per_token"] = ev["loss"] / math.log(2)
        ev["bits_per_byte"] = ev["bits_per_token"] / bytes_per_token
        return ev

    def describe_eval(self, ev: dict[str, float]) -> str:
        return f"loss {ev['loss']:.4f} nats/token, {ev['bits_per_byte']:.3f} bits/byte"

    def final_hook(self, cfg: Any, variables: dict[str, Any]) -> dict[str, Any]:
        """Samples `self.cfg.sample.tokens` tokens after its prompt (process 0 prints) -> {"sample": text}."""
        from axlearn_like.data import make_tokenizer

        sample = self.cfg.sample
        if sample.tokens <= 0:
            return {}
        tok = make_tokenizer(cfg.data)
        prompt = np.asarray([tok.encode(sample.prompt)], np.int32)
        out = self.generate(variables, prompt, sample.tokens, jax.random.PRNGKey(cfg.trainer.seed),
                            temperature=sample.temperature)
        text = tok.decode([int(t) for t in np.asarray(out)[0][prompt.shape[1]:]])
        if jax.process_index() == 0:
            print("sample:\n" + sample.prompt + text, flush=True)
        return {"sample": text}


class LanguageModel(NextTokenTask):
    """Task for a next-token decoder LM (see module doc). Batch keys: "inputs", "targets" int32 [B,S],
    "loss_mask" float32 [B,S], optional "positions" and "segment_ids" int32 [B,S]."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__(cfg)
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

    def apply(
        self, variables: dict[str, Any], batch: Batch, rng: jax.Array | None = None, *, train: bool = False, **kw
    ):
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
        if self.cfg.loss_chunk:
            h, mutated = self.apply(variables, batch, rng, train=train, return_hidden=True)
            params = {"params": variables["params"]}
            head = lambda x: self.module.apply(params, x, method=Decoder.logits)  # noqa: E731
            ce, logz, correct = chunked_token_losses(head, h, batch["targets"], self.cfg.loss_chunk)
        else:
            logits, mutated = self.apply(variables, batch, rng, train=train)
            ce, logz, correct = token_losses(logits, batch["targets"])
        mask = batch["loss_mask"].astype(jnp.float32)
        tokens = jnp.sum(mask)
        denom = jnp.maximum(tokens, 1.0)
        ce_loss = jnp.sum(ce * mask) / denom
        z_loss = self.cfg.z_loss_weight * jnp.sum(jnp.square(logz) * mask) / denom
        aux_loss, layer_metrics = collect_intermediates(mutated.get("intermediates", {}))
        total = ce_loss + z_loss + aux_loss
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

    def eval_metrics(self, sums: dict[str, Any], cfg: Any) -> dict[str, float]:
        """NextTokenTask's, plus MaxVio_global of the MoE layers over the whole eval set (models.moe)."""
        ev = super().eval_metrics(sums, cfg)
        if any(f.kind == "moe" for f in self.cfg.ffn_pattern):
            from models.moe import maxvio_global

            ev.update(maxvio_global(sums))
        return ev

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 * N + attention-like terms (Kaplan et al. 2020 / Chinchilla convention).

        N = non-embedding params + the output matrix (vocab x d_model, counted once whether tied or not;
        the input lookup is a gather, not a matmul). Norm scales are included (negligible). Each layer adds
        its kinds' `extra_flops(d_model, seq_len)` (models/kinds.py); for "attention" that is
        12 * seq_len * heads * head_dim / 2 (QK^T and PV, 2 FLOPs/MAC, x3 for backward, /2 causal).
        """
        cfg = self.cfg
        n = self.param_count(seq_len)
        if not cfg.tie_embeddings:
            n -= cfg.vocab_size * cfg.d_model
        flops = 6.0 * n
        for i in range(cfg.num_layers):
            mixer, ffn = cfg.layer_kinds(i)
            flops += mixer.extra_flops(cfg.d_model, seq_len) + ffn.extra_flops(cfg.d_model, seq_len)
        return flops

    # -- generation (axlearn_like.task.Task.generate) --
    def logits(self, variables: dict[str, Any], tokens: jax.Array, rng: jax.Array) -> jax.Array:
        """float32 [B, S, V] next-token logits of tokens int32 [B, S] (full recompute)."""
        del rng
        return self.module.apply(variables, tokens, train=False, mutable=_MUTABLE)[0]

    @property
    def supports_cached_decoding(self) -> bool:
        """True when every mixer kind implements the `cache` collection (`MixerConfig.decode_cache`)."""
        return all(m.decode_cache for m in self.cfg.layer_pattern)

    def _check_cached(self) -> None:
        missing = sorted({m.kind for m in self.cfg.layer_pattern if not m.decode_cache})
        if missing:
            raise NotImplementedError(f"LanguageModel: mixer kinds {missing} have no cached decoding "
                                      "(MixerConfig.decode_cache); use generate(..., cached=False)")

    def _cached_apply(self, variables, tokens, positions, segment_ids, layers):
        """One apply with the 'cache' collection mutable -> (logits float32 [B, S, V], new layer caches)."""
        v = {k: variables[k] for k in ("params", "stats") if k in variables}
        if layers is not None:
            v["cache"] = layers
        logits, mutated = self.module.apply(v, tokens, positions=positions, segment_ids=segment_ids, train=False,
                                            mutable=["cache"])
        return logits, mutated["cache"]

    def init_cache(self, variables: dict[str, Any], batch_size: int, max_len: int) -> dict[str, Any]:
        """An empty decoding cache for batch_size rows of up to max_len tokens: {"position": int32 [B] (the next
        token's position per row), "layers": the stack's 'cache' collection, zeros}. Its shapes come from
        tracing (never running) one cached apply of max_len tokens, so each layer kind sizes its own cache."""
        self._check_cached()
        tokens = jnp.zeros((batch_size, max_len), jnp.int32)
        pos = default_positions(tokens)
        shapes = jax.eval_shape(lambda v: self._cached_apply(v, tokens, pos, None, None)[1], variables)
        return {"position": jnp.zeros((batch_size,), jnp.int32),
                "layers": jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)}

    def prefill(self, variables: dict[str, Any], tokens: jax.Array, *, lengths: jax.Array | None = None,
                max_len: int | None = None, rng: jax.Array | None = None):
        """Cached decoding, step 1: tokens int32 [B, S] (rows right-padded; `lengths` int [B] real tokens per
        row, default S) -> (logits float32 [B, S, V], cache with room for max_len tokens per row, default S).
        Row b's next-token logits are logits[b, lengths[b] - 1]; the padding's logits are meaningless. (rng:
        unused, the decoder is deterministic.)"""
        del rng
        tokens = jnp.asarray(tokens, jnp.int32)
        b, s = tokens.shape
        max_len = s if max_len is None else int(max_len)
        if max_len < s:
            raise ValueError(f"prefill: max_len={max_len} is shorter than the prompt ({s} tokens)")
        cache = self.init_cache(variables, b, max_len)
        lengths = jnp.full((b,), s, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
        positions = default_positions(tokens)
        segment_ids = (positions < lengths[:, None]).astype(jnp.int32)  # 0 = right padding
        logits, layers = self._cached_apply(variables, tokens, positions, segment_ids, cache["layers"])
        return logits, {"position": lengths, "layers": layers}

    def decode_step(self, variables: dict[str, Any], tokens: jax.Array, cache: dict[str, Any]):
        """Cached decoding, step 2..: tokens int32 [B, S] (usually S = 1) continue each row of `cache` at its
        own position -> (logits float32 [B, S, V], cache). Fixed shapes: jit it once for every step. Positions
        past the cache's max_len are not checked here (the write is dropped); `Task.generate` sizes the cache."""
        tokens = jnp.asarray(tokens, jnp.int32)
        positions = cache["position"][:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
        logits, layers = self._cached_apply(variables, tokens, positions, None, cache["layers"])
        return logits, {"position": cache["position"] + tokens.shape[1], "layers": layers}
