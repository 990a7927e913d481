"""Grouped (ragged) matmul for MoE experts: `grouped_matmul` (xla / pallas / triton) and its transposed form."""
from kernels.grouped_matmul.api import grouped_matmul, transposed_grouped_matmul

__all__ = ["grouped_matmul", "transposed_grouped_matmul"]
