"""Triton kernels (through jax-triton) for 2-simplicial attention on GPU.

Same algorithm as pallas_tpu.py (see its docstring and docs/notes/simplicial.md): a program owns one query
i and a tile of GH query heads of one K/V head; its rows r = (h, k) hold b_r = scale * q_ih * k2_k for the
W2P (>= w2) keys of the k2 window, so M = GH * W2P rows (128 for w2 = 32) meet blocks of BJ keys of the k1
window in two dense tensor-core GEMMs per block (logits, then P @ V1), flash-attention style, with a
per-row online softmax merged per head in the epilogue. No element-wise work scales with w1 * w2 beyond
the softmax itself. Inputs are the public [B, S, H, D] layout, contiguous; offsets use int64 bases.
Backward: `BACKWARD = "fused"` (one pass over the logits per block of k1 positions, 6 GEMM units, float32
atomics for dq/dk2/dv2) or "two_kernel" (per-query + per-k1-block kernels, 8 units, no atomics).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

_NEG = tl.constexpr(-1.0e30)  # Triton kernels may only read constexpr globals
_INF = tl.constexpr(float("inf"))


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


@triton.jit
def _load_rows(Q, K2, b, i, kvh, tile, S: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, W2: tl.constexpr,
               DK: tl.constexpr, DKP: tl.constexpr, W2P: tl.constexpr, GH: tl.constexpr, SCALE: tl.constexpr):
    """Rows r = (h, kk), h = tile*GH + r // W2P, k2 position i - W2 + 1 + r % W2P.
    Loads q [GH, D] and k2 [W2P, D] compactly and broadcasts them in registers (gathered [M, D] loads
    get multi-buffered in shared memory by the pipeliner). Returns q rows, k2 rows (float32),
    b rows = scale*q*k2, valid [M], query-head index [M]."""
    r = tl.arange(0, GH * W2P)
    valid = (r % W2P < W2) & (i - W2 + 1 + r % W2P >= 0) & (tile * GH + r // W2P < G)
    hq = kvh * G + tile * GH + r // W2P
    dk = tl.arange(0, DKP)
    h = tile * GH + tl.arange(0, GH)
    q = tl.load(Q + (b * S + i).to(tl.int64) * (HKV * G * DK) + (kvh * G + h)[:, None] * DK + dk[None, :],
                mask=(h[:, None] < G) & (dk[None, :] < DK), other=0.0).to(tl.float32)
    kk = tl.arange(0, W2P)
    kpos = i - W2 + 1 + kk
    k2 = tl.load(K2 + (b * S + kpos).to(tl.int64)[:, None] * (HKV * DK) + kvh * DK + dk[None, :],
                 mask=((kk < W2) & (kpos >= 0))[:, None] & (dk[None, :] < DK), other=0.0).to(tl.float32)
    q_rows = tl.reshape(tl.broadcast_to(q[:, None, :], (GH, W2P, DKP)), (GH * W2P, DKP))
    k2_rows = tl.reshape(tl.broadcast_to(k2[None, :, :], (GH, W2P, DKP)), (GH * W2P, DKP))
    return q_rows, k2_rows, q_rows * SCALE * k2_rows, valid, hq


@triton.jit
def _load_do_rows(DO, V2, b, i, kvh, tile, S: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr,
                  W2: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr, W2P: tl.constexpr, GH: tl.constexpr):
    """dO rows (dO of the row's head) and v2 rows, float32 [M, DVP], loaded compactly like _load_rows."""
    dv = tl.arange(0, DVP)
    h = tile * GH + tl.arange(0, GH)
    do = tl.load(DO + (b * S + i).to(tl.int64) * (HKV * G * DV) + (kvh * G + h)[:, None] * DV + dv[None, :],
                 mask=(h[:, None] < G) & (dv[None, :] < DV), other=0.0).to(tl.float32)
    kk = tl.arange(0, W2P)
    kpos = i - W2 + 1 + kk
    v2 = tl.load(V2 + (b * S + kpos).to(tl.int64)[:, None] * (HKV * DV) + kvh * DV + dv[None, :],
                 mask=((kk < W2) & (kpos >= 0))[:, None] & (dv[None, :] < DV), other=0.0).to(tl.float32)
    do_rows = tl.reshape(tl.broadcast_to(do[:, None, :], (GH, W2P, DVP)), (GH * W2P, DVP))
    v2_rows = tl.reshape(tl.broadcast_to(v2[None, :, :], (GH, W2P, DVP)), (GH * W2P, DVP))
    return do_rows, v2_rows


@triton.jit
def _fwd_kernel(Q, K1, V1, K2, V2, O, LSE, S: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr,
                W1: tl.constexpr, W2: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, DKP: tl.constexpr,
                DVP: tl.constexpr, W2P: tl.constexpr, GH: tl.constexpr, BJ: tl.constexpr, SCALE: tl.constexpr, PREC: tl.constexpr):
    i = tl.program_id(0)
    b = tl.program_id(1) // HKV
    kvh = tl.program_id(1) % HKV
    tile = tl.program_id(2)
    M: tl.constexpr = GH * W2P
    _, _, rows, valid, hq = _load_rows(Q, K2, b, i, kvh, tile, S, HKV, G, W2, DK, DKP, W2P, GH, SCALE)
    rows = rows.to(K1.dtype.element_ty)
    dk = tl.arange(0, DKP)
    dv = tl.arange(0, DVP)
    m = tl.full((M,), _NEG, tl.float32)
    l = tl.zeros((M,), tl.float32)
    acc = tl.zeros((M, DVP), tl.float32)
    j_first = i - W1 + 1
    n_lo = (-j_first * (j_first < 0)) // BJ  # skip blocks wholly before position 0 (causal ramp)
    for n in range(n_lo, tl.cdiv(W1, BJ)):
        jpos = j_first + n * BJ + tl.arange(0, BJ)
        cvalid = (jpos >= 0) & (jpos <= i)
        off = (b * S + jpos).to(tl.int64) * (HKV * DK) + kvh * DK
        k1 = tl.load(K1 + off[:, None] + dk[None, :], mask=cvalid[:, None] & (dk[None, :] < DK), other=0.0)
        offv = (b * S + jpos).to(tl.int64) * (HKV * DV) + kvh * DV
        v1 = tl.load(V1 + offv[:, None] + dv[None, :], mask=cvalid[:, None] & (dv[None, :] < DV), other=0.0)
        s = tl.dot(rows, tl.trans(k1), input_precision=PREC)
        s = tl.where(cvalid[None, :], s, _NEG)
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(V1.dtype.element_ty), v1, input_precision=PREC)
        m = m_new
    # Merge the W2P rows of each head (rows of masked blocks have p = exp(NEG - m) = 0 once m is real;
    # every valid row meets j = i, so its m is real by the end).
    kk = tl.arange(0, W2P)
    kpos = i - W2 + 1 + kk
    v2m = (kk < W2) & (kpos >= 0)
    v2 = tl.load(V2 + (b * S + kpos).to(tl.int64)[:, None] * (HKV * DV) + kvh * DV + dv[None, :],
                 mask=v2m[:, None] & (dv[None, :] < DV), other=0.0).to(tl.float32)
    m2 = tl.where(v2m[None, :], tl.reshape(m, (GH, W2P)), _NEG)
    m_head = tl.max(m2, axis=1)
    wgt = tl.where(v2m[None, :], tl.exp(m2 - m_head[:, None]), 0.0)
    l_head = tl.sum(wgt * tl.reshape(l, (GH, W2P)), axis=1)
    acc3 = tl.reshape(acc, (GH, W2P, DVP))
    o = tl.sum(acc3 * (wgt[:, :, None] * v2[None, :, :]), axis=1) / l_head[:, None]
    h = tile * GH + tl.arange(0, GH)
    hq_h = kvh * G + h
    o_ptr = O + (b * S + i).to(tl.int64) * (HKV * G * DV) + hq_h[:, None] * DV + dv[None, :]
    tl.store(o_ptr, o.to(O.dtype.element_ty), mask=(h[:, None] < G) & (dv[None, :] < DV))
    tl.store(LSE + (b * S + i).to(tl.int64) * (HKV * G) + hq_h, m_head + tl.log(l_head), mask=h < G)


@triton.jit
def _bwd_q_kernel(Q, K1, V1, K2, V2, DO, LSE, DELTA, DQ, T2, U2, S: tl.constexpr, HKV: tl.constexpr,
                  G: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                  DKP: tl.constexpr, DVP: tl.constexpr, W2P: tl.constexpr, GH: tl.constexpr, BJ: tl.constexpr,
                  SCALE: tl.constexpr, PREC: tl.constexpr):
    """Per query i (all head tiles): dq, and t2/u2 rows = this query's dk2/dv2 contributions."""
    i = tl.program_id(0)
    b = tl.program_id(1) // HKV
    kvh = tl.program_id(1) % HKV
    M: tl.constexpr = GH * W2P
    dk = tl.arange(0, DKP)
    dv = tl.arange(0, DVP)
    t2 = tl.zeros((W2P, DKP), tl.float32)
    u2 = tl.zeros((W2P, DVP), tl.float32)
    j_first = i - W1 + 1
    n_lo = (-j_first * (j_first < 0)) // BJ
    for tile in range(0, tl.cdiv(G, GH)):
        q, k2, rows, valid, hq = _load_rows(Q, K2, b, i, kvh, tile, S, HKV, G, W2, DK, DKP, W2P, GH, SCALE)
        do, v2 = _load_do_rows(DO, V2, b, i, kvh, tile, S, HKV, G, W2, DV, DVP, W2P, GH)
        rows = rows.to(K1.dtype.element_ty)
        e = (do * v2).to(K1.dtype.element_ty)
        hoff = (b * S + i).to(tl.int64) * (HKV * G) + hq
        lse = tl.load(LSE + hoff, mask=valid, other=_INF)
        lse = tl.where(valid, lse, _INF)
        delta = tl.load(DELTA + hoff, mask=valid, other=0.0)
        f = tl.zeros((M, DKP), tl.float32)
        c = tl.zeros((M, DVP), tl.float32)
        for n in range(n_lo, tl.cdiv(W1, BJ)):
            jpos = j_first + n * BJ + tl.arange(0, BJ)
            cvalid = (jpos >= 0) & (jpos <= i)
            off = (b * S + jpos).to(tl.int64) * (HKV * DK) + kvh * DK
            k1 = tl.load(K1 + off[:, None] + dk[None, :], mask=cvalid[:, None] & (dk[None, :] < DK), other=0.0)
            offv = (b * S + jpos).to(tl.int64) * (HKV * DV) + kvh * DV
            v1 = tl.load(V1 + offv[:, None] + dv[None, :], mask=cvalid[:, None] & (dv[None, :] < DV), other=0.0)
            p = tl.where(cvalid[None, :], tl.exp(tl.dot(rows, tl.trans(k1), input_precision=PREC) - lse[:, None]), 0.0)
            ds = p * (tl.dot(e, tl.trans(v1), input_precision=PREC) - delta[:, None])
            f += tl.dot(ds.to(K1.dtype.element_ty), k1, input_precision=PREC)
            c += tl.dot(p.to(V1.dtype.element_ty), v1, input_precision=PREC)
        dq = tl.sum(tl.reshape(f * k2, (GH, W2P, DKP)), axis=1) * SCALE
        h = tile * GH + tl.arange(0, GH)
        dq_ptr = DQ + (b * S + i).to(tl.int64) * (HKV * G * DK) + (kvh * G + h)[:, None] * DK + dk[None, :]
        tl.store(dq_ptr, dq.to(DQ.dtype.element_ty), mask=(h[:, None] < G) & (dk[None, :] < DK))
        t2 += tl.sum(tl.reshape(f * q, (GH, W2P, DKP)), axis=0) * SCALE
        u2 += tl.sum(tl.reshape(c * do, (GH, W2P, DVP)), axis=0)
    kk = tl.arange(0, W2P)
    base = ((b * S + i) * HKV + kvh).to(tl.int64) * W2P + kk
    tl.store(T2 + base[:, None] * DKP + dk[None, :], t2)
    tl.store(U2 + base[:, None] * DVP + dv[None, :], u2)


@triton.jit
def _bwd_k_kernel(Q, K1, V1, K2, V2, DO, LSE, DELTA, DK1, DV1, S: tl.constexpr, HKV: tl.constexpr,
                  G: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                  DKP: tl.constexpr, DVP: tl.constexpr, W2P: tl.constexpr, GH: tl.constexpr, BJ: tl.constexpr,
                  SCALE: tl.constexpr, PREC: tl.constexpr, TILES_PER_SPLIT: tl.constexpr):
    """Per block of BJ k1 positions and a split of head tiles: partial dk1, dv1 (summed over splits later)."""
    jb = tl.program_id(0)
    b = tl.program_id(1) // HKV
    kvh = tl.program_id(1) % HKV
    split = tl.program_id(2)
    dk = tl.arange(0, DKP)
    dv = tl.arange(0, DVP)
    jpos = jb * BJ + tl.arange(0, BJ)
    in_seq = jpos < S
    off = (b * S + jpos).to(tl.int64) * (HKV * DK) + kvh * DK
    k1 = tl.load(K1 + off[:, None] + dk[None, :], mask=in_seq[:, None] & (dk[None, :] < DK), other=0.0)
    offv = (b * S + jpos).to(tl.int64) * (HKV * DV) + kvh * DV
    v1 = tl.load(V1 + offv[:, None] + dv[None, :], mask=in_seq[:, None] & (dv[None, :] < DV), other=0.0)
    dk1 = tl.zeros((BJ, DKP), tl.float32)
    dv1 = tl.zeros((BJ, DVP), tl.float32)
    t_lo = split * TILES_PER_SPLIT
    t_hi = t_lo + TILES_PER_SPLIT  # splits divide the tiles exactly (see backward)
    i_end = jb * BJ + BJ - 1 + W1  # one past the last query that sees this block
    i_end = i_end - (i_end - S) * (i_end > S)
    for i in range(jb * BJ, i_end):
        cvalid = (jpos <= i) & (jpos > i - W1) & in_seq
        for tile in range(t_lo, t_hi):
            q, k2, rows, valid, hq = _load_rows(Q, K2, b, i, kvh, tile, S, HKV, G, W2, DK, DKP, W2P, GH, SCALE)
            do, v2 = _load_do_rows(DO, V2, b, i, kvh, tile, S, HKV, G, W2, DV, DVP, W2P, GH)
            rows = rows.to(K1.dtype.element_ty)
            e = (do * v2).to(K1.dtype.element_ty)
            hoff = (b * S + i).to(tl.int64) * (HKV * G) + hq
            lse = tl.load(LSE + hoff, mask=valid, other=_INF)
            lse = tl.where(valid, lse, _INF)
            delta = tl.load(DELTA + hoff, mask=valid, other=0.0)
            p = tl.where(cvalid[None, :], tl.exp(tl.dot(rows, tl.trans(k1), input_precision=PREC) - lse[:, None]), 0.0)
            ds = p * (tl.dot(e, tl.trans(v1), input_precision=PREC) - delta[:, None])
            dv1 += tl.dot(tl.trans(p.to(K1.dtype.element_ty)), e, input_precision=PREC)
            dk1 += tl.dot(tl.trans(ds.to(K1.dtype.element_ty)), rows, input_precision=PREC)
    out = (split * (tl.num_programs(1) * S) + (b * S + jpos) * HKV + kvh).to(tl.int64)
    tl.store(DK1 + out[:, None] * DKP + dk[None, :], dk1, mask=in_seq[:, None])
    tl.store(DV1 + out[:, None] * DVP + dv[None, :], dv1, mask=in_seq[:, None])


@triton.jit
def _bwd_fused_kernel(Q, K1, V1, K2, V2, DO, LSE, DELTA, DQ, DK2, DV2, DK1, DV1, S: tl.constexpr,
                      HKV: tl.constexpr, G: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr, DK: tl.constexpr,
                      DV: tl.constexpr, DKP: tl.constexpr, DVP: tl.constexpr, W2P: tl.constexpr, GH: tl.constexpr,
                      BJ: tl.constexpr, SCALE: tl.constexpr, PREC: tl.constexpr, TILES_PER_SPLIT: tl.constexpr):
    """One pass over the logits (6 GEMM units: S, dP, dV1, dK1, dB = dS K1, C = P V1).

    Program = (block of BJ k1 positions, batch*kv-head, split of head tiles); it keeps dk1/dv1 [BJ, D] in
    registers while looping over every query whose w1 window covers the block, and sends the query-side
    gradients as float32 atomic adds: dq_ih += scale * sum_k k2_k * dB_(h,k); dk2_k += scale * sum_h q_ih *
    dB_(h,k); dv2_k += sum_h dO_ih * C_(h,k) (both summed over the program's head tiles first)."""
    jb = tl.program_id(0)
    b = tl.program_id(1) // HKV
    kvh = tl.program_id(1) % HKV
    split = tl.program_id(2)
    M: tl.constexpr = GH * W2P
    dk = tl.arange(0, DKP)
    dv = tl.arange(0, DVP)
    kk = tl.arange(0, W2P)
    jpos = jb * BJ + tl.arange(0, BJ)
    in_seq = jpos < S
    off = (b * S + jpos).to(tl.int64) * (HKV * DK) + kvh * DK
    k1 = tl.load(K1 + off[:, None] + dk[None, :], mask=in_seq[:, None] & (dk[None, :] < DK), other=0.0)
    offv = (b * S + jpos).to(tl.int64) * (HKV * DV) + kvh * DV
    v1 = tl.load(V1 + offv[:, None] + dv[None, :], mask=in_seq[:, None] & (dv[None, :] < DV), other=0.0)
    dk1 = tl.zeros((BJ, DKP), tl.float32)
    dv1 = tl.zeros((BJ, DVP), tl.float32)
    t_lo = split * TILES_PER_SPLIT
    i_end = jb * BJ + BJ - 1 + W1  # one past the last query that sees this block
    i_end = i_end - (i_end - S) * (i_end > S)
    for i in range(jb * BJ, i_end):
        cvalid = (jpos <= i) & (jpos > i - W1) & in_seq
        # Compact per-query operands; [M, D] row tensors exist only as the bf16 GEMM operands and the f32
        # reductions run on [GH, W2P, D] views (register pressure: dk1/dv1 stay live across the loop).
        kpos = i - W2 + 1 + kk
        kvalid = (kk < W2) & (kpos >= 0)
        kbase = (b * S + kpos).to(tl.int64) * HKV + kvh
        k2 = tl.load(K2 + kbase[:, None] * DK + dk[None, :], mask=kvalid[:, None] & (dk[None, :] < DK),
                     other=0.0).to(tl.float32)
        v2 = tl.load(V2 + kbase[:, None] * DV + dv[None, :], mask=kvalid[:, None] & (dv[None, :] < DV),
                     other=0.0).to(tl.float32)
        t2 = tl.zeros((W2P, DKP), tl.float32)
        u2 = tl.zeros((W2P, DVP), tl.float32)
        for tile in range(t_lo, t_lo + TILES_PER_SPLIT):
            h = tile * GH + tl.arange(0, GH)
            qbase = (b * S + i).to(tl.int64) * (HKV * G) + kvh * G + h
            q = tl.load(Q + qbase[:, None] * DK + dk[None, :], mask=(h[:, None] < G) & (dk[None, :] < DK),
                        other=0.0).to(tl.float32)
            do = tl.load(DO + qbase[:, None] * DV + dv[None, :], mask=(h[:, None] < G) & (dv[None, :] < DV),
                         other=0.0).to(tl.float32)
            rows = tl.reshape(q[:, None, :] * (k2 * SCALE)[None, :, :], (M, DKP)).to(K1.dtype.element_ty)
            e = tl.reshape(do[:, None, :] * v2[None, :, :], (M, DVP)).to(K1.dtype.element_ty)
            valid = kvalid[None, :] & (h[:, None] < G)
            hoff = tl.reshape(qbase[:, None] + 0 * kk[None, :], (M,))
            rvalid = tl.reshape(valid, (M,))
            lse = tl.load(LSE + hoff, mask=rvalid, other=_INF)
            lse = tl.where(rvalid, lse, _INF)
            delta = tl.load(DELTA + hoff, mask=rvalid, other=0.0)
            p = tl.where(cvalid[None, :], tl.exp(tl.dot(rows, tl.trans(k1), input_precision=PREC) - lse[:, None]), 0.0)
            ds = p * (tl.dot(e, tl.trans(v1), input_precision=PREC) - delta[:, None])
            p16 = p.to(K1.dtype.element_ty)
            ds16 = ds.to(K1.dtype.element_ty)
            dv1 += tl.dot(tl.trans(p16), e, input_precision=PREC)
            dk1 += tl.dot(tl.trans(ds16), rows, input_precision=PREC)
            f = tl.reshape(tl.dot(ds16, k1, input_precision=PREC), (GH, W2P, DKP))
            dq = tl.sum(f * k2[None, :, :], axis=1) * SCALE
            tl.atomic_add(DQ + qbase[:, None] * DK + dk[None, :], dq, mask=(h[:, None] < G) & (dk[None, :] < DK),
                          sem="relaxed")
            t2 += tl.sum(f * q[:, None, :], axis=0) * SCALE
            c = tl.reshape(tl.dot(p16, v1, input_precision=PREC), (GH, W2P, DVP))
            u2 += tl.sum(c * do[:, None, :], axis=0)
        tl.atomic_add(DK2 + kbase[:, None] * DK + dk[None, :], t2, mask=kvalid[:, None] & (dk[None, :] < DK),
                      sem="relaxed")
        tl.atomic_add(DV2 + kbase[:, None] * DV + dv[None, :], u2, mask=kvalid[:, None] & (dv[None, :] < DV),
                      sem="relaxed")
    out = (split * (tl.num_programs(1) * S) + (b * S + jpos) * HKV + kvh).to(tl.int64)
    tl.store(DK1 + out[:, None] * DKP + dk[None, :], dk1, mask=in_seq[:, None])
    tl.store(DV1 + out[:, None] * DVP + dv[None, :], dv1, mask=in_seq[:, None])


def _params(q, k1, v1, cfg, rows=128):
    """Kernel constexprs; `rows` is the target M = GH * W2P of a program's GEMMs (power of two >= 16)."""
    b, s, hq, dk = q.shape
    hkv, dv = k1.shape[2], v1.shape[-1]
    g = hq // hkv
    w2p = max(16, _next_pow2(cfg.w2))
    gh = min(_next_pow2(g), max(1, rows // w2p))
    if gh * w2p < 16:
        gh = 16 // w2p
    return dict(S=s, HKV=hkv, G=g, W1=cfg.w1, W2=cfg.w2, DK=dk, DV=dv, DKP=max(16, _next_pow2(dk)),
                DVP=max(16, _next_pow2(dv)), W2P=w2p, GH=gh, BJ=64, SCALE=cfg.scale,
                PREC="ieee" if q.dtype == jnp.float32 else "tf32")  # float32 inputs: exact fp32 dots


# Launch settings; tools/bench_simplicial.py sweeps them on the H200 and the best measured are the defaults.
# GH (query heads per program tile, M = GH * W2P rows) may be overridden per launch.
FWD_LAUNCH = dict(BJ=64, ROWS=128, num_warps=8, num_stages=3)
BWD_Q_LAUNCH = dict(BJ=64, num_warps=8, num_stages=1)
BWD_K_LAUNCH = dict(BJ=64, num_warps=8, num_stages=1)
# Backward: "fused" (one pass, 6 GEMM units, atomics for dq/dk2/dv2) or "two_kernel" (8 units, no atomics).
BACKWARD = "fused"
# SPLITS: programs per k1 block (the largest divisor of the head-tile count <= SPLITS; 0 = enough to fill the GPU).
# ROWS: target GEMM M (= GH * W2P); 64 halves the per-step register tiles next to the live dk1/dv1.
BWD_FUSED_LAUNCH = dict(BJ=64, ROWS=64, num_warps=8, num_stages=1, SPLITS=1)


def _split(launch):
    meta = {k: v for k, v in launch.items() if k not in ("num_warps", "num_stages", "SPLITS", "ROWS")}
    return meta, launch.get("num_warps", 8), launch.get("num_stages", 2)


def _tile_splits(n_tiles, n_programs, want=0):
    """Largest divisor of n_tiles <= want (want = 0: enough programs for 4 per SM on 132 SMs)."""
    want = want or -(-4 * 132 // n_programs)
    return max(x for x in range(1, n_tiles + 1) if n_tiles % x == 0 and x <= max(1, want))


def forward(q, k1, v1, k2, v2, cfg):
    """Returns out [B,S,Hq,Dv] (q.dtype) and lse [B,S,Hq] (float32)."""
    import jax_triton as jt

    b, s, hq, _ = q.shape
    meta, warps, stages = _split(FWD_LAUNCH)
    p = {**_params(q, k1, v1, cfg, FWD_LAUNCH.get("ROWS", 128)), **meta}
    grid = (s, b * p["HKV"], triton.cdiv(p["G"], p["GH"]))
    out, lse = jt.triton_call(
        q, k1, v1, k2, v2, kernel=_fwd_kernel,
        out_shape=[jax.ShapeDtypeStruct((b, s, hq, p["DV"]), q.dtype), jax.ShapeDtypeStruct((b, s, hq), jnp.float32)],
        grid=grid, num_warps=warps, num_stages=stages, **p)
    return out, lse


def backward(q, k1, v1, k2, v2, do, lse, delta, cfg):
    """Returns dq, dk1, dv1 and dk2, dv2 (fused: [B,S,Hkv,D] float32) or the per-query rows t2, u2
    [B,S,Hkv,W2P,D] float32 (two_kernel); api.py sums the rows along the w2 diagonal."""
    if BACKWARD == "fused":
        return _backward_fused(q, k1, v1, k2, v2, do, lse, delta, cfg)
    if BACKWARD != "two_kernel":
        raise ValueError(f"triton_gpu.BACKWARD must be 'fused' or 'two_kernel', got {BACKWARD!r}")
    return _backward_two_kernel(q, k1, v1, k2, v2, do, lse, delta, cfg)


def _backward_fused(q, k1, v1, k2, v2, do, lse, delta, cfg):
    import jax_triton as jt

    b, s, hq, dk = q.shape
    meta, warps, stages = _split(BWD_FUSED_LAUNCH)
    p = {**_params(q, k1, v1, cfg, BWD_FUSED_LAUNCH.get("ROWS", 128)), **meta}
    hkv, dv = p["HKV"], p["DV"]
    n_tiles = triton.cdiv(p["G"], p["GH"])
    n_jb = triton.cdiv(s, p["BJ"])
    splits = _tile_splits(n_tiles, n_jb * b * hkv, BWD_FUSED_LAUNCH.get("SPLITS", 1))
    dq, dk2, dv2, dk1, dv1 = jt.triton_call(
        q, k1, v1, k2, v2, do, lse, delta, kernel=_bwd_fused_kernel,
        out_shape=[jax.ShapeDtypeStruct(q.shape, jnp.float32),
                   jax.ShapeDtypeStruct((b, s, hkv, dk), jnp.float32),
                   jax.ShapeDtypeStruct((b, s, hkv, dv), jnp.float32),
                   jax.ShapeDtypeStruct((splits, b, s, hkv, p["DKP"]), jnp.float32),
                   jax.ShapeDtypeStruct((splits, b, s, hkv, p["DVP"]), jnp.float32)],
        zeroed_outputs=(0, 1, 2),  # atomic-add targets
        grid=(n_jb, b * hkv, splits), num_warps=warps, num_stages=stages, TILES_PER_SPLIT=n_tiles // splits, **p)
    return dq, dk1.sum(0)[..., :dk], dv1.sum(0)[..., :dv], dk2, dv2


def _backward_two_kernel(q, k1, v1, k2, v2, do, lse, delta, cfg):
    import jax_triton as jt

    b, s, hq, dk = q.shape
    meta, warps, stages = _split(BWD_Q_LAUNCH)
    p = {**_params(q, k1, v1, cfg), **meta}
    hkv, dv, w2p = p["HKV"], p["DV"], p["W2P"]
    dq, t2, u2 = jt.triton_call(
        q, k1, v1, k2, v2, do, lse, delta, kernel=_bwd_q_kernel,
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, s, hkv, w2p, p["DKP"]), jnp.float32),
                   jax.ShapeDtypeStruct((b, s, hkv, w2p, p["DVP"]), jnp.float32)],
        grid=(s, b * hkv), num_warps=warps, num_stages=stages, **p)
    meta, warps, stages = _split(BWD_K_LAUNCH)
    p = {**p, **meta}
    n_tiles = triton.cdiv(p["G"], p["GH"])
    n_jb = triton.cdiv(s, p["BJ"])
    # Split the head tiles over programs until there are enough to fill the GPU (splits divide n_tiles).
    splits = _tile_splits(n_tiles, n_jb * b * hkv)
    per_split = n_tiles // splits
    dk1, dv1 = jt.triton_call(
        q, k1, v1, k2, v2, do, lse, delta, kernel=_bwd_k_kernel,
        out_shape=[jax.ShapeDtypeStruct((splits, b, s, hkv, p["DKP"]), jnp.float32),
                   jax.ShapeDtypeStruct((splits, b, s, hkv, p["DVP"]), jnp.float32)],
        grid=(n_jb, b * hkv, splits), num_warps=warps, num_stages=stages, TILES_PER_SPLIT=per_split, **p)
    dk1 = dk1.sum(0)[..., :dk]
    dv1 = dv1.sum(0)[..., :dv]
    return dq, dk1, dv1, t2[..., :dk], u2[..., :dv]
