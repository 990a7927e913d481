"""kernels.op.Op, the base of every kernel op: class checks, the picking rule, its one-time fallback warning
and its one-line errors, on a toy op with made-up implementations."""
from __future__ import annotations

import warnings

import pytest

from kernels import common
from kernels.op import PLATFORMS, KernelFallbackWarning, Op


class Toy(Op):
    name = "toy"
    implementations = {"xla": PLATFORMS, "fast": ("gpu",), "faster": ("gpu",), "tiled": ("tpu", "cpu")}
    preference = {"gpu": ("faster", "fast"), "tpu": ("tiled",)}

    def validate(self, n):
        if n < 0:
            raise ValueError(f"{self.name}: n must be >= 0, got {n}")

    def facts(self, n):
        return {"n": n}

    def unsupported(self, implementation, *, n):
        if implementation == "faster" and n % 2:
            return f"needs an even n, got {n}"
        if implementation == "fast" and n > 10:
            return f"needs n <= 10, got {n}"
        return None


TOY = Toy()


def _pick(platform, n, implementation=None):
    with common.target_backend(platform), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = TOY.select(implementation, n)
    return got, [str(w.message) for w in seen if issubclass(w.category, KernelFallbackWarning)]


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr("kernels.op._WARNED", set())


def test_table_and_order():
    assert TOY.IMPLEMENTATIONS == ("xla", "fast", "faster", "tiled")
    assert TOY.order("gpu") == ("faster", "fast", "xla") and TOY.order("cpu") == ("xla",)
    assert TOY.supported_on("fast", "gpu", n=3) and not TOY.supported_on("fast", "cpu", n=3)
    assert not TOY.supported_on("faster", "gpu", n=3) and TOY.supported_on("faster", "gpu", n=4)


def test_auto_takes_the_best_supported():
    assert _pick("gpu", 4) == ("faster", [])
    assert _pick("gpu", 3) == ("fast", [])  # skipping a faster one for a slower kernel: no warning
    assert _pick("tpu", 3) == ("tiled", [])
    assert _pick("cpu", 3) == ("xla", [])  # 'tiled' runs on cpu but is not preferred there


def test_fallback_to_the_reference_warns_once_with_the_reasons():
    got, seen = _pick("gpu", 11)
    assert got == "xla" and len(seen) == 1
    assert "'faster' needs an even n, got 11" in seen[0] and "'fast' needs n <= 10, got 11" in seen[0]
    assert _pick("gpu", 11) == ("xla", [])  # the same reasons again: silent
    assert _pick("gpu", 13)[1]  # other reasons (n=13): said once too


def test_explicit_choices():
    assert _pick("gpu", 3, "xla") == ("xla", [])
    assert _pick("cpu", 3, "tiled") == ("tiled", [])
    cases = [("gpu", 3, "faster", "implementation='faster' needs an even n, got 3"),
             ("cpu", 4, "faster", r"does not run on backend 'cpu' \(it needs one of \['gpu'\]\)"),
             ("cpu", 4, "nope", r"unknown implementation='nope'; choose one of \['xla', 'fast', 'faster', 'tiled'\]")]
    for platform, n, impl, match in cases:
        with pytest.raises(ValueError, match=match) as e:
            _pick(platform, n, impl)
        assert "\n" not in str(e.value) and str(e.value).startswith("toy: ")


def test_validation_comes_first():
    with pytest.raises(ValueError, match="n must be >= 0"):
        _pick("cpu", -1, "faster")


def test_class_checks():
    with pytest.raises(TypeError, match="reference 'xla' must run on every platform"):
        type("NoRef", (Op,), {"name": "x", "implementations": {"xla": ("gpu",)}})
    with pytest.raises(TypeError, match="preference"):
        type("BadPref", (Op,), {"name": "x", "implementations": {"xla": PLATFORMS, "k": ("gpu",)},
                                "preference": {"tpu": ("k",)}})
