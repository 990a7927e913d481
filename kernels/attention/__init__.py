"""Causal grouped-query attention, `dot_product_attention` (xla: reference.py in jnp; cudnn: cuDNN flash attention
through jax.nn.dot_product_attention), the op behind models.attention and models.mla (IMPLEMENTATIONS: its
implementation names)."""
from kernels.attention.api import IMPLEMENTATIONS, OP, choose_implementation, dot_product_attention, segment_mask

__all__ = ["IMPLEMENTATIONS", "OP", "choose_implementation", "dot_product_attention", "segment_mask"]
