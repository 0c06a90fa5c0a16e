"""tinyfleet's Flower ``ServerApp``: build the strategy from the config, run it, evaluate.

The app reads the experiment from Flower's run config (the flattened TOML document, see
``clients.spec``), so it runs unchanged under tinyfleet's engine, Flower's simulation and
``flwr run`` on a real SuperLink. It evaluates the global model centrally on the held-out
test set before training and after every round, and publishes those figures (and the
final model) to ``sim.results``' in-process registry under the run key the runner sets;
without one (a real deployment) it writes ``server_rounds.csv`` into ``tinyfleet.out``.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Strategy

from clients.client_app import build_training_model, fleet_data
from clients.spec import expand_run_config, unflatten
from clients.training import evaluate_model
from sim import results
from sim.config import ExperimentConfig, from_doc
from strategies.compressed import CompressedStrategy
from strategies.deadline import DeadlineStrategy
from strategies.selection import OverCommit

__all__ = ["app", "config_from_run_config", "make_strategy"]

log = logging.getLogger("tinyfleet")

app = ServerApp()

_RUNNER_KEYS = "tinyfleet"


def config_from_run_config(run_config: Mapping[str, Any]) -> ExperimentConfig:
    """The experiment a run config carries (runner-only ``tinyfleet.*`` keys dropped)."""
    doc = unflatten({k: v for k, v in expand_run_config(run_config).items()
                     if not k.startswith(_RUNNER_KEYS + ".")})
    return from_doc(doc)


def make_strategy(cfg: ExperimentConfig) -> Strategy:
    """The configured Flower strategy, wrapped for deadlines when one is set."""
    s = cfg.strategy
    common: dict[str, Any] = {
        "fraction_train": s.fraction_train,
        "fraction_evaluate": s.fraction_evaluate,
        "min_available_nodes": s.min_available,
        "min_train_nodes": s.min_train,
        "min_evaluate_nodes": 1,
    }
    common.update(s.args)
    strategy: Strategy
    if s.name == "fedprox":
        common.setdefault("proximal_mu", cfg.client.train.proximal_mu or 0.01)
        strategy = FedProx(**common)
    elif s.name == "fedadam":
        strategy = FedAdam(**common)
    elif s.name == "fedbuff":
        from strategies.fedbuff import FedBuff

        strategy = FedBuff(**common)
    else:
        strategy = FedAvg(**common)
    if cfg.compression.uplink or cfg.compression.downlink:
        strategy = CompressedStrategy(strategy, cfg.compression.uplink or "fp32",
                                      cfg.compression.downlink or None)
    if s.overcommit > 1.0:
        strategy = OverCommit(strategy, s.overcommit)
    if s.deadline_s > 0:
        strategy = DeadlineStrategy(strategy, s.deadline_s)
    return strategy


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the configured strategy for the configured rounds."""
    cfg = config_from_run_config(context.run_config)
    run_key = str(context.run_config.get("tinyfleet.run-key", ""))
    out = context.run_config.get("tinyfleet.out")
    recorder = None
    if not results.has_run(run_key) and out:
        # A real deployment: record every message to write the run's result files.
        from sim.recording import RecordingGrid

        grid = recorder = RecordingGrid(grid)
    torch.manual_seed(cfg.seed)
    model = build_training_model(cfg.client)
    data = fleet_data(cfg.client)
    x_test, y_test = data.test_data()
    rows: list[dict[str, float]] = []

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict(), strict=False)
        loss, acc = evaluate_model(model, x_test, y_test)
        row = {"round": server_round, "accuracy": acc, "loss": loss}
        clock = getattr(grid, "clock", None)  # tinyfleet's engine: the emulated instant
        if clock is not None:
            row["clock_s"] = clock.now
        rows.append(row)
        results.publish(run_key, "eval", row)
        return MetricRecord({"accuracy": acc, "loss": loss})

    strategy = make_strategy(cfg)
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=cfg.rounds,
        timeout=cfg.strategy.timeout_s,
        train_config=ConfigRecord(),
        evaluate_fn=evaluate_fn,
    )
    results.publish(run_key, "final", result.arrays)
    if not results.has_run(run_key) and out:
        _write_rows(Path(str(out)) / "server_rounds.csv", rows)
    if recorder is not None:
        from sim.recording import write_deployed_results

        write_deployed_results(Path(str(out)), cfg, recorder, rows, result.arrays)


def _write_rows(path: Path, rows: list[dict[str, float]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["round", "accuracy", "loss"])
        w.writeheader()
        w.writerows(rows)
