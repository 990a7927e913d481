"""Grouped (ragged) matmul for MoE experts: `grouped_matmul` (xla / pallas / triton), its transposed form and
the fused SwiGLU gate+up pair `swiglu_grouped_matmul`."""
from kernels.grouped_matmul.api import grouped_matmul, swiglu_grouped_matmul, transposed_grouped_matmul

__all__ = ["grouped_matmul", "swiglu_grouped_matmul", "transposed_grouped_matmul"]
