"""Shared pieces of the issue-20 reproduction drivers (`tools.repro_lengthgen`, `tools.repro_moe`).

- `latest_step(run_dir)`: the newest committed checkpoint step (None if none), read from the directory names.
- `ensure_tokenizer(path, cfg)`: trains the corpus BPE (`tools.train_tokenizer`) at `path` if it is missing,
  with `cfg.model.vocab_size` tokens on `cfg.data.paths`.
- `run_recipe(recipe, argv, max_minutes)`: `python -m recipes.<recipe> argv` in this process, with an optional
  wall-clock budget: when it runs out the trainer gets SIGTERM (repeated every 5 s until it returns, so one
  that arrives before the loop is not lost), saves at the end of the current step and returns; rerunning the
  same command continues from there.
- `Deadline(max_minutes)`: the budget of one call, shared by its stages.
- `StageLog(root)`: one JSON line per stage call in <root>/stages.jsonl (what ran, where, how long, steps).
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
