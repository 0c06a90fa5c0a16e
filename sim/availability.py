"""When devices are online: always, or by a trace of online intervals.

Trace format (CSV, one row per online interval; a device with no row is never online)::

    device,start_s,end_s
    0,0,3600
    0,7200,10800
    1,0,86400

``device`` is the partition id (0-based), times are emulated seconds from the run's start.
A JSON form ``{"0": [[0, 3600], [7200, 10800]], "1": [[0, 86400]]}`` is accepted too.
``periodic`` repeats the trace every ``period_s`` seconds (e.g. a day).

``diurnal_trace`` generates a deterministic trace: each device is online in a daily
charging window (start and length drawn per device from the seed), as phones and boards
that train only while plugged in at night.
"""

from __future__ import annotations

import bisect
import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from devices.errors import ConfigError, DataError

__all__ = ["AlwaysOnline", "Availability", "TraceAvailability", "diurnal_trace", "load_trace"]


class Availability:
    """Base: which devices are online at an emulated instant."""

    def online(self, device: int, t: float) -> bool:
        """Whether ``device`` is online at ``t``."""
        raise NotImplementedError

    def online_until(self, device: int, t: float) -> float:
        """The end of the online interval that holds ``t`` (``inf`` if it never ends)."""
        raise NotImplementedError

    def next_change(self, t: float) -> float | None:
        """The first instant after ``t`` at which some device comes online."""
        raise NotImplementedError


class AlwaysOnline(Availability):
    """Every device online at every instant (the default)."""

    def online(self, device: int, t: float) -> bool:
        return True

    def online_until(self, device: int, t: float) -> float:
        return float("inf")

    def next_change(self, t: float) -> float | None:
        return None


class TraceAvailability(Availability):
    """Online intervals per device, optionally repeating every ``period_s``."""

    def __init__(
        self, intervals: Mapping[int, Sequence[tuple[float, float]]], period_s: float = 0.0
    ) -> None:
        self.period_s = float(period_s)
        self._iv: dict[int, list[tuple[float, float]]] = {}
        for dev, ivs in intervals.items():
            if int(dev) < 0:
                raise DataError(f"availability: device {dev}: expected a partition id >= 0")
            clean = sorted((float(a), float(b)) for a, b in ivs)
            for a, b in clean:
                if not (b > a >= 0):
                    raise DataError(f"availability: device {dev}: bad interval [{a}, {b}]")
                if self.period_s and b > self.period_s:
                    raise DataError(
                        f"availability: device {dev}: interval [{a}, {b}] exceeds the period "
                        f"{self.period_s}"
                    )
            self._iv[int(dev)] = clean
        self._starts = sorted({a for ivs in self._iv.values() for a, _ in ivs})

    def _local(self, t: float) -> tuple[float, float]:
        if not self.period_s:
            return 0.0, t
        base = (t // self.period_s) * self.period_s
        return base, t - base

    def online(self, device: int, t: float) -> bool:
        base, lt = self._local(t)
        return any(a <= lt < b for a, b in self._iv.get(device, ()))

    def online_until(self, device: int, t: float) -> float:
        ivs = self._iv.get(device, ())
        if self.period_s and any(a <= 0.0 and b >= self.period_s for a, b in ivs):
            return float("inf")  # online the whole period, every period
        base, lt = self._local(t)
        for a, b in ivs:
            if a <= lt < b:
                end = base + b
                # An interval that runs to the period's end continues into the next
                # period's interval starting at 0, if there is one.
                if self.period_s and b >= self.period_s and ivs[0][0] == 0.0:
                    end = base + self.period_s + ivs[0][1]
                return end
        return t

    def next_change(self, t: float) -> float | None:
        if not self._starts:
            return None
        base, lt = self._local(t)
        i = bisect.bisect_right(self._starts, lt)
        if i < len(self._starts):
            return base + self._starts[i]
        if self.period_s:
            return base + self.period_s + self._starts[0]
        return None


def load_trace(path: str | Path, period_s: float = 0.0) -> TraceAvailability:
    """Read a CSV or JSON availability trace (format in the module docstring)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"availability.trace: {str(path)!r} is not a file")
    intervals: dict[int, list[tuple[float, float]]] = {}
    try:
        if p.suffix == ".json":
            raw = json.loads(p.read_text())
            if not isinstance(raw, dict):
                raise DataError(f"{path}: expected a JSON object of device -> intervals")
            for dev, ivs in raw.items():
                intervals[int(dev)] = [(float(a), float(b)) for a, b in ivs]
        else:
            with p.open() as f:
                reader = csv.DictReader(f)
                if reader.fieldnames is None or not {"device", "start_s", "end_s"} <= set(
                    reader.fieldnames
                ):
                    raise DataError(f"{path}: expected the columns device,start_s,end_s")
                for row in reader:
                    intervals.setdefault(int(row["device"]), []).append(
                        (float(row["start_s"]), float(row["end_s"]))
                    )
    except (OSError, ValueError, TypeError, KeyError, csv.Error, RecursionError) as exc:
        raise DataError(f"{path}: unreadable availability trace ({exc})") from exc
    return TraceAvailability(intervals, period_s)


def diurnal_trace(
    num_devices: int,
    seed: int,
    *,
    period_s: float = 86400.0,
    window_s: tuple[float, float] = (4 * 3600.0, 10 * 3600.0),
    always_on_share: float = 0.0,
) -> TraceAvailability:
    """A deterministic daily trace: each device online in one charging window a day.

    Parameters
    ----------
    window_s : (float, float)
        Range of the window's length; its start is uniform over the day.
    always_on_share : float
        Share of devices (mains-powered boards) that are always online.
    """
    rng = np.random.default_rng([seed, 4])
    intervals: dict[int, list[tuple[float, float]]] = {}
    for dev in range(num_devices):
        if rng.random() < always_on_share:
            intervals[dev] = [(0.0, period_s)]
            continue
        length = rng.uniform(*window_s)
        start = rng.uniform(0, period_s)
        end = start + length
        if end <= period_s:
            intervals[dev] = [(start, end)]
        else:  # wraps past midnight
            intervals[dev] = [(0.0, end - period_s), (start, period_s)]
    return TraceAvailability(intervals, period_s)
