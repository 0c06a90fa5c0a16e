"""Results: the files a run writes, and the in-process registry the ServerApp feeds.

Public schema (documented in the README):

``rounds.csv``
    ``round, accuracy, loss, round_time_s, clock_s, bytes_up, bytes_down, payload_up,
    payload_down, energy_j, participants, stragglers, dropouts, failures, failures_budget,
    failures_raised, failures_nonfinite, failures_oversize, failures_hang, actors_lost,
    source`` (``source``: ``emulated`` or ``measured``). Round 0 is the initial model's
    evaluation. ``failures`` is the sum of the ``failures_*`` kinds.
``devices.csv``
    one row per device and message: ``round, message_type, device_id, node_id, profile,
    device_class, status, compute_s, comm_s, energy_j, compute_energy_j, comm_energy_j,
    peak_mem_bytes, bytes_up, bytes_down, payload_up, payload_down, start_s, finish_s,
    host_s, source, error``. ``status`` is ``ok``, ``straggler`` (past the deadline),
    ``timeout`` (past the engine's wait), ``dropout`` (went offline), ``hang`` (never
    finished), ``nonfinite`` / ``oversize`` (reply rejected by the engine) or ``error``.
``summary.json``
    final accuracy, totals, per device class figures, and provenance (config hash,
    package versions, git commit, seed).
``accuracy.png``, ``device_classes.png``
    accuracy against emulated time; energy and compute/comm time by device class.
"""

from __future__ import annotations

import csv
import json
import subprocess
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = [
    "DEVICE_COLUMNS",
    "ROUND_COLUMNS",
    "clear",
    "collect",
    "has_run",
    "provenance",
    "publish",
    "round_columns",
    "subscribe",
    "round_rows",
    "write_csv",
    "write_run",
    "write_plots",
]

ROUND_COLUMNS = [
    "round", "accuracy", "loss", "round_time_s", "clock_s", "bytes_up", "bytes_down",
    "payload_up", "payload_down", "energy_j", "participants", "stragglers", "dropouts",
    "failures", "failures_budget", "failures_raised", "failures_nonfinite",
    "failures_oversize", "failures_hang", "actors_lost", "source",
]
DEVICE_COLUMNS = [
    "round", "message_type", "device_id", "node_id", "profile", "device_class", "status",
    "compute_s", "comm_s", "energy_j", "compute_energy_j", "comm_energy_j", "peak_mem_bytes",
    "bytes_up", "bytes_down", "payload_up", "payload_down", "start_s", "finish_s", "host_s",
    "source", "error",
]

_lock = threading.Lock()
_registry: dict[str, dict[str, list[Any]]] = {}
_listeners: dict[str, list[Callable[[str, Any], None]]] = {}


def publish(run_key: str, kind: str, value: Any) -> None:
    """Record ``value`` under ``kind`` for the run ``run_key`` (ignored without a key)."""
    if not run_key:
        return
    with _lock:
        _registry.setdefault(run_key, defaultdict(list))[kind].append(value)
        listeners = list(_listeners.get(run_key, ()))
    for fn in listeners:
        fn(kind, value)


def subscribe(run_key: str, fn: Callable[[str, Any], None]) -> None:
    """Call ``fn(kind, value)`` on every later ``publish`` for ``run_key``."""
    with _lock:
        _listeners.setdefault(run_key, []).append(fn)


def has_run(run_key: str) -> bool:
    """Whether a runner in this process collects results for ``run_key``."""
    return bool(run_key) and run_key in _registry


def collect(run_key: str) -> dict[str, list[Any]]:
    """Everything published for ``run_key`` so far."""
    with _lock:
        return {k: list(v) for k, v in _registry.get(run_key, {}).items()}


def clear(run_key: str) -> None:
    """Forget ``run_key`` (and its listeners)."""
    with _lock:
        _registry.pop(run_key, None)
        _listeners.pop(run_key, None)


def device_rows(records: Iterable[Any], source: str = "emulated") -> list[dict[str, Any]]:
    """``devices.csv`` rows from the engine's ledger records."""
    rows = []
    for r in records:
        rows.append({
            "round": _round_of(r.group_id),
            "message_type": r.message_type,
            "device_id": r.partition_id,
            "node_id": r.node_id,
            "profile": r.device,
            "device_class": r.device_class,
            "status": r.status,
            "compute_s": r.compute_s,
            "comm_s": r.comm_s,
            "energy_j": r.energy_j,
            "compute_energy_j": r.compute_energy_j,
            "comm_energy_j": r.comm_energy_j,
            "peak_mem_bytes": r.peak_mem_bytes,
            "bytes_up": r.bytes_up,
            "bytes_down": r.bytes_down,
            "payload_up": r.payload_up,
            "payload_down": r.payload_down,
            "start_s": r.start_s,
            "finish_s": r.finish_s,
            "host_s": r.host_s,
            "source": source,
            "error": r.error.splitlines()[0][:300] if r.error else "",
        })
    return rows


def _round_of(group_id: str) -> int:
    try:
        return int(group_id)
    except ValueError:
        return -1


def round_rows(
    devices: Sequence[Mapping[str, Any]],
    spans: Iterable[Any],
    evals: Sequence[Mapping[str, float]],
    source: str = "emulated",
) -> list[dict[str, Any]]:
    """``rounds.csv`` rows: the ledger summed per round, beside the server's evaluation."""
    by_round: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    for d in devices:
        by_round[int(d["round"])].append(d)
    span_by: dict[int, list[tuple[float, float]]] = defaultdict(list)
    span_objs: dict[int, list[Any]] = defaultdict(list)
    for s in spans:
        span_by[_round_of(s.group_id)].append((s.start_s, s.end_s))
        span_objs[_round_of(s.group_id)].append(s)
    ev = {int(e["round"]): e for e in evals}
    rounds = sorted(set(by_round) | set(ev) | set(span_by))
    rows = []
    for rnd in rounds:
        if rnd < 0:
            continue
        ds = by_round.get(rnd, [])
        train = [d for d in ds if d["message_type"] == "train"]
        sp = span_by.get(rnd, [])
        errors = [d for d in train if d["status"] == "error"]
        budget = [d for d in errors if "BudgetError" in str(d.get("error", ""))]
        kinds = {k: sum(d["status"] == k for d in train) for k in
                 ("nonfinite", "oversize", "hang")}
        rows.append({
            "round": rnd,
            "accuracy": ev.get(rnd, {}).get("accuracy", ""),
            "loss": ev.get(rnd, {}).get("loss", ""),
            "round_time_s": sum(b - a for a, b in sp),
            "clock_s": max((b for _, b in sp), default=0.0),
            "bytes_up": sum(int(d["bytes_up"]) for d in ds),
            "bytes_down": sum(int(d["bytes_down"]) for d in ds),
            "payload_up": sum(int(d["payload_up"]) for d in ds),
            "payload_down": sum(int(d["payload_down"]) for d in ds),
            "energy_j": sum(float(d["energy_j"]) for d in ds),
            "participants": len(train),
            "stragglers": sum(d["status"] in ("straggler", "timeout") for d in train),
            "dropouts": sum(d["status"] == "dropout" for d in train),
            "failures": len(errors) + sum(kinds.values()),
            "failures_budget": len(budget),
            "failures_raised": len(errors) - len(budget),
            "failures_nonfinite": kinds["nonfinite"],
            "failures_oversize": kinds["oversize"],
            "failures_hang": kinds["hang"],
            "actors_lost": sum(getattr(s, "actors_lost", 0) for s in span_objs.get(rnd, [])),
            "source": source,
        })
        # Extra figures the ServerApp evaluates (e.g. continual learning's per-task
        # accuracy and forgetting) follow the schema's columns.
        for k, v in ev.get(rnd, {}).items():
            if k not in rows[-1] and k != "clock_s":
                rows[-1][k] = v
    # A round ends when the server evaluates its model (the engine stamps that instant);
    # without one, at the end of its last exchange. Its time is the clock's advance.
    last = 0.0
    for r in rows:
        e = ev.get(r["round"], {})
        if "clock_s" in e:
            r["clock_s"] = float(e["clock_s"])
        r["clock_s"] = max(r["clock_s"], last)
        r["round_time_s"] = r["clock_s"] - last
        last = r["clock_s"]
    return rows


def round_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """``ROUND_COLUMNS`` then any extra columns the rows carry, in first-seen order."""
    extra: list[str] = []
    for r in rows:
        extra += [k for k in r if k not in ROUND_COLUMNS and k not in extra]
    return ROUND_COLUMNS + extra


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    """Write ``rows`` with exactly ``columns`` (missing values empty)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: _fmt(r.get(c, "")) for c in columns})


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def by_device_class(devices: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Totals and means per device class (train messages)."""
    out: dict[str, dict[str, float]] = {}
    groups: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for d in devices:
        if d["message_type"] == "train":
            groups[str(d["device_class"])].append(d)
    for cls, ds in sorted(groups.items()):
        n = len(ds)
        out[cls] = {
            "trainings": n,
            "energy_j": sum(float(d["energy_j"]) for d in ds),
            "mean_energy_j": sum(float(d["energy_j"]) for d in ds) / n,
            "mean_compute_s": sum(float(d["compute_s"]) for d in ds) / n,
            "mean_comm_s": sum(float(d["comm_s"]) for d in ds) / n,
            "max_peak_mem_bytes": max(int(d["peak_mem_bytes"]) for d in ds),
            "stragglers": sum(d["status"] in ("straggler", "timeout") for d in ds),
            "failures": sum(d["status"] in ("error", "nonfinite", "oversize", "hang")
                            for d in ds),
        }
    return out


def provenance(config_hash: str, seed: int) -> dict[str, Any]:
    """Config hash, seed, git commit and the versions of the packages that matter."""
    versions = {}
    for pkg in ("tinyfleet", "flwr", "torch", "ray", "numpy", "scikit-learn"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"config_hash": config_hash, "seed": seed, "git_commit": commit,
            "versions": versions}


def write_plots(out: Path, rounds: Sequence[Mapping[str, Any]],
                devices: Sequence[Mapping[str, Any]]) -> list[str]:
    """``accuracy.png`` and ``device_classes.png``; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    pts = [(float(r["clock_s"]), float(r["accuracy"])) for r in rounds if r["accuracy"] != ""]
    if pts:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
        ax.set_xlabel("emulated time (s)")
        ax.set_ylabel("held-out accuracy")
        ax.set_title("Accuracy against emulated time")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "accuracy.png", dpi=100)
        plt.close(fig)
        written.append("accuracy.png")
    classes = by_device_class(devices)
    if classes:
        names = list(classes)
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
        a1.bar(names, [classes[c]["mean_energy_j"] for c in names], color="tab:orange")
        a1.set_ylabel("energy per training (J)")
        a1.set_yscale("log")
        _log_floor(a1, [classes[c]["mean_energy_j"] for c in names])
        comp = [classes[c]["mean_compute_s"] for c in names]
        comm = [classes[c]["mean_comm_s"] for c in names]
        a2.bar(names, comp, label="compute")
        a2.bar(names, comm, bottom=comp, label="communication")
        a2.set_ylabel("time per training (s)")
        a2.set_yscale("log")
        _log_floor(a2, comp + comm)
        a2.legend()
        fig.suptitle("Energy and time by device class")
        fig.tight_layout()
        fig.savefig(out / "device_classes.png", dpi=100)
        plt.close(fig)
        written.append("device_classes.png")
    return written


def _log_floor(ax: Any, values: Sequence[float]) -> None:
    """Bars start at 0, which a log axis cannot show: put its floor below the smallest
    positive bar so that none is hidden."""
    positive = [v for v in values if v > 0]
    if positive:
        ax.set_ylim(bottom=min(positive) / 3)


def write_run(
    out_dir: str | Path | None,
    rounds: Sequence[Mapping[str, Any]],
    devices: Sequence[Mapping[str, Any]],
    summary: dict[str, Any],
    final: Any,
) -> Path | None:
    """Write a run's folder: the CSVs, plots, ``model.npz`` and ``summary.json``.

    The summary's ``errors`` (the first distinct device errors) and ``plots`` are filled
    in here, so every engine writes the same schema.
    """
    errors = sorted({str(d["error"]) for d in devices if d.get("error")})
    if errors:
        summary["errors"] = errors[:10]
    if out_dir is None:
        return None
    import numpy as np

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "rounds.csv", rounds, round_columns(rounds))
    write_csv(out / "devices.csv", devices, DEVICE_COLUMNS)
    summary["plots"] = write_plots(out, rounds, devices)
    if final is not None:
        np.savez(out / "model.npz", **{k: v.numpy() for k, v in final.items()})
    write_summary(out / "summary.json", summary)
    return out


def write_summary(path: Path, summary: Mapping[str, Any]) -> None:
    """Write ``summary.json``."""
    path.write_text(json.dumps(summary, indent=2, sort_keys=True, default=str))
