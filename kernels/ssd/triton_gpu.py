"""SSD stages as Triton kernels (called through jax-triton 0.3.1): the GPU path.

Same stages and layouts as reference.py (x [b,c,Q,h,P], B/C [b,c,Q,g,N], dt/cs [b,h,c,Q] f32, states
[b,c+1,h,P,N] f32). C B^T is shared by the heads of a group: `chunk_cb` computes it once per
(batch, chunk, group) into cb [b, c, g, Q, Q] f32 (as mamba_ssm does; memory linear in seq), and chunk_scan and
the dx/dB backward read its tiles. Every per-head Q x Q interaction (the decay mask, dt, dy x^T) is formed in
registers one tile at a time and consumed by the next tensor-core product, so no per-head Q x Q matrix touches
device memory. Matrix products take the input dtype (bf16) with float32 accumulation; decays, cumsums and
states stay float32 (states are rounded to the input dtype only as a matmul operand, as in mamba_ssm).
Backward kernels loop over the heads of a group inside one program so dB and dC (shared by the group's heads)
are summed in registers instead of written per head.
Packed rows: chunk_scan and both backward kernels take a constexpr SEG and, with it, one int32 per position of
their tile rows (`_doc_bounds`): start_t (query-side kernels) or end_s (dx/dB), the chunk-relative first / last
position of that row's document. As r is non-decreasing, "same document and causal" is s in [max(start_t, 0), t],
i.e. t in [s, end_s]: the kernels test it with ONE unsigned compare per element, (s - lo_t) <= (t - lo_t) as
uint32 (a negative s - lo_t wraps above any bound), in place of the causal compare: no per-tile load, no
second per-element test (a two-compare form took chunk_scan from 168 to 254 registers at the default tiles,
sm_90a, i.e. 3 -> 2 programs per SM; this form keeps 168). The state term's row factor is zeroed where
start_t >= 0 (r_t != 0) and dS_{c+1}'s where end_s < Q - 1. Rows whose documents begin late skip the tiles before them
(the s loop starts at the block's first start_t, the t loop ends after its last end_s). SEG=False compiles
the unpacked kernels unchanged (the bounds pointer is then a 1-element placeholder never read).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

F32 = jnp.float32


@triton.jit
def _chunk_state_kernel(x_ptr, b_ptr, w_ptr, out_ptr, L: tl.constexpr, H: tl.constexpr, G: tl.constexpr,
                        P: tl.constexpr, N: tl.constexpr, Q: tl.constexpr, NC: tl.constexpr, BP: tl.constexpr,
                        BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """out[b,c,h] = sum_t w[b,h,t] x[b,t,h]^T B[b,t,g] over the chunk's Q positions -> [P, N] f32."""
    pid = tl.program_id(0)
    h = pid % H
    c = (pid // H) % NC
    bb = (pid // (H * NC)).to(tl.int64)
    g = h // (H // G)
    op = tl.arange(0, BP)
    on = tl.arange(0, BN)
    ok = tl.arange(0, BK)
    acc = tl.zeros([BP, BN], dtype=tl.float32)
    for k0 in range(0, Q, BK):
        t = c * Q + k0 + ok
        xt = tl.load(x_ptr + bb * L * H * P + t[None, :] * (H * P) + h * P + op[:, None], mask=op[:, None] < P,
                     other=0.0)
        bm = tl.load(b_ptr + bb * L * G * N + t[:, None] * (G * N) + g * N + on[None, :], mask=on[None, :] < N,
                     other=0.0)
        w = tl.load(w_ptr + (bb * H + h) * L + t)
        bm = (bm.to(tl.float32) * w[:, None]).to(x_ptr.dtype.element_ty)
        acc += tl.dot(xt, bm, input_precision=PREC)
    base = ((bb * NC + c) * H + h) * (P * N)
    tl.store(out_ptr + base + op[:, None] * N + on[None, :], acc, mask=(op[:, None] < P) & (on[None, :] < N))


@triton.jit
def _cb_kernel(b_ptr, c_ptr, cb_ptr, L: tl.constexpr, G: tl.constexpr, N: tl.constexpr, Q: tl.constexpr,
               NC: tl.constexpr, BN: tl.constexpr, CBM: tl.constexpr, CBK: tl.constexpr, PREC: tl.constexpr):
    """cb[b,c,g,t,s] = C[b,t,g].B[b,s,g] for one CBM x CBK tile of a chunk (whole N contracted at once).
    Tiles strictly above the diagonal are computed too (never read; 2x of a tiny kernel keeps it simple)."""
    pid = tl.program_id(0)
    NK: tl.constexpr = Q // CBK
    NM: tl.constexpr = Q // CBM
    kt = pid % NK
    mt = (pid // NK) % NM
    g = (pid // (NK * NM)) % G
    c = (pid // (NK * NM * G)) % NC
    bb = (pid // (NK * NM * G * NC)).to(tl.int64)
    on = tl.arange(0, BN)
    om = mt * CBM + tl.arange(0, CBM)
    ok = kt * CBK + tl.arange(0, CBK)
    bcoff = bb * L * G * N + g * N
    cm = tl.load(c_ptr + bcoff + (c * Q + om)[:, None] * (G * N) + on[None, :], mask=on[None, :] < N, other=0.0)
    bk = tl.load(b_ptr + bcoff + (c * Q + ok)[:, None] * (G * N) + on[None, :], mask=on[None, :] < N, other=0.0)
    cb = tl.dot(cm, tl.trans(bk), input_precision=PREC)
    base = ((bb * NC + c) * G + g) * (Q * Q)
    tl.store(cb_ptr + base + om[:, None] * Q + ok[None, :], cb.to(cb_ptr.dtype.element_ty))


@triton.jit
def _state_passing_kernel(st_ptr, decay_ptr, init_ptr, fwd_ptr, out_ptr, dot_ptr, H: tl.constexpr,
                          PN: tl.constexpr, NC: tl.constexpr, BLOCK: tl.constexpr, REVERSE: tl.constexpr):
    """Forward: out[0] = init, out[c+1] = decay_c out[c] + st[c]. Reverse (adjoint): out[NC] = init,
    out[c] = decay_c out[c+1] + st[c], and dot[b, h, blk, c] = <out[c+1], fwd[c+1]> over this program's
    elements (fwd = forward states; the cumsum cotangent's carried term). One program owns BLOCK elements of
    one (b, h) state. The loop is latency-bound (one dependent step per chunk), so each step issues the next
    chunk's loads before using the current ones: two loads in flight instead of one memory latency per chunk
    (measured 0.686 -> 0.514 ms for forward + reverse; two chunks ahead 0.532)."""
    pid = tl.program_id(0)
    nblk = tl.cdiv(PN, BLOCK)
    blk = pid % nblk
    bh = (pid // nblk).to(tl.int64)
    h = bh % H
    bb = bh // H
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < PN
    s = tl.load(init_ptr + bh * PN + offs, mask=mask, other=0.0)
    # chunk visited at step k: c(k) = NC-1-k (reverse) or k; st index c, fwd index c+1, decay index c
    if REVERSE:
        c0 = NC - 1
        dc = -1
        tl.store(out_ptr + ((bb * (NC + 1) + NC) * H + h) * PN + offs, s, mask=mask)
    else:
        c0 = 0
        dc = 1
    st_row = st_ptr + (bb * NC * H + h) * PN + offs  # + c * H * PN
    f_row = fwd_ptr + (bb * (NC + 1) * H + h) * PN + offs  # + (c + 1) * H * PN
    d_row = decay_ptr + bh * NC
    st1 = tl.load(st_row + c0 * H * PN, mask=mask, other=0.0)
    d1 = tl.load(d_row + c0)
    if REVERSE:
        f1 = tl.load(f_row + (c0 + 1) * H * PN, mask=mask, other=0.0)
    for k in range(NC):
        c = c0 + dc * k
        cn = c + dc  # the chunk this step prefetches
        okn = (cn >= 0) & (cn < NC)
        st_c = st1
        d = d1
        st1 = tl.load(st_row + cn * H * PN, mask=mask & okn, other=0.0)
        d1 = tl.load(d_row + cn, mask=okn, other=0.0)
        if REVERSE:
            f = f1
            f1 = tl.load(f_row + (cn + 1) * H * PN, mask=mask & okn, other=0.0)
            tl.store(dot_ptr + (bh * nblk + blk) * NC + c, tl.sum(s * f, axis=0))
            s = d * s + st_c
            tl.store(out_ptr + ((bb * (NC + 1) + c) * H + h) * PN + offs, s, mask=mask)
        else:
            tl.store(out_ptr + ((bb * (NC + 1) + c) * H + h) * PN + offs, s, mask=mask)
            s = d * s + st_c
    if not REVERSE:
        tl.store(out_ptr + ((bb * (NC + 1) + NC) * H + h) * PN + offs, s, mask=mask)


@triton.jit
def _chunk_scan_kernel(x_ptr, dt_ptr, cs_ptr, c_ptr, cb_ptr, st_ptr, d_ptr, start_ptr, y_ptr, L: tl.constexpr,
                       H: tl.constexpr, G: tl.constexpr, P: tl.constexpr, N: tl.constexpr, Q: tl.constexpr,
                       NC: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                       PREC: tl.constexpr, SEG: tl.constexpr):
    """y[t] = sum_{s<=t in chunk} (C_t.B_s) exp(cs_t - cs_s) dt_s x_s + exp(cs_t) S_c C_t + D x_t, BM rows.
    C_t.B_s is read from cb [b,c,g,Q,Q] (heads of one (b, c) are adjacent programs: the tile stays in L2).
    SEG: the sum keeps s >= start_t (same document) and the state term start_t = -1 (the entering document)."""
    pid = tl.program_id(0)
    NM: tl.constexpr = Q // BM
    m = pid % NM
    h = (pid // NM) % H
    c = (pid // (NM * H)) % NC
    bb = (pid // (NM * H * NC)).to(tl.int64)
    g = h // (H // G)
    dtype = x_ptr.dtype.element_ty
    op = tl.arange(0, BP)
    on = tl.arange(0, BN)
    om = m * BM + tl.arange(0, BM)
    tm = c * Q + om
    xbase = x_ptr + bb * L * H * P + h * P
    bcoff = bb * L * G * N + g * N
    sbase = bb * H * L + h * L
    cbbase = ((bb * NC + c) * G + g) * (Q * Q)
    cs_m = tl.load(cs_ptr + sbase + tm)
    cm = tl.load(c_ptr + bcoff + tm[:, None] * (G * N) + on[None, :], mask=on[None, :] < N, other=0.0)
    st = tl.load(st_ptr + ((bb * (NC + 1) + c) * H + h) * (P * N) + on[:, None] + op[None, :] * N,
                 mask=(on[:, None] < N) & (op[None, :] < P), other=0.0)  # S_c^T [BN, BP]
    state_w = tl.exp(cs_m)
    if SEG:
        start_m = tl.load(start_ptr + bb * L + tm)
        state_w = tl.where(start_m < 0, state_w, 0.0)  # S_c feeds only the chunk's entering document
        lo_m = tl.maximum(start_m, 0)
        span_m = (om - lo_m).to(tl.uint32)
        k_lo = tl.min(lo_m, axis=0) // BK * BK  # earlier tiles hold other documents only
    else:
        k_lo = 0
    acc = tl.dot(cm, st.to(dtype), input_precision=PREC) * state_w[:, None]
    for k0 in range(k_lo, (m + 1) * BM, BK):
        ok = k0 + tl.arange(0, BK)
        tk = c * Q + ok
        cs_k = tl.load(cs_ptr + sbase + tk)
        dt_k = tl.load(dt_ptr + sbase + tk)
        cb = tl.load(cb_ptr + cbbase + om[:, None] * Q + ok[None, :])
        decay = tl.exp(tl.minimum(cs_m[:, None] - cs_k[None, :], 0.0)) * dt_k[None, :]
        if SEG:  # lo_t <= s <= t in one compare
            keep = (ok[None, :] - lo_m[:, None]).to(tl.uint32) <= span_m[:, None]
        else:
            keep = om[:, None] >= ok[None, :]
        cb = tl.where(keep, cb * decay, 0.0)
        xk = tl.load(xbase + tk[:, None] * (H * P) + op[None, :], mask=op[None, :] < P, other=0.0)
        acc += tl.dot(cb.to(dtype), xk, input_precision=PREC)
    xm = tl.load(xbase + tm[:, None] * (H * P) + op[None, :], mask=op[None, :] < P, other=0.0)
    acc += tl.load(d_ptr + h) * xm.to(tl.float32)
    tl.store(y_ptr + bb * L * H * P + h * P + tm[:, None] * (H * P) + op[None, :], acc.to(dtype),
             mask=op[None, :] < P)


@triton.jit
def _bwd_dx_dB_kernel(x_ptr, dt_ptr, cs_ptr, b_ptr, c_ptr, cb_ptr, dy_ptr, dst_ptr, d_ptr, end_ptr,
                      dx_ptr, db_ptr, ddt_ptr, dd_ptr, B_: tl.constexpr, L: tl.constexpr, H: tl.constexpr,
                      G: tl.constexpr, P: tl.constexpr, N: tl.constexpr, Q: tl.constexpr, NC: tl.constexpr,
                      BP: tl.constexpr, BN: tl.constexpr, BS: tl.constexpr, BT: tl.constexpr, HS: tl.constexpr,
                      PREC: tl.constexpr, SEG: tl.constexpr):
    """Source-side cotangents for BS positions s of one chunk, heads [hs*R/HS, (hs+1)*R/HS) of group g
    (see reference); dB partial sums over those heads go to slice hs of db [HS, b, c, Q, g, N].
    B_s.C_t is read (transposed) from cb [b,c,g,Q,Q]; dB has one accumulator over heads and positions (dt_s
    folded into the operands). SEG: the t-sums keep t <= end_s (same document), the dS_{c+1} terms
    end_s = Q - 1 (the chunk-end document)."""
    pid = tl.program_id(0)
    NS: tl.constexpr = Q // BS
    R: tl.constexpr = H // G // HS
    sb = pid % NS
    g = (pid // NS) % G
    hs = (pid // (NS * G)) % HS
    c = (pid // (NS * G * HS)) % NC
    bb = (pid // (NS * G * HS * NC)).to(tl.int64)
    dtype = x_ptr.dtype.element_ty
    op = tl.arange(0, BP)
    on = tl.arange(0, BN)
    os_ = sb * BS + tl.arange(0, BS)
    ts = c * Q + os_
    bcoff = bb * L * G * N + g * N
    cbbase = ((bb * NC + c) * G + g) * (Q * Q)
    mask_n = on[None, :] < N
    mask_p = op[None, :] < P
    bs_ptrs = b_ptr + bcoff + ts[:, None] * (G * N) + on[None, :]
    bs = tl.load(bs_ptrs, mask=mask_n, other=0.0)
    db_acc = tl.zeros([BS, BN], dtype=tl.float32)
    if SEG:  # the documents are shared by the heads: loaded once
        end_s = tl.load(end_ptr + bb * L + ts)
        span_s = (end_s - os_).to(tl.uint32)
        t_hi = (tl.max(end_s, axis=0) // BT + 1) * BT  # later tiles hold other documents only
    else:
        t_hi = Q
    for i in range(R):
        h = (g * HS + hs) * R + i
        sbase = bb * H * L + h * L
        xyoff = bb * L * H * P + h * P
        cs_s = tl.load(cs_ptr + sbase + ts)
        dt_s = tl.load(dt_ptr + sbase + ts)
        cs_last = tl.load(cs_ptr + sbase + c * Q + Q - 1)
        xs = tl.load(x_ptr + xyoff + ts[:, None] * (H * P) + op[None, :], mask=mask_p, other=0.0)
        dsn = tl.load(dst_ptr + ((bb * (NC + 1) + c + 1) * H + h) * (P * N) + op[:, None] * N + on[None, :],
                      mask=(op[:, None] < P) & mask_n, other=0.0).to(dtype)  # dS_{c+1} [BP, BN]
        tail = tl.exp(cs_last - cs_s)
        if SEG:  # dS_{c+1} reaches only the chunk-end document
            tail = tl.where(end_s == Q - 1, tail, 0.0)
        w_acc = tl.dot(bs, tl.trans(dsn), input_precision=PREC) * tail[:, None]  # [BS, BP]
        # dt_s (a per-row factor) folded into the left operands, so every head accumulates straight into
        # db_acc (one [BS, BN] f32 accumulator live instead of a per-head one too: fewer spills at 4 warps)
        db_acc += tl.dot(xs, dsn, input_precision=PREC) * (tail * dt_s)[:, None]
        for k0 in range(sb * BS, t_hi, BT):
            ot = k0 + tl.arange(0, BT)
            tt = c * Q + ot
            ct = tl.load(c_ptr + bcoff + tt[:, None] * (G * N) + on[None, :], mask=mask_n, other=0.0)
            dyt = tl.load(dy_ptr + xyoff + tt[:, None] * (H * P) + op[None, :], mask=mask_p, other=0.0)
            cs_t = tl.load(cs_ptr + sbase + tt)
            if SEG:  # s <= t <= end_s in one compare
                keep = (ot[None, :] - os_[:, None]).to(tl.uint32) <= span_s[:, None]
            else:
                keep = ot[None, :] >= os_[:, None]
            decay = tl.where(keep, tl.exp(tl.minimum(cs_t[None, :] - cs_s[:, None], 0.0)), 0.0)  # [BS, BT]
            bc = tl.load(cb_ptr + cbbase + ot[None, :] * Q + os_[:, None]) * decay
            w_acc += tl.dot(bc.to(dtype), dyt, input_precision=PREC)
            xdy = tl.dot(xs, tl.trans(dyt), input_precision=PREC) * decay * dt_s[:, None]
            db_acc = tl.dot(xdy.to(dtype), ct, db_acc, input_precision=PREC)
        xsf = xs.to(tl.float32)
        dysf = tl.load(dy_ptr + xyoff + ts[:, None] * (H * P) + op[None, :], mask=mask_p, other=0.0).to(tl.float32)
        dx = dt_s[:, None] * w_acc + tl.load(d_ptr + h) * dysf
        tl.store(dx_ptr + xyoff + ts[:, None] * (H * P) + op[None, :], dx.to(dtype), mask=mask_p)
        tl.store(ddt_ptr + sbase + ts, tl.sum(xsf * w_acc, axis=1))
        tl.store(dd_ptr + sbase + ts, tl.sum(xsf * dysf, axis=1))
    tl.store(db_ptr + hs * (B_ * L * G * N) + bcoff + ts[:, None] * (G * N) + on[None, :], db_acc, mask=mask_n)


@triton.jit
def _bwd_dC_kernel(x_ptr, dt_ptr, cs_ptr, b_ptr, c_ptr, dy_ptr, st_ptr, start_ptr, dc_ptr, cdc_ptr, B_: tl.constexpr,
                   L: tl.constexpr, H: tl.constexpr, G: tl.constexpr, P: tl.constexpr, N: tl.constexpr,
                   Q: tl.constexpr, NC: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, BS: tl.constexpr,
                   BT: tl.constexpr, HS: tl.constexpr, PREC: tl.constexpr, SEG: tl.constexpr):
    """Query-side cotangents dC (partial sums over R/HS heads of the group, slice hs of dc [HS, ...]) and
    C_t.dC_t^h for BT positions t. One accumulator carries the head sum (see below). SEG: the s-sum keeps
    s >= start_t, the state term start_t = -1 (as chunk_scan)."""
    pid = tl.program_id(0)
    NT: tl.constexpr = Q // BT
    R: tl.constexpr = H // G // HS
    tb = pid % NT
    g = (pid // NT) % G
    hs = (pid // (NT * G)) % HS
    c = (pid // (NT * G * HS)) % NC
    bb = (pid // (NT * G * HS * NC)).to(tl.int64)
    dtype = x_ptr.dtype.element_ty
    op = tl.arange(0, BP)
    on = tl.arange(0, BN)
    ot = tb * BT + tl.arange(0, BT)
    tt = c * Q + ot
    bcoff = bb * L * G * N + g * N
    mask_n = on[None, :] < N
    mask_p = op[None, :] < P
    ct = tl.load(c_ptr + bcoff + tt[:, None] * (G * N) + on[None, :], mask=mask_n, other=0.0)
    dc_acc = tl.zeros([BT, BN], dtype=tl.float32)
    r_prev = tl.zeros([BT], dtype=tl.float32)
    if SEG:
        start_t = tl.load(start_ptr + bb * L + tt)
        lo_t = tl.maximum(start_t, 0)
        span_t = (ot - lo_t).to(tl.uint32)
        s_lo = tl.min(lo_t, axis=0) // BS * BS
    else:
        s_lo = 0
    for i in range(R):
        h = (g * HS + hs) * R + i
        sbase = bb * H * L + h * L
        xyoff = bb * L * H * P + h * P
        cs_t = tl.load(cs_ptr + sbase + tt)
        dyt = tl.load(dy_ptr + xyoff + tt[:, None] * (H * P) + op[None, :], mask=mask_p, other=0.0)
        st = tl.load(st_ptr + ((bb * (NC + 1) + c) * H + h) * (P * N) + op[:, None] * N + on[None, :],
                     mask=(op[:, None] < P) & mask_n, other=0.0).to(dtype)  # S_c [BP, BN]
        state_w = tl.exp(cs_t)
        if SEG:
            state_w = tl.where(start_t < 0, state_w, 0.0)
        # carry the running head sum in the product's accumulator (no second [BT, BN] f32 live)
        dch = tl.dot(dyt, st, input_precision=PREC) * state_w[:, None] + dc_acc
        for k0 in range(s_lo, (tb + 1) * BT, BS):
            os_ = k0 + tl.arange(0, BS)
            ts = c * Q + os_
            xs = tl.load(x_ptr + xyoff + ts[:, None] * (H * P) + op[None, :], mask=mask_p, other=0.0)
            bs = tl.load(b_ptr + bcoff + ts[:, None] * (G * N) + on[None, :], mask=mask_n, other=0.0)
            cs_s = tl.load(cs_ptr + sbase + ts)
            dt_s = tl.load(dt_ptr + sbase + ts)
            if SEG:  # lo_t <= s <= t in one compare
                keep = (os_[None, :] - lo_t[:, None]).to(tl.uint32) <= span_t[:, None]
            else:
                keep = ot[:, None] >= os_[None, :]
            w = tl.where(keep, tl.exp(tl.minimum(cs_t[:, None] - cs_s[None, :], 0.0)) * dt_s[None, :], 0.0)
            dyx = tl.dot(dyt, tl.trans(xs), input_precision=PREC) * w
            dch = tl.dot(dyx.to(dtype), bs, dch, input_precision=PREC)
        # C_t.dC_t^h as a difference of running sums C_t.(sum over heads so far): f32 cancellation error
        # ~1e-7 of the group sum, far below the bf16 operand rounding
        r = tl.sum(ct.to(tl.float32) * dch, axis=1)
        tl.store(cdc_ptr + sbase + tt, r - r_prev)
        r_prev = r
        dc_acc = dch
    tl.store(dc_ptr + hs * (B_ * L * G * N) + bcoff + tt[:, None] * (G * N) + on[None, :], dc_acc, mask=mask_n)


# ----------------------------------------------------------------------------------------------------------
# jax wrappers (one per stage; signatures match reference.py)
# ----------------------------------------------------------------------------------------------------------

# Launch parameters: the best of `python -m tools.bench_ssd --sweep` on one H200, 2026-11-29 (b8 L8192 h32 P64
# N128 Q256 bf16; docs/notes/ssd.md has every variant's time). Only tile sizes, warps and pipeline stages: every
# setting computes the same function (tests/kernels/test_ssd_gpu.py checks two non-default ones).
CONFIG = dict(state_warps=4, state_stages=2, pass_block=256, pass_warps=4, scan_bm=64, scan_bk=32, scan_warps=4,
              scan_stages=2, cb_bm=128, cb_bk=64, cb_warps=4, bwd_blk=64, bwd_warps=4, bwd_stages=1, head_split=4)


def _triton_call(*args, **kwargs):
    import jax_triton

    return jax_triton.triton_call(*args, **kwargs)


def _pow2(n):
    return max(16, int(triton.next_power_of_2(int(n))))


def _dims(x, Bm):
    b, nc, Q, h, P = x.shape
    g, N = Bm.shape[3], Bm.shape[4]
    if Q % 16:
        raise ValueError(f"ssd(implementation='triton'): chunk_size must be a multiple of 16, got {Q}")
    prec = "ieee" if x.dtype == jnp.float32 else "tf32"
    return dict(L=nc * Q, H=h, G=g, P=P, N=N, Q=Q, NC=nc, BP=_pow2(P), BN=_pow2(N), PREC=prec)


def _blk(Q, want):
    """Largest tile <= want (a power of two >= 16) that divides Q."""
    blk = want
    while Q % blk:
        blk //= 2
    return blk


def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(tuple(shape), dtype)


def _doc_bounds(docs, which):
    """r [b, c, Q] (reference.chunk_documents) -> (bounds [b, c*Q] int32, SEG) for the kernels. which="start":
    start_t, the chunk-relative index of the first position of t's document, -1 where that document was open at
    the chunk's start (r_t = 0); which="end": end_s, the index of the last position of s's document in the chunk
    (Q - 1 where it runs to the chunk's end, i.e. r_s = r_last). r is non-decreasing, so for t >= s:
    r_t = r_s <=> s >= start_t <=> t <= end_s. docs None -> a never-read placeholder and SEG False (the kernels
    are then compiled without any masking)."""
    if docs is None:
        return jnp.zeros((1,), jnp.int32), False
    r = docs.astype(jnp.int32)
    Q = r.shape[-1]
    q = jnp.arange(Q, dtype=jnp.int32)
    if which == "start":  # a position opens a document where r steps (r_{-1} = 0: the entering document)
        prev = jnp.concatenate([jnp.zeros_like(r[..., :1]), r[..., :-1]], axis=-1)
        out = jax.lax.cummax(jnp.where(r != prev, q, -1), axis=2)
    else:  # a position closes one where r steps next (the chunk's last position always does)
        nxt = jnp.concatenate([r[..., 1:], jnp.full_like(r[..., :1], -1)], axis=-1)
        out = jax.lax.cummin(jnp.where(r != nxt, q, Q - 1), axis=2, reverse=True)
    return out.reshape(r.shape[0], -1), True


def chunk_state(x, Bm, w):
    d = _dims(x, Bm)
    b = x.shape[0]
    out = _sds((b, d["NC"], d["H"], d["P"], d["N"]), F32)
    return _triton_call(x, Bm.astype(x.dtype), w.astype(F32), kernel=_chunk_state_kernel, out_shape=out,
                        grid=(b * d["NC"] * d["H"],), num_warps=CONFIG["state_warps"],
                        num_stages=CONFIG["state_stages"], BK=_blk(d["Q"], 64), **d)


def state_passing(chunk_states, chunk_decay, init, reverse=False, fwd_states=None):
    """reference.state_passing; with reverse=True and fwd_states also returns <out[c+1], fwd_states[c+1]>
    [b, h, c] (fused here so the backward reads the two state arrays once)."""
    b, nc, h, P, N = chunk_states.shape
    PN = P * N
    block = min(CONFIG["pass_block"], int(triton.next_power_of_2(PN)))
    nblk = triton.cdiv(PN, block)
    want_dot = reverse and fwd_states is not None
    outs = [_sds((b, nc + 1, h, P, N), F32), _sds((b, h, nblk, nc), F32)]
    fwd = fwd_states if want_dot else init.astype(F32)  # unused pointer when not reversing
    out, dot = _triton_call(chunk_states, chunk_decay.astype(F32), init.astype(F32), fwd,
                            kernel=_state_passing_kernel, out_shape=outs, grid=(b * h * nblk,),
                            num_warps=CONFIG["pass_warps"], num_stages=1, H=h, PN=PN, NC=nc, BLOCK=block,
                            REVERSE=bool(reverse))
    return (out, dot.sum(2)) if want_dot else out


def chunk_cb(Bm, Cm):
    """C B^T per (batch, chunk, group): Bm, Cm [b,c,Q,g,N] -> cb [b,c,g,Q(t),Q(s)] float32 (a bf16 cb was
    measured slower and adds one rounding)."""
    b, nc, Q, g, N = Bm.shape
    cbm, cbk = _blk(Q, CONFIG["cb_bm"]), _blk(Q, CONFIG["cb_bk"])
    prec = "ieee" if Cm.dtype == jnp.float32 else "tf32"
    return _triton_call(Bm, Cm.astype(Bm.dtype), kernel=_cb_kernel, out_shape=_sds((b, nc, g, Q, Q), F32),
                        grid=(b * nc * g * (Q // cbm) * (Q // cbk),), num_warps=CONFIG["cb_warps"], num_stages=1,
                        L=nc * Q, G=g, N=N, Q=Q, NC=nc, BN=_pow2(N), CBM=cbm, CBK=cbk, PREC=prec)


def chunk_scan(x, dt, cs, Bm, Cm, states, D, docs=None, cb=None):
    """reference.chunk_scan; cb = chunk_cb(Bm, Cm), computed here when not given."""
    Bm, Cm = Bm.astype(x.dtype), Cm.astype(x.dtype)
    if cb is None:
        cb = chunk_cb(Bm, Cm)
    d = _dims(x, Bm)
    bm, bk = _blk(d["Q"], CONFIG["scan_bm"]), _blk(d["Q"], CONFIG["scan_bk"])
    bk = min(bk, bm)  # the causal loop steps whole BK tiles up to the end of the BM rows
    grid = (x.shape[0] * d["NC"] * d["H"] * (d["Q"] // bm),)
    start, seg = _doc_bounds(docs, "start")
    return _triton_call(x, dt, cs, Cm, cb, states, D.astype(F32), start, kernel=_chunk_scan_kernel,
                        out_shape=_sds(x.shape, x.dtype), grid=grid, num_warps=CONFIG["scan_warps"],
                        num_stages=CONFIG["scan_stages"], BM=bm, BK=bk, SEG=seg, **d)


def _bwd_launch(x, Bm):
    d = _dims(x, Bm)
    blk = _blk(d["Q"], CONFIG["bwd_blk"])
    R = d["H"] // d["G"]
    hs = max(k for k in (1, 2, 4, 8, 16, 32) if R % k == 0 and k <= CONFIG["head_split"])
    grid = (x.shape[0] * d["NC"] * d["G"] * hs * (d["Q"] // blk),)
    meta = dict(num_warps=CONFIG["bwd_warps"], num_stages=CONFIG["bwd_stages"], BS=blk, BT=blk, HS=hs,
                B_=x.shape[0], **d)
    return grid, hs, meta


def chunk_bwd_dx_dB(x, dt, cs, Bm, Cm, dy, dstates, D, docs=None, cb=None):
    """reference.chunk_bwd_dx_dB; B_s.C_t comes from cb = chunk_cb(Bm, Cm), recomputed here when not given
    (cheaper than keeping the forward's cb as a residual)."""
    grid, hs, meta = _bwd_launch(x, Bm)
    Bm, Cm = Bm.astype(x.dtype), Cm.astype(x.dtype)
    if cb is None:
        cb = chunk_cb(Bm, Cm)
    outs = [_sds(x.shape, x.dtype), _sds((hs,) + Bm.shape, F32), _sds(cs.shape, F32), _sds(cs.shape, F32)]
    end, seg = _doc_bounds(docs, "end")
    dx, dB, ddt, dD = _triton_call(x, dt, cs, Bm, Cm, cb, dy.astype(x.dtype), dstates, D.astype(F32), end,
                                   kernel=_bwd_dx_dB_kernel, out_shape=outs, grid=grid, SEG=seg, **meta)
    return dx, dB.sum(0), ddt, dD


def chunk_bwd_dC(x, dt, cs, Bm, Cm, dy, states, docs=None):
    grid, hs, meta = _bwd_launch(x, Bm)
    outs = [_sds((hs,) + Cm.shape, F32), _sds(cs.shape, F32)]
    start, seg = _doc_bounds(docs, "start")
    dC, CdC = _triton_call(x, dt, cs, Bm.astype(x.dtype), Cm.astype(x.dtype), dy.astype(x.dtype), states, start,
                           kernel=_bwd_dC_kernel, out_shape=outs, grid=grid, SEG=seg, **meta)
    return dC.sum(0), CdC


class _Stages:
    chunk_state = staticmethod(chunk_state)
    state_passing = staticmethod(state_passing)
    chunk_scan = staticmethod(chunk_scan)
    chunk_bwd_dx_dB = staticmethod(chunk_bwd_dx_dB)
    chunk_bwd_dC = staticmethod(chunk_bwd_dC)


STAGES = _Stages()
