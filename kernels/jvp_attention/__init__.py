"""Causal GQA attention returning (out, lse) with fused reverse- and forward-mode (JVP, grad-of-JVP) rules:
`attention`, `forward_mode` (context), IMPLEMENTATIONS (implementation names; OP picks). Used by models.ebt's predicted
stream, whose loss differentiates the inner gradient a second time (docs/notes/ebt.md)."""
from kernels.jvp_attention.api import IMPLEMENTATIONS, OP, attention, choose_implementation, forward_mode

__all__ = ["IMPLEMENTATIONS", "OP", "attention", "choose_implementation", "forward_mode"]
