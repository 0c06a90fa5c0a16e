"""tinyfleet's engine runs unmodified Flower apps, deterministically, on a virtual clock."""

from __future__ import annotations

import numpy as np
import pytest

from sim.availability import TraceAvailability
from sim.runner import run_simulation
from tests.apps import quickstart


def _final(grid_result: dict) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in grid_result["result"].arrays.items()}


def test_foreign_quickstart_app_runs_unchanged() -> None:
    grid = run_simulation(
        server_app=quickstart.server_app,
        client_app=quickstart.app,
        num_supernodes=6,
        backend_name="local",
        run_config={"num-server-rounds": 3, "lr": 0.5},
        seed=3,
    )
    result = quickstart.RESULTS["result"]
    assert len(result.train_metrics_clientapp) == 3
    assert len(result.evaluate_metrics_clientapp) == 3
    # Accuracy rises above chance (10 classes) within 3 rounds of this tiny MLP.
    assert result.evaluate_metrics_clientapp[3]["eval_acc"] > 0.3
    # The app reports no device figures: the engine timed it on the host and scaled.
    train = [r for r in grid.state.records if r.message_type == "train"]
    assert all(r.status == "ok" and r.compute_s > 0 and r.bytes_up > 0 for r in train)
    assert grid.clock.now > 0
    # Context.state followed each node: some node was trained more than once.
    assert max(int(r["times-trained"]) for r in result.train_metrics_clientapp.values()) >= 1
    assert result.train_metrics_clientapp[3]["times-trained"] > 1.0


def test_replies_are_stamped_in_emulated_time() -> None:
    grid = run_simulation(
        server_app=quickstart.server_app, client_app=quickstart.app, num_supernodes=4,
        backend_name="local", run_config={"num-server-rounds": 2},
        fleet=["stm32f746", "rpi4", "jetson-nano", "rpi4"], seed=1,
    )
    recs = grid.state.records
    for r in recs:
        assert r.finish_s == pytest.approx(r.start_s + r.down_s + r.compute_s + r.up_s)
    # Per call, the clock ends at the last delivery.
    for span in grid.state.spans:
        ends = [r.finish_s for r in recs if r.start_s == span.start_s]
        assert span.end_s == pytest.approx(max(ends))
    # The MCU's BLE link makes it the slowest to reply.
    slow = max(recs, key=lambda r: r.finish_s - r.start_s)
    assert slow.device == "stm32f746"


def test_same_seed_same_model_local_runs() -> None:
    finals = []
    for _ in range(2):
        run_simulation(server_app=quickstart.server_app, client_app=quickstart.app,
                       num_supernodes=5, backend_name="local",
                       run_config={"num-server-rounds": 2}, seed=11)
        finals.append(_final(quickstart.RESULTS))
    for k in finals[0]:
        assert np.array_equal(finals[0][k], finals[1][k])


def test_availability_dip_advances_clock_instead_of_hanging() -> None:
    # Two of four devices come online only at t=1000 s; FedAvg needs 2 available nodes
    # and samples 2 (fraction 0.5 of 4): at t=0 only node 0 is online.
    trace = TraceAvailability({0: [(0, 1e9)], 1: [(1000, 1e9)], 2: [(1000, 1e9)],
                               3: [(5000, 1e9)]})
    grid = run_simulation(server_app=quickstart.server_app, client_app=quickstart.app,
                          num_supernodes=4, backend_name="local",
                          run_config={"num-server-rounds": 1}, seed=2, availability=trace)
    train = [r for r in grid.state.records if r.message_type == "train"]
    assert train and min(r.start_s for r in train) >= 1000
    assert all(r.partition_id != 3 for r in train)


def test_dropout_when_device_goes_offline_mid_training() -> None:
    # Device 1 is online only for the first millisecond: it cannot finish in time.
    trace = TraceAvailability({0: [(0, 1e9)], 1: [(0, 1e-3)], 2: [(0, 1e9)]})
    grid = run_simulation(server_app=quickstart.server_app, client_app=quickstart.app,
                          num_supernodes=3, backend_name="local",
                          run_config={"num-server-rounds": 1}, seed=5, availability=trace,
                          fleet=["rpi4", "stm32f746", "rpi4"])
    statuses = {r.partition_id: r.status for r in grid.state.records
                if r.message_type == "train"}
    if 1 in statuses:
        assert statuses[1] == "dropout"
    assert all(s == "ok" for p, s in statuses.items() if p != 1)


@pytest.mark.slow
def test_ray_and_local_give_identical_models() -> None:
    # Compute times from counted MACs make the delivery order, and so FedAvg's
    # summation order, independent of host timing; torch runs one thread per task.
    finals = []
    for backend, actors in (("local", None), ("ray", 2), ("ray", 1)):
        run_simulation(server_app=quickstart.server_app, client_app=quickstart.app,
                       num_supernodes=6, backend_name=backend, num_actors=actors,
                       run_config={"num-server-rounds": 2}, seed=7, count_macs=True)
        finals.append(_final(quickstart.RESULTS))
    for other in finals[1:]:
        for k in finals[0]:
            assert np.array_equal(finals[0][k], other[k]), k
