"""Round deadlines: replies that finish after the deadline are dropped as stragglers.

The wrapper reads time from the messages alone, so it behaves the same in simulation and
on real devices: a round starts at the ``created_at`` of the instruction messages it sent
(the engine stamps its emulated clock there; Flower stamps wall time), and a reply
finishes at its ``delivered_at`` (when the server received it; ``created_at`` of the reply
if the transport leaves it empty). It also writes ``deadline-s`` into the train config it
sends, so that a device (or the engine) can tell a hopeless training from a useful one.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from strategies.wrapper import StrategyWrapper

__all__ = ["DeadlineStrategy", "reply_finish_time"]


def reply_finish_time(reply: Message) -> float:
    """When the server received ``reply`` (seconds since the epoch, emulated or real)."""
    delivered = reply.metadata.delivered_at
    if delivered:
        try:
            return datetime.fromisoformat(delivered).timestamp()
        except ValueError:
            pass
    return float(reply.metadata.created_at)


class DeadlineStrategy(StrategyWrapper):
    """Drop training replies that arrive later than ``deadline_s`` after the round began.

    Parameters
    ----------
    inner : Strategy
        Any message-based Flower strategy (FedAvg, FedProx, FedAdam, a user's).
    deadline_s : float
        The round deadline in seconds (emulated seconds in simulation).

    Attributes
    ----------
    stragglers : dict[int, list[int]]
        Per round, the node ids whose replies were dropped.
    """

    def __init__(self, inner: Strategy, deadline_s: float) -> None:
        super().__init__(inner)
        if not deadline_s > 0:
            raise ValueError(f"deadline_s: expected a number > 0, got {deadline_s!r}")
        self.deadline_s = float(deadline_s)
        self.stragglers: dict[int, list[int]] = {}
        self._sent: dict[str, float] = {}
        self._pending: list[Message] = []

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config["deadline-s"] = self.deadline_s
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        # Message ids and timestamps are assigned when the grid pushes the messages;
        # keep the objects and read both when the replies come back.
        self._pending = messages
        return messages

    def _round_start(self, reply: Message) -> float | None:
        if not self._sent:
            self._sent = {m.metadata.message_id: m.metadata.created_at for m in self._pending}
        return self._sent.get(reply.metadata.reply_to_message_id)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        kept, late = [], []
        starts = [m.metadata.created_at for m in self._pending]
        fallback = min(starts) if starts else None
        for reply in replies:
            start = self._round_start(reply)
            start = fallback if start is None else start
            if start is not None and reply_finish_time(reply) - start > self.deadline_s:
                late.append(reply.metadata.src_node_id)
            else:
                kept.append(reply)
        self._sent, self._pending = {}, []
        self.stragglers[server_round] = late
        arrays, metrics = (None, None)
        if kept:
            arrays, metrics = self.inner.aggregate_train(server_round, kept)
        metrics = MetricRecord() if metrics is None else metrics
        metrics["stragglers"] = len(late)
        return arrays, metrics

    def summary(self) -> None:
        print(f"\tDeadlineStrategy: deadline {self.deadline_s:g} s around:")
        self.inner.summary()
