"""`Task`: the base class between the generic trainer and a model; the trainer knows no model math.

A Task is built from the model config (`cfg.model.build()`), so a checkpoint rebuilds it from the saved
config alone (`axlearn_like.checkpoint.load`). A subclass implements `init` and `loss`; the rest has defaults
that the trainer calls generically (docs/architecture.md, "Tasks and the trainer"):

  batch_spec(data)                     global batch shapes (default: the token batch of axlearn_like.data,
                                       without segment_ids for one-document rows)
  init / loss                          training
  flops_per_token, tokens_per_example  throughput and MFU
  eval_metrics(sums, cfg)              reported eval metrics from the eval batches' sums
  eval_hook(cfg, variables, step)      extra evaluation at every eval point (e.g. PSNR), -> {name: float}
  final_hook(cfg, variables)           after the last step (e.g. print a sample), -> dict for the run result
  describe_eval(ev)                    the one-line eval summary printed by the trainer
  resettable_stats()                   `stats` subtrees that are caches: an older checkpoint layout restarts them

Generation (`generate`): the argument checks, the sampling (temperature / top-k / top-p) and both loops live
here once. The full-recompute loop re-runs `logits` on the whole buffer per new token; the cached loop runs
`prefill(variables, tokens, lengths=, max_len=)` once, then one jit-compiled fixed-shape
`decode_step(variables, tokens, cache)` per token. A task implements whichever it supports and says so with
`supports_cached_decoding`; ragged prompts are right-padded rows with per-row `lengths`.
"""
from __future__ import annotations

import abc
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from axlearn_like.config import config_class, require
from axlearn_like.params import unbox_values

Batch = dict[str, jax.Array]
Variables = dict[str, Any]


@config_class
class SampleConfig:
    """The sample a generative task prints after training: `tokens` new tokens (0 = none) after `prompt`
    (encoded with the data's tokenizer), drawn at `temperature` (<= 0: greedy)."""

    tokens: int = 120
    prompt: str = "def "
    temperature: float = 0.8

    def validate(self) -> None:
        require(self.tokens >= 0, "tokens", f"must be >= 0, got {self.tokens}")
        require(self.tokens == 0 or self.prompt != "", "prompt", "is empty; give a prompt or set tokens=0")


def token_batch(batch_size: int, seq_len: int) -> Batch:
    """Zeros in the token batch layout of axlearn_like.data: int32 inputs/targets/positions/segment_ids and
    float32 loss_mask, each [batch_size, seq_len]."""
    z = jnp.zeros((batch_size, seq_len), jnp.int32)
    return {"inputs": z, "targets": z, "loss_mask": z.astype(jnp.float32), "segment_ids": z, "positions": z}


def check_generate_args(prompt_tokens: Any, num_new: int, top_k: int | None, vocab_size: int,
                        top_p: float | None = None, lengths: Any = None) -> tuple[jax.Array, jax.Array]:
    """Validates `generate`'s arguments; -> (prompt int32 [B, P], lengths int32 [B]). Raises ValueError (one
    line). Checks on `lengths` (1 <= lengths <= P) run only when it is concrete."""
    if num_new < 0:
        raise ValueError(f"generate: num_new must be >= 0, got {num_new}")
    prompt = jnp.asarray(prompt_tokens, jnp.int32)
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"generate: prompt_tokens must be int [B, P] with P >= 1, got shape {prompt.shape}")
    if top_k is not None and not 1 <= top_k <= vocab_size:
        raise ValueError(f"generate: top_k must be in [1, vocab_size={vocab_size}], got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"generate: top_p must be in (0, 1], got {top_p}")
    b, p = prompt.shape
    if lengths is None:
        return prompt, jnp.full((b,), p, jnp.int32)
    if not isinstance(lengths, jax.core.Tracer):
        arr = np.asarray(lengths)
        if arr.shape != (b,) or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"generate: lengths must be int [B={b}] (real prompt tokens per row), got "
                             f"{arr.dtype} {arr.shape}")
        if arr.min() < 1 or arr.max() > p:
            raise ValueError(f"generate: lengths must lie in [1, P={p}], got min {arr.min()}, max {arr.max()}")
    return prompt, jnp.asarray(lengths, jnp.int32)


def sample_logits(logits: jax.Array, rng: jax.Array, temperature: float, top_k: int | None = None,
                  top_p: float | None = None) -> jax.Array:
    """logits [B, V] -> int32 [B]: greedy for temperature <= 0, else a draw from softmax(logits / T) restricted
    to the top_k most likely tokens, then to the smallest set of the most likely ones whose probability reaches
    top_p (nucleus sampling, Holtzman et al. 2020; the most likely token is always kept; ties at the cut stay)."""
    logits = logits.astype(jnp.float32)
    if temperature <= 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None and top_p < 1.0:
        desc = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(desc, axis=-1)
        keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p  # the mass before a token is still short of top_p
        cut = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cut, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


class Task(abc.ABC):
    """Base of every model the trainer runs (see the module doc). `cfg` is the model config it was built from."""

    def __init__(self, cfg: Any):
        self.cfg = cfg

    # -- training: a subclass implements these two ---------------------------------------------------------
    @abc.abstractmethod
    def init(self, rng: jax.Array, batch: Batch) -> Variables:
        """Returns boxed variables {'params', 'stats', 'carry'} ({} where unused; see axlearn_like.state).

        `batch` has the *global* batch shape (carry leaves must lead with the global batch axis).
        """

    @abc.abstractmethod
    def loss(self, variables: Variables, batch: Batch, rng: jax.Array, *, train: bool
             ) -> tuple[jax.Array, dict[str, Any], Variables]:
        """Returns (scalar loss to minimize, metrics, mutated collections {'stats', 'carry'}).

        `variables` holds unboxed 'params', 'stats', 'carry'. Metrics: scalars (or small arrays) averaged over
        micro-batches; must include 'loss' (the main objective, without aux losses) and 'tokens' (the count the
        loss is averaged over; eval weights batches by it). Eval (train=False) must not change 'stats'.
        """

    # -- shapes and costs ----------------------------------------------------------------------------------
    def example_batch(self, batch_size: int, seq_len: int) -> Batch:
        """A batch of zeros with this task's keys and shapes (default: the token batch)."""
        return token_batch(batch_size, seq_len)

    def batch_spec(self, data: Any) -> dict[str, jax.ShapeDtypeStruct]:
        """The global batch the train and eval steps take for the data config `data`, as shapes (sets their
        input shardings; `axlearn_like.evaluation.global_batch` drops any other key the data yields).
        `segment_ids` is left out when `data.multi_document_rows` is False (rows of one document from position
        0, then padding): there a causal model computes the same real-position outputs without them, and
        attention would pay a dense [B, 1, S, S] mask for nothing."""
        spec = jax.eval_shape(lambda: self.example_batch(data.global_batch_size, getattr(data, "seq_len", 1)))
        if not getattr(data, "multi_document_rows", True):
            spec.pop("segment_ids", None)
        return spec

    def param_count(self, seq_len: int = 8) -> int:
        shapes = jax.eval_shape(lambda: self.init(jax.random.key(0), self.example_batch(1, seq_len)))
        return int(sum(x.size for x in jax.tree.leaves(unbox_values(shapes["params"]))))

    def tokens_per_example(self, data: Any) -> int:
        """Tokens per batch row, for tokens/s and MFU (default: the data's seq_len)."""
        return int(data.seq_len)

    def flops_per_token(self, seq_len: int) -> float:
        """Training (forward + backward) FLOPs per token, for MFU. Default 6 N (Kaplan et al. 2020)."""
        return 6.0 * self.param_count(seq_len)

    # -- evaluation hooks ----------------------------------------------------------------------------------
    def eval_metrics(self, sums: dict[str, float], cfg: Any) -> dict[str, float]:
        """The reported eval metrics (scalars). `sums`: "loss_sum" (sum of loss x tokens), "tokens", and each
        other metric averaged over the eval batches (arrays elementwise: a subclass may derive scalars from
        them); `cfg` the root (experiment) config."""
        tokens = sums["tokens"]
        rest = {k: v for k, v in sums.items() if k not in ("loss_sum", "tokens") and jnp.ndim(v) == 0}
        return {"loss": sums["loss_sum"] / max(tokens, 1.0), "tokens": tokens, **rest}

    def eval_hook(self, cfg: Any, variables: Variables, step: int) -> dict[str, float]:
        """Extra evaluation at every eval point, on every process; -> scalars logged as eval/<name>."""
        del cfg, variables, step
        return {}

    def final_hook(self, cfg: Any, variables: Variables) -> dict[str, Any]:
        """Runs after the last step on every process (not after a SIGTERM); -> entries of the run result."""
        del cfg, variables
        return {}

    def describe_eval(self, ev: dict[str, float]) -> str:
        return f"loss {ev['loss']:.4f}"

    # -- checkpoints ---------------------------------------------------------------------------------------
    def resettable_stats(self) -> dict[tuple[str, ...], str]:
        """The `stats` subtrees (key paths in the collection `init` returns) that are training-time caches, not
        model state -> what each is, ending the note a restore prints ("a training-time cache ...: starting it
        empty"). A checkpoint whose arrays differ from this code's only inside them (written before the cache's
        layout changed) restores with them at their initial values; any other difference still fails the
        restore (axlearn_like.state.ResettableState). Default: none."""
        return {}

    # -- generation ----------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return int(self.cfg.vocab_size)

    def logits(self, variables: Variables, tokens: jax.Array, rng: jax.Array, **options) -> jax.Array:
        """Next-token logits float32 [B, S, V] of every position of tokens int32 [B, S] (full recompute)."""
        raise NotImplementedError(f"{type(self).__name__} does not generate tokens (no Task.logits)")

    @property
    def supports_cached_decoding(self) -> bool:
        """Whether `prefill` / `decode_step` work for this model (generate(cached=None) then uses them)."""
        return False

    def prefill(self, variables: Variables, tokens: jax.Array, *, lengths: jax.Array | None = None,
                max_len: int | None = None, rng: jax.Array | None = None, **options) -> tuple[jax.Array, Any]:
        """Cached decoding: tokens int32 [B, S], right-padded rows of `lengths` int [B] real tokens (default S)
        -> (logits float32 [B, S, V], cache with room for max_len tokens per row (default S)). Row b's
        next-token logits are logits[b, lengths[b] - 1]. rng: for stochastic models (carried in the cache);
        options: the task's static generation options (as for `logits`)."""
        raise NotImplementedError(
            f"{type(self).__name__} has no cached decoding (prefill/decode_step); use generate(..., cached=False)")

    def decode_step(self, variables: Variables, tokens: jax.Array, cache: Any, **options) -> tuple[jax.Array, Any]:
        """Cached decoding: feeds tokens int32 [B, S] after each row's context in `cache` -> (logits [B, S, V],
        cache). Fixed shapes (the cache is preallocated by `prefill`): one compile serves every step."""
        raise NotImplementedError(
            f"{type(self).__name__} has no cached decoding (prefill/decode_step); use generate(..., cached=False)")

    def generate(self, variables: Variables, prompt_tokens: Any, num_new: int, rng: jax.Array,
                 temperature: float = 1.0, top_k: int | None = None, *, top_p: float | None = None,
                 lengths: Any = None, cached: bool | None = None, **options) -> jax.Array:
        """Samples num_new tokens after prompt_tokens int [B, P] -> int32 [B, P + num_new].

        lengths int [B] (default P): row b's prompt is prompt_tokens[b, :lengths[b]] (ragged prompts, right-
        padded); its output row is that prompt, the num_new new tokens, then P - lengths[b] zeros.
        cached=True: `prefill` the prompts once, then one jit-compiled `decode_step` per token (the cache holds
        P + num_new tokens per row); cached=False: each new token re-runs `logits(variables, buffer, rng,
        **options)` on the fixed-size buffer (causality makes the unwritten tail irrelevant); None (default):
        cached when the task supports it (`supports_cached_decoding`).
        temperature <= 0 is greedy; top_k keeps the k most likely tokens, top_p the nucleus of mass top_p
        (`sample_logits`). 'carry' is not used (each prompt starts fresh). `options` are static (e.g. EBT
        thinking steps), passed to `logits` or to `prefill` / `decode_step`.
        """
        prompt, lengths = check_generate_args(prompt_tokens, num_new, top_k, self.vocab_size, top_p, lengths)
        if cached is None:
            cached = self.supports_cached_decoding
        variables = {k: v for k, v in variables.items() if k in ("params", "stats")}
        loop = _generate_cached if cached else _generate_recompute
        return loop(self, variables, prompt, lengths, rng, int(num_new), float(temperature), top_k,
                    None if top_p is None else float(top_p), tuple(sorted(options.items())))


def _output_buffer(prompt: jax.Array, lengths: jax.Array, num_new: int) -> jax.Array:
    """int32 [B, P + num_new]: each row's prompt[:lengths], zeros after it."""
    b, p = prompt.shape
    real = jnp.arange(p)[None, :] < lengths[:, None]
    return jnp.zeros((b, p + num_new), jnp.int32).at[:, :p].set(jnp.where(real, prompt, 0))


def _at_rows(x: jax.Array, index: jax.Array) -> jax.Array:
    """x [B, S, ...] -> x[b, index[b]] [B, ...]."""
    return jnp.take_along_axis(x, index.reshape(-1, *([1] * (x.ndim - 1))), axis=1)[:, 0]


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7, 8, 9))
def _generate_recompute(task: Task, variables, prompt, lengths, rng, num_new, temperature, top_k, top_p, options):
    b = prompt.shape[0]
    buf = _output_buffer(prompt, lengths, num_new)

    def step(i, state):
        buf, rng = state
        rng, r_model, r_sample = jax.random.split(rng, 3)
        logits = task.logits(variables, buf, r_model, **dict(options))
        tok = sample_logits(_at_rows(logits, lengths + i - 1), r_sample, temperature, top_k, top_p)
        return buf.at[jnp.arange(b), lengths + i].set(tok), rng

    buf, _ = jax.lax.fori_loop(0, num_new, step, (buf, rng))
    return buf


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7, 8, 9))
def _generate_cached(task: Task, variables, prompt, lengths, rng, num_new, temperature, top_k, top_p, options):
    b, p = prompt.shape
    options = dict(options)
    buf = _output_buffer(prompt, lengths, num_new)
    if num_new == 0:
        return buf
    rng, r_model, sub = jax.random.split(rng, 3)
    logits, cache = task.prefill(variables, prompt, lengths=lengths, max_len=p + num_new, rng=r_model, **options)
    first = sample_logits(_at_rows(logits, lengths - 1), sub, temperature, top_k, top_p)

    def step(carry, _):
        tok, cache, rng = carry
        logits, cache = task.decode_step(variables, tok[:, None], cache, **options)
        rng, sub = jax.random.split(rng)
        return (sample_logits(logits[:, 0], sub, temperature, top_k, top_p), cache, rng), tok

    (last, _, _), toks = jax.lax.scan(step, (first, cache, rng), None, length=num_new - 1)
    new = jnp.concatenate([jnp.moveaxis(toks, 0, 1), last[:, None]], axis=1)  # [B, num_new]
    cols = lengths[:, None] + jnp.arange(num_new)[None, :]
    return buf.at[jnp.arange(b)[:, None], cols].set(new)
