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
frame time, deadline, ``keeps_up``, MAC ratio, stream accuracy, whether it trained (and in
INT8) and its training's emulated seconds.

:func:`central_reference` trains the same ``PerceptionNet`` centrally on the very frames the
fleet's devices fine-tune on, and tests it on the same held-out stream: what the fleet's
accuracy can be measured against (``python -m sim.perception_server CONFIG``).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from clients.pass_skip import PerceptionNet
from clients.perception_app import (
    _STREAMS,
    GATE_PREFIX,
    PerceptionSpec,
    _segment,
    _train_cost,
    build_global_state,
    device_stream,
    fine_tune,
    perception_of,
)
from clients.video import generate_stream
from devices.errors import ConfigError
from devices.fleet import assign_profiles
from devices.profiles import load_profile
from sim import results
from sim.server_app import config_from_run_config, make_strategy

__all__ = ["DEVICE_COLUMNS", "app", "central_reference", "mean_metrics", "held_out_frames"]

app = ServerApp()

_SUMMARY = {"stream-acc": "device_acc", "mac-ratio": "mac_ratio", "keeps-up": "keeps_up",
            "frame-time-s": "frame_time_s", "trained": "trained"}

DEVICE_COLUMNS = ("round", "partition_id", "profile", "trained", "int8", "frame_time_s",
                  "deadline_s", "keeps_up", "mac_ratio", "executed_macs", "full_macs", "infer_s",
                  "stream_acc", "train_compute_s", "compute_s", "energy_j")
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


def held_out_frames(spec: PerceptionSpec, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out test stream's labelled frames (digits of the test split)."""
    config = dataclasses.replace(_STREAMS[spec.stream], num_frames=256, height=spec.size,
                                 width=spec.size, digit_split="test",
                                 switch_every=spec.switch_every)
    test = generate_stream(config, seed * 10_007)
    keep = test.labels >= 0
    return torch.from_numpy(test.frames[keep]), torch.from_numpy(test.labels[keep])


def _accuracy(net: PerceptionNet, x: torch.Tensor, y: torch.Tensor) -> float:
    net.eval()
    with torch.no_grad():
        return float((net(x).argmax(-1) == y).float().mean()) if len(y) else 0.0


def central_reference(run_config: Mapping[str, Any], *, steps: int = 300,
                      batch_size: int = 32) -> dict[str, float]:
    """Train ``PerceptionNet`` centrally on the frames the fleet's trainers fine-tune on.

    The frames are every training device's (its step fits its RAM) labelled frames of
    every round, pooled; the recipe is the devices' (:func:`~clients.perception_app.
    fine_tune`: Adam at ``perception.lr``, the same initial weights, batch-norm
    recalibration, FP32), for ``steps`` batches of ``batch_size``; the test stream is
    the server's. Returns ``accuracy``, ``frames``, ``trainers``, and ``fleet_examples``
    (examples the fleet's fine-tuning processes in the run, for comparison with
    ``steps * batch_size``).
    """
    cfg = config_from_run_config(run_config)
    spec, seed, rounds = perception_of(run_config)
    profiles = assign_profiles(cfg.client.fleet.mix, cfg.client.fleet.size, cfg.seed)
    trainers = [pid for pid, name in enumerate(profiles)
                if _train_cost(spec, load_profile(name))[-1]]
    xs, ys = [], []
    for pid in trainers:
        stream = device_stream(spec, seed, rounds, pid)
        for server_round in range(1, rounds + 1):
            frames, labels = _segment(stream, spec, server_round)
            xs.append(frames[: spec.train_frames])
            ys.append(labels[: spec.train_frames])
    net = PerceptionNet(1, 10, spec.width)
    net.load_state_dict({k: v for k, v in build_global_state(spec, seed).items()
                         if not k.startswith(GATE_PREFIX)})
    x_test, y_test = held_out_frames(spec, seed)
    if xs:
        central = dataclasses.replace(spec, train_steps=steps, batch_size=batch_size,
                                      precision="fp32")
        fine_tune(net, torch.cat(xs), torch.cat(ys), central, seed)
    return {
        "accuracy": _accuracy(net, x_test, y_test),
        "frames": float(sum(len(x) for x in xs)),
        "trainers": float(len(trainers)),
        "fleet_examples": float(len(trainers) * rounds * spec.train_steps * spec.batch_size),
    }


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
    x_test, y_test = held_out_frames(spec, seed)
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
        acc = _accuracy(net, x_test, y_test)
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


def _main() -> None:
    parser = argparse.ArgumentParser(description="Central-training reference of a "
                                     "perception fleet config (same frames, same test).")
    parser.add_argument("config", type=Path)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    from sim.config import load_config

    cfg = load_config(args.config)
    if args.seed is not None:
        cfg = cfg.with_overrides(seed=args.seed)
    ref = central_reference(cfg.to_run_config(), steps=args.steps, batch_size=args.batch_size)
    print(f"central: accuracy {ref['accuracy']:.4f} on the held-out stream after "
          f"{args.steps} steps x {args.batch_size} ({args.steps * args.batch_size:,} examples; "
          f"the fleet's fine-tuning: {ref['fleet_examples']:,.0f}) over {ref['frames']:,.0f} "
          f"frames of {ref['trainers']:.0f} training devices")


if __name__ == "__main__":
    _main()
