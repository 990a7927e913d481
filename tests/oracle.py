"""Helpers for comparing kernels with float64 oracles (tolerances: docs/benchmarks.md, "Method")."""
from __future__ import annotations

import numpy as np


def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere in `out` gives inf (never passes)."""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if not np.all(np.isfinite(out)):
        return float("inf")
    denom = np.linalg.norm(ref.ravel())
    return float(np.linalg.norm((out - ref).ravel()) / max(denom, 1e-30))


def tol(dtype) -> float:
    """Relative-error bound: float32 arithmetic lands far under 1e-3; bf16 operands within 1e-2."""
    name = np.dtype(dtype).name if not hasattr(dtype, "dtype") else np.dtype(dtype.dtype).name
    return 2e-2 if "bfloat16" in name or "float16" in name else 2e-4


def assert_close(out, ref, dtype, what: str = "output", factor: float = 1.0):
    err = rel_err(out, ref)
    bound = tol(dtype) * factor
    assert err <= bound, f"{what}: relative error {err:.3e} > {bound:.1e}"
