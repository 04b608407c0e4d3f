"""Which task took its engine down: suspicion, isolation, and crashes charged.

An engine that dies under a chunk (an OOM kill, a segfault in C code, a task
calling ``os.kill(os.getpid(), SIGKILL)``) may have been killed by any task of
the chunk that was running. Engine loss spends no retries, so without a limit
such a task walks through every engine. The rule, as HyperQueue's
``--crash-limit`` and Dask's ``allowed-failures``, with innocent neighbours
protected:

- the tasks of a lost *running* chunk of several tasks become suspects: each is
  run again alone (one task per chunk), charged nothing yet;
- a task running alone on an engine that dies is charged a crash, plus the
  losses of the chunks it shared (now attributed to it);
- at ``crash_limit`` crashes the task fails as ``EngineCrashes`` naming the
  engines and hosts it took down.

A chunk queued behind the running one on the lost engine did not run: its
tasks are plain resubmits. Several engines of one host lost at once are a node
loss (infrastructure): no task is charged.
"""
from __future__ import annotations

Site = tuple[int | None, str | None]  # (engine id, host)


class Crashes:
    """Suspects, tasks to run alone, and where each task's crashes happened."""

    def __init__(self, limit: int):
        self.limit = limit
        self.shared: dict[int, int] = {}  # task -> losses of chunks it shared, not attributed yet
        self.alone: set[int] = set()  # tasks handed out one per chunk
        self.sites: dict[int, list[Site]] = {}  # task -> engines (and hosts) that died under it

    def suspect(self, indices: list[int]) -> None:
        """The running chunk of several tasks was lost with its engine: each of them runs alone next."""
        for i in indices:
            self.shared[i] = self.shared.get(i, 0) + 1
            self.alone.add(i)

    def charge(self, index: int, engine_id: int | None, host: str | None) -> int:
        """The engine died while ``index`` ran alone on it: the crashes to add to its record."""
        self.sites.setdefault(index, []).append((engine_id, host))
        self.alone.add(index)
        return 1 + self.shared.pop(index, 0)

    def over(self, crashes: int) -> bool:
        return crashes >= self.limit

    def cleared(self, index: int) -> None:
        """``index`` finished (on some engine): forget about it."""
        if self.alone:
            self.alone.discard(index)
            self.shared.pop(index, None)
            self.sites.pop(index, None)

    def message(self, index: int, crashes: int) -> str:
        where = ", ".join(f"engine {e} on {h or 'an unknown host'}" for e, h in self.sites.get(index, []))
        return (f"task {index} took down {crashes} engine(s) (crash_limit={self.limit}): {where}; the rest of the "
                "map went on without it. Check it alone (memory, a segfault in C code), or raise crash_limit")
