"""Bidirectional EBT for continuous data (the paper's image denoising, Gladstone et al. 2025 Sec. 5).

An energy over a whole noisy image: the image [B, H, W] is cut into P x P patches (tokens of P*P pixels),
linearly embedded, read by the foundation's DecoderStack with the "bidir_attention" mixer kind defined here
(same Q/K/V/O + RoPE projections as models.ebt, full non-causal attention), and a Linear(D, 1) of the
mean-pooled hidden state gives E(x) [B]. Thinking is gradient descent on the image itself:
    x_0 = noisy image,   x_{k+1} = x_k - alpha * dE(x_k)/dx_k,  alpha learnable (clamped >= 1e-4)
trained with the MSE of x_K against the clean image (second-order through the inner gradients).
The same-size baseline ("denoiser") uses the identical transformer with a per-patch Linear(D, P*P) head
predicting a residual: x_hat = x + f(x), one forward pass.
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

from axlearn_like.config import config_class, require
from axlearn_like.params import param_init
from axlearn_like.task import SampleConfig, Task
from models.attention import Attention, AttentionConfig, segment_mask
from models.decoder import DecoderConfig, DecoderStack
from models.ebt import ALPHA_MIN
from models.kinds import LayerContext, MixerConfig
from models.layers import Dense


class BidirectionalAttention(Attention):
    """The "bidir_attention" mixer: full (non-causal) attention within each segment. [B,L,D] -> [B,L,D]."""

    def core(self, q, k, v, segment_ids):
        mask = None if segment_ids is None else segment_mask(segment_ids)
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=False, implementation="xla")


@config_class
class BidirectionalAttentionConfig(AttentionConfig):
    """The "bidir_attention" mixer kind: AttentionConfig's projections, full attention (no causal mask)."""

    kind: ClassVar[str] = "bidir_attention"

    def build(self, ctx: LayerContext, name: str) -> nn.Module:
        return BidirectionalAttention(self, ctx.dtype, ctx.init_std, ctx.out_init_std, ctx.norm_eps, name=name)

    def extra_flops(self, d_model: int, seq_len: int) -> float:
        """q.k and p.v over all seq_len keys: 2 matmuls x 2 FLOPs x seq_len x H*D_h per token, x3 with backward."""
        del d_model
        return 12.0 * seq_len * self.num_heads * self.head_dim


@config_class
class DenoiseConfig(DecoderConfig):
    """Patch transformer over images [B, image_size, image_size]; kind "ebt" (energy + thinking) or "denoiser"."""

    layer_pattern: tuple[MixerConfig, ...] = dataclasses.field(
        default_factory=lambda: (BidirectionalAttentionConfig(),))
    kind: str = "ebt"
    image_size: int = 8
    patch_size: int = 2
    alpha_init: float = 1.0
    alpha_lr_scale: float = 10.0
    think_steps: int = 3
    noise_std: float = 0.2
    sample: SampleConfig = dataclasses.field(default_factory=lambda: SampleConfig(tokens=0))  # images: no text

    _LEGACY_KINDS: ClassVar[dict[str, tuple[str, str]]] = {
        **DecoderConfig._LEGACY_KINDS,
        "bidir_attention": ("models.ebt_denoise:BidirectionalAttentionConfig", "attention"),
    }

    def validate(self) -> None:
        super().validate()
        require(self.loss_chunk == 0, "loss_chunk", "the denoiser's loss is not a token cross-entropy; set 0")
        require(self.kind in ("ebt", "denoiser"), "kind", f"{self.kind!r} is not 'ebt' or 'denoiser'")
        require(self.image_size % self.patch_size == 0, "patch_size",
                f"image_size={self.image_size} must be a multiple of patch_size={self.patch_size}")
        require(all(isinstance(m, BidirectionalAttentionConfig) for m in self.layer_pattern), "layer_pattern",
                f"use bidir_attention layers, got {[m.kind for m in self.layer_pattern]}")
        require(self.alpha_init >= ALPHA_MIN, "alpha_init", f"must be >= {ALPHA_MIN}")
        require(self.think_steps >= 1, "think_steps", "must be >= 1")
        require(self.noise_std > 0, "noise_std", f"must be > 0, got {self.noise_std}")

    def build(self) -> "DenoiseTask":
        return DenoiseTask(self)


def to_patches(x: jax.Array, p: int) -> jax.Array:
    b, h, w = x.shape
    return x.reshape(b, h // p, p, w // p, p).transpose(0, 1, 3, 2, 4).reshape(b, (h // p) * (w // p), p * p)


def from_patches(t: jax.Array, p: int, h: int) -> jax.Array:
    b = t.shape[0]
    n = h // p
    return t.reshape(b, n, n, p, p).transpose(0, 1, 3, 2, 4).reshape(b, h, h)


class PatchTransformer(nn.Module):
    """images [B,H,W] -> energy [B] (kind "ebt") or the denoised image [B,H,W] (kind "denoiser")."""

    cfg: DenoiseConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        if cfg.kind == "ebt":
            self.param("alpha", param_init(nn.initializers.constant(cfg.alpha_init), (), weight_decay=False,
                                           lr_scale=cfg.alpha_lr_scale), (), jnp.float32)
        tokens = to_patches(x.astype(jnp.float32), cfg.patch_size)
        h = Dense(cfg.d_model, (None, "embed"), dtype=cfg.compute_dtype, use_bias=True,
                  kernel_init=nn.initializers.normal(0.5), name="patch_embed")(tokens)
        pos = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape[:2])
        h = DecoderStack(cfg, name="stack")(h, positions=pos)
        if cfg.kind == "ebt":
            return Dense(1, ("embed", None), out_dtype=jnp.float32, dtype=cfg.compute_dtype,
                         kernel_init=nn.initializers.normal(cfg.init_std),
                         name="energy_head")(jnp.mean(h, axis=1))[:, 0]
        out = Dense(tokens.shape[-1], ("embed", None), out_dtype=jnp.float32, dtype=cfg.compute_dtype,
                    kernel_init=nn.initializers.zeros, name="pixel_head")(h)
        return x + from_patches(out, cfg.patch_size, x.shape[1])


def denoise(
    module: PatchTransformer, params: Any, noisy: jax.Array, steps: int | None = None
) -> tuple[jax.Array, jax.Array]:
    """-> (denoised images [B,H,W], energies [steps+1, B] (zeros for the denoiser)). EBT: `steps` of
    x <- x - alpha * dE/dx from the noisy image (default cfg.think_steps); differentiable to second order."""
    cfg = module.cfg
    if cfg.kind == "denoiser":
        return module.apply({"params": params}, noisy), jnp.zeros((1, noisy.shape[0]))
    alpha = jnp.maximum(params["alpha"], ALPHA_MIN)
    efn = lambda x: module.apply({"params": params}, x)

    def step(x, _):
        e, vjp = jax.vjp(efn, x)
        (g,) = vjp(jnp.ones_like(e))
        return x - alpha * g, e

    x, es = jax.lax.scan(step, noisy.astype(jnp.float32), None, length=steps or cfg.think_steps)
    return x, jnp.concatenate([es, efn(x)[None]], axis=0)


# --- the Task ------------------------------------------------------------------------------------------
def psnr(x, clean) -> float:
    """10 log10(1 / MSE) in dB of images x (clipped to [0, 1]) against clean images in [0, 1]."""
    mse = float(np.mean((np.clip(np.asarray(x, np.float64), 0, 1) - np.asarray(clean, np.float64)) ** 2))
    return 10 * math.log10(1.0 / mse)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _denoise_jit(task: "DenoiseTask", params, noisy, steps):
    return denoise(task.module, params, noisy, steps)


class DenoiseTask(Task):
    """axlearn_like Task for both kinds. Batch (axlearn_like.data.images): "images" float32 [B, H, W] in [0, 1],
    "weights" float32 [B]. Training: noisy = images + noise_std * N(0, 1) (fresh per step), loss = the
    weighted mean over images of mean((denoise(noisy) - images)^2) (metric "loss"; "tokens" = sum of weights).
    The eval hook reports PSNR on the whole eval split at noise_std and 2 x noise_std (fixed noise), and for
    the EBT also with twice the thinking steps and its mean energy after each step."""

    def __init__(self, cfg: DenoiseConfig):
        super().__init__(cfg)
        self.module = PatchTransformer(cfg)

    def example_batch(self, batch_size: int, seq_len: int) -> dict[str, jax.Array]:
        del seq_len  # images are image_size x image_size
        n = self.cfg.image_size
        return {"images": jnp.zeros((batch_size, n, n), jnp.float32), "weights": jnp.ones((batch_size,), jnp.float32)}

    def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> dict[str, Any]:
        return {"params": self.module.init(rng, batch["images"])["params"], "stats": {}, "carry": {}}

    def loss(self, variables: dict[str, Any], batch: dict[str, jax.Array], rng: jax.Array, *, train: bool):
        del train  # the same objective; eval runs with the trainer's fixed eval key
        clean, w = batch["images"].astype(jnp.float32), batch["weights"].astype(jnp.float32)
        noisy = clean + self.cfg.noise_std * jax.random.normal(rng, clean.shape, jnp.float32)
        params = variables["params"]
        x, energies = denoise(self.module, params, noisy)
        n = jnp.sum(w)
        mse = jnp.sum(jnp.mean(jnp.square(x - clean), axis=(1, 2)) * w) / jnp.maximum(n, 1.0)
        metrics = {"loss": mse, "tokens": n}
        if self.cfg.kind == "ebt":
            metrics["alpha"] = jnp.maximum(params["alpha"], ALPHA_MIN)
            metrics["energy_first"] = jnp.sum(energies[0] * w) / jnp.maximum(n, 1.0)
            metrics["energy_last"] = jnp.sum(energies[-1] * w) / jnp.maximum(n, 1.0)
        return mse, metrics, {"stats": variables.get("stats", {}), "carry": variables.get("carry", {})}

    def tokens_per_example(self, data: Any) -> int:
        return (self.cfg.image_size // self.cfg.patch_size) ** 2

    def flops_per_token(self, seq_len: int) -> float:
        """Parameter FLOPs per patch token (attention scores over (H/P)^2 tokens are left out). Denoiser: 6N.
        EBT: each thinking step is a forward (2N) and an input gradient (2N), differentiated again by the
        outer backward (x3): 12N per step."""
        del seq_len
        n = self.param_count()
        return 6.0 * n if self.cfg.kind == "denoiser" else 12.0 * n * self.cfg.think_steps

    def eval_hook(self, cfg: Any, variables: dict[str, Any], step: int) -> dict[str, float]:
        del step
        clean = cfg.data.split("eval")
        noise = np.random.default_rng([cfg.data.seed, 1]).standard_normal(clean.shape).astype(np.float32)
        params, k = variables["params"], self.cfg.think_steps
        out: dict[str, float] = {}
        for m in (1, 2):
            noisy = clean + m * self.cfg.noise_std * noise
            out[f"psnr_noisy_{m}x"] = psnr(noisy, clean)
            x, energies = _denoise_jit(self, params, jnp.asarray(noisy), k)
            out[f"psnr_{m}x"] = psnr(x, clean)
            if self.cfg.kind == "ebt":
                x2, _ = _denoise_jit(self, params, jnp.asarray(noisy), 2 * k)
                out[f"psnr_{m}x_2x_steps"] = psnr(x2, clean)
                for i, e in enumerate(np.asarray(energies).mean(-1)):
                    out[f"energy_{m}x/step_{i}"] = float(e)
        if self.cfg.kind == "ebt":
            out["alpha"] = float(jnp.maximum(params["alpha"], ALPHA_MIN))
        return out

    def describe_eval(self, ev: dict[str, float]) -> str:
        return (f"mse {ev['loss']:.5f}, PSNR {ev['psnr_1x']:.2f} dB at sigma={self.cfg.noise_std}, "
                f"{ev['psnr_2x']:.2f} dB at {2 * self.cfg.noise_std:g}")

