"""Shared plumbing for every kernel package: backend detection and `implementation=` dispatch.

Each op lives in `kernels/<op>/` as api.py (public function + custom_vjp), reference.py (pure jnp oracle
and portable fallback), pallas_*.py (TPU path; CPU tests run it with interpret=True) and triton_*.py /
mosaic_*.py (GPU). The api module calls `resolve_implementation` so that every op picks and validates
implementations the same way.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

_TARGET = contextvars.ContextVar("kernels_target_backend", default=None)


@contextlib.contextmanager
def target_backend(platform: str):
    """Inside (at trace time), kernels dispatch and lower as on `platform` ('tpu', 'gpu' or 'cpu') instead of
    the default backend: `implementation=None` picks that backend's kernel and Pallas kernels lower compiled
    (Mosaic on 'tpu'), not in interpret mode. For lowering a program for another platform than the host's,
    e.g. `jax.export.export(jax.jit(f), platforms=["tpu"])` on a CPU host (tools/tpu_compile.py). Trace a
    fresh function inside it: jit's trace cache does not see this setting."""
    if platform not in ("cpu", "gpu", "tpu"):
        raise ValueError(f"target_backend: platform must be 'cpu', 'gpu' or 'tpu', got {platform!r}")
    token = _TARGET.set(platform)
    try:
        yield
    finally:
        _TARGET.reset(token)


def backend() -> str:
    """The platform kernels are traced for: `target_backend`'s if set, else the default JAX backend's
    ('cpu', 'gpu' or 'tpu')."""
    target = _TARGET.get()
    if target is not None:
        return target
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
