"""Triton kernels (through jax-triton) for 2-simplicial attention on GPU.

Same algorithm as pallas_tpu.py (see its docstring and docs/notes/simplicial.md): a program owns one query
i and a tile of GH query heads of one K/V head; its rows r = (h, k) hold b_r = scale * q_ih * k2_k for the
W2P (>= w2) keys of the k2 window, so M = GH * W2P rows (128 for w2 = 32) meet blocks of BJ keys of the k1
window in two dense tensor-core GEMMs per block (logits, then P @ V1), flash-attention style, with a
per-row online softmax merged per head in the epilogue. No element-wise work scales with w1 * w2 beyond
the softmax itself. Inputs are the public [B, S, H, D] layout, contiguous; offsets use int64 bases.
Backward: a per-query kernel (dq, dk2/dv2 rows) and a per-k1-block kernel (dk1, dv1), 8 GEMM units, no atomics.
Logits are kept in log2 units (b_r carries log2(e)) so every exponential is a bare exp2.
Packed documents (constexpr SEG; SEG=False compiles none of this): SEGS [B, S] holds each position's canonical
document id (the first position of its id, reference.segment_starts) and RUNS the start of its run. A query's
rows of other documents' k2 keys are dropped like rows before position 0; k1 columns are masked only in
blocks that are not wholly inside the query's run (so the whole-block fast loop stays select-free), the
k1 loops start at the block of the document's first position, and the dk1/dv1 kernel skips the queries that
see no key of its block. The forward and dq kernels read ids per key only in their RECUR variant, run where
some id recurs after another run (packing gives each document one run; then the bounds decide).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from kernels import common
from kernels.simplicial import reference

_NEG = tl.constexpr(common.NEG_INF)  # Triton kernels may only read constexpr globals
_INF = tl.constexpr(float("inf"))
_LOG2E = tl.constexpr(common.LOG2E)  # logits in log2 units: exp2 without a multiply
_LN2 = tl.constexpr(common.LN2)


@triton.jit
def _load_heads(X, b, i, kvh, tile, S: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                DP: tl.constexpr, GH: tl.constexpr):
    """X [B, S, HKV*G, D] at query i for the GH query heads of `tile`: float32 [GH, DP], 0 outside."""
    d = tl.arange(0, DP)
    h = tile * GH + tl.arange(0, GH)
    x = tl.load(X + (b * S + i).to(tl.int64) * (HKV * G * D) + (kvh * G + h)[:, None] * D + d[None, :],
                mask=(h[:, None] < G) & (d[None, :] < D), other=0.0)
    return x.to(tl.float32)


@triton.jit
def _load_window(X, b, i, kvh, S: tl.constexpr, HKV: tl.constexpr, W2: tl.constexpr, D: tl.constexpr,
                 DP: tl.constexpr, W2P: tl.constexpr):
    """X [B, S, HKV, D] at the k2 window i - W2 + 1 + kk, kk < W2P: float32 [W2P, DP], 0 outside."""
    d = tl.arange(0, DP)
    kk = tl.arange(0, W2P)
    kpos = i - W2 + 1 + kk
    x = tl.load(X + (b * S + kpos).to(tl.int64)[:, None] * (HKV * D) + kvh * D + d[None, :],
                mask=((kk < W2) & (kpos >= 0))[:, None] & (d[None, :] < D), other=0.0)
    return x.to(tl.float32)


@triton.jit
def _rows(xh, xw, GH: tl.constexpr, W2P: tl.constexpr, DP: tl.constexpr):
    """Rows r = (h, kk) of the program's GEMMs: xh[h] * xw[kk], [GH * W2P, DP] float32. Built in registers
    from compact loads (gathered [M, D] loads get multi-buffered in shared memory by the pipeliner)."""
    return tl.reshape(xh[:, None, :] * xw[None, :, :], (GH * W2P, DP))


@triton.jit
def _row_stats(LSE, DELTA, SEGS, doc, b, i, kvh, tile, S: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr,
               W2: tl.constexpr, W2P: tl.constexpr, GH: tl.constexpr, SEG: tl.constexpr):
    """Per row: lse of its head in log2 units (+inf for rows of padded k2 slots or heads, or of k2 keys in
    another document than `doc`) and delta."""
    r = tl.arange(0, GH * W2P)
    kpos = i - W2 + 1 + r % W2P
    valid = (r % W2P < W2) & (kpos >= 0) & (tile * GH + r // W2P < G)
    if SEG:
        valid = valid & (tl.load(SEGS + b * S + kpos, mask=valid, other=-1) == doc)
    hoff = (b * S + i).to(tl.int64) * (HKV * G) + kvh * G + tile * GH + r // W2P
    lse = tl.load(LSE + hoff, mask=valid, other=0.0)
    lse2 = tl.where(valid, lse * _LOG2E, _INF)
    return lse2, tl.load(DELTA + hoff, mask=valid, other=0.0)


@triton.jit
def _kv_rows(K1, V1, b, kvh, jpos, valid, S: tl.constexpr, HKV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
             DKP: tl.constexpr, DVP: tl.constexpr):
    """k1 [BJ, DKP] and v1 [BJ, DVP] rows of positions jpos of K/V head kvh (zeros where not valid)."""
    dk = tl.arange(0, DKP)
    dv = tl.arange(0, DVP)
    off = (b * S + jpos).to(tl.int64) * (HKV * DK) + kvh * DK
    k1 = tl.load(K1 + off[:, None] + dk[None, :], mask=valid[:, None] & (dk[None, :] < DK), other=0.0)
    offv = (b * S + jpos).to(tl.int64) * (HKV * DV) + kvh * DV
    v1 = tl.load(V1 + offv[:, None] + dv[None, :], mask=valid[:, None] & (dv[None, :] < DV), other=0.0)
    return k1, v1


@triton.jit
def _fwd_block(rows, m, l, acc, K1, V1, SEGS, doc, b, i, kvh, n, j_first, S: tl.constexpr, HKV: tl.constexpr,
               DK: tl.constexpr, DV: tl.constexpr, DKP: tl.constexpr, DVP: tl.constexpr, BJ: tl.constexpr,
               PREC: tl.constexpr, MASKED: tl.constexpr, SEG: tl.constexpr, IDS: tl.constexpr):
    """One online-softmax step over k1 block n (logits in log2 units). MASKED=False for blocks wholly inside
    [run start, i] (unpacked: [0, i]): no per-element select (all but <= 2 blocks of most queries). Packed
    (SEG): IDS masks by document id (some id recurs after another run); without it every document is one run
    and its first position `doc` bounds the keys, with no id loads."""
    jpos = j_first + n * BJ + tl.arange(0, BJ)
    cvalid = jpos >= 0
    if MASKED:
        cvalid = cvalid & (jpos <= i)
        if IDS:
            cvalid = cvalid & (tl.load(SEGS + b * S + jpos, mask=cvalid, other=-1) == doc)
        elif SEG:
            cvalid = cvalid & (jpos >= doc)
    k1, v1 = _kv_rows(K1, V1, b, kvh, jpos, cvalid, S, HKV, DK, DV, DKP, DVP)
    s = tl.dot(rows, tl.trans(k1), input_precision=PREC)
    if MASKED:
        s = tl.where(cvalid[None, :], s, _NEG)
    m_new = tl.maximum(m, tl.max(s, axis=1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    l = l * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(V1.dtype.element_ty), v1, input_precision=PREC)
    return m_new, l, acc


@triton.jit
def _fwd_kernel(Q, K1, V1, K2, V2, SEGS, RUNS, O, LSE, S: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr,
                W1: tl.constexpr, W2: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, DKP: tl.constexpr,
                DVP: tl.constexpr, W2P: tl.constexpr, GH: tl.constexpr, BJ: tl.constexpr, SCALE: tl.constexpr,
                PREC: tl.constexpr, SEG: tl.constexpr, RECUR: tl.constexpr):
    """Per query i and head tile: out, lse. RECUR (with SEG): some id recurs after another run, so ids decide
    which keys are the query's document; without it bounds do (the kernel then loads no id per key)."""
    i = tl.program_id(0)
    b = tl.program_id(1) // HKV
    kvh = tl.program_id(1) % HKV
    tile = tl.program_id(2)
    M: tl.constexpr = GH * W2P
    q = _load_heads(Q, b, i, kvh, tile, S, HKV, G, DK, DKP, GH)
    k2 = _load_window(K2, b, i, kvh, S, HKV, W2, DK, DKP, W2P)
    rows = _rows(q, k2 * (SCALE * _LOG2E), GH, W2P, DKP).to(K1.dtype.element_ty)  # logits in log2 units
    dv = tl.arange(0, DVP)
    m = tl.full((M,), _NEG, tl.float32)
    l = tl.zeros((M,), tl.float32)
    acc = tl.zeros((M, DVP), tl.float32)
    # Blocks n_lo <= n < NB cover the window j_first..i from `first`, the first position that can hold a key
    # (0; packed: the document's first position); those in [n_full, n_hi) lie wholly in [clean, i] (clean: 0;
    # packed: the start of i's run), where no key needs a mask. Order: the (partial) block holding `first`
    # first, so the first step sees a valid column and m is real (only an id recurring after another run can
    # give a block with none before it; its p = exp2(NEG - NEG) = 1 terms are wiped by alpha = 0 once m is real).
    j_first = i - W1 + 1
    if SEG:
        doc = tl.load(SEGS + b * S + i)  # canonical id = the document's first position
        clean = tl.load(RUNS + b * S + i)
    else:
        doc = 0
        clean = 0
    lo = doc - j_first
    n_lo = (lo * (lo > 0)) // BJ  # skip blocks wholly before `first` (causal ramp, earlier documents)
    full = clean - j_first
    n_full = tl.cdiv(full * (full > 0), BJ)
    n_hi = W1 // BJ
    IDS: tl.constexpr = SEG and RECUR
    for n in range(n_lo, tl.minimum(n_full, n_hi)):
        m, l, acc = _fwd_block(rows, m, l, acc, K1, V1, SEGS, doc, b, i, kvh, n, j_first, S, HKV, DK, DV, DKP, DVP,
                               BJ, PREC, True, SEG, IDS)
    for n in range(n_full, n_hi):
        m, l, acc = _fwd_block(rows, m, l, acc, K1, V1, SEGS, doc, b, i, kvh, n, j_first, S, HKV, DK, DV, DKP, DVP,
                               BJ, PREC, False, SEG, IDS)
    for n in range(tl.maximum(n_lo, n_hi), tl.cdiv(W1, BJ)):
        m, l, acc = _fwd_block(rows, m, l, acc, K1, V1, SEGS, doc, b, i, kvh, n, j_first, S, HKV, DK, DV, DKP, DVP,
                               BJ, PREC, True, SEG, IDS)
    # Merge the W2P rows of each head (rows of masked blocks have p = exp(NEG - m) = 0 once m is real;
    # every valid row meets j = i, so its m is real by the end). Rows of other documents' k2 keys drop out.
    kk = tl.arange(0, W2P)
    v2m = (kk < W2) & (i - W2 + 1 + kk >= 0)
    if IDS:
        v2m = v2m & (tl.load(SEGS + b * S + i - W2 + 1 + kk, mask=v2m, other=-1) == doc)
    elif SEG:
        v2m = v2m & (i - W2 + 1 + kk >= doc)
    v2 = _load_window(V2, b, i, kvh, S, HKV, W2, DV, DVP, W2P)
    m2 = tl.where(v2m[None, :], tl.reshape(m, (GH, W2P)), _NEG)
    m_head = tl.max(m2, axis=1)
    wgt = tl.where(v2m[None, :], tl.exp2(m2 - m_head[:, None]), 0.0)
    l_head = tl.sum(wgt * tl.reshape(l, (GH, W2P)), axis=1)
    acc3 = tl.reshape(acc, (GH, W2P, DVP))
    o = tl.sum(acc3 * (wgt[:, :, None] * v2[None, :, :]), axis=1) / l_head[:, None]
    h = tile * GH + tl.arange(0, GH)
    hq_h = kvh * G + h
    o_ptr = O + (b * S + i).to(tl.int64) * (HKV * G * DV) + hq_h[:, None] * DV + dv[None, :]
    tl.store(o_ptr, o.to(O.dtype.element_ty), mask=(h[:, None] < G) & (dv[None, :] < DV))
    tl.store(LSE + (b * S + i).to(tl.int64) * (HKV * G) + hq_h, (m_head + tl.log2(l_head)) * _LN2, mask=h < G)


@triton.jit
def _bwd_q_block(rows, e, lse2, delta, f, c, K1, V1, SEGS, doc, b, kvh, n, j_first, lo, hi, S: tl.constexpr,
                 HKV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, DKP: tl.constexpr, DVP: tl.constexpr,
                 BJ: tl.constexpr, PREC: tl.constexpr, IDS: tl.constexpr):
    """dq kernel's step over the keys of k1 block n in [lo, hi]: f += dS @ k1, c += P @ v1. IDS: also mask by
    document id (keys before the query's run start, only where an id recurs); otherwise the bounds alone decide
    (keys in [run start, i], or [0, i] unpacked): the loop that runs for almost every block has no id loads,
    which cost the kernel ~1.8x the loop's instructions and register spills."""
    jpos = j_first + n * BJ + tl.arange(0, BJ)
    cvalid = (jpos >= lo) & (jpos <= hi)
    if IDS:
        cvalid = cvalid & (tl.load(SEGS + b * S + jpos, mask=cvalid, other=-1) == doc)
    k1, v1 = _kv_rows(K1, V1, b, kvh, jpos, cvalid, S, HKV, DK, DV, DKP, DVP)
    p = tl.where(cvalid[None, :], tl.exp2(tl.dot(rows, tl.trans(k1), input_precision=PREC) - lse2[:, None]), 0.0)
    ds = p * (tl.dot(e, tl.trans(v1), input_precision=PREC) - delta[:, None])
    f += tl.dot(ds.to(K1.dtype.element_ty), k1, input_precision=PREC)
    c += tl.dot(p.to(V1.dtype.element_ty), v1, input_precision=PREC)
    return f, c


@triton.jit
def _bwd_q_kernel(Q, K1, V1, K2, V2, SEGS, RUNS, DO, LSE, DELTA, DQ, T2, U2, S: tl.constexpr, HKV: tl.constexpr,
                  G: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                  DKP: tl.constexpr, DVP: tl.constexpr, W2P: tl.constexpr, GH: tl.constexpr, BJ: tl.constexpr,
                  SCALE: tl.constexpr, PREC: tl.constexpr, SEG: tl.constexpr, RECUR: tl.constexpr):
    """Per query i (all head tiles): dq, and t2/u2 rows = this query's dk2/dv2 contributions. RECUR (with SEG):
    some id recurs after another run, so keys before a query's run start may still be its document's; without
    it the k1 loop is the unpacked one with the run start as its lower bound (the id loop's mere presence costs
    the hot loop ~100 spill stores: counted in the sm_90a SASS).
    Register budget: next to the f/c accumulators (64 + 64 registers a thread at M = 128, 8 warps) only the
    bf16 GEMM operands stay live in the k1 loop; the compact k2/v2 window is re-read per tile (L1 hits) and
    t2/u2 are summed over tiles in their output rows (same program, no atomics), not in registers."""
    i = tl.program_id(0)
    b = tl.program_id(1) // HKV
    kvh = tl.program_id(1) % HKV
    M: tl.constexpr = GH * W2P
    dk = tl.arange(0, DKP)
    dv = tl.arange(0, DVP)
    kk = tl.arange(0, W2P)
    base = ((b * S + i) * HKV + kvh).to(tl.int64) * W2P + kk
    t2_ptr = T2 + base[:, None] * DKP + dk[None, :]
    u2_ptr = U2 + base[:, None] * DVP + dv[None, :]
    j_first = i - W1 + 1
    if SEG:
        doc = tl.load(SEGS + b * S + i)  # canonical id = the document's first position
        clean = tl.load(RUNS + b * S + i)
    else:
        doc = 0
        clean = 0
    lo = doc - j_first
    n_lo = (lo * (lo > 0)) // BJ  # the block holding the first position that can hold a key
    run = clean - j_first
    n_run = (run * (run > 0)) // BJ  # the block holding the run start (the window's first block if before it)
    n_ids = (n_run + 1) * (clean > doc) * (run > 0)  # blocks n_lo..n_run hold keys in [first, run start)
    for tile in range(0, tl.cdiv(G, GH)):
        q = _load_heads(Q, b, i, kvh, tile, S, HKV, G, DK, DKP, GH)
        do = _load_heads(DO, b, i, kvh, tile, S, HKV, G, DV, DVP, GH)
        k2 = _load_window(K2, b, i, kvh, S, HKV, W2, DK, DKP, W2P)
        rows = _rows(q, k2 * (SCALE * _LOG2E), GH, W2P, DKP).to(K1.dtype.element_ty)
        e = _rows(do, _load_window(V2, b, i, kvh, S, HKV, W2, DV, DVP, W2P), GH, W2P, DVP).to(K1.dtype.element_ty)
        lse2, delta = _row_stats(LSE, DELTA, SEGS, doc, b, i, kvh, tile, S, HKV, G, W2, W2P, GH, SEG)
        f = tl.zeros((M, DKP), tl.float32)
        c = tl.zeros((M, DVP), tl.float32)
        for n in range(n_run, tl.cdiv(W1, BJ)):  # keys in [run start, i]
            f, c = _bwd_q_block(rows, e, lse2, delta, f, c, K1, V1, SEGS, doc, b, kvh, n, j_first, clean, i, S, HKV,
                                DK, DV, DKP, DVP, BJ, PREC, False)
        if RECUR:  # keys in [first, run start) of an id that recurs after another run: ids decide
            for n in range(n_lo, n_ids):
                f, c = _bwd_q_block(rows, e, lse2, delta, f, c, K1, V1, SEGS, doc, b, kvh, n, j_first, doc, clean - 1,
                                    S, HKV, DK, DV, DKP, DVP, BJ, PREC, True)
        f3 = tl.reshape(f, (GH, W2P, DKP))
        k2 = _load_window(K2, b, i, kvh, S, HKV, W2, DK, DKP, W2P)
        dq = tl.sum(f3 * k2[None, :, :], axis=1) * SCALE
        h = tile * GH + tl.arange(0, GH)
        dq_ptr = DQ + (b * S + i).to(tl.int64) * (HKV * G * DK) + (kvh * G + h)[:, None] * DK + dk[None, :]
        tl.store(dq_ptr, dq.to(DQ.dtype.element_ty), mask=(h[:, None] < G) & (dk[None, :] < DK))
        # The outputs are not zeroed: the first tile writes, later ones add (this program's rows only).
        t2 = tl.load(t2_ptr, mask=(kk[:, None] >= 0) & (tile > 0), other=0.0)
        tl.store(t2_ptr, t2 + tl.sum(f3 * q[:, None, :], axis=0) * SCALE)
        u2 = tl.load(u2_ptr, mask=(kk[:, None] >= 0) & (tile > 0), other=0.0)
        tl.store(u2_ptr, u2 + tl.sum(tl.reshape(c, (GH, W2P, DVP)) * do[:, None, :], axis=0))


@triton.jit
def _bwd_k_kernel(Q, K1, V1, K2, V2, SEGS, DO, LSE, DELTA, DK1, DV1, S: tl.constexpr, HKV: tl.constexpr,
                  G: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                  DKP: tl.constexpr, DVP: tl.constexpr, W2P: tl.constexpr, GH: tl.constexpr, BJ: tl.constexpr,
                  SCALE: tl.constexpr, PREC: tl.constexpr, SEG: tl.constexpr, TILES_PER_SPLIT: tl.constexpr):
    """Per block of BJ k1 positions and a split of head tiles: partial dk1, dv1 (summed over splits later).
    The k2/v2 window is loaded once per query (not per head tile)."""
    jb = tl.program_id(0)
    b = tl.program_id(1) // HKV
    kvh = tl.program_id(1) % HKV
    split = tl.program_id(2)
    dk = tl.arange(0, DKP)
    dv = tl.arange(0, DVP)
    jpos = jb * BJ + tl.arange(0, BJ)
    in_seq = jpos < S
    k1, v1 = _kv_rows(K1, V1, b, kvh, jpos, in_seq, S, HKV, DK, DV, DKP, DVP)
    if SEG:
        segj = tl.load(SEGS + b * S + jpos, mask=in_seq, other=-1)  # canonical ids of the block's keys
    dk1 = tl.zeros((BJ, DKP), tl.float32)
    dv1 = tl.zeros((BJ, DVP), tl.float32)
    t_lo = split * TILES_PER_SPLIT
    t_hi = t_lo + TILES_PER_SPLIT  # splits divide the tiles exactly (see backward)
    i_end = jb * BJ + BJ - 1 + W1  # one past the last query that sees this block
    i_end = i_end - (i_end - S) * (i_end > S)
    for i in range(jb * BJ, i_end):
        cvalid = (jpos <= i) & (jpos > i - W1) & in_seq
        t_stop = t_hi
        if SEG:
            doc = tl.load(SEGS + b * S + i)
            cvalid = cvalid & (segj == doc)
            # a query of another document sees none of the block: no GEMMs (bwd_q's n_lo skip, key side)
            t_stop = t_lo + (t_hi - t_lo) * (tl.max(cvalid.to(tl.int32), axis=0) > 0)
        else:
            doc = 0
        k2 = _load_window(K2, b, i, kvh, S, HKV, W2, DK, DKP, W2P) * (SCALE * _LOG2E)
        v2 = _load_window(V2, b, i, kvh, S, HKV, W2, DV, DVP, W2P)
        for tile in range(t_lo, t_stop):
            q = _load_heads(Q, b, i, kvh, tile, S, HKV, G, DK, DKP, GH)
            do = _load_heads(DO, b, i, kvh, tile, S, HKV, G, DV, DVP, GH)
            rows = _rows(q, k2, GH, W2P, DKP).to(K1.dtype.element_ty)  # scale * log2(e) * q * k2
            e = _rows(do, v2, GH, W2P, DVP).to(K1.dtype.element_ty)
            lse2, delta = _row_stats(LSE, DELTA, SEGS, doc, b, i, kvh, tile, S, HKV, G, W2, W2P, GH, SEG)
            p = tl.where(cvalid[None, :],
                         tl.exp2(tl.dot(rows, tl.trans(k1), input_precision=PREC) - lse2[:, None]), 0.0)
            ds = p * (tl.dot(e, tl.trans(v1), input_precision=PREC) - delta[:, None])
            dv1 += tl.dot(tl.trans(p.to(K1.dtype.element_ty)), e, input_precision=PREC)
            dk1 += tl.dot(tl.trans(ds.to(K1.dtype.element_ty)), rows, input_precision=PREC)
    dk1 = dk1 * _LN2  # rows carry the extra log2(e)
    out = (split * (tl.num_programs(1) * S) + (b * S + jpos) * HKV + kvh).to(tl.int64)
    tl.store(DK1 + out[:, None] * DKP + dk[None, :], dk1, mask=in_seq[:, None])
    tl.store(DV1 + out[:, None] * DVP + dv[None, :], dv1, mask=in_seq[:, None])


def _params(q, k1, v1, cfg, rows=128, seg=None):
    """Kernel constexprs; `rows` is the target M = GH * W2P of a program's GEMMs (power of two >= 16); SEG when
    segment ids are given."""
    b, s, hq, dk = q.shape
    hkv, dv = k1.shape[2], v1.shape[-1]
    g = hq // hkv
    w2p = max(16, common.next_pow2(cfg.w2))
    gh = min(common.next_pow2(g), max(1, rows // w2p))
    if gh * w2p < 16:
        gh = 16 // w2p
    return dict(S=s, HKV=hkv, G=g, W1=cfg.w1, W2=cfg.w2, DK=dk, DV=dv, DKP=max(16, common.next_pow2(dk)),
                DVP=max(16, common.next_pow2(dv)), W2P=w2p, GH=gh, BJ=64, SCALE=cfg.scale,
                PREC="ieee" if q.dtype == jnp.float32 else "tf32",  # float32 inputs: exact fp32 dots
                SEG=seg is not None)


def _documents(seg, n: int):
    """The kernels' SEGS (canonical ids) and RUNS (run starts) [B, S] int32, or n placeholders when unpacked
    (SEG=False kernels never read them)."""
    if seg is None:
        return (jnp.zeros((1,), jnp.int32),) * n
    return reference.segment_starts(seg)[:n]


# Launch settings; tools/bench_simplicial.py sweeps them on the H200 and the best measured are the defaults.
# ROWS: target GEMM M (= GH * W2P rows, GH query heads per program tile); BJ: k1 positions per block.
FWD_LAUNCH = dict(BJ=64, ROWS=128, num_warps=8, num_stages=3)
BWD_Q_LAUNCH = dict(BJ=64, ROWS=128, num_warps=8, num_stages=2)
BWD_K_LAUNCH = dict(BJ=64, ROWS=128, num_warps=8, num_stages=2)


def _split(launch):
    meta = {k: v for k, v in launch.items() if k not in ("num_warps", "num_stages", "ROWS")}
    return meta, launch.get("num_warps", 8), launch.get("num_stages", 2)


def _tile_splits(n_tiles, n_programs, want=0):
    """Largest divisor of n_tiles <= want (want = 0: enough programs for 4 per SM on 132 SMs)."""
    want = want or common.cdiv(4 * 132, n_programs)
    return max(x for x in range(1, n_tiles + 1) if n_tiles % x == 0 and x <= max(1, want))


def _by_recurrence(seg, docs, runs, call):
    """call(RECUR): False for unpacked rows; packed, the id-reading variant only where some id recurs after another
    run (on the device, lax.cond; rare: packing gives every document one run)."""
    if seg is None:
        return call(False)
    return jax.lax.cond(jnp.any(runs != docs), lambda: call(True), lambda: call(False))


def forward(q, k1, v1, k2, v2, seg, cfg):
    """Returns out [B,S,Hq,Dv] (q.dtype) and lse [B,S,Hq] (float32). seg: int32 [B, S] or None."""
    import jax_triton as jt

    b, s, hq, _ = q.shape
    meta, warps, stages = _split(FWD_LAUNCH)
    p = {**_params(q, k1, v1, cfg, FWD_LAUNCH.get("ROWS", 128), seg), **meta}
    grid = (s, b * p["HKV"], triton.cdiv(p["G"], p["GH"]))
    docs, runs = _documents(seg, 2)

    def fwd(recur):
        return jt.triton_call(
            q, k1, v1, k2, v2, docs, runs, kernel=_fwd_kernel,
            out_shape=[jax.ShapeDtypeStruct((b, s, hq, p["DV"]), q.dtype),
                       jax.ShapeDtypeStruct((b, s, hq), jnp.float32)],
            grid=grid, num_warps=warps, num_stages=stages, RECUR=recur, **p)

    return tuple(_by_recurrence(seg, docs, runs, fwd))


def backward(q, k1, v1, k2, v2, seg, do, lse, delta, cfg):
    """Two kernels: per query (dq and the per-query rows t2, u2 [B,S,Hkv,W2P,D] float32 of dk2, dv2; api.py
    sums them along the w2 diagonal) and per block of k1 positions (dk1, dv1). Returns dq, dk1, dv1, t2, u2.
    (Round 1 also had a fused one-pass backward with float32 atomics: 2.4-3x slower, deleted; see the notes.)"""
    import jax_triton as jt

    b, s, hq, dk = q.shape
    docs, runs = _documents(seg, 2)
    meta, warps, stages = _split(BWD_Q_LAUNCH)
    p = {**_params(q, k1, v1, cfg, BWD_Q_LAUNCH.get("ROWS", 128), seg), **meta}
    hkv, dv, w2p = p["HKV"], p["DV"], p["W2P"]

    def bwd_q(recur):
        return jt.triton_call(
            q, k1, v1, k2, v2, docs, runs, do, lse, delta, kernel=_bwd_q_kernel,
            out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                       jax.ShapeDtypeStruct((b, s, hkv, w2p, p["DKP"]), jnp.float32),
                       jax.ShapeDtypeStruct((b, s, hkv, w2p, p["DVP"]), jnp.float32)],
            grid=(s, b * hkv), num_warps=warps, num_stages=stages, RECUR=recur, **p)

    dq, t2, u2 = _by_recurrence(seg, docs, runs, bwd_q)
    meta, warps, stages = _split(BWD_K_LAUNCH)
    p = {**_params(q, k1, v1, cfg, BWD_K_LAUNCH.get("ROWS", 128), seg), **meta}
    n_tiles = triton.cdiv(p["G"], p["GH"])
    n_jb = triton.cdiv(s, p["BJ"])
    # Split the head tiles over programs until there are enough to fill the GPU (splits divide n_tiles).
    splits = _tile_splits(n_tiles, n_jb * b * hkv)
    dk1, dv1 = jt.triton_call(
        q, k1, v1, k2, v2, docs, do, lse, delta, kernel=_bwd_k_kernel,
        out_shape=[jax.ShapeDtypeStruct((splits, b, s, hkv, p["DKP"]), jnp.float32),
                   jax.ShapeDtypeStruct((splits, b, s, hkv, p["DVP"]), jnp.float32)],
        grid=(n_jb, b * hkv, splits), num_warps=warps, num_stages=stages, TILES_PER_SPLIT=n_tiles // splits, **p)
    return dq, dk1.sum(0)[..., :dk], dv1.sum(0)[..., :dv], t2[..., :dk], u2[..., :dv]
