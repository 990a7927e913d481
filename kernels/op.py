"""The kernel Op pattern: one small base that every op in kernels/ uses for argument checks and picking.

An op's api module defines one `Op` subclass and a module-level instance `OP`, and exports
`IMPLEMENTATIONS = OP.IMPLEMENTATIONS` (the tuple of implementation names, the table layer configs validate
their `implementation` field against). The subclass declares

  name             the public function's name, for messages
  implementations  {implementation name: platforms it runs on}; `reference` ("xla", the portable jnp/XLA
                   path and the tests' second oracle) must run everywhere
  preference       {platform: names best-first} for implementation=None; the reference is implied last
and may override three hooks:
  validate(*args, **kwargs)       one-line ValueError naming the argument, before anything is traced
  facts(*args, **kwargs) -> dict  the properties of a call that decide support (dtype, head sizes, ...)
  unsupported(name, **facts)      why `name` cannot take a call with these facts (or needs a missing package),
                                  phrased to follow "implementation='name' ..."; None when it can

One rule picks, for every op (AXLearn's ordered backend list with reference fallback):
  implementation=None: the first name of preference[platform] that supports the call. When only the reference
    is left on a platform that has faster implementations, it is used with a one-time KernelFallbackWarning
    naming why each faster one was skipped (never an error: auto must always run).
  an explicit name: used if it runs on this platform and supports the call; otherwise a one-line ValueError
    with the reason (never a silent substitute). An unknown name lists the table.
The platform is `common.backend()` (the host's, or `common.target_backend`'s when tracing for another).
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, ClassVar

from kernels import common

PLATFORMS = ("cpu", "gpu", "tpu")


class KernelFallbackWarning(UserWarning):
    """implementation=None fell back to the reference on a platform that has faster kernels."""


_WARNED: set[str] = set()


def requires_jax_triton() -> str | None:
    """unsupported() helper for jax-triton kernels: the reason when jax-triton cannot be imported, else None."""
    if common.has_jax_triton():
        return None
    return "needs jax-triton (pip install jax-triton==0.3.1)"


class Op:
    """Base of the kernel ops (module doc). Subclasses set the class attributes and override the hooks."""

    name: ClassVar[str]
    implementations: ClassVar[Mapping[str, tuple[str, ...]]]
    preference: ClassVar[Mapping[str, tuple[str, ...]]] = {}
    reference: ClassVar[str] = "xla"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        impls = cls.implementations
        if set(impls.get(cls.reference, ())) != set(PLATFORMS):
            raise TypeError(f"{cls.__qualname__}: reference {cls.reference!r} must run on every platform {PLATFORMS}")
        for platform, names in cls.preference.items():
            bad = [n for n in names if n not in impls or platform not in impls[n]]
            if platform not in PLATFORMS or bad:
                raise TypeError(
                    f"{cls.__qualname__}: preference[{platform!r}] lists {bad or names} that do not run there")

    @property
    def IMPLEMENTATIONS(self) -> tuple[str, ...]:  # noqa: N802 - the exported table's name
        return tuple(self.implementations)

    # --- hooks -------------------------------------------------------------------------------------------------
    def validate(self, *args: Any, **kwargs: Any) -> None:
        """Checks the public call's arguments; raises a one-line ValueError naming the argument."""

    def facts(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The public call's arguments -> the keyword facts `unsupported` reads."""
        return {}

    def unsupported(self, implementation: str, **facts: Any) -> str | None:
        """Why `implementation` cannot take a call with these facts on a platform it runs on, or None."""
        return None

    # --- the rule ----------------------------------------------------------------------------------------------
    def order(self, platform: str) -> tuple[str, ...]:
        """Implementations tried by implementation=None on `platform`, best first, the reference last."""
        names = tuple(n for n in self.preference.get(platform, ()) if n != self.reference)
        return (*names, self.reference)

    def why_not(self, implementation: str, platform: str, **facts: Any) -> str | None:
        """Why `implementation` cannot run a call with these facts on `platform` (one phrase), or None."""
        self._known(implementation)
        runs_on = self.implementations[implementation]
        why = self.unsupported(implementation, **facts)
        if platform not in runs_on:
            where = f"does not run on backend {platform!r} (it needs one of {list(runs_on)})"
            return where if why is None else f"{where} and {why}"
        return why

    def supported_on(self, implementation: str, platform: str, **facts: Any) -> bool:
        """Whether `implementation` runs a call with these facts on `platform` ('cpu', 'gpu' or 'tpu')."""
        return self.why_not(implementation, platform, **facts) is None

    def pick(self, implementation: str | None, **facts: Any) -> str:
        """The implementation a call with these facts uses on the current platform (the module doc's rule)."""
        platform = common.backend()
        if implementation is not None:
            why = self.why_not(implementation, platform, **facts)
            if why is not None:
                raise ValueError(f"{self.name}: implementation={implementation!r} {why} "
                                 "(use implementation=None to pick automatically)")
            return implementation
        skipped = []
        for name in self.order(platform):
            why = self.why_not(name, platform, **facts)
            if why is None:
                if name == self.reference and skipped:
                    self._warn_once(platform, skipped)
                return name
            skipped.append(f"{name!r} {why}")
        raise AssertionError(f"{self.name}: the reference {self.reference!r} refused a call: {skipped[-1]}")

    def select(self, implementation: str | None, *args: Any, **kwargs: Any) -> str:
        """validate(*args, **kwargs), then pick(implementation, **facts(*args, **kwargs)): what api functions call."""
        self.validate(*args, **kwargs)
        return self.pick(implementation, **self.facts(*args, **kwargs))

    def _known(self, implementation: Any) -> None:
        if implementation not in self.implementations:
            raise ValueError(f"{self.name}: unknown implementation={implementation!r}; choose one of "
                             f"{list(self.IMPLEMENTATIONS)} or None (auto)")

    def _warn_once(self, platform: str, skipped: list[str]) -> None:
        msg = (f"{self.name}: implementation=None runs the reference {self.reference!r} on {platform}: "
               + "; ".join(skipped))
        if msg not in _WARNED:
            _WARNED.add(msg)
            warnings.warn(msg, KernelFallbackWarning, stacklevel=4)
