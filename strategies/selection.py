"""Device selection: FedScale-style over-commitment around any FedAvg-family strategy.

``OverCommit`` asks the inner strategy to sample ``factor`` times as many devices as it
would (by scaling its ``fraction_train`` for that call), then aggregates only the first
``K`` replies to arrive (``K`` the original sample size), by ``delivered_at``. The slowest
devices' work is discarded, as in FedScale's 1.3x over-commitment, so a round ends when
the fastest ``K`` are in. On tinyfleet's engine, strategies can also read each node's
profile and availability through the grid (``grid.device_of(node_id)``,
``grid.online_until(node_id)``) for Oort-like selection of their own.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from strategies.deadline import reply_finish_time
from strategies.wrapper import StrategyWrapper

__all__ = ["OverCommit"]


class OverCommit(StrategyWrapper):
    """Sample ``factor`` times more devices; aggregate the fastest original count."""

    def __init__(self, inner: Strategy, factor: float = 1.3) -> None:
        super().__init__(inner)
        if not factor >= 1.0:
            raise ValueError(f"factor: expected a number >= 1, got {factor!r}")
        self._sampler = inner
        while isinstance(self._sampler, StrategyWrapper):
            self._sampler = self._sampler.inner  # the strategy that really samples
        if not hasattr(self._sampler, "fraction_train"):
            raise TypeError("OverCommit needs an inner strategy with a fraction_train")
        self.factor = float(factor)
        self._keep = 0
        self.discarded: dict[int, list[int]] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        sampler = self._sampler
        base = list(grid.get_node_ids())
        want = max(int(len(base) * sampler.fraction_train), sampler.min_train_nodes)
        saved = sampler.fraction_train
        sampler.fraction_train = min(1.0, saved * self.factor)
        try:
            messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        finally:
            sampler.fraction_train = saved
        self._keep = min(want, len(messages))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        ordered = sorted(replies, key=lambda r: (reply_finish_time(r), r.metadata.src_node_id))
        ok = [r for r in ordered if not r.has_error()]
        kept, late = ok[: self._keep], ok[self._keep :]
        self.discarded[server_round] = [r.metadata.src_node_id for r in late]
        arrays, metrics = self.inner.aggregate_train(server_round, kept) if kept else (None, None)
        metrics = MetricRecord() if metrics is None else metrics
        metrics["overcommit-discarded"] = len(late)
        return arrays, metrics
