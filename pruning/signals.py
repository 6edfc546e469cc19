"""SIGTERM and SIGINT as a stop request for the training process (instead of dying without a checkpoint)."""

from __future__ import annotations

import signal
import threading


class StopSignals:
    """While active, SIGTERM and SIGINT (Ctrl-C) ask the run to stop instead of killing the process: the
    loop checkpoints at the next step boundary and the run ends as stopped. A second signal interrupts
    at once (KeyboardInterrupt). The previous handlers come back on exit. Handlers can only be set in
    the main thread; elsewhere this does nothing (a stop request through the store still works)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None  # the first signal's number
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        self._previous = {}
