"""Mamba-2 SSD scan (state-space duality): chunked parallel form for training, one-step form for decode."""
from kernels.ssd.api import ssd, ssd_step

__all__ = ["ssd", "ssd_step"]
