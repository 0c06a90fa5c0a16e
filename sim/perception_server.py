"""tinyfleet's perception ``ServerApp``: FedAvg over the perception net and its PASS gates.

Pairs with :mod:`clients.perception_app` (the runner picks both for a config with a
``[perception]`` table). The strategy is the project's own FedAvg (``make_strategy``),
with a train-metrics aggregation that gives every reply the same weight: a device that did
not train (its step does not fit its RAM, ``num-examples`` = 0) still ran its duty cycle,
and whether it keeps up must count. Published per round (``rounds.csv``): ``accuracy`` (the
global net, every frame computed whole, on a held-out test stream), ``device_acc`` (the
devices' mean accuracy with PASS on their own streams), ``mac_ratio`` (mean executed /
full MACs), ``keeps_up`` (share of devices keeping up with the frame rate),
``frame_time_s`` (mean emulated time per frame) and ``trained`` (devices that trained).
Per device and round (``perception_devices.csv`` in the run's output folder): its profile,
frame time, deadline, ``keeps_up``, MAC ratio, stream accuracy and whether it trained.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from clients.pass_skip import PerceptionNet
from clients.perception_app import _STREAMS, GATE_PREFIX, build_global_state, perception_of
from clients.video import generate_stream
from devices.errors import ConfigError
from devices.fleet import assign_profiles
from sim import results
from sim.server_app import config_from_run_config, make_strategy

__all__ = ["DEVICE_COLUMNS", "app", "mean_metrics"]

app = ServerApp()

_SUMMARY = {"stream-acc": "device_acc", "mac-ratio": "mac_ratio", "keeps-up": "keeps_up",
            "frame-time-s": "frame_time_s", "trained": "trained"}

DEVICE_COLUMNS = ("round", "partition_id", "profile", "trained", "frame_time_s", "deadline_s",
                  "keeps_up", "mac_ratio", "executed_macs", "full_macs", "infer_s",
                  "stream_acc", "compute_s", "energy_j")
"""Columns of ``perception_devices.csv``."""


def mean_metrics(records: list[RecordDict], weighting_metric_name: str) -> MetricRecord:
    """Unweighted mean of each numeric metric over the replies (``trained``: the sum)."""
    del weighting_metric_name  # every device counts once, trained or not
    values: dict[str, list[float]] = {}
    for record in records:
        for metrics in record.metric_records.values():
            for key, value in metrics.items():
                if isinstance(value, int | float):
                    values.setdefault(key, []).append(float(value))
    out: dict[str, int | float | list[int] | list[float]] = {
        k: float(np.mean(v)) for k, v in values.items()}
    if "trained" in values:
        out["trained"] = float(np.sum(values["trained"]))
    return MetricRecord(out)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run FedAvg for the configured rounds; publish accuracy and duty-cycle figures."""
    cfg = config_from_run_config(context.run_config)
    spec, seed, rounds = perception_of(context.run_config)
    run_key = str(context.run_config.get("tinyfleet.run-key", ""))
    strategy = make_strategy(cfg)
    if not isinstance(strategy, FedAvg) or cfg.compression.uplink or cfg.compression.downlink:
        raise ConfigError("strategy: [perception] runs plain FedAvg-family strategies "
                          "without [compression] or deadline wrappers")
    strategy.train_metrics_aggr_fn = mean_metrics
    test_cfg = dataclasses.replace(_STREAMS[spec.stream], num_frames=256,
                                   height=spec.size, width=spec.size, digit_split="test",
                                   switch_every=spec.switch_every)
    test = generate_stream(test_cfg, seed * 10_007)
    keep = test.labels >= 0
    x_test = torch.from_numpy(test.frames[keep])
    y_test = torch.from_numpy(test.labels[keep])
    net = PerceptionNet(1, 10, spec.width)
    latest: dict[str, float] = {}
    device_rows: list[dict[str, Any]] = []
    profiles = assign_profiles(cfg.client.fleet.mix, cfg.client.fleet.size, cfg.seed)
    aggregate_train = strategy.aggregate_train

    def remember(server_round: int, replies: Iterable[Message]) -> Any:
        replies = list(replies)
        for reply in replies:
            if reply.has_error():
                continue
            m = reply.content.metric_records.get("metrics")
            if m is None:
                continue
            row: dict[str, Any] = {k.replace("-", "_"): v for k, v in m.items()}
            pid = int(row.get("partition_id", -1))  # type: ignore[arg-type]
            row.update({"round": server_round, "partition_id": pid,
                        "profile": profiles[pid] if 0 <= pid < len(profiles) else ""})
            device_rows.append(row)
        arrays, metrics = aggregate_train(server_round, replies)
        latest.clear()
        if metrics is not None:
            latest.update({k: float(v) for k, v in metrics.items()  # type: ignore[arg-type]
                           if isinstance(v, int | float)})
        return arrays, metrics

    strategy.aggregate_train = remember  # type: ignore[method-assign]

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        state = {k: v for k, v in arrays.to_torch_state_dict().items()
                 if not k.startswith(GATE_PREFIX)}
        net.load_state_dict(state)
        net.eval()
        with torch.no_grad():
            acc = float((net(x_test).argmax(-1) == y_test).float().mean()) if len(y_test) else 0.0
        row: dict[str, Any] = {"round": server_round, "accuracy": acc}
        for key, column in _SUMMARY.items():
            row[column] = latest.get(key, "") if server_round > 0 else ""
        clock = getattr(grid, "clock", None)  # tinyfleet's engine: the emulated instant
        if clock is not None:
            row["clock_s"] = clock.now
        results.publish(run_key, "eval", row)
        return MetricRecord({"accuracy": acc})

    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(build_global_state(spec, seed)),
        num_rounds=rounds,
        timeout=cfg.strategy.timeout_s,
        train_config=ConfigRecord(),
        evaluate_fn=evaluate_fn,
    )
    results.publish(run_key, "final", result.arrays)
    out = context.run_config.get("tinyfleet.out")
    if out:
        results.write_csv(Path(str(out)) / "perception_devices.csv", device_rows,
                          DEVICE_COLUMNS)
