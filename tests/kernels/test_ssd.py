"""SSD op vs a float64 NumPy recurrence (forward, final state, all seven gradients), carried state, decode step."""
import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from kernels import common
from kernels.ssd import OP, ssd, ssd_step
from tests.kernels import triton_interpreter
from tests.kernels.op_test_base import Call, OpTestBase
from tests.oracle import assert_close, rel_err

CPU_IMPLS = ["xla", "pallas"]
F32 = np.dtype(np.float32)
BF16 = np.dtype(ml_dtypes.bfloat16)


def np_keep(seg, b, L):
    """1.0 where position t continues position t-1's segment (always at t = 0: h0 feeds the first one) [b, L]."""
    if seg is None:
        return np.ones((b, L))
    seg = np.asarray(seg)
    return np.concatenate([np.ones((b, 1)), (seg[:, 1:] == seg[:, :-1]).astype(np.float64)], axis=1)


def np_ssd(x, dt, A, B, C, D, h0, seg=None):
    """Sequential recurrence in float64 (state zeroed where the segment id changes). Returns y, final state."""
    x, dt, A, B, C, D, H = (np.asarray(v, np.float64) for v in (x, dt, A, B, C, D, h0))
    b, L, h, P = x.shape
    r = h // B.shape[2]
    Bh, Ch = np.repeat(B, r, axis=2), np.repeat(C, r, axis=2)
    keep = np_keep(seg, b, L)
    y = np.zeros_like(x)
    for t in range(L):
        a = np.exp(dt[:, t] * A) * keep[:, t, None]
        H = a[..., None, None] * H + (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None, :]
        y[:, t] = np.einsum("bhpn,bhn->bhp", H, Ch[:, t]) + D[:, None] * x[:, t]
    return y, H


def np_ssd_grads(x, dt, A, B, C, D, h0, dy, dfinal, seg=None):
    """Hand-written adjoint of np_ssd in float64: gradients of <y, dy> + <final, dfinal>."""
    x, dt, A, B, C, D, h0, dy, dH = (np.asarray(v, np.float64) for v in (x, dt, A, B, C, D, h0, dy, dfinal))
    b, L, h, P = x.shape
    g = B.shape[2]
    r = h // g
    Bh, Ch = np.repeat(B, r, axis=2), np.repeat(C, r, axis=2)
    keep = np_keep(seg, b, L)
    Hs = [h0]
    for t in range(L):
        a = (np.exp(dt[:, t] * A) * keep[:, t, None])[..., None, None]
        Hs.append(a * Hs[-1] + (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None, :])
    dx, ddt, dBh, dCh = (np.zeros_like(v) for v in (x, dt, Bh, Ch))
    dA, dD = np.zeros_like(A), np.zeros_like(D)
    for t in reversed(range(L)):
        H, Hp = Hs[t + 1], Hs[t]
        dH = dH + dy[:, t, :, :, None] * Ch[:, t, :, None, :]
        dCh[:, t] = np.einsum("bhpn,bhp->bhn", H, dy[:, t])
        dD += np.einsum("bhp,bhp->h", dy[:, t], x[:, t])
        dHB = np.einsum("bhpn,bhn->bhp", dH, Bh[:, t])
        dx[:, t] = dt[:, t, :, None] * dHB + D[:, None] * dy[:, t]
        dBh[:, t] = dt[:, t, :, None] * np.einsum("bhpn,bhp->bhn", dH, x[:, t])
        a = np.exp(dt[:, t] * A) * keep[:, t, None]
        da = np.sum(dH * Hp, axis=(-1, -2)) * a  # d/d(dt*A)
        ddt[:, t] = np.sum(x[:, t] * dHB, -1) + da * A
        dA += np.sum(da * dt[:, t], axis=0)
        dH = a[..., None, None] * dH
    sum_groups = lambda v: v.reshape(b, L, g, r, -1).sum(3)
    return dx, ddt, dA, sum_groups(dBh), sum_groups(dCh), dD, dH


def make_inputs(rng, b, L, h, P, g, N, dtype):
    rnd = lambda *s: rng.standard_normal(s).astype(np.float32)
    x = rnd(b, L, h, P).astype(dtype)
    dt = np.exp(rng.uniform(np.log(1e-2), np.log(0.3), (b, L, h))).astype(dtype)
    A = -rng.uniform(0.5, 4.0, h).astype(np.float32)
    B, C = rnd(b, L, g, N).astype(dtype), rnd(b, L, g, N).astype(dtype)
    D = rnd(h)
    h0 = rnd(b, h, P, N)
    return x, dt, A, B, C, D, h0


def run_ssd(impl, chunk, x, dt, A, B, C, D, h0):
    return ssd(x, dt, A, B, C, D=D, initial_state=h0, chunk_size=chunk, return_final_state=True,
               implementation=impl)


run_ssd_jit = jax.jit(run_ssd, static_argnums=(0, 1))


@functools.partial(jax.jit, static_argnums=(0, 1))
def ssd_and_grads(impl, chunk, dy, dfinal, *inputs):
    """(y, final_state) and the gradients of <y, dy> + <final, dfinal> w.r.t. all seven inputs, one compile."""
    (y, final), vjp = jax.vjp(lambda *a: run_ssd(impl, chunk, *a), *inputs)
    return y, final, vjp((dy.astype(y.dtype), dfinal))


class TestSSD(OpTestBase):
    """Forward, final state and all seven gradients vs the float64 recurrence; seq not a multiple of the chunk,
    groups > 1."""

    OP = OP
    CASES = {"f32": np.float32, "bf16": ml_dtypes.bfloat16}
    OUT_NAMES = ("y", "final_state")
    GRAD_NAMES = ("x", "dt", "A", "B", "C", "D", "initial_state")
    GRAD_FACTORS = {"dt": 2.0, "A": 2.0}
    AUTO_CASE = "f32"
    AUTO = {("cpu", False): "xla", ("tpu", False): "pallas", ("gpu", True): "triton", ("gpu", False): "xla"}
    SHAPE = (2, 45, 4, 8, 2, 16, 16)  # b, L, h, P, g, N, chunk

    def make(self, case, rng):
        dtype = self.CASES[case]
        b, L, h, P, g, N, chunk = self.SHAPE
        inputs = make_inputs(rng, b, L, h, P, g, N, dtype)
        dy = rng.standard_normal((b, L, h, P)).astype(dtype)  # cotangent in y's dtype, as a training step gives it
        dfinal = rng.standard_normal((b, h, P, N)).astype(np.float32)
        return Call(inputs, (dy, dfinal), np.dtype(dtype), {"chunk": chunk})

    def apply(self, impl, call, *args):
        return run_ssd(impl, call.extra["chunk"], *args)

    def oracle(self, case, call):
        return np_ssd(*call.args), np_ssd_grads(*call.args, *call.cotangent)

    def facts(self, call):
        return {"segments": False}

    def check_outputs(self, impl, call, outs):
        y, final = outs
        b, L, h, P = self.SHAPE[:4]
        assert y.dtype == call.dtype and y.shape == (b, L, h, P) and final.dtype == jnp.float32

    def test_segment_ids_take_the_fused_kernels(self, monkeypatch):
        """Packed rows (segment_ids) run on every implementation: implementation=None picks the backend's fused
        kernel with or without segments (before issue 18 they fell back to xla)."""
        monkeypatch.setattr(common, "has_jax_triton", lambda: True)
        with common.target_backend("gpu"):
            assert OP.pick(None, segments=True) == "triton" == OP.pick("triton", segments=True)
        with common.target_backend("tpu"):
            assert OP.pick(None, segments=True) == "pallas"
        assert OP.pick("pallas", segments=True) == "pallas"  # on this CPU: interpret mode


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_carried_state_equals_one_long_forward(impl):
    rng = np.random.default_rng()
    x, dt, A, B, C, D, h0 = make_inputs(rng, 1, 40, 2, 8, 1, 8, np.dtype(np.float32))
    run_ssd = run_ssd_jit
    y_full, f_full = run_ssd(impl, 16, x, dt, A, B, C, D, h0)
    cut = 19  # not on a chunk boundary
    part = lambda v, sl: v[:, sl]
    y1, f1 = run_ssd(impl, 16, *(part(v, slice(0, cut)) for v in (x, dt)), A,
                     *(part(v, slice(0, cut)) for v in (B, C)), D, h0)
    y2, f2 = run_ssd(impl, 16, *(part(v, slice(cut, None)) for v in (x, dt)), A,
                     *(part(v, slice(cut, None)) for v in (B, C)), D, f1)
    assert_close(jnp.concatenate([y1, y2], axis=1), y_full, np.dtype(np.float32), "y")
    assert_close(f2, f_full, np.dtype(np.float32), "final_state")


def test_decode_steps_equal_parallel_forward():
    rng = np.random.default_rng()
    x, dt, A, B, C, D, h0 = make_inputs(rng, 2, 21, 4, 8, 2, 8, np.dtype(np.float32))
    y_par, f_par = run_ssd_jit("xla", 8, x, dt, A, B, C, D, h0)
    state, ys = jnp.asarray(h0), []
    step = jax.jit(ssd_step)
    for t in range(x.shape[1]):
        y_t, state = step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        assert state.dtype == jnp.float32
        ys.append(y_t)
    assert_close(jnp.stack(ys, 1), y_par, np.dtype(np.float32), "y")
    assert_close(state, f_par, np.dtype(np.float32), "state")
    assert_close(jnp.stack(ys, 1), np_ssd(x, dt, A, B, C, D, h0)[0], np.dtype(np.float32), "y vs float64")


def test_defaults_no_D_no_initial_state():
    rng = np.random.default_rng()
    x, dt, A, B, C, D, h0 = make_inputs(rng, 1, 10, 2, 4, 1, 4, np.dtype(np.float32))
    y = ssd(x, dt, A, B, C, chunk_size=4)
    assert_close(y, np_ssd(x, dt, A, B, C, np.zeros_like(D), np.zeros_like(h0))[0], np.dtype(np.float32))


def test_bad_arguments_raise_clear_errors():
    rng = np.random.default_rng()
    x, dt, A, B, C, D, h0 = make_inputs(rng, 1, 8, 4, 4, 2, 4, np.dtype(np.float32))
    with pytest.raises(ValueError, match="dt must be"):
        ssd(x, dt[:, :-1], A, B, C)
    with pytest.raises(ValueError, match="multiple of groups"):
        ssd(x, dt, A, np.zeros((1, 8, 3, 4), np.float32),
            np.zeros((1, 8, 3, 4), np.float32))
    with pytest.raises(ValueError, match="C must have"):
        ssd(x, dt, A, B, C[..., :2])
    with pytest.raises(ValueError, match="A must be"):
        ssd(x, dt, A[:2], B, C)
    with pytest.raises(ValueError, match="initial_state must be"):
        ssd(x, dt, A, B, C, initial_state=h0[:, :, :2])
    with pytest.raises(ValueError, match="x must be"):
        ssd(x[0], dt, A, B, C)
    with pytest.raises(ValueError, match="chunk_size"):
        ssd(x, dt, A, B, C, chunk_size=0)
    with pytest.raises(ValueError, match="unknown implementation"):
        ssd(x, dt, A, B, C, implementation="cuda")
    with pytest.raises(ValueError, match="does not run on backend"):
        ssd(x, dt, A, B, C, implementation="triton")


# ------------------------------------------------------------------------------ packed rows (segment_ids)
# chunk 8, seq 37: row 0 has a reset inside chunk 0, a document crossing the 8 boundary, one starting exactly at
# 16, and trailing padding crossing 32; row 1 a document spanning three chunks, a length-1 document starting
# exactly at 24, padding in the middle, and a document after it.
SEGMENTS = np.array([[1] * 5 + [2] * 11 + [3] * 10 + [0] * 11,
                     [1] * 24 + [2] + [0] * 2 + [3] * 7 + [0] * 3], np.int32)


@functools.partial(jax.jit, static_argnames=("impl", "chunk", "with_h0"))
def ssd_segments_and_grads(seg, dy, dfinal, x, dt, A, B, C, D, h0, impl="xla", chunk=8, with_h0=True):
    """(y, final) and the seven gradients of <y, dy> + <final, dfinal> with segment_ids (the custom VJP)."""
    def f(x, dt, A, B, C, D, h0):
        return ssd(x, dt, A, B, C, D=D, initial_state=h0 if with_h0 else None, chunk_size=chunk,
                   return_final_state=True, segment_ids=seg, implementation=impl)

    (y, final), vjp = jax.vjp(f, x, dt, A, B, C, D, h0)
    return y, final, vjp((dy, dfinal))


def check_segments_vs_float64(impl, dtype, seg, shape, chunk, with_h0=True, run=ssd_segments_and_grads,
                              grad_factors=None):
    """Forward, final state and every gradient with segment_ids vs the float64 recurrence on fresh inputs."""
    rng = np.random.default_rng()
    b, L = seg.shape
    x, dt, A, B, C, D, h0 = make_inputs(rng, b, L, *shape, dtype)
    h0_ref = h0 if with_h0 else np.zeros_like(h0)
    y_ref, final_ref = np_ssd(x, dt, A, B, C, D, h0_ref, seg=seg)
    dy = rng.standard_normal(y_ref.shape).astype(dtype)  # y's dtype, as a training step gives it
    dfinal = rng.standard_normal(final_ref.shape).astype(np.float32)
    y, final, grads = run(seg, dy, dfinal, x, dt, A, B, C, D, h0, impl=impl, chunk=chunk, with_h0=with_h0)
    dt_ = np.dtype(dtype)
    assert y.shape == x.shape and y.dtype == x.dtype and final.dtype == jnp.float32
    assert_close(y, y_ref, dt_, "y")
    assert_close(final, final_ref, dt_, "final_state")
    # the resets matter: the recurrence without them is far from this one
    assert rel_err(np_ssd(x, dt, A, B, C, D, h0_ref)[0], y_ref) > 1e-2
    refs = np_ssd_grads(x, dt, A, B, C, D, h0_ref, dy, dfinal, seg=seg)
    factors = grad_factors or {"dt": 2.0, "A": 2.0}
    names = ["x", "dt", "A", "B", "C", "D"] + (["initial_state"] if with_h0 else [])
    for name, got, want in zip(names, grads, refs):
        assert got.shape == want.shape, name
        assert_close(got, want, dt_, f"d{name}", factor=factors.get(name, 1.0))
    return x, dt, A, B, C, D, h0, y


@pytest.mark.parametrize("impl,dtype,with_h0", [("xla", F32, True), ("xla", F32, False), ("pallas", F32, True),
                                                ("pallas", F32, False), ("xla", BF16, True), ("pallas", BF16, True)],
                         ids=["xla-f32-h0", "xla-f32", "pallas-f32-h0", "pallas-f32", "xla-bf16-h0", "pallas-bf16-h0"])
def test_segment_ids_reset_state_match_float64_recurrence(impl, dtype, with_h0):
    """Resets inside chunks, at chunk starts, a one-token document, padding runs, several resets in one chunk whose
    entering document never appears in it (SEGMENTS): forward, final state and all gradients (custom VJP)."""
    x, dt, A, B, C, D, h0, y = check_segments_vs_float64(impl, dtype, SEGMENTS, (4, 8, 2, 8), 8, with_h0)
    if with_h0 and dtype == F32:  # h0 reaches only the first document (positions 0..4 of row 0, 0..23 of row 1)
        y0 = ssd(x, dt, A, B, C, D=D, chunk_size=8, segment_ids=SEGMENTS, implementation=impl)
        np.testing.assert_allclose(y[0, 5:], y0[0, 5:], rtol=1e-5, atol=1e-5)
        assert rel_err(y[0, :5], y0[0, :5]) > 1e-2


def test_segment_custom_vjp_equals_autodiff_of_masked_forward():
    """The closed-form backward with document masks (api._ssd_bwd) equals jax autodiff through the masked chunked
    forward (api._forward, plain jnp) to float32 rounding: the dcs derivation for the masks, checked directly."""
    from kernels.ssd import api, reference

    rng = np.random.default_rng()
    x, dt, A, B, C, D, h0 = make_inputs(rng, 2, 37, 4, 8, 2, 8, F32)
    docs = reference.chunk_documents(SEGMENTS, 8)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    dfinal = rng.standard_normal(h0.shape).astype(np.float32)

    @jax.jit
    def both(*a):
        plain = lambda *a: (lambda y, st: (y, st[:, -1]))(*api._forward(8, "xla", *a, docs))
        custom = lambda *a: api._ssd(8, "xla", *a, docs)
        return [jax.vjp(f, *a)[1]((dy, dfinal)) for f in (plain, custom)]

    want, got = both(x, dt, A, B, C, D, h0)
    for name, g, w in zip(("x", "dt", "A", "B", "C", "D", "initial_state"), got, want):
        assert rel_err(g, w) < 2e-5, (name, rel_err(g, w))


def test_no_segment_ids_traces_no_document_input(monkeypatch):
    """Segments are a trace-time option: without segment_ids no Pallas kernel is given the document block (forward
    and backward), with them chunk_scan and both backward kernels are (chunk_state is masked through its weights)."""
    from kernels.ssd import pallas_tpu

    rng = np.random.default_rng()
    x, dt, A, B, C, D, h0 = make_inputs(rng, 1, 16, 2, 8, 1, 8, F32)
    calls, real_call = [], pallas_tpu._call
    monkeypatch.setattr(pallas_tpu, "_call", lambda kernel, ins, kinds, *a: (
        calls.append((kernel.__name__, "r" in kinds)), real_call(kernel, ins, kinds, *a))[1])

    def kernels_given_docs(seg):
        calls.clear()
        f = lambda x: jnp.sum(ssd(x, dt, A, B, C, D=D, chunk_size=8, segment_ids=seg, implementation="pallas"))
        jax.make_jaxpr(jax.grad(f))(x)
        assert len(calls) == 5, calls  # chunk_state (fwd, reverse), chunk_scan, dx/dB, dC
        return sorted(name for name, docs in calls if docs)

    assert kernels_given_docs(None) == []
    assert kernels_given_docs(np.ones((1, 16), np.int32)) == ["_bwd_dC_kernel", "_bwd_dx_dB_kernel",
                                                              "_chunk_scan_kernel"]


def test_segment_ids_errors_and_one_document():
    rng = np.random.default_rng()
    x, dt, A, B, C, D, h0 = make_inputs(rng, 1, 8, 4, 4, 2, 4, np.dtype(np.float32))
    seg = np.ones((1, 8), np.int32)
    with pytest.raises(ValueError, match="segment_ids must be"):
        ssd(x, dt, A, B, C, segment_ids=seg[:, :-1])
    with pytest.raises(ValueError, match="segment_ids must be"):
        ssd(x, dt, A, B, C, segment_ids=seg.astype(np.float32))
    # one document everywhere == no segment_ids
    for impl in CPU_IMPLS:
        assert_close(ssd(x, dt, A, B, C, D=D, chunk_size=4, segment_ids=seg * 3, implementation=impl),
                     ssd(x, dt, A, B, C, D=D, chunk_size=4, implementation=impl), F32)


# ------------------------------------------------------------------------------ Triton kernels on CPU
# chunk 16 (Triton needs a multiple of 16), seq 45: row 0 resets inside chunk 0, exactly at the chunk-1 start
# (a one-token document at 16), right after it, inside chunk 1 and a padding run crossing into chunk 2; row 1
# one document over two chunks, then resets at the chunk-2 start (32), at 33 (padding) and 35.
SEGMENTS16 = np.array([[1] * 6 + [2] * 10 + [3] + [4] * 9 + [5] * 4 + [0] * 15,
                       [7] * 32 + [8] + [0] * 2 + [9] * 10], np.int32)


def _triton_interpreter_errors():
    """Runs in a TRITON_INTERPRET=1 subprocess: ssd(implementation='triton') end to end (jax wrappers, custom VJP),
    each Triton launch executed by Triton's interpreter on NumPy copies of its operands (a jax.pure_callback in
    place of jax_triton), float32, with and without segment_ids, vs the float64 recurrence.
    Returns {case name: rel_err}."""
    from kernels.ssd import api, triton_gpu
    from tests.kernels.triton_interpreter import numpy_pointers

    Ptr = numpy_pointers()

    def triton_call(*args, kernel, out_shape, grid, num_warps=None, num_stages=None, **meta):
        many = isinstance(out_shape, (list, tuple))
        outs = list(out_shape) if many else [out_shape]

        def host(*arrays):
            ins = [np.ascontiguousarray(a) for a in arrays]
            res = [np.full(o.shape, np.nan, o.dtype) for o in outs]  # NaN: an element no program writes shows
            kernel[grid](*map(Ptr, ins + res), **meta)
            return res

        res = jax.pure_callback(host, outs, *args)
        return res if many else res[0]

    triton_gpu._triton_call = triton_call
    errs = {}
    # (name, segment ids or None, (h, P, g, N), chunk): groups > 1 and 2 heads per group; then P, N not powers
    # of two (masked lanes), one group of 4 heads, 3 chunks of 32 with random documents
    rng = np.random.default_rng()
    rand_seg = np.cumsum(rng.random((1, 83)) < 0.08, axis=1).astype(np.int32)
    rand_seg[0, 70:75] = 0
    # then 16/32-row tiles in chunks of 64 (several tiles per chunk: the tile skipping before a row block's
    # first document start and after its last document end; e.g. rows 32-63 hold documents from 7, 36, 37, 55),
    # documents of 1-37 tokens, padding runs of 2 and 24
    many = np.repeat(np.array([1, 2, 3, 4, 5, 6, 0, 7, 0], np.int32), [7, 29, 1, 18, 37, 9, 2, 23, 24])[None]
    tiles16 = dict(scan_bm=32, scan_bk=16, cb_bm=32, cb_bk=16, bwd_blk=16)
    cases = [("seg", SEGMENTS16, (4, 8, 2, 8), 16, {}), ("noseg", None, (4, 8, 2, 8), 16, {}),
             ("seg-odd", rand_seg, (4, 12, 1, 20), 32, {}), ("seg-tiles", many, (2, 8, 1, 8), 64, tiles16)]
    for name, seg, (h, P, g, N), chunk, config in cases:
        triton_gpu.CONFIG.update(config)  # this subprocess only
        b, L = (2, 45) if seg is None else seg.shape
        x, dt, A, B, C, D, h0 = make_inputs(rng, b, L, h, P, g, N, F32)
        y_ref, f_ref = np_ssd(x, dt, A, B, C, D, h0, seg=seg)
        dy = rng.standard_normal(y_ref.shape).astype(np.float32)
        dfinal = rng.standard_normal(f_ref.shape).astype(np.float32)
        f = lambda *a, seg=seg, chunk=chunk: api._ssd_segments(chunk, "triton", *a, seg)
        (y, final), vjp = jax.vjp(f, *map(jnp.asarray, (x, dt, A, B, C, D, h0)))
        grads = vjp((jnp.asarray(dy), jnp.asarray(dfinal)))
        refs = np_ssd_grads(x, dt, A, B, C, D, h0, dy, dfinal, seg=seg)
        errs[f"{name} y"], errs[f"{name} final"] = rel_err(y, y_ref), rel_err(final, f_ref)
        for n, got, want in zip(("x", "dt", "A", "B", "C", "D", "h0"), grads, refs):
            errs[f"{name} d{n}"] = rel_err(got, want)
    return errs


def test_triton_kernels_in_interpreter():
    """The Triton stages (chunk_cb, chunk_state, state_passing fwd/reverse, chunk_scan, dx/dB, dC; with the
    document masks and without) on CPU. Needs triton importable, or a directory holding it in AXL_TRITON_SITE
    (e.g. `pip install --no-deps --target DIR triton==3.6.0`, kept out of the project venv); skips otherwise."""
    errs = triton_interpreter.run("tests.kernels.test_ssd:_triton_interpreter_errors")
    assert len(errs) == 4 * 9
    # float32 with IEEE dots: measured <= 1e-6 (dA, the largest); a wrong mask or term gives >= 1e-2
    bad = {k: v for k, v in errs.items() if not v <= 2e-5}
    assert not bad, bad


@pytest.mark.parametrize("chip", ["v5p", "v6e"])
def test_segment_kernels_compile_for_tpu(chip):
    """The Pallas kernels with the document block (forward and backward, bf16, the production head shape) pass
    Mosaic's lowering and libtpu's compile for a TPU chip on this CPU host (tools.tpu_compile; skips without
    libtpu)."""
    import tools.tpu_compile as tc

    if tc.libtpu_path() is None:
        pytest.skip("libtpu not installed (scripts/bootstrap.sh puts it in .venv/libtpu)")
    S = jax.ShapeDtypeStruct
    b, L, h, P, g, N, Q = 2, 1024, 4, 64, 1, 128, 256
    x, bc = S((b, L, h, P), jnp.bfloat16), S((b, L, g, N), jnp.bfloat16)

    def fwd_bwd(x, dt, A, B, C, D, seg, dy):
        y, vjp = jax.vjp(lambda *a: ssd(*a[:5], chunk_size=Q, D=a[5], segment_ids=seg), x, dt, A, B, C, D)
        return y, vjp(dy)

    exported, report = tc.export_for_tpu(fwd_bwd, x, S((b, L, h), jnp.bfloat16), S((h,), jnp.float32), bc, bc,
                                         S((h,), jnp.float32), S((b, L), jnp.int32), x, chip_name=chip)
    tc.check_mosaic(report, ("ssd_chunk_state", "ssd_chunk_scan", "ssd_bwd_dx_dB", "ssd_bwd_dC"))
    tc.compile_exported(exported, chip)


def test_pallas_segments_under_mesh_match_single_program():
    """Pallas with segment_ids under an 8-device data x fsdp x tensor CPU mesh runs in common.partitioned's
    shard_map (segment_ids split with the batch rows): outputs and all gradients equal the single-program ones."""
    import flax.linen as nn

    from axlearn_like import sharding as shd

    rng = np.random.default_rng()
    x, dt, A, B, C, D, h0 = make_inputs(rng, 4, 16, 4, 8, 1, 8, F32)
    seg = np.array([[1] * 3 + [2] * 13, [1] * 8 + [0] * 8, [5] * 16, [1] + [2] * 9 + [3] * 6], np.int32)

    def f(*a):
        out, vjp = jax.vjp(lambda *a: ssd(*a[:5], chunk_size=8, D=a[5], initial_state=a[6], segment_ids=seg,
                                          return_final_state=True, implementation="pallas"), *a)
        return out, vjp(jax.tree.map(lambda o: jnp.cos(o).astype(o.dtype), out))

    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:8]).reshape(2, 2, 1, 2), shd.MESH_AXES)
    with jax.set_mesh(mesh), nn.logical_axis_rules(shd.DEFAULT_RULES):
        got = jax.jit(f)(x, dt, A, B, C, D, h0)
    want = jax.jit(f)(x, dt, A, B, C, D, h0)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=2e-5)
