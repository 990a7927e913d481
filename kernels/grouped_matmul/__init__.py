"""Grouped (ragged) matmul for MoE experts: `grouped_matmul` (xla / pallas / triton) and its transposed form
(IMPLEMENTATIONS: the implementation names; OP picks)."""
from kernels.grouped_matmul.api import IMPLEMENTATIONS, OP, grouped_matmul, transposed_grouped_matmul

__all__ = ["IMPLEMENTATIONS", "OP", "grouped_matmul", "transposed_grouped_matmul"]
