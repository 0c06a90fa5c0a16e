"""Set two result folders side by side: typically an emulated run and a real one.

Both folders hold the files of ``sim.results`` (``rounds.csv``, ``devices.csv``,
``summary.json``), whether written by a simulation or by a deployment
(``sim.recording``). ``compare`` lines up, per round, accuracy, round time and bytes, and
per device class (train messages) the mean compute time, communication time, energy and
peak memory, with the ratio B / A; values a run does not know (energy without a meter)
stay empty. ``format_table`` prints it; ``write_comparison`` writes it as CSV.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from devices.errors import DataError

__all__ = ["COMPARE_COLUMNS", "compare", "format_table", "write_comparison"]

COMPARE_COLUMNS = ["section", "key", "metric", "a", "b", "b_over_a"]
_ROUND_METRICS = ("accuracy", "loss", "round_time_s", "bytes_up", "bytes_down", "energy_j",
                  "participants")
_DEVICE_METRICS = ("compute_s", "comm_s", "energy_j", "peak_mem_bytes", "bytes_up")


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise DataError(f"{path}: missing; expected a tinyfleet results folder")
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _num(text: Any) -> float:
    if text in ("", None):
        return math.nan
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def _mean(values: Sequence[float]) -> float:
    known = [v for v in values if not math.isnan(v)]
    return sum(known) / len(known) if known and len(known) == len(values) else math.nan


def _by_class(devices: Sequence[Mapping[str, str]]) -> dict[str, dict[str, float]]:
    groups: dict[str, list[Mapping[str, str]]] = defaultdict(list)
    for d in devices:
        if d["message_type"] == "train" and d["status"] in ("ok", "straggler"):
            groups[d["device_class"] or "unknown"].append(d)
    return {cls: {m: _mean([_num(d[m]) for d in ds]) for m in _DEVICE_METRICS}
            | {"messages": float(len(ds))}
            for cls, ds in sorted(groups.items())}


def _source(rows: Sequence[Mapping[str, str]]) -> str:
    return ",".join(sorted({r.get("source", "") for r in rows})) or "unknown"


def compare(a: str | Path, b: str | Path) -> list[dict[str, Any]]:
    """Rows ``section, key, metric, a, b, b_over_a`` for result folders ``a`` and ``b``."""
    a, b = Path(a), Path(b)
    ra, rb = _read_csv(a / "rounds.csv"), _read_csv(b / "rounds.csv")
    da, db = _read_csv(a / "devices.csv"), _read_csv(b / "devices.csv")
    rows: list[dict[str, Any]] = [
        {"section": "run", "key": "folder", "metric": "path", "a": str(a), "b": str(b),
         "b_over_a": ""},
        {"section": "run", "key": "source", "metric": "source", "a": _source(ra),
         "b": _source(rb), "b_over_a": ""},
    ]
    sa, sb = _summary(a), _summary(b)
    for metric in ("final_accuracy", "energy_j", "bytes_up", "bytes_down", "trainings",
                   "failures", "mean_app_start_s", "mean_round_trip_s"):
        rows.append(_pair("run", "summary", metric, _num(sa.get(metric)),
                          _num(sb.get(metric))))
    rows.append(_pair("run", "summary", "clock_s", _num(ra[-1]["clock_s"]) if ra else math.nan,
                      _num(rb[-1]["clock_s"]) if rb else math.nan))
    by_a = {r["round"]: r for r in ra}
    by_b = {r["round"]: r for r in rb}
    for rnd in sorted(set(by_a) | set(by_b), key=int):
        for metric in _ROUND_METRICS:
            rows.append(_pair("round", rnd, metric, _num(by_a.get(rnd, {}).get(metric)),
                              _num(by_b.get(rnd, {}).get(metric))))
    ca, cb = _by_class(da), _by_class(db)
    for cls in sorted(set(ca) | set(cb)):
        for metric in (*_DEVICE_METRICS, "messages"):
            rows.append(_pair("device_class", cls, f"mean_{metric}" if metric != "messages"
                              else metric, ca.get(cls, {}).get(metric, math.nan),
                              cb.get(cls, {}).get(metric, math.nan)))
    return rows


def _summary(folder: Path) -> dict[str, Any]:
    path = folder / "summary.json"
    if not path.is_file():
        return {}
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _pair(section: str, key: str, metric: str, a: float, b: float) -> dict[str, Any]:
    ratio = b / a if not (math.isnan(a) or math.isnan(b)) and a != 0 else math.nan
    return {"section": section, "key": key, "metric": metric, "a": a, "b": b,
            "b_over_a": ratio}


def _cell(v: Any, digits: int = 4) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        return f"{v:.{digits}g}"
    return str(v)


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A fixed-width text table of ``compare``'s rows."""
    header = ["section", "key", "metric", "A", "B", "B/A"]
    body = [[_cell(r[c]) for c in COMPARE_COLUMNS] for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in body)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True))
              for line in body]
    return "\n".join(lines)


def write_comparison(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``compare``'s rows as CSV (unknown values empty)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COMPARE_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({c: _cell(r[c], digits=8) for c in COMPARE_COLUMNS})
    return p
