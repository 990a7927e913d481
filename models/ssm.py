"""Mamba-2 mixer (Dao & Gu 2024) with length-generalization initial states (Buitrago & Gu, arXiv 2507.02782).

Block (docs/equations.md §2), d_inner = expand * d_model, H = d_inner / head_dim heads, G groups, N = d_state:
    [z, xBC, dt_raw] = in_proj(u)                         z, x: [B,L,H*P]; B, C: [B,L,G*N]; dt_raw: [B,L,H]
    xBC = silu(causal_depthwise_conv1d(xBC))              width d_conv, per channel, with bias
    dt  = softplus(dt_raw + dt_bias);  A = -exp(A_log)
    y   = SSD(x, dt, A, B, C, D; h_{-1})              H_t = exp(dt_t A) H_{t-1} + dt_t x_t B_t^T, y_t = H_t C_t + D x_t
    out = out_proj(RMSNorm_per_group(y * silu(z)))

The initial state h_{-1} of a *training* apply is chosen by `Mamba2Config.initial_state`:
  zeros          h_{-1} = 0 (the standard recipe).
  random_noise   h_{-1} ~ N(0, noise_std^2) i.i.d.
  fitted_noise   h_{-1} ~ N(mean, std^2) i.i.d. with one mean/std per layer and head (the paper; or per (head,
                 P, N) entry with fitted_noise_scope="element"), fitted to the final states that sequences started
                 from h_{-1} = 0 reach: running moments in the `stats` collection (fs_count, fs_mean, fs_sq).
  state_passing  h_{-1} = the (gradient-stopped) final state of this batch row in the previous step, kept in
                 the `carry` collection.
  tbtt           like state_passing (plus the conv window), for data.mode="tbtt" where row r of step t+1 continues
                 row r of step t; a row whose first token starts a document (positions[:, 0] == 0) starts from 0.
Evaluation (train=False) always starts from zeros and never changes `stats` or `carry`.

With `track_states` (default) the moments and the last final states are recorded in every mode, so a
post-training stage can switch `initial_state` and resume the same run directory (same train-state tree).
The moments only ever see zero-initialised final states: the SSD is linear in h_{-1}, so an apply that started
from h0 records final - exp(sum_t dt_t A) h0 (exact); in tbtt mode, whose carried conv window is not linear,
only rows that restarted from zero are recorded. So fitted noise never fits its own noise.

Recurrent inference: when the caller makes the `cache` collection mutable, each mixer continues from its
cached conv window and SSM state and writes them back, so a sequence can be fed in pieces of any length
(chunked evaluation) or one token at a time (decode); see `decode_step`, `generate`, `chunked_logits`.
Packed rows (segment_ids from the data pipeline): by default (`document_reset=None`) a training/eval apply given
segment_ids restarts the recurrent state and the conv window at every real document start (kernels.ssd
segment_ids, on every implementation; conv taps reading an earlier document are zeroed), while padding (id 0)
continues the document before it: so packed rows isolate their documents exactly and a row holding one document
then padding (DataConfig.packing=False) computes what it did with no segment_ids. `True` also restarts at padding
runs (padding is a document of its own); `False` ignores segment_ids (documents share state and conv window).
The row's initial state (and tbtt's carried conv window) feed only its first document, and the carried/cached
final state is the last document's. Decode and chunked evaluation pass no segment_ids and are unchanged.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from axlearn_like.config import ConfigError, config_class, require
from axlearn_like.params import param_init
from kernels.ssd import IMPLEMENTATIONS as SSD_IMPLEMENTATIONS, OP as SSD_OP, ssd, ssd_step
from kernels.ssd.reference import document_index
from models.decoder import Decoder, DecoderConfig, unstack_layer_params
from models.kinds import LayerContext, MixerConfig, check_implementation
from models.layers import Dense

F32 = jnp.float32
INITIAL_STATES = ("zeros", "random_noise", "fitted_noise", "state_passing", "tbtt")
FITTED_NOISE_SCOPES = ("head", "element")


@config_class
class Mamba2Config(MixerConfig):
    """The "mamba2" mixer kind (`--set model.layer_pattern.mamba2.<field>=...`); recurrent.

    d_state N, head_dim P, expand (d_inner = expand * d_model), d_conv (conv width), ngroups (B/C groups),
    chunk_size (SSD chunk), dt init: dt ~ exp(U[log dt_min, log dt_max]) clamped >= dt_init_floor and
    dt_bias = softplus^-1(dt); A ~ U[A_init_range], A_log = log A. implementation: kernels.ssd implementation
    (None = per backend). initial_state / noise_std / stats_momentum / track_states: see the module doc
    (stats_momentum: EMA momentum of the fitted-noise moments; the first 1/(1-momentum) updates are a plain
    running mean so early statistics are unbiased). fitted_noise_scope: "head" (one Gaussian per layer and
    head, pooled over its P x N entries: the paper's IID fit) or "element" (one per (head, P, N) entry).

    document_reset: what an apply given segment_ids (packed rows) does at document starts. None (default): each
    real document starts from a zero SSM state and an empty conv window, exactly as if it were alone in its row
    (mamba_ssm's seq_idx); padding (id 0) continues the document before it, so rows of one document plus padding
    (unpacked data) compute as with no segment_ids, and packed data is isolated per document. True: the same, and
    padding runs restart too (a document of their own: the final state of a row ending in padding is then the
    padding's own). False: segment_ids are ignored (bit-identical to a mixer without them; documents leak state
    into the next one). Every kernels.ssd implementation takes the resets (the fused kernels mask per document;
    measured cost in docs/notes/ssd.md).
    """

    kind: ClassVar[str] = "mamba2"
    logical_axes: ClassVar[tuple[str, ...]] = ("embed", "mlp", "conv", "ssm_heads")
    recurrent: ClassVar[bool] = True
    decode_cache: ClassVar[bool] = True  # conv window + SSM state (the `cache` collection)

    d_state: int = 128
    head_dim: int = 64
    expand: int = 2
    d_conv: int = 4
    ngroups: int = 1
    chunk_size: int = 256
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dt_init_floor: float = 1e-4
    A_init_range: tuple[float, float] = (1.0, 16.0)
    implementation: str | None = None
    initial_state: str = "zeros"
    noise_std: float = 1.0
    stats_momentum: float = 0.99
    fitted_noise_scope: str = "head"
    track_states: bool = True
    document_reset: bool | None = None

    def validate(self) -> None:
        for key in ("d_state", "head_dim", "expand", "d_conv", "ngroups", "chunk_size"):
            require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        require(0 < self.dt_min <= self.dt_max, "dt_min",
                f"need 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")
        require(self.dt_init_floor > 0, "dt_init_floor", f"must be > 0, got {self.dt_init_floor}")
        lo, hi = self.A_init_range
        require(0 < lo <= hi, "A_init_range", f"need 0 < low <= high, got {self.A_init_range}")
        require(self.initial_state in INITIAL_STATES, "initial_state",
                f"{self.initial_state!r} is not one of {list(INITIAL_STATES)}")
        require(self.noise_std >= 0, "noise_std", f"must be >= 0, got {self.noise_std}")
        require(0 <= self.stats_momentum < 1, "stats_momentum", f"must be in [0, 1), got {self.stats_momentum}")
        require(self.fitted_noise_scope in FITTED_NOISE_SCOPES, "fitted_noise_scope",
                f"{self.fitted_noise_scope!r} is not one of {list(FITTED_NOISE_SCOPES)}")
        check_implementation(self.implementation, SSD_IMPLEMENTATIONS, "ssd")
        require(self.document_reset in (None, True, False), "document_reset",
                f"must be None (reset at real documents), True or False, got {self.document_reset!r}")
        # the op's own rule (kernels.ssd.OP.unsupported): a refusal that only segment_ids cause
        why = self.implementation is not None and SSD_OP.unsupported(self.implementation, segments=True)
        no_reset = why and why != SSD_OP.unsupported(self.implementation, segments=False)
        require(not (self.document_reset is not False and no_reset), "document_reset",
                f"the {self.implementation!r} SSD {why}; set implementation=None or document_reset=False")

    def dims(self, d_model: int) -> tuple[int, int]:
        """-> (d_inner, num_heads); ConfigError when d_model does not fit head_dim / ngroups."""
        d_inner = self.expand * d_model
        if d_inner % self.head_dim:
            raise ConfigError(f"head_dim: expand * d_model = {d_inner} is not a multiple of head_dim={self.head_dim}")
        heads = d_inner // self.head_dim
        if heads % self.ngroups:
            raise ConfigError(f"ngroups: {heads} heads are not a multiple of ngroups={self.ngroups}")
        return d_inner, heads

    def validate_in(self, ctx: LayerContext) -> None:
        self.dims(ctx.d_model)

    def build(self, ctx: LayerContext, name: str) -> nn.Module:
        return Mamba2(self, ctx.dtype, ctx.init_std, ctx.out_init_std, ctx.norm_eps, name=name)

    def extra_flops(self, d_model: int, seq_len: int) -> float:
        """Training FLOPs/token of the SSD beyond its parameters' 6N (chunked form, chunk Q = min(chunk, seq)):
        forward per token 2*G*Q*N/2 (C.B^T, causal) + 2*H*Q*P/2 (scores x X) + 2*H*P*N (chunk state) + 2*H*P*N
        (state output); x3 with backward."""
        _, H = self.dims(d_model)
        Q = min(self.chunk_size, seq_len)
        fwd = self.ngroups * Q * self.d_state + H * Q * self.head_dim + 4 * H * self.head_dim * self.d_state
        return 3.0 * fwd


# --------------------------------------------------------------------------------------------- init
def dt_bias_init(cfg: Mamba2Config):
    """dt = exp(U[log dt_min, log dt_max]) >= floor; returns softplus^-1(dt) = dt + log(-expm1(-dt))."""

    def init(key, shape, dtype=F32):
        u = jax.random.uniform(key, shape, F32)
        dt = jnp.exp(u * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
        dt = jnp.maximum(dt, cfg.dt_init_floor)
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)

    return init


def a_log_init(cfg: Mamba2Config):
    def init(key, shape, dtype=F32):
        lo, hi = cfg.A_init_range
        return jnp.log(jax.random.uniform(key, shape, F32, lo, hi)).astype(dtype)

    return init


def _uniform(bound: float):
    return lambda key, shape, dtype=F32: jax.random.uniform(key, shape, dtype, -bound, bound)


# ------------------------------------------------------------------------------------ fitted-noise stats
def update_moments(count, mean, sq, batch_states, momentum: float, weights=None):
    """Running first/second moments of final states [b, H, P, N] (stop-gradient), elementwise over [H, P, N].

    weights [b] (0/1, default all 1): the rows that enter this update; an update with no row changes nothing.
    w = max(1 / (count + 1), 1 - momentum): a plain running mean until 1/(1-momentum) updates, then an EMA.
    """
    s = jax.lax.stop_gradient(batch_states.astype(F32))
    rows = jnp.ones(s.shape[:1], F32) if weights is None else weights.astype(F32)
    n = jnp.sum(rows)
    bmean = jnp.einsum("b,bhpn->hpn", rows, s) / jnp.maximum(n, 1.0)
    bsq = jnp.einsum("b,bhpn->hpn", rows, jnp.square(s)) / jnp.maximum(n, 1.0)
    w = jnp.where(n > 0, jnp.maximum(1.0 / (count + 1.0), 1.0 - momentum), 0.0)
    return count + (n > 0).astype(F32), (1 - w) * mean + w * bmean, (1 - w) * sq + w * bsq


def fitted_noise_moments(mean, sq, scope: str = "head"):
    """(mean, std) of the fitted-noise initial state from the elementwise moments [H, P, N]: "head" pools
    each head's P x N entries (the paper's IID Gaussian per layer and head), "element" keeps one Gaussian
    per (head, P, N) entry. Broadcastable to [b, H, P, N]."""
    if scope == "head":
        mean, sq = jnp.mean(mean, axis=(1, 2), keepdims=True), jnp.mean(sq, axis=(1, 2), keepdims=True)
    return mean, jnp.sqrt(jnp.maximum(sq - jnp.square(mean), 0.0))


def zero_start_final_states(final, h0, dt, A, docs=None):
    """final [b, H, P, N] of an SSD apply that started from h0 ([b, H, P, N] or None) -> the final states the same
    rows reach from h_{-1} = 0. The recurrence is linear in h_{-1}: final = exp(sum_t dt_t A) h_{-1} + final|0,
    dt [b, L, H], A [H]; with a document reset (docs [b, L]) only a row whose last document is its first saw h0."""
    if h0 is None:
        return final
    decay = jnp.exp(jnp.sum(dt.astype(F32), axis=1) * A)  # [b, H]
    if docs is not None:
        decay = jnp.where((docs[:, -1] == 0)[:, None], decay, 0.0)
    return final - decay[:, :, None, None] * h0


# ------------------------------------------------------------------------------------------- the mixer
def causal_conv(x, w, bias, state=None, docs=None):
    """Depthwise causal conv: x [b, L, c], w [K, c], bias [c], state [b, K-1, c] (the K-1 previous inputs, 0 if
    None), docs int [b, L] | None (document index, kernels.ssd.reference.document_index: a tap reading another
    document's input is zeroed; the state's inputs count as document 0) -> (silu-free output [b, L, c] f32,
    new state = last K-1 inputs of concat(state, x))."""
    K = w.shape[0]
    b, L, c = x.shape
    if state is None:
        state = jnp.zeros((b, K - 1, c), x.dtype)
    xp = jnp.concatenate([state.astype(x.dtype), x], axis=1)  # [b, L+K-1, c]
    if docs is not None:
        dp = jnp.concatenate([jnp.zeros((b, K - 1), docs.dtype), docs], axis=1)
    out = bias.astype(F32)[None, None, :]
    for k in range(K):  # K is 4: K shifted multiply-adds beat a general conv on every backend
        tap = xp[:, k:k + L].astype(F32)
        if docs is not None and k < K - 1:
            tap = jnp.where((dp[:, k:k + L] == docs)[..., None], tap, 0.0)
        out = out + tap * w[k].astype(F32)
    return out, xp[:, L:]


class Mamba2(nn.Module):
    """The "mamba2" mixer: [B, L, D] -> [B, L, D] (see module doc). Variables:
    params  in_proj, conv_kernel [K, conv_dim], conv_bias, dt_bias [H], A_log [H], D [H], norm [d_inner], out_proj
    stats   fs_count [], fs_mean / fs_sq [H, P, N]  (fitted_noise or track_states)
    carry   ssm_state [B, H, P, N] (+ conv_state [B, K-1, conv_dim] for tbtt)  (state modes or track_states)
    cache   conv_state, ssm_state (only when the caller makes 'cache' mutable: recurrent inference)
    """

    cfg: Mamba2Config
    dtype: Any = jnp.bfloat16
    init_std: float = 0.02
    out_init_std: float = 0.02
    norm_eps: float = 1e-6

    @nn.compact
    def __call__(self, u, *, positions=None, segment_ids=None, train: bool = False):
        c = self.cfg
        decoding = self.is_mutable_collection("cache") and not self.is_initializing()
        pad = None
        if decoding and segment_ids is not None:  # cached decoding: segment id 0 marks right padding
            pad, segment_ids = segment_ids == 0, None
        if c.document_reset is False:
            segment_ids = None  # documents share state and conv window
        elif c.document_reset is None and segment_ids is not None:
            segment_ids = padding_continues(segment_ids)
        b, L, d_model = u.shape
        d_inner, H = c.dims(d_model)
        P, G, N, K = c.head_dim, c.ngroups, c.d_state, c.d_conv
        conv_dim = d_inner + 2 * G * N
        mode = c.initial_state

        zxbcdt = Dense(2 * d_inner + 2 * G * N + H, ("embed", "mlp"), dtype=self.dtype,
                       kernel_init=nn.initializers.normal(self.init_std), name="in_proj")(u)
        zxbcdt = checkpoint_name(zxbcdt, "ssm_in_proj")  # remat "save_named" keeps it: the block's widest GEMM
        z, xBC, dt_raw = jnp.split(zxbcdt, [d_inner, d_inner + conv_dim], axis=-1)
        bound = 1.0 / math.sqrt(K)  # PyTorch's default for a depthwise conv (fan_in = K)
        conv_w = self.param("conv_kernel", param_init(_uniform(bound), ("conv", "mlp")), (K, conv_dim), F32)
        conv_b = self.param("conv_bias", param_init(_uniform(bound), ("mlp",), weight_decay=False), (conv_dim,), F32)
        dt_bias = self.param("dt_bias", param_init(dt_bias_init(c), ("ssm_heads",), weight_decay=False), (H,), F32)
        A_log = self.param("A_log", param_init(a_log_init(c), ("ssm_heads",), weight_decay=False), (H,), F32)
        D = self.param("D", param_init(nn.initializers.ones, ("ssm_heads",), weight_decay=False), (H,), F32)

        if decoding and train:
            raise ValueError("Mamba2: the 'cache' collection is for inference; call with train=False")
        init_state = conv_state = None
        if decoding:
            cache_conv = self.variable("cache", "conv_state", jnp.zeros, (b, K - 1, conv_dim), self.dtype)
            cache_ssm = self.variable("cache", "ssm_state", jnp.zeros, (b, H, P, N), F32)
            conv_state, init_state = cache_conv.value, cache_ssm.value

        # Training-state buffers exist in every mode when track_states, so stage 2 can switch modes on resume.
        want_stats = mode == "fitted_noise" or c.track_states
        want_carry = mode in ("state_passing", "tbtt") or c.track_states
        touch = train or self.is_initializing()
        stats = carry = carry_conv = None
        if touch and want_stats:
            stats = (self.variable("stats", "fs_count", jnp.zeros, (), F32),
                     self.variable("stats", "fs_mean", jnp.zeros, (H, P, N), F32),
                     self.variable("stats", "fs_sq", jnp.zeros, (H, P, N), F32))
        if touch and want_carry:
            carry = self.variable("carry", "ssm_state", jnp.zeros, (b, H, P, N), F32)
            if mode == "tbtt":
                carry_conv = self.variable("carry", "conv_state", jnp.zeros, (b, K - 1, conv_dim), F32)

        if train:
            init_state, conv_state = self._training_initial_state(mode, (b, H, P, N), stats, carry, carry_conv,
                                                                  positions)

        docs = None if segment_ids is None else document_index(segment_ids)
        xBC_conv, new_conv_state = causal_conv(xBC, conv_w, conv_b, conv_state, docs)
        xBC_act = nn.silu(xBC_conv).astype(self.dtype)
        x, Bm, Cm = jnp.split(xBC_act, [d_inner, d_inner + G * N], axis=-1)
        x = nn.with_logical_constraint(x.reshape(b, L, H, P), ("batch", "length", "ssm_heads", "head_dim"))
        Bm, Cm = Bm.reshape(b, L, G, N), Cm.reshape(b, L, G, N)
        dt = jax.nn.softplus(dt_raw.astype(F32) + dt_bias)  # [b, L, H]
        if pad is not None:  # padding leaves the state as it is (dt = 0: no decay, no input) ...
            dt = jnp.where(pad[..., None], 0.0, dt)
            # ... and the conv window ends at each row's last real token
            xp = jnp.concatenate([conv_state.astype(xBC.dtype), xBC], axis=1)
            last = jnp.sum(~pad, axis=1, dtype=jnp.int32)[:, None] + jnp.arange(K - 1)[None, :]
            new_conv_state = jnp.take_along_axis(xp, last[:, :, None], axis=1)
        A = -jnp.exp(A_log)
        if decoding and L == 1:
            y, final = ssd_step(init_state, x[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0], D)
            y = y[:, None]
        else:
            y, final = ssd(x, dt, A, Bm, Cm, chunk_size=c.chunk_size, D=D,
                           initial_state=init_state, return_final_state=True, implementation=c.implementation,
                           segment_ids=segment_ids)

        if decoding:
            cache_conv.value = new_conv_state.astype(self.dtype)
            cache_ssm.value = final
        if train and stats is not None:
            # Fitted noise is fitted to the states zero-initialised sequences reach (the paper records them in
            # pretraining): take out this apply's own initial state, so noise-started states never feed back.
            clean = zero_start_final_states(final, init_state, dt, A, docs)
            rows = None
            if conv_state is not None:  # tbtt: a carried conv window is not linear in the inputs; keep rows that
                # restarted (first token opens a document) or whose last document began after a reset
                rows = positions[:, 0] == 0 if positions is not None else jnp.zeros((b,), bool)
                if docs is not None:
                    rows = rows | (docs[:, -1] > 0)
            cnt, mean, sq = update_moments(stats[0].value, stats[1].value, stats[2].value, clean, c.stats_momentum,
                                           rows)
            stats[0].value, stats[1].value, stats[2].value = cnt, mean, sq
        if train and carry is not None:
            carry.value = jax.lax.stop_gradient(final)
            if carry_conv is not None:
                carry_conv.value = jax.lax.stop_gradient(new_conv_state.astype(F32))

        y = y.reshape(b, L, d_inner).astype(F32) * nn.silu(z.astype(F32))
        yg = y.reshape(b, L, G, d_inner // G)  # gated RMSNorm per group (norm_before_gate=False)
        yg = yg * jax.lax.rsqrt(jnp.mean(jnp.square(yg), axis=-1, keepdims=True) + self.norm_eps)
        norm_w = self.param("norm", param_init(nn.initializers.ones, ("mlp",), weight_decay=False), (d_inner,), F32)
        y = (yg.reshape(b, L, d_inner) * norm_w).astype(self.dtype)
        y = nn.with_logical_constraint(y, ("batch", "length", "mlp"))
        out = Dense(d_model, ("mlp", "embed"), dtype=self.dtype,
                    kernel_init=nn.initializers.normal(self.out_init_std), name="out_proj")(y)
        return nn.with_logical_constraint(out, ("batch", "length", "embed"))

    def _training_initial_state(self, mode, shape, stats, carry, carry_conv, positions):
        """-> (h_{-1} [b, H, P, N] f32 or None, conv window or None) for a training apply (stop-gradient)."""
        c = self.cfg
        if mode == "zeros":
            return None, None
        if mode == "random_noise":
            return c.noise_std * jax.random.normal(self.make_rng("dropout"), shape, F32), None
        if mode == "fitted_noise":
            cnt, mean, sq = (v.value for v in stats)
            mean, std = fitted_noise_moments(mean, sq, c.fitted_noise_scope)
            noise = mean + std * jax.random.normal(self.make_rng("dropout"), shape, F32)
            return jax.lax.stop_gradient(jnp.where(cnt > 0, noise, 0.0)), None
        h0 = jax.lax.stop_gradient(carry.value)
        if mode == "state_passing":
            return h0, None
        # tbtt: a row whose first token opens a document (or a new epoch's stream) starts from zero.
        keep = jnp.ones((shape[0],), F32) if positions is None else (positions[:, 0] != 0).astype(F32)
        conv = jax.lax.stop_gradient(carry_conv.value) * keep[:, None, None]
        return h0 * keep[:, None, None, None], conv.astype(self.dtype)


def padding_continues(segment_ids):
    """int [b, L] -> int32 [b, L] with every padding id 0 replaced by the last nonzero id before it (leading padding
    stays 0): the resets of document_reset=None, where padding belongs to the document it follows."""
    seg = jnp.asarray(segment_ids).astype(jnp.int32)
    pos = jnp.arange(seg.shape[1], dtype=jnp.int32)
    last = jax.lax.cummax(jnp.where(seg != 0, pos, -1), axis=1)  # the last real position so far
    return jnp.where(last >= 0, jnp.take_along_axis(seg, jnp.maximum(last, 0), axis=1), 0)


# ------------------------------------------------------------------------------- recurrent inference API
def supports_recurrent_decode(cfg: DecoderConfig) -> bool:
    """True when every mixer carries its context in a fixed-size state (e.g. pure Mamba-2 stacks)."""
    return cfg.recurrent


def _unscanned(lm, variables: dict) -> tuple[nn.Module, dict]:
    """(Decoder module, {'params', 'stats'}) in the unscanned layout (the cache needs per-layer variables)."""
    cfg = lm.cfg
    if not supports_recurrent_decode(cfg):
        kinds = [m.kind for m in cfg.layer_pattern]
        raise ValueError(f"recurrent decode needs recurrent mixers only (e.g. a pure 'mamba2' layer_pattern), got "
                         f"{kinds}; use LanguageModel.generate (full recompute) for models with attention")
    keep = {k: variables[k] for k in ("params", "stats") if k in variables}
    if not cfg.scan_layers:
        return lm.module, keep
    flat = dataclasses.replace(cfg, scan_layers=False)
    return Decoder(flat), {k: unstack_layer_params(v, cfg) for k, v in keep.items()}


def decode_step(lm, variables: dict, tokens: jax.Array, cache: dict | None = None):
    """Feeds tokens int32 [B, S] (S >= 1) continuing from `cache` (None: an empty context) through a pure
    Mamba-2 LanguageModel (`lm = cfg.build()`). Returns (float32 logits [B, S, V], new cache).

    S == 1 runs the one-token recurrence (kernels.ssd.ssd_step); S > 1 runs the parallel SSD from the cached
    state, so prefill, chunked evaluation and decode are the same call. Jit it with `lm` static.
    """
    module, variables = _unscanned(lm, variables)
    tokens = jnp.asarray(tokens, jnp.int32)
    if cache is not None:
        variables = {**variables, "cache": cache}
    logits, mutated = module.apply(variables, tokens, train=False, mutable=["cache"])
    return logits, mutated["cache"]


@functools.partial(jax.jit, static_argnums=(0,))
def _decode_jit(lm, variables, tokens, cache):
    return decode_step(lm, variables, tokens, cache)


@functools.partial(jax.jit, static_argnums=(0,))
def _prefill_jit(lm, variables, tokens):
    return decode_step(lm, variables, tokens, None)


def chunked_logits(lm, variables: dict, tokens, chunk: int, callback=None) -> np.ndarray:
    """float32 logits [B, T, V] of tokens [B, T] computed `chunk` tokens at a time with the carried recurrent
    state (memory independent of T); callback(logits_chunk [B, c, V], start) may consume each piece instead
    (then nothing is kept and None is returned). Models with attention fall back to one full forward."""
    tokens = np.asarray(tokens, np.int32)
    T = tokens.shape[1]
    if not supports_recurrent_decode(lm.cfg):
        logits = np.asarray(jax.jit(lambda v, t: lm.module.apply(v, t, train=False, mutable=["intermediates"])[0])(
            {k: variables[k] for k in ("params", "stats") if k in variables}, tokens))
        if callback is None:
            return logits
        callback(logits, 0)
        return None
    pieces, cache = [], None
    for start in range(0, T, chunk):
        piece = tokens[:, start:start + chunk]
        logits, cache = (_prefill_jit(lm, variables, piece) if cache is None
                         else _decode_jit(lm, variables, piece, cache))
        if callback is None:
            pieces.append(np.asarray(logits))
        else:
            callback(np.asarray(logits), start)
    return np.concatenate(pieces, axis=1) if callback is None else None


def generate(lm, variables: dict, prompt_tokens, num_new: int, rng, temperature: float = 1.0,
             top_k: int | None = None) -> jax.Array:
    """Recurrent sampling: prefill the prompt int32 [B, P] once, then one `decode_step` per new token.
    Returns int32 [B, P + num_new]: `lm.generate(..., cached=True)` (axlearn_like.task.Task.generate)."""
    return lm.generate(variables, prompt_tokens, num_new, rng, temperature, top_k, cached=True)
