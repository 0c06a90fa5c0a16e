"""Flower's own engine runs the project's apps and writes the same result files."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from sim.config import from_doc
from sim.flower_engine import run_with_flower
from sim.runner import run_experiment

_DOC = {
    "name": "flower-small",
    "seed": 3,
    "rounds": 2,
    "fleet": {"size": 4, "mix": {"stm32f746": 0.5, "rpi4": 0.5}},
    "data": {"source": "digits", "samples_per_device": 16},
    "model": {"name": "small_cnn", "args": {"width": 4}},
    "train": {"batch_size": 4},
    "strategy": {"fraction_train": 0.5, "min_available": 2},
}


@pytest.mark.slow
def test_flower_engine_runs_project_apps_and_writes_results(tmp_path: Path) -> None:
    cfg = from_doc(_DOC)
    res = run_with_flower(cfg, tmp_path)

    s = res.summary
    assert s["engine"]["name"] == "flower"
    assert s["clock"] == "wall" and math.isnan(s["emulated_time_s"])
    # The ServerApp evaluated the initial model and each round, in this process.
    assert [r["round"] for r in res.rounds] == [0, 1, 2]
    assert all(r["accuracy"] != "" for r in res.rounds)
    # 2 of 4 devices per round, each reply metered and tied to its device.
    train = [d for d in res.devices if d["message_type"] == "train"]
    assert len(train) == 4 and all(d["status"] == "ok" for d in train)
    assert {d["profile"] for d in train} <= {"stm32f746", "rpi4"}
    assert all(0 <= d["device_id"] < 4 for d in train)
    for d in train:
        # Serialized messages carry the model both ways: more than the bare payload.
        assert d["bytes_down"] > d["payload_down"] > 0
        assert d["bytes_up"] > d["payload_up"] > 0
        assert d["compute_s"] > 0 and d["energy_j"] > d["compute_energy_j"] > 0
        assert d["finish_s"] >= d["start_s"]
    # Per device the same figures as tinyfleet's engine: the wrapper's partition tag is
    # gone before the proxy counts the reply, and the cost model gives the compute.
    ref = run_experiment(cfg, backend="local")
    ref_train = [d for d in ref.devices if d["message_type"] == "train"]
    assert {d["payload_up"] for d in train} == {d["payload_up"] for d in ref_train}
    by_profile = {d["profile"]: d["compute_s"] for d in ref_train}
    for d in train:
        if d["profile"] in by_profile:
            assert d["compute_s"] == pytest.approx(by_profile[d["profile"]])
    assert s["trainings"] == 4 and s["failures"] == 0

    for name in ("rounds.csv", "devices.csv", "summary.json", "model.npz"):
        assert (tmp_path / name).is_file(), name
    with (tmp_path / "devices.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(res.devices)
    assert json.loads((tmp_path / "summary.json").read_text())["engine"]["name"] == "flower"
