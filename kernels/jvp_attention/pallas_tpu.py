"""Pallas kernels for jvp_attention (the TPU path; CPU tests run them with interpret=True).

Same contract and equations as reference.py / triton_gpu.py. A program owns one (batch, kv head) and a tile of
T query positions of the G query heads of that kv head, one head after the other (each head's rows a [T, D]
tile: no in-kernel reshape, which Mosaic cannot lay out for G < 8), and streams the causal key blocks of its kv
head (whole sequence resident in VMEM) with an online softmax; with the tangent it carries rowsum(P * tS) and
(P * tS) v alongside. Backward: a per-query-tile kernel (gq, gtq) and a per-key-tile kernel (gk, gv, all query
heads of the kv head, no atomics) recompute P from lse and share the per-tile equations with the reference
(`reference.tile_terms`). Layout: [B, KV, G, S_pad, D] queries, [B, KV, S_pad, D] keys, [B, KV, S_pad, G] row
statistics; the sequence is padded to the tile. The whole-sequence blocks set each call's VMEM budget
(`_compiler_params`); a sequence too long for the chip's VMEM is a one-line error at trace time.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels import common
from kernels.jvp_attention.reference import tile_terms

_dot = common.mxu_dot


MAX_TILE = 128  # query/key positions per tile (MXU-sized); tests lower it to cross many tiles


def _tile(s: int) -> int:
    return min(MAX_TILE, common.round_up(s, 8))


class _Dims:
    def __init__(self, q, k):
        self.b, self.s, self.h, self.d = q.shape
        self.kv = k.shape[2]
        self.g = self.h // self.kv
        self.t = _tile(self.s)
        self.sp = common.round_up(self.s, self.t)
        self.scale = 1.0 / math.sqrt(self.d)


def _pad(x, dims, axis=2, value=0):
    return common.pad_axis(x, axis, dims.sp, value)


def _to_heads(x, dims):
    """[B, S, H, D] -> [B, KV, G, S_pad, D]."""
    return _pad(x.reshape(dims.b, dims.s, dims.kv, dims.g, -1).transpose(0, 2, 3, 1, 4), dims, axis=3)


def _from_heads(x, dims):
    return x[:, :, :, : dims.s].transpose(0, 3, 1, 2, 4).reshape(dims.b, dims.s, dims.h, -1)


def _to_keys(x, dims):
    """[B, S, KV, D] -> [B, KV, S_pad, D]."""
    return _pad(x.transpose(0, 2, 1, 3), dims)


def _to_stat(x, dims):
    """[B, H, S] -> [B, KV, S_pad, G]."""
    return _pad(x.reshape(dims.b, dims.kv, dims.g, dims.s).transpose(0, 1, 3, 2), dims)


def _from_stat(x, dims):
    return x[:, :, : dims.s].transpose(0, 1, 3, 2).reshape(dims.b, dims.h, dims.s)


def _segments(seg, dims):
    """[B, S] or None -> int32 [B, 1, S_pad] (padding in segment -1: never a real segment)."""
    if seg is None:
        seg = jnp.zeros((dims.b, dims.s), jnp.int32)
    return _pad(seg.astype(jnp.int32)[:, None], dims, axis=2, value=-1)


def _visible(seg_ref, q0, k0, dims):
    """bool [T, T]: key k0 + j visible to query q0 + i (causal, real, same segment)."""
    qpos = q0 + jax.lax.broadcasted_iota(jnp.int32, (dims.t, 1), 0)
    kpos = k0 + jax.lax.broadcasted_iota(jnp.int32, (1, dims.t), 1)
    sq = seg_ref[0, pl.ds(q0, dims.t)][:, None]
    sk = seg_ref[0, pl.ds(k0, dims.t)][None, :]
    return (qpos >= kpos) & (qpos < dims.s) & (sq == sk)


def _stat(ref, start, g, dims):
    """Head g's row statistics at rows start.. of a [S|T, G] ref -> [T]."""
    return ref[pl.ds(start, dims.t), pl.ds(g, 1)].reshape(dims.t)


def _fwd_kernel(*refs, dims, has_t):
    it = iter(refs)
    q_ref, k_ref, v_ref = next(it), next(it), next(it)
    tq_ref = next(it) if has_t else None
    seg_ref, o_ref, lse_ref = next(it), next(it), next(it)
    to_ref, tlse_ref = (next(it), next(it)) if has_t else (None, None)
    t, dt = dims.t, k_ref.dtype
    nq = pl.program_id(2)
    q0 = nq * t  # read outside loops: interpret mode cannot lower it in a loop body

    for g in range(dims.g):
        rows = q_ref[g]
        trows = tq_ref[g] if has_t else None

        def block(n, carry, rows=rows, trows=trows):
            m, l, acc, dl, acc_t = carry
            kb, vb = k_ref[pl.ds(n * t, t)], v_ref[pl.ds(n * t, t)]
            ok = _visible(seg_ref, q0, n * t, dims)
            s = jnp.where(ok, _dot(rows, kb, common.NT) * dims.scale, common.NEG_INF)
            m_new = jnp.maximum(m, s.max(-1))
            alpha = jnp.exp(m - m_new)
            p = jnp.where(ok, jnp.exp(s - m_new[:, None]), 0.0)  # rows with no key yet keep l = 0
            l = l * alpha + p.sum(-1)
            acc = acc * alpha[:, None] + _dot(p.astype(dt), vb, common.NN)
            if has_t:
                pts = p * (_dot(trows, kb, common.NT) * dims.scale)
                dl = dl * alpha + pts.sum(-1)
                acc_t = acc_t * alpha[:, None] + _dot(pts.astype(dt), vb, common.NN)
            return m_new, l, acc, dl, acc_t

        z = jnp.zeros((t,), jnp.float32)
        za = jnp.zeros((t, dims.d), jnp.float32)
        m, l, acc, dl, acc_t = jax.lax.fori_loop(0, nq + 1, block, (z + common.NEG_INF, z, za, z, za))
        l = jnp.where(l > 0, l, 1.0)  # padded rows see no key
        o = acc / l[:, None]
        o_ref[g] = o.astype(o_ref.dtype)
        lse_ref[:, pl.ds(g, 1)] = (m + jnp.log(l)).reshape(t, 1)
        if has_t:
            tlse = dl / l
            to_ref[g] = (acc_t / l[:, None] - tlse[:, None] * o).astype(to_ref.dtype)
            tlse_ref[:, pl.ds(g, 1)] = tlse.reshape(t, 1)


def _bwd_terms(ins, g, q_off, q0, k0, dims, has_t):
    """One tile of head g: query rows q0.. (at q_off in the query-side refs: 0 for tiles, q0 for whole-sequence
    refs) against the key block at k0 -> (rows dict, kb, P, GS, GT, tP), all float32 but the operands."""
    t = dims.t
    stat = lambda name: _stat(ins[name], q_off, g, dims)  # noqa: E731
    rows = {n: ins[n][g, pl.ds(q_off, t)] for n in (("q", "go", "tq", "gto") if has_t else ("q", "go"))}
    kb, vb = ins["k"][pl.ds(k0, t)], ins["v"][pl.ds(k0, t)]
    ok = _visible(ins["seg"], q0, k0, dims)
    p = jnp.where(ok, jnp.exp(_dot(rows["q"], kb, common.NT) * dims.scale - stat("lse")[:, None]), 0.0)
    dpo = _dot(rows["go"], vb, common.NT)
    if not has_t:
        gs, gt, tp = tile_terms(p, dpo, stat("r"))
    else:
        ts = _dot(rows["tq"], kb, common.NT) * dims.scale
        gs, gt, tp = tile_terms(p, dpo, stat("r"), ts, _dot(rows["gto"], vb, common.NT), stat("tlse"), stat("gd"))
    return rows, kb, p, gs, gt, tp


def _bwd_row_kernel(*refs, dims, has_t, names):
    ins, outs = dict(zip(names, refs)), refs[len(names):]
    nq = pl.program_id(2)
    q0 = nq * dims.t
    dt = ins["k"].dtype

    for g in range(dims.g):
        def block(n, carry, g=g):
            gq, gtq = carry
            _, kb, _, gs, gt, _ = _bwd_terms(ins, g, 0, q0, n * dims.t, dims, has_t)
            gq = gq + _dot(gs.astype(dt), kb, common.NN)
            if has_t:
                gtq = gtq + _dot(gt.astype(dt), kb, common.NN)
            return gq, gtq

        za = jnp.zeros((dims.t, dims.d), jnp.float32)
        gq, gtq = jax.lax.fori_loop(0, nq + 1, block, (za, za))
        for ref, x in zip(outs, (gq, gtq)):
            ref[g] = (x * dims.scale).astype(ref.dtype)


def _bwd_col_kernel(*refs, dims, has_t, names):
    ins, (gk_ref, gv_ref) = dict(zip(names, refs)), refs[len(names):]
    nk = pl.program_id(2)
    k0 = nk * dims.t
    dt = ins["k"].dtype

    def block(m, carry):
        gk, gv = carry
        for g in range(dims.g):  # every query head of this kv head
            rows, _, p, gs, gt, tp = _bwd_terms(ins, g, m * dims.t, m * dims.t, k0, dims, has_t)
            gk = gk + _dot(gs.astype(dt), rows["q"], common.TN)
            gv = gv + _dot(p.astype(dt), rows["go"], common.TN)
            if has_t:
                gk = gk + _dot(gt.astype(dt), rows["tq"], common.TN)
                gv = gv + _dot(tp.astype(dt), rows["gto"], common.TN)
        return gk, gv

    za = jnp.zeros((dims.t, dims.d), jnp.float32)
    gk, gv = jax.lax.fori_loop(nk, dims.sp // dims.t, block, (za, za))  # causal: query tiles from this one on
    gk_ref[...] = (gk * dims.scale).astype(gk_ref.dtype)
    gv_ref[...] = gv.astype(gv_ref.dtype)


def _spec(x, tiled: bool, t: int):
    """BlockSpec over grid (b, kv, tile): one tile of the sequence axis or the whole sequence. The sequence axis
    is 3 of a query-side [B, KV, G, S_pad, D] array, else 2."""
    axis = 3 if x.ndim == 5 else 2
    block = [None, None, *x.shape[2:]]
    if tiled:
        block[axis] = t

    def index(b, h, n):
        idx = [b, h] + [0] * (x.ndim - 2)
        idx[axis] = n if tiled else 0
        return tuple(idx)

    return pl.BlockSpec(tuple(block), index)


def _seg_spec(seg):
    return pl.BlockSpec((None, 1, seg.shape[-1]), lambda b, h, n: (b, 0, 0))


def _vmem_bytes(spec, dtype) -> int:
    """VMEM of one buffer of a block: the minor two dims padded to the (sublanes, 128 lanes) tile."""
    shape = [d for d in spec.block_shape if d is not None]
    item = jnp.dtype(dtype).itemsize
    *lead, r, c = [1] * max(0, 2 - len(shape)) + shape
    return math.prod(lead) * common.round_up(r, 8 * max(1, 4 // item)) * common.round_up(c, 128) * item


def _compiler_params(name: str, dims, specs_and_dtypes) -> pltpu.CompilerParams:
    """Every (batch, kv head, tile) program is independent: "parallel" lets a megacore (v5p) split the grid over
    its 2 TensorCores. The scoped-VMEM limit covers the double-buffered blocks (the whole-sequence ones grow
    with the sequence; Mosaic's default is 16-32 MiB), up to the chip's VMEM."""
    need = 2 * sum(_vmem_bytes(sp, dt) for sp, dt in specs_and_dtypes) + (4 << 20)  # + in-kernel temporaries
    limit = None
    if not common.pallas_interpret() and need > (16 << 20):
        try:
            cap = pltpu.get_tpu_info().vmem_capacity_bytes
        except Exception:  # noqa: BLE001 - no TPU info here (e.g. tracing without a target chip): the smallest
            cap = 64 << 20
        if need > cap * 0.9:
            raise ValueError(f"jvp_attention: implementation='pallas' at sequence length {dims.s} (head_dim {dims.d}, "
                             f"{dims.g} query heads per kv head) needs ~{need >> 20} MiB of VMEM for {name}'s "
                             f"whole-sequence blocks, more than fits this TPU's {cap >> 20} MiB; "
                             "use implementation='xla' or shorter sequences")
        limit = int(min(max(need, 32 << 20), cap * 0.9))
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel"), vmem_limit_bytes=limit)


def forward(q, k, v, tq=None, segment_ids=None):
    """(o, lse) or, with tq, (o, lse, to, tlse): reference.forward's contract."""
    dims = _Dims(q, k)
    has_t = tq is not None
    qs = [_to_heads(q, dims)] + ([_to_heads(tq, dims)] if has_t else [])
    keys = [_to_keys(k, dims), _to_keys(v, dims)]
    seg = _segments(segment_ids, dims)
    o_shape = (dims.b, dims.kv, dims.g, dims.sp, dims.d)
    st_shape = (dims.b, dims.kv, dims.sp, dims.g)
    outs = [jax.ShapeDtypeStruct(o_shape, q.dtype), jax.ShapeDtypeStruct(st_shape, jnp.float32)] * (2 if has_t else 1)
    in_specs = ([_spec(qs[0], True, dims.t)] + [_spec(x, False, dims.t) for x in keys]
                + [_spec(x, True, dims.t) for x in qs[1:]] + [_seg_spec(seg)])
    out_specs = [_spec(o, True, dims.t) for o in outs]
    name = "jvp_attention_fwd" + ("_tangent" if has_t else "")
    res = pl.pallas_call(
        functools.partial(_fwd_kernel, dims=dims, has_t=has_t),
        grid=(dims.b, dims.kv, dims.sp // dims.t),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=outs,
        compiler_params=_compiler_params(name, dims, zip(in_specs + out_specs,
                                                         [x.dtype for x in (qs[0], *keys, *qs[1:], seg, *outs)])),
        interpret=common.pallas_interpret(),
        name=name,
    )(qs[0], *keys, *qs[1:], seg)
    o, lse = _from_heads(res[0], dims), _from_stat(res[1], dims)
    if not has_t:
        return o, lse
    return o, lse, _from_heads(res[2], dims), _from_stat(res[3], dims)


def backward(q, k, v, tq, lse, tlse, go, gto, gd, r, segment_ids=None):
    """(gq, gk, gv, gtq) in the input dtypes (gtq None without tq): reference.backward's contract."""
    dims = _Dims(q, k)
    has_t = tq is not None
    # name -> (array, how its BlockSpec slices it); the kernels get the names and look their refs up by them
    ins = {"q": (_to_heads(q, dims), "rows"), "k": (_to_keys(k, dims), "keys"), "v": (_to_keys(v, dims), "keys"),
           "seg": (_segments(segment_ids, dims), "seg"), "lse": (_to_stat(lse, dims), "rows"),
           "go": (_to_heads(go.astype(q.dtype), dims), "rows"), "r": (_to_stat(r, dims), "rows")}
    if has_t:
        ins.update(tq=(_to_heads(tq, dims), "rows"), tlse=(_to_stat(tlse, dims), "rows"),
                   gto=(_to_heads(gto.astype(q.dtype), dims), "rows"), gd=(_to_stat(gd, dims), "rows"))
    names = tuple(ins)
    arrays = [x for x, _ in ins.values()]
    grid = (dims.b, dims.kv, dims.sp // dims.t)
    interpret = common.pallas_interpret()
    sfx = "_tangent" if has_t else ""

    def specs(row_tiles: bool):
        return [_seg_spec(x) if kind == "seg" else _spec(x, kind == "rows" and row_tiles, dims.t)
                for x, kind in ins.values()]

    def call(kernel, name, in_specs, outs):
        out_specs = [_spec(o, True, dims.t) for o in outs]
        params = _compiler_params(name, dims, zip(in_specs + out_specs, [x.dtype for x in arrays + outs]))
        return pl.pallas_call(functools.partial(kernel, dims=dims, has_t=has_t, names=names), grid=grid,
                              in_specs=in_specs, out_specs=out_specs, out_shape=outs, interpret=interpret,
                              compiler_params=params, name=name)(*arrays)

    q_shape = (dims.b, dims.kv, dims.g, dims.sp, dims.d)
    gq = call(_bwd_row_kernel, "jvp_attention_bwd_q" + sfx, specs(True),
              [jax.ShapeDtypeStruct(q_shape, q.dtype)] * (2 if has_t else 1))
    k_shape = (dims.b, dims.kv, dims.sp, dims.d)
    gk, gv = call(_bwd_col_kernel, "jvp_attention_bwd_kv" + sfx, specs(False),
                  [jax.ShapeDtypeStruct(k_shape, k.dtype), jax.ShapeDtypeStruct(k_shape, v.dtype)])
    unkey = lambda x: x[:, :, : dims.s].transpose(0, 2, 1, 3)  # noqa: E731
    gtq = _from_heads(gq[1], dims) if has_t else None
    return _from_heads(gq[0], dims), unkey(gk), unkey(gv), gtq
