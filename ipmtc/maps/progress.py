"""The progress bar of a map: tqdm in terminals, its widget in notebooks, nothing when off."""
from __future__ import annotations

import sys
import time
from typing import Any

REFRESH_S = 0.3  # the counts beside the bar; the bar itself moves with every finished task


def _tqdm() -> Any:
    try:
        from ipykernel.zmqshell import ZMQInteractiveShell
        from IPython import get_ipython

        in_notebook = isinstance(get_ipython(), ZMQInteractiveShell)
    except Exception:
        in_notebook = False
    if in_notebook:
        try:
            import ipywidgets  # noqa: F401
            from tqdm.notebook import tqdm

            return tqdm
        except ImportError:
            pass
    from tqdm import tqdm

    return tqdm


class Progress:
    """Done tasks on the bar; failed / retried / engines alive beside it."""

    def __init__(self, enabled: bool, total: int | None, desc: str):
        self.enabled, self.total, self.desc = enabled, total, desc
        self.bar = None
        self._last = 0.0

    def open(self) -> None:
        if self.enabled:
            self.bar = _tqdm()(total=self.total, desc=self.desc, unit="task", file=sys.stderr,
                               dynamic_ncols=True)

    def tick(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def refresh(self, force: bool = False, **counts: int) -> None:
        if self.bar is None or (not force and time.monotonic() - self._last < REFRESH_S):
            return
        self._last = time.monotonic()
        self.bar.set_postfix(refresh=False, **counts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
