"""Shared plumbing for every kernel package: backend detection and the helpers Pallas / Triton kernels share.

Each op lives in `kernels/<op>/` as api.py (public function + custom_vjp), reference.py (pure jnp oracle
and portable fallback), pallas_*.py (TPU path; CPU tests run it with interpret=True) and triton_*.py /
cudnn_*.py (GPU). The api module's `kernels.op.Op` subclass validates arguments and picks implementations
the same way for every op (docs/architecture.md, "Kernel ops").
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
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


def mxu_dot(a: jax.Array, b: jax.Array, contract: tuple) -> jax.Array:
    """2-D matmul for Pallas kernels on the input dtype with float32 accumulation; float32 inputs get full
    precision (the TPU default would round them to bf16 passes). contract: ((lhs dims), (rhs dims))."""
    prec = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jax.lax.dot_general(a, b, (contract, ((), ())), precision=prec, preferred_element_type=jnp.float32)


# --- constants and shape helpers shared by the Pallas and Triton kernels ------------------------------------
NEG_INF = -1e30  # finite "minus infinity" for masked logits and running maxima: exp(m - m_new) never sees inf - inf
LOG2E = 1.4426950408889634  # Triton kernels keep logits in log2 units, so every exponential is a bare exp2
LN2 = 0.6931471805599453
# mxu_dot / dot_general contractions of 2-D tiles
NT = ((1,), (1,))  # a @ b.T
NN = ((1,), (0,))  # a @ b
TN = ((0,), (0,))  # a.T @ b


def cdiv(x: int, m: int) -> int:
    """ceil(x / m) for positive ints."""
    return -(-x // m)


def round_up(x: int, m: int) -> int:
    """The smallest multiple of m that is >= x."""
    return cdiv(x, m) * m


def next_pow2(x: int) -> int:
    """The smallest power of two >= x (1 for x <= 1)."""
    return 1 << max(0, (x - 1).bit_length())


def pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
    """x padded with `value` at the end of `axis` to length `size` (>= its length)."""
    pad = size - x.shape[axis]
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def check_attention_shapes(op: str, q: jax.Array, k: jax.Array, v: jax.Array, segment_ids=None) -> None:
    """Op.validate helper for (grouped-query) attention: q [batch, seq, heads, head_dim], k and v of one shape
    [batch, seq, kv_heads, head_dim] with heads % kv_heads == 0, segment_ids [batch, seq] or None. Raises a
    one-line ValueError starting with `op`."""
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"{op}: q must be [batch, seq, heads, head_dim] and k, v one shape [batch, seq, "
                         f"kv_heads, head_dim]; got q {q.shape}, k {k.shape}, v {v.shape}")
    if (k.shape[0], k.shape[1], k.shape[3]) != (q.shape[0], q.shape[1], q.shape[3]):
        raise ValueError(f"{op}: q {q.shape} and k {k.shape} must agree in batch, seq and head_dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{op}: heads={q.shape[2]} must be a multiple of kv_heads={k.shape[2]}")
    if segment_ids is not None and tuple(segment_ids.shape) != q.shape[:2]:
        raise ValueError(f"{op}: segment_ids must be [batch, seq] = {q.shape[:2]}, got {segment_ids.shape}")
