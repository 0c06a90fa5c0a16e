"""Tests of clients.continual: streams, replay budget, metrics, and a small forgetting check."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.datasets import load_digits

from clients.continual import (
    ContinualMethod,
    ReplayBuffer,
    StreamSchedule,
    accuracy_row,
    aggregate_fisher,
    apply_domain,
    average_accuracy,
    backward_transfer,
    continual_from_config,
    ewc_penalty,
    fisher_diagonal,
    forgetting,
    make_task_data,
    pending_fisher,
    replay_capacity,
    rotate_images,
    sample_nbytes,
    set_pending_fisher,
    task_matrix,
    train_local,
)
from clients.models import MLP
from devices.errors import BudgetError, ConfigError, DataError, PayloadError


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(y))
    return x[perm], y[perm]


# -- schedules -------------------------------------------------------------------------------


def test_schedule_without_offsets_switches_every_rounds_per_task() -> None:
    s = StreamSchedule(num_tasks=3, rounds_per_task=4, first_round=1)
    assert [s.task_at(r, 7) for r in range(1, 15)] == [0] * 4 + [1] * 4 + [2] * 6
    assert s.seen_tasks(6, 7) == [0, 1]
    assert s.seen_tasks(1, 7) == [0]


def test_schedule_is_deterministic_and_devices_differ() -> None:
    kw = dict(num_tasks=5, rounds_per_task=6, offset=3, jitter=2, seed=11)
    a, b = StreamSchedule(**kw), StreamSchedule(**kw)  # type: ignore[arg-type]
    tables = {d: [a.task_at(r, d) for r in range(1, 40)] for d in range(20)}
    assert all(tables[d] == [b.task_at(r, d) for r in range(1, 40)] for d in range(20))
    assert len({tuple(t) for t in tables.values()}) > 1  # devices do not all shift together
    for d in range(20):
        bounds = a.boundaries(d)
        assert all(x < y for x, y in zip(bounds, bounds[1:], strict=False))
        nominal = [1 + k * 6 for k in range(1, 5)]
        assert all(-2 <= b - n <= 3 + 2 for b, n in zip(bounds, nominal, strict=True))
        assert tables[d] == sorted(tables[d]) and tables[d][-1] == 4
    other = StreamSchedule(**{**kw, "seed": 12})  # type: ignore[arg-type]
    assert [other.boundaries(d) for d in range(20)] != [a.boundaries(d) for d in range(20)]
    assert a.boundaries("jetson-3") == b.boundaries("jetson-3")


def test_schedule_rejects_bad_fields() -> None:
    with pytest.raises(ConfigError, match="kind"):
        StreamSchedule(kind="shuffle")
    with pytest.raises(ConfigError, match="jitter"):
        StreamSchedule(rounds_per_task=4, jitter=2)
    with pytest.raises(ConfigError, match="num_tasks"):
        StreamSchedule(num_tasks=6, classes_per_task=2)
    with pytest.raises(ConfigError, match="task"):
        StreamSchedule(num_tasks=2).task_spec(2)


def test_class_incremental_filters_classes(digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digits
    s = StreamSchedule(kind="class-incremental", num_tasks=5)
    seen: set[int] = set()
    for t in range(5):
        xt, yt = make_task_data(x, y, t, s)
        assert set(np.unique(yt).tolist()) == {2 * t, 2 * t + 1}
        assert len(xt) == int(np.isin(y, [2 * t, 2 * t + 1]).sum())
        np.testing.assert_array_equal(xt, x[np.isin(y, [2 * t, 2 * t + 1])])  # untouched
        seen |= set(yt.tolist())
    assert seen == set(range(10))


def test_domain_shift_keeps_classes_and_changes_inputs(
    digits: tuple[np.ndarray, np.ndarray],
) -> None:
    x, y = digits[0][:200], digits[1][:200]
    s = StreamSchedule(kind="domain-shift", num_tasks=4, seed=3)
    x0, y0 = make_task_data(x, y, 0, s)
    np.testing.assert_array_equal(x0, x)
    names = []
    for t in range(1, 4):
        xt, yt = make_task_data(x, y, t, s, seed=5)
        again, _ = make_task_data(x, y, t, s, seed=5)
        np.testing.assert_array_equal(xt, again)  # deterministic
        np.testing.assert_array_equal(yt, y)
        assert xt.shape == x.shape and xt.dtype == np.float32
        assert xt.min() >= 0.0 and xt.max() <= 1.0
        assert np.abs(xt - x).mean() > 0.02
        names.append(s.task_spec(t).domain)
    assert names == ["rotation", "noise", "contrast"]
    noisy_a, _ = make_task_data(x, y, 2, s, seed=5)
    noisy_b, _ = make_task_data(x, y, 2, s, seed=6)
    assert not np.array_equal(noisy_a, noisy_b)  # per-device noise realisation
    assert s.task_spec(1) == StreamSchedule(kind="domain-shift", num_tasks=4, seed=3).task_spec(1)


def test_mix_changes_classes_and_domain() -> None:
    s = StreamSchedule(kind="mix", num_tasks=8, seed=1)
    specs = [s.task_spec(t) for t in range(8)]
    assert [sp.classes for sp in specs[:5]] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    assert specs[5].classes == (0, 1)
    assert [sp.domain for sp in specs[:4]] == ["identity", "rotation", "noise", "contrast"]


def test_rotation_numerics() -> None:
    rng = np.random.default_rng(0)
    x = rng.random((3, 2, 9, 9)).astype(np.float32)
    np.testing.assert_allclose(rotate_images(x, 0.0), x, atol=1e-6)
    # A quarter turn of a square image is a pure permutation of pixels (no interpolation).
    np.testing.assert_allclose(rotate_images(x, 90.0), np.rot90(x, 1, axes=(2, 3)), atol=1e-5)
    np.testing.assert_allclose(rotate_images(rotate_images(x, 90.0), -90.0), x, atol=1e-5)
    with pytest.raises(DataError):
        apply_domain(x[0], "rotation", 10.0, rng)
    with pytest.raises(DataError, match="domain"):
        apply_domain(x, "blur", 1.0, rng)


# -- replay ----------------------------------------------------------------------------------


def test_replay_capacity_from_budget() -> None:
    per = sample_nbytes((1, 8, 8))
    assert per == 64 * 4 + 8 + 8
    mcu = replay_capacity(320 * 1024, 1024 * 1024, per, fraction=0.05)
    jetson = replay_capacity(4 * 1024**3, 16 * 1024**3, per, fraction=0.05)
    assert 24 <= mcu <= 100  # a few dozen digits
    assert jetson > 1000
    assert mcu == int(0.05 * 320 * 1024 // per)
    with pytest.raises(BudgetError, match="fraction"):
        replay_capacity(1, 1, 1, fraction=0.0)
    with pytest.raises(BudgetError):
        replay_capacity(0, 1, 1)


@settings(max_examples=40, deadline=None)
@given(
    capacity=st.integers(0, 12),
    balanced=st.booleans(),
    batches=st.lists(st.lists(st.integers(0, 4), min_size=0, max_size=15), max_size=6),
    seed=st.integers(0, 3),
)
def test_replay_never_exceeds_capacity(
    capacity: int, balanced: bool, batches: list[list[int]], seed: int
) -> None:
    buf = ReplayBuffer(capacity, class_balanced=balanced, seed=seed)
    counter = 0
    for labels in batches:
        y = np.asarray(labels, dtype=np.int64)
        x = (np.arange(len(y), dtype=np.float32) + counter).reshape(-1, 1, 1, 1)
        counter += len(y)
        buf.add(x, y)
        assert len(buf) <= capacity
        assert len(buf) == min(capacity, counter)  # distinct samples fill it up first
        back = ReplayBuffer.from_state(buf.to_state())
        assert len(back) == len(buf) and back.seen == buf.seen
        np.testing.assert_array_equal(back.y, buf.y)
        buf = back  # continue from the round-tripped buffer, as the store would


def test_replay_reservoir_is_uniform_and_deduplicates() -> None:
    buf = ReplayBuffer(50, seed=0)
    x = np.arange(1000, dtype=np.float32).reshape(-1, 1, 1, 1)
    y = np.zeros(1000, dtype=np.int64)
    for s in range(0, 1000, 100):
        buf.add(x[s:s + 100], y[s:s + 100])
    assert len(buf) == 50 and buf.seen == 1000
    kept = buf.x.reshape(-1)
    assert len(np.unique(kept)) == 50
    assert 200 < kept.mean() < 800  # not biased to the first or the last batches
    before = buf.to_state()
    assert buf.add(buf.x, buf.y) == 0  # offering stored samples again changes nothing
    np.testing.assert_array_equal(buf.to_state()["x"], before["x"])


def test_class_balanced_keeps_rare_classes() -> None:
    y = np.asarray([0] * 900 + [1] * 60 + [2] * 40, dtype=np.int64)
    x = np.arange(len(y), dtype=np.float32).reshape(-1, 1, 1, 1)
    plain, balanced = ReplayBuffer(30, seed=1), ReplayBuffer(30, class_balanced=True, seed=1)
    plain.add(x, y)
    balanced.add(x, y)
    assert balanced.class_counts() == {0: 10, 1: 10, 2: 10}
    assert plain.class_counts().get(2, 0) < 10


def test_replay_state_errors() -> None:
    buf = ReplayBuffer(4)
    buf.add(np.zeros((3, 1, 2, 2), np.float32), np.arange(3))
    state = buf.to_state()
    with pytest.raises(PayloadError, match="missing"):
        ReplayBuffer.from_state({k: v for k, v in state.items() if k != "keys"})
    with pytest.raises(PayloadError):
        ReplayBuffer.from_state({**state, "y": np.arange(5)})
    with pytest.raises(PayloadError, match="shape"):
        buf.add(np.zeros((1, 1, 3, 3), np.float32), np.zeros(1, np.int64))


# -- metrics ---------------------------------------------------------------------------------


def test_metrics_on_a_hand_made_matrix() -> None:
    R = np.array([
        [0.9, np.nan, np.nan],
        [0.6, 0.8, np.nan],
        [0.5, 0.7, 0.95],
    ])
    assert average_accuracy(R) == pytest.approx((0.5 + 0.7 + 0.95) / 3)
    # task 0: best earlier 0.9, now 0.5 -> 0.4; task 1: best earlier 0.8, now 0.7 -> 0.1
    assert forgetting(R) == pytest.approx(0.25)
    # BWT: (R[2,0] - R[0,0] + R[2,1] - R[1,1]) / 2 = (-0.4 - 0.1) / 2
    assert backward_transfer(R) == pytest.approx(-0.25)
    # Forgetting uses the best earlier value, BWT the value right after training the task.
    R2 = np.array([[0.5, np.nan], [0.9, 0.6], [0.7, 0.8]])
    assert forgetting(R2) == pytest.approx(0.2)
    assert backward_transfer(task_matrix(R2[[0, 2]], [0, 1])) == pytest.approx(0.2)
    assert forgetting([[0.7]]) == 0.0 and backward_transfer([[0.7]]) == 0.0
    with pytest.raises(DataError, match="square"):
        backward_transfer(R2)


def test_task_matrix_picks_each_tasks_last_round() -> None:
    rounds = np.array([[0.5, np.nan], [0.8, np.nan], [0.6, 0.4], [0.5, 0.9]])
    np.testing.assert_array_equal(task_matrix(rounds, [0, 0, 1, 1]), rounds[[1, 3]])
    with pytest.raises(DataError):
        task_matrix(rounds, [1, 0, 1, 1])


# -- EWC numerics ----------------------------------------------------------------------------


def test_fisher_is_mean_squared_per_sample_gradient(digits: tuple[np.ndarray, np.ndarray]) -> None:
    torch.manual_seed(0)
    model = MLP(64, 8, 1, 10)
    x, y = digits[0][:12], digits[1][:12]
    fisher = fisher_diagonal(model, x, y, chunk=5)
    ref = {n: np.zeros(p.shape) for n, p in model.named_parameters()}
    for i in range(len(x)):
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x[i:i + 1])),
                                                 torch.from_numpy(y[i:i + 1]))
        loss.backward()
        for n, p in model.named_parameters():
            assert p.grad is not None
            ref[n] += p.grad.numpy() ** 2 / len(x)
    for n in ref:
        np.testing.assert_allclose(fisher[n], ref[n], rtol=1e-4, atol=1e-8)


def test_aggregate_fisher_and_penalty() -> None:
    a = {"w": np.array([1.0, 0.0]), "b": np.array([2.0])}
    b = {"w": np.array([0.0, 3.0]), "b": np.array([4.0])}
    mean = aggregate_fisher([a, b], [1.0, 3.0])
    np.testing.assert_allclose(mean["w"], [0.25, 2.25])
    np.testing.assert_allclose(mean["b"], [3.5])
    with pytest.raises(PayloadError):
        aggregate_fisher([a, {"w": a["w"]}], [1, 1])
    with pytest.raises(PayloadError):
        aggregate_fisher([a], [1, 2])
    lin = torch.nn.Linear(2, 1)
    anchor = {n: p.detach().clone() for n, p in lin.named_parameters()}
    fisher = {n: torch.full_like(p, 2.0) for n, p in lin.named_parameters()}
    assert float(ewc_penalty(lin, fisher, anchor, 10.0).detach()) == 0.0
    with torch.no_grad():
        lin.weight += 0.5
    # lam/2 * sum F (dw)^2 = 5 * 2 * (0.25 + 0.25)
    assert float(ewc_penalty(lin, fisher, anchor, 10.0).detach()) == pytest.approx(5.0)


# -- methods and train_local -----------------------------------------------------------------


def test_method_config() -> None:
    m = ContinualMethod.from_config({"method": "replay", "replay_capacity": 40})
    assert m.name == "replay" and m.uses_replay and not m.uses_ewc
    with pytest.raises(ConfigError, match="unknown"):
        ContinualMethod.from_config({"method": "replay", "capacity": 4})
    with pytest.raises(ConfigError, match="method"):
        ContinualMethod("si")


def _two_task_run(
    digits: tuple[np.ndarray, np.ndarray], method: ContinualMethod, seed: int
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    x, y = digits
    s = StreamSchedule(kind="class-incremental", num_tasks=2, rounds_per_task=1)
    train = [make_task_data(x[:1400], y[:1400], t, s) for t in range(2)]
    test = [make_task_data(x[1400:], y[1400:], t, s) for t in range(2)]
    torch.manual_seed(seed)
    model = MLP(64, 64, 1, 10)
    state: dict[str, np.ndarray] = {}
    rows = []
    for t in range(2):
        _, state = train_local(model, *train[t], method=method, epochs=3, batch_size=16,
                               lr=0.1, state=state, task=t, seed=seed)
        rows.append(accuracy_row(model, test))
    return np.array(rows), state


def test_replay_reduces_forgetting_against_finetune(
    digits: tuple[np.ndarray, np.ndarray],
) -> None:
    torch.set_num_threads(1)
    for seed in (0, 1):
        ft, _ = _two_task_run(digits, ContinualMethod("finetune"), seed)
        rp, state = _two_task_run(digits, ContinualMethod("replay", replay_capacity=60), seed)
        assert ft[0, 0] > 0.9 and rp[0, 0] > 0.9  # both learn task 0 first
        assert forgetting(ft) > 0.8  # class-incremental fine-tuning forgets task 0 ...
        assert forgetting(rp) < forgetting(ft) - 0.5  # ... a 60-sample replay mostly does not
        assert rp[1, 0] > 0.7 and rp[1, 1] > 0.7
        assert len(state["replay/y"]) == 60  # the buffer is in the returned state


def test_train_local_state_round_trip_and_boundaries(
    digits: tuple[np.ndarray, np.ndarray],
) -> None:
    x, y = digits[0][:64], digits[1][:64]
    torch.manual_seed(0)
    model = MLP(64, 16, 1, 10)
    m = ContinualMethod("replay+ewc", replay_capacity=20, ewc_lambda=10.0, fisher_samples=32)
    metrics, s1 = train_local(model, x, y, method=m, epochs=1, batch_size=16, lr=0.05,
                              state=None, task=0)
    assert "ewc_penalty" not in metrics  # nothing to protect before the first boundary
    assert set(pending_fisher(s1)) == {n for n, _ in model.named_parameters()}
    assert not any(k.startswith("ewc/fisher/") for k in s1)
    assert metrics["replay_size"] == 20 and int(s1["task"][0]) == 0
    fleet = {k: np.full_like(v, 0.5) for k, v in pending_fisher(s1).items()}
    s1 = set_pending_fisher(s1, fleet)  # as if the server sent the fleet's mean back
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    metrics, s2 = train_local(model, x, y, method=m, epochs=1, batch_size=16, lr=0.05,
                              state=s1, task=1)
    assert metrics["ewc_penalty"] > 0.0
    for n, a in anchor.items():  # consolidated at the boundary: anchor = received weights
        np.testing.assert_array_equal(s2[f"ewc/anchor/{n}"], a.numpy())
        np.testing.assert_array_equal(s2[f"ewc/fisher/{n}"], fleet[n])
    # Same task again: no new consolidation, Fisher and anchor stay.
    _, s3 = train_local(model, x, y, method=m, epochs=1, batch_size=16, lr=0.05,
                        state=s2, task=1)
    for n in anchor:
        np.testing.assert_array_equal(s3[f"ewc/anchor/{n}"], s2[f"ewc/anchor/{n}"])


def test_ewc_and_lwf_hold_the_model_near_the_old_one(
    digits: tuple[np.ndarray, np.ndarray],
) -> None:
    """EWC keeps the Fisher-weighted drift from the task-0 model below fine-tuning's; LwF
    keeps more of the old task's accuracy than fine-tuning."""
    torch.set_num_threads(1)
    x, y = digits
    s = StreamSchedule(kind="class-incremental", num_tasks=2, rounds_per_task=1)
    t0, t1 = (make_task_data(x[:1400], y[:1400], t, s) for t in range(2))
    test0 = make_task_data(x[1400:], y[1400:], 0, s)
    drift, acc0 = {}, {}
    for name in ("finetune", "ewc", "lwf"):
        torch.manual_seed(0)
        model = MLP(64, 64, 1, 10)
        m = ContinualMethod(name, ewc_lambda=1000.0, fisher_samples=512)
        _, st_ = train_local(model, *t0, method=m, epochs=3, batch_size=16, lr=0.1, task=0)
        anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
        fisher = {n: torch.from_numpy(f) for n, f in fisher_diagonal(model, *t0).items()}
        train_local(model, *t1, method=m, epochs=3, batch_size=16, lr=0.1, state=st_, task=1)
        drift[name] = float(ewc_penalty(model, fisher, anchor, 2.0).detach())
        acc0[name] = float(accuracy_row(model, [test0])[0])
    assert drift["ewc"] < 0.5 * drift["finetune"]
    assert acc0["lwf"] > acc0["finetune"] + 0.3


def test_train_local_on_an_empty_task_and_extra_work(
    digits: tuple[np.ndarray, np.ndarray],
) -> None:
    """A device whose shard has none of the task's classes trains nothing and keeps state."""
    torch.manual_seed(0)
    model = MLP(64, 8, 1, 10)
    x, y = digits[0][:40], digits[1][:40]
    m = ContinualMethod("lwf")
    metrics, s1 = train_local(model, x, y, method=m, epochs=1, batch_size=8, lr=0.05, task=0)
    assert "teacher_examples" not in metrics  # no teacher before the first boundary
    metrics, s2 = train_local(model, x, y, method=m, epochs=2, batch_size=8, lr=0.05,
                              state=s1, task=1)
    assert metrics["teacher_examples"] == 2 * len(x) and metrics["distill"] >= 0.0
    assert any(k.startswith("lwf/teacher/") for k in s2)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    empty_x, empty_y = x[:0], y[:0]
    for name in ("replay", "ewc", "lwf"):
        m = ContinualMethod(name, replay_capacity=8)
        metrics, s3 = train_local(model, empty_x, empty_y, method=m, epochs=1, batch_size=8,
                                  lr=0.05, state=s2, task=1)
        assert metrics["steps"] == 0.0 and metrics["examples"] == 0.0
        assert int(s3["task"][0]) == 1
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[k])


def test_accuracy_row_marks_unseen_tasks(digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digits
    s = StreamSchedule(kind="class-incremental", num_tasks=5, rounds_per_task=2)
    tasks = [make_task_data(x[:300], y[:300], t, s) for t in range(5)]
    model = MLP(64, 8, 1, 10)
    row = accuracy_row(model, tasks, only=s.seen_tasks(4, 0))
    assert np.isfinite(row[:2]).all() and np.isnan(row[2:]).all()
    assert ((row[:2] >= 0) & (row[:2] <= 1)).all()


def test_continual_config_table() -> None:
    sched, method = continual_from_config({
        "kind": "domain-shift", "num_tasks": 3, "domains": ["noise", "contrast"],
        "offset": 1, "method": "replay", "replay_fraction": 0.05, "seed": 4,
    })
    assert sched.domains == ("noise", "contrast") and sched.seed == 4
    assert method.name == "replay" and method.seed == 4
    mcu = method.for_device(320 * 1024, 1024 * 1024, (1, 8, 8))
    jetson = method.for_device(4 * 1024**3, 16 * 1024**3, (1, 8, 8))
    assert mcu.replay_capacity == replay_capacity(320 * 1024, 1024 * 1024,
                                                  sample_nbytes((1, 8, 8)), 0.05)
    assert jetson.replay_capacity > 100 * mcu.replay_capacity
    with pytest.raises(ConfigError, match="unknown"):
        continual_from_config({"kind": "mix", "capacity": 3})
    with pytest.raises(ConfigError, match="num_tasks"):
        continual_from_config({"num_tasks": "5"})
    with pytest.raises(ConfigError, match="replay_fraction"):
        continual_from_config({"method": "replay", "replay_fraction": 2.0})


def test_a_small_fleet_loop_with_shared_fisher(digits: tuple[np.ndarray, np.ndarray]) -> None:
    """The protocol a ClientApp follows: per-device tasks and stores, FedAvg, fleet Fisher."""
    torch.set_num_threads(1)
    x, y = digits[0][:400], digits[1][:400]
    sched = StreamSchedule(kind="domain-shift", num_tasks=2, rounds_per_task=2, offset=2,
                           seed=3)
    devices = list(range(8))
    shards = {d: (x[d::8], y[d::8]) for d in devices}
    base = ContinualMethod("replay+ewc", replay_fraction=0.05, ewc_lambda=10.0,
                           fisher_samples=32)
    store: dict[int, dict[str, np.ndarray]] = {}
    torch.manual_seed(0)
    global_model = MLP(64, 16, 1, 10)
    fleet_fisher: dict[str, np.ndarray] | None = None
    tasks_by_round = []
    for rnd in range(1, 7):
        tasks_by_round.append([sched.task_at(rnd, d) for d in devices])
        updates, fishers, weights = [], [], []
        for d in devices:
            task = sched.task_at(rnd, d)
            xt, yt = make_task_data(*shards[d], task, sched, seed=d)
            model = MLP(64, 16, 1, 10)
            model.load_state_dict(global_model.state_dict())
            state = store.get(d, {})
            if fleet_fisher is not None:
                state = set_pending_fisher(state, fleet_fisher)
            method = base.for_device(320 * 1024, 1024 * 1024, (1, 8, 8))
            metrics, store[d] = train_local(model, xt, yt, method=method, epochs=1,
                                            batch_size=8, lr=0.05, state=state, task=task,
                                            seed=rnd * 10 + d)
            assert metrics["replay_size"] <= method.replay_capacity
            assert metrics["state_bytes"] == sum(v.nbytes for v in store[d].values())
            updates.append(model.state_dict())
            fishers.append(pending_fisher(store[d]))
            weights.append(metrics["fisher_examples"])
        global_model.load_state_dict({k: torch.stack([u[k] for u in updates]).mean(0)
                                      for k in updates[0]})
        fleet_fisher = aggregate_fisher(fishers, weights)
    # Offsets make devices switch in different rounds; all reach task 1 in the end.
    assert any(len(set(row)) > 1 for row in tasks_by_round)
    assert tasks_by_round[-1] == [1] * 8
    assert sched.tasks_reached(1, devices) == [0] and sched.tasks_reached(6, devices) == [0, 1]
    for d in devices:  # each device consolidated the fleet's Fisher at its boundary
        assert any(k.startswith("ewc/fisher/") for k in store[d])
        assert 0 < len(store[d]["replay/y"]) <= base.for_device(
            320 * 1024, 1024 * 1024, (1, 8, 8)).replay_capacity
