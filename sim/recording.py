"""Results of a real deployment: a Grid wrapper that records every message, and the files.

Under ``flwr run`` the ServerApp talks to real SuperNodes through Flower's own ``Grid``.
``RecordingGrid`` wraps it, unchanged in behaviour, and notes for every instruction its
size and creation instant, and for every reply its size, its own ``created_at`` (stamped on
the device when the reply was built) and the instant the server received it. From those and
the reply's measured metrics (``clients.measure``) it writes the same files, with the same
columns, as a simulated run (``sim.results``), ``source = measured``:

- ``compute_s``, ``peak_mem_bytes``, ``energy_j``: as the device measured them (energy
  empty where the device has no meter; radio energy is never metered, so
  ``comm_energy_j`` is empty and ``energy_j`` is the compute energy);
- ``comm_s``: the round trip on the server's clock minus the device's compute time
  (message transfer, SuperNode polling, and the start of Flower's per-message ClientApp
  process), split into downlink (instruction created to reply created, less compute) and
  uplink (reply created to received); only the split depends on the two clocks agreeing;
- ``start_s``/``finish_s``/``clock_s``: seconds since the ServerApp started, on its clock.

It also polls for replies every ``poll_s`` (Flower's ``send_and_receive`` sleeps 3 s
between pulls, which would put 3 s steps into every measured round).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Message
from flwr.serverapp import Grid

from sim import results
from sim.config import ExperimentConfig
from sim.engine import CallSpan, ReplyRecord
from sim.executor import serialize_message

__all__ = ["RecordingGrid", "write_deployed_results"]


def _round_of(msg: Message) -> str:
    """The round of an instruction: Flower strategies' ``server-round``, else its group."""
    if msg.has_content():
        for rec in msg.content.config_records.values():
            if "server-round" in rec:
                return str(int(rec["server-round"]))  # type: ignore[arg-type]
    return msg.metadata.group_id


@dataclass
class _Sent:
    message_type: str
    group_id: str
    node_id: int
    created_at: float
    bytes_down: int
    payload_down: int


def _payload(msg: Message) -> int:
    if not msg.has_content():
        return 0
    return int(sum(r.count_bytes() for r in msg.content.values()))


class RecordingGrid(Grid):
    """A ``Grid`` that forwards to ``grid`` and records what passes (module docstring).

    Parameters
    ----------
    grid : Grid
        Flower's grid (the SuperLink's).
    poll_s : float
        Pause between pulls while waiting for replies.
    """

    def __init__(self, grid: Grid, poll_s: float = 0.2) -> None:
        self.grid = grid
        self.poll_s = poll_s
        self.t_start = time.time()
        self.records: list[ReplyRecord] = []
        self.app_start_s: list[float] = []
        self.spans: list[CallSpan] = []
        self.sources: list[str] = []
        self._sent: dict[str, _Sent] = {}

    # -- Grid API, forwarded ----------------------------------------------------------
    def set_run(self, run: Any) -> None:
        """Forward."""
        self.grid.set_run(run)

    @property
    def run(self) -> Any:
        """Forward."""
        return self.grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        """Forward."""
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        """Forward."""
        return self.grid.get_node_ids()

    def get_nodes(self) -> Iterable[Any]:
        """Forward."""
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Push through the wrapped grid, noting each instruction's size and instant."""
        msgs = list(messages)
        sizes = [(len(serialize_message(m)), _payload(m)) for m in msgs]
        ids = list(self.grid.push_messages(msgs))
        for mid, msg, (size, payload) in zip(ids, msgs, sizes, strict=False):
            if mid:
                md = msg.metadata
                self._sent[mid] = _Sent(md.message_type, _round_of(msg), md.dst_node_id,
                                        md.created_at, size, payload)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Pull through the wrapped grid, recording every reply on arrival."""
        replies = list(self.grid.pull_messages(message_ids))
        now = time.time()
        for reply in replies:
            self._record(reply, now)
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push, then pull every ``poll_s`` until all replies are in or ``timeout``."""
        t0 = time.time()
        pending = {i for i in self.push_messages(messages) if i}
        first = next(iter(self._sent[i] for i in pending), None) if pending else None
        out: list[Message] = []
        end = t0 + timeout if timeout is not None else math.inf
        while pending and time.time() < end:
            got = list(self.pull_messages(list(pending)))
            out.extend(got)
            pending.difference_update(r.metadata.reply_to_message_id for r in got)
            if pending:
                time.sleep(self.poll_s)
        for mid in pending:  # never answered: a timeout row, as the engine writes
            self._timeout(mid, time.time())
        if first is not None:
            self.spans.append(CallSpan(first.group_id, first.message_type,
                                       t0 - self.t_start, time.time() - self.t_start))
        return out

    # -- records ----------------------------------------------------------------------
    def _record(self, reply: Message, received: float) -> None:
        sent = self._sent.pop(reply.metadata.reply_to_message_id, None)
        if sent is None:
            return
        metrics: Mapping[str, Any] = {}
        device: Mapping[str, Any] = {}
        if reply.has_content():
            metrics = next(iter(reply.content.metric_records.values()), {})
            device = reply.content.config_records.get("device", {})
        measured = int(metrics.get("measured", 0)) == 1
        compute = float(metrics.get("compute-s", 0.0))
        total = max(received - sent.created_at - compute, 0.0)
        down = min(max(reply.metadata.created_at - sent.created_at - compute, 0.0), total)
        error = (reply.error.reason or "") if reply.has_error() else ""
        self.records.append(ReplyRecord(
            group_id=sent.group_id,
            message_type=sent.message_type,
            node_id=reply.metadata.src_node_id,
            partition_id=int(device.get("partition-id", -1)),
            device=str(device.get("profile", "")),
            device_class=str(device.get("device-class", "")),
            status="error" if reply.has_error() else "ok",
            start_s=sent.created_at - self.t_start,
            finish_s=received - self.t_start,
            compute_s=compute,
            down_s=down,
            up_s=total - down,
            compute_energy_j=float(metrics.get("energy-j", math.nan)),
            comm_energy_j=math.nan if measured else 0.0,
            peak_mem_bytes=int(metrics.get("peak-mem-bytes", 0)),
            bytes_down=sent.bytes_down,
            bytes_up=len(serialize_message(reply)),
            payload_down=sent.payload_down,
            payload_up=_payload(reply),
            host_s=compute if measured else 0.0,
            error=error,
        ))
        self.sources.append("measured" if measured else "emulated")
        if "app-start-s" in metrics:
            self.app_start_s.append(float(metrics["app-start-s"]))

    def _timeout(self, mid: str, now: float) -> None:
        sent = self._sent.pop(mid)
        self.records.append(ReplyRecord(
            group_id=sent.group_id, message_type=sent.message_type, node_id=sent.node_id,
            partition_id=-1, device="", device_class="", status="timeout",
            start_s=sent.created_at - self.t_start, finish_s=now - self.t_start,
            compute_s=math.nan, down_s=math.nan, up_s=math.nan,
            compute_energy_j=math.nan, comm_energy_j=math.nan, peak_mem_bytes=0,
            bytes_down=sent.bytes_down, bytes_up=0, payload_down=sent.payload_down,
            payload_up=0, host_s=0.0,
        ))
        self.sources.append("measured")


def _blank_nan(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def write_deployed_results(
    out: str | Path,
    cfg: ExperimentConfig,
    grid: RecordingGrid,
    evals: Sequence[Mapping[str, float]],
    final_arrays: Any,
) -> dict[str, Any]:
    """Write ``rounds.csv``, ``devices.csv``, ``summary.json`` (and plots, model) for a
    deployed run, in the schema of ``sim.results``; returns the summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    devices = results.device_rows(grid.records, source="measured")
    for row, src in zip(devices, grid.sources, strict=True):
        row["source"] = src
    source = "measured" if "measured" in grid.sources else "emulated"
    rounds = results.round_rows(devices, grid.spans, evals, source=source)
    acc = [float(r["accuracy"]) for r in rounds if r["accuracy"] != ""]
    train = [d for d in devices if d["message_type"] == "train"]
    fleet: dict[str, int] = {}
    for d in {(d["node_id"], d["profile"]) for d in train}:
        fleet[d[1] or "unknown"] = fleet.get(d[1] or "unknown", 0) + 1
    summary: dict[str, Any] = {
        "final_accuracy": acc[-1] if acc else None,
        "best_accuracy": max(acc) if acc else None,
        "rounds": cfg.rounds,
        "emulated_time_s": None,
        "measured_time_s": max((s.end_s for s in grid.spans), default=0.0),
        "wall_time_s": time.time() - grid.t_start,
        "energy_j": sum(float(d["energy_j"]) for d in devices),
        "bytes_up": sum(int(d["bytes_up"]) for d in devices),
        "bytes_down": sum(int(d["bytes_down"]) for d in devices),
        "trainings": len(train),
        "stragglers": sum(int(r["stragglers"]) for r in rounds),
        "failures": sum(int(r["failures"]) for r in rounds),
        "dropouts": sum(int(r["dropouts"]) for r in rounds),
        "by_device_class": results.by_device_class(devices),
        "fleet": dict(sorted(fleet.items())),
        "engine": {"name": "flower-deployment",
                   "workers": len({d["node_id"] for d in devices})},
        "source": source,
        "provenance": results.provenance(cfg.hash(), cfg.seed),
        "config": str(cfg.doc.get("name", cfg.source)),
    }
    if grid.app_start_s:
        # Where the non-compute time of a reply goes: Flower's per-message ClientApp start.
        known = [v for v in grid.app_start_s if not math.isnan(v)]
        summary["mean_app_start_s"] = sum(known) / len(known) if known else None
        summary["mean_round_trip_s"] = sum(
            float(d["compute_s"]) + float(d["comm_s"]) for d in devices
            if d["status"] == "ok") / max(sum(d["status"] == "ok" for d in devices), 1)
    errors = sorted({d["error"] for d in devices if d["error"]})
    if errors:
        summary["errors"] = errors[:10]
    results.write_csv(out / "rounds.csv", [_blank_nan(r) for r in rounds],
                      results.ROUND_COLUMNS)
    results.write_csv(out / "devices.csv", [_blank_nan(d) for d in devices],
                      results.DEVICE_COLUMNS)
    summary["plots"] = results.write_plots(out, rounds, devices)
    if final_arrays is not None:
        np.savez(out / "model.npz", **{k: v.numpy() for k, v in final_arrays.items()})
    summary = _json_safe(summary)
    results.write_summary(out / "summary.json", summary)
    return summary
