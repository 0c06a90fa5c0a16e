"""Continual learning in the fleet: the apps of clients.continual_app and sim.continual_server."""

from __future__ import annotations

import csv
import math
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from clients.continual import StreamSchedule, replay_capacity, sample_nbytes
from clients.continual_app import (
    FISHER_PREFIX,
    FLEET_FISHER_KEY,
    state_from_record,
    state_to_record,
)
from devices.errors import DataError
from devices.fleet import assign_profiles
from devices.profiles import load_profile
from sim.config import from_doc
from sim.continual_server import (
    FisherSharing,
    fleet_metrics,
    median_task,
    with_fisher_sharing,
)
from sim.runner import run_experiment
from strategies.deadline import DeadlineStrategy


def test_fleet_metrics_on_a_hand_made_case() -> None:
    nan = math.nan
    # Rounds 0..4; the median device reaches task 1 in round 3.
    m = np.array([[0.2, nan], [0.9, nan], [0.6, 0.5], [0.8, 0.6], [0.7, 0.8]])
    figs = fleet_metrics(m, [0, 0, 0, 1, 1])
    assert figs["avg_acc"] == pytest.approx(0.75)
    assert figs["forgetting"] == pytest.approx(0.9 - 0.7)  # best earlier minus now
    # Task 0 was last trained in round 2 (acc 0.6): BWT = 0.7 - 0.6.
    assert figs["bwt"] == pytest.approx(0.7 - 0.6)
    one = fleet_metrics(m[:3], [0, 0, 0])
    assert one["bwt"] == 0.0 and one["avg_acc"] == pytest.approx(0.55)
    assert one["forgetting"] == pytest.approx(0.9 - 0.6)
    with pytest.raises(DataError, match="fleet_task"):
        fleet_metrics(m, [0, 1, 0, 1, 1])


def test_median_task() -> None:
    sched = StreamSchedule(num_tasks=3, rounds_per_task=4, offset=3, seed=2)
    devices = range(9)
    between = 0
    for rnd in range(14):
        tasks = sorted(sched.task_at(rnd, d) for d in devices)
        assert median_task(sched, rnd, devices) == tasks[4]
        between += tasks[0] < tasks[4] < tasks[-1] or tasks[0] < tasks[-1]
    assert between > 0  # devices disagree in some rounds, so min, median, max differ


def test_state_record_round_trip() -> None:
    st: dict[str, np.ndarray] = {"task": np.asarray([2], np.int64),
          "replay/x": np.ones((3, 1, 8, 8), np.float32),
          "replay/y": np.zeros(0, np.int64)}
    back = state_from_record(state_to_record(st))
    assert set(back) == set(st)
    for k, v in st.items():
        assert back[k].dtype == v.dtype and np.array_equal(back[k], v)
    assert state_from_record(None) == {}


class _Recorder(FedAvg):
    """FedAvg that keeps the replies it aggregates."""

    def __init__(self) -> None:
        super().__init__(fraction_train=1.0, min_train_nodes=1, min_available_nodes=1)
        self.seen: list[Message] = []

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self.seen = replies
        return super().aggregate_train(server_round, replies)


def _reply(node: int, w: float, fisher: float, n_fisher: int) -> Message:
    ins = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}),
                  dst_node_id=node, message_type=MessageType.TRAIN)
    arrays = OrderedDict([("w", Array(np.full(3, w, np.float32))),
                          (FISHER_PREFIX + "w", Array(np.full(3, fisher, np.float32)))])
    metrics = MetricRecord({"num-examples": 10, "fisher-examples": n_fisher,
                            "partition-id": node, "task": 0})
    return Message(RecordDict({"arrays": ArrayRecord(arrays), "metrics": metrics}),
                   reply_to=ins)


class _Grid:
    def get_node_ids(self) -> list[int]:
        return [1, 2]


@pytest.fixture
def task_identity() -> Iterator[None]:
    """Messages built outside an engine need Flower's task identity set."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


@pytest.mark.usefixtures("task_identity")
def test_fisher_sharing_strips_averages_and_sends_back() -> None:
    inner = _Recorder()
    sharing = FisherSharing(inner)
    arrays, _ = sharing.aggregate_train(1, [_reply(1, 1.0, 2.0, 30), _reply(2, 3.0, 6.0, 10)])
    # The inner strategy saw the model alone and averaged it by num-examples.
    assert all(list(r.content.array_records["arrays"]) == ["w"] for r in inner.seen)
    assert arrays is not None and np.allclose(arrays["w"].numpy(), 2.0)
    # The Fishers were averaged by fisher-examples: (30 * 2 + 10 * 6) / 40 = 3.
    assert sharing.fisher is not None and np.allclose(sharing.fisher["w"], 3.0)
    assert [r["partition-id"] for r in sharing.rows] == [1, 2]
    grid: Any = _Grid()
    msgs = list(sharing.configure_train(2, ArrayRecord(OrderedDict(
        [("w", Array(np.zeros(3, np.float32)))])), ConfigRecord(), grid))
    assert len(msgs) == 2
    for m in msgs:
        assert np.allclose(m.content.array_records[FLEET_FISHER_KEY]["w"].numpy(), 3.0)


def test_fisher_sharing_goes_innermost() -> None:
    inner = FedAvg()
    outer, sharing = with_fisher_sharing(DeadlineStrategy(inner, 5.0))
    assert isinstance(outer, DeadlineStrategy) and outer.inner is sharing
    assert sharing.inner is inner
    alone, s2 = with_fisher_sharing(inner)
    assert alone is s2 and s2.inner is inner


def _doc(method: str) -> dict[str, Any]:
    """A 2-task class-incremental fleet of MCUs and Raspberry Pis."""
    return {
        "name": f"cl-test-{method}", "seed": 3, "rounds": 8,
        "fleet": {"size": 8, "mix": {"stm32f746": 0.5, "rpi4": 0.5}},
        "data": {"source": "digits", "partition": "iid", "samples_per_device": 160},
        "model": {"name": "mlp", "args": {"hidden": 32, "depth": 1}},
        "train": {"local_epochs": 2, "batch_size": 8, "lr": 0.2},
        "strategy": {"fraction_train": 1.0, "min_train": 2},
        "continual": {"kind": "class-incremental", "num_tasks": 2, "num_classes": 10,
                      "classes_per_task": 5, "rounds_per_task": 4, "offset": 1,
                      "method": method, "replay_fraction": 0.05, "class_balanced": True,
                      "replay_batch_size": 16},
    }


@pytest.mark.slow
def test_a_fleet_with_replay_end_to_end(tmp_path: Path) -> None:
    doc = _doc("replay")
    res = run_experiment(from_doc(doc), tmp_path)
    assert res.summary["failures"] == 0
    with (tmp_path / "rounds.csv").open() as f:
        rows = list(csv.DictReader(f))
    for col in ("acc_task_0", "acc_task_1", "avg_acc", "forgetting", "bwt"):
        assert col in rows[0]
    assert rows[0]["acc_task_1"] == "" and rows[-1]["acc_task_1"] != ""
    assert float(rows[-1]["accuracy"]) == pytest.approx(float(rows[-1]["avg_acc"]))
    assert (tmp_path / "continual.png").stat().st_size > 0
    # Replay never exceeds the device's budget, and on the MCUs the budget binds.
    profiles = assign_profiles(doc["fleet"]["mix"], doc["fleet"]["size"], doc["seed"])
    with (tmp_path / "continual_devices.csv").open() as f:
        dev = list(csv.DictReader(f))
    assert len(dev) == doc["rounds"] * doc["fleet"]["size"]
    full = 0
    for r in dev:
        p = load_profile(profiles[int(r["partition-id"])])
        cap = replay_capacity(p.ram_bytes, p.storage_bytes, sample_nbytes((1, 8, 8)), 0.05)
        assert int(r["replay-capacity"]) == cap
        assert int(r["replay-size"]) <= cap
        full += p.device_class == "mcu" and int(r["replay-size"]) == cap
        assert int(r["state-bytes"]) <= p.storage_bytes
    assert full > 0
    assert any(int(r["replayed-examples"]) > 0 for r in dev)
    # Fine-tuning on the same fleet forgets the first task more.
    ft = run_experiment(from_doc(_doc("finetune")))
    assert float(rows[-1]["forgetting"]) < float(ft.rounds[-1]["forgetting"])
    # The replayed examples are charged: more emulated compute than fine-tuning.
    def compute(devices: list[dict[str, Any]]) -> float:
        return sum(float(d["compute_s"]) for d in devices if d["message_type"] == "train")

    assert compute(res.devices) > 1.5 * compute(ft.devices)
