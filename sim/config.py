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
    [compression] uplink, downlink (codec specs, e.g. "sgq"; see clients.codecs)
    [faults]    raise_rate, hang_rate, nan_rate, oversize_rate, kill_actor_round (sim.faults)

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
from sim.faults import FaultSpec

__all__ = [
    "AvailabilitySpec",
    "EngineSpec",
    "ExperimentConfig",
    "StrategySpec",
    "load_config",
]

_STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedbuff")
_TOP_LEVEL = {"seed", "rounds", "fleet", "data", "model", "train", "strategy", "engine",
              "availability", "name", "description", "compression", "faults", "tinyfleet",
              "continual", "perception", "split"}
_SCALARS = {"seed", "rounds", "name", "description"}


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
    overcommit: float = 1.0
    args: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in _STRATEGIES:
            raise ConfigError(f"name: expected one of {_STRATEGIES}, got {self.name!r}")
        for f in ("fraction_train", "fraction_evaluate"):
            v = getattr(self, f)
            if not 0 <= v <= 1:
                raise ConfigError(f"{f}: expected a number in [0, 1], got {v}")
        for f in ("min_available", "min_train"):
            if getattr(self, f) < 1:
                raise ConfigError(f"{f}: expected an integer >= 1, got {getattr(self, f)}")
        if self.deadline_s < 0:
            raise ConfigError(f"deadline_s: expected a number >= 0, got {self.deadline_s}")
        if not self.timeout_s > 0:
            raise ConfigError(f"timeout_s: expected a number > 0, got {self.timeout_s}")
        if self.name == "fedbuff" and (self.deadline_s > 0 or self.overcommit > 1.0):
            raise ConfigError(
                "deadline_s / overcommit: not used by 'fedbuff' (asynchronous: there is no "
                "round to miss); set them to 0 / 1, or bound staleness with "
                "args = { max_staleness = ... }"
            )
        if not self.overcommit >= 1:
            raise ConfigError(f"overcommit: expected a number >= 1, got {self.overcommit}")


@dataclass(frozen=True)
class CompressionSpec:
    """Compressed updates (``clients.codecs``): codec specs such as ``"sgq"``,
    ``"sgq:bits=2"``, ``"topk:ratio=0.01"``; empty strings send plain arrays."""

    uplink: str = ""
    downlink: str = ""

    def __post_init__(self) -> None:
        from clients.codecs import get_codec

        for f in ("uplink", "downlink"):
            spec = getattr(self, f)
            if spec:
                try:
                    get_codec(spec)
                except ConfigError as exc:
                    raise ConfigError(f"{f}: {exc}") from None


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
        if self.period_s < 0 or (self.kind == "diurnal" and not self.period_s > 0):
            raise ConfigError(
                f"period_s: expected a number > 0 (>= 0 for a trace: 0 does not repeat), "
                f"got {self.period_s}"
            )
        if not 0 <= self.always_on_share <= 1:
            raise ConfigError(
                f"always_on_share: expected a number in [0, 1], got {self.always_on_share}"
            )


@dataclass(frozen=True)
class ExperimentConfig:
    """A validated experiment: what the clients need, plus server and engine settings."""

    client: ClientSpec
    rounds: int
    strategy: StrategySpec
    engine: EngineSpec
    availability: AvailabilitySpec
    compression: CompressionSpec
    doc: Mapping[str, Any]
    source: str = ""

    @property
    def faults(self) -> FaultSpec:
        """The faults to inject (none by default)."""
        return FaultSpec.from_table(self.doc.get("faults"))

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
    if not isinstance(doc, Mapping):
        raise ConfigError(f"config: expected a table of fields, got {type(doc).__name__}")
    doc = dict(doc)
    unknown = sorted(set(doc) - _TOP_LEVEL)
    if unknown:
        raise ConfigError(
            f"unknown top-level field(s) {unknown}; expected some of {sorted(_TOP_LEVEL)}"
        )
    if "fleet" not in doc:
        raise ConfigError("fleet: missing; expected a [fleet] table with size and mix")
    for key in sorted(_TOP_LEVEL - _SCALARS):
        if key in doc and not isinstance(doc[key], Mapping):
            raise ConfigError(
                f"{key}: expected a table, got {type(doc[key]).__name__} {doc[key]!r}"
            )
    for key in ("name", "description"):
        if not isinstance(doc.get(key, ""), str):
            raise ConfigError(f"{key}: expected a string, got {doc[key]!r}")
    rounds = doc.get("rounds", 10)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or not 1 <= rounds < 2**63:
        raise ConfigError(f"rounds: expected an integer >= 1, got {rounds!r}")
    client = ClientSpec.from_doc(doc)
    if client.fleet.profiles_dir:
        try:
            register_profile_dir(client.fleet.profiles_dir)
        except ProfileError as exc:
            raise ConfigError(
                f"fleet.profiles_dir: expected a directory of NAME.toml profiles ({exc})"
            ) from exc
    for name in client.fleet.mix:
        try:
            load_profile(name)
        except ProfileError as exc:
            raise ConfigError(f"fleet.mix.{name}: {exc}") from exc
    if not profile_counts(client.fleet.mix, client.fleet.size):
        raise ConfigError("fleet.mix: no device would be assigned a profile")
    strategy = build_dataclass(StrategySpec, doc.get("strategy"), "strategy")
    _check_strategy_args(strategy)
    engine = build_dataclass(EngineSpec, doc.get("engine"), "engine")
    avail = build_dataclass(AvailabilitySpec, doc.get("availability"), "availability")
    FaultSpec.from_table(doc.get("faults"))
    comp = build_dataclass(CompressionSpec, doc.get("compression"), "compression")
    sample = max(int(client.fleet.size * strategy.fraction_train), strategy.min_train)
    if sample > client.fleet.size or strategy.min_available > client.fleet.size:
        raise ConfigError(
            f"strategy: needs {max(sample, strategy.min_available)} devices per round "
            f"(fraction_train, min_train, min_available) but fleet.size is {client.fleet.size}"
        )
    return ExperimentConfig(client, rounds, strategy, engine, avail, comp, doc, source)


def _check_strategy_args(spec: StrategySpec) -> None:
    """Name any ``strategy.args`` key the Flower strategy's constructor does not take."""
    import inspect

    from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

    from strategies.fedbuff import FedBuff

    classes: dict[str, type] = {
        "fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam, "fedbuff": FedBuff
    }
    params = inspect.signature(classes[spec.name]).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    known = sorted(params)
    unknown = sorted(set(spec.args) - set(known))
    if unknown:
        raise ConfigError(
            f"strategy.args: unknown argument(s) {unknown} for {spec.name!r}; "
            f"expected some of {known}"
        )


def load_config(path: str | Path) -> ExperimentConfig:
    """Read and validate a TOML experiment config."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config: {str(path)!r} is not a file")
    try:
        doc = tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"config: {str(path)!r} cannot be read ({exc})") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from exc
    return from_doc(doc, str(p))
