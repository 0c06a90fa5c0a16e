"""The virtual clock: emulated seconds since the start of a run.

Emulated instants travel in Flower's message metadata as they would in a deployment:
``created_at`` as seconds since the epoch (a float) and ``delivered_at`` as an ISO 8601
string. In simulation the epoch *is* the start of the run, so an instant of 12.5 emulated
seconds reads ``1970-01-01T00:00:12.500000+00:00``; strategies parse both fields the same
way in simulation and on real devices.
"""

from __future__ import annotations

from datetime import UTC, datetime

__all__ = ["VirtualClock", "iso_instant"]


def iso_instant(seconds: float) -> str:
    """The ISO 8601 form of an emulated instant, as ``Metadata.delivered_at`` holds it."""
    return datetime.fromtimestamp(seconds, tz=UTC).isoformat()


class VirtualClock:
    """A monotonic emulated clock, advanced only by the engine."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)

    @property
    def now(self) -> float:
        """The current emulated instant in seconds."""
        return self._now

    def advance_to(self, t: float) -> None:
        """Move the clock forward to ``t`` (never backwards)."""
        if t > self._now:
            self._now = float(t)
