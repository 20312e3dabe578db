"""Stopping on SIGINT and SIGTERM, whatever the process inherited.

A process started in the background by a non-interactive shell (`cmd &`, `nohup`, many CI
runners) inherits SIGINT *ignored*, and Python keeps it so; a `ray job` driver inherits SIGINT
*blocked*. Commands that must stop cleanly (the batch driver, the page, the server) install these
handlers themselves: the first signal asks them to stop, a second one exits at once.
"""
from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_code(signum: int) -> int:
    """What shells expect of a process ended by `signum`: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + signum


class Interrupted(BaseException):
    """Raised where a stop signal must unwind at once (while a command is still starting).

    A BaseException, like KeyboardInterrupt, so that no library's `except Exception` swallows it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """Install with `StopSignals().install()`. The first SIGINT/SIGTERM records its number and runs
    the callbacks registered with `on_stop` (or raises Interrupted inside `raising()`); a second
    one ends the process at once with its exit code."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._callbacks: list[Callable[[], None]] = []
        self._raising = False

    def install(self) -> StopSignals:
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        return self

    @property
    def stopped(self) -> bool:
        return self.signum is not None

    def on_stop(self, callback: Callable[[], None]) -> None:
        """Run `callback` (from the signal handler: keep it to setting flags or waking a loop) on the first signal."""
        self._callbacks.append(callback)
        if self.stopped:
            callback()

    @contextmanager
    def raising(self) -> Iterator[None]:
        """Within this block the first signal raises Interrupted where the code is (start-up work that
        has no loop to wake); a signal that came before the block raises on entry."""
        if self.stopped:
            raise Interrupted(self.signum)
        self._raising = True
        try:
            yield
        finally:
            self._raising = False

    def _handle(self, signum: int, _frame: object) -> None:
        if self.stopped:
            os._exit(exit_code(signum))
        self.signum = signum
        for callback in self._callbacks:
            callback()
        if self._raising:
            self._raising = False
            raise Interrupted(signum)
