"""The project's apps on Flower's own simulation engine, for comparison (``--engine flower``).

``run_with_flower`` runs the same ``ServerApp`` and ``ClientApp`` that tinyfleet's engine
runs, on ``flwr.simulation.run_simulation`` with its Ray backend, and writes the same
result files. Flower's engine has no virtual clock, so the results differ in kind:

- ``start_s``, ``finish_s``, ``round_time_s`` and ``clock_s`` are *wall* seconds since the
  run began (``summary["clock"] = "wall"``); ``emulated_time_s`` is NaN. Deadlines
  (``strategy.deadline_s``) compare Flower's wall-clock stamps, so stragglers are those of
  this host, not of the fleet.
- per-device figures come from a metering proxy around the ``Grid`` the ServerApp sees: it
  measures each instruction and reply in Flower's serialized (protobuf) form, reads
  ``compute-s``, ``energy-j`` and ``peak-mem-bytes`` from the replies (the project's
  ClientApp reports them from the cost model), and computes link time and radio energy
  from those bytes and the device's link, as tinyfleet's engine does.

Flower's public ``run_simulation`` takes no run config, so thin wrappers hand the
experiment's run config to both apps' ``Context``. The node -> device mapping: Flower gives
each node a ``partition-id`` in its node config, and the ClientApp derives the profile from
the fleet mix and the seed; the ClientApp wrapper tags each reply with its partition id (a
record the proxy removes before measuring or passing the reply on).
"""

from __future__ import annotations

import logging
import os
import random
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run

from devices.fleet import assign_profiles
from sim import results
from sim.config import ExperimentConfig
from sim.engine import CallSpan, DeviceSlot, ReplyRecord, make_slots
from sim.executor import serialize_message
from sim.runner import Progress, RunResult

__all__ = ["MeteredGrid", "flower_apps", "run_with_flower"]

log = logging.getLogger("tinyfleet")

_TAG = "tinyfleet-node"  # the reply record carrying the node's partition id


def _payload_bytes(msg: Message) -> int:
    if not msg.has_content():
        return 0
    return int(sum(r.count_bytes() for r in msg.content.values()))


def _round_of(msg: Message) -> str:
    if msg.metadata.group_id:
        return msg.metadata.group_id
    if msg.has_content():
        for rec in msg.content.config_records.values():
            if "server-round" in rec:
                return str(int(rec["server-round"]))  # type: ignore[arg-type]
    return ""


@dataclass
class _Sent:
    group_id: str
    message_type: str
    node_id: int
    bytes_down: int
    payload_down: int
    sent_s: float


class MeteredGrid(Grid):
    """A ``Grid`` proxy that meters every message the ServerApp exchanges through it.

    Parameters
    ----------
    inner : Grid
        Flower's grid (``InMemoryGrid`` under its simulation).
    slots : dict[int, DeviceSlot]
        The fleet by partition id (profile and link of each device).
    t_start : float
        ``time.perf_counter()`` at the start of the run: spans and ledger rows are wall
        seconds since then.
    on_progress : callable, optional
        Called with the proxy after each ``send_and_receive``.

    Attributes
    ----------
    records : list[ReplyRecord]
        One ledger row per reply (or per instruction left unanswered: status ``timeout``).
    spans : list[CallSpan]
        One per ``send_and_receive``, in wall seconds since ``t_start``.
    """

    def __init__(
        self,
        inner: Grid,
        slots: Mapping[int, DeviceSlot],
        t_start: float,
        on_progress: Callable[[MeteredGrid], None] | None = None,
    ) -> None:
        self.inner = inner
        self.slots = dict(slots)
        self.t_start = t_start
        self.on_progress = on_progress
        self.records: list[ReplyRecord] = []
        self.spans: list[CallSpan] = []
        self._sent: dict[str, _Sent] = {}
        self._partition: dict[int, int] = {}

    # Grid API: delegate, metering on the way.

    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self.inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        msgs = list(messages)
        ids = list(self.inner.push_messages(msgs))  # Flower stamps the ids in place
        now = self._now()
        for m in msgs:
            md = m.metadata
            self._sent[md.message_id] = _Sent(_round_of(m), md.message_type, md.dst_node_id,
                                              len(serialize_message(m)), _payload_bytes(m),
                                              now)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._meter(r) for r in self.inner.pull_messages(message_ids)]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push, wait for the replies (Flower's polling loop), meter them."""
        t0 = self._now()
        ids = set(self.push_messages(messages))
        if not ids:
            return []
        # Flower's own loop, on the inner grid (pull every 0.1 s until done or timeout).
        end = time.time() + (timeout if timeout is not None else 0.0)
        out: list[Message] = []
        first = self._sent[next(iter(ids))]
        group, mtype = first.group_id, first.message_type
        while timeout is None or time.time() < end:
            got = list(self.pull_messages(ids))
            out.extend(got)
            ids.difference_update(r.metadata.reply_to_message_id for r in got)
            if not ids:
                break
            time.sleep(getattr(self.inner, "pull_interval", 0.1))
        for mid in ids:  # unanswered within the timeout
            self._ledger(self._sent.pop(mid), None, 0, "timeout")
        self.spans.append(CallSpan(group, mtype, t0, self._now()))
        if self.on_progress is not None:
            self.on_progress(self)
        return out

    # metering

    def _now(self) -> float:
        return time.perf_counter() - self.t_start

    def _meter(self, reply: Message) -> Message:
        if reply.has_content() and _TAG in reply.content:
            tag = reply.content.config_records[_TAG]
            self._partition[reply.metadata.src_node_id] = int(tag["partition-id"])  # type: ignore[arg-type]
            del reply.content[_TAG]
        sent = self._sent.pop(reply.metadata.reply_to_message_id, None)
        if sent is not None:
            self._ledger(sent, reply, len(serialize_message(reply)),
                         "error" if reply.has_error() else "ok")
        return reply

    def _ledger(self, sent: _Sent, reply: Message | None, bytes_up: int, status: str) -> None:
        pid = self._partition.get(sent.node_id, -1)
        slot = self.slots.get(pid)
        metrics: Mapping[str, Any] = {}
        if reply is not None and reply.has_content():
            for rec in reply.content.metric_records.values():
                metrics = rec
                break
        compute_s = float(metrics.get("compute-s", 0.0))
        compute_j = float(metrics.get("energy-j", 0.0))
        down_s = up_s = comm_j = 0.0
        if slot is not None:
            # The link time the device would spend on these bytes (radio on, no latency).
            prof, f = slot.profile, slot.link_factor
            on_air = (sent.bytes_down / (prof.downlink_bytes_per_s * f)
                      + bytes_up / (prof.uplink_bytes_per_s * f))
            down_s = prof.latency_s + sent.bytes_down / (prof.downlink_bytes_per_s * f)
            up_s = on_air - (down_s - prof.latency_s) + (prof.latency_s if reply else 0.0)
            comm_j = prof.power_radio_w * on_air
        now = self._now()
        self.records.append(ReplyRecord(
            group_id=sent.group_id,
            message_type=sent.message_type,
            node_id=sent.node_id,
            partition_id=pid,
            device=slot.profile.name if slot else "",
            device_class=slot.profile.device_class if slot else "",
            status=status,
            start_s=sent.sent_s,
            finish_s=now,
            compute_s=compute_s,
            down_s=down_s,
            up_s=up_s,
            compute_energy_j=compute_j,
            comm_energy_j=comm_j,
            peak_mem_bytes=int(metrics.get("peak-mem-bytes", 0)),
            bytes_down=sent.bytes_down,
            bytes_up=bytes_up,
            payload_down=sent.payload_down,
            payload_up=_payload_bytes(reply) if reply is not None else 0,
            host_s=now - sent.sent_s,
            error=(reply.error.reason or "") if reply is not None and reply.has_error() else "",
        ))


def _with_run_config(context: Context, run_config: Mapping[str, Any]) -> Context:
    """A view of ``context`` with ``run_config`` (Flower forbids changing a node's own run
    config); it shares ``state``, so what the app keeps there persists."""
    return Context(run_id=context.run_id, node_id=context.node_id,
                   node_config=context.node_config, state=context.state,
                   run_config=dict(run_config))


def _tagging_client_app(inner: ClientApp, run_config: Mapping[str, Any]) -> ClientApp:
    """``inner`` with the run config in its context and its partition id on each reply."""
    app = ClientApp()

    def handle(msg: Message, context: Context) -> Message:
        reply = inner(msg, _with_run_config(context, run_config))
        if reply.has_content():
            pid = int(context.node_config.get("partition-id", -1))  # type: ignore[call-overload]
            reply.content[_TAG] = ConfigRecord({"partition-id": pid})
        return reply

    app.train()(handle)
    app.evaluate()(handle)
    app.query()(handle)
    return app


def flower_apps(
    server_app: ServerApp,
    client_app: ClientApp,
    run_config: Mapping[str, Any],
    slots: Mapping[int, DeviceSlot],
    t_start: float,
    on_progress: Callable[[MeteredGrid], None] | None = None,
) -> tuple[ServerApp, ClientApp, list[MeteredGrid]]:
    """The apps to hand Flower's ``run_simulation``: both see ``run_config``; the
    ServerApp drives a :class:`MeteredGrid` (returned in the list once the run starts)."""
    grids: list[MeteredGrid] = []
    wrapped = ServerApp()

    @wrapped.main()
    def _main(grid: Grid, context: Context) -> None:
        metered = MeteredGrid(grid, slots, t_start, on_progress)
        grids.append(metered)
        server_app(grid=metered, context=_with_run_config(context, run_config))

    return wrapped, _tagging_client_app(client_app, run_config), grids


def run_with_flower(
    cfg: ExperimentConfig,
    out_dir: str | Path | None = None,
    progress: bool = False,
    *,
    num_cpus_per_client: float = 1.0,
    on_progress: Callable[[MeteredGrid], None] | None = None,
) -> RunResult:
    """Run ``cfg`` on Flower's ``run_simulation`` (Ray backend) and write its results.

    Parameters
    ----------
    cfg : ExperimentConfig
        The experiment (``engine.*`` is ignored but for the name in the summary).
    out_dir : path, optional
        Where ``rounds.csv``, ``devices.csv``, ``summary.json`` and ``model.npz`` go.
    progress : bool
        Show a bar over rounds.
    num_cpus_per_client : float
        Flower's ``client_resources["num_cpus"]``: Ray runs ``CPUs / num_cpus`` actors.
    on_progress : callable, optional
        Called with the :class:`MeteredGrid` after each ``send_and_receive`` (benchmarks
        read round times from its ``spans``).

    Returns
    -------
    RunResult
        As ``sim.runner.run_experiment``'s, with ``grid`` ``None``.
    """
    from flwr.simulation import run_simulation

    from clients.client_app import app as client_app
    from sim.server_app import app as server_app

    logging.getLogger("flwr").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    run_key = uuid.uuid4().hex
    run_config: dict[str, Any] = dict(cfg.to_run_config())
    run_config["tinyfleet.run-key"] = run_key
    if out_dir is not None:
        run_config["tinyfleet.out"] = str(out_dir)
    profiles = assign_profiles(cfg.client.fleet.mix, cfg.client.fleet.size, cfg.seed)
    slots = {s.partition_id: s
             for s in make_slots(profiles, cfg.seed, cfg.client.fleet.link_spread)}
    bar = _Bar(cfg.rounds, run_key, progress, on_progress)
    sapp, capp, grids = flower_apps(server_app, client_app, run_config, slots, t_start, bar)
    results.publish(run_key, "start", time.time())
    # Flower samples nodes with the global RNGs (its Ray actors stay unseeded).
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % (2**32))
    torch.manual_seed(cfg.seed)
    backend_config = {
        "client_resources": {"num_cpus": num_cpus_per_client, "num_gpus": 0.0},
        # "local": a Ray of its own; without an address ray.init() joins the latest
        # cluster anyone on this machine started with `ray start`.
        "init_args": {"include_dashboard": False, "log_to_driver": False,
                      "address": os.environ.get("RAY_ADDRESS") or "local"},
    }
    try:
        run_simulation(server_app=sapp, client_app=capp,
                       num_supernodes=cfg.client.fleet.size, backend_name="ray",
                       backend_config=backend_config)  # type: ignore[arg-type]
    finally:
        bar.close()
    wall_s = time.perf_counter() - t_start
    collected = results.collect(run_key)
    results.clear(run_key)
    if not grids:
        raise RuntimeError("Flower's simulation ended before the ServerApp started")
    return _finish(cfg, grids[0], collected, wall_s, slots, out_dir)


class _Bar(Progress):
    """The runner's bar on wall time; forwards to the caller's callback."""

    def __init__(self, total: int, run_key: str, enabled: bool,
                 forward: Callable[[MeteredGrid], None] | None) -> None:
        super().__init__(total, run_key, enabled, label="wall")
        self.forward = forward

    def __call__(self, grid: MeteredGrid) -> None:  # type: ignore[override]
        if self.forward is not None:
            self.forward(grid)
        if grid.spans:
            self.show(grid.spans[-1].group_id, grid.spans[-1].end_s)


def _finish(
    cfg: ExperimentConfig,
    grid: MeteredGrid,
    collected: Mapping[str, list[Any]],
    wall_s: float,
    slots: Mapping[int, DeviceSlot],
    out_dir: str | Path | None,
) -> RunResult:
    devices = results.device_rows(grid.records)
    rounds = results.round_rows(devices, grid.spans, collected.get("eval", []))
    final = (collected.get("final") or [None])[-1]
    acc = [float(r["accuracy"]) for r in rounds if r["accuracy"] != ""]
    fleet: dict[str, int] = {}
    for s in slots.values():
        fleet[s.profile.name] = fleet.get(s.profile.name, 0) + 1
    summary: dict[str, Any] = {
        "final_accuracy": acc[-1] if acc else None,
        "best_accuracy": max(acc) if acc else None,
        "rounds": cfg.rounds,
        "emulated_time_s": float("nan"),  # no virtual clock under Flower
        "clock": "wall",
        "wall_time_s": wall_s,
        "energy_j": sum(float(d["energy_j"]) for d in devices),
        "bytes_up": sum(int(d["bytes_up"]) for d in devices),
        "bytes_down": sum(int(d["bytes_down"]) for d in devices),
        "trainings": sum(d["message_type"] == "train" for d in devices),
        "stragglers": sum(int(r["stragglers"]) for r in rounds),
        "failures": sum(int(r["failures"]) for r in rounds),
        "dropouts": 0,
        "by_device_class": results.by_device_class(devices),
        "fleet": dict(sorted(fleet.items())),
        "engine": {"name": "flower", "backend": "ray"},
        "provenance": results.provenance(cfg.hash(), cfg.seed),
        "config": cfg.source,
    }
    out = results.write_run(out_dir, rounds, devices, summary, final)
    return RunResult(rounds, devices, summary, final, out, None)
