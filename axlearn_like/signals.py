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
