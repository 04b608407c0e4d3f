"""Engine slots held twice at once: the check the packing tests make on their runs' placements."""
from __future__ import annotations

from collections.abc import Iterable


def overlapping(spans: Iterable[tuple[int, float, float, int]]) -> list[tuple]:
    """Pairs of (slot, started, finished, line) spans that held one slot at the same time."""
    ordered = sorted(spans)
    return [(a, b) for a, b in zip(ordered, ordered[1:]) if a[0] == b[0] and b[1] < a[2] - 1e-6]
