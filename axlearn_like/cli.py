"""Command line shared by every recipe: `python -m recipes.<name> [--config FILE | --preset NAME] [--set a.b=v ...]
[--print-config] [--run-dir DIR] [--coordinator HOST:PORT --num-processes N --process-id I]`.

The starting config, before `--set`: `--config FILE` (a saved config.json), else `--preset NAME`, else, when the
run dir already holds a run of this recipe, that run's saved config (so rerunning a run, or one written by
tools.import_safetensors / tools.import_hf, continues it), else the recipe's default.

`python -m recipes.<name>` and `python -m recipes <name>` both run `recipe_main(<name>)`: the recipe module's
`config()` and `PRESETS`, trained by its `run(cfg)` when it defines one (e.g. a run that trains and compares
two models), else by `axlearn_like.trainer.run`."""
from __future__ import annotations

import argparse
import functools
import importlib
import logging
import os
import sys
from collections.abc import Callable, Mapping

from axlearn_like import config as config_lib
from axlearn_like.config import ConfigError


def tool_main(main_fn: Callable[..., int]) -> Callable[..., int]:
    """Decorator for `python -m tools.<name>` entry points: a ValueError (ConfigError included) or
    FileNotFoundError, i.e. an error the user caused (bad path, key, value, shape), becomes one `error: ...`
    line on stderr and exit code 2 instead of a traceback."""

    @functools.wraps(main_fn)
    def wrapped(argv=None) -> int:
        try:
            return main_fn(argv)
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return wrapped


def parse_args(argv, prog: str, presets: Mapping[str, Callable] | None):
    p = argparse.ArgumentParser(prog=prog,
                                description="Train a recipe (resumes from the latest checkpoint in --run-dir).")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (dotted path)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument("--run-dir", default=None, help="where checkpoints, metrics and logs go (default runs/<name>)")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="start from a saved config (a run's config.json) instead of the recipe's; --set applies on top")
    if presets:
        p.add_argument("--preset", choices=sorted(presets), default=None, help="a named preset of this recipe")
    p.add_argument("--coordinator", default=None, help="multi-process: HOST:PORT of process 0")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    return p.parse_args(argv)


def build_config(config_fn: Callable, argv=None, presets=None, prog: str = "recipe"):
    """-> (config, parsed args); the starting config is chosen as the module doc says."""
    from axlearn_like import rundir
    from axlearn_like.checkpoint import config_changes

    args = parse_args(sys.argv[1:] if argv is None else argv, prog, presets)
    preset = getattr(args, "preset", None)
    overrides = list(args.set)
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    if args.config:
        if preset:
            raise ConfigError("--config and --preset both choose the starting config; pass one of them")
        return config_lib.apply_overrides(rundir.read_config_file(args.config), overrides), args
    cfg = config_lib.apply_overrides(presets[preset]() if preset else config_fn(), overrides)
    run_dir = cfg.resolved_run_dir() if hasattr(cfg, "resolved_run_dir") else None
    saved_path = rundir.saved_config_path(run_dir) if run_dir and not preset else None
    if saved_path is None:
        return cfg, args
    try:
        saved = rundir.read_config_file(saved_path)
    except ConfigError as e:
        copy = rundir.latest_checkpoint_config(run_dir)
        raise ConfigError(f"{e}{f'; its latest checkpoint keeps a copy: --config {copy}' if copy else ''}") from None
    names = {getattr(config_fn(), "name", None)} | {getattr(fn(), "name", None) for fn in (presets or {}).values()}
    if getattr(saved, "name", None) not in names:
        raise ConfigError(f"run dir {run_dir} holds a {getattr(saved, 'name', '?')!r} run ({saved_path}), not one of "
                          f"{prog} ({', '.join(sorted(map(str, names)))}); pass --config {saved_path} to continue it, "
                          f"or another --run-dir")
    resumed = config_lib.apply_overrides(saved, overrides)
    changes = config_changes(config_lib.to_dict(resumed), config_lib.to_dict(cfg), limit=4)
    if changes:
        print(f"note: {run_dir} continues with its saved config ({saved_path}); this recipe's defaults differ "
              f"(saved -> recipe) in {', '.join(changes)}; change them with --set KEY=VALUE, or start from "
              "--config FILE", file=sys.stderr)
    return resumed, args


def main(config_fn: Callable, argv=None, presets: Mapping[str, Callable] | None = None, prog: str | None = None,
         run_fn=None) -> int:
    """Parses the command line, applies overrides, then trains (or prints the config). Returns an exit code."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    prog = prog or os.path.basename(sys.argv[0])
    try:
        cfg, args = build_config(config_fn, argv, presets, prog)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(config_lib.to_json(cfg))
        return 0
    from axlearn_like import launch, rundir, trainer

    try:
        launch.initialize(args.coordinator, args.num_processes, args.process_id)
    except ValueError as e:  # bad --coordinator/--num-processes/--process-id
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        (run_fn or trainer.run)(cfg)
    except (ConfigError, rundir.RunDirError, trainer.UserError, FileNotFoundError, PermissionError,
            FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the latest completed checkpoint is kept", file=sys.stderr)
        return 130
    return 0


def recipe_main(name: str, argv=None) -> int:
    """Runs recipe module `recipes.<name>` from the command line (argv: the arguments after the name).

    The module is imported by its package name, so even under `python -m recipes.<name>` (where the file
    also runs as `__main__`) its config classes are saved as `recipes.<name>:Class` and reload anywhere.
    """
    mod = importlib.import_module(f"recipes.{name}")
    return main(mod.config, argv, presets=getattr(mod, "PRESETS", None), prog=f"python -m recipes.{name}",
                run_fn=getattr(mod, "run", None))
