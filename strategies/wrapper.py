"""A Flower strategy that wraps another and delegates everything it does not change.

Wrappers compose (``Deadline(Compressed(FedAvg()))``): each overrides only the steps it
changes, and attribute look-ups fall through to the inner strategy, so code that reads
``strategy.fraction_train`` still works on the wrapped one.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

__all__ = ["StrategyWrapper"]


class StrategyWrapper(Strategy):
    """Delegate every step of a message-based strategy to ``inner``."""

    def __init__(self, inner: Strategy) -> None:
        if not isinstance(inner, Strategy):
            raise TypeError(
                f"inner: expected a flwr.serverapp.strategy.Strategy, got {type(inner).__name__}"
            )
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        # Only called when normal look-up fails: fall through to the wrapped strategy.
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.inner.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.inner.summary()
