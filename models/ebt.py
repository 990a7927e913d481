"""Energy-Based Transformers (Gladstone et al. 2025, arXiv 2507.02092): autoregressive text EBT.

The model is an energy E_theta(x_{0..i}, p_i) -> R per position: observed tokens x [B,S] and a candidate
next-token distribution p [B,S,V] give one scalar energy per position [B,S]. The candidate is embedded by
a bias-free Linear(V, D) of p ("candidate_proj"); the foundation's DecoderStack (its Blocks: RMSNorm,
mixer, SwiGLU MLP; scan/remat as configured) reads the stream [observed ; predicted] of length 2S with
the "ebt_attention" mixer kind defined here (System2AttentionConfig), and a Linear(D, 1) ("energy_head")
on the predicted half gives the energies.

System-2 attention (paper Sec. 3 / App.): observed token i attends causally to observed 0..i; prediction i
(the candidate for token i+1) attends to observed 0..i and to itself, with the SAME Q/K/V/O weights. The
default "efficient" form computes the observed stream with ordinary causal attention and the predicted
stream as one softmax over S+1 logits per query (S causal observed keys + its own key): S x (S+1) scores,
about half the FLOPs of the equivalent dense 2S x 2S masked form (`System2AttentionConfig(form="dense")`,
kept as the test reference). The observed stream never depends on the candidate, so the efficient form runs it once
per batch (phase "observe", keys/values kept in the `cache` collection) and every thinking step only the
predicted stream (phase "predict"). RoPE positions: observed token i at i, prediction i at i+1 (the position it
predicts).
Changing any token after i never changes the energy (or the thinking result) at i.

Thinking (System-2 inference, the inner loop). From y_0 ~ N(0, init_logit_std^2) logits, for k < K:
    p_k     = softmax(y_k + eps_k),   eps_k ~ N(0, langevin_std^2) (training only)
    y_{k+1} = p_k - alpha_k * dE(x, p_k)/dp_k                                     (1)
with the gradient taken w.r.t. the PROBABILITIES p_k, as in the reference code (the paper's pseudocode
writes it on the logits); note y_{k+1} starts from p_k, not y_k, so the new logits live on the
probability scale plus the gradient step and alpha learns the scale. alpha_k = max(alpha, 1e-4) times a
per-(batch, position) factor drawn from U[1/s, s] when step_size_spread s > 1 (i.e. U[alpha/s, s*alpha]).
Because E_i depends on p_i only, d(sum E)/dp gives every position its own gradient in one backward.
Training loss: CE(softmax(y_K), next token) ("last", the paper's S2 setting) or the mean over k=1..K of
CE(softmax(y_k)) ("all"; the reference's S1 adds detach_chain: each step starts from the previous logits
detached); earlier steps stay attached (detach_earlier=False, detach_chain=False), so the gradient flows
through every inner gradient, i.e. second-order backprop (jax.grad inside the loss). detach_earlier=True is
the reference's S2 `--truncate_mcmc`: second order only through the last step, the earlier inner gradients
being constants while the chain y_0 -> y_K stays attached. K is drawn per step from
U{think_steps, ..., think_steps + think_steps_random} when training.

Replay buffer (the reference's CausalReplayBuffer): a ring of replay_size rows in the `stats` collection
(checkpointed with the train state) keeps each training row whole: its tokens, targets, loss mask, positions,
segment ids and the final logits y_K it reached. Each step appends round(replay_fraction * B) distinct stored
rows to the batch; they restart thinking from their stored logits, with their own text and targets, and
count in the trained loss (the reported `loss` is the fresh rows'). Then the fresh rows are written.

Thinking-step conditioning (time_embed = L > 0, the reference's ebt_type=time_embed): a learned token per
landscape l opens the observed stream; step k uses l = min(k, L - 1).

Evaluation thinks eval_steps() = the trained maximum think_steps + think_steps_random by default and reports
the loss after 1..eval_report_steps steps too; `think`/`generate` add the inference Langevin noise
(infer_langevin_std, default langevin_std) to every step, as the reference's inference does.

Inference: `EBT.think(...)` runs any number of steps and self-verification (G candidates from different
random starts; per position keep the candidate of lowest final energy); `EBT.generate` samples with it. The
observed stream is encoded once per batch and shared by the G candidates. Cached generation (`EBT.prefill` /
`decode_step`, the default of `generate` for the efficient form without time_embed) keeps the observed stream
in a KV cache preallocated to the maximum length, so each new token costs one observed-token step plus thinking
at its own position only (`System2Attention.attend`, `predicted_attention_cached`).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from axlearn_like.config import config_class, require
from axlearn_like.params import param_init
from kernels import common, jvp_attention
from models.attention import (
    Attention,
    AttentionConfig,
    cache_write,
    cached_attention,
    dot_product_attention,
    segment_mask,
)
from models.decoder import DecoderConfig, DecoderStack, default_positions
from models.kinds import LayerContext, MixerConfig
from models.layers import Dense, Embed
from models.lm import NextTokenTask, cross_entropy

ALPHA_MIN = 1e-4
ATTENTION_FORMS = ("efficient", "dense")
PREDICTED_ATTENTION = ("jnp", *jvp_attention.IMPLEMENTATIONS)
Batch = dict[str, jax.Array]


# --- attention -----------------------------------------------------------------------------------------
def predicted_attention(q_p, k_p, v_p, k_o, v_o, segment_ids=None, *, query_block: int | None = None,
                        implementation: str = "jnp"):
    """The predicted half of System-2 attention: one softmax per prediction over S+1 logits.

    implementation "jnp" (below) or a `kernels.jvp_attention` implementation ("xla", "triton"): the
    observed part (o, lse) from that fused op, then its merge with the self logit l_i = c q_i.k_p_i:
        out_i = a_i o_i + (1 - a_i) v_p_i,  a_i = sigmoid(lse_i - l_i)   (the joint softmax over S+1 logits)
    which is row-sized work that autodiff handles in every mode.

    q_p: [B, S, H, D] (predictions); k_p, v_p: [B, S, K, D] (their own keys/values); k_o, v_o: [B, S, K, D]
    (the observed stream's keys/values); segment_ids int [B, S] or None -> [B, S, H, D].
    Prediction i attends to {observed j <= i (same segment)} U {itself}: an S x (S+1) score matrix.
    The jnp form is differentiable in every mode (operands in their dtype, float32 accumulation and softmax),
    but a second-order pass through it stores and re-reads score-sized float32 tensors; with `query_block`
    the queries are processed in blocks that only see the observed keys up to the block's end (causal block
    skipping: about (1 + block/S)/2 of the S x S work). The fused form never writes S x S (the GPU default in
    jvp mode; docs/notes/ebt.md has the measurements).
    """
    b, s, h, d = q_p.shape
    kv = k_o.shape[2]
    g = h // kv
    f32 = jnp.float32
    qg = q_p.reshape(b, s, kv, g, d)
    scale = 1.0 / jnp.sqrt(jnp.float32(d))
    if implementation != "jnp":
        o, lse = jvp_attention.attention(q_p, k_o, v_o, segment_ids, implementation=implementation)
        l_self = jnp.einsum("bskgd,bskd->bskg", qg, k_p, preferred_element_type=f32) * scale
        a = jax.nn.sigmoid(jnp.swapaxes(lse, 1, 2).reshape(b, s, kv, g) - l_self)[..., None]
        out = a * o.reshape(b, s, kv, g, d).astype(f32) + (1.0 - a) * v_p[:, :, :, None].astype(f32)
        return out.reshape(b, s, h, d).astype(q_p.dtype)
    # the self logit q_i . k_p_i and the row max bound are per query: computed once for all blocks
    logits_self = jnp.einsum("bskgd,bskd->bkgs", qg, k_p, preferred_element_type=f32) * scale  # [B,K,G,S]
    bq = s if not query_block else min(query_block, s)
    outs = []
    for q0 in range(0, s, bq):
        q1 = min(q0 + bq, s)
        # block rows q0..q1-1 see observed keys 0..q1-1
        lo = jnp.einsum("bskgd,btkd->bkgst", qg[:, q0:q1], k_o[:, :q1], preferred_element_type=f32) * scale
        allowed = (jnp.arange(q0, q1)[:, None] >= jnp.arange(q1)[None, :])[None, None, None]
        if segment_ids is not None:
            allowed = allowed & (segment_ids[:, q0:q1, None] == segment_ids[:, None, :q1])[:, None, None]
        lo = jnp.where(allowed, lo, -jnp.inf)
        ls = logits_self[..., q0:q1]
        m = jax.lax.stop_gradient(jnp.maximum(jnp.max(lo, axis=-1), ls))  # finite: the self term is present
        w_obs = jnp.exp(lo - m[..., None])
        w_self = jnp.exp(ls - m)
        inv = 1.0 / (jnp.sum(w_obs, axis=-1) + w_self)
        o = jnp.einsum("bkgst,btkd->bskgd", (w_obs * inv[..., None]).astype(v_o.dtype), v_o[:, :q1],
                       preferred_element_type=f32)
        outs.append(o + jnp.einsum("bkgs,bskd->bskgd", w_self * inv, v_p[:, q0:q1].astype(f32)))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
    return out.reshape(b, s, h, d).astype(q_p.dtype)


def system2_attention(q, k, v, segment_ids=None):
    """Efficient System-2 attention over the joint stream [observed ; predicted].

    q: [B, 2S, H, D]; k, v: [B, 2S, K, D] (GQA, H % K == 0); segment_ids: int [B, S] or None -> [B, 2S, H, D].
    Observed half: causal attention among observed tokens; predicted half: `predicted_attention`.
    The model runs the two halves as separate passes (observed once per batch, predicted per thinking step).
    """
    s = q.shape[1] // 2
    ctx_o = dot_product_attention(q[:, :s], k[:, :s], v[:, :s], segment_ids, implementation="xla")
    ctx_p = predicted_attention(q[:, s:], k[:, s:], v[:, s:], k[:, :s], v[:, :s], segment_ids)
    return jnp.concatenate([ctx_o, ctx_p], axis=1)


def system2_mask(s: int) -> jax.Array:
    """bool [2S, 2S]: True where query (row) may attend key (column) in the stream [observed ; predicted]."""
    i = jnp.arange(2 * s)[:, None]
    j = jnp.arange(2 * s)[None, :]
    obs_q, obs_k = i < s, j < s
    qi = jnp.where(obs_q, i, i - s)
    return (obs_k & (j <= qi)) | (~obs_q & (j == i))


def system2_attention_dense(q, k, v, segment_ids=None):
    """The test reference: full 2S x 2S attention with the generalized causal mask `system2_mask`."""
    s = q.shape[1] // 2
    mask = system2_mask(s)[None, None]
    if segment_ids is not None:
        seg2 = jnp.concatenate([segment_ids, segment_ids], axis=1)
        mask = mask & segment_mask(seg2)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


class System2Attention(Attention):
    """The "ebt_attention" mixer. Positions come from the model (observed i -> i, prediction i -> i + 1).

    form "dense": [B, 2S, D] joint stream (observed ; predicted), segment_ids [B, 2S] -> [B, 2S, D].
    form "efficient": two passes over [B, S, D] with segment_ids [B, S]. The observe pass (the `cache`
    collection mutable and empty) runs ordinary causal attention (cuDNN on GPU: it is differentiated only
    once) and stores this layer's observed keys/values as cache {"obs_key", "obs_value"} [B, S, K, Dh]; the
    predict pass reads them (`predicted_attention`). The observed stream does not depend on the candidate,
    so every thinking step runs only the predict pass: half the stream of the joint form.
    """

    form: str = "efficient"
    query_block: int | None = None
    predicted: str = "jnp"

    def core(self, q, k, v, segment_ids):
        if self.form == "dense":
            seg = None if segment_ids is None else segment_ids[:, : q.shape[1] // 2]
            return system2_attention_dense(q, k, v, seg)
        if not self.has_variable("cache", "obs_key"):
            if not self.is_mutable_collection("cache"):
                raise ValueError("EBT: the predict pass needs the observed keys/values: apply with "
                                 "mutable=['cache'] (phase='observe' or 'both') first, or use EBT.energy")
            self.variable("cache", "obs_key", lambda: k)
            self.variable("cache", "obs_value", lambda: v)
            return dot_product_attention(q, k, v, segment_ids, implementation=self.cfg.implementation)
        k_o = self.get_variable("cache", "obs_key")
        v_o = self.get_variable("cache", "obs_value")
        return predicted_attention(q, k, v, k_o, v_o, segment_ids, query_block=self.query_block,
                                   implementation=self.predicted)

    def attend(self, q, k, v, positions, segment_ids):
        """Cached decoding (`EBT.prefill` / `decode_step`, efficient form): the cache holds the observed stream's
        keys/values preallocated, "cached_key" / "cached_value" [B, T, K, Dh] at slot = observed position. The
        observe pass (cache mutable) writes the new tokens' keys/values at their slots and attends causally over
        the cache (a decoder's KV cache); the predict pass (cache read-only) is `predicted_attention_cached`:
        the prediction at RoPE position p attends to the observed slots < p and to itself. Else `core`."""
        if self.form == "dense" or not self.has_variable("cache", "cached_key"):
            return self.core(q, k, v, segment_ids)
        keys, values = self.get_variable("cache", "cached_key"), self.get_variable("cache", "cached_value")
        if self.is_mutable_collection("cache"):
            keys, values = cache_write(keys, k, positions), cache_write(values, v, positions)
            self.put_variable("cache", "cached_key", keys)
            self.put_variable("cache", "cached_value", values)
            return cached_attention(q, keys, values, positions)
        return predicted_attention_cached(q, k, v, keys, values, positions - 1)


def predicted_attention_cached(q_p, k_p, v_p, k_c, v_c, last):
    """The predicted stream against a KV cache of the observed stream (cached decoding).

    q_p: [G*B, S, H, D] predictions (G candidates per cache row, candidate-major); k_p, v_p: [G*B, S, K, D] their
    own keys/values; k_c, v_c: [B, T, K, D] the observed keys/values by slot; last int [G*B, S]: the last
    observed slot each prediction sees. Prediction i attends to the slots <= last[i] and to itself, one softmax
    over both (as `predicted_attention`) -> [G*B, S, H, D].
    """
    bq, s, h, d = q_p.shape
    bc, t, kv = k_c.shape[:3]
    n, g = bq // bc, h // kv
    f32 = jnp.float32
    scale = 1.0 / jnp.sqrt(jnp.float32(d))
    qg = q_p.reshape(n, bc, s, kv, g, d)
    lo = jnp.einsum("nbskgd,btkd->nbkgst", qg, k_c.astype(q_p.dtype), preferred_element_type=f32) * scale
    seen = jnp.arange(t)[None, None, None, :] <= last.reshape(n, bc, s)[..., None]  # [n, B, S, T]
    lo = jnp.where(seen[:, :, None, None], lo, -jnp.inf)
    ls = jnp.einsum("nbskgd,nbskd->nbkgs", qg, k_p.reshape(n, bc, s, kv, d), preferred_element_type=f32) * scale
    m = jax.lax.stop_gradient(jnp.maximum(jnp.max(lo, axis=-1), ls))  # finite: the self term is present
    w_obs, w_self = jnp.exp(lo - m[..., None]), jnp.exp(ls - m)
    inv = 1.0 / (jnp.sum(w_obs, axis=-1) + w_self)
    o = jnp.einsum("nbkgst,btkd->nbskgd", (w_obs * inv[..., None]).astype(v_c.dtype), v_c, preferred_element_type=f32)
    o = o + jnp.einsum("nbkgs,nbskd->nbskgd", w_self * inv, v_p.reshape(n, bc, s, kv, d).astype(f32))
    return o.reshape(bq, s, h, d).astype(q_p.dtype)


@config_class
class System2AttentionConfig(AttentionConfig):
    """The "ebt_attention" mixer kind: System-2 attention (module doc) on the AttentionConfig projections.

    form: "efficient" (the observed stream once per batch, the predicted stream per thinking step) or "dense"
    (the 2S x 2S masked reference). query_block: predicted-stream queries per block in the efficient form's
    jnp path (causal block skipping, `predicted_attention`); None = all queries in one block. predicted: the
    predicted stream's attention in the efficient form: "jnp" (plain autodiff, any second_order), "xla" /
    "pallas" / "triton" (`kernels.jvp_attention`: fused, with forward-mode rules; the kernels need
    EBTConfig.second_order="jvp" since their backward is not differentiable again), or None: "triton" on a GPU
    in jvp mode (measured), "jnp" otherwise ("pallas" is verified in interpret mode only: opt in on TPU).
    FLOPs beyond 6N as "attention": per stream token, observed causal S^2/2 + predicted S^2/2 + S self terms
    over 2S stream tokens.
    """

    kind: ClassVar[str] = "ebt_attention"

    form: str = "efficient"
    query_block: int | None = None
    predicted: str | None = None

    def validate(self) -> None:
        super().validate()
        require(self.form in ATTENTION_FORMS, "form", f"{self.form!r} is not one of {ATTENTION_FORMS}")
        require(self.predicted in (None, *PREDICTED_ATTENTION), "predicted",
                f"{self.predicted!r} is not one of None, {', '.join(map(repr, PREDICTED_ATTENTION))}")
        require(self.query_block is None or self.query_block >= 1, "query_block",
                f"must be >= 1 or None, got {self.query_block}")

    def predicted_implementation(self, second_order: str) -> str:
        """`predicted`, or for None: the fused Triton kernels on a GPU in jvp mode (measured fastest there,
        docs/notes/ebt.md) and jnp otherwise."""
        if self.predicted is not None:
            return self.predicted
        fused = second_order == "jvp" and common.backend() == "gpu"
        if fused and jvp_attention.choose_implementation(None, self.head_dim) == "triton":
            return "triton"
        return "jnp"

    def build(self, ctx: LayerContext, name: str) -> nn.Module:
        # EBTConfig.stack_config() resolves predicted=None for its second_order before the stack is built.
        return System2Attention(self, ctx.dtype, ctx.init_std, ctx.out_init_std, ctx.norm_eps, form=self.form,
                                query_block=self.query_block, predicted=self.predicted_implementation("reverse"),
                                name=name)


# --- config ----------------------------------------------------------------------------------------------
@config_class
class EBTConfig(DecoderConfig):
    """Autoregressive EBT: the DecoderConfig transformer fields plus the thinking settings (module doc).

    alpha_init / alpha_lr_scale: the learnable step size (clamped >= 1e-4) and its learning-rate multiplier.
    think_steps (+ U{0..think_steps_random} extra when training), step_size_spread s (U[alpha/s, s*alpha]
    per batch row and position; 1 = off), langevin_std (noise on the logits before each softmax, training
    only), loss_steps "last" (S2) | "all" (S1, with detach_chain), detach_earlier (second order only through
    the last step, the reference's --truncate_mcmc; see `think`), detach_chain (each step starts from the
    previous step's logits detached: the reference's default, its S1 runs), replay_size rows /
    replay_fraction of each batch, init_logit_std of y_0.
    alpha_learnable: False keeps alpha at alpha_init (the reference S2 runs use a fixed step size 5).
    time_embed: L > 0 adds the reference's thinking-step conditioning (ebt_type=time_embed): a learned
    embedding per landscape, prepended to the observed stream as a token every position attends to; step k
    uses landscape min(k, L-1) (L = the reference's mcmc_num_steps: 1 in its S2 runs). 0 = off.
    eval_think_steps: steps used by the eval loss (None = the trained maximum think_steps + think_steps_random);
    eval_report_steps N: the eval also reports loss_think1..loss_thinkN (one N-step run; 0 = off).
    infer_langevin_std: Langevin noise of `think` / `generate` (self-verification candidates), None = langevin_std
    (the reference falls back to its training noise when no inference noise is given).
    layer_pattern: System2AttentionConfig entries (form, query_block and the predicted stream's attention are
    set there), one form for all layers.
    second_order: how the loss differentiates the inner gradient: "reverse" (autodiff through the inner VJP)
    or "jvp" (custom VJP taking the gradient of a JVP: same gradients, no stored inner backward pass; XLA cost
    analysis of the gpu preset with 2 layers: temp 3.9 vs 9.0 GiB, bytes 41.9 vs 54.2 GB, FLOPs +26%).
    """

    layer_pattern: tuple[MixerConfig, ...] = dataclasses.field(default_factory=lambda: (System2AttentionConfig(),))
    second_order: str = "reverse"
    alpha_init: float = 10.0
    alpha_lr_scale: float = 30.0
    think_steps: int = 2
    think_steps_random: int = 0
    step_size_spread: float = 1.0
    langevin_std: float = 0.0
    loss_steps: str = "last"
    detach_earlier: bool = False
    detach_chain: bool = False
    replay_size: int = 0
    replay_fraction: float = 0.0
    init_logit_std: float = 1.0
    alpha_learnable: bool = True
    time_embed: int = 0
    eval_think_steps: int | None = None
    eval_report_steps: int = 8
    infer_langevin_std: float | None = None

    def validate(self) -> None:
        super().validate()
        require(self.loss_chunk == 0, "loss_chunk", "the EBT thinks over whole predicted distributions [B, S, V] "
                "(no chunked loss); set 0")
        kinds = [m.kind for m in self.layer_pattern]
        require(all(isinstance(m, System2AttentionConfig) for m in self.layer_pattern), "layer_pattern",
                f"an EBT needs System-2 attention in every layer (ebt_attention), got {kinds}")
        forms = sorted({m.form for m in self.layer_pattern})
        require(len(forms) == 1, "layer_pattern", f"all layers need one attention form, got {forms}")
        require(self.second_order in SECOND_ORDER_MODES, "second_order",
                f"{self.second_order!r} is not one of {SECOND_ORDER_MODES}")
        for i, m in enumerate(self.layer_pattern):
            require(m.predicted in (None, "jnp", "xla") or self.second_order == "jvp", f"layer_pattern.{i}.predicted",
                    f"{m.predicted!r} has fused first-order and forward-mode rules only: set model.second_order=jvp, "
                    "or use predicted=xla or jnp with second_order=reverse")
        require(self.alpha_init >= ALPHA_MIN, "alpha_init", f"must be >= {ALPHA_MIN}, got {self.alpha_init}")
        require(self.alpha_lr_scale > 0, "alpha_lr_scale", "must be > 0")
        require(self.think_steps >= 1, "think_steps", f"must be >= 1, got {self.think_steps}")
        require(self.think_steps_random >= 0, "think_steps_random", "must be >= 0")
        require(self.step_size_spread >= 1.0, "step_size_spread",
                f"must be >= 1 (1 = fixed step), got {self.step_size_spread}")
        require(self.langevin_std >= 0, "langevin_std", "must be >= 0")
        require(self.loss_steps in ("last", "all"), "loss_steps",
                f"{self.loss_steps!r} is not 'last' (S2) or 'all' (S1)")
        require(self.replay_size >= 0, "replay_size", "must be >= 0")
        require(0.0 <= self.replay_fraction <= 1.0, "replay_fraction", "must be in [0, 1]")
        require(self.replay_fraction == 0 or self.replay_size > 0, "replay_size",
                "replay_fraction > 0 needs replay_size > 0 (rows kept in the buffer)")
        require(self.init_logit_std > 0, "init_logit_std", "must be > 0")
        require(self.eval_think_steps is None or self.eval_think_steps >= 1, "eval_think_steps", "must be >= 1 or None")
        require(self.eval_report_steps >= 0, "eval_report_steps", "must be >= 0 (0 = no per-step eval losses)")
        require(self.time_embed >= 0, "time_embed", f"must be >= 0 (0 = off), got {self.time_embed}")
        require(self.infer_langevin_std is None or self.infer_langevin_std >= 0, "infer_langevin_std",
                "must be >= 0 or None (None = langevin_std)")

    def eval_steps(self) -> int:
        """Thinking steps of the eval loss and of `EBT.think` by default: eval_think_steps, else the trained
        maximum (the reference evaluates with its maximum random step count)."""
        return self.eval_think_steps or self.think_steps + self.think_steps_random

    def inference_noise(self) -> float:
        return self.langevin_std if self.infer_langevin_std is None else self.infer_langevin_std

    @property
    def attention_form(self) -> str:
        """The System-2 attention form of every layer ("efficient" or "dense")."""
        return self.layer_pattern[0].form

    def stack_config(self) -> "EBTConfig":
        """This config with every layer's predicted=None resolved for second_order (what the stack builds)."""
        pattern = tuple(dataclasses.replace(m, predicted=m.predicted_implementation(self.second_order))
                        for m in self.layer_pattern)
        return dataclasses.replace(self, layer_pattern=pattern)

    # the EBT fields that moved onto the System-2 attention kind -> their names there
    _LEGACY_ATTENTION_FIELDS: ClassVar[dict[str, str]] = {
        "attention_form": "form", "attention_query_block": "query_block", "predicted_attention": "predicted"}
    _LEGACY_KINDS: ClassVar[dict[str, tuple[str, str]]] = {
        **DecoderConfig._LEGACY_KINDS, "ebt_attention": ("models.ebt:System2AttentionConfig", "attention")}

    @classmethod
    def migrate_dict(cls, d: dict) -> dict:
        moved = {new: d.pop(old) for old, new in cls._LEGACY_ATTENTION_FIELDS.items() if old in d}
        d = super().migrate_dict(d)
        for entry in d.get("layer_pattern", ()):
            if isinstance(entry, dict) and entry.get("_type") == "models.ebt:System2AttentionConfig":
                entry.update(moved)
        return d

    def build(self) -> "EBT":
        return EBT(self)


# --- the energy model ----------------------------------------------------------------------------------
class EnergyTransformer(nn.Module):
    """(tokens int [B,S], probs float [B,S,V]) -> energy float32 [B,S]. Owns the learnable `alpha` param."""

    cfg: EBTConfig

    @nn.compact
    def __call__(self, tokens, probs, *, positions=None, segment_ids=None, train: bool = False,
                 phase: str = "both", landscape=0) -> jax.Array | None:
        """phase "both" (default), or for the efficient form "observe" (fills the `cache` collection from
        the tokens; returns None; probs unused) then "predict" (energies from the cache and probs).
        landscape (int, traced ok): the thinking-step embedding used when cfg.time_embed > 0."""
        cfg = self.cfg
        if phase not in ("both", "observe", "predict") or (phase != "both" and cfg.attention_form == "dense"):
            raise ValueError(f"EBT: phase must be 'both', 'observe' or 'predict' (the last two only for "
                             f"attention_form='efficient'), got {phase!r} with {cfg.attention_form!r}")
        if phase != "observe" and probs.shape != tokens.shape + (cfg.vocab_size,):
            raise ValueError(f"EBT: probs must be [B, S, vocab_size={cfg.vocab_size}] matching tokens {tokens.shape}, "
                             f"got {probs.shape}")
        self.param("alpha", param_init(nn.initializers.constant(cfg.alpha_init), (), weight_decay=False,
                                       lr_scale=cfg.alpha_lr_scale), (), jnp.float32)
        if positions is None:
            positions = default_positions(tokens)
        s = tokens.shape[1]
        embed = Embed(cfg.vocab_size, cfg.d_model, cfg.compute_dtype, cfg.init_std, name="embed")
        candidate_proj = Dense(cfg.d_model, ("vocab", "embed"), dtype=cfg.compute_dtype,
                               kernel_init=nn.initializers.normal(cfg.init_std), name="candidate_proj")
        stack = DecoderStack(cfg.stack_config(), name="stack")
        cd = cfg.compute_dtype
        obs = lambda: embed(tokens)
        pred = lambda: candidate_proj(probs).astype(cd)
        pos_o, pos_p, seg = positions, positions + 1, segment_ids
        if cfg.time_embed:
            # The reference's time_embed: a learned token per landscape opens the observed stream (position 0,
            # tokens at i+1, predictions at i+2). The predicted stream gets a zero placeholder in front so
            # prediction i still lines up with observed index i+1; the placeholder's output is dropped. The
            # token takes the segment id of the row's first token: in a packed row only the first document
            # attends to it (the reference has one sequence per row).
            b = tokens.shape[0]
            table = self.param("time_embed", param_init(nn.initializers.normal(cfg.init_std), (None, "embed")),
                               (cfg.time_embed, cfg.d_model), jnp.float32)
            lead = jnp.broadcast_to(table[jnp.asarray(landscape, jnp.int32)].astype(cd), (b, 1, cfg.d_model))
            obs = lambda: jnp.concatenate([lead, embed(tokens)], axis=1)
            pred = lambda: jnp.concatenate([jnp.zeros_like(lead), candidate_proj(probs).astype(cd)], axis=1)
            zero = jnp.zeros((b, 1), positions.dtype)
            pos_o = jnp.concatenate([zero, positions + 1], axis=1)
            pos_p = jnp.concatenate([zero + 1, positions + 2], axis=1)
            seg = None if seg is None else jnp.concatenate([seg[:, :1], seg], axis=1)
        n = pos_o.shape[1]  # S, or S + 1 with the time token
        if cfg.attention_form == "dense":
            x = jnp.concatenate([obs(), pred()], axis=1)
            pos2 = jnp.concatenate([pos_o, pos_p], axis=1)
            seg2 = None if seg is None else jnp.concatenate([seg, seg], axis=1)
            h = stack(x, positions=pos2, segment_ids=seg2, train=train)[:, n:]
        else:
            if phase != "predict":
                stack(obs(), positions=pos_o, segment_ids=seg, train=train)
            if phase == "observe":
                return None
            h = stack(pred(), positions=pos_p, segment_ids=seg, train=train)
        h = h[:, n - s:]
        e = Dense(1, ("embed", None), dtype=cfg.compute_dtype, out_dtype=jnp.float32,
                  kernel_init=nn.initializers.normal(cfg.init_std), name="energy_head")(h)
        return e[..., 0]


def alpha_value(params) -> jax.Array:
    """The clamped step size max(alpha, 1e-4) (float32 scalar)."""
    return jnp.maximum(params["alpha"], ALPHA_MIN)


@dataclasses.dataclass
class ThinkResult:
    logits: jax.Array  # [K, B, S, V]: y_1 .. y_K (after each step; inactive steps repeat the last active one)
    energies: jax.Array  # [K(+1), B, S]: E(p_0) .. E(p_{K-1}) (+ E(softmax(y_K)) when final_energy)


@dataclasses.dataclass(frozen=True)
class EnergyFn:
    """E(p) = fn(theta, aux, p) -> [B,S] with its differentiable inputs theta (params, cache) and its integer
    inputs aux (tokens, positions, segment_ids) explicit, so the inner gradient can carry its own VJP rule."""

    fn: Callable[[Any, Any, jax.Array], jax.Array]
    theta: Any
    aux: Any
    landscapes: int = 1  # > 1: aux is a dict whose "landscape" (int32 scalar) picks the thinking-step embedding

    def __call__(self, p: jax.Array) -> jax.Array:
        return self.fn(self.theta, self.aux, p)

    def at(self, k) -> "EnergyFn":
        """The energy used at thinking step k: landscape min(k, landscapes - 1), as the reference's
        time_embed model repeats extra steps on its final landscape."""
        if self.landscapes <= 1:
            return self
        return dataclasses.replace(self, aux={**self.aux, "landscape": jnp.minimum(k, self.landscapes - 1)})


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _inner_grad_jvp(fn, theta, aux, p):
    """(dE/dp with E summed over positions, E) whose VJP is the gradient of a JVP (reverse-over-forward)."""
    e, vjp = jax.vjp(lambda q: fn(theta, aux, q), p)
    return vjp(jnp.ones_like(e))[0], e


def _inner_grad_jvp_fwd(fn, theta, aux, p):
    return _inner_grad_jvp(fn, theta, aux, p), (theta, aux, p)


def _inner_grad_jvp_bwd(fn, res, cts):
    # <ct_g, dE/dp> = d/dt sum E(p + t ct_g): its gradient in (theta, p) is the second-order term, taken through
    # a forward-mode pass (recomputing E's forward) instead of through the stored inner backward pass.
    theta, aux, p = res
    ct_g, ct_e = cts

    def phi(theta, p):
        e, de = jax.jvp(lambda q: fn(theta, aux, q), (p,), (ct_g,))
        return jnp.sum(de) + jnp.sum(e * ct_e)

    with jvp_attention.forward_mode():  # fused attention must use its forward-mode rules in this trace
        d_theta, d_p = jax.grad(phi, argnums=(0, 1))(theta, p)
    d_aux = jax.tree.map(lambda x: np.zeros(x.shape, jax.dtypes.float0), aux)
    return d_theta, d_aux, d_p


_inner_grad_jvp.defvjp(_inner_grad_jvp_fwd, _inner_grad_jvp_bwd)
SECOND_ORDER_MODES = ("reverse", "jvp")


def think(energy_fn: Callable[[jax.Array], jax.Array], y0: jax.Array, alpha: jax.Array, num_steps: int, *,
          active_steps: jax.Array | None = None, step_scale: jax.Array | None = None, langevin_std: float = 0.0,
          rng: jax.Array | None = None, detach_earlier: bool = False, detach_chain: bool = False,
          final_energy: bool = False, second_order: str = "reverse") -> ThinkResult:
    """Runs eq. (1) num_steps times from logits y0 [B,S,V]. energy_fn(p [B,S,V]) -> [B,S].

    active_steps (traced int <= num_steps): later steps leave y unchanged (random step counts under jit).
    step_scale [B,S]: multiplies alpha per position. Differentiable (to second order) in everything.
    detach_earlier: second order only through the last active step (the reference's S2 `--truncate_mcmc`:
    earlier inner gradients dE/dp_k are constants to the outer gradient, `create_graph=False`), while the
    chain y_0 -> y_K stays attached (`--no_mcmc_detach`), so alpha and the softmax Jacobians of every step
    are still differentiated. Earlier steps then run as a first-order scan that stores no inner backward pass.
    detach_chain: every step starts from stop_gradient(y_k) (the reference's default between-step detach, its S1
    setting without `--no_mcmc_detach`): an outer gradient of step k's output reaches the parameters only through
    step k's own inner gradient (second order) and alpha, not through earlier steps.
    second_order: how an outer gradient differentiates the inner gradient dE/dp: "reverse" (autodiff through
    the inner VJP: stores the inner backward pass) or "jvp" (energy_fn must be an EnergyFn: the custom VJP
    `_inner_grad_jvp`, same values, less memory, one more energy forward per step).
    An EnergyFn with `landscapes` L > 1 (thinking-step conditioning) is evaluated at landscape min(k, L-1).
    """
    if second_order not in SECOND_ORDER_MODES:
        raise ValueError(f"think: second_order must be one of {SECOND_ORDER_MODES}, got {second_order!r}")
    if second_order == "jvp" and not isinstance(energy_fn, EnergyFn):
        raise ValueError("think: second_order='jvp' needs an EnergyFn (explicit theta/aux), got a plain callable")
    a = alpha if step_scale is None else alpha * step_scale[..., None]
    at = energy_fn.at if isinstance(energy_fn, EnergyFn) else (lambda k: energy_fn)

    def probs(y, k):
        z = y
        if langevin_std > 0:
            z = z + langevin_std * jax.random.normal(jax.random.fold_in(rng, k), y.shape, jnp.float32)
        return jax.nn.softmax(z, axis=-1)

    def full_grad(p, k):  # (dE/dp, E), differentiable to second order
        efn = at(k)
        if second_order == "jvp":
            return _inner_grad_jvp(efn.fn, efn.theta, efn.aux, p)
        e, vjp = jax.vjp(efn, p)
        return vjp(jnp.ones_like(e))[0], e

    def const_grad(p, k):  # (dE/dp, E) as constants: no second-order term, no stored inner backward pass
        efn = at(k)
        if isinstance(efn, EnergyFn):
            theta = jax.lax.stop_gradient(efn.theta)
            efn = functools.partial(efn.fn, theta, efn.aux)
        e, vjp = jax.vjp(efn, jax.lax.stop_gradient(p))
        return jax.lax.stop_gradient(vjp(jnp.ones_like(e))[0]), jax.lax.stop_gradient(e)

    def scan_steps(y, n, inner, active):
        def step(y, k):  # a lax.scan body: one compiled inner step whatever num_steps is
            p = probs(start(y), k)
            g, e = inner(p, k)
            y_new = p - a * g
            y = y_new if active is None else jnp.where(k < active, y_new, y)
            return y, (y, e)

        return jax.lax.scan(step, y, jnp.arange(n))

    start = jax.lax.stop_gradient if detach_chain else (lambda y: y)
    y0 = y0.astype(jnp.float32)
    if not detach_earlier:
        y, (ys, es) = scan_steps(y0, num_steps, full_grad, active_steps)
    else:
        last = num_steps - 1 if active_steps is None else active_steps - 1  # the last active step
        y, (ys_pre, es_pre) = scan_steps(y0, num_steps - 1, const_grad, last)
        p = probs(start(y), last)
        g, e_last = full_grad(p, last)
        y = p - a * g
        # steps from `last` on report the final logits and the last step's energy, as inactive steps do
        after = (jnp.arange(num_steps) >= last)[:, None, None, None]
        ys = jnp.where(after, y[None], jnp.concatenate([ys_pre, y[None]], axis=0))
        es = jnp.where(after[..., 0], e_last[None], jnp.concatenate([es_pre, e_last[None]], axis=0))
    if final_energy:
        es = jnp.concatenate([es, at(num_steps)(jax.nn.softmax(y, axis=-1))[None]], axis=0)
    return ThinkResult(ys, es)


# --- the Task ------------------------------------------------------------------------------------------
REPLAY_INT_KEYS = ("inputs", "targets", "positions", "segment_ids")


def replay_sample(buf: dict[str, jax.Array], n: int, rng: jax.Array) -> tuple[dict[str, jax.Array], jax.Array]:
    """n distinct rows drawn uniformly from the filled part of the replay ring (random.sample in the reference).
    buf: {inputs, targets, positions, segment_ids int32 [R,S], loss_mask [R,S], logits [R,S,V], count} ->
    (those rows, valid float32 [n]: 0 for rows not yet written, i.e. while fewer than n rows are filled)."""
    r = buf["logits"].shape[0]
    filled = jnp.minimum(buf["count"], r)  # the ring fills slots 0, 1, ... first
    keys = jnp.where(jnp.arange(r) < filled, jax.random.uniform(rng, (r,)), -1.0)
    idx = jax.lax.top_k(keys, n)[1]
    return {k: v[idx] for k, v in buf.items() if k != "count"}, (idx < filled).astype(jnp.float32)


def _inputs(batch: Batch) -> tuple[jax.Array, dict[str, Any]]:
    return batch["inputs"], {"positions": batch.get("positions"), "segment_ids": batch.get("segment_ids")}


class EBT(NextTokenTask):
    """axlearn_like Task for the autoregressive EBT (batch keys as models.lm.LanguageModel).

    Variables: 'params' (transformer, candidate_proj, energy_head, alpha, time_embed [L, D] when on) and
    'stats' {"replay": {inputs, targets, positions, segment_ids int32 [R, S], loss_mask float32 [R, S],
    logits float32 [R, S, V], count int32}} when replay_size R > 0 (checkpointed with the train state).
    """

    def __init__(self, cfg: EBTConfig):
        super().__init__(cfg)
        self.module = EnergyTransformer(cfg)

    # -- setup --
    def init(self, rng: jax.Array, batch: Batch) -> dict[str, Any]:
        tokens, kw = _inputs(batch)
        probs = jnp.zeros(tokens.shape + (self.cfg.vocab_size,), jnp.float32)
        variables = self.module.init({"params": rng}, tokens, probs, **kw)
        stats = {}
        if self.cfg.replay_size:
            r, s = self.cfg.replay_size, tokens.shape[1]
            stats["replay"] = {**{k: jnp.zeros((r, s), jnp.int32) for k in REPLAY_INT_KEYS},
                               "loss_mask": jnp.zeros((r, s), jnp.float32),
                               "logits": jnp.zeros((r, s, self.cfg.vocab_size), jnp.float32),
                               "count": jnp.zeros((), jnp.int32)}
        return {"params": variables["params"], "stats": stats, "carry": {}}

    def resettable_stats(self) -> dict[tuple[str, ...], str]:
        """The replay buffer is a training-time cache, not model state: a checkpoint holding another layout of it
        (e.g. written before rows were stored with their text: logits and count only) restores with it empty."""
        return {("replay",): "the replay buffer is a training-time cache, not model state: starting it empty"}

    def energy(self, params, tokens, probs, *, positions=None, segment_ids=None, landscape=0) -> jax.Array:
        """E(x, p): tokens [B,S], probs [B,S,V] -> float32 [B,S] (landscape: the time_embed step index)."""
        e, _ = self.module.apply({"params": params}, tokens, probs, positions=positions, segment_ids=segment_ids,
                                 landscape=landscape, mutable=["cache"])
        return e

    def _energy_fn(self, params, tokens, kw, candidates: int = 1) -> EnergyFn:
        """p [B,S,V] -> E [B,S] for fixed tokens. The efficient form runs the observed stream here, once (once
        per landscape with time_embed: the time token changes it), and each call (each thinking step) only the
        predicted stream against its cached keys/values. candidates G > 1: tokens / kw hold B rows and the
        energy takes G * B rows (G candidates per row, candidate-major as jnp.tile): the observed stream is still
        encoded once for the B rows, its keys/values shared by the candidates (self-verification)."""
        module, n_land = self.module, max(self.cfg.time_embed, 1)
        tile = lambda x, axis=0: x if candidates == 1 else jnp.concatenate([x] * candidates, axis=axis)
        aux = {"tokens": tile(tokens), "kw": {k: tile(v) for k, v in kw.items() if v is not None}}
        if self.cfg.time_embed:
            aux["landscape"] = jnp.zeros((), jnp.int32)
        land = lambda aux: aux.get("landscape", 0)
        if self.cfg.attention_form == "dense":
            dense = lambda theta, aux, p: self.energy(theta["params"], aux["tokens"], p, landscape=land(aux),
                                                      **aux["kw"])
            return EnergyFn(dense, {"params": params}, aux, n_land)
        caches = [module.apply({"params": params}, tokens, None, phase="observe", landscape=l, mutable=["cache"],
                               **kw)[1]["cache"] for l in range(n_land)]
        cache = caches[0] if not self.cfg.time_embed else jax.tree.map(lambda *c: jnp.stack(c), *caches)
        batch_axis = int(bool(self.cfg.time_embed)) + int(self.cfg.scan_layers)  # cache leaves: [(L,) (layers,) B, ...]
        cache = jax.tree.map(lambda x: tile(x, batch_axis), cache)

        def predict(theta, aux, p):
            c = theta["cache"]
            if self.cfg.time_embed:
                c = jax.tree.map(lambda x: x[aux["landscape"]], c)
            return module.apply({"params": theta["params"], "cache": c}, aux["tokens"], p, phase="predict",
                                landscape=land(aux), **aux["kw"])

        return EnergyFn(predict, {"params": params, "cache": cache}, aux, n_land)

    def initial_logits(self, rng: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        return self.cfg.init_logit_std * jax.random.normal(rng, shape + (self.cfg.vocab_size,), jnp.float32)

    # -- training --
    def loss(self, variables: dict[str, Any], batch: Batch, rng: jax.Array, *, train: bool):
        cfg = self.cfg
        params = variables["params"]
        stats = variables.get("stats", {}) or {}
        tokens, kw = _inputs(batch)
        targets, mask = batch["targets"], batch["loss_mask"].astype(jnp.float32)
        b, s = tokens.shape
        r_init, r_noise, r_scale, r_steps, r_replay = jax.random.split(rng, 5)
        y0 = self.initial_logits(r_init, (b, s))
        alpha = alpha_value(params)
        if not cfg.alpha_learnable:
            alpha = jax.lax.stop_gradient(alpha)
        metrics: dict[str, jax.Array] = {}
        replay = train and "replay" in stats
        n_re = min(int(round(cfg.replay_fraction * b)), cfg.replay_size) if replay else 0
        if n_re:
            # Replayed rows come back whole (tokens, targets, mask, positions, segments with their stored final
            # logits as y_0) and are appended to the fresh batch, as the reference's CausalReplayBuffer does.
            rows, valid = replay_sample(stats["replay"], n_re, r_replay)
            cat = lambda x, r: jnp.concatenate([x, r.astype(x.dtype)], axis=0)
            tokens, targets = cat(tokens, rows["inputs"]), cat(targets, rows["targets"])
            mask = cat(mask, rows["loss_mask"] * valid[:, None])
            kw = {k: None if v is None else cat(v, rows[k]) for k, v in kw.items()}
            y0 = cat(y0, rows["logits"])
            metrics["replay_rows"] = jnp.sum(valid)
        rows_all = tokens.shape[0]
        if train:
            max_steps = out_steps = cfg.think_steps + cfg.think_steps_random
            active = None
            if cfg.think_steps_random:
                active = jax.random.randint(r_steps, (), cfg.think_steps, max_steps + 1)
            spread = cfg.step_size_spread
            scale = None
            if spread > 1.0:
                scale = jax.random.uniform(r_scale, (rows_all, s), jnp.float32, 1.0 / spread, spread)
            noise = cfg.langevin_std
        else:  # evaluate at eval_steps(); one run long enough to also report losses after 1..eval_report_steps
            out_steps = cfg.eval_steps()
            max_steps, active, scale, noise = max(out_steps, cfg.eval_report_steps), None, None, 0.0
        res = think(self._energy_fn(params, tokens, kw), y0, alpha, max_steps, active_steps=active, step_scale=scale,
                    langevin_std=noise, rng=r_noise, detach_earlier=cfg.detach_earlier, detach_chain=cfg.detach_chain,
                    second_order=cfg.second_order)
        ce_rows = jnp.sum(cross_entropy(res.logits, targets[None])[0] * mask, axis=2)  # [K, rows]
        n_fresh, n_all = jnp.sum(mask[:b]), jnp.sum(mask)
        ce_fresh = jnp.sum(ce_rows[:, :b], axis=1) / jnp.maximum(n_fresh, 1.0)  # the reported loss
        ce_all = jnp.sum(ce_rows, axis=1) / jnp.maximum(n_all, 1.0)  # the trained loss (fresh + replayed rows)
        if not train or cfg.loss_steps == "last":
            total = ce_all[out_steps - 1]
        else:
            k = jnp.arange(max_steps)
            n_active = max_steps if active is None else active
            total = jnp.sum(jnp.where(k < n_active, ce_all, 0.0)) / n_active
        final = res.logits[out_steps - 1]
        fresh_mean = lambda x: jnp.sum(x[:b] * mask[:b]) / jnp.maximum(n_fresh, 1.0)
        metrics.update({
            "loss": ce_fresh[out_steps - 1], "total_loss": total, "tokens": n_fresh,
            "accuracy": fresh_mean((jnp.argmax(final, axis=-1) == targets).astype(jnp.float32)),
            "alpha": alpha, "ce_step1": ce_fresh[0],
            "energy_first": fresh_mean(res.energies[0]), "energy_last_step": fresh_mean(res.energies[out_steps - 1]),
        })
        if not train:
            metrics.update({f"loss_think{k + 1}": ce_fresh[k] for k in range(cfg.eval_report_steps)})
        new_stats = stats
        if replay:
            buf = stats["replay"]
            m = min(b, cfg.replay_size)
            idx = (buf["count"] + jnp.arange(m)) % cfg.replay_size
            pos, seg = kw.get("positions"), kw.get("segment_ids")
            fresh = {"inputs": batch["inputs"], "targets": batch["targets"], "loss_mask": batch["loss_mask"],
                     "positions": default_positions(batch["inputs"]) if pos is None else pos,
                     "segment_ids": jnp.ones_like(batch["inputs"]) if seg is None else seg,
                     "logits": jax.lax.stop_gradient(final)}
            new_stats = {**stats, "replay": {**{k: buf[k].at[idx].set(v[:m].astype(buf[k].dtype))
                                                for k, v in fresh.items()},
                                             "count": buf["count"] + m}}
        return total, metrics, {"stats": new_stats, "carry": variables.get("carry", {})}

    def flops_per_token(self, seq_len: int) -> float:
        """Estimate. Efficient form: the observed stream once (forward + backward, 6N per token) plus per
        inner step a predicted-stream forward (2N) and its input gradient (~2N), differentiated again by the
        outer backward (~2x that graph): 6N + 12N per step. Dense form: both streams every step, 24N per
        step. Attention score terms are counted the same way."""
        cfg = self.cfg
        n = self.param_count(seq_len) - cfg.vocab_size * cfg.d_model  # the embedding lookup is a gather
        steps = cfg.think_steps + cfg.think_steps_random / 2
        replayed = 1.0 + (cfg.replay_fraction if cfg.replay_size else 0.0)  # replayed rows ride along each batch
        # forward, per stream
        attn = sum(cfg.layer_kinds(i)[0].extra_flops(cfg.d_model, seq_len) for i in range(cfg.num_layers)) / 3
        if cfg.attention_form == "dense":
            return replayed * steps * 3 * 2 * (4.0 * n + 2 * attn)
        return replayed * (3 * (2.0 * n + attn) + steps * 3 * 2 * (2.0 * n + attn))

    # -- inference --
    def think(self, variables, tokens, rng, *, steps: int | None = None, num_candidates: int = 1,
              positions=None, segment_ids=None, langevin_std: float | None = None) -> dict[str, jax.Array]:
        """Thinking with `steps` (default: cfg.eval_steps(), the trained maximum) and self-verification over
        `num_candidates` random starts, with Langevin noise `langevin_std` on every step (default:
        cfg.inference_noise(); the reference infers with noise, which is what makes the candidates differ
        after the first step). tokens int [B,S] ->
          logits [B,S,V] (chosen candidate's final logits), energy [B,S] (its final energy),
          energies [steps+1, B, S] (its energy before each step and after the last), candidate int [B,S],
          candidate_energy [G, B, S] (final energy of every candidate).
        """
        steps = steps or self.cfg.eval_steps()
        langevin_std = self.cfg.inference_noise() if langevin_std is None else langevin_std
        if steps < 1 or num_candidates < 1:
            raise ValueError(f"think: steps and num_candidates must be >= 1, got {steps}, {num_candidates}")
        tokens = jnp.asarray(tokens, jnp.int32)
        if tokens.ndim != 2:
            raise ValueError(f"think: tokens must be int [B, S], got shape {tokens.shape}")
        params = variables["params"]
        return _think_jit(self, params, tokens, rng, positions, segment_ids, int(steps), int(num_candidates),
                          float(langevin_std))

    def step_losses(self, variables, batch: Batch, rng, steps: int, langevin_std: float = 0.0) -> jax.Array:
        """The thinking curve of one batch from one run: the loss-masked next-token CE summed over the batch after
        each of steps 1..`steps` -> float32 [steps]. One start per position, drawn from rng as `think` draws it,
        so entry k - 1 is the CE of think(steps=k) with langevin_std 0 (the noise-free eval's setting)."""
        tokens, kw = _inputs(batch)
        return _step_losses_jit(self, variables["params"], jnp.asarray(tokens, jnp.int32),
                                jnp.asarray(batch["targets"]), jnp.asarray(batch["loss_mask"], jnp.float32),
                                kw["positions"], kw["segment_ids"], rng, int(steps), float(langevin_std))

    def generate(self, variables, prompt_tokens, num_new: int, rng, temperature: float = 1.0,
                 top_k: int | None = None, *, steps: int | None = None, num_candidates: int = 1, **kw) -> jax.Array:
        """Samples num_new tokens after prompt_tokens [B,P] -> [B, P+num_new] (axlearn_like.task.Task.generate;
        kw: top_p, lengths, cached): each new token thinks `steps` steps (default: cfg.eval_steps()) with
        `num_candidates` and the inference Langevin noise, and is drawn from softmax(final logits / T) at the
        last written position. Cached (the default where `supports_cached_decoding`): the observed stream is
        encoded once into a KV cache and each new token thinks at its own position only; cached=False re-thinks
        the whole buffer per token (the same distribution, other random draws)."""
        steps = steps or self.cfg.eval_steps()
        return super().generate(variables, prompt_tokens, num_new, rng, temperature, top_k, steps=int(steps),
                                num_candidates=int(num_candidates), **kw)

    # -- cached decoding (axlearn_like.task.Task.prefill / decode_step) --
    @property
    def supports_cached_decoding(self) -> bool:
        """The efficient form with one observed stream (time_embed = 0: no per-landscape streams)."""
        return self.cfg.attention_form == "efficient" and not self.cfg.time_embed

    def init_cache(self, params, batch_size: int, max_len: int) -> dict:
        """Zero observed-stream KV caches for batch_size rows of max_len tokens (shapes traced, never run)."""
        if not self.supports_cached_decoding:
            raise NotImplementedError("EBT: cached decoding needs attention_form='efficient' and time_embed=0; "
                                      "use generate(..., cached=False)")
        tokens = jnp.zeros((batch_size, max_len), jnp.int32)
        shapes = jax.eval_shape(lambda p: self.module.apply({"params": p}, tokens, None, phase="observe",
                                                            mutable=["cache"])[1]["cache"], params)
        names = {"obs_key": "cached_key", "obs_value": "cached_value"}
        zeros = lambda d: {names.get(k, k): zeros(v) if isinstance(v, dict) else jnp.zeros(v.shape, v.dtype)
                           for k, v in d.items()}
        return zeros(shapes)

    def _observe_and_think(self, params, observed, tokens, positions, rng, steps, num_candidates):
        """Appends tokens [B, S] at positions [B, S] to the observed cache, then thinks at those positions
        (num_candidates starts each, the observed stream shared) -> (chosen logits [B, S, V], new cache)."""
        observed = self.module.apply({"params": params, "cache": observed}, tokens, None, phase="observe",
                                     positions=positions, mutable=["cache"])[1]["cache"]
        module, g = self.module, num_candidates
        tile = lambda x: jnp.concatenate([x] * g, axis=0)

        def predict(theta, aux, p):
            return module.apply({"params": theta["params"], "cache": theta["cache"]}, aux["tokens"], p,
                                phase="predict", positions=aux["positions"])

        efn = EnergyFn(predict, {"params": params, "cache": observed}, {"tokens": tile(tokens),
                                                                         "positions": tile(positions)})
        out = _think_candidates(self, efn, params, tokens.shape, rng, steps or self.cfg.eval_steps(), g,
                                self.cfg.inference_noise())
        return out["logits"], observed

    def prefill(self, variables, tokens, *, lengths=None, max_len=None, rng=None, steps=None, num_candidates=1):
        """Task.prefill: the prompt's observed stream into a KV cache with room for max_len tokens, and thinking
        at every prompt position (logits [B, S, V]; rows right-padded to `lengths`). rng: thinking's randomness
        (carried in the cache for the later steps)."""
        tokens = jnp.asarray(tokens, jnp.int32)
        b, s = tokens.shape
        observed = self.init_cache(variables["params"], b, s if max_len is None else int(max_len))
        lengths = jnp.full((b,), s, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
        rng, sub = jax.random.split(jax.random.key(0) if rng is None else rng)
        logits, observed = self._observe_and_think(variables["params"], observed, tokens, default_positions(tokens),
                                                   sub, steps, num_candidates)
        return logits, {"position": lengths, "observed": observed, "rng": rng}

    def decode_step(self, variables, tokens, cache, *, steps=None, num_candidates=1):
        """Task.decode_step: tokens [B, S] join the observed cache at each row's next positions; thinking runs at
        those S positions only (the observed stream is never re-encoded)."""
        tokens = jnp.asarray(tokens, jnp.int32)
        positions = cache["position"][:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
        rng, sub = jax.random.split(cache["rng"])
        logits, observed = self._observe_and_think(variables["params"], cache["observed"], tokens, positions, sub,
                                                   steps, num_candidates)
        return logits, {"position": cache["position"] + tokens.shape[1], "observed": observed, "rng": rng}

    def logits(self, variables, tokens, rng, *, steps: int, num_candidates: int) -> jax.Array:
        """The chosen candidate's final thinking logits float32 [B, S, V] (see `think`)."""
        return _think_impl(self, variables["params"], tokens, rng, None, None, steps, num_candidates,
                           self.cfg.inference_noise())["logits"]


def _think_impl(task: EBT, params, tokens, rng, positions, segment_ids, steps, g, langevin_std):
    kw = {"positions": positions, "segment_ids": segment_ids}
    # the observed stream is encoded once for the B rows and shared by the G candidates
    return _think_candidates(task, task._energy_fn(params, tokens, kw, candidates=g), params, tokens.shape, rng,
                             steps, g, langevin_std)


def _think_from_random_starts(task: EBT, energy_fn, params, rows: tuple[int, int], rng, steps, langevin_std,
                              final_energy: bool = False) -> ThinkResult:
    """`think` from y_0 = task.initial_logits for `rows` = (rows, S) (rng split into the start and the noise: one
    convention for EBT.think and EBT.step_losses, so equal rngs give equal runs)."""
    r_init, r_noise = jax.random.split(rng)
    return think(energy_fn, task.initial_logits(r_init, rows), alpha_value(params), steps, langevin_std=langevin_std,
                 rng=r_noise, final_energy=final_energy)


def _step_losses_impl(task: EBT, params, tokens, targets, mask, positions, segment_ids, rng, steps, langevin_std):
    energy_fn = task._energy_fn(params, tokens, {"positions": positions, "segment_ids": segment_ids})
    res = _think_from_random_starts(task, energy_fn, params, tokens.shape, rng, steps, langevin_std)
    return jnp.sum(cross_entropy(res.logits, targets[None])[0] * mask[None], axis=(1, 2))  # [steps]


_step_losses_jit = jax.jit(_step_losses_impl, static_argnums=(0, 8, 9))


def _think_candidates(task: EBT, energy_fn, params, shape, rng, steps, g, langevin_std):
    """Thinking from g random starts per position of a [B, S] batch (energy_fn takes the g * B rows,
    candidate-major) and self-verification (`EBT.think`'s result dict)."""
    b, s = shape
    res = _think_from_random_starts(task, energy_fn, params, (g * b, s), rng, steps, langevin_std, final_energy=True)
    final = res.logits[-1].reshape(g, b, s, -1)
    energies = res.energies.reshape(steps + 1, g, b, s)
    best = jnp.argmin(energies[-1], axis=0)  # [B,S]
    chosen = jnp.take_along_axis(final, best[None, :, :, None], axis=0)[0]
    chosen_e = jnp.take_along_axis(energies, best[None, None], axis=1)[:, 0]
    return {"logits": chosen, "energy": chosen_e[-1], "energies": chosen_e, "candidate": best,
            "candidate_energy": energies[-1]}


_think_jit = jax.jit(_think_impl, static_argnums=(0, 6, 7, 8))
