"""Shared plumbing for every kernel package: backend detection and `implementation=` dispatch.

Each op lives in `kernels/<op>/` as api.py (public function + custom_vjp), reference.py (pure jnp oracle
and portable fallback), pallas_*.py (TPU path; CPU tests run it with interpret=True) and triton_*.py /
mosaic_*.py (GPU). The api module calls `resolve_implementation` so that every op picks and validates
implementations the same way.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp


def backend() -> str:
    """The default JAX backend platform: 'cpu', 'gpu' or 'tpu'."""
    platform = jax.default_backend()
    return "gpu" if platform in ("cuda", "rocm", "gpu") else platform


def pallas_interpret() -> bool:
    """Pallas kernels run compiled on TPU and GPU, and in interpret mode everywhere else (CPU tests)."""
    return backend() not in ("tpu", "gpu")


@functools.cache
def has_jax_triton() -> bool:
    try:
        import jax_triton  # noqa: F401
    except Exception:  # ImportError, or a triton/jaxlib ABI mismatch
        return False
    return True


def resolve_implementation(
    op: str,
    implementation: str | None,
    *,
    supported: Mapping[str, Sequence[str]],
    preferred: Mapping[str, str],
) -> str:
    """Validates or picks an implementation name.

    Args:
      op: op name for error messages, e.g. "two_simplicial_attention".
      implementation: the user's choice, or None for the best one on this backend.
      supported: implementation name -> backends it runs on ("cpu", "gpu", "tpu").
      preferred: backend -> implementation picked when `implementation` is None.
    """
    plat = backend()
    if implementation is None:
        return preferred.get(plat, "xla")
    if implementation not in supported:
        raise ValueError(
            f"{op}: unknown implementation={implementation!r}; choose one of {sorted(supported)} or None (auto)"
        )
    if plat not in supported[implementation]:
        raise ValueError(
            f"{op}: implementation={implementation!r} does not run on backend {plat!r}; "
            f"it needs one of {list(supported[implementation])} (use implementation=None to pick automatically)"
        )
    return implementation


def mxu_dot(a: jax.Array, b: jax.Array, contract: tuple) -> jax.Array:
    """2-D matmul for Pallas kernels on the input dtype with float32 accumulation; float32 inputs get full
    precision (the TPU default would round them to bf16 passes). contract: ((lhs dims), (rhs dims))."""
    prec = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jax.lax.dot_general(a, b, (contract, ((), ())), precision=prec, preferred_element_type=jnp.float32)
