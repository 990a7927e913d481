"""Bidirectional EBT for continuous data (the paper's image denoising, Gladstone et al. 2025 Sec. 5).

An energy over a whole noisy image: the image [B, H, W] is cut into P x P patches (tokens of P*P pixels),
linearly embedded, read by the foundation's DecoderStack with the "bidir_attention" mixer registered here
(same Q/K/V/O + RoPE projections as models.ebt, full non-causal attention), and a Linear(D, 1) of the
mean-pooled hidden state gives E(x) [B]. Thinking is gradient descent on the image itself:
    x_0 = noisy image,   x_{k+1} = x_k - alpha * dE(x_k)/dx_k,  alpha learnable (clamped >= 1e-4)
trained with the MSE of x_K against the clean image (second-order through the inner gradients).
The same-size baseline ("denoiser") uses the identical transformer with a per-patch Linear(D, P*P) head
predicting a residual: x_hat = x + f(x), one forward pass.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from axlearn_like.config import config_class, require
from axlearn_like.params import param_init
from models.decoder import MIXERS, DecoderConfig, DecoderStack
from models.attention import Attention
from models.ebt import ALPHA_MIN
from models.layers import Dense


class BidirectionalAttention(Attention):
    """The "bidir_attention" mixer: full (non-causal) attention within each segment. [B,L,D] -> [B,L,D]."""

    def core(self, q, k, v, segment_ids):
        from models.attention import segment_mask

        mask = None if segment_ids is None else segment_mask(segment_ids)
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=False, implementation="xla")


MIXERS["bidir_attention"] = lambda cfg, i, name: BidirectionalAttention(
    cfg.attention, cfg.compute_dtype, cfg.init_std, cfg.out_init_std, cfg.norm_eps, name=name)


@config_class
class DenoiseConfig(DecoderConfig):
    """Patch transformer over images [B, image_size, image_size]; kind "ebt" (energy + thinking) or "denoiser"."""

    layer_pattern: tuple[str, ...] = ("bidir_attention",)
    kind: str = "ebt"
    image_size: int = 8
    patch_size: int = 2
    alpha_init: float = 1.0
    alpha_lr_scale: float = 10.0
    think_steps: int = 3

    def validate(self) -> None:
        super().validate()
        require(self.kind in ("ebt", "denoiser"), "kind", f"{self.kind!r} is not 'ebt' or 'denoiser'")
        require(self.image_size % self.patch_size == 0, "patch_size",
                f"image_size={self.image_size} must be a multiple of patch_size={self.patch_size}")
        require(all(k == "bidir_attention" for k in self.layer_pattern), "layer_pattern", "use bidir_attention layers")
        require(self.alpha_init >= ALPHA_MIN, "alpha_init", f"must be >= {ALPHA_MIN}")
        require(self.think_steps >= 1, "think_steps", "must be >= 1")


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
                         kernel_init=nn.initializers.normal(cfg.init_std), name="energy_head")(jnp.mean(h, axis=1))[:, 0]
        out = Dense(tokens.shape[-1], ("embed", None), out_dtype=jnp.float32, dtype=cfg.compute_dtype,
                    kernel_init=nn.initializers.zeros, name="pixel_head")(h)
        return x + from_patches(out, cfg.patch_size, x.shape[1])


def denoise(module: PatchTransformer, params: Any, noisy: jax.Array, steps: int | None = None) -> tuple[jax.Array, jax.Array]:
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
