"""grouped_matmul and swiglu_grouped_matmul: xla and Pallas (interpret) forward and gradients vs the dense
reference and a float64 NumPy oracle; empty groups, uneven sizes, rows past sum(group_sizes); f32 and bf16;
the Triton tile table (CPU). GPU: the triton kernels (both rasters, the two-term gmm, the fused SwiGLU)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.grouped_matmul import (grouped_matmul, pallas_tpu, reference, swiglu_grouped_matmul,
                                    transposed_grouped_matmul)
from tests.oracle import assert_close

CASES = [  # (m, k, n, group_sizes): uneven, empty first/middle/last groups, rows past the total
    (37, 19, 23, [5, 0, 9, 1, 0, 12, 3]),
    (24, 16, 8, [0, 24, 0]),
]


def _oracle(lhs, rhs, gs, dout):
    """float64 loop: out, dlhs, drhs for loss = sum(out * dout)."""
    lhs, rhs, dout = (np.asarray(a, np.float64) for a in (lhs, rhs, dout))
    out = np.zeros((lhs.shape[0], rhs.shape[2]))
    dl = np.zeros_like(lhs)
    dr = np.zeros_like(rhs)
    s = 0
    for g, c in enumerate(gs):
        out[s : s + c] = lhs[s : s + c] @ rhs[g]
        dl[s : s + c] = dout[s : s + c] @ rhs[g].T
        dr[g] = lhs[s : s + c].T @ dout[s : s + c]
        s += c
    return out, dl, dr


def _inputs(seed, m, k, n, g, dtype):
    r = np.random.default_rng(seed)
    cast = lambda a: jnp.asarray(a, jnp.float32).astype(dtype)
    return cast(r.normal(size=(m, k))), cast(r.normal(size=(g, k, n))), cast(r.normal(size=(m, n)))


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_forward_and_grads(impl, dtype, case):
    m, k, n, sizes = CASES[case]
    gs = jnp.asarray(sizes, jnp.int32)
    lhs, rhs, dout = _inputs(case, m, k, n, len(sizes), dtype)
    ref_out, ref_dl, ref_dr = _oracle(lhs.astype(jnp.float32), rhs.astype(jnp.float32), sizes, dout.astype(jnp.float32))

    f = lambda l, r: grouped_matmul(l, r, gs, implementation=impl)
    out, vjp = jax.vjp(f, lhs, rhs)
    dl, dr = vjp(dout)
    assert out.dtype == dtype and dl.dtype == dtype and dr.dtype == dtype
    assert_close(out, ref_out, dtype, "out")
    assert_close(dl, ref_dl, dtype, "dlhs")
    assert_close(dr, ref_dr, dtype, "drhs")
    assert np.all(np.asarray(out[sum(sizes):], np.float32) == 0), "rows past sum(group_sizes) must be zero"
    # The pure-jnp reference agrees with the oracle too (it is the portable fallback's definition).
    assert_close(reference.grouped_matmul(lhs, rhs, gs), ref_out, dtype, "reference")
    assert_close(reference.transposed_grouped_matmul(lhs, dout, gs), ref_dr, dtype, "reference tgmm")


def _swiglu_oracle(x, wg, wu, gs, da):
    """float64: a = silu(x Wg) * (x Wu) per group and the gradients of sum(a * da)."""
    x, wg, wu, da = (np.asarray(a, np.float64) for a in (x, wg, wu, da))
    a = np.zeros((x.shape[0], wg.shape[2]))
    dx, dwg, dwu = np.zeros_like(x), np.zeros_like(wg), np.zeros_like(wu)
    s = 0
    for g, c in enumerate(gs):
        xs, d = x[s : s + c], da[s : s + c]
        h, u = xs @ wg[g], xs @ wu[g]
        sig = 1.0 / (1.0 + np.exp(-h))
        a[s : s + c] = h * sig * u
        dh, du = d * u * sig * (1 + h * (1 - sig)), d * h * sig
        dx[s : s + c] = dh @ wg[g].T + du @ wu[g].T
        dwg[g], dwu[g] = xs.T @ dh, xs.T @ du
        s += c
    return a, dx, dwg, dwu


def _check_swiglu(impl, dtype, m, k, n, sizes, seed, factor=1.0):
    gs = jnp.asarray(sizes, jnp.int32)
    x, wg, da = _inputs(seed, m, k, n, len(sizes), dtype)
    wu = _inputs(seed + 1, m, k, n, len(sizes), dtype)[1]
    f32 = lambda a: np.asarray(a.astype(jnp.float32))
    refs = _swiglu_oracle(f32(x), f32(wg), f32(wu), sizes, f32(da))
    out, vjp = jax.vjp(lambda *a: swiglu_grouped_matmul(*a, gs, implementation=impl), x, wg, wu)
    grads = vjp(da)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    if sum(sizes) == 0:
        assert not np.any(f32(out)) and not any(np.any(f32(g)) for g in grads)
        return
    for got, ref, what in zip((out, *grads), refs, ("a", "dx", "dw_gate", "dw_up")):
        assert_close(got, ref, dtype, what, factor)
    assert np.all(f32(out[sum(sizes):]) == 0) and np.all(f32(grads[0][sum(sizes):]) == 0)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_swiglu_forward_and_grads(impl, dtype):
    m, k, n, sizes = CASES[0]
    _check_swiglu(impl, dtype, m, k, n, sizes, seed=5)


@pytest.mark.parametrize("sizes", [[7, 0, 13, 1, 0, 11, 6, 0], [0, 0, 0], [50, 0, 0], [0, 3, 47]])
def test_triton_work_items(sizes):
    """The Triton tile table: every row in [0, m) lies in exactly one item; an item's rows belong to its
    group (or, group -1, lie past sum(group_sizes)); at most bm rows per item; within the static bound."""
    from kernels.grouped_matmul.tiles import work_items

    m, bm = 50, 8
    gs = np.asarray(sizes, np.int32)
    for xp_gs in (gs, jnp.asarray(gs)):
        group, r0, r1 = (np.asarray(a) for a in work_items(xp_gs, m, bm))
        assert group.shape == (-(-m // bm) + len(sizes) + 1,)
        owner = np.repeat(np.arange(len(sizes)), gs)
        owner = np.concatenate([owner, np.full(m - len(owner), -1)])
        hits = np.zeros(m, int)
        for g, a, b in zip(group, r0, r1):
            assert 0 <= b - a <= bm
            hits[a:b] += 1
            assert np.all(owner[a:b] == g), (g, a, b)
        np.testing.assert_array_equal(hits, 1)
        # Group-major order: items of one group are consecutive, so they share rhs[g] in L2.
        real = group[r1 > r0]
        assert np.all(np.diff(real[real >= 0]) >= 0)


def test_pallas_multi_tile():
    """Small tiles so that tiles hold several groups, groups span several tiles, and k/n are tiled."""
    m, k, n, sizes = 45, 20, 28, [7, 0, 13, 1, 0, 11, 6, 0]
    gs = jnp.asarray(sizes, jnp.int32)
    lhs, rhs, dout = _inputs(7, m, k, n, len(sizes), jnp.float32)
    ref_out, ref_dl, ref_dr = _oracle(lhs, rhs, sizes, dout)
    t = pallas_tpu.Tiling(8, 8, 8)
    assert_close(pallas_tpu.gmm(lhs, rhs, gs, tiling=t), ref_out, jnp.float32, "gmm")
    assert_close(pallas_tpu.gmm(dout, rhs, gs, transpose_rhs=True, tiling=t), ref_dl, jnp.float32, "gmm^T")
    assert_close(pallas_tpu.tgmm(lhs, dout, gs, tiling=t), ref_dr, jnp.float32, "tgmm")


def test_transposed_grouped_matmul_xla():
    m, k, n, sizes = CASES[0]
    lhs, _, dout = _inputs(3, m, k, n, len(sizes), jnp.float32)
    ref_dr = _oracle(lhs, np.zeros((len(sizes), k, n)), sizes, dout)[2]
    out = transposed_grouped_matmul(lhs, dout, jnp.asarray(sizes, jnp.int32), implementation="xla")
    assert_close(out, ref_dr, jnp.float32, "tgmm")


def test_errors():
    with pytest.raises(ValueError, match="same shape"):
        swiglu_grouped_matmul(jnp.ones((4, 3)), jnp.ones((2, 3, 5)), jnp.ones((2, 3, 6)), jnp.ones((2,), jnp.int32))
    lhs, rhs = jnp.ones((4, 3)), jnp.ones((2, 3, 5))
    with pytest.raises(ValueError, match="group_sizes"):
        grouped_matmul(lhs, rhs, jnp.ones((3,), jnp.int32))
    with pytest.raises(ValueError, match="k="):
        grouped_matmul(lhs, jnp.ones((2, 4, 5)), jnp.ones((2,), jnp.int32))
    with pytest.raises(ValueError, match="unknown implementation"):
        grouped_matmul(lhs, rhs, jnp.ones((2,), jnp.int32), implementation="cuda")
    with pytest.raises(ValueError, match="does not run on backend"):
        grouped_matmul(lhs, rhs, jnp.ones((2,), jnp.int32), implementation="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("sizes", [[300, 0, 77, 1, 500, 0, 130, 16], [0] * 8, [1024] + [0] * 7])
def test_triton_gpu(dtype, sizes):
    m, k, n = 1100, 192, 176
    sizes = list(sizes)
    gs = jnp.asarray(sizes, jnp.int32)
    lhs, rhs, dout = _inputs(11, m, k, n, len(sizes), dtype)
    ref_out, ref_dl, ref_dr = _oracle(lhs.astype(jnp.float32), rhs.astype(jnp.float32), sizes, dout.astype(jnp.float32))
    out, vjp = jax.vjp(lambda l, r: grouped_matmul(l, r, gs, implementation="triton"), lhs, rhs)
    dl, dr = vjp(dout)
    # tf32 dots for float32 land near 3e-4 (METHOD.md), so float32 gets a 5x looser bound here.
    factor = 5.0 if dtype == jnp.float32 else 1.0
    if sum(sizes) == 0:
        assert not np.any(np.asarray(out, np.float32)) and not np.any(np.asarray(dr, np.float32))
        return
    assert_close(out, ref_out, dtype, "out", factor)
    assert_close(dl, ref_dl, dtype, "dlhs", factor)
    assert_close(dr, ref_dr, dtype, "drhs", factor)
    assert np.all(np.asarray(out[sum(sizes):], np.float32) == 0)


@pytest.mark.gpu
@pytest.mark.parametrize("raster_n", [True, False])
def test_triton_tilings_gpu(raster_n):
    """Both rasters, persistent programs, BN not dividing n, the two-term gmm (dlhs of the SwiGLU), the fused
    gate+up kernel with and without its stored residuals."""
    from kernels.grouped_matmul import triton_gpu as tg

    m, k, n, sizes = 700, 128, 200, [300, 0, 77, 1, 200, 0, 70, 16]
    gs = jnp.asarray(sizes, jnp.int32)
    lhs, rhs, dout = _inputs(12, m, k, n, len(sizes), jnp.bfloat16)
    lhs2, rhs2, _ = _inputs(13, m, k, n, len(sizes), jnp.bfloat16)
    f32 = lambda a: np.asarray(a.astype(jnp.float32))
    for t in (tg.Tiling(64, 128, 64, 4, 3, raster_n), tg.Tiling(128, 256, 64, 8, 3, raster_n),
              tg.Tiling(64, 128, 64, 4, 3, raster_n, programs=7)):
        out = tg.gmm(lhs, rhs, gs, tiling=t)
        assert_close(out, _oracle(f32(lhs), f32(rhs), sizes, f32(dout))[0], jnp.bfloat16, f"gmm {t}")
        two = tg.gmm(dout, rhs, gs, transpose_rhs=True, lhs2=dout[::-1], rhs2=rhs2, tiling=t)
        ref = _oracle(f32(lhs), f32(rhs), sizes, f32(dout))[1] + _oracle(f32(lhs), f32(rhs2), sizes, f32(dout[::-1]))[1]
        assert_close(two, ref, jnp.bfloat16, f"gmm2^T {t}")
        assert np.all(f32(out[sum(sizes):]) == 0) and np.all(f32(two[sum(sizes):]) == 0)
        a, h, u = tg.gmm_swiglu(lhs, rhs, rhs2, gs, store_hu=True, tiling=t)
        ref_h, ref_u = (_oracle(f32(lhs), f32(w), sizes, f32(dout))[0] for w in (rhs, rhs2))
        assert_close(h, ref_h, jnp.bfloat16, f"h {t}")
        assert_close(u, ref_u, jnp.bfloat16, f"u {t}")
        assert_close(a, ref_h / (1 + np.exp(-ref_h)) * ref_u, jnp.bfloat16, f"a {t}")
        np.testing.assert_array_equal(f32(tg.gmm_swiglu(lhs, rhs, rhs2, gs, store_hu=False, tiling=t)), f32(a))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("sizes", [[300, 0, 77, 1, 500, 0, 130, 16], [0] * 8, [1024] + [0] * 7])
def test_triton_swiglu_gpu(dtype, sizes):
    _check_swiglu("triton", dtype, 1100, 192, 176, list(sizes), seed=21, factor=5.0 if dtype == jnp.float32 else 1.0)
