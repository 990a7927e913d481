"""SSD stages as Triton kernels (called through jax-triton 0.3.1): the GPU path.

Same stages and layouts as reference.py (x [b,c,Q,h,P], B/C [b,c,Q,g,N], dt/cs [b,h,c,Q] f32, states
[b,c+1,h,P,N] f32). Every Q x Q interaction (C B^T with its decay mask, dy x^T) is formed in registers one
(64 x 64) tile at a time and consumed by the next tensor-core product, so no per-chunk Q x Q matrix touches
device memory. Matrix products take the input dtype (bf16) with float32 accumulation; decays, cumsums and
states stay float32 (states are rounded to the input dtype only as a matmul operand, as in mamba_ssm).
Backward kernels loop over the heads of a group inside one program so dB and dC (shared by the group's heads)
are summed in registers instead of written per head.
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
def _state_passing_kernel(st_ptr, decay_ptr, init_ptr, fwd_ptr, out_ptr, dot_ptr, H: tl.constexpr,
                          PN: tl.constexpr, NC: tl.constexpr, BLOCK: tl.constexpr, REVERSE: tl.constexpr):
    """Forward: out[0] = init, out[c+1] = decay_c out[c] + st[c]. Reverse (adjoint): out[NC] = init,
    out[c] = decay_c out[c+1] + st[c], and dot[b, h, blk, c] = <out[c+1], fwd[c+1]> over this program's
    elements (fwd = forward states; the cumsum cotangent's carried term). One program owns BLOCK elements of
    one (b, h) state."""
    pid = tl.program_id(0)
    nblk = tl.cdiv(PN, BLOCK)
    blk = pid % nblk
    bh = (pid // nblk).to(tl.int64)
    h = bh % H
    bb = bh // H
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < PN
    s = tl.load(init_ptr + bh * PN + offs, mask=mask, other=0.0)
    if REVERSE:
        tl.store(out_ptr + ((bb * (NC + 1) + NC) * H + h) * PN + offs, s, mask=mask)
        for k in range(NC):
            c = NC - 1 - k
            f = tl.load(fwd_ptr + ((bb * (NC + 1) + c + 1) * H + h) * PN + offs, mask=mask, other=0.0)
            tl.store(dot_ptr + (bh * nblk + blk) * NC + c, tl.sum(s * f, axis=0))
            d = tl.load(decay_ptr + bh * NC + c)
            s = d * s + tl.load(st_ptr + ((bb * NC + c) * H + h) * PN + offs, mask=mask, other=0.0)
            tl.store(out_ptr + ((bb * (NC + 1) + c) * H + h) * PN + offs, s, mask=mask)
    else:
        for c in range(NC):
            tl.store(out_ptr + ((bb * (NC + 1) + c) * H + h) * PN + offs, s, mask=mask)
            d = tl.load(decay_ptr + bh * NC + c)
            s = d * s + tl.load(st_ptr + ((bb * NC + c) * H + h) * PN + offs, mask=mask, other=0.0)
        tl.store(out_ptr + ((bb * (NC + 1) + NC) * H + h) * PN + offs, s, mask=mask)


@triton.jit
def _chunk_scan_kernel(x_ptr, dt_ptr, cs_ptr, b_ptr, c_ptr, st_ptr, d_ptr, y_ptr, L: tl.constexpr,
                       H: tl.constexpr, G: tl.constexpr, P: tl.constexpr, N: tl.constexpr, Q: tl.constexpr,
                       NC: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                       PREC: tl.constexpr):
    """y[t] = sum_{s<=t in chunk} (C_t.B_s) exp(cs_t - cs_s) dt_s x_s + exp(cs_t) S_c C_t + D x_t, BM rows."""
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
    cs_m = tl.load(cs_ptr + sbase + tm)
    cm = tl.load(c_ptr + bcoff + tm[:, None] * (G * N) + on[None, :], mask=on[None, :] < N, other=0.0)
    st = tl.load(st_ptr + ((bb * (NC + 1) + c) * H + h) * (P * N) + on[:, None] + op[None, :] * N,
                 mask=(on[:, None] < N) & (op[None, :] < P), other=0.0)  # S_c^T [BN, BP]
    acc = tl.dot(cm, st.to(dtype), input_precision=PREC) * tl.exp(cs_m)[:, None]
    for k0 in range(0, (m + 1) * BM, BK):
        ok = k0 + tl.arange(0, BK)
        tk = c * Q + ok
        bk = tl.load(b_ptr + bcoff + tk[:, None] * (G * N) + on[None, :], mask=on[None, :] < N, other=0.0)
        cs_k = tl.load(cs_ptr + sbase + tk)
        dt_k = tl.load(dt_ptr + sbase + tk)
        cb = tl.dot(cm, tl.trans(bk), input_precision=PREC)
        decay = tl.exp(tl.minimum(cs_m[:, None] - cs_k[None, :], 0.0)) * dt_k[None, :]
        cb = tl.where(om[:, None] >= ok[None, :], cb * decay, 0.0)
        xk = tl.load(xbase + tk[:, None] * (H * P) + op[None, :], mask=op[None, :] < P, other=0.0)
        acc += tl.dot(cb.to(dtype), xk, input_precision=PREC)
    xm = tl.load(xbase + tm[:, None] * (H * P) + op[None, :], mask=op[None, :] < P, other=0.0)
    acc += tl.load(d_ptr + h) * xm.to(tl.float32)
    tl.store(y_ptr + bb * L * H * P + h * P + tm[:, None] * (H * P) + op[None, :], acc.to(dtype),
             mask=op[None, :] < P)


@triton.jit
def _bwd_dx_dB_kernel(x_ptr, dt_ptr, cs_ptr, b_ptr, c_ptr, dy_ptr, dst_ptr, d_ptr,
                      dx_ptr, db_ptr, ddt_ptr, dd_ptr, B_: tl.constexpr, L: tl.constexpr, H: tl.constexpr,
                      G: tl.constexpr, P: tl.constexpr, N: tl.constexpr, Q: tl.constexpr, NC: tl.constexpr,
                      BP: tl.constexpr, BN: tl.constexpr, BS: tl.constexpr, BT: tl.constexpr, HS: tl.constexpr,
                      PREC: tl.constexpr):
    """Source-side cotangents for BS positions s of one chunk, heads [hs*R/HS, (hs+1)*R/HS) of group g
    (see reference); dB partial sums over those heads go to slice hs of db [HS, b, c, Q, g, N]."""
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
    mask_n = on[None, :] < N
    mask_p = op[None, :] < P
    bs = tl.load(b_ptr + bcoff + ts[:, None] * (G * N) + on[None, :], mask=mask_n, other=0.0)
    db_acc = tl.zeros([BS, BN], dtype=tl.float32)
    for i in range(R):
        h = (g * HS + hs) * R + i
        sbase = bb * H * L + h * L
        xyoff = bb * L * H * P + h * P
        cs_s = tl.load(cs_ptr + sbase + ts)
        dt_s = tl.load(dt_ptr + sbase + ts)
        cs_last = tl.load(cs_ptr + sbase + c * Q + Q - 1)
        xs = tl.load(x_ptr + xyoff + ts[:, None] * (H * P) + op[None, :], mask=mask_p, other=0.0)
        dys = tl.load(dy_ptr + xyoff + ts[:, None] * (H * P) + op[None, :], mask=mask_p, other=0.0)
        dsn = tl.load(dst_ptr + ((bb * (NC + 1) + c + 1) * H + h) * (P * N) + op[:, None] * N + on[None, :],
                      mask=(op[:, None] < P) & mask_n, other=0.0).to(dtype)  # dS_{c+1} [BP, BN]
        tail = tl.exp(cs_last - cs_s)
        w_acc = tl.dot(bs, tl.trans(dsn), input_precision=PREC) * tail[:, None]  # [BS, BP]
        dbh = tl.dot(xs, dsn, input_precision=PREC) * tail[:, None]  # [BS, BN]
        for k0 in range(sb * BS, Q, BT):
            ot = k0 + tl.arange(0, BT)
            tt = c * Q + ot
            ct = tl.load(c_ptr + bcoff + tt[:, None] * (G * N) + on[None, :], mask=mask_n, other=0.0)
            dyt = tl.load(dy_ptr + xyoff + tt[:, None] * (H * P) + op[None, :], mask=mask_p, other=0.0)
            cs_t = tl.load(cs_ptr + sbase + tt)
            decay = tl.where(ot[None, :] >= os_[:, None],
                             tl.exp(tl.minimum(cs_t[None, :] - cs_s[:, None], 0.0)), 0.0)  # [BS, BT]
            bc = tl.dot(bs, tl.trans(ct), input_precision=PREC) * decay
            w_acc += tl.dot(bc.to(dtype), dyt, input_precision=PREC)
            xdy = tl.dot(xs, tl.trans(dyt), input_precision=PREC) * decay
            dbh += tl.dot(xdy.to(dtype), ct, input_precision=PREC)
        xsf = xs.to(tl.float32)
        dysf = dys.to(tl.float32)
        dx = dt_s[:, None] * w_acc + tl.load(d_ptr + h) * dysf
        tl.store(dx_ptr + xyoff + ts[:, None] * (H * P) + op[None, :], dx.to(dtype), mask=mask_p)
        tl.store(ddt_ptr + sbase + ts, tl.sum(xsf * w_acc, axis=1))
        tl.store(dd_ptr + sbase + ts, tl.sum(xsf * dysf, axis=1))
        db_acc += dt_s[:, None] * dbh
    tl.store(db_ptr + hs * (B_ * L * G * N) + bcoff + ts[:, None] * (G * N) + on[None, :], db_acc, mask=mask_n)


@triton.jit
def _bwd_dC_kernel(x_ptr, dt_ptr, cs_ptr, b_ptr, c_ptr, dy_ptr, st_ptr, dc_ptr, cdc_ptr, B_: tl.constexpr,
                   L: tl.constexpr, H: tl.constexpr, G: tl.constexpr, P: tl.constexpr, N: tl.constexpr,
                   Q: tl.constexpr, NC: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, BS: tl.constexpr,
                   BT: tl.constexpr, HS: tl.constexpr, PREC: tl.constexpr):
    """Query-side cotangents dC (partial sums over R/HS heads of the group, slice hs of dc [HS, ...]) and
    C_t.dC_t^h for BT positions t."""
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
    for i in range(R):
        h = (g * HS + hs) * R + i
        sbase = bb * H * L + h * L
        xyoff = bb * L * H * P + h * P
        cs_t = tl.load(cs_ptr + sbase + tt)
        dyt = tl.load(dy_ptr + xyoff + tt[:, None] * (H * P) + op[None, :], mask=mask_p, other=0.0)
        st = tl.load(st_ptr + ((bb * (NC + 1) + c) * H + h) * (P * N) + op[:, None] * N + on[None, :],
                     mask=(op[:, None] < P) & mask_n, other=0.0).to(dtype)  # S_c [BP, BN]
        dch = tl.dot(dyt, st, input_precision=PREC) * tl.exp(cs_t)[:, None]
        for k0 in range(0, (tb + 1) * BT, BS):
            os_ = k0 + tl.arange(0, BS)
            ts = c * Q + os_
            xs = tl.load(x_ptr + xyoff + ts[:, None] * (H * P) + op[None, :], mask=mask_p, other=0.0)
            bs = tl.load(b_ptr + bcoff + ts[:, None] * (G * N) + on[None, :], mask=mask_n, other=0.0)
            cs_s = tl.load(cs_ptr + sbase + ts)
            dt_s = tl.load(dt_ptr + sbase + ts)
            w = tl.where(ot[:, None] >= os_[None, :],
                         tl.exp(tl.minimum(cs_t[:, None] - cs_s[None, :], 0.0)) * dt_s[None, :], 0.0)
            dyx = tl.dot(dyt, tl.trans(xs), input_precision=PREC) * w
            dch += tl.dot(dyx.to(dtype), bs, input_precision=PREC)
        tl.store(cdc_ptr + sbase + tt, tl.sum(ct.to(tl.float32) * dch, axis=1))
        dc_acc += dch
    tl.store(dc_ptr + hs * (B_ * L * G * N) + bcoff + tt[:, None] * (G * N) + on[None, :], dc_acc, mask=mask_n)


# ----------------------------------------------------------------------------------------------------------
# jax wrappers (one per stage; signatures match reference.py)
# ----------------------------------------------------------------------------------------------------------

# Launch parameters: the best of `python -m tools.bench_ssd --sweep` on one H200, 2026-11-29 (b8 L8192 h32 P64
# N128 Q256 bf16; docs/notes/ssd.md has every variant's time).
CONFIG = dict(state_warps=4, state_stages=2, pass_block=256, scan_bm=128, scan_bk=64, scan_warps=4,
              scan_stages=2, bwd_blk=64, bwd_warps=4, bwd_stages=2, head_split=4)


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
                            kernel=_state_passing_kernel, out_shape=outs, grid=(b * h * nblk,), num_warps=4,
                            num_stages=1, H=h, PN=PN, NC=nc, BLOCK=block, REVERSE=bool(reverse))
    return (out, dot.sum(2)) if want_dot else out


def chunk_scan(x, dt, cs, Bm, Cm, states, D):
    d = _dims(x, Bm)
    bm, bk = _blk(d["Q"], CONFIG["scan_bm"]), _blk(d["Q"], CONFIG["scan_bk"])
    bk = min(bk, bm)  # the causal loop steps whole BK tiles up to the end of the BM rows
    grid = (x.shape[0] * d["NC"] * d["H"] * (d["Q"] // bm),)
    return _triton_call(x, dt, cs, Bm.astype(x.dtype), Cm.astype(x.dtype), states, D.astype(F32),
                        kernel=_chunk_scan_kernel, out_shape=_sds(x.shape, x.dtype), grid=grid,
                        num_warps=CONFIG["scan_warps"], num_stages=CONFIG["scan_stages"], BM=bm, BK=bk, **d)


def _bwd_launch(x, Bm):
    d = _dims(x, Bm)
    blk = _blk(d["Q"], CONFIG["bwd_blk"])
    R = d["H"] // d["G"]
    hs = max(k for k in (1, 2, 4, 8, 16, 32) if R % k == 0 and k <= CONFIG["head_split"])
    grid = (x.shape[0] * d["NC"] * d["G"] * hs * (d["Q"] // blk),)
    meta = dict(num_warps=CONFIG["bwd_warps"], num_stages=CONFIG["bwd_stages"], BS=blk, BT=blk, HS=hs,
                B_=x.shape[0], **d)
    return grid, hs, meta


def chunk_bwd_dx_dB(x, dt, cs, Bm, Cm, dy, dstates, D):
    grid, hs, meta = _bwd_launch(x, Bm)
    outs = [_sds(x.shape, x.dtype), _sds((hs,) + Bm.shape, F32), _sds(cs.shape, F32), _sds(cs.shape, F32)]
    dx, dB, ddt, dD = _triton_call(x, dt, cs, Bm.astype(x.dtype), Cm.astype(x.dtype), dy.astype(x.dtype),
                                   dstates, D.astype(F32), kernel=_bwd_dx_dB_kernel, out_shape=outs, grid=grid,
                                   **meta)
    return dx, dB.sum(0), ddt, dD


def chunk_bwd_dC(x, dt, cs, Bm, Cm, dy, states):
    grid, hs, meta = _bwd_launch(x, Bm)
    outs = [_sds((hs,) + Cm.shape, F32), _sds(cs.shape, F32)]
    dC, CdC = _triton_call(x, dt, cs, Bm.astype(x.dtype), Cm.astype(x.dtype), dy.astype(x.dtype), states,
                           kernel=_bwd_dC_kernel, out_shape=outs, grid=grid, **meta)
    return dC.sum(0), CdC


class _Stages:
    chunk_state = staticmethod(chunk_state)
    state_passing = staticmethod(state_passing)
    chunk_scan = staticmethod(chunk_scan)
    chunk_bwd_dx_dB = staticmethod(chunk_bwd_dx_dB)
    chunk_bwd_dC = staticmethod(chunk_bwd_dC)


STAGES = _Stages()
