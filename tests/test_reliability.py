"""Reliability: kill -9 and resume bit-identically; injected faults never corrupt the model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from devices.errors import ConfigError
from sim.config import load_config
from sim.journal import Journal
from sim.runner import resume_experiment, run_experiment

ROOT = Path(__file__).resolve().parents[1]

SMALL = """
name = "small"
seed = 3
rounds = 5
[fleet]
size = 16
mix = { stm32f746 = 0.5, rpi4 = 0.5 }
link_spread = 0.4
[data]
samples_per_device = 24
[model]
name = "small_cnn"
args = { width = 8 }
[train]
batch_size = 4
lr = 0.05
[strategy]
name = "STRATEGY"
fraction_train = 0.5
deadline_s = 6.0
ARGS
"""


def _write_cfg(tmp: Path, strategy: str) -> Path:
    args = 'args = { buffer_size = 3, concurrency = 6 }' if strategy == "fedbuff" else ""
    text = SMALL.replace("STRATEGY", strategy).replace("ARGS", args)
    if strategy == "fedbuff":
        text = text.replace("deadline_s = 6.0", "deadline_s = 0.0")
    p = tmp / f"{strategy}.toml"
    p.write_text(text)
    return p


def _model(d: Path) -> dict[str, np.ndarray]:
    with np.load(d / "model.npz") as f:
        return {k: f[k] for k in f.files}


def _run_and_kill(cfg: Path, out: Path, after_entries: int) -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sim.cli", "run", str(cfg), "--out", str(out),
         "--no-progress"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if len(list((out / ".journal").glob("*.pkl"))) >= after_entries:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.005)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "summary.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "kill_after"), [("fedavg", 1), ("fedavg", 3),
                                                      ("fedbuff", 4)])
def test_kill9_then_resume_is_bit_identical(tmp_path: Path, strategy: str,
                                            kill_after: int) -> None:
    cfg_path = _write_cfg(tmp_path, strategy)
    ref = run_experiment(load_config(cfg_path), tmp_path / "ref")
    out = tmp_path / "killed"
    _run_and_kill(cfg_path, out, kill_after)
    # A second `run` into the folder refuses to overwrite the interrupted run.
    with pytest.raises(ConfigError, match="tinyfleet resume"):
        run_experiment(load_config(cfg_path), out)
    res = resume_experiment(out)
    assert res.summary["engine"]["replayed_calls"] >= kill_after
    a, b = _model(tmp_path / "ref"), _model(out)
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    assert (tmp_path / "ref" / "rounds.csv").read_text() == (out / "rounds.csv").read_text()
    assert ref.summary["final_accuracy"] == res.summary["final_accuracy"]


def test_journal_is_atomic_prefix(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.append([1, 2], [])
    j.append([3], [])
    (tmp_path / "00000003.pkl").write_bytes(b"orphan after a gap")
    (tmp_path / "00000002.pkl.tmp").write_bytes(b"half-written")
    j2 = Journal(tmp_path)
    assert len(j2) == 2 and j2.get(1)[0] == [3]
    assert not (tmp_path / "00000002.pkl.tmp").exists()


def test_injected_faults_are_counted_and_never_aggregated(tmp_path: Path) -> None:
    cfg = load_config(_write_cfg(tmp_path, "fedavg")).with_overrides(**{
        "faults": {"raise_rate": 0.15, "hang_rate": 0.1, "nan_rate": 0.1,
                   "oversize_rate": 0.1, "hang_wall_s": 0.01},
        "rounds": 4, "strategy.timeout_s": 120.0,
    })
    res = run_experiment(cfg, tmp_path / "out")
    totals = {k: sum(int(r[k]) for r in res.rounds) for k in
              ("failures_raised", "failures_hang", "failures_nonfinite", "failures_oversize")}
    assert all(v > 0 for v in totals.values()), totals
    assert sum(int(r["failures"]) for r in res.rounds) == sum(totals.values())
    for v in res.final_arrays.values():
        assert np.isfinite(v.numpy()).all()
    assert "injected-oversize" not in res.final_arrays
    # A hanging device holds its round until the engine's (emulated) timeout.
    hang_rounds = {int(r["round"]) for r in res.rounds if int(r["failures_hang"])}
    for r in res.rounds:
        if int(r["round"]) in hang_rounds:
            assert float(r["round_time_s"]) >= 120.0
    assert float(res.rounds[-1]["accuracy"]) > float(res.rounds[0]["accuracy"])


def test_bad_fault_config_is_named(tmp_path: Path) -> None:
    cfg = load_config(_write_cfg(tmp_path, "fedavg"))
    with pytest.raises(ConfigError, match="faults.raise_rate"):
        cfg.with_overrides(faults={"raise_rate": 2.0})
    with pytest.raises(ConfigError, match="faults: unknown"):
        cfg.with_overrides(faults={"explode": 1})


@pytest.mark.slow
def test_raising_clients_and_a_killed_actor(tmp_path: Path) -> None:
    cfg = load_config(_write_cfg(tmp_path, "fedavg")).with_overrides(**{
        "faults": {"raise_rate": 0.3, "kill_actor_round": 2}, "rounds": 3})
    res = run_experiment(cfg, tmp_path / "out", backend="ray", actors=2)
    assert res.summary["engine"]["actors_replaced"] == 1
    assert sum(int(r["actors_lost"]) for r in res.rounds) == 1
    assert sum(int(r["failures_raised"]) for r in res.rounds) > 0
    assert len([d for d in res.devices if d["round"] == 2]) == 8  # nothing lost
    for v in res.final_arrays.values():
        assert np.isfinite(v.numpy()).all()
