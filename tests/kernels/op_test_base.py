"""Shared test base of the kernel ops (kernels/op.py): each op's test module has one `OpTestBase` subclass.

For every implementation of the op that runs on this platform (xla and pallas on a CPU; xla, triton and cudnn
under AXL_TEST_GPU=1 on a GPU) the base checks, on fresh random inputs:
  test_forward_and_gradients_match_oracle  every output and every gradient against the op's float64 oracle
                                           (a case an implementation does not support is skipped with the
                                           op's own reason)
and, once per op, the table and the picking rule:
  test_implementation_table, test_explicit_choice_errors_are_one_line, test_auto_pick
A subclass sets OP, CASES, GRAD_NAMES (and tolerances) and defines make / apply / oracle; tests of its own
that take an `impl` argument are parametrised over the same implementations.
"""
from __future__ import annotations

import warnings
from typing import Any, ClassVar, NamedTuple

import jax
import numpy as np
import pytest

from kernels import common
from kernels.op import PLATFORMS, KernelFallbackWarning, Op
from tests.oracle import assert_close


class Call(NamedTuple):
    """One test call of an op: args (the differentiable inputs), the cotangent of the outputs (an array or a
    tuple like the outputs), the dtype that sets the tolerance, and `extra` (non-differentiable inputs and
    static settings, read by the subclass's apply / oracle)."""

    args: tuple
    cotangent: Any
    dtype: Any
    extra: dict


def _parametrized(metafunc, name: str) -> bool:
    return any(name in m.args[0] for m in metafunc.definition.iter_markers("parametrize"))


class OpTestBase:
    OP: ClassVar[Op]
    CASES: ClassVar[dict[str, Any]]
    GRAD_NAMES: ClassVar[tuple[str, ...]]  # one per entry of Call.args
    OUT_NAMES: ClassVar[tuple[str, ...]] = ("out",)
    GRAD_FACTOR: ClassVar[float] = 1.0  # tolerance factor for gradients (assert_close's factor)
    GRAD_FACTORS: ClassVar[dict[str, float]] = {}  # per gradient name, overriding GRAD_FACTOR
    SKIP_PAIRS: ClassVar[frozenset[tuple[str, str]]] = frozenset()  # (impl, case) left to other tests
    # test_auto_pick: case name, and {(platform, jax-triton importable): the name implementation=None picks}
    AUTO_CASE: ClassVar[str | None] = None
    AUTO: ClassVar[dict[tuple[str, bool], str]] = {}

    # --- the subclass's part ----------------------------------------------------------------------------------
    def make(self, case: str, rng: np.random.Generator) -> Call:
        raise NotImplementedError

    def apply(self, impl: str | None, call: Call, *args):
        """The public op on `args` (Call.args or their replacements) with implementation=impl."""
        raise NotImplementedError

    def oracle(self, case: str, call: Call) -> tuple[tuple, tuple]:
        """float64 (outputs, gradients of <outputs, cotangent> w.r.t. Call.args)."""
        raise NotImplementedError

    def facts(self, call: Call) -> dict:
        """The op's support facts of a call (OP.facts of the public call's arguments)."""
        raise NotImplementedError

    def check_outputs(self, impl: str, call: Call, outs: tuple) -> None:
        """Extra assertions on the outputs (shapes, dtypes, structural zeros)."""

    # --- parametrisation ----------------------------------------------------------------------------------------
    @classmethod
    def implementations(cls) -> list[str]:
        platform = common.backend()
        return [n for n in cls.OP.IMPLEMENTATIONS if platform in cls.OP.implementations[n]]

    def pytest_generate_tests(self, metafunc):
        both = {"impl", "case"} <= set(metafunc.fixturenames) and metafunc.function.__name__.startswith(
            "test_forward_and_gradients")
        if both:
            pairs = [(i, c) for i in self.implementations() for c in self.CASES if (i, c) not in self.SKIP_PAIRS]
            metafunc.parametrize("impl,case", pairs, ids=[f"{i}-{c}" for i, c in pairs])
            return
        if "impl" in metafunc.fixturenames and not _parametrized(metafunc, "impl"):
            metafunc.parametrize("impl", self.implementations())
        if "case" in metafunc.fixturenames and not _parametrized(metafunc, "case"):
            metafunc.parametrize("case", list(self.CASES))

    # --- shared tests -------------------------------------------------------------------------------------------
    def test_forward_and_gradients_match_oracle(self, impl, case):
        call = self.make(case, np.random.default_rng())  # fresh inputs on every run
        why = self.OP.why_not(impl, common.backend(), **self.facts(call))
        if why is not None:
            pytest.skip(f"{impl}: {why}")

        @jax.jit
        def run(args, cotangent):
            out, vjp = jax.vjp(lambda *a: self.apply(impl, call, *a), *args)
            return out, vjp(cotangent)

        out, grads = run(call.args, call.cotangent)
        outs = out if isinstance(out, tuple) else (out,)
        ref_outs, ref_grads = self.oracle(case, call)
        assert len(outs) == len(ref_outs) == len(self.OUT_NAMES) and len(grads) == len(self.GRAD_NAMES)
        self.check_outputs(impl, call, outs)
        for name, o, r in zip(self.OUT_NAMES, outs, ref_outs):
            assert_close(o, r, call.dtype, f"{impl} {name}")
        for name, g, r, x in zip(self.GRAD_NAMES, grads, ref_grads, call.args):
            assert g.shape == np.shape(x) and g.dtype == np.asarray(x).dtype, name
            assert_close(g, r, call.dtype, f"{impl} d{name}", factor=self.GRAD_FACTORS.get(name, self.GRAD_FACTOR))

    def test_implementation_table(self):
        op = self.OP
        names = op.IMPLEMENTATIONS
        assert isinstance(names, tuple) and all(isinstance(n, str) for n in names) and len(set(names)) == len(names)
        assert op.reference in names and set(op.implementations[op.reference]) == set(PLATFORMS)
        for n in names:
            assert set(op.implementations[n]) <= set(PLATFORMS), n
        for platform in PLATFORMS:
            order = op.order(platform)
            assert order[-1] == op.reference and all(platform in op.implementations[n] for n in order)
        module = __import__(type(op).__module__.rsplit(".", 1)[0], fromlist=["IMPLEMENTATIONS"])
        assert module.IMPLEMENTATIONS == names and module.OP is op  # the package exports the one table

    def test_explicit_choice_errors_are_one_line(self):
        call = self.make(next(iter(self.CASES)), np.random.default_rng(0))
        with pytest.raises(ValueError, match="unknown implementation") as e:
            self.apply("no_such_kernel", call, *call.args)
        assert "\n" not in str(e.value) and all(repr(n) in str(e.value) for n in self.OP.IMPLEMENTATIONS)
        platform = common.backend()
        for name in self.OP.IMPLEMENTATIONS:
            if platform in self.OP.implementations[name]:
                continue
            with pytest.raises(ValueError, match=f"does not run on backend '{platform}'.*implementation=None") as e:
                self.apply(name, call, *call.args)
            assert "\n" not in str(e.value)

    def test_auto_pick(self, monkeypatch):
        """implementation=None on each platform, with and without jax-triton, picks as AUTO says; falling back
        to the reference where faster implementations exist warns exactly once."""
        if self.AUTO_CASE is None:
            pytest.skip("no AUTO table")
        facts = self.facts(self.make(self.AUTO_CASE, np.random.default_rng(0)))
        for (platform, triton), want in self.AUTO.items():
            monkeypatch.setattr(common, "has_jax_triton", lambda triton=triton: triton)
            monkeypatch.setattr("kernels.op._WARNED", set())
            with common.target_backend(platform), warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                got = [self.OP.pick(None, **facts) for _ in range(2)]
            assert got == [want, want], (platform, triton, got)
            fallback = [w for w in seen if issubclass(w.category, KernelFallbackWarning)]
            expect_warning = want == self.OP.reference and len(self.OP.order(platform)) > 1
            assert len(fallback) == (1 if expect_warning else 0), (platform, triton, [str(w.message) for w in seen])
