"""Triton kernels (through jax-triton) for jvp_attention: the reference equations (1)-(3), flash style.

A forward program owns BM query rows of one head and streams the causal key blocks with an online softmax;
with HAS_T it also carries the tangent accumulators (rowsum(P*tS) and (P*tS) v, rescaled like o), so the JVP
costs two more GEMMs per tile and no extra pass. The backward recomputes P from the saved lse and forms
GS, GT, tP per tile (`_bwd_tile`, shared by both kernels): a row kernel writes gq (and gtq), a column
kernel (one kv head, all its query heads, no atomics) writes gk, gv. Nothing S x S touches memory.
Logits are kept in log2 units so every exponential is a bare exp2. Inputs are the public [B, S, H, D]
layout (rows strided by H * D), row statistics [B, H, S] float32.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from kernels import common

_LOG2E = tl.constexpr(common.LOG2E)  # Triton kernels may only read constexpr globals
_LN2 = tl.constexpr(common.LN2)
_NEG = tl.constexpr(common.NEG_INF)

# Launch settings (tools.bench_ebt times them on the H200 inside the EBT step).
FWD_LAUNCH = dict(BM=64, BN=64, num_warps=4, num_stages=2)
BWD_LAUNCH = dict(BM=64, BN=64, num_warps=4, num_stages=2)


@triton.jit
def _rows(X, b, pos, h, S: tl.constexpr, NH: tl.constexpr, D: tl.constexpr):
    """X [B, S, NH, D] rows `pos` of head h -> [len(pos), D] (0 past the end)."""
    d = tl.arange(0, D)
    return tl.load(X + ((b * S + pos).to(tl.int64) * (NH * D) + h * D)[:, None] + d[None, :],
                   mask=(pos < S)[:, None], other=0.0)


@triton.jit
def _store_rows(X, x, b, pos, h, S: tl.constexpr, NH: tl.constexpr, D: tl.constexpr):
    """Stores float32 x [len(pos), D] as rows `pos` of head h of X [B, S, NH, D] (its dtype; none past the end)."""
    d = tl.arange(0, D)
    tl.store(X + ((b * S + pos).to(tl.int64) * (NH * D) + h * D)[:, None] + d[None, :], x.to(X.dtype.element_ty),
             mask=(pos < S)[:, None])


@triton.jit
def _query_program(H: tl.constexpr, KVH: tl.constexpr, BM: tl.constexpr):
    """A query-tile program's coordinates: (b * H + h, b, h, kv head, positions [BM])."""
    bh = tl.program_id(1)
    h = bh % H
    return bh, bh // H, h, h // (H // KVH), tl.program_id(0) * BM + tl.arange(0, BM)


@triton.jit
def _stat(X, bh, pos, S: tl.constexpr):
    """X [B, H, S] float32 at (bh, pos) -> [len(pos)] (0 past the end)."""
    return tl.load(X + bh.to(tl.int64) * S + pos, mask=pos < S, other=0.0)


@triton.jit
def _visible(SEG, b, qpos, kpos, S: tl.constexpr, HAS_SEG: tl.constexpr):
    """bool [BM, BN]: key kpos visible to query qpos (causal, in range, same segment)."""
    ok = (qpos[:, None] >= kpos[None, :]) & (qpos < S)[:, None]
    if HAS_SEG:
        sq = tl.load(SEG + b * S + qpos, mask=qpos < S, other=-1)
        sk = tl.load(SEG + b * S + kpos, mask=kpos < S, other=-2)
        ok = ok & (sq[:, None] == sk[None, :])
    return ok


@triton.jit
def _fwd_kernel(Q, K, V, TQ, SEG, O, LSE, TO, TLSE, SCALE: tl.constexpr, S: tl.constexpr, H: tl.constexpr,
                KVH: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, HAS_T: tl.constexpr,
                HAS_SEG: tl.constexpr, PREC: tl.constexpr):
    bh, b, h, kvh, qpos = _query_program(H, KVH, BM)
    q = _rows(Q, b, qpos, h, S, H, D)
    m_i = tl.full([BM], _NEG, tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    if HAS_T:
        tq = _rows(TQ, b, qpos, h, S, H, D)
        dl = tl.zeros([BM], tl.float32)
        acc_t = tl.zeros([BM, D], tl.float32)
    for n0 in range(0, (tl.program_id(0) + 1) * BM, BN):  # keys past a row (or past S) are masked
        kpos = n0 + tl.arange(0, BN)
        k = _rows(K, b, kpos, kvh, S, KVH, D)
        v = _rows(V, b, kpos, kvh, S, KVH, D)
        ok = _visible(SEG, b, qpos, kpos, S, HAS_SEG)
        s = tl.where(ok, tl.dot(q, tl.trans(k), input_precision=PREC) * (SCALE * _LOG2E), _NEG)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.where(ok, tl.exp2(s - m_new[:, None]), 0.0)  # rows with no key yet keep l = 0, not 1
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        if HAS_T:
            pts = p * (tl.dot(tq, tl.trans(k), input_precision=PREC) * SCALE)
            dl = dl * alpha + tl.sum(pts, 1)
            acc_t = acc_t * alpha[:, None] + tl.dot(pts.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    o = acc / l_i[:, None]
    _store_rows(O, o, b, qpos, h, S, H, D)
    tl.store(LSE + bh.to(tl.int64) * S + qpos, (m_i + tl.log2(l_i)) * _LN2, mask=qpos < S)
    if HAS_T:
        tlse = dl / l_i
        _store_rows(TO, acc_t / l_i[:, None] - tlse[:, None] * o, b, qpos, h, S, H, D)
        tl.store(TLSE + bh.to(tl.int64) * S + qpos, tlse, mask=qpos < S)


@triton.jit
def _bwd_tile(q, k, v, tq, go, gto, lse2, tlse, gd, r, ok, SCALE: tl.constexpr, HAS_T: tl.constexpr,
              PREC: tl.constexpr):
    """One [BM, BN] tile of eq. (3): P, GS, and with HAS_T also GT and tP (all float32, 0 where not ok)."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * (SCALE * _LOG2E)
    p = tl.where(ok, tl.exp2(s - lse2[:, None]), 0.0)
    gp = tl.dot(go, tl.trans(v), input_precision=PREC)
    gt = p
    tp = p
    if HAS_T:
        ts = tl.dot(tq, tl.trans(k), input_precision=PREC) * SCALE
        dpt = tl.dot(gto, tl.trans(v), input_precision=PREC)
        gp = gp + dpt * (ts - tlse[:, None]) + gd[:, None] * ts
        gt = p * (dpt + gd[:, None])
        tp = p * (ts - tlse[:, None])
    return p, p * (gp - r[:, None]), gt, tp


@triton.jit
def _query_side(Q, GO, TQ, GTO, LSE, R, TLSE, GD, b, bh, h, qpos, S: tl.constexpr, H: tl.constexpr,
                D: tl.constexpr, HAS_T: tl.constexpr):
    """The backward's per-query operands at rows qpos of head h: q, go, tq, gto [BM, D] and lse (log2 units),
    r, tlse, gd [BM]; without the tangent, tq/gto/tlse/gd are placeholders the tile never reads."""
    q = _rows(Q, b, qpos, h, S, H, D)
    go = _rows(GO, b, qpos, h, S, H, D)
    lse2 = _stat(LSE, bh, qpos, S) * _LOG2E
    r = _stat(R, bh, qpos, S)
    tq = q
    gto = go
    tlse = r
    gd = r
    if HAS_T:
        tq = _rows(TQ, b, qpos, h, S, H, D)
        gto = _rows(GTO, b, qpos, h, S, H, D)
        tlse = _stat(TLSE, bh, qpos, S)
        gd = _stat(GD, bh, qpos, S)
    return q, go, tq, gto, lse2, r, tlse, gd


@triton.jit
def _bwd_row_kernel(Q, K, V, TQ, SEG, LSE, TLSE, GO, GTO, GD, R, GQ, GTQ, SCALE: tl.constexpr, S: tl.constexpr,
                    H: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                    HAS_T: tl.constexpr, HAS_SEG: tl.constexpr, PREC: tl.constexpr):
    bh, b, h, kvh, qpos = _query_program(H, KVH, BM)
    q, go, tq, gto, lse2, r, tlse, gd = _query_side(Q, GO, TQ, GTO, LSE, R, TLSE, GD, b, bh, h, qpos, S, H, D, HAS_T)
    gq = tl.zeros([BM, D], tl.float32)
    gtq = tl.zeros([BM, D], tl.float32)
    for n0 in range(0, (tl.program_id(0) + 1) * BM, BN):  # keys past a row (or past S) are masked
        kpos = n0 + tl.arange(0, BN)
        k = _rows(K, b, kpos, kvh, S, KVH, D)
        v = _rows(V, b, kpos, kvh, S, KVH, D)
        ok = _visible(SEG, b, qpos, kpos, S, HAS_SEG)
        p, gs, gt, tp = _bwd_tile(q, k, v, tq, go, gto, lse2, tlse, gd, r, ok, SCALE, HAS_T, PREC)
        gq += tl.dot(gs.to(k.dtype), k, input_precision=PREC)
        if HAS_T:
            gtq += tl.dot(gt.to(k.dtype), k, input_precision=PREC)
    _store_rows(GQ, gq * SCALE, b, qpos, h, S, H, D)
    if HAS_T:
        _store_rows(GTQ, gtq * SCALE, b, qpos, h, S, H, D)


@triton.jit
def _bwd_col_kernel(Q, K, V, TQ, SEG, LSE, TLSE, GO, GTO, GD, R, GK, GV, SCALE: tl.constexpr, S: tl.constexpr,
                    H: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                    HAS_T: tl.constexpr, HAS_SEG: tl.constexpr, PREC: tl.constexpr):
    pid_n = tl.program_id(0)
    bk = tl.program_id(1)
    b = bk // KVH
    kvh = bk % KVH
    kpos = pid_n * BN + tl.arange(0, BN)
    k = _rows(K, b, kpos, kvh, S, KVH, D)
    v = _rows(V, b, kpos, kvh, S, KVH, D)
    gk = tl.zeros([BN, D], tl.float32)
    gv = tl.zeros([BN, D], tl.float32)
    for hg in range(H // KVH):
        h = kvh * (H // KVH) + hg
        bh = b * H + h
        for m0 in range((pid_n * BN) // BM * BM, S, BM):  # causal: rows >= this block's first key
            qpos = m0 + tl.arange(0, BM)
            q, go, tq, gto, lse2, r, tlse, gd = _query_side(Q, GO, TQ, GTO, LSE, R, TLSE, GD, b, bh, h, qpos, S, H,
                                                            D, HAS_T)
            ok = _visible(SEG, b, qpos, kpos, S, HAS_SEG)
            p, gs, gt, tp = _bwd_tile(q, k, v, tq, go, gto, lse2, tlse, gd, r, ok, SCALE, HAS_T, PREC)
            gk += tl.dot(tl.trans(gs).to(q.dtype), q, input_precision=PREC)
            gv += tl.dot(tl.trans(p).to(go.dtype), go, input_precision=PREC)
            if HAS_T:
                gk += tl.dot(tl.trans(gt).to(tq.dtype), tq, input_precision=PREC)
                gv += tl.dot(tl.trans(tp).to(gto.dtype), gto, input_precision=PREC)
    _store_rows(GK, gk * SCALE, b, kpos, kvh, S, KVH, D)
    _store_rows(GV, gv, b, kpos, kvh, S, KVH, D)


def _meta(q, k, seg, launch):
    b, s, h, d = q.shape
    meta = {k_: v_ for k_, v_ in launch.items() if k_ not in ("num_warps", "num_stages")}
    # float32 inputs (tests) keep full-precision dots; 16-bit inputs use the tensor cores as usual
    prec = "ieee" if q.dtype == jnp.float32 else "tf32"
    meta.update(SCALE=1.0 / math.sqrt(d), S=s, H=h, KVH=k.shape[2], D=d, HAS_SEG=seg is not None, PREC=prec)
    seg = jnp.zeros((1,), jnp.int32) if seg is None else seg.astype(jnp.int32)
    return meta, seg, launch["num_warps"], launch["num_stages"]


def forward(q, k, v, tq=None, segment_ids=None):
    """(o, lse) or, with tq, (o, lse, to, tlse): reference.forward's contract."""
    import jax_triton as jt

    b, s, h, _ = q.shape
    meta, seg, warps, stages = _meta(q, k, segment_ids, FWD_LAUNCH)
    rows = jax.ShapeDtypeStruct((b, h, s), jnp.float32)
    outs = jt.triton_call(
        q, k, v, q if tq is None else tq, seg, kernel=_fwd_kernel,
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), rows, jax.ShapeDtypeStruct(q.shape, q.dtype), rows],
        grid=(triton.cdiv(s, meta["BM"]), b * h), num_warps=warps, num_stages=stages, HAS_T=tq is not None, **meta)
    return tuple(outs[:2]) if tq is None else tuple(outs)


def backward(q, k, v, tq, lse, tlse, go, gto, gd, r, segment_ids=None):
    """(gq, gk, gv, gtq) in the input dtypes (gtq None without tq): reference.backward's contract."""
    import jax_triton as jt

    b, s, h, _ = q.shape
    has_t = tq is not None
    meta, seg, warps, stages = _meta(q, k, segment_ids, BWD_LAUNCH)
    args = (q, k, v, tq if has_t else q, seg, lse, tlse if has_t else lse, go, gto if has_t else go,
            gd if has_t else r, r)
    gq, gtq = jt.triton_call(
        *args, kernel=_bwd_row_kernel, out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype)] * 2,
        grid=(triton.cdiv(s, meta["BM"]), b * h), num_warps=warps, num_stages=stages, HAS_T=has_t, **meta)
    gk, gv = jt.triton_call(
        *args, kernel=_bwd_col_kernel, out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2,
        grid=(triton.cdiv(s, meta["BN"]), b * k.shape[2]), num_warps=warps, num_stages=stages, HAS_T=has_t, **meta)
    return gq, gk, gv, (gtq if has_t else None)
