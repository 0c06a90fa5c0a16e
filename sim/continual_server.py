"""tinyfleet's continual-learning ``ServerApp``: FedAvg over devices' streams, per-task metrics.

The runner picks this app (and :mod:`clients.continual_app`) when a config has a
``[continual]`` table. The strategy is the project's own (``sim.server_app.make_strategy``:
FedAvg, deadlines, over-commitment) with :class:`FisherSharing` slid in directly around
the innermost Flower strategy, so that only the replies which really reach the aggregate
contribute their Fisher.

Evaluation. After every round (and on the initial model, round 0) the global model is
evaluated centrally on each task the fleet has reached so far
(``StreamSchedule.tasks_reached`` over all devices): the held-out test set filtered and
transformed to that task (``make_task_data``, one fixed noise realisation). The per-round
rows of that matrix ``R`` (``NaN`` for tasks not reached) give, per round:

``acc_task_<j>``
    accuracy on task ``j`` (empty before the fleet reaches it);
``avg_acc`` (also ``accuracy``)
    mean over the reached tasks;
``forgetting``
    Chaudhry et al.'s forgetting on the rounds so far: for each reached task but the
    newest, the best accuracy it had in an earlier round minus its accuracy now;
``bwt``
    backward transfer over the tasks the fleet has moved past: for each task ``j`` the
    median device has left, accuracy now minus accuracy in the last round in which the
    median device was on it. Devices switch at different rounds; the first device's
    switch would catch a task half-learned, the last device's after the others had
    already forgotten it, so the median device's marks the fleet's task boundary;
``tasks_seen``
    how many tasks the fleet has reached.

They go to ``sim.results`` as extra ``rounds.csv`` columns. With ``tinyfleet.out`` set the
app also writes ``continual.png`` (per-task accuracy over rounds) and
``continual_devices.csv`` (one row per aggregated train reply: round, device, task,
replay size and capacity, state bytes, extra work) into that folder.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from clients.client_app import build_training_model, fleet_data
from clients.continual import (
    StreamSchedule,
    aggregate_fisher,
    average_accuracy,
    backward_transfer,
    forgetting,
    make_task_data,
)
from clients.continual_app import FISHER_PREFIX, FLEET_FISHER_KEY, continual_of
from clients.training import evaluate_model
from devices.errors import DataError, PayloadError
from sim import results
from sim.server_app import config_from_run_config, make_strategy
from strategies.wrapper import StrategyWrapper

__all__ = [
    "DEVICE_ROW_KEYS",
    "FisherSharing",
    "app",
    "fleet_metrics",
    "median_task",
    "with_fisher_sharing",
    "write_continual_plot",
]

log = logging.getLogger("tinyfleet")

app = ServerApp()

DEVICE_ROW_KEYS = ("partition-id", "task", "num-examples", "replay-size", "replay-capacity",
                   "replayed-examples", "state-bytes", "fisher-examples", "teacher-examples",
                   "peak-mem-bytes", "compute-s")
"""Reply metrics copied into ``continual_devices.csv`` (beside ``round`` and ``node_id``)."""


class FisherSharing(StrategyWrapper):
    """Strip each reply's Fisher before aggregation, average them, send the mean back.

    A reply's ``arrays`` may hold, beside the model, arrays named ``FISHER_PREFIX + param``
    (``clients.continual_app``). They are removed before the inner strategy sees the reply,
    so it aggregates the model alone; the Fishers of the round are averaged weighted by
    each reply's ``fisher-examples`` (``aggregate_fisher``), and the mean goes to every
    device trained the next round as the ``fleet-fisher`` ``ArrayRecord`` of its message.
    A round without Fishers keeps the previous mean. Each aggregated reply's continual
    metrics are kept in :attr:`rows`.
    """

    def __init__(self, inner: Strategy) -> None:
        super().__init__(inner)
        self.fisher: dict[str, np.ndarray] | None = None
        self.rows: list[dict[str, Any]] = []

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        if self.fisher is not None:
            for m in messages:
                m.content[FLEET_FISHER_KEY] = ArrayRecord(OrderedDict(
                    (k, Array(v)) for k, v in self.fisher.items()))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        fishers, weights = [], []
        for r in replies:
            if r.has_error() or "arrays" not in r.content.array_records:
                continue
            rec = r.content.array_records["arrays"]
            fisher = {k[len(FISHER_PREFIX):]: rec[k].numpy() for k in rec
                      if k.startswith(FISHER_PREFIX)}
            metrics = next(iter(r.content.metric_records.values()), MetricRecord())
            if fisher:
                r.content["arrays"] = ArrayRecord(OrderedDict(
                    (k, v) for k, v in rec.items() if not k.startswith(FISHER_PREFIX)))
                w = float(metrics.get("fisher-examples", 0))  # type: ignore[arg-type]
                finite = all(np.all(np.isfinite(v)) for v in fisher.values())
                if w > 0 and finite:
                    fishers.append(fisher)
                    weights.append(w)
            row: dict[str, Any] = {"round": server_round, "node_id": r.metadata.src_node_id}
            row.update({k: metrics[k] for k in DEVICE_ROW_KEYS if k in metrics})
            self.rows.append(row)
        if fishers:
            try:
                self.fisher = aggregate_fisher(fishers, weights)
            except PayloadError as exc:
                log.warning("round %d: Fishers not aggregated (%s)", server_round, exc)
        return self.inner.aggregate_train(server_round, replies)


def with_fisher_sharing(strategy: Strategy) -> tuple[Strategy, FisherSharing]:
    """``strategy`` with a :class:`FisherSharing` around its innermost Flower strategy."""
    if not isinstance(strategy, StrategyWrapper):
        sharing = FisherSharing(strategy)
        return sharing, sharing
    node = strategy
    while isinstance(node.inner, StrategyWrapper):
        node = node.inner
    sharing = FisherSharing(node.inner)
    node.inner = sharing
    return strategy, sharing


def fleet_metrics(matrix: np.ndarray, fleet_task: Sequence[int]) -> dict[str, float]:
    """Average accuracy, forgetting and BWT of the latest row of a per-round matrix.

    Parameters
    ----------
    matrix : numpy.ndarray
        ``(rounds so far, num_tasks)`` accuracies, ``NaN`` where a task was not reached.
    fleet_task : sequence of int
        Per row, the fleet's task (the median device's; non-decreasing): task ``j`` ends
        at the last row whose fleet task is at most ``j``.
    """
    m = np.asarray(matrix, dtype=np.float64)
    ft = np.asarray(fleet_task)
    if len(ft) != len(m) or np.any(np.diff(ft) < 0):
        raise DataError(f"fleet_task: expected {len(m)} non-decreasing task ids, got "
                        f"{list(ft)}")
    done = int(ft[-1])
    rows = [m[int(np.flatnonzero(ft <= j)[-1])] for j in range(done)] + [m[-1]]
    square = np.stack(rows)[:, :done + 1]
    return {"avg_acc": average_accuracy(m), "forgetting": forgetting(m),
            "bwt": backward_transfer(square) if done else 0.0}


def median_task(schedule: StreamSchedule, server_round: int, devices: Iterable[int]) -> int:
    """The task of the median device in ``server_round`` (the lower median)."""
    tasks = sorted(schedule.task_at(server_round, d) for d in devices)
    return tasks[(len(tasks) - 1) // 2]


def write_continual_plot(path: Path, rows: Sequence[Mapping[str, Any]], num_tasks: int) -> None:
    """``continual.png``: accuracy on each task and the average over rounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    rounds = [int(r["round"]) for r in rows]
    for j in range(num_tasks):
        acc = [float(r[f"acc_task_{j}"]) if r.get(f"acc_task_{j}", "") != "" else math.nan
               for r in rows]
        ax.plot(rounds, acc, marker=".", label=f"task {j}")
    ax.plot(rounds, [float(r["avg_acc"]) for r in rows], color="black", linestyle="--",
            linewidth=2, label="average")
    ax.set_xlabel("round")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("Accuracy per task over rounds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the configured strategy with Fisher sharing; evaluate per task every round."""
    cfg = config_from_run_config(context.run_config)
    schedule, _ = continual_of(context.run_config)
    run_key = str(context.run_config.get("tinyfleet.run-key", ""))
    out = context.run_config.get("tinyfleet.out")
    torch.manual_seed(cfg.seed)
    model = build_training_model(cfg.client)
    x_test, y_test = fleet_data(cfg.client).test_data()
    tests = [make_task_data(x_test, y_test, t, schedule) for t in range(schedule.num_tasks)]
    devices = range(cfg.client.fleet.size)
    acc_rows: list[np.ndarray] = []
    fleet_task: list[int] = []
    rows: list[dict[str, Any]] = []

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict(), strict=False)
        seen = schedule.tasks_reached(server_round, devices)
        acc = np.full(schedule.num_tasks, np.nan)
        losses = []
        for t in seen:
            if len(tests[t][0]):
                loss, acc[t] = evaluate_model(model, *tests[t])
                losses.append(loss)
        acc_rows.append(acc)
        fleet_task.append(median_task(schedule, server_round, devices))
        figs = fleet_metrics(np.stack(acc_rows), fleet_task)
        row: dict[str, Any] = {"round": server_round, "accuracy": figs["avg_acc"],
                               "loss": float(np.mean(losses)) if losses else math.nan}
        row.update({f"acc_task_{j}": float(a) if np.isfinite(a) else ""
                    for j, a in enumerate(acc)})
        row.update(figs)
        row["tasks_seen"] = len(seen)
        clock = getattr(grid, "clock", None)  # tinyfleet's engine: the emulated instant
        if clock is not None:
            row["clock_s"] = clock.now
        rows.append(row)
        results.publish(run_key, "eval", row)
        return MetricRecord({k: float(v) for k, v in row.items()
                             if isinstance(v, (int, float)) and k != "round"})

    strategy, sharing = with_fisher_sharing(make_strategy(cfg))
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=cfg.rounds,
        timeout=cfg.strategy.timeout_s,
        train_config=ConfigRecord(),
        evaluate_fn=evaluate_fn,
    )
    results.publish(run_key, "final", result.arrays)
    if out:
        out_dir = Path(str(out))
        write_continual_plot(out_dir / "continual.png", rows, schedule.num_tasks)
        results.write_csv(out_dir / "continual_devices.csv", sharing.rows,
                          ["round", "node_id", *DEVICE_ROW_KEYS])
        if not results.has_run(run_key):  # a real deployment: no runner writes rounds.csv
            results.write_csv(out_dir / "server_rounds.csv", rows, list(rows[0]))
