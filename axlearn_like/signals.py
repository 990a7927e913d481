"""SIGTERM handling for the training loop: the handler only sets a flag; the loop saves and exits at the
end of the current step (preemption: the scheduler's SIGTERM comes before its SIGKILL)."""
from __future__ import annotations

import signal
import threading


class SigtermFlag:
    """Context manager: `.set` becomes True once SIGTERM arrives. Outside the main thread (where Python cannot
    install handlers) it never fires; the previous handler is restored on exit."""

    def __init__(self):
        self.set = False
        self._prev = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._prev = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        del signum, frame
        self.set = True

    def __exit__(self, *exc):
        if self._prev is not None:
            signal.signal(signal.SIGTERM, self._prev)
            self._prev = None


class DeferSigint:
    """Context manager: a Ctrl-C (SIGINT) inside the block is held back and raised as KeyboardInterrupt when the
    block ends, so a checkpoint save is never cut off in its synchronous part (which would leave only a
    temporary directory). Outside the main thread it does nothing."""

    def __init__(self):
        self.received = False
        self._prev = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._prev = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        del signum, frame
        self.received = True

    def __exit__(self, *exc):
        if self._prev is not None:
            signal.signal(signal.SIGINT, self._prev)
            self._prev = None
        if self.received and exc[0] is None:
            raise KeyboardInterrupt
