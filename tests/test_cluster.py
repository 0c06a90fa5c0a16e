"""A real Flower deployment on loopback: a TLS SuperLink with SuperNode authentication,
three registered SuperNodes as separate processes, one experiment run to completion.

Also: an unregistered SuperNode is refused, a plaintext SuperNode cannot connect to the TLS
SuperLink, the results have the columns of a simulated run of the same config (marked
measured), and ``tinyfleet compare`` sets the two side by side. Every process started here
(and all Flower spawns) is stopped in the fixture's teardown, also on failure.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from devices.errors import TinyFleetError
from sim import deploy
from sim.certs import Credentials, make_credentials
from sim.cli import main as cli_main
from sim.config import load_config
from sim.results import DEVICE_COLUMNS, ROUND_COLUMNS

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "cluster-smoke.toml"
DEVICES = ("rpi4", "rpi4", "jetson-orin-nano")


@dataclass
class Cluster:
    root: Path
    address: str
    home: Path
    creds: Credentials
    procs: list[deploy.Proc]
    node_ids: list[int]
    intruders: dict[str, deploy.Proc]

    def start_node(self, name: str, key: str | None, tls: bool = True) -> deploy.Proc:
        cmd = deploy.supernode_command(
            self.address, 0, 3, "rpi4",
            root_certificates=self.creds.ca_cert if tls else None,
            private_key=self.creds.node_keys[key][0] if key else None,
            port=deploy.free_port(), max_wait_s=8)
        proc = deploy.start(name, cmd, self.root / name, self.root / "logs")
        self.procs.append(proc)
        return proc


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("cluster")
    creds = make_credentials(root / "creds", nodes=["node-0", "node-1", "node-2", "rogue"])
    port = deploy.free_port()
    address = f"127.0.0.1:{port}"
    home = root / "superlink"
    procs: list[deploy.Proc] = []
    c = Cluster(root, address, home, creds, procs, [], {})
    try:
        link = deploy.start("superlink", deploy.superlink_command(
            port, creds, database=root / "state.db"), home, root / "logs")
        procs.append(link)
        assert link.wait_for("Uvicorn running on https://", 90), link.output()[-3000:]
        deploy.write_connection(home, address, creds.ca_cert)
        with ThreadPoolExecutor(3) as pool:  # each `flwr supernode register` is a process
            c.node_ids = list(pool.map(
                lambda i: deploy.register_node(home, creds.node_keys[f"node-{i}"][1],
                                               f"node-{i}"), range(3)))
        for i, device in enumerate(DEVICES):
            cmd = deploy.supernode_command(
                address, i, 3, device, root_certificates=creds.ca_cert,
                private_key=creds.node_keys[f"node-{i}"][0], port=deploy.free_port())
            procs.append(deploy.start(f"node-{i}", cmd, root / f"node-{i}", root / "logs"))
        # Two that must not get in; they try while the experiment runs.
        c.intruders["rogue"] = c.start_node("rogue", "rogue")  # key never registered
        c.intruders["plaintext"] = c.start_node("plaintext", None, tls=False)
        yield c
    finally:
        for p in reversed(procs):
            p.stop()
        leftover = [p.name for p in procs if p.alive]
        assert not leftover, f"still running: {leftover}"


@pytest.fixture(scope="module")
def runs(cluster: Cluster) -> tuple[Path, Path]:
    """The deployed run and, simulated while the cluster works, the same config."""
    from sim.runner import run_experiment

    cfg = load_config(CONFIG)
    real, sim = cluster.root / "results-real", cluster.root / "results-sim"
    run_id = deploy.submit(cfg, real, cluster.home)  # the ServerApp waits for 3 nodes
    run_experiment(cfg, sim, progress=False)
    try:
        deploy.wait_for_run(cluster.home, run_id, real, timeout_s=240)
    except TinyFleetError as exc:
        nodes = "\n".join(f"--- {p.name}\n{p.output()[-1500:]}" for p in cluster.procs[1:4])
        raise AssertionError(f"{exc}\n{nodes}") from exc
    return real, sim


@pytest.fixture(scope="module")
def real_run(runs: tuple[Path, Path]) -> Path:
    return runs[0]


@pytest.fixture(scope="module")
def sim_run(runs: tuple[Path, Path]) -> Path:
    return runs[1]


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _header(path: Path) -> list[str]:
    with path.open(newline="") as f:
        return next(csv.reader(f))


def test_experiment_runs_to_completion_with_measured_results(cluster: Cluster,
                                                             real_run: Path) -> None:
    summary = json.loads((real_run / "summary.json").read_text())
    assert summary["source"] == "measured"
    assert summary["trainings"] == 3 * 2
    rounds = _rows(real_run / "rounds.csv")
    assert [r["round"] for r in rounds] == ["0", "1", "2"]
    assert all(r["source"] == "measured" for r in rounds)
    assert [int(r["participants"]) for r in rounds[1:]] == [3, 3]
    assert all(0.0 <= float(r["accuracy"]) <= 1.0 for r in rounds)
    devices = _rows(real_run / "devices.csv")
    assert len(devices) == 6 and all(d["source"] == "measured" for d in devices)
    assert sorted({d["device_id"] for d in devices}) == ["0", "1", "2"]
    assert {int(d["node_id"]) for d in devices} == set(cluster.node_ids)  # registered only
    assert {d["profile"] for d in devices} == set(DEVICES)
    for d in devices:
        assert d["status"] == "ok", d["error"]
        assert float(d["compute_s"]) > 0
        assert float(d["comm_s"]) > 0  # the round trip is longer than the compute
        assert int(d["peak_mem_bytes"]) > 10_000_000  # a real process: Python and torch
        assert int(d["bytes_up"]) > 0 and int(d["bytes_down"]) > 0
        # Energy is measured where the host meters it, else left empty (unknown).
        assert d["energy_j"] == "" or float(d["energy_j"]) >= 0
    assert (real_run / "server_rounds.csv").is_file()


def test_results_have_the_simulation_columns(real_run: Path, sim_run: Path) -> None:
    for name, columns in (("rounds.csv", ROUND_COLUMNS), ("devices.csv", DEVICE_COLUMNS)):
        assert _header(real_run / name) == _header(sim_run / name) == columns
    real = json.loads((real_run / "summary.json").read_text())
    sim = json.loads((sim_run / "summary.json").read_text())
    assert set(sim) <= set(real)
    assert {r["source"] for r in _rows(sim_run / "rounds.csv")} == {"emulated"}


def test_compare_sets_the_runs_side_by_side(real_run: Path, sim_run: Path,
                                            tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "compare.csv"
    assert cli_main(["compare", str(sim_run), str(real_run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "emulated" in printed and "measured" in printed
    rows = _rows(out)
    source = next(r for r in rows if r["metric"] == "source")
    assert (source["a"], source["b"]) == ("emulated", "measured")
    compute = [r for r in rows if r["section"] == "device_class"
               and r["metric"] == "mean_compute_s"]
    assert compute and all(float(r["a"]) > 0 and float(r["b"]) > 0 for r in compute)
    assert {r["key"] for r in rows if r["section"] == "round"} == {"0", "1", "2"}


def test_unregistered_supernode_is_refused(cluster: Cluster) -> None:
    rogue = cluster.intruders["rogue"]
    assert rogue.popen.wait(timeout=60) != 0
    assert "Failed to activate SuperNode" in rogue.output(), rogue.output()[-2000:]
    link = cluster.procs[0].output()
    assert "No SuperNode found with the given public key" in link


def test_plaintext_connection_to_tls_superlink_fails(cluster: Cluster) -> None:
    plain = cluster.intruders["plaintext"]
    assert plain.popen.wait(timeout=60) != 0
    assert "SuperNode ID" not in plain.output()
    # The CLI over plaintext fails as well.
    home = cluster.root / "plain-cli"
    deploy.write_connection(home, cluster.address, insecure=True)
    with pytest.raises(Exception, match="failed"):
        deploy.run_status(home, 1)
