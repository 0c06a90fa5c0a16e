"""Fault injection: clients that raise, hang, send NaN or oversized updates; lost actors.

Configured in a ``[faults]`` table::

    [faults]
    raise_rate = 0.1      # share of trainings whose ClientApp raises
    hang_rate = 0.05      # share that never reply (their device hangs)
    nan_rate = 0.05       # share that reply with non-finite arrays
    oversize_rate = 0.05  # share that reply with an update far larger than the model
    kill_actor_round = 3  # in this round, one Ray worker process is killed mid-batch
    hang_wall_s = 0.2     # wall seconds a hanging client blocks its worker

Which task fails is a pure function of the run seed, the round and the node, so a faulty
run is as reproducible as a clean one. The faults wrap any ClientApp (they are applied by
the engine's executor around the app call, like a Flower mod).

How each fault surfaces: a raise is the node's error reply; a hang is a reply whose
device compute never ends (``compute-s`` infinite), so the engine never delivers it and
the round completes at its timeout with the others; NaN and oversized replies are
rejected by the engine before any strategy sees them; a killed actor is replaced and its
batch runs again.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord

from devices.errors import ConfigError

__all__ = ["FaultSpec", "apply_faults"]


@dataclass(frozen=True)
class FaultSpec:
    """What faults to inject (all rates in [0, 1])."""

    raise_rate: float = 0.0
    hang_rate: float = 0.0
    nan_rate: float = 0.0
    oversize_rate: float = 0.0
    kill_actor_round: int = 0
    hang_wall_s: float = 0.2
    marker_dir: str = ""

    def __post_init__(self) -> None:
        rates = [self.raise_rate, self.hang_rate, self.nan_rate, self.oversize_rate]
        for f in ("raise_rate", "hang_rate", "nan_rate", "oversize_rate"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 1:
                raise ConfigError(f"faults.{f}: expected a number in [0, 1], got {v!r}")
        if sum(rates) > 1:
            raise ConfigError(f"faults: the rates add up to {sum(rates)}, more than 1")
        if self.kill_actor_round < 0 or self.hang_wall_s < 0:
            raise ConfigError("faults.kill_actor_round and faults.hang_wall_s: expected >= 0")

    @classmethod
    def from_table(cls, table: Mapping[str, Any] | None) -> FaultSpec:
        """Build from the config's ``[faults]`` table, naming unknown fields."""
        from clients.spec import build_dataclass

        spec: FaultSpec = build_dataclass(cls, table, "faults")
        return spec

    @property
    def active(self) -> bool:
        """Whether any fault is configured."""
        return bool(self.raise_rate or self.hang_rate or self.nan_rate or self.oversize_rate
                    or self.kill_actor_round)


def _draw(seed: int, rnd: str, node: int) -> float:
    h = hashlib.sha256(f"fault:{seed}:{rnd}:{node}".encode()).digest()
    return int.from_bytes(h[:8], "little") / 2**64


def apply_faults(
    spec: FaultSpec,
    seed: int,
    msg: Message,
    ctx: Context,
    call_next: Callable[[Message, Context], Message],
) -> Message:
    """Run ``call_next`` with this task's fault, if it drew one (train messages only)."""
    if msg.metadata.message_type != "train" or not spec.active:
        return call_next(msg, ctx)
    rnd = msg.metadata.group_id or str(msg.content.config_records.get("config", {}).get(
        "server-round", ""))
    node = int(msg.metadata.dst_node_id)
    if spec.kill_actor_round and rnd == str(spec.kill_actor_round) and spec.marker_dir:
        _maybe_kill_worker(Path(spec.marker_dir), rnd)
    u = _draw(seed, rnd, node)
    edges = np.cumsum([spec.raise_rate, spec.hang_rate, spec.nan_rate, spec.oversize_rate])
    if u < edges[0]:
        raise RuntimeError("injected fault: the client raised mid-training")
    if u < edges[1]:
        time.sleep(spec.hang_wall_s)
        reply = call_next(msg, ctx)
        _metrics(reply)["compute-s"] = float("inf")
        return reply
    reply = call_next(msg, ctx)
    if u < edges[2]:
        _corrupt(reply, lambda a: np.full_like(a, np.nan) if a.dtype.kind == "f" else a)
    elif u < edges[3]:
        rec = next(iter(reply.content.array_records.values()))
        size = sum(v.numpy().size for v in rec.values())
        rec["injected-oversize"] = Array(np.zeros(16 * max(size, 1), dtype=np.float32))
    return reply


def _metrics(reply: Message) -> MetricRecord:
    recs = reply.content.metric_records
    if recs:
        return next(iter(recs.values()))
    rec = MetricRecord()
    reply.content["metrics"] = rec
    return rec


def _corrupt(reply: Message, fn: Callable[[np.ndarray], np.ndarray]) -> None:
    for key, rec in list(reply.content.array_records.items()):
        reply.content[key] = ArrayRecord({k: Array(fn(v.numpy())) for k, v in rec.items()})


def _maybe_kill_worker(marker_dir: Path, rnd: str) -> None:
    """Kill this worker process once per run (only inside a Ray actor)."""
    if not os.environ.get("TINYFLEET_IN_ACTOR"):
        return
    marker_dir.mkdir(parents=True, exist_ok=True)
    marker = marker_dir / f"killed-round-{rnd}"
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    os._exit(1)
