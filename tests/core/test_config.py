import dataclasses
import json
import os

import pytest

from axlearn_like import config as config_lib
from axlearn_like.config import ConfigError, config_class

GOLDEN_DIR = os.path.join(os.path.dirname(__file__), "golden")


@config_class
class Inner:
    width: int = 4
    rate: float = 0.5
    name: str = "x"
    flag: bool = False
    maybe: int | None = None
    dims: tuple[int, ...] = (1, 2)

    def validate(self):
        config_lib.require(self.width % 2 == 0, "width", f"must be even, got {self.width}")


@config_class
class Outer:
    inner: Inner = dataclasses.field(default_factory=Inner)
    steps: int = 10
    model: object = None


def test_overrides_are_typed():
    cfg = config_lib.apply_overrides(Outer(), ["inner.width=8", "inner.rate=1e-3", "inner.flag=true",
                                               "inner.maybe=none", "inner.dims=3,4,5", "steps=1_000"])
    assert cfg.inner.width == 8 and cfg.inner.rate == 1e-3 and cfg.inner.flag is True
    assert cfg.inner.maybe is None and cfg.inner.dims == (3, 4, 5) and cfg.steps == 1000
    assert Outer().inner.width == 4  # the original is untouched


@pytest.mark.parametrize("override, fragment", [
    ("inner.widht=3", "unknown config key 'inner.widht'"),
    ("inner.width=abc", "inner.width: expected an integer"),
    ("inner.flag=maybe", "inner.flag: expected true/false"),
    ("nope.width=2", "no section 'nope'"),
    ("inner=3", "config section"),
    ("inner.width=3", "inner.width: must be even"),
    ("steps", "must look like key.path=value"),
])
def test_errors_are_one_line_naming_the_key(override, fragment):
    with pytest.raises(ConfigError) as e:
        config_lib.apply_overrides(Outer(), [override])
    msg = str(e.value)
    assert fragment in msg and "\n" not in msg


def test_json_round_trip_rebuilds_classes():
    cfg = config_lib.apply_overrides(Outer(model=Inner(width=6)), ["inner.dims=7"])
    back = config_lib.from_json(config_lib.to_json(cfg))
    assert back == cfg and isinstance(back.model, Inner)


def _recipe_names():
    import recipes.__main__ as m

    return m.available()


@pytest.mark.parametrize("name", _recipe_names())
def test_golden_config(name):
    """Every recipe's resolved default config is pinned; regenerate with UPDATE_GOLDEN=1 after an intended change."""
    import importlib

    mod = importlib.import_module(f"recipes.{name}")
    got = json.loads(config_lib.to_json(mod.config()))
    path = os.path.join(GOLDEN_DIR, f"{name}.json")
    if os.environ.get("UPDATE_GOLDEN") or not os.path.exists(path):
        os.makedirs(GOLDEN_DIR, exist_ok=True)
        with open(path, "w") as f:
            json.dump(got, f, indent=2, sort_keys=True)
            f.write("\n")
        if not os.environ.get("UPDATE_GOLDEN"):
            pytest.fail(f"golden config for {name} was missing and has been written; review and commit {path}")
    with open(path) as f:
        want = json.load(f)
    assert got == want, f"recipe {name} default config changed; if intended, rerun with UPDATE_GOLDEN=1"
    config_lib.validate_tree(mod.config())
