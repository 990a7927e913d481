"""Pallas kernels for 2-simplicial attention (the TPU path; CPU tests run them with interpret=True).

Algorithm (docs/notes/simplicial.md): for query i and the query heads h of one K/V head, the logits are an
ordinary attention between "rows" r = (h, k) with vectors b_r = scale * q_ih * k2_k (k in the w2 window)
and the keys k1_j of the w1 window: A[r, j] = <b_r, k1_j>. So the forward is a flash-attention loop over
blocks of j with a per-row online softmax, followed by an epilogue that merges the rows of each head:
  o_ih = sum_k v2_k * C_(h,k) * exp(m_(h,k) - M_h) / L_h,   C_r = sum_j exp(A_rj - m_r) v1_j
(the identity sum_jk P v1_j * v2_k = sum_k v2_k * (sum_j P_jk v1_j)). Only O and the per-head LSE are stored.
Backward (Eq. 10-16) with e_r = dO_ih * v2_k: dP = e_r . v1_j, dS = P (dP - D_ih), and
  dq_ih = scale sum_k k2_k * F_r,  dk2_k += scale q_ih * F_r,  dv2_k += dO_ih * C_r  (F_r = sum_j dS_rj k1_j)
  dk1_j = sum_r dS_rj b_r,  dv1_j = sum_r P_rj e_r
in two kernels, one per query (dq and the per-query dk2/dv2 rows, summed later without atomics) and one per
block of j (dk1, dv1), as in Meta's split.
Packed documents: two more key-side inputs, each position's canonical document id (reference.segment_starts,
float32: exact below 2^24) laid out like k1 and like k2; a query's k1 columns and k2 rows of other documents
are masked with the window's. Without segment ids the kernels are traced without them.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels import common
from kernels.simplicial import reference


def _tiles(seq: int, w1: int, w2: int):
    """(query tile, j block, padded w1 span, padded w2 rows): sublane multiples of 8, j blocks <= 128."""
    bj = min(128, max(8, 1 << (w1 - 1).bit_length()))
    return min(32, common.round_up(seq, 8)), bj, common.round_up(w1, bj), common.round_up(w2, 8)


_dot = common.mxu_dot


def _align(dtype) -> int:
    """Sublane tile of a dtype in VMEM: 8 rows of 32-bit, 16 of bf16."""
    return 8 * max(1, 4 // jnp.dtype(dtype).itemsize)


def _window(ref, start, n: int):
    """ref[start : start + n] as float32 [n, D] for a traced start. Mosaic loads only at offsets it can prove
    tile-aligned, so this loads the aligned window [floor(start), + n + A) and rotates the wanted rows to the
    top (one sublane rotate; the layouts pad A = _align rows behind every window)."""
    a = _align(ref.dtype)
    base = pl.multiple_of(start // a * a, a)
    win = ref[pl.ds(base, n + a), :].astype(jnp.float32)
    return pltpu.roll(win, (n + a - (start - base)) % (n + a), 0)[:n]  # out[r] = win[r + start - base]


def _lanes(col):
    """[n, 1] -> [n] (sublanes to lanes) as a masked reduction: a [n, 1] -> [1, n] reshape needs a relayout
    Mosaic may not do."""
    n = col.shape[0]
    r = jax.lax.broadcasted_iota(jnp.int32, (n, n), 0)
    c = jax.lax.broadcasted_iota(jnp.int32, (n, n), 1)
    return jnp.sum(jnp.where(r == c, col, 0.0), axis=0)


def _document(s2_ref, t, start, w2p):
    """Packed documents: (doc [1, 1], the canonical id of the query at row t + f2 of the k2-side id ref, and
    same [w2p] bool: its k2 window's keys (from row `start`) in that document)."""
    doc = _window(s2_ref, t, 1)
    return doc, _lanes(_window(s2_ref, start, w2p)) == doc[0, 0]


def _slots_to_rows(x_k, m_rows: int, w2p: int):
    """Per-window-slot bool [w2p] -> per-row [m_rows] (row r = (h, k) takes x_k[k]), as in _per_row."""
    r = jax.lax.broadcasted_iota(jnp.int32, (m_rows, w2p), 0)
    k = jax.lax.broadcasted_iota(jnp.int32, (m_rows, w2p), 1)
    return jnp.sum(jnp.where(r % w2p == k, x_k.astype(jnp.float32)[None, :], 0.0), axis=1) > 0.5


def _query_rows(q_ref, k2_ref, v2_ref, do_ref, t, i, start, *, cfg, g, w2p, same=None):
    """Rows r = (h, k) of query i (row t of the query-side refs; its k2 window starts at row `start` of the
    k2/v2 refs): b_r = scale q_h * k2_k, e_r = dO_h * v2_k (if do_ref), validity [w2p] (& `same`: the keys
    in the query's document)."""
    w2 = cfg.w2
    k2w = _window(k2_ref, start, w2p)
    kk = jax.lax.broadcasted_iota(jnp.int32, (w2p,), 0)
    valid = (kk < w2) & (i - w2 + 1 + kk >= 0)
    if same is not None:
        valid = valid & same
    qi = q_ref[t].astype(jnp.float32)  # [g, dk]
    rows = ((qi * cfg.scale)[:, None, :] * k2w[None]).reshape(g * w2p, -1)
    if do_ref is None:
        return qi, k2w, rows, valid
    v2w = _window(v2_ref, start, w2p)
    doi = do_ref[t].astype(jnp.float32)
    e = (doi[:, None, :] * v2w[None]).reshape(g * w2p, -1)
    return qi, k2w, rows, valid, v2w, doi, e


def _row_valid(i, w2: int, m_rows: int, w2p: int):
    """[m_rows] bool: row r = (h, k) of query i holds a key k2 inside the window and the sequence."""
    kk = jax.lax.broadcasted_iota(jnp.int32, (m_rows,), 0) % w2p
    return (kk < w2) & (i - w2 + 1 + kk >= 0)


def _per_row(x_g, valid_r, w2p, fill):
    """Per-head values [g] -> per-row [g*w2p] (row r = (h, k) takes x_g[h]), `fill` where not valid_r. A masked
    lane reduction instead of a [g, w2p] -> [g*w2p] reshape, which Mosaic cannot lay out."""
    g = x_g.shape[0]
    r = jax.lax.broadcasted_iota(jnp.int32, (g * w2p, g), 0)
    h = jax.lax.broadcasted_iota(jnp.int32, (g * w2p, g), 1)
    x_r = jnp.sum(jnp.where(r // w2p == h, x_g[None, :], 0.0), axis=1)
    return jnp.where(valid_r, x_r, fill)


def _fwd_kernel(q_ref, k1_ref, v1_ref, k2_ref, v2_ref, *refs, cfg, tq, g, bj, w1p, w2p, f1, f2, seg):
    s1_ref, s2_ref, o_ref, lse_ref = refs if seg else (None, None, *refs)
    w1 = cfg.w1
    dt = k1_ref.dtype
    q0 = pl.program_id(2) * tq  # read outside loops: interpret mode cannot lower it in a loop body

    def per_query(t, _):
        i = q0 + t
        k2_start = t + f2 - cfg.w2 + 1  # the key windows start at key position q0 - f
        doc, same = _document(s2_ref, t + f2, k2_start, w2p) if seg else (None, None)
        _, _, rows, valid = _query_rows(q_ref, k2_ref, None, None, t, i, k2_start, cfg=cfg, g=g, w2p=w2p,
                                        same=same)
        rows = rows.astype(dt)
        v2w = _window(v2_ref, k2_start, w2p)
        m_rows = g * w2p

        def j_block(n, carry):
            m, l, acc = carry
            j0 = i - w1 + 1 + n * bj
            k1b = _window(k1_ref, j0 + f1 - q0, bj).astype(dt)
            v1b = _window(v1_ref, j0 + f1 - q0, bj).astype(dt)
            jpos = j0 + jax.lax.broadcasted_iota(jnp.int32, (1, bj), 1)
            cvalid = (jpos >= 0) & (jpos <= i)
            if seg:
                cvalid = cvalid & (_lanes(_window(s1_ref, j0 + f1 - q0, bj))[None, :] == doc)
            s = jnp.where(cvalid, _dot(rows, k1b, common.NT), common.NEG_INF)
            m_new = jnp.maximum(m, s.max(axis=1))
            alpha = jnp.exp(m - m_new)
            p = jnp.where(cvalid, jnp.exp(s - m_new[:, None]), 0.0)
            acc = acc * alpha[:, None] + _dot(p.astype(dt), v1b, common.NN)
            return m_new, l * alpha + p.sum(axis=1), acc

        init = (jnp.full((m_rows,), common.NEG_INF, jnp.float32), jnp.zeros((m_rows,), jnp.float32),
                jnp.zeros((m_rows, v1_ref.shape[-1]), jnp.float32))
        m, l, acc = jax.lax.fori_loop(0, w1p // bj, j_block, init)
        # Merge the rows of each head: every valid row saw j = i, so its m is finite (p is masked, so blocks
        # with no key of the document add nothing before it is).
        m = jnp.where(valid[None, :], m.reshape(g, w2p), common.NEG_INF)
        m_head = m.max(axis=1)
        wgt = jnp.where(valid[None, :], jnp.exp(m - m_head[:, None]), 0.0)  # [g, w2p]
        l_head = (wgt * l.reshape(g, w2p)).sum(axis=1)
        o = (wgt[:, :, None] * acc.reshape(g, w2p, -1) * v2w[None]).sum(axis=1) / l_head[:, None]
        o_ref[t] = o.astype(o_ref.dtype)
        lse_ref[t] = m_head + jnp.log(l_head)
        return 0

    jax.lax.fori_loop(0, tq, per_query, 0)


def _bwd_q_kernel(q_ref, k1_ref, v1_ref, k2_ref, v2_ref, *refs, cfg, tq, g, bj, w1p, w2p, f1, f2, seg):
    if not seg:
        refs = (None, None, *refs)
    s1_ref, s2_ref, do_ref, lse_ref, delta_ref, dq_ref, t2_ref, u2_ref = refs
    w1 = cfg.w1
    dt = k1_ref.dtype
    q0 = pl.program_id(2) * tq  # read outside loops: interpret mode cannot lower it in a loop body

    def per_query(t, _):
        i = q0 + t
        k2_start = t + f2 - cfg.w2 + 1
        doc, same = _document(s2_ref, t + f2, k2_start, w2p) if seg else (None, None)
        qi, k2w, rows, _, _, doi, e = _query_rows(
            q_ref, k2_ref, v2_ref, do_ref, t, i, k2_start, cfg=cfg, g=g, w2p=w2p)
        rows, e = rows.astype(dt), e.astype(dt)
        valid_r = _row_valid(i, cfg.w2, g * w2p, w2p)
        if seg:  # rows of other documents' k2 keys: P = 0
            valid_r = valid_r & _slots_to_rows(same, g * w2p, w2p)
        lse = _per_row(lse_ref[t], valid_r, w2p, jnp.inf)  # invalid rows get P = 0
        delta = _per_row(delta_ref[t], valid_r, w2p, 0.0)

        def j_block(n, carry):
            f_acc, c_acc = carry
            j0 = i - w1 + 1 + n * bj
            k1b = _window(k1_ref, j0 + f1 - q0, bj).astype(dt)
            v1b = _window(v1_ref, j0 + f1 - q0, bj).astype(dt)
            jpos = j0 + jax.lax.broadcasted_iota(jnp.int32, (1, bj), 1)
            cvalid = (jpos >= 0) & (jpos <= i)
            if seg:
                cvalid = cvalid & (_lanes(_window(s1_ref, j0 + f1 - q0, bj))[None, :] == doc)
            p = jnp.where(cvalid, jnp.exp(_dot(rows, k1b, common.NT) - lse[:, None]), 0.0)
            ds = p * (_dot(e, v1b, common.NT) - delta[:, None])
            return f_acc + _dot(ds.astype(dt), k1b, common.NN), c_acc + _dot(p.astype(dt), v1b, common.NN)

        m_rows = g * w2p
        init = (jnp.zeros((m_rows, k1_ref.shape[-1]), jnp.float32),
                jnp.zeros((m_rows, v1_ref.shape[-1]), jnp.float32))
        f_acc, c_acc = jax.lax.fori_loop(0, w1p // bj, j_block, init)
        f_acc = f_acc.reshape(g, w2p, -1)
        c_acc = c_acc.reshape(g, w2p, -1)
        dq_ref[t] = (cfg.scale * (f_acc * k2w[None]).sum(axis=1)).astype(dq_ref.dtype)
        t2_ref[t] = cfg.scale * (f_acc * qi[:, None, :]).sum(axis=0)
        u2_ref[t] = (c_acc * doi[:, None, :]).sum(axis=0)
        return 0

    jax.lax.fori_loop(0, tq, per_query, 0)


def _bwd_k_kernel(q_ref, k1_ref, v1_ref, k2_ref, v2_ref, *refs, cfg, seq, g, bj, tc, w2p, f2, seg):
    """Grid (b, kv, k1 block n, query chunk c): chunk c holds queries [j0 + c tc, + tc) (the query-side refs;
    k2/v2 from key position j0 + c tc - f2); dk1/dv1 accumulate in float32 scratch over c."""
    if not seg:
        refs = (None, None, *refs)
    s1_ref, s2_ref, do_ref, lse_ref, delta_ref, dk1_ref, dv1_ref, dk1_acc, dv1_acc = refs
    w1 = cfg.w1
    dt = k1_ref.dtype
    j0 = pl.program_id(2) * bj
    c = pl.program_id(3)
    i0 = j0 + c * tc
    k1b, v1b = k1_ref[...], v1_ref[...]
    jpos = j0 + jax.lax.broadcasted_iota(jnp.int32, (1, bj), 1)
    block_docs = _lanes(s1_ref[...])[None, :] if seg else None  # [1, bj] canonical ids of the block's keys

    @pl.when(c == 0)
    def _():
        dk1_acc[...] = jnp.zeros_like(dk1_acc)
        dv1_acc[...] = jnp.zeros_like(dv1_acc)

    def per_query(i, carry):
        dk1, dv1 = carry
        t = i - i0
        k2_start = t + f2 - cfg.w2 + 1
        _, _, rows, _, _, _, e = _query_rows(q_ref, k2_ref, v2_ref, do_ref, t, i, k2_start, cfg=cfg, g=g, w2p=w2p)
        rows, e = rows.astype(dt), e.astype(dt)
        valid_r = _row_valid(i, cfg.w2, g * w2p, w2p)
        cvalid = (jpos <= i) & (jpos > i - w1)
        if seg:
            doc, same = _document(s2_ref, t + f2, k2_start, w2p)
            valid_r = valid_r & _slots_to_rows(same, g * w2p, w2p)
            cvalid = cvalid & (block_docs == doc)
        lse = _per_row(lse_ref[t], valid_r, w2p, jnp.inf)  # invalid rows get P = 0
        delta = _per_row(delta_ref[t], valid_r, w2p, 0.0)
        p = jnp.where(cvalid, jnp.exp(_dot(rows, k1b, common.NT) - lse[:, None]), 0.0)
        ds = p * (_dot(e, v1b, common.NT) - delta[:, None])
        return dk1 + _dot(ds.astype(dt), rows, common.TN), dv1 + _dot(p.astype(dt), e, common.TN)

    hi = jnp.minimum(j0 + bj - 1 + w1 - 1, seq - 1)  # last query that sees this block

    @pl.when(i0 <= hi)
    def _():
        dk1, dv1 = jax.lax.fori_loop(i0, jnp.minimum(i0 + tc - 1, hi) + 1, per_query, (dk1_acc[...], dv1_acc[...]))
        dk1_acc[...] = dk1
        dv1_acc[...] = dv1

    @pl.when(c == pl.num_programs(3) - 1)
    def _():
        dk1_ref[...] = dk1_acc[...].astype(dk1_ref.dtype)
        dv1_ref[...] = dv1_acc[...].astype(dv1_ref.dtype)


def _layout(q, k1, v1, k2, v2, seg, cfg):
    """[B,S,H,D] -> q [B,Hkv,LQ,G,Dk], keys [B,Hkv,L,D]. Every program sees only windows of the sequence (VMEM
    use independent of its length): a query tile [q0, q0 + tq) the keys k1 from q0 - f1 (span W1) and k2 from
    q0 - f2 (span W2); a k1 block [j0, j0 + bj) the queries in chunks of tc from j0 up to j0 + bj + w1p and
    k2 from each chunk's start - f2 (span tc + f2 + w2p + A).
    Keys are front-padded by f1 = w1p / f2 = w2p (window starts >= 0) and rear-padded, queries rear-padded,
    so that every window ends inside."""
    b, s, hq, dk = q.shape
    hkv = k1.shape[2]
    g = hq // hkv
    tq, bj, w1p, w2p = _tiles(s, cfg.w1, cfg.w2)
    sq = common.round_up(s, tq)
    sj = common.round_up(s, bj)
    f1, f2 = w1p, w2p
    a = _align(k1.dtype)  # _window reads up to one tile past a window
    tc = min(32, bj)  # query chunk of the dk1/dv1 kernel (divides bj)
    lq = common.round_up(max(sq, sj + w1p), tc)  # the last k1 block's queries end at sj + w1p
    qt = jnp.pad(q.reshape(b, s, hkv, g, dk).transpose(0, 2, 1, 3, 4), ((0, 0), (0, 0), (0, lq - s), (0, 0), (0, 0)))
    tr = lambda x, f, tail: jnp.pad(x.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (f, tail), (0, 0)))
    keys1 = [tr(x, f1, max(sq, sj) - s + w1p + a) for x in (k1, v1)]
    keys2 = [tr(x, f2, lq - s + w2p + a) for x in (k2, v2)]
    if seg is not None:  # canonical document ids [B, 1, L, 1] float32 laid out like k1 and like k2; -1 pads
        ids = reference.segment_starts(seg)[0].astype(jnp.float32)[:, None, :, None]
        pad_ids = lambda f, tail: jnp.pad(ids, ((0, 0), (0, 0), (f, tail), (0, 0)), constant_values=-1.0)
        keys1.append(pad_ids(f1, max(sq, sj) - s + w1p + a))
        keys2.append(pad_ids(f2, lq - s + w2p + a))
    dims = dict(b=b, s=s, hkv=hkv, g=g, tq=tq, bj=bj, w1p=w1p, w2p=w2p, sq=sq, sj=sj, f1=f1, f2=f2, lq=lq,
                tc=tc, w1=tq + f1 + w1p + a, w2=tq + f2 + w2p + a, w2c=tc + f2 + w2p + a)
    return qt, keys1, keys2, dims


# Every (batch, kv head, query tile) program is independent: Mosaic may split the grid over a megacore's
# (v5p) two TensorCores.
_PARALLEL3 = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel"))


def _window_spec(x, span: int, step: int):
    """BlockSpec over grid (b, kv, n): rows [n * step, n * step + span) of the sequence axis (2) of x (whose
    head axis 1 may be 1 for all kv heads: the document ids)."""
    heads = x.shape[1] > 1
    return pl.BlockSpec((None, None, pl.Element(span), *map(pl.Element, x.shape[3:])),
                        lambda b, h, n: (b, h if heads else 0, n * step) + (0,) * (x.ndim - 3))


def _qtile(shape, tq):
    return pl.BlockSpec((None, None, tq, *shape[3:]), lambda b, h, n: (b, h, n) + (0,) * (len(shape) - 3))


def forward(q, k1, v1, k2, v2, seg, cfg):
    """Returns out [B,S,Hq,Dv] (q.dtype) and lse [B,S,Hq] (float32). seg: int32 [B, S] or None."""
    qt, (k1p, v1p, *s1), (k2p, v2p, *s2), d = _layout(q, k1, v1, k2, v2, seg, cfg)
    b, hkv, g, sq, tq = d["b"], d["hkv"], d["g"], d["sq"], d["tq"]
    dv = v1.shape[-1]
    kern = functools.partial(_fwd_kernel, cfg=cfg, tq=tq, g=g, bj=d["bj"], w1p=d["w1p"], w2p=d["w2p"],
                             f1=d["f1"], f2=d["f2"], seg=seg is not None)
    o_shape = (b, hkv, sq, g, dv)
    lse_shape = (b, hkv, sq, g)
    out, lse = pl.pallas_call(
        kern,
        grid=(b, hkv, sq // tq),
        in_specs=[_qtile(qt.shape, tq)] + [_window_spec(x, d["w1"], tq) for x in (k1p, v1p)]
        + [_window_spec(x, d["w2"], tq) for x in (k2p, v2p)]
        + [_window_spec(x, d["w1"], tq) for x in s1] + [_window_spec(x, d["w2"], tq) for x in s2],
        out_specs=[_qtile(o_shape, tq), _qtile(lse_shape, tq)],
        out_shape=[jax.ShapeDtypeStruct(o_shape, q.dtype), jax.ShapeDtypeStruct(lse_shape, jnp.float32)],
        compiler_params=_PARALLEL3,
        interpret=common.pallas_interpret(),
        name="simplicial_fwd",
    )(qt, k1p, v1p, k2p, v2p, *s1, *s2)
    s = d["s"]
    out = out[:, :, :s].transpose(0, 2, 1, 3, 4).reshape(b, s, hkv * g, dv)
    lse = lse[:, :, :s].transpose(0, 2, 1, 3).reshape(b, s, hkv * g)
    return out, lse


def backward(q, k1, v1, k2, v2, seg, do, lse, delta, cfg):
    """Returns dq, dk1, dv1 (input dtypes) and the per-query rows t2, u2 [B,S,Hkv,W2P,D] (float32)."""
    qt, (k1p, v1p, *s1), (k2p, v2p, *s2), d = _layout(q, k1, v1, k2, v2, seg, cfg)
    b, s, hkv, g, sq, tq, bj, w2p = (d[n] for n in ("b", "s", "hkv", "g", "sq", "tq", "bj", "w2p"))
    dk, dv = q.shape[-1], v1.shape[-1]
    lq = d["lq"]
    dot = jnp.pad(do.reshape(b, s, hkv, g, dv).transpose(0, 2, 1, 3, 4), ((0, 0), (0, 0), (0, lq - s), (0, 0), (0, 0)))
    per_head = lambda x: jnp.pad(x.reshape(b, s, hkv, g).transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, lq - s), (0, 0)))
    lset, deltat = per_head(lse), per_head(delta)
    keys = (k1p, v1p, k2p, v2p)
    interpret = common.pallas_interpret()

    kern_q = functools.partial(_bwd_q_kernel, cfg=cfg, tq=tq, g=g, bj=bj, w1p=d["w1p"], w2p=w2p,
                               f1=d["f1"], f2=d["f2"], seg=seg is not None)
    t_shape = (b, hkv, sq, w2p)
    dq_shape = (b, hkv, sq, g, dk)
    dq, t2, u2 = pl.pallas_call(
        kern_q,
        grid=(b, hkv, sq // tq),
        in_specs=[_qtile(qt.shape, tq)] + [_window_spec(x, d["w1"], tq) for x in keys[:2]]
        + [_window_spec(x, d["w2"], tq) for x in keys[2:]]
        + [_window_spec(x, d["w1"], tq) for x in s1] + [_window_spec(x, d["w2"], tq) for x in s2]
        + [_qtile(dot.shape, tq), _qtile(lset.shape, tq), _qtile(deltat.shape, tq)],
        out_specs=[_qtile(dq_shape, tq), _qtile(t_shape + (dk,), tq), _qtile(t_shape + (dv,), tq)],
        out_shape=[jax.ShapeDtypeStruct(dq_shape, q.dtype), jax.ShapeDtypeStruct(t_shape + (dk,), jnp.float32),
                   jax.ShapeDtypeStruct(t_shape + (dv,), jnp.float32)],
        compiler_params=_PARALLEL3,
        interpret=interpret,
        name="simplicial_bwd_q",
    )(qt, *keys, *s1, *s2, dot, lset, deltat)

    sj = d["sj"]
    tc = d["tc"]
    kern_k = functools.partial(_bwd_k_kernel, cfg=cfg, seq=s, g=g, bj=bj, tc=tc, w2p=w2p, f2=d["f2"],
                               seg=seg is not None)
    kblock = lambda dd, skip=0, heads=True: pl.BlockSpec(
        (None, None, bj, dd), lambda b_, h, n, c: (b_, h if heads else 0, n + skip, 0))
    chunk = lambda x: pl.BlockSpec((None, None, tc, *x.shape[3:]),
                                   lambda b_, h, n, c: (b_, h, n * (bj // tc) + c) + (0,) * (x.ndim - 3))
    k2win = lambda x, heads=True: pl.BlockSpec(
        (None, None, pl.Element(d["w2c"]), pl.Element(x.shape[3])),
        lambda b_, h, n, c: (b_, h if heads else 0, (n * (bj // tc) + c) * tc, 0))
    dk1, dv1 = pl.pallas_call(
        kern_k,
        grid=(b, hkv, sj // bj, (bj + d["w1p"]) // tc),
        in_specs=[chunk(qt)] + [kblock(x.shape[-1], d["f1"] // bj) for x in keys[:2]]
        + [k2win(x) for x in keys[2:]] + [kblock(1, d["f1"] // bj, False) for _ in s1]
        + [k2win(x, False) for x in s2] + [chunk(x) for x in (dot, lset, deltat)],
        out_specs=[kblock(dk), kblock(dv)],
        out_shape=[jax.ShapeDtypeStruct((b, hkv, sj, dk), k1.dtype), jax.ShapeDtypeStruct((b, hkv, sj, dv), v1.dtype)],
        scratch_shapes=[pltpu.VMEM((bj, dk), jnp.float32), pltpu.VMEM((bj, dv), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="simplicial_bwd_k1",
    )(qt, *keys, *s1, *s2, dot, lset, deltat)

    dq = dq[:, :, :s].transpose(0, 2, 1, 3, 4).reshape(b, s, hkv * g, dk)
    unkey = lambda x: x[:, :, :s].transpose(0, 2, 1, 3)
    unrow = lambda x: x[:, :, :s].transpose(0, 2, 1, 3, 4)
    return dq, unkey(dk1), unkey(dv1), unrow(t2), unrow(u2)
