"""Perception with PASS in the fleet (issue 6, part A, item 3).

End to end on tinyfleet's engine, twice on the same static-stream fleet: with the learned
PASS gate the devices' emulated inference time falls below that of full computation (gate
off), the MCUs are reported as not keeping up with the frame rate, and the federated gates'
weights change over rounds. Plus the duty cycle's cost accounting on its own, and the INT8
switch: the fine-tuning steps run through ``clients.int8``'s layers, are costed at the
device's int8 throughput, and the federated arrays stay the FP32 net's.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from clients import int8
from clients.pass_skip import PerceptionNet
from clients.perception_app import (
    GATE_PREFIX,
    PerceptionSpec,
    build_global_state,
    device_stream,
    duty_cycle,
    fine_tune,
    fine_tune_cost,
    perception_of,
    train_on_stream,
)
from devices.cost import step_time_s
from devices.errors import ConfigError
from devices.fleet import assign_profiles
from devices.profiles import load_profile
from sim.config import from_doc
from sim.perception_server import central_reference
from sim.runner import run_experiment

_SMALL = {"size": 48, "width": 16, "fps": 30.0, "duty_frames": 16, "train_frames": 16,
          "train_steps": 4, "batch_size": 8, "gate_steps": 2, "clip_len": 8}


def _doc(gate: str) -> dict[str, Any]:
    return {
        "name": f"perception-{gate}", "seed": 3, "rounds": 2,
        "fleet": {"size": 4, "mix": {"rpi4": 0.5, "jetson-nano": 0.25, "stm32f746": 0.25}},
        "data": {"source": "digits", "partition": "iid", "samples_per_device": 16},
        "model": {"name": "mlp", "args": {"hidden": 16, "depth": 1}},
        "strategy": {"name": "fedavg", "fraction_train": 1.0},
        "perception": {"stream": "static", "gate": gate, **_SMALL},
    }


@pytest.mark.slow
def test_pass_lowers_inference_time_in_the_fleet_and_gates_are_federated(
        tmp_path: Path) -> None:
    runs = {gate: run_experiment(from_doc(_doc(gate)), tmp_path / gate)
            for gate in ("off", "learned")}
    off, learned = (runs[g].rounds[1:] for g in ("off", "learned"))
    assert len(off) == len(learned) == 2
    profiles = assign_profiles({"rpi4": 0.5, "jetson-nano": 0.25, "stm32f746": 0.25}, 4, 3)
    fast = sum(p != "stm32f746" for p in profiles) / len(profiles)
    assert fast < 1.0  # the fleet has an MCU
    for full, gated in zip(off, learned, strict=True):
        assert full["mac_ratio"] == pytest.approx(1.0)
        assert gated["mac_ratio"] < 0.8
        assert gated["frame_time_s"] < full["frame_time_s"]
        # Every Pi and Jetson keeps up with 30 fps, no MCU does (with PASS or without).
        assert full["keeps_up"] == pytest.approx(fast)
        assert gated["keeps_up"] == pytest.approx(fast)
        assert full["trained"] == gated["trained"] == sum(p != "stm32f746" for p in profiles)
    # Per device: each one's frame time falls with PASS; the MCU is the one that lags.
    tables = {}
    for gate in ("off", "learned"):
        with (tmp_path / gate / "perception_devices.csv").open() as f:
            tables[gate] = {(r["round"], r["partition_id"]): r for r in csv.DictReader(f)}
    assert len(tables["off"]) == len(tables["learned"]) == 2 * len(profiles)
    for key, full_row in tables["off"].items():
        gated_row = tables["learned"][key]
        assert float(gated_row["frame_time_s"]) < float(full_row["frame_time_s"])
        up = "0" if gated_row["profile"] == "stm32f746" else "1"
        assert gated_row["keeps_up"] == full_row["keeps_up"] == up
        assert gated_row["profile"] == profiles[int(key[1])]
        # The MCUs only infer: no training time; the others train, in FP32 here.
        assert (float(gated_row["train_compute_s"]) > 0) == (gated_row["trained"] == "1")
        assert gated_row["int8"] == "0"
    # The gates travel in the federated arrays and change over the rounds.
    spec = PerceptionSpec(stream="static", gate="learned", **_SMALL)  # type: ignore[arg-type]
    initial = build_global_state(spec, 3)
    final = runs["learned"].final_arrays.to_torch_state_dict()
    gate_keys = [k for k in initial if k.startswith(GATE_PREFIX)]
    assert gate_keys and set(gate_keys) <= set(final)
    moved = max(float((final[k].float() - initial[k].float()).abs().max()) for k in gate_keys)
    assert moved > 1e-4
    assert not any(k.startswith(GATE_PREFIX) for k in
                   runs["off"].final_arrays.to_torch_state_dict())


def test_duty_cycle_credits_only_executed_macs() -> None:
    spec = PerceptionSpec(stream="static", gate="threshold", **_SMALL)  # type: ignore[arg-type]
    full_spec = dataclasses.replace(spec, gate="off")
    stream = device_stream(spec, 0, 1, 0)
    frames = torch.from_numpy(stream.frames[: spec.duty_frames])
    labels = torch.from_numpy(stream.labels[: spec.duty_frames])
    torch.manual_seed(0)
    net = PerceptionNet(1, 10, spec.width).eval()
    for name in ("rpi4", "jetson-nano", "stm32f746"):
        profile = load_profile(name)
        gated = duty_cycle(net, frames, labels, spec, profile)
        full = duty_cycle(net, frames, labels, full_spec, profile)
        assert full["executed-macs"] == full["full-macs"] == gated["full-macs"]
        assert gated["executed-macs"] < full["executed-macs"]
        rate = profile.macs_per_s["fp32"]
        assert gated["infer-s"] == pytest.approx(gated["executed-macs"] / rate)
        assert gated["frame-time-s"] == pytest.approx(gated["infer-s"] / spec.duty_frames)
        assert gated["infer-energy-j"] == pytest.approx(gated["infer-s"] * profile.power_compute_w)
        assert gated["keeps-up"] == float(gated["frame-time-s"] <= 1 / spec.fps)
        expected_up = 0.0 if name == "stm32f746" else 1.0
        assert gated["keeps-up"] == full["keeps-up"] == expected_up


def test_device_streams_are_deterministic_and_distinct() -> None:
    spec = PerceptionSpec(**_SMALL)  # type: ignore[arg-type]
    a, b, c = (device_stream(spec, 1, 2, pid).frames for pid in (0, 0, 1))
    assert a.shape == (2 * spec.segment, 1, 48, 48)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_bad_perception_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="perception.gate"):
        PerceptionSpec(gate="sometimes")
    with pytest.raises(ConfigError, match="perception.stream"):
        PerceptionSpec(stream="foggy")
    with pytest.raises(ConfigError, match="perception.train_frames"):
        PerceptionSpec(train_frames=12, clip_len=8)


def _run_config(doc: dict[str, Any]) -> dict[str, Any]:
    return from_doc(doc).to_run_config()


def test_int8_fine_tuning_runs_int8_layers_and_is_costed_at_int8_throughput(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"train": 0, "eval": 0}
    forward = int8.Int8Conv2d.forward

    def spy(self: int8.Int8Conv2d, x: torch.Tensor) -> torch.Tensor:
        calls["train" if self.training else "eval"] += 1
        return forward(self, x)

    monkeypatch.setattr(int8.Int8Conv2d, "forward", spy)
    profile = load_profile("rpi4")
    replies = {}
    for precision in ("fp32", "int8"):
        doc = _doc("threshold")
        doc["perception"]["precision"] = precision
        run_config = _run_config(doc)
        spec = perception_of(run_config)[0]
        assert spec.precision == precision
        initial = build_global_state(spec, 3)
        fine_tune_cost(spec)  # the cost model traces a step of its own: not counted
        calls.update(train=0, eval=0)
        arrays, metrics = train_on_stream(run_config, 0, profile, ArrayRecord(initial), 1)
        replies[precision] = (spec, initial, arrays.to_torch_state_dict(), metrics)
    spec, initial, final, metrics = replies["int8"]
    # Every conv of every step ran as an int8 layer in training mode (5 convs per forward).
    assert calls["train"] == 5 * spec.train_steps
    assert metrics["int8"] == 1 and metrics["trained"] == 1
    assert np.isfinite(metrics["train-loss"]) and metrics["train-loss"] > 0
    # The federated arrays are the FP32 net's (LAC folded into the biases), and they moved.
    assert set(final) == set(initial)
    assert max(float((final[k].float() - initial[k].float()).abs().max()) for k in initial) > 1e-3
    assert all(torch.isfinite(v.float()).all() for v in final.values())
    # The step is costed at the int8 rate (the Pi's int8 MAC rate is twice its fp32 one).
    step, _, fp32_step, recalibration = fine_tune_cost(spec)
    assert {layer.dtype for layer in step.layers if layer.fwd_macs} == {"int8"}
    assert {layer.dtype for layer in fp32_step.layers if layer.fwd_macs} == {"fp32"}
    assert step.macs == fp32_step.macs
    expected = step_time_s(step, profile) * spec.train_steps + step_time_s(recalibration, profile)
    assert metrics["train-compute-s"] == pytest.approx(expected)
    fp32_metrics = replies["fp32"][3]
    assert fp32_metrics["int8"] == 0
    assert metrics["train-compute-s"] < fp32_metrics["train-compute-s"]
    # The inference after the fine-tuning is FP32 either way: same MAC rate per frame.
    rate = profile.macs_per_s["fp32"]
    assert metrics["infer-s"] == pytest.approx(metrics["executed-macs"] / rate)


def test_int8_fine_tune_folds_lac_into_the_fp32_net() -> None:
    spec = PerceptionSpec(precision="int8", **_SMALL)  # type: ignore[arg-type]
    stream = device_stream(spec, 0, 1, 0)
    frames = torch.from_numpy(stream.frames[: spec.train_frames])
    labels = torch.from_numpy(stream.labels[: spec.train_frames])
    torch.manual_seed(0)
    net = PerceptionNet(1, 10, spec.width)
    losses, trained = fine_tune(net, frames, labels, spec, seed=0)
    assert len(losses) == spec.train_steps and all(np.isfinite(losses))
    convs = [m for m in trained.modules() if isinstance(m, int8.Int8Conv2d)]
    assert len(convs) == 5 and isinstance(trained.head[1], int8.Int8Linear)
    assert not any(isinstance(m, int8.Int8Conv2d | int8.Int8Linear) for m in net.modules())
    moved = max(float(m.lac[1:].abs().max()) for m in convs)  # type: ignore[index]
    assert moved > 0  # LAC trained
    for name, module in trained.named_modules():
        if isinstance(module, int8.Int8Conv2d | int8.Int8Linear):
            target = net.get_submodule(name)
            lac = module.lac.detach()  # type: ignore[union-attr]
            torch.testing.assert_close(target.weight, module.weight.detach())
            torch.testing.assert_close(target.bias, module.bias.detach() + lac[0] * lac[1] + lac[2])


def test_precision_follows_train_precision_and_bad_values_are_named() -> None:
    doc = _doc("off")
    doc["train"] = {"precision": "int8"}
    assert perception_of(_run_config(doc))[0].precision == "int8"
    doc["perception"]["precision"] = "fp32"
    with pytest.raises(ConfigError, match=r"perception.precision: 'fp32' disagrees with "
                                          r"train.precision 'int8'"):
        perception_of(_run_config(doc))
    with pytest.raises(ConfigError, match=r"perception.precision: expected one of "
                                          r"\('fp32', 'int8'\), got 'int4'"):
        PerceptionSpec(precision="int4")
    bad = _doc("off")
    bad["perception"]["precision"] = "bf16"
    with pytest.raises(ConfigError, match="perception.precision"):
        perception_of(_run_config(bad))
    bad_train = _doc("off")
    bad_train["train"] = {"precision": "int4"}
    with pytest.raises(ConfigError, match="train.precision"):
        from_doc(bad_train)


def test_central_reference_trains_on_the_fleets_own_training_frames() -> None:
    doc = _doc("off")
    run_config = _run_config(doc)
    spec, seed, rounds = perception_of(run_config)
    profiles = assign_profiles(doc["fleet"]["mix"], doc["fleet"]["size"], seed)
    trainers = sum(p != "stm32f746" for p in profiles)  # the MCUs' step does not fit
    untrained = central_reference(run_config, steps=1, batch_size=4)
    trained = central_reference(run_config, steps=40, batch_size=16)
    assert trained["trainers"] == untrained["trainers"] == trainers
    assert trained["frames"] == trainers * rounds * spec.train_frames
    assert trained["fleet_examples"] == trainers * rounds * spec.train_steps * spec.batch_size
    assert 0.0 <= untrained["accuracy"] <= 1.0
    assert trained["accuracy"] > untrained["accuracy"]
