"""Mamba-2 SSD scan (state-space duality): chunked parallel form for training, one-step form for decode
(IMPLEMENTATIONS: the implementation names; OP picks)."""
from kernels.ssd.api import IMPLEMENTATIONS, OP, ssd, ssd_step

__all__ = ["IMPLEMENTATIONS", "OP", "ssd", "ssd_step"]
