"""SSD stages as Pallas kernels: the TPU path (CPU tests run them with interpret=True).

One program per (batch, head, chunk) holds the whole chunk in on-chip memory (Q x Q f32 = 256 KiB at Q=256),
so the per-chunk C B^T and decay matrices never reach HBM. Inputs are moved to head-major layouts
([b, h, c, Q, P], [b, g, c, Q, N], per-position scalars [b, h, c, 1, Q]) so every block's last two dims equal
the array's (Mosaic TPU tiling rule). The inter-chunk recurrence is reference.state_passing (a scan over
chunks of [P, N] states, cheap next to the chunk stages). Source/query-side cotangents dB, dC are produced per
head and summed over the group's heads outside the kernel (simple; h/g times B's size of extra memory).
Lowered and compiled for TPU v5e / v5p / v6e on a CPU host (tools.tpu_compile, tests/tools/test_tpu_compile.py);
not yet run on a TPU: only interpret mode has checked its numbers.
Packed rows: the three chunk kernels take r (reference.chunk_documents) as one more [1, Q] int32 block per
(batch, chunk) and mask in VMEM (same document r_t = r_s, entering document r_t = 0, chunk-end document
r_s = r_last); without segment_ids the kernels are traced without that input or any mask.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.common import mxu_dot, pallas_interpret
from kernels.ssd import reference

F32 = jnp.float32


def _dot(a, b, ta=False, tb=False):
    return mxu_dot(a, b, ((0 if ta else 1,), (1 if tb else 0,)))


def _decay(cs, r=None):
    """[Q(t), Q(s)] exp(cs_t - cs_s) for t >= s (and r_t = r_s when r [Q] is given) else 0 (exponent masked
    before exp: never overflows)."""
    Q = cs.shape[0]
    t = jax.lax.broadcasted_iota(jnp.int32, (Q, Q), 0)
    s = jax.lax.broadcasted_iota(jnp.int32, (Q, Q), 1)
    keep = t >= s
    if r is not None:
        keep = keep & (r[:, None] == r[None, :])
    return jnp.exp(jnp.where(keep, cs[:, None] - cs[None, :], -jnp.inf))


def _split_docs(refs, n_in, n_out):
    """Kernel refs -> (the n_in inputs, r [Q] int32 or None, outputs): the docs block, when the call passed one,
    is one more input after the n_in."""
    ins, outs = refs[:n_in], refs[len(refs) - n_out:]
    return ins, (refs[n_in][0, 0, 0, 0] if len(refs) == n_in + 1 + n_out else None), outs


def _docs_in(docs):
    """r [b, c, Q] -> [b, 1, c, 1, Q] (one [1, Q] block per (batch, chunk), the tiling rule's last two dims)."""
    return [] if docs is None else [docs.astype(jnp.int32)[:, None, :, None, :]]


def _hm(v):  # [b, c, Q, h, X] -> [b, h, c, Q, X]
    return jnp.transpose(v, (0, 3, 1, 2, 4))


def _bm(v):  # [b, h, c, Q, X] -> [b, c, Q, h, X]
    return jnp.transpose(v, (0, 2, 3, 1, 4))


def _scal(v):  # [b, h, c, Q] -> [b, h, c, 1, Q]
    return v[:, :, :, None, :]


def _call(kernel, ins, in_kinds, outs, grid, rep):
    """in_kinds: 'h' (per head block), 'g' (per group), 'hn' (head, next chunk state), 'd' ([h,1,1] scalar),
    'r' (per batch and chunk: the document indices).
    grid: (batch, heads, chunks); the programs run heads innermost, (batch, chunk, head), so that a group's
    B / C blocks stay in VMEM for its heads instead of being fetched again per head."""
    def spec(kind, shape):
        blk = (1, 1, 1) + tuple(shape[3:])
        if kind == "h":
            return pl.BlockSpec(blk, lambda i, k, j: (i, j, k) + (0,) * (len(shape) - 3))
        if kind == "g":
            return pl.BlockSpec(blk, lambda i, k, j: (i, j // rep, k) + (0,) * (len(shape) - 3))
        if kind == "hn":
            return pl.BlockSpec(blk, lambda i, k, j: (i, j, k + 1) + (0,) * (len(shape) - 3))
        if kind == "d":
            return pl.BlockSpec((1, 1, 1), lambda i, k, j: (j, 0, 0))
        if kind == "r":  # per (batch, chunk), shared by the heads
            return pl.BlockSpec(blk, lambda i, k, j: (i, 0, k) + (0,) * (len(shape) - 3))
        raise AssertionError(kind)

    return pl.pallas_call(
        kernel,
        grid=(grid[0], grid[2], grid[1]),
        in_specs=[spec(k, a.shape) for k, a in zip(in_kinds, ins)],
        out_specs=[spec("h", o.shape) for o in outs],
        out_shape=outs,
        # every (batch, head, chunk) program is independent: a megacore (v5p) splits the grid over its 2 cores
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel")),
        interpret=pallas_interpret(),
        name="ssd" + kernel.__name__[:-len("_kernel")],
    )(*ins)


def _chunk_state_kernel(x_ref, b_ref, w_ref, o_ref):
    w = w_ref[0, 0, 0, 0]
    o_ref[0, 0, 0] = _dot(x_ref[0, 0, 0].astype(F32) * w[:, None], b_ref[0, 0, 0].astype(F32), ta=True)


def chunk_state(x, Bm, w):
    b, c, Q, h, P = x.shape
    g, N = Bm.shape[3], Bm.shape[4]
    (out,) = _call(_chunk_state_kernel, [_hm(x), _hm(Bm), _scal(w)], ["h", "g", "h"],
                   [jax.ShapeDtypeStruct((b, h, c, P, N), F32)], (b, h, c), h // g)
    return jnp.transpose(out, (0, 2, 1, 3, 4))


def _chunk_scan_kernel(*refs):
    (x_ref, dt_ref, cs_ref, b_ref, c_ref, s_ref, d_ref), r, (y_ref,) = _split_docs(refs, 7, 1)
    cs, dt = cs_ref[0, 0, 0, 0], dt_ref[0, 0, 0, 0]
    x = x_ref[0, 0, 0].astype(F32)
    Cq = c_ref[0, 0, 0].astype(F32)
    M = _dot(Cq, b_ref[0, 0, 0].astype(F32), tb=True) * _decay(cs, r) * dt[None, :]
    state_w = jnp.exp(cs) if r is None else jnp.where(r == 0, jnp.exp(cs), 0.0)
    y = _dot(M, x) + state_w[:, None] * _dot(Cq, s_ref[0, 0, 0], tb=True) + d_ref[0, 0, 0] * x
    y_ref[0, 0, 0] = y.astype(y_ref.dtype)


def chunk_scan(x, dt, cs, Bm, Cm, states, D, docs=None):
    b, c, Q, h, P = x.shape
    g = Bm.shape[3]
    ins = [_hm(x), _scal(dt), _scal(cs), _hm(Bm), _hm(Cm), jnp.transpose(states, (0, 2, 1, 3, 4)),
           D.astype(F32).reshape(h, 1, 1)] + _docs_in(docs)
    (y,) = _call(_chunk_scan_kernel, ins, ["h", "h", "h", "g", "g", "h", "d", "r"][:len(ins)],
                 [jax.ShapeDtypeStruct((b, h, c, Q, P), x.dtype)], (b, h, c), h // g)
    return _bm(y)


def _bwd_dx_dB_kernel(*refs):
    (x_ref, dt_ref, cs_ref, b_ref, c_ref, dy_ref, dsn_ref, d_ref), r, (dx_ref, db_ref, ddt_ref, dd_ref) = \
        _split_docs(refs, 8, 4)
    cs, dt = cs_ref[0, 0, 0, 0], dt_ref[0, 0, 0, 0]
    x, dy = x_ref[0, 0, 0].astype(F32), dy_ref[0, 0, 0].astype(F32)
    Bq, Cq = b_ref[0, 0, 0].astype(F32), c_ref[0, 0, 0].astype(F32)
    dsn = dsn_ref[0, 0, 0]
    Lt = _decay(cs, r).T  # [s, t]
    tail = jnp.exp(cs[-1] - cs)
    if r is not None:  # dS_{c+1} reaches only the chunk-end document
        tail = jnp.where(r == r[-1], tail, 0.0)
    tail = tail[:, None]
    W = _dot(_dot(Bq, Cq, tb=True) * Lt, dy) + tail * _dot(Bq, dsn, tb=True)
    dx_ref[0, 0, 0] = (dt[:, None] * W + d_ref[0, 0, 0] * dy).astype(dx_ref.dtype)
    db_ref[0, 0, 0] = dt[:, None] * (_dot(_dot(x, dy, tb=True) * Lt, Cq) + tail * _dot(x, dsn))
    ddt_ref[0, 0, 0, 0] = jnp.sum(x * W, axis=1)
    dd_ref[0, 0, 0, 0] = jnp.sum(x * dy, axis=1)


def chunk_bwd_dx_dB(x, dt, cs, Bm, Cm, dy, dstates, D, docs=None):
    b, c, Q, h, P = x.shape
    g, N = Bm.shape[3], Bm.shape[4]
    ins = [_hm(x), _scal(dt), _scal(cs), _hm(Bm), _hm(Cm), _hm(dy), jnp.transpose(dstates, (0, 2, 1, 3, 4)),
           D.astype(F32).reshape(h, 1, 1)] + _docs_in(docs)
    outs = [jax.ShapeDtypeStruct((b, h, c, Q, P), x.dtype), jax.ShapeDtypeStruct((b, h, c, Q, N), F32),
            jax.ShapeDtypeStruct((b, h, c, 1, Q), F32), jax.ShapeDtypeStruct((b, h, c, 1, Q), F32)]
    dx, dBh, ddt, dD = _call(_bwd_dx_dB_kernel, ins, ["h", "h", "h", "g", "g", "h", "hn", "d", "r"][:len(ins)],
                             outs, (b, h, c), h // g)
    dB = _bm(dBh.reshape(b, g, h // g, c, Q, N).sum(2))
    return _bm(dx), dB, ddt[:, :, :, 0], dD[:, :, :, 0]


def _bwd_dC_kernel(*refs):
    (x_ref, dt_ref, cs_ref, b_ref, c_ref, dy_ref, s_ref), r, (dc_ref, cdc_ref) = _split_docs(refs, 7, 2)
    cs, dt = cs_ref[0, 0, 0, 0], dt_ref[0, 0, 0, 0]
    x, dy = x_ref[0, 0, 0].astype(F32), dy_ref[0, 0, 0].astype(F32)
    Bq, Cq = b_ref[0, 0, 0].astype(F32), c_ref[0, 0, 0].astype(F32)
    state_w = jnp.exp(cs) if r is None else jnp.where(r == 0, jnp.exp(cs), 0.0)
    dC = _dot(_dot(dy, x, tb=True) * _decay(cs, r) * dt[None, :], Bq) + state_w[:, None] * _dot(dy, s_ref[0, 0, 0])
    dc_ref[0, 0, 0] = dC
    cdc_ref[0, 0, 0, 0] = jnp.sum(Cq * dC, axis=1)


def chunk_bwd_dC(x, dt, cs, Bm, Cm, dy, states, docs=None):
    b, c, Q, h, P = x.shape
    g, N = Bm.shape[3], Bm.shape[4]
    ins = [_hm(x), _scal(dt), _scal(cs), _hm(Bm), _hm(Cm), _hm(dy), jnp.transpose(states, (0, 2, 1, 3, 4))]
    ins += _docs_in(docs)
    outs = [jax.ShapeDtypeStruct((b, h, c, Q, N), F32), jax.ShapeDtypeStruct((b, h, c, 1, Q), F32)]
    dCh, CdC = _call(_bwd_dC_kernel, ins, ["h", "h", "h", "g", "g", "h", "h", "r"][:len(ins)], outs, (b, h, c),
                     h // g)
    return _bm(dCh.reshape(b, g, h // g, c, Q, N).sum(2)), CdC[:, :, :, 0]


class _Stages:
    chunk_state = staticmethod(chunk_state)
    state_passing = staticmethod(reference.state_passing)
    chunk_scan = staticmethod(chunk_scan)
    chunk_bwd_dx_dB = staticmethod(chunk_bwd_dx_dB)
    chunk_bwd_dC = staticmethod(chunk_bwd_dC)


STAGES = _Stages()
