"""Perception with PASS in the fleet (issue 6, part A, item 3).

End to end on tinyfleet's engine, twice on the same static-stream fleet: with the learned
PASS gate the devices' emulated inference time falls below that of full computation (gate
off), the MCUs are reported as not keeping up with the frame rate, and the federated gates'
weights change over rounds. Plus the duty cycle's cost accounting on its own.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from clients.pass_skip import PerceptionNet
from clients.perception_app import (
    GATE_PREFIX,
    PerceptionSpec,
    build_global_state,
    device_stream,
    duty_cycle,
)
from devices.errors import ConfigError
from devices.fleet import assign_profiles
from devices.profiles import load_profile
from sim.config import from_doc
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
