"""Guards of a run directory: one writer at a time, its saved config, and nothing deleted.

- `RunDirLock(run_dir)`: an exclusive lock (RUN_DIR/run.lock) taken by process 0 of a job for the whole run,
  so a second job on the same run dir fails at start instead of replacing the first one's checkpoints and
  interleaving its metrics. The lock file names its holder (pid, host, start time, command); the holder keeps
  an `flock` on it (the kernel drops it however the process dies) and refreshes its mtime every
  `HEARTBEAT_S` seconds. A lock left by a dead process is taken over with a note when that is provable: same
  host and the pid is gone (or is another process now), or another host and no heartbeat for `STALE_S`
  seconds. Otherwise the error names the holder and how to clear the lock.
- `saved_config(run_dir)` / `read_config_file(path)`: the config an existing run was trained with, read with
  one-line errors that name the file (corrupt JSON, an unknown `_type`, an unknown key).
- `move_aside(path)`: renames a damaged checkpoint to `<path>.corrupt-<UTC time>`; nothing here deletes data.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import threading
import time
from typing import Any

from axlearn_like import config as config_lib
from axlearn_like.config import ConfigError

LOCK_NAME = "run.lock"
CONFIG_NAME = "config.json"
HEARTBEAT_S = 15.0
STALE_S = 120.0  # another host's lock without a heartbeat for this long belongs to a dead job


class RunDirError(ValueError):
    """The run directory cannot be used as asked (locked by another job, ...); str(e) is one line with the fix."""


# ---------------------------------------------------------------------------------------------------------
# Config files
# ---------------------------------------------------------------------------------------------------------

def _check_types(d: Any, path: str) -> None:
    """Resolves every `_type` tag first, so a config written by other code fails with one line naming it."""
    if isinstance(d, dict):
        name = d.get("_type")
        if name is not None:
            try:
                config_lib._resolve_type(name)
            except (ImportError, AttributeError, ValueError) as e:
                raise ConfigError(
                    f"{path}: unknown config class _type {name!r} ({type(e).__name__}: {e}); "
                    "the config was written by other code, or the module is not importable here") from None
        for v in d.values():
            _check_types(v, path)
    elif isinstance(d, list):
        for v in d:
            _check_types(v, path)


def config_from_json_text(text: str, path: str) -> Any:
    """A saved config (JSON text read from `path`) -> config object; every failure is one ConfigError line."""
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); "
                          f"restore the file or pass another --config") from None
    if not (isinstance(d, dict) and "_type" in d):
        raise ConfigError(f"{path} is not a saved axlearn_like config (no top-level _type); "
                          f"use a config.json written by a run or by --print-config")
    _check_types(d, path)
    try:
        return config_lib.from_dict(d)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except (TypeError, ValueError) as e:  # a class rejected its saved fields
        raise ConfigError(f"{path}: cannot rebuild the config ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def read_config_file(path: str) -> Any:
    """Reads a config JSON file (a run's config.json, `--print-config` output, an export's config.json)."""
    if os.path.isdir(path) and os.path.exists(os.path.join(path, CONFIG_NAME)):
        path = os.path.join(path, CONFIG_NAME)
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {path} does not exist; pass a run dir's config.json") from None
    except (IsADirectoryError, UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"{path} cannot be read as a config file ({type(e).__name__}); pass a config.json") from None
    return config_from_json_text(text, path)


def saved_config_path(run_dir: str) -> str | None:
    """RUN_DIR/config.json when the run dir holds a run (the config of its latest start), else None."""
    path = os.path.join(run_dir, CONFIG_NAME)
    return path if os.path.isfile(path) else None


def latest_checkpoint_config(run_dir: str) -> str | None:
    """The config file saved inside the newest checkpoint step of the run dir (a run's second copy of its
    config.json), or None."""
    root = os.path.join(run_dir, "checkpoints")
    steps = sorted((int(n) for n in os.listdir(root) if n.isdigit()), reverse=True) if os.path.isdir(root) else []
    paths = [os.path.join(root, str(s), "config", "metadata") for s in steps]
    return next((p for p in paths if os.path.isfile(p)), None)


def write_atomic(path: str, text: str) -> None:
    """Replaces `path` with `text` atomically (written to a temporary file, fsynced, renamed): a crash leaves
    either the old file or the new one, never half of one."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_config(run_dir: str, text: str) -> None:
    """Writes RUN_DIR/config.json atomically (a crash never leaves a half-written config)."""
    write_atomic(os.path.join(run_dir, CONFIG_NAME), text)


def move_aside(path: str, tag: str = "corrupt") -> str:
    """Renames `path` to `<path>.<tag>-<UTC time>` (a free name; never replaces anything) and returns it."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest, n = f"{path}.{tag}-{stamp}", 1
    while os.path.exists(dest):
        n += 1
        dest = f"{path}.{tag}-{stamp}-{n}"
    os.rename(path, dest)
    return dest


def is_empty_run_dir(run_dir: str) -> bool:
    return not os.path.isdir(run_dir) or not [n for n in os.listdir(run_dir) if n != LOCK_NAME]


# ---------------------------------------------------------------------------------------------------------
# The lock
# ---------------------------------------------------------------------------------------------------------

def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (field 22 of /proc/PID/stat), to tell a reused pid apart; None if unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(info: dict) -> str:
    started = info.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')} (since {when}: {info.get('command', '?')})"


class RunDirLock:
    """Exclusive lock on a run directory (see the module doc). Use as a context manager or acquire()/release().

    `enabled=False` (processes other than 0 of a job) makes both calls no-ops: one job holds one lock.
    """

    def __init__(self, run_dir: str, *, enabled: bool = True, what: str = "training"):
        self.run_dir = os.path.abspath(run_dir)
        self.path = os.path.join(self.run_dir, LOCK_NAME)
        self.enabled = enabled
        self.what = what
        self.note: str | None = None  # set when a dead holder's lock was taken over
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "RunDirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _read(self, fd: int) -> dict:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 65536)
        try:
            info = json.loads(raw.decode() or "{}")
        except (json.JSONDecodeError, UnicodeDecodeError):
            info = {}
        return info if isinstance(info, dict) else {}

    def _busy(self, info: dict, detail: str) -> RunDirError:
        return RunDirError(
            f"run dir {self.run_dir} is in use by {_describe(info)}{detail}; wait for that job to finish or stop it, "
            f"or pass another --run-dir (lock file {self.path})")

    def acquire(self) -> None:
        if not self.enabled or self._fd is not None:
            return
        os.makedirs(self.run_dir, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                info = self._read(fd)
                os.close(fd)
                raise self._busy(info, "") from None
            try:  # the holder may have released (unlinked) the file between our open and flock: retry
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        try:
            self._take_over_check(fd)
        except BaseException:
            os.close(fd)
            raise
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
              "proc_start": _process_start(os.getpid()), "command": " ".join(sys.argv)[:300], "what": self.what}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(me) + "\n").encode())
        os.fsync(fd)
        self._fd = fd
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, name="axl-rundir-lock", daemon=True)
        self._thread.start()

    def _take_over_check(self, fd: int) -> None:
        """We hold the flock; decide whether a holder recorded in the file could still be running."""
        info = self._read(fd)
        if not info:
            return  # a fresh file, or one left by a clean release
        pid, host = info.get("pid"), info.get("host")
        if host == socket.gethostname():
            reused = not isinstance(pid, int) or pid == os.getpid() or not _pid_alive(pid) or (
                info.get("proc_start") is not None and _process_start(pid) != info.get("proc_start"))
            if not reused:  # alive with the same start time: a filesystem without flock; trust the pid
                raise self._busy(info, " (its lock is not flock-held, but the process runs)")
            self.note = f"note: took over the run dir lock of {_describe(info)}, which is no longer running"
            return
        age = time.time() - os.fstat(fd).st_mtime
        if age < STALE_S:
            raise RunDirError(
                f"run dir {self.run_dir} is locked by {_describe(info)}, last heartbeat {age:.0f}s ago; if that job "
                f"still runs, wait for it or pass another --run-dir; if it is gone, the lock goes stale after "
                f"{STALE_S:.0f}s without a heartbeat (or delete {self.path}) and a rerun takes it over")
        self.note = (f"note: took over the run dir lock of {_describe(info)}: no heartbeat for {age:.0f}s "
                     f"(> {STALE_S:.0f}s), so that job is gone")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        if self._fd is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            os.unlink(self.path)  # our own lock file: the run dir is left as we found it
        except FileNotFoundError:
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None


def lock_all_processes(run_dir: str, *, what: str = "training") -> RunDirLock:
    """Process 0 takes the lock; every process of the job learns the outcome, so all fail with the same line.

    Returns the (held, on process 0) lock; raises RunDirError on every process when it is taken.
    """
    import jax

    lock = RunDirLock(run_dir, enabled=jax.process_index() == 0, what=what)
    error = ""
    try:
        lock.acquire()
    except RunDirError as e:
        error = str(e)
    if jax.process_count() > 1:
        import numpy as np
        from jax.experimental import multihost_utils

        buf = np.zeros(1024, np.uint8)
        raw = error.encode()[:1024]
        buf[:len(raw)] = np.frombuffer(raw, np.uint8)
        buf = np.asarray(multihost_utils.broadcast_one_to_all(buf))
        error = bytes(buf).rstrip(b"\0").decode(errors="replace")
    if error:
        lock.release()
        raise RunDirError(error)
    if lock.note:
        print(lock.note, flush=True)
    return lock
