"""`python -m recipes NAME [args...]`: runs recipe NAME, or lists the recipes when NAME is unknown."""
from __future__ import annotations

import pkgutil
import sys

import recipes


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(recipes.__path__) if not m.name.startswith("_"))


def main(argv: list[str]) -> int:
    names = available()
    if not argv or argv[0] not in names:
        what = f"unknown recipe {argv[0]!r}" if argv else "no recipe given"
        print(f"error: {what}; available recipes: {', '.join(names)} (run: python -m recipes.<name>)", file=sys.stderr)
        return 2
    from axlearn_like.cli import recipe_main

    return recipe_main(argv[0], argv[1:])  # exactly what `python -m recipes.NAME` runs


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
