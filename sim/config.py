"""Experiment configs: a TOML file, validated field by field, and its run-config form.

A config has these tables (all optional but ``fleet``; defaults in the dataclasses)::

    seed = 1
    rounds = 10
    [fleet]     size, mix = {stm32f746 = 0.7, rpi4 = 0.2, "jetson-nano" = 0.1}, profiles_dir
    [data]      source, partition, alpha, test_fraction, path, samples_per_device, ...
    [model]     name, args = {...}
    [train]     local_epochs, batch_size, lr, momentum, optimizer, precision, on_budget, ...
    [strategy]  name, fraction_train, fraction_evaluate, min_available, deadline_s,
                timeout_s, args = {...}
    [engine]    name ("tinyfleet" | "flower"), backend ("local" | "ray"), actors, ray_address
    [availability] kind ("always" | "trace" | "diurnal"), path, period_s, always_on_share

Every error names the field (``train.lr: expected a number > 0, got -1``). The whole
document travels to the apps flattened into Flower's run config (``clients.spec``).
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clients.spec import ClientSpec, build_dataclass, flatten, unflatten
from devices.errors import ConfigError, ProfileError
from devices.fleet import profile_counts
from devices.profiles import load_profile, register_profile_dir

__all__ = [
    "AvailabilitySpec",
    "EngineSpec",
    "ExperimentConfig",
    "StrategySpec",
    "load_config",
]

_STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedbuff")
_TOP_LEVEL = {"seed", "rounds", "fleet", "data", "model", "train", "strategy", "engine",
              "availability", "name", "description", "compression", "faults", "tinyfleet"}


@dataclass(frozen=True)
class StrategySpec:
    """Server-side aggregation.

    ``deadline_s`` (0: none) wraps the strategy in ``strategies.DeadlineStrategy``;
    ``timeout_s`` is the engine's emulated wait per round (Flower's default 3600 s).
    ``args`` go to the Flower strategy's constructor (e.g. ``eta`` for FedAdam).
    """

    name: str = "fedavg"
    fraction_train: float = 0.2
    fraction_evaluate: float = 0.0
    min_available: int = 2
    min_train: int = 2
    deadline_s: float = 0.0
    timeout_s: float = 3600.0
    args: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in _STRATEGIES:
            raise ConfigError(f"name: expected one of {_STRATEGIES}, got {self.name!r}")
        for f in ("fraction_train", "fraction_evaluate"):
            v = getattr(self, f)
            if not 0 <= v <= 1:
                raise ConfigError(f"{f}: expected a number in [0, 1], got {v}")
        if self.min_available < 1 or self.min_train < 1:
            raise ConfigError("min_available, min_train: expected integers >= 1")
        if self.deadline_s < 0 or not self.timeout_s > 0:
            raise ConfigError("deadline_s: expected >= 0; timeout_s: expected > 0")


@dataclass(frozen=True)
class EngineSpec:
    """Which engine runs the apps, and where."""

    name: str = "tinyfleet"
    backend: str = "local"
    actors: int = 0
    ray_address: str = ""

    def __post_init__(self) -> None:
        if self.name not in ("tinyfleet", "flower"):
            raise ConfigError(f"name: expected 'tinyfleet' or 'flower', got {self.name!r}")
        if self.backend not in ("local", "ray"):
            raise ConfigError(f"backend: expected 'local' or 'ray', got {self.backend!r}")
        if self.actors < 0:
            raise ConfigError(f"actors: expected an integer >= 0, got {self.actors}")


@dataclass(frozen=True)
class AvailabilitySpec:
    """When devices are online (see ``sim.availability``)."""

    kind: str = "always"
    path: str = ""
    period_s: float = 86400.0
    always_on_share: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("always", "trace", "diurnal"):
            raise ConfigError(
                f"kind: expected 'always', 'trace' or 'diurnal', got {self.kind!r}"
            )
        if self.kind == "trace" and not self.path:
            raise ConfigError("path: kind 'trace' needs the path of a CSV or JSON trace")


@dataclass(frozen=True)
class ExperimentConfig:
    """A validated experiment: what the clients need, plus server and engine settings."""

    client: ClientSpec
    rounds: int
    strategy: StrategySpec
    engine: EngineSpec
    availability: AvailabilitySpec
    doc: Mapping[str, Any]
    source: str = ""

    @property
    def seed(self) -> int:
        """The run seed."""
        return self.client.seed

    def with_overrides(self, **top: Any) -> ExperimentConfig:
        """A copy with top-level or dotted fields replaced (``seed=2``, ``"train.lr"=0.1``)."""
        flat = flatten(self.doc)
        for k, v in top.items():
            flat[k] = v
        return from_doc(unflatten(flat), self.source)

    def to_run_config(self) -> dict[str, bool | int | float | str]:
        """Flower's flat run config for this experiment."""
        return flatten(self.doc)

    def hash(self) -> str:
        """A short hash of the whole config (provenance)."""
        blob = json.dumps(self.doc, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def from_doc(doc: Mapping[str, Any], source: str = "") -> ExperimentConfig:
    """Validate a config document (already parsed from TOML)."""
    doc = dict(doc)
    unknown = sorted(set(doc) - _TOP_LEVEL)
    if unknown:
        raise ConfigError(
            f"unknown top-level field(s) {unknown}; expected some of {sorted(_TOP_LEVEL)}"
        )
    if "fleet" not in doc:
        raise ConfigError("fleet: missing; expected a [fleet] table with size and mix")
    rounds = doc.get("rounds", 10)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ConfigError(f"rounds: expected an integer >= 1, got {rounds!r}")
    client = ClientSpec.from_doc(doc)
    if client.fleet.profiles_dir:
        register_profile_dir(client.fleet.profiles_dir)
    for name in client.fleet.mix:
        try:
            load_profile(name)
        except ProfileError as exc:
            raise ConfigError(f"fleet.mix.{name}: {exc}") from exc
    if not profile_counts(client.fleet.mix, client.fleet.size):
        raise ConfigError("fleet.mix: no device would be assigned a profile")
    strategy = build_dataclass(StrategySpec, doc.get("strategy"), "strategy")
    engine = build_dataclass(EngineSpec, doc.get("engine"), "engine")
    avail = build_dataclass(AvailabilitySpec, doc.get("availability"), "availability")
    sample = max(int(client.fleet.size * strategy.fraction_train), strategy.min_train)
    if sample > client.fleet.size or strategy.min_available > client.fleet.size:
        raise ConfigError(
            f"strategy: needs {max(sample, strategy.min_available)} devices per round "
            f"(fraction_train, min_train, min_available) but fleet.size is {client.fleet.size}"
        )
    return ExperimentConfig(client, rounds, strategy, engine, avail, doc, source)


def load_config(path: str | Path) -> ExperimentConfig:
    """Read and validate a TOML experiment config."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config: {str(path)!r} is not a file")
    try:
        doc = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from exc
    return from_doc(doc, str(p))
