"""2-simplicial attention (Roy et al. 2025): `two_simplicial_attention` with xla / pallas / triton kernels."""
from kernels.simplicial.api import two_simplicial_attention

__all__ = ["two_simplicial_attention"]
