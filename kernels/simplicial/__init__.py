"""2-simplicial attention (Roy et al. 2025): `two_simplicial_attention` with xla / pallas / triton / cudnn
implementations (IMPLEMENTATIONS: name -> backends it runs on)."""
from kernels.simplicial.api import IMPLEMENTATIONS, two_simplicial_attention

__all__ = ["IMPLEMENTATIONS", "two_simplicial_attention"]
