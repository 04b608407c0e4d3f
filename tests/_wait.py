"""Waiting in tests: on a condition, with a deadline, never for a fixed time.

A fixed ``time.sleep`` that assumes "by now X has happened" fails on a busy
machine; :func:`wait_for` polls what the test needs (a journal record, a file,
an engine count, a process state) and fails with what it was waiting for.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout_s: float, what: str | Callable[[], str], *,
             interval_s: float = 0.05) -> T:
    """Call ``predicate`` until it returns something true (returned); AssertionError after ``timeout_s``.

    ``what`` names the awaited condition for the failure message (a callable is
    called then, e.g. to show the state last seen). ``predicate`` is always
    called once more after the deadline, so a slow poll cannot miss a condition
    that came true while it slept.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        last_try = time.monotonic() >= deadline
        value = predicate()
        if value:
            return value
        if last_try:
            desc = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {desc}")
        time.sleep(min(interval_s, max(0.0, deadline - time.monotonic())))


def wait_until_gone(exists: Callable[[], Any], timeout_s: float, what: str) -> None:
    """Wait until ``exists()`` returns something false (e.g. an empty list of live processes)."""
    last: list[Any] = []

    def gone() -> bool:
        now = exists()
        last[:] = [now]
        return not now

    wait_for(gone, timeout_s, lambda: f"{what} (still there: {last[0] if last else '?'!r:.300})")


class Background(threading.Thread):
    """``action()`` in a thread (e.g. wait for a state, then kill something while the main thread maps).

    :meth:`check` joins it and raises what it raised, so a failed wait fails the test.
    """

    def __init__(self, action: Callable[[], Any]):
        super().__init__(daemon=True)
        self.action = action
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.action()
        except BaseException as e:  # re-raised by check()
            self.error = e

    def check(self, timeout_s: float = 120) -> None:
        self.join(timeout_s)
        assert not self.is_alive(), f"the background action {self.action!r} did not end within {timeout_s:g} s"
        if self.error is not None:
            raise self.error
