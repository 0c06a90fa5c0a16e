"""Resource guard: estimates scale with what a run holds; runs that do not fit are refused
or throttled up front (small ``available_bytes`` injected), with a message saying why."""

from __future__ import annotations

from pathlib import Path

import pytest

import clients.client_app
from devices.errors import ConfigError
from sim import guard
from sim.config import ExperimentConfig, from_doc, load_config
from sim.guard import RAY_BASE_BYTES, available_memory_bytes, check_resources

ROOT = Path(__file__).resolve().parents[1]
HUGE = 1 << 50


def _cfg(**over: object) -> ExperimentConfig:
    return load_config(ROOT / "configs" / "default.toml").with_overrides(**over)


def test_local_plan_counts_the_model_and_fits() -> None:
    cfg = _cfg()
    plan = check_resources(cfg, backend="local", actors=0, available_bytes=HUGE)
    model = clients.client_app.build_training_model(cfg.client)
    assert plan.model_bytes == sum(t.numel() * t.element_size()
                                   for t in model.state_dict().values())
    assert plan.sampled == 20  # 0.2 of 100 devices
    assert plan.actors == 0 and not plan.throttled and plan.worker_bytes == 0
    # at least the three copies of every sampled device's model, and the data
    assert plan.driver_bytes >= 3 * plan.sampled * plan.model_bytes + plan.data_bytes
    assert plan.total_bytes == plan.driver_bytes
    assert "GB available" in plan.describe()


def test_estimate_grows_with_the_round_and_the_model() -> None:
    small = check_resources(_cfg(), backend="local", actors=0, available_bytes=HUGE)
    wide = check_resources(_cfg(**{"strategy.fraction_train": 0.6}), backend="local",
                           actors=0, available_bytes=HUGE)
    big = check_resources(_cfg(**{"model.args": 'json:{"width": 32}'}), backend="local",
                          actors=0, available_bytes=HUGE)
    assert wide.sampled == 3 * small.sampled
    per_device = (wide.driver_bytes - small.driver_bytes) / (wide.sampled - small.sampled)
    assert per_device >= 3 * small.model_bytes
    assert big.model_bytes > 4 * small.model_bytes and big.driver_bytes > small.driver_bytes


def test_ray_plan_counts_each_worker() -> None:
    plan = check_resources(_cfg(), backend="ray", actors=3, available_bytes=HUGE)
    assert plan.actors == 3 and not plan.throttled
    assert plan.worker_bytes >= guard.RAY_WORKER_BYTES + plan.data_bytes
    assert plan.total_bytes == plan.driver_bytes + 3 * plan.worker_bytes + RAY_BASE_BYTES


def test_throttles_actors_to_what_fits() -> None:
    two = check_resources(_cfg(), backend="ray", actors=2, available_bytes=HUGE).total_bytes
    four = check_resources(_cfg(), backend="ray", actors=4, available_bytes=HUGE).total_bytes
    assert four > two
    plan = check_resources(_cfg(), backend="ray", actors=4, available_bytes=two + 1)
    assert plan.actors == 2 and plan.throttled and plan.requested_actors == 4
    assert plan.total_bytes <= plan.available_bytes
    assert "throttled from 4" in plan.describe()


def test_refuses_when_one_actor_does_not_fit() -> None:
    with pytest.raises(ConfigError) as info:
        check_resources(_cfg(), backend="ray", actors=2, available_bytes=100 * 2**20)
    msg = str(info.value)
    for words in ("this run needs about", "GB", "0.10 GB available", "1 Ray actor",
                  "reduce fleet.size (now 100)", "strategy.fraction_train (now 0.2)",
                  "engine.actors (now 2)"):
        assert words in msg, msg


def test_refuses_a_local_run_beyond_memory() -> None:
    cfg = _cfg(**{"model.name": "resnet18", "model.args": "json:{}",
                  "fleet.mix": 'json:{"rpi4": 1.0}'})
    plan = check_resources(cfg, backend="local", actors=0, available_bytes=HUGE)
    assert plan.model_bytes > 40 * 2**20  # ResNet-18: 11 M parameters
    with pytest.raises(ConfigError, match=r"needs about .* 'resnet18'"):
        check_resources(cfg, backend="local", actors=0,
                        available_bytes=plan.driver_bytes - 1)
    assert check_resources(cfg, backend="local", actors=0,
                           available_bytes=plan.driver_bytes).driver_bytes == plan.driver_bytes


def test_huge_data_is_refused_before_it_is_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_loading(*_: object) -> None:
        raise AssertionError("the guard loaded data it had already judged too large")

    monkeypatch.setattr(clients.client_app, "build_training_model", no_loading)
    cfg = from_doc({"fleet": {"size": 10}, "data": {"source": "synthetic",
                                                     "image_size": 4096, "channels": 3}})
    with pytest.raises(ConfigError, match="data alone.*data.image_size"):
        check_resources(cfg, backend="local", actors=0)


def test_remote_cluster_checks_only_the_driver() -> None:
    cfg = _cfg(**{"engine.ray_address": "10.0.0.1:6379"})
    plan = check_resources(cfg, backend="ray", actors=0, available_bytes=300 * 2**20)
    assert plan.actors == 0 and plan.worker_bytes == 0 and not plan.throttled
    with pytest.raises(ConfigError, match="workers are remote"):
        check_resources(cfg, backend="ray", actors=0, available_bytes=2 * 2**20)


def test_bad_arguments_and_model_args() -> None:
    with pytest.raises(ConfigError, match="engine.backend"):
        check_resources(_cfg(), backend="mpi", actors=0)
    with pytest.raises(ConfigError, match="engine.actors"):
        check_resources(_cfg(), backend="ray", actors=-1)
    with pytest.raises(ConfigError, match="model.args"):
        check_resources(_cfg(**{"model.args": 'json:{"width": -1}'}), backend="local",
                        actors=0, available_bytes=HUGE)


def test_available_memory_is_plausible() -> None:
    avail = available_memory_bytes()
    total = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    assert 0 < avail <= total
