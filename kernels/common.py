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
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

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


def out_struct(shape, dtype, *like: jax.Array) -> jax.ShapeDtypeStruct:
    """A pallas_call result's ShapeDtypeStruct. Inside a `jax.shard_map` (with check_vma) Pallas needs to know
    which manual mesh axes the result varies over: those any of `like` (the kernel's inputs) varies over."""
    varying = frozenset().union(*(jax.typeof(x).manual_axis_type.varying for x in like))
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.sharding.ManualAxisType(varying=varying))


def free_mesh():
    """The current mesh if it spreads over more than one device and no axis is manual yet (not inside a
    jax.shard_map), else None: where a Mosaic kernel needs `partitioned` to lower."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.size == 1 or mesh.manual_axes:
        return None
    return mesh


def partitioned(fn, args: tuple, dims: tuple[str, ...], out_dims):
    """fn(*args) run per device under `jax.shard_map` when traced under a mesh of more than one device (XLA
    cannot partition a Mosaic kernel: it refuses to lower one outside a shard_map on a multi-device mesh);
    fn(*args) itself otherwise, or inside a shard_map that already made every axis manual.

    dims[i] spells args[i]'s axes, one letter each: 'b' batch, 'h' heads, '.' whole (None args are passed
    through). 'b' axes split over the mesh axes that the active logical rules (flax's, else
    axlearn_like.sharding.DEFAULT_RULES) give "batch", 'h' over those they give "heads"; a mesh axis is used only
    where it divides every such dimension, and a mesh axis left over (e.g. tensor when the heads do not divide)
    splits the batch too where it can, so no chip repeats another's work. out_dims: the same for fn's
    output(s) (a str, or a tuple of them for a tuple of outputs). fn must treat its batch rows and heads
    independently (GQA: its query and key heads split into the same number of contiguous chunks)."""
    mesh = free_mesh()
    if mesh is None:
        return fn(*args)
    import flax.linen as nn

    from axlearn_like import sharding as shd

    rules = dict(nn.get_logical_axis_rules() or shd.DEFAULT_RULES)

    def targets(logical):
        t = rules.get(logical)
        return () if t is None else (t,) if isinstance(t, str) else tuple(t)

    present = [(x, d) for x, d in zip(args, dims) if x is not None]
    sizes = {c: [x.shape[i] for x, d in present for i, ch in enumerate(d) if ch == c] for c in "bh"}
    split = {"b": [], "h": []}

    def take(c, axis):
        n = mesh.shape[axis] * math.prod(mesh.shape[a] for a in split[c])
        if sizes[c] and mesh.shape[axis] > 1 and all(s % n == 0 for s in sizes[c]):
            split[c].append(axis)
            return True
        return False

    used = set()
    for c, logical in (("b", "batch"), ("h", "heads")):
        for axis in targets(logical):
            if axis in mesh.axis_names and axis not in used and take(c, axis):
                used.add(axis)
    for axis in mesh.axis_names:  # leftovers (e.g. tensor over one K/V head) split the batch further
        if axis not in used and take("b", axis):
            used.add(axis)
    if not used:
        return fn(*args)

    def spec(d):
        entry = lambda ch: (tuple(split[ch]) or None) if ch in split else None
        return P(*(entry(ch) for ch in d))

    keep = [i for i, x in enumerate(args) if x is not None]

    def local(*xs):
        full = list(args)
        for i, x in zip(keep, xs):
            full[i] = x
        return fn(*full)

    in_specs = tuple(spec(dims[i]) for i in keep)
    out_specs = spec(out_dims) if isinstance(out_dims, str) else tuple(spec(d) for d in out_dims)
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)(*(args[i] for i in keep))


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


def check_segment_ids(op: str, segment_ids, batch: int, seq: int) -> None:
    """Op.validate helper: segment_ids None or an integer array [batch, seq]; else a one-line ValueError."""
    if segment_ids is None:
        return
    shape, dtype = tuple(getattr(segment_ids, "shape", ())), getattr(segment_ids, "dtype", None)
    if shape != (batch, seq) or dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"{op}: segment_ids must be an integer array [batch, seq] = {(batch, seq)}, got shape "
                         f"{shape} dtype {dtype or type(segment_ids).__name__}")


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
