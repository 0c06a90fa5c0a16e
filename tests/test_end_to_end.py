"""A small fleet simulation end to end: accuracy rises, files and schema are right."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from sim.cli import main as cli_main
from sim.config import load_config
from sim.results import DEVICE_COLUMNS, ROUND_COLUMNS
from sim.runner import run_experiment

ROOT = Path(__file__).resolve().parents[1]


def _small(**over: object):
    cfg = load_config(ROOT / "configs" / "default.toml")
    base = {"fleet.size": 20, "rounds": 4, "strategy.fraction_train": 0.5,
            "data.samples_per_device": 48}
    base.update(over)
    return cfg.with_overrides(**base)


def test_small_fleet_learns_and_writes_results(tmp_path: Path) -> None:
    res = run_experiment(_small(), tmp_path)
    acc = [float(r["accuracy"]) for r in res.rounds]
    assert acc[0] < 0.3 and acc[-1] > 0.6  # 10 classes: chance is 0.1
    for name in ("rounds.csv", "devices.csv", "summary.json", "accuracy.png",
                 "device_classes.png", "model.npz"):
        assert (tmp_path / name).is_file(), name
    with (tmp_path / "rounds.csv").open() as f:
        rows = list(csv.DictReader(f))
        assert list(rows[0]) == ROUND_COLUMNS and len(rows) == 5
    with (tmp_path / "devices.csv").open() as f:
        drows = list(csv.DictReader(f))
        assert list(drows[0]) == DEVICE_COLUMNS
    assert {d["status"] for d in drows} <= {"ok", "straggler"}
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["provenance"]["config_hash"] and s["provenance"]["versions"]["flwr"]
    # The emulated clock is the sum of round times; MCUs spend energy on the radio.
    assert s["emulated_time_s"] == pytest.approx(sum(float(r["round_time_s"]) for r in rows),
                                                 rel=1e-4)
    mcu = s["by_device_class"]["mcu"]
    assert mcu["mean_comm_s"] > mcu["mean_compute_s"]
    # Bytes are measured from whole messages: more than the payload, both ways.
    assert all(int(d["bytes_up"]) > int(d["payload_up"]) > 0 for d in drows)


def test_deadline_drops_stragglers() -> None:
    loose = run_experiment(_small(**{"strategy.deadline_s": 1e6, "rounds": 1}))
    tight = run_experiment(_small(**{"strategy.deadline_s": 4.0, "rounds": 1}))
    assert loose.summary["stragglers"] == 0
    late = [d for d in tight.devices if d["status"] == "straggler"]
    assert late and all(d["finish_s"] - d["start_s"] > 4.0 for d in late)
    ok = [d for d in tight.devices if d["status"] == "ok"]
    assert all(d["finish_s"] - d["start_s"] <= 4.0 for d in ok)


def test_budget_error_is_reported_per_device() -> None:
    cfg = _small(**{"train.batch_size": 64, "rounds": 1, "strategy.deadline_s": 1e6})
    res = run_experiment(cfg)
    failed = [d for d in res.devices if d["status"] == "error"]
    assert failed and all(d["device_class"] == "mcu" for d in failed)
    assert "one training step needs" in failed[0]["error"]
    assert "RAM; the device has" in failed[0]["error"]
    assert res.rounds[1]["failures_budget"] == len(failed)


def test_sparse_update_adapts_instead_of_failing() -> None:
    # Batch 16: a full update needs more than an MCU's SRAM, a sparse one fits.
    cfg = _small(**{"train.batch_size": 16, "rounds": 1, "strategy.deadline_s": 1e6})
    failed = run_experiment(cfg)
    assert {d["status"] for d in failed.devices if d["device_class"] == "mcu"} == {"error"}
    res = run_experiment(cfg.with_overrides(**{"train.on_budget": "sparse"}))
    assert all(d["status"] == "ok" for d in res.devices)
    ram = {"stm32f746": 320 * 1024, "nrf52840": 256 * 1024}
    mcu = [d for d in res.devices if d["device_class"] == "mcu"]
    assert mcu and all(int(d["peak_mem_bytes"]) <= ram[d["profile"]] for d in mcu)


@pytest.mark.slow
def test_cli_seeds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfgfile = tmp_path / "c.toml"
    cfgfile.write_text((ROOT / "configs" / "default.toml").read_text()
                       .replace("size = 100", "size = 20").replace("rounds = 10", "rounds = 2"))
    rc = cli_main(["run", str(cfgfile), "--out", str(tmp_path / "o"), "--seeds", "1,2",
                   "--no-progress"])
    assert rc == 0
    seeds = json.loads((tmp_path / "o" / "seeds.json").read_text())
    assert seeds["seeds"] == [1, 2] and seeds["final_accuracy"]["std"] >= 0
    assert (tmp_path / "o" / "seed-2" / "rounds.csv").is_file()
    assert "over seeds" in capsys.readouterr().out


def test_cli_reports_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[fleet]\nsize = 4\nmix = { toaster = 1.0 }\n")
    assert cli_main(["run", str(bad), "--no-progress"]) == 2
    assert "fleet.mix.toaster" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["fedprox", "fedadam"])
def test_flower_strategies_run_unchanged(name: str) -> None:
    args = {"eta": 0.05, "eta_l": 0.05} if name == "fedadam" else {}
    res = run_experiment(_small(**{"strategy.name": name, "rounds": 2, "strategy.args": args}))
    acc = [float(r["accuracy"]) for r in res.rounds]
    assert len(acc) == 3 and acc[-1] > acc[0]


def test_availability_trace_does_not_stall_rounds_with_enough_devices() -> None:
    # Every device always online (but by a trace, which has availability events): the
    # clock must advance by the rounds' own time, not jump to the next event each round.
    res = run_experiment(_small(**{"availability": {"kind": "diurnal",
                                                    "always_on_share": 1.0},
                                   "rounds": 2, "strategy.deadline_s": 1e6}))
    assert res.summary["emulated_time_s"] < 600
    assert res.summary["dropouts"] == 0


def test_federated_evaluation_reports_device_cost() -> None:
    res = run_experiment(_small(**{"rounds": 1, "strategy.fraction_evaluate": 0.5,
                                   "strategy.deadline_s": 1e6}))
    ev = [d for d in res.devices if d["message_type"] == "evaluate"]
    assert ev and all(d["status"] == "ok" and float(d["compute_s"]) > 0 for d in ev)
