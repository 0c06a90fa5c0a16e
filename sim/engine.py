"""tinyfleet's engine: a Flower ``Grid`` over emulated devices, with a virtual clock.

``FleetGrid`` implements flwr's ``Grid`` so that an unmodified ``ServerApp`` (any
message-based strategy, or a user's own ``main``) drives a fleet whose ``ClientApp``s run
in the driver process or in long-lived Ray actors (``sim.executor``).

Time. Every ``send_and_receive`` starts at the clock's current instant ``t0``. For each
message the engine measures the serialized instruction and reply (Flower's protobuf form,
metadata included) and computes, from the device profile,

- downlink ``latency + bytes_down / downlink``, then compute, then uplink
  ``latency + bytes_up / uplink``;
- compute is what the reply's ``compute-s`` metric says (the project's ClientApp reports
  exact per-layer figures), else the measured host time scaled by the ratio of host to
  device FP32 throughput, calibrated once at start.

It stamps the reply's ``created_at`` (the instant the device finished computing) and
``delivered_at`` (the instant the server received it) with emulated instants, delivers
replies in emulated-time order, and advances the clock to the last delivery, or to
``t0 + timeout`` when some replies were later than the timeout. ``timeout`` is in emulated
seconds: Flower strategies' default of 3600 s thus means "replies within an emulated hour";
later replies are not delivered and count as stragglers. A device that goes offline (by
the availability trace) before its reply is delivered is a dropout: no reply.

Determinism. Node ids, message ids and each task's RNG seed derive from the run seed, the
round (``group_id``), the node and the message type; replies are ordered by emulated
finish time, then node id. The result is the same whatever the number of actors and the
order they finish in, as long as compute times come from the cost model (host-timed
compute is only as repeatable as the host).
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.node_pb2 import NodeInfo
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run, RunStatus
from flwr.supercore.task_identity import TaskIdentity

from devices.profiles import DeviceProfile, load_profile
from sim.availability import AlwaysOnline, Availability
from sim.clock import VirtualClock, iso_instant
from sim.executor import (
    LocalExecutor,
    Task,
    deserialize_context,
    deserialize_message,
    serialize_context,
    serialize_message,
)
from sim.store import NodeStore

__all__ = ["DeviceSlot", "FleetGrid", "ReplyRecord", "calibrate_host_macs_per_s"]

log = logging.getLogger("tinyfleet")

NODE_ID_BASE = 1_000_000


@dataclass(frozen=True)
class DeviceSlot:
    """What an idle device costs the engine: its ids and a reference to its profile."""

    node_id: int
    partition_id: int
    profile: DeviceProfile
    link_factor: float = 1.0  # this device's link bandwidth relative to its profile's


@dataclass
class ReplyRecord:
    """The engine's ledger row for one message to one device."""

    group_id: str
    message_type: str
    node_id: int
    partition_id: int
    device: str
    device_class: str
    status: str
    start_s: float
    finish_s: float
    compute_s: float
    down_s: float
    up_s: float
    compute_energy_j: float
    comm_energy_j: float
    peak_mem_bytes: int
    bytes_down: int
    bytes_up: int
    payload_down: int
    payload_up: int
    host_s: float
    error: str = ""

    @property
    def comm_s(self) -> float:
        """Time on the link, both ways."""
        return self.down_s + self.up_s

    @property
    def energy_j(self) -> float:
        """Compute plus radio energy of this message."""
        return self.compute_energy_j + self.comm_energy_j


@dataclass
class CallSpan:
    """One ``send_and_receive``: its group (round), message type and emulated span."""

    group_id: str
    message_type: str
    start_s: float
    end_s: float
    actors_lost: int = 0


def calibrate_host_macs_per_s(n: int = 256, repeats: int = 20) -> float:
    """Sustained FP32 MACs/s of this host on one thread (a square matmul), measured once."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        t0 = time.perf_counter()
        for _ in range(repeats):
            a @ b
        dt = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    return n**3 * repeats / dt


def _payload_bytes(msg: Message) -> int:
    if not msg.has_content():
        return 0
    return int(sum(r.count_bytes() for r in msg.content.values()))


def _stable_seed(*parts: object) -> int:
    h = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


@dataclass
class _Pending:
    message: Message
    bytes_down: int
    payload_down: int
    start_s: float
    data: bytes = b""


@dataclass
class FleetState:
    """Mutable per-run state the engine exposes to callers (results, progress)."""

    records: list[ReplyRecord] = field(default_factory=list)
    spans: list[CallSpan] = field(default_factory=list)


class FleetGrid(Grid):
    """A Flower ``Grid`` whose nodes are emulated devices (see the module docstring).

    Parameters
    ----------
    client_app : ClientApp
        The app every node runs (unmodified Flower ``ClientApp``).
    slots : list[DeviceSlot]
        The fleet.
    seed : int
        Run seed (node sampling, per-task RNG seeds, message ids).
    run_config : dict
        Flower run config the nodes see in ``Context.run_config``.
    executor : object, optional
        ``LocalExecutor`` (default) or ``RayExecutor``.
    availability : Availability, optional
        When devices are online (default: always).
    host_macs_per_s : float, optional
        Host FP32 throughput for apps that report no compute time (measured if needed).
    validate_replies : bool
        Reject non-finite replies and replies larger than ``max_update_factor`` times the
        instruction's payload before any strategy sees them.
    on_progress : callable, optional
        Called after each ``send_and_receive`` with the grid.
    """

    def __init__(
        self,
        client_app: ClientApp,
        slots: list[DeviceSlot],
        *,
        seed: int = 0,
        run_config: Mapping[str, Any] | None = None,
        executor: Any = None,
        availability: Availability | None = None,
        host_macs_per_s: float | None = None,
        on_progress: Callable[[FleetGrid], None] | None = None,
        run_id: int | None = None,
        validate_replies: bool = True,
        max_update_factor: float = 4.0,
        store: NodeStore | None = None,
    ) -> None:
        self.client_app = client_app
        self.slots = {s.node_id: s for s in slots}
        self.seed = seed
        self.run_config = dict(run_config or {})
        self.executor = executor or LocalExecutor(client_app)
        self.availability = availability or AlwaysOnline()
        self.clock = VirtualClock()
        self.state = FleetState()
        self.on_progress = on_progress
        self.validate_replies = validate_replies
        self.max_update_factor = max_update_factor
        self._host_macs = host_macs_per_s
        self._run_id = run_id if run_id is not None else _stable_seed(seed, "run") % (2**31)
        self._run: Run | None = None
        self.store = store or NodeStore()
        self._pending: dict[str, _Pending] = {}
        self._inbox: dict[str, tuple[float, int, Message]] = {}
        self._msg_counter = 0
        self._lost = 0
        self._max_down = 0
        self._idle_polls = 0

    # ------------------------------------------------------------------ Grid API

    def set_run(self, run: Run) -> None:
        if not isinstance(run, Run):
            raise TypeError(f"`run` must be an instance of Run, got {type(run).__name__}")
        self._run = run

    @property
    def run(self) -> Run:
        if self._run is None:
            self._run = _make_run(self._run_id, self.run_config)
        return Run(**vars(self._run))

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
        """The nodes online at the current emulated instant.

        Flower's node sampling polls this (sleeping a wall second between polls) until
        enough nodes are online; a strategy's round start polls it twice (once to size
        the sample, once in ``sample_nodes``). A third poll at the same instant with
        nothing sent in between means the caller is waiting: the clock advances to the
        next availability event instead, so the wait costs emulated time, never a hang.
        """
        self._idle_polls += 1
        if self._idle_polls >= 3:
            nxt = self.availability.next_change(self.clock.now)
            if nxt is not None:
                self.clock.advance_to(nxt)
                self._idle_polls = 1
        now = self.clock.now
        return [n for n, s in self.slots.items()
                if self.availability.online(s.partition_id, now)]

    def get_nodes(self) -> Iterable[NodeInfo]:
        return [NodeInfo(node_id=n) for n in self.get_node_ids()]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Stamp ids and the emulated send instant, serialize, and queue for execution."""
        self._idle_polls = 0
        ids = []
        for msg in messages:
            md = msg.metadata
            if md.dst_node_id not in self.slots:
                raise ValueError(f"push_messages: unknown dst_node_id {md.dst_node_id}")
            if md.reply_to_message_id or md.ttl <= 0:
                raise ValueError(f"push_messages: invalid instruction message {md}")
            self._msg_counter += 1
            mid = str(uuid.UUID(int=_stable_seed(self.seed, "msg", self._msg_counter)
                                | (1 << 127)))
            md.__dict__["_message_id"] = mid
            md.created_at = self.clock.now
            md.__dict__["_run_id"] = self.run.run_id
            md.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
            data = serialize_message(msg)
            self._pending[mid] = _Pending(msg, len(data), _payload_bytes(msg), self.clock.now,
                                          data)
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Return the replies delivered by now, in emulated-time order.

        This is the asynchronous path (FedBuff-style strategies push and pull): pending
        instructions for these ids execute from the instant they were pushed; replies
        whose delivery lies in the emulated future wait in an inbox. If none of the ids
        has a reply delivered yet, the clock advances to the earliest delivery among
        them, so a pull never returns empty while work is outstanding.
        """
        ids = list(message_ids)
        todo = [i for i in ids if i in self._pending]
        if todo:
            for mid, rec, finish, reply in self._run_tasks(todo):
                self.state.records.append(rec)
                if rec.status not in ("dropout", "hang"):
                    self._inbox[mid] = (finish, rec.node_id, reply)
        waiting = [i for i in ids if i in self._inbox]
        if not waiting:
            return []
        t_prev = self.clock.now
        if all(self._inbox[i][0] > self.clock.now for i in waiting):
            self.clock.advance_to(min(self._inbox[i][0] for i in waiting))
        ready = sorted((self._inbox[i] for i in waiting if self._inbox[i][0] <= self.clock.now),
                       key=lambda d: (d[0], d[1]))
        for i in waiting:
            if self._inbox[i][0] <= self.clock.now:
                del self._inbox[i]
        if ready:
            last = ready[-1][2]
            self.state.spans.append(CallSpan(_round_id(last), last.metadata.message_type,
                                             t_prev, self.clock.now, self._lost))
            self._lost = 0
            if self.on_progress is not None:
                self.on_progress(self)
        return [d[2] for d in ready]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push, execute and return the replies in emulated-time order.

        ``timeout`` is in emulated seconds from the send instant (see the module
        docstring); ``None`` waits for every reply.
        """
        ids = list(self.push_messages(messages))
        if not ids:
            return []
        return self._execute(ids, timeout=timeout)

    # ------------------------------------------------------------------ engine

    def _context_bytes(self, slot: DeviceSlot) -> bytes:
        """The node's ``Context`` (rebuilt around its stored state) as bytes."""
        state = self.store.get(slot.node_id)
        ctx = Context(
            run_id=self.run.run_id,
            node_id=slot.node_id,
            node_config={
                "partition-id": slot.partition_id,
                "num-partitions": len(self.slots),
                "device": slot.profile.name,
            },
            state=_state_from_bytes(state) if state else RecordDict(),
            run_config=self.run_config,
        )
        return serialize_context(ctx)

    def _host_ratio(self, profile: DeviceProfile) -> float:
        if self._host_macs is None:
            self._host_macs = calibrate_host_macs_per_s()
        return self._host_macs / profile.macs_per_s["fp32"]

    def _run_tasks(self, ids: list[str]) -> list[tuple[str, ReplyRecord, float, Message]]:
        """Execute pending instructions; account each from the instant it was pushed."""
        tasks = []
        for mid in ids:
            p = self._pending[mid]
            slot = self.slots[p.message.metadata.dst_node_id]
            md = p.message.metadata
            seed = _stable_seed(self.seed, _round_id(p.message), md.message_type,
                                slot.node_id)
            tasks.append(Task(slot.node_id, p.data or serialize_message(p.message),
                              self._context_bytes(slot), seed))
        lost = int(getattr(self.executor, "replaced", 0))
        results = self.executor.run(tasks)
        self._lost += int(getattr(self.executor, "replaced", 0)) - lost
        out = []
        for mid, res in zip(ids, results, strict=True):
            p = self._pending.pop(mid)
            slot = self.slots[res.node_id]
            reply = deserialize_message(res.reply)
            self.store.put(slot.node_id, _state_bytes(res.context))
            t0 = p.start_s
            rec, finish = self._account(slot, p, reply, len(res.reply), res.host_s, t0)
            checked, problem = self._validate(p, reply, len(res.reply))
            if problem:
                md = checked.metadata
                md.created_at = reply.metadata.created_at
                md.delivered_at = reply.metadata.delivered_at
                md.ttl = reply.metadata.ttl
                rec.status, rec.error, reply = problem, checked.error.reason, checked
            deadline = _config_value(p.message, "deadline-s")
            if not self.availability.online(slot.partition_id, t0) or (
                self.availability.online_until(slot.partition_id, t0) < finish
            ):
                rec.status = "dropout"
            elif not np.isfinite(finish):
                rec.status = "hang"  # the device never finishes: nothing is delivered
            elif rec.status == "ok" and deadline is not None and finish - t0 > deadline:
                rec.status = "straggler"
            out.append((mid, rec, finish, reply))
        return out

    def _execute(self, ids: list[str], timeout: float | None) -> list[Message]:
        """The synchronous path: run all, deliver those within ``timeout``, in order."""
        t0 = self.clock.now
        delivered: list[tuple[float, int, Message]] = []
        group, mtype = "", ""
        finishes = []
        for _, rec, finish, reply in self._run_tasks(ids):
            group, mtype = rec.group_id, rec.message_type
            finishes.append(finish)
            if (rec.status not in ("dropout", "hang") and timeout is not None
                    and finish - t0 > timeout):
                rec.status = "timeout"
            self.state.records.append(rec)
            if rec.status not in ("dropout", "timeout", "hang"):
                delivered.append((finish, rec.node_id, reply))
        delivered.sort(key=lambda d: (d[0], d[1]))
        end = max((d[0] for d in delivered), default=t0)
        if timeout is not None and len(delivered) < len(ids):
            end = t0 + timeout
        elif len(delivered) < len(ids):
            end = max(end, *(f for f in finishes if np.isfinite(f)))
        self.clock.advance_to(end)
        self.state.spans.append(CallSpan(group, mtype, t0, self.clock.now, self._lost))
        self._lost = 0
        if self.on_progress is not None:
            self.on_progress(self)
        return [d[2] for d in delivered]

    def _validate(self, pending: _Pending, reply: Message, reply_bytes: int
                  ) -> tuple[Message, str]:
        """Reject a reply whose arrays are non-finite or far larger than what was sent.

        Such a reply becomes the node's error reply (status ``nonfinite`` or
        ``oversize``), so that no strategy, however written, aggregates it.
        """
        if not self.validate_replies or reply.has_error() or not reply.has_content():
            return reply, ""
        # Relative to the largest instruction of the run: a compressed downlink must not
        # make an honest full-size reply look oversized.
        self._max_down = max(self._max_down, pending.payload_down)
        limit = self.max_update_factor * max(self._max_down, 1) + 65536
        if _payload_bytes(reply) > limit:
            reason = (f"rejected: the reply's payload is {_payload_bytes(reply)} bytes, more "
                      f"than {self.max_update_factor}x the {self._max_down} bytes of the "
                      "largest instruction")
            return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason),
                           reply_to=pending.message), "oversize"
        for rec in reply.content.array_records.values():
            for key, arr in rec.items():
                a = arr.numpy()
                if a.dtype.kind in "fc" and not np.isfinite(a).all():
                    reason = f"rejected: array {key!r} of the reply holds non-finite values"
                    return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason),
                                   reply_to=pending.message), "nonfinite"
        return reply, ""

    def _account(
        self,
        slot: DeviceSlot,
        pending: _Pending,
        reply: Message,
        reply_bytes: int,
        host_s: float,
        t0: float,
    ) -> tuple[ReplyRecord, float]:
        prof = slot.profile
        metrics: Mapping[str, Any] = {}
        if reply.has_content():
            for rec in reply.content.metric_records.values():
                metrics = rec
                break
        if reply.has_error():
            # A failed task reports nothing: count no compute (the project's ClientApp
            # fails its budget check before training starts).
            compute_s, compute_j = 0.0, 0.0
        elif "compute-s" in metrics:
            compute_s = float(metrics["compute-s"])
            compute_j = float(metrics.get("energy-j", compute_s * prof.power_compute_w))
        else:
            compute_s = host_s * self._host_ratio(prof)
            compute_j = compute_s * prof.power_compute_w
        down_s = prof.latency_s + pending.bytes_down / (
            prof.downlink_bytes_per_s * slot.link_factor)
        up_s = prof.latency_s + reply_bytes / (prof.uplink_bytes_per_s * slot.link_factor)
        created = t0 + down_s + compute_s
        finish = created + up_s
        reply.metadata.created_at = created
        # A device that never finishes (a hang) has no delivery instant.
        reply.metadata.delivered_at = iso_instant(finish) if np.isfinite(finish) else ""
        reply.metadata.ttl = max(pending.message.metadata.ttl - (created - t0), 1e-9)
        status = "error" if reply.has_error() else "ok"
        error = reply.error.reason if reply.has_error() else ""
        rec = ReplyRecord(
            group_id=_round_id(pending.message),
            message_type=pending.message.metadata.message_type,
            node_id=slot.node_id,
            partition_id=slot.partition_id,
            device=prof.name,
            device_class=prof.device_class,
            status=status,
            start_s=t0,
            finish_s=finish,
            compute_s=compute_s,
            down_s=down_s,
            up_s=up_s,
            compute_energy_j=compute_j,
            comm_energy_j=prof.power_radio_w * (down_s + up_s - 2 * prof.latency_s),
            peak_mem_bytes=int(metrics.get("peak-mem-bytes", 0)),
            bytes_down=pending.bytes_down,
            bytes_up=reply_bytes,
            payload_down=pending.payload_down,
            payload_up=_payload_bytes(reply),
            host_s=host_s,
            error=error,
        )
        return rec, finish

    def shutdown(self) -> None:
        """Release the executor."""
        self.executor.shutdown()

    # ------------------------------------------------------------------ selection hook

    def device_of(self, node_id: int) -> DeviceProfile:
        """The profile of a node: strategies may read it to select devices."""
        return self.slots[node_id].profile

    def online_until(self, node_id: int) -> float:
        """Until when (emulated seconds) a node stays online from now."""
        slot = self.slots[node_id]
        return self.availability.online_until(slot.partition_id, self.clock.now)


def _state_bytes(context_bytes: bytes) -> bytes:
    """Only the ``state`` of a serialized Context (the rest is rebuilt per task)."""
    ctx = deserialize_context(context_bytes)
    if not ctx.state:
        return b""
    return bytes(recorddict_to_proto(ctx.state).SerializeToString())


def _state_from_bytes(data: bytes) -> RecordDict:
    proto = ProtoRecordDict()
    proto.ParseFromString(data)
    return recorddict_from_proto(proto)


def _round_id(msg: Message) -> str:
    """The round a message belongs to: its ``group_id``, else Flower strategies'
    ``server-round`` config entry."""
    if msg.metadata.group_id:
        return msg.metadata.group_id
    value = _config_value(msg, "server-round")
    return "" if value is None else str(int(value))


def _config_value(msg: Message, key: str) -> float | None:
    if not msg.has_content():
        return None
    for rec in msg.content.config_records.values():
        if key in rec:
            return float(rec[key])  # type: ignore[arg-type]
    return None


def _make_run(run_id: int, run_config: Mapping[str, Any]) -> Run:
    return Run(
        run_id=run_id,
        fab_id="tinyfleet",
        fab_version="",
        fab_hash="",
        override_config=dict(run_config),
        pending_at="",
        starting_at="",
        running_at="",
        finished_at="",
        status=RunStatus(status="running", sub_status="", details=""),
        flwr_aid="",
        federation_id="",
        primary_task_id=None,
        bytes_sent=0,
        bytes_recv=0,
        clientapp_runtime=0.0,
    )


def make_slots(profiles: list[str], seed: int, link_spread: float = 0.0) -> list[DeviceSlot]:
    """One slot per device, profiles loaded once and shared by reference.

    ``link_spread`` is the sigma of a log-normal factor (median 1) on each device's link
    bandwidth, drawn from ``(seed, device)``: radios of one model still see different
    signal quality, so devices of one profile do not all finish at the same instant.
    """
    cache: dict[str, DeviceProfile] = {}
    factors = np.ones(len(profiles))
    if link_spread > 0:
        factors = np.exp(np.random.default_rng([seed, 5]).normal(0, link_spread, len(profiles)))
    slots = []
    for i, name in enumerate(profiles):
        prof = cache.get(name) or cache.setdefault(name, load_profile(name))
        slots.append(DeviceSlot(NODE_ID_BASE + i, i, prof, float(factors[i])))
    return slots


def run_server_app(
    server_app: ServerApp, grid: FleetGrid, run_config: Mapping[str, Any], seed: int
) -> Context:
    """Run a ``ServerApp`` against ``grid`` in this thread; returns the server context."""
    random.seed(seed)  # Flower samples nodes with the global ``random``
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = grid.run.run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    ctx = Context(
        run_id=grid.run.run_id,
        node_id=SUPERLINK_NODE_ID,
        node_config={},
        state=RecordDict(),
        run_config=dict(run_config),
    )
    grid.set_run(grid.run)
    # Flower's strategies sample nodes with the module-global ``random``, which Ray's
    # driver threads also draw from: give them a private generator seeded from the run.
    from flwr.serverapp.strategy import strategy_utils

    saved = strategy_utils.random
    strategy_utils.random = random.Random(seed)  # type: ignore[assignment]
    try:
        server_app(grid=grid, context=ctx)
    finally:
        strategy_utils.random = saved
    return ctx
