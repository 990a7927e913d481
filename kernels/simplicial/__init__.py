"""2-simplicial attention (Roy et al. 2025): `two_simplicial_attention` with xla / pallas / triton / cudnn
implementations (IMPLEMENTATIONS: the implementation names; OP picks)."""
from kernels.simplicial.api import IMPLEMENTATIONS, OP, two_simplicial_attention

__all__ = ["IMPLEMENTATIONS", "OP", "two_simplicial_attention"]
