"""FedBuff: buffered asynchronous aggregation (Nguyen et al., AISTATS 2022).

``concurrency`` devices train at any time, each on the model version it was sent. The
server pulls replies as they arrive and buffers their updates (reply minus the model the
device started from); when ``buffer_size`` updates are in, it applies their weighted
mean, ``w_i = num_examples_i * (1 + staleness_i) ** -staleness_exponent`` with staleness
the number of versions published since the device's model, scaled by ``server_lr``,
publishes a new version (one "round") and evaluates it. Freed devices get new work at once.

Time comes from the Grid alone: ``push_messages`` and ``pull_messages``. On tinyfleet's
engine a pull returns the replies delivered by the current emulated instant, advancing
the clock to the next delivery if none is; on Flower's deployment engine a pull returns
what has arrived, and the loop sleeps ``poll_interval_s`` of wall time between empty pulls.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result, strategy_utils
from flwr.supercore import log

__all__ = ["FedBuff", "staleness_weight"]


def staleness_weight(staleness: int, exponent: float) -> float:
    """FedBuff's polynomial staleness discount ``(1 + s) ** -exponent``."""
    return float((1.0 + staleness) ** -exponent)


class FedBuff(FedAvg):
    """Buffered asynchronous FedAvg (see the module docstring).

    Parameters
    ----------
    buffer_size : int
        Updates per published version.
    concurrency : int
        Devices training at once (0: ``fraction_train`` of the nodes online at start).
    server_lr : float
        Step size applied to the buffered mean update.
    staleness_exponent : float
        Exponent of the staleness discount (0.5 in the paper).
    max_staleness : int
        Updates staler than this are discarded (0: keep all).
    poll_interval_s : float
        Wall-clock sleep between empty pulls (real deployments only).
    **kwargs
        Passed to ``FedAvg`` (``fraction_train``, ``min_available_nodes``, ...).
    """

    def __init__(
        self,
        *,
        buffer_size: int = 10,
        concurrency: int = 0,
        server_lr: float = 1.0,
        staleness_exponent: float = 0.5,
        max_staleness: int = 0,
        poll_interval_s: float = 0.2,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if buffer_size < 1:
            raise ValueError(f"buffer_size: expected an integer >= 1, got {buffer_size}")
        self.buffer_size = buffer_size
        self.concurrency = concurrency
        self.server_lr = server_lr
        self.staleness_exponent = staleness_exponent
        self.max_staleness = max_staleness
        self.poll_interval_s = poll_interval_s
        self.staleness: list[int] = []

    def summary(self) -> None:
        log(INFO, "\t├──> FedBuff: buffer %s, concurrency %s, server lr %s, staleness^-%s",
            self.buffer_size, self.concurrency or "auto", self.server_lr,
            self.staleness_exponent)

    def start(  # noqa: C901 - one event loop, kept in one place on purpose
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Run until ``num_rounds`` versions are published."""
        del evaluate_config
        train_config = ConfigRecord() if train_config is None else train_config
        result = Result()
        arrays = initial_arrays
        version = 0
        if evaluate_fn:
            res = evaluate_fn(0, arrays)
            if res is not None:
                result.evaluate_metrics_serverapp[0] = res
        bases: dict[int, dict[str, np.ndarray]] = {0: _numpy(arrays)}
        inflight: dict[str, tuple[int, int]] = {}  # message id -> (node, version)
        buffer: list[tuple[dict[str, np.ndarray], float, Message]] = []
        online = list(grid.get_node_ids())
        concurrency = self.concurrency or max(1, int(len(online) * self.fraction_train))

        def dispatch(n: int) -> None:
            busy = {node for node, _ in inflight.values()}
            idle = [x for x in grid.get_node_ids() if x not in busy]
            if not idle or n <= 0:
                return
            nodes = strategy_utils.random.sample(idle, min(n, len(idle)))
            cfg = ConfigRecord(dict(train_config))
            cfg["server-round"] = version + 1
            content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: cfg})
            msgs = [Message(content, dst_node_id=x, message_type=MessageType.TRAIN,
                            group_id=str(version + 1)) for x in nodes]
            for mid, node in zip(grid.push_messages(msgs), nodes, strict=True):
                inflight[mid] = (node, version)

        dispatch(concurrency)
        idle_loops = 0
        while version < num_rounds:
            if not inflight:
                dispatch(concurrency)
                idle_loops += 1
                if idle_loops > 10_000:
                    raise RuntimeError("FedBuff: no node became available to train")
                continue
            replies = list(grid.pull_messages(list(inflight)))
            if not replies:
                time.sleep(self.poll_interval_s)
                continue
            for reply in replies:
                _, v = inflight.pop(reply.metadata.reply_to_message_id)
                if reply.has_error() or not reply.content.array_records:
                    continue
                stale = version - v
                if self.max_staleness and stale > self.max_staleness:
                    continue
                new = _numpy(next(iter(reply.content.array_records.values())))
                delta = {k: new[k] - bases[v][k] for k in new}
                if not all(np.isfinite(d).all() for d in delta.values()):
                    continue  # a non-finite update never reaches the model
                metrics = next(iter(reply.content.metric_records.values()), MetricRecord())
                n = float(metrics.get(self.weighted_by_key, 1.0))  # type: ignore[arg-type]
                w = n * staleness_weight(stale, self.staleness_exponent)
                buffer.append((delta, w, reply))
                self.staleness.append(stale)
                if len(buffer) >= self.buffer_size:
                    arrays = self._apply(arrays, buffer)
                    version += 1
                    bases[version] = _numpy(arrays)
                    train_metrics = self._metrics(buffer)
                    result.train_metrics_clientapp[version] = train_metrics
                    buffer = []
                    if evaluate_fn:
                        res = evaluate_fn(version, arrays)
                        if res is not None:
                            result.evaluate_metrics_serverapp[version] = res
                    if version >= num_rounds:
                        break
            live = {v for _, v in inflight.values()} | {version}
            for old in [k for k in bases if k not in live]:
                del bases[old]
            dispatch(concurrency - len(inflight))
        result.arrays = arrays
        return result

    def _apply(
        self, arrays: ArrayRecord, buffer: list[tuple[dict[str, np.ndarray], float, Message]]
    ) -> ArrayRecord:
        total = sum(w for _, w, _ in buffer)
        cur = _numpy(arrays)
        out = {}
        for k, v in cur.items():
            step = sum(d[k] * (w / total) for d, w, _ in buffer)
            out[k] = (v + self.server_lr * step).astype(v.dtype)
        return ArrayRecord({k: _array(v) for k, v in out.items()})

    def _metrics(self, buffer: list[tuple[dict[str, np.ndarray], float, Message]]) -> MetricRecord:
        rec = MetricRecord({"updates": len(buffer)})
        rec["mean-staleness"] = float(np.mean(self.staleness[-len(buffer):]))
        return rec


def _numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in arrays.items()}


def _array(v: np.ndarray) -> Any:
    from flwr.app import Array

    return Array(np.ascontiguousarray(v))
