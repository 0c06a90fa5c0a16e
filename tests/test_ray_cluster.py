"""The same run on a two-node Ray cluster started with `ray start`, with no code change.

Two `ray start --block` processes (a head and a worker node, one CPU each, asked to bind
127.0.0.1) form the cluster; the run joins it with `--ray-address` semantics, ships the
project's code through Ray's `runtime_env` (no shared file system assumed), and must give
the same model as a local run. Both processes are stopped afterwards, even on failure.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sim.config import load_config
from sim.runner import run_experiment

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ray(*args: str) -> subprocess.Popen[bytes]:
    exe = str(Path(sys.executable).with_name("ray"))
    return subprocess.Popen([exe, "start", "--block", "--node-ip-address=127.0.0.1",
                             "--num-cpus=1", "--disable-usage-stats", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _wait_for_nodes(address: str, n: int, timeout: float = 90.0) -> None:
    import ray

    deadline = time.time() + timeout
    ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        while time.time() < deadline:
            if sum(1 for node in ray.nodes() if node["Alive"]) >= n:
                return
            time.sleep(1)
        raise TimeoutError(f"the Ray cluster at {address} did not reach {n} nodes")
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_two_node_cluster_run_matches_local(tmp_path: Path) -> None:
    cfg = load_config(ROOT / "configs" / "default.toml").with_overrides(**{
        "fleet.size": 12, "rounds": 2, "strategy.fraction_train": 0.5,
        "data.samples_per_device": 16})
    local = run_experiment(cfg)
    port = _free_port()
    address = f"127.0.0.1:{port}"
    procs = [_ray("--head", f"--port={port}", "--include-dashboard=false")]
    try:
        time.sleep(5)
        procs.append(_ray(f"--address={address}"))
        _wait_for_nodes(address, 2)
        res = run_experiment(cfg, tmp_path, backend="ray", actors=2, ray_address=address)
        assert res.summary["engine"]["workers"] == 2
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
    for k, v in local.final_arrays.items():
        assert np.array_equal(v.numpy(), res.final_arrays[k].numpy()), k
