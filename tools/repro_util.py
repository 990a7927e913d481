"""Shared pieces of the issue-20 reproduction drivers (`tools.repro_lengthgen`, `tools.repro_moe`).

- `latest_step(run_dir)`: the newest committed checkpoint step (None if none), read from the directory names.
- `ensure_tokenizer(path, cfg)`: trains the corpus BPE (`tools.train_tokenizer`) at `path` if it is missing,
  with `cfg.model.vocab_size` tokens on `cfg.data.paths`.
- `run_recipe(recipe, argv, max_minutes)`: `python -m recipes.<recipe> argv` in this process, with an optional
  wall-clock budget: when it runs out the trainer gets SIGTERM (repeated every 5 s until it returns, so one
  that arrives before the loop is not lost), saves at the end of the current step and returns; rerunning the
  same command continues from there.
- `Deadline(max_minutes)`: the budget of one call, shared by its stages.
- `run_stage(rec, label, recipe, argv, run_dir, target, deadline)`: one resumable training stage (skipped when
  done, not started when the budget is spent, else `run_recipe` in what is left of it, paused if cut short).
- `StageLog(root)`: one JSON line per stage call in <root>/stages.jsonl (what ran, where, how long, steps).
- `remembered_sets(root, sets)` / `remember_sets(root, recipe, sets)`: the `--set` overrides a root was started
  with (<root>/repro.json, written once), so later calls repeat them and a different set is refused.
- `print_status(root, runs)`: each run's checkpoint step of its target, then the stage log.
- `write_summary(out, data, md)`: <out>/summary.json and summary.md, the markdown also printed.
- `train_runs(root, recipe, runs, argv_of, sets, ...)`: the drivers' `train`: every run's config built first (a
  bad --set fails before anything is written), the --set remembered, the tokenizer, then each run as a stage.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time

from axlearn_like.checkpoint import checkpoint_dir


def latest_step(run_dir: str) -> int | None:
    d = checkpoint_dir(run_dir)
    if not os.path.isdir(d):
        return None
    steps = [int(n) for n in os.listdir(d) if n.isdigit() and os.path.isdir(os.path.join(d, n))]
    return max(steps) if steps else None


def ensure_tokenizer(path: str, cfg, *, max_bytes: int = 100_000_000, stream=None) -> None:
    """Trains the BPE at `path` unless it exists (a text corpus and a tokenizer path in cfg.data)."""
    if os.path.isfile(path):
        from axlearn_like.data import make_tokenizer

        v = make_tokenizer(path).vocab_size
        if v != cfg.model.vocab_size:
            print(f"note: {path} has {v} ids, model.vocab_size is {cfg.model.vocab_size}", file=stream)
        return
    if cfg.data.source != "text":
        raise ValueError(f"{path} does not exist and data.source={cfg.data.source!r} is not a text corpus to "
                         f"train it on; create it with python -m tools.train_tokenizer --out {path}")
    from tools import train_tokenizer

    print(f"training the corpus tokenizer: {path} ({cfg.model.vocab_size} ids on {list(cfg.data.paths)})",
          file=stream, flush=True)
    train_tokenizer.train(list(cfg.data.paths), path, vocab_size=cfg.model.vocab_size,
                          max_bytes=min(max_bytes, cfg.data.max_bytes), stream=stream)


@contextlib.contextmanager
def time_budget(max_minutes: float | None):
    """SIGTERM to this process after `max_minutes` (then every 5 s until the block ends); yields a dict whose
    "expired" says whether the budget ran out. A SIGTERM outside the trainer's loop only marks it."""
    state = {"expired": False}
    if not max_minutes or threading.current_thread() is not threading.main_thread():
        yield state
        return
    done = threading.Event()
    prev = signal.signal(signal.SIGTERM, lambda *_: state.__setitem__("expired", True))

    def fire():
        if done.wait(max_minutes * 60.0):
            return
        while True:
            state["expired"] = True
            os.kill(os.getpid(), signal.SIGTERM)
            if done.wait(5.0):
                return

    t = threading.Thread(target=fire, name="repro-time-budget", daemon=True)
    t.start()
    try:
        yield state
    finally:
        done.set()
        t.join(timeout=10)
        signal.signal(signal.SIGTERM, prev)


class Deadline:
    """The wall-clock budget of one driver call (`--max-minutes`; None: unlimited), counted from construction,
    so it covers tokenizer training, corpus loading and compiles as well as the training steps."""

    def __init__(self, max_minutes: float | None):
        self.end = None if not max_minutes else time.time() + 60.0 * max_minutes

    def left(self) -> float | None:
        """Minutes left (None: unlimited)."""
        return None if self.end is None else (self.end - time.time()) / 60.0

    def spent(self) -> bool:
        return self.end is not None and time.time() >= self.end - 1.0


def run_recipe(recipe: str, argv: list[str], *, max_minutes: float | None = None) -> tuple[int, bool]:
    """-> (exit code of `python -m recipes.<recipe> argv`, whether the time budget ran out)."""
    from axlearn_like.cli import recipe_main

    with time_budget(max_minutes) as budget:
        code = recipe_main(recipe, argv)
    return code, budget["expired"]


def run_stage(rec: dict, label: str, recipe: str, argv: list[str], run_dir: str, target: int, deadline: Deadline,
              *, announce: str | None = None, not_started: str | None = None,
              rerun: str = "rerun the same command to continue", stream=None) -> int | None:
    """One training stage inside a `StageLog.stage` block (whose record is `rec`): skipped ("skipped (done)") when
    run_dir's latest checkpoint is at `target` already; not started when `deadline` is spent (message
    `not_started`, default "<label>: not started, ..."); else prints `announce` (if any) and runs
    `run_recipe(recipe, argv)` within what is left of the deadline, with rec["to_step"] the step it reached and
    rec["status"] "paused ..." if that is short of `target`.
    -> None when the run is at `target` (go on to the next stage), else the exit code for the driver to return now:
    0 when not started or paused (rerunning the same command continues), the recipe's own when it failed."""
    if (latest_step(run_dir) or 0) >= target:
        print(f"{label}: already at step {latest_step(run_dir)} of {target}", file=stream)
        rec["status"] = "skipped (done)"
        return None
    if deadline.spent():
        rec["status"] = "not started (time budget)"
        print(not_started or f"{label}: not started, the time budget is spent; rerun to continue", file=stream)
        return 0
    if announce:
        print(announce, file=stream, flush=True)
    code, expired = run_recipe(recipe, argv, max_minutes=deadline.left())
    rec["to_step"] = latest_step(run_dir)
    if code:
        return code
    if (rec["to_step"] or 0) < target:
        rec["status"] = "paused (time budget)" if expired else "paused"
        print(f"{label}: stopped at step {rec['to_step']} of {target}; {rerun}", file=stream)
        return 0
    return None


def device_description() -> str:
    import jax

    devs = jax.devices()
    return f"{len(devs)} x {devs[0].device_kind} ({jax.default_backend()})"


class StageLog:
    """Appends one record per stage call to <root>/stages.jsonl; `with log.stage(name, **info) as rec:` fills
    started/ended/wall_s/status (rec may be updated inside the block)."""

    def __init__(self, root: str):
        self.path = os.path.join(root, "stages.jsonl")
        os.makedirs(root, exist_ok=True)

    @contextlib.contextmanager
    def stage(self, name: str, **info):
        rec = {"stage": name, **info, "argv": sys.argv[1:], "host": socket.gethostname(),
               "device": device_description(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        t0 = time.time()
        rec["status"] = "error"
        try:
            yield rec
            if rec["status"] == "error":
                rec["status"] = "done"
        finally:
            rec["ended"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            rec["wall_s"] = round(time.time() - t0, 1)
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def records(self) -> list[dict]:
        if not os.path.isfile(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]


def sets_argv(sets) -> list[str]:
    out: list[str] = []
    for s in sets:
        out += ["--set", s]
    return out


def remembered_sets(root: str, sets: list[str]) -> list[str]:
    """The `--set` overrides for a call on `root`: those in <root>/repro.json if it exists (a call passing other,
    non-empty ones is refused: one line naming the fix), else `sets`."""
    path = os.path.join(root, "repro.json")
    if not os.path.isfile(path):
        return list(sets)
    with open(path) as f:
        stored = json.load(f)["sets"]
    if sets and list(sets) != stored:
        raise ValueError(f"{root} was started with --set {stored}; rerun with no --set (they are remembered) "
                         f"or the same ones, or use another root")
    return stored


def remember_sets(root: str, recipe: str, sets: list[str]) -> None:
    """Writes <root>/repro.json (the recipe and `sets`) unless it exists: it is never replaced."""
    path = os.path.join(root, "repro.json")
    if not os.path.isfile(path):
        os.makedirs(root, exist_ok=True)
        with open(path, "w") as f:
            json.dump({"recipe": recipe, "sets": list(sets)}, f, indent=1)


def print_status(root: str, runs, stream=None) -> int:
    """One line per run (<root>/<run>: latest checkpoint step of its configured steps, or "not started"), then one
    line per stages.jsonl record. -> 0."""
    from axlearn_like import rundir
    from tools.compare_runs import read_metrics

    w = max((len(r) for r in runs), default=8) + 2
    for r in runs:
        d = os.path.join(root, r)
        cfg_path = os.path.join(d, "config.json")
        if os.path.isfile(cfg_path):
            step = latest_step(d)
            if step is None and os.path.isfile(os.path.join(d, "metrics.jsonl")):
                step = f"- (no checkpoint here; metrics to step {max(read_metrics(d), default=0)})"
            print(f"{r:<{w}} step {step} of {rundir.read_config_file(cfg_path).trainer.steps}", file=stream)
        else:
            print(f"{r:<{w}} not started", file=stream)
    for rec in StageLog(root).records():
        print(f"  {rec['started']} {rec.get('run', ''):<{w}} {rec['status']:<26} {rec['wall_s']:>8.1f}s steps "
              f"{rec.get('from_step')} -> {rec.get('to_step', rec.get('target_step'))}  [{rec['device']}]",
              file=stream)
    return 0


def add_stage_args(parser, *, tokenizer_bytes: int | None = None) -> None:
    """The arguments every repro tool's training stage takes: --set (remembered per root), --max-minutes and,
    where the stage may train the corpus tokenizer, --tokenizer-bytes (default `tokenizer_bytes`)."""
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="wall-clock budget of this call, tokenizer and compiles included; training stops cleanly "
                             "at it (checkpoint, exit 0) and a rerun continues")
    if tokenizer_bytes is not None:
        parser.add_argument("--tokenizer-bytes", type=int, default=tokenizer_bytes, help="BPE training sample size")


def write_summary(out: str, data: dict, md: str, stream=None) -> None:
    """<out>/summary.json (`data`) and <out>/summary.md (`md`); prints the markdown and where it went."""
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(data, f, indent=1)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(md)
    print(md, file=stream)
    print(f"wrote {out}/", file=stream)


def train_runs(root: str, recipe: str, runs: list[str], argv_of, sets: list[str], *, max_minutes: float | None = None,
               tokenizer_bytes: int = 100_000_000, check=None, stream=None) -> int:
    """Trains `runs` (names; run r in <root>/r, `python -m recipes.<recipe> argv_of(r, sets)`) in order within
    one `--max-minutes` budget, after remembering `sets` (`remembered_sets`) and training <root>/tokenizer.json
    if missing (with the first run's data config). `check(cfgs)`, if given, sees every run's config first (to
    print notes). -> 0, or the exit code of a run that failed; a run cut by the budget saves and the call stops
    (rerunning it continues)."""
    import importlib

    from axlearn_like.cli import build_config

    deadline = Deadline(max_minutes)
    sets = remembered_sets(root, sets)
    module = importlib.import_module(f"recipes.{recipe}")
    cfgs = {r: build_config(module.config, argv_of(r, sets), module.PRESETS, prog=f"python -m recipes.{recipe}")[0]
            for r in runs}  # a bad --set fails here, before anything is written
    if check is not None:
        check(cfgs)
    os.makedirs(root, exist_ok=True)
    remember_sets(root, recipe, sets)
    ensure_tokenizer(os.path.join(root, "tokenizer.json"), cfgs[runs[0]], max_bytes=tokenizer_bytes, stream=stream)
    log = StageLog(root)
    for r in runs:
        d = os.path.join(root, r)
        target = cfgs[r].trainer.steps
        with log.stage("train", run=r, from_step=latest_step(d), target_step=target) as rec:
            code = run_stage(rec, r, recipe, argv_of(r, sets), d, target, deadline, stream=stream)
        if code is not None:
            return code
    return 0
