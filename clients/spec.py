"""What a device's ClientApp needs to know of an experiment, and how it travels.

An experiment config is a nested TOML document (see ``sim.config``). Flower's run config
accepts only scalar values, so the document travels *flattened*: nested tables become
dotted keys (``train.lr``) and lists or inline tables become JSON strings prefixed with
``json:``. ``flatten`` and ``unflatten`` are exact inverses on TOML documents, so the same
config reaches the apps in simulation and under ``flwr run``.

``ClientSpec`` is the part of the document a ClientApp reads: seed, fleet, data, model and
local training. Every field is validated here with errors that name it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from clients.data import DataSpec
from clients.models import MODELS
from devices.errors import ConfigError

__all__ = [
    "EXPERIMENT_KEY",
    "ClientSpec",
    "ModelSpec",
    "TrainSpec",
    "build_dataclass",
    "expand_run_config",
    "flatten",
    "unflatten",
]

_JSON = "json:"


def flatten(doc: Mapping[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """Flatten a nested document into Flower's scalar run config."""
    out: dict[str, bool | int | float | str] = {}
    for key, value in doc.items():
        if "." in key:
            raise ConfigError(f"{prefix}{key}: keys must not contain '.'")
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value and not _is_leaf_table(name):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, bool | int | float | str) and not (
            isinstance(value, str) and value.startswith(_JSON)
        ):
            out[name] = value
        else:
            out[name] = _JSON + json.dumps(value, sort_keys=True)
    return out


def _is_leaf_table(name: str) -> bool:
    # Tables whose keys are data, not fields (profile names, model kwargs): keep whole.
    return name in {"fleet.mix", "model.args", "faults", "strategy.args"}


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Invert ``flatten``."""
    doc: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key.split(".")
        node = doc
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: conflicts with a scalar at {part!r}")
        if isinstance(value, str) and value.startswith(_JSON):
            try:
                value = json.loads(value[len(_JSON) :])
            except ValueError as exc:
                raise ConfigError(f"{key}: expected JSON after {_JSON!r} ({exc})") from exc
        node[parts[-1]] = value
    return doc


EXPERIMENT_KEY = "tinyfleet.experiment"


def expand_run_config(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The flat run config with a whole-experiment reference expanded.

    ``flwr run --run-config`` may only override keys a Flower app declares, so a deployed
    run carries its experiment as one key, ``tinyfleet.experiment``: the TOML document as
    JSON. When it is set, its flattened document replaces every experiment key (the app's
    declared defaults); runner keys (``tinyfleet.*``) are kept. Without it the run config
    is returned as it is.
    """
    blob = run_config.get(EXPERIMENT_KEY)
    if not blob:
        return dict(run_config)
    try:
        doc = json.loads(str(blob))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{EXPERIMENT_KEY}: expected a JSON document ({exc})") from exc
    if not isinstance(doc, dict):
        raise ConfigError(f"{EXPERIMENT_KEY}: expected a JSON object, got {type(doc).__name__}")
    out = {k: v for k, v in run_config.items()
           if k.startswith("tinyfleet.") and k != EXPERIMENT_KEY}
    out.update(flatten(doc))
    return out


_INT64 = 2**63


def _check_type(where: str, value: Any, expected: Any) -> Any:
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value) if abs(value) < _INT64 else math.inf
    if expected in (int, float, str, bool):
        ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
        if not ok:
            raise ConfigError(
                f"{where}: expected {expected.__name__}, got {type(value).__name__} {value!r}"
            )
        # Numbers go on to numpy and torch: a NaN passes every range check, and an integer
        # beyond int64 overflows far from the config.
        if expected is float and not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        if expected is int and not -_INT64 <= value < _INT64:
            raise ConfigError(f"{where}: expected an integer in [-2**63, 2**63), got {value!r}")
    elif expected in (dict, "dict"):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__}")
        return dict(value)
    return value


def build_dataclass(cls: type, section: Mapping[str, Any] | None, where: str) -> Any:
    """Build ``cls`` from a config table, naming any unknown or mistyped field."""
    if section is not None and not isinstance(section, Mapping):
        raise ConfigError(f"{where}: expected a table, got {type(section).__name__} {section!r}")
    section = dict(section or {})
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(section) - set(known))
    if unknown:
        raise ConfigError(
            f"{where}: unknown field(s) {unknown}; expected some of {sorted(known)}"
        )
    kwargs = {}
    for name, value in section.items():
        ftype = known[name].type
        expected = {"int": int, "float": float, "str": str, "bool": bool}.get(
            str(ftype), dict if "dict" in str(ftype) else None
        )
        kwargs[name] = _check_type(f"{where}.{name}", value, expected) if expected else value
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        msg = str(exc)
        raise ConfigError(msg if msg.startswith(where) else f"{where}.{msg}") from None


@dataclass(frozen=True)
class ModelSpec:
    """The model a fleet trains: a name from ``clients.models.MODELS`` and its kwargs."""

    name: str = "small_cnn"
    args: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in MODELS:
            raise ConfigError(f"name: expected one of {sorted(MODELS)}, got {self.name!r}")


_PRECISIONS = ("fp32", "int8")
_ON_BUDGET = ("fail", "sparse")
_ROUNDINGS = ("stochastic", "nearest")
_OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class TrainSpec:
    """Local training on a device.

    Parameters
    ----------
    local_epochs : int
        Passes over the device's shard per round.
    batch_size : int
        Mini-batch size (also the batch the cost model and the memory budget use).
    lr, momentum, weight_decay : float
        Optimizer settings.
    optimizer : str
        ``"sgd"`` or ``"adam"``.
    precision : str
        ``"fp32"`` or ``"int8"`` (Octo-style integer training, ``clients.int8``).
    on_budget : str
        What happens when a step does not fit a device's RAM: ``"fail"`` (the device's
        reply is an error naming what it needs and has) or ``"sparse"`` (train only the
        layers that fit, as in on-device training under 256 KB).
    proximal_mu : float
        FedProx's proximal term (0 disables it).
    int8_prc, int8_lac : bool
        With ``precision = "int8"``: Octo's range clipping of backward tensors and its
        loss-aware compensation (both on by default; off for ablations).
    int8_rounding : str
        With ``precision = "int8"``: ``"stochastic"`` (Octo's default) or ``"nearest"``
        rounding of the forward operands.
    int8_weights : bool
        With ``precision = "int8"``: keep the weights on their int8 grid, with no FP32
        master copy (``clients.int8.prepare(weights="int8")``); the cost model counts them
        at one byte each.
    int8_qas : bool
        With ``int8_weights``: quantization-aware gradient scaling (on by default; off
        for the ablation that shows why it is needed). Without ``int8_weights`` the
        gradients already have FP32's scale and this field has no effect.
    """

    local_epochs: int = 1
    batch_size: int = 16
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    optimizer: str = "sgd"
    precision: str = "fp32"
    on_budget: str = "fail"
    proximal_mu: float = 0.0
    int8_prc: bool = True
    int8_lac: bool = True
    int8_rounding: str = "stochastic"
    int8_weights: bool = False
    int8_qas: bool = True

    def __post_init__(self) -> None:
        if self.local_epochs < 1:
            raise ConfigError(f"local_epochs: expected an integer >= 1, got {self.local_epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: expected an integer >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ConfigError(f"lr: expected a number > 0, got {self.lr}")
        if self.precision not in _PRECISIONS:
            raise ConfigError(f"precision: expected one of {_PRECISIONS}, got {self.precision!r}")
        if self.int8_rounding not in _ROUNDINGS:
            raise ConfigError(
                f"int8_rounding: expected one of {_ROUNDINGS}, got {self.int8_rounding!r}"
            )
        if self.on_budget not in _ON_BUDGET:
            raise ConfigError(f"on_budget: expected one of {_ON_BUDGET}, got {self.on_budget!r}")
        if self.optimizer not in _OPTIMIZERS:
            raise ConfigError(f"optimizer: expected one of {_OPTIMIZERS}, got {self.optimizer!r}")
        for name in ("proximal_mu", "momentum", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: expected a number >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class FleetSpec:
    """The fleet: how many devices, the share of each profile, and link variation.

    ``link_spread`` is the sigma of a per-device log-normal factor on link bandwidth.
    """

    size: int = 10
    mix: dict = field(default_factory=lambda: {"rpi4": 1.0})
    profiles_dir: str = ""
    link_spread: float = 0.0

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ConfigError(f"size: expected an integer >= 1, got {self.size}")
        if not self.mix:
            raise ConfigError("mix: expected a table of profile = share, e.g. {rpi4 = 1.0}")
        for name, share in self.mix.items():
            if (isinstance(share, bool) or not isinstance(share, int | float)
                    or not 0 <= share < math.inf):
                raise ConfigError(f"mix.{name}: expected a finite share >= 0, got {share!r}")
        if self.link_spread < 0:
            raise ConfigError(f"link_spread: expected a number >= 0, got {self.link_spread}")
        if sum(self.mix.values()) <= 0:
            raise ConfigError(f"mix: expected shares not all 0, got {self.mix}")


@dataclass(frozen=True, eq=True)
class ClientSpec:
    """Everything a ClientApp reads of an experiment."""

    seed: int
    fleet: FleetSpec
    data: DataSpec
    model: ModelSpec
    train: TrainSpec

    def __hash__(self) -> int:
        return hash(self.key)

    @property
    def key(self) -> str:
        """A canonical string of every field: equal specs have equal keys."""
        return json.dumps(asdict(self), sort_keys=True, default=str)

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> ClientSpec:
        """Build from a nested config document (extra top-level sections are ignored)."""
        seed = doc.get("seed", 0)
        _check_type("seed", seed, int)
        if seed < 0:  # numpy's seed sequences take non-negative integers only
            raise ConfigError(f"seed: expected an integer >= 0, got {seed!r}")
        return cls(
            seed=seed,
            fleet=build_dataclass(FleetSpec, doc.get("fleet"), "fleet"),
            data=build_dataclass(DataSpec, doc.get("data"), "data"),
            model=build_dataclass(ModelSpec, doc.get("model"), "model"),
            train=build_dataclass(TrainSpec, doc.get("train"), "train"),
        )

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> ClientSpec:
        """Build from Flower's flat run config (as the ClientApp receives it)."""
        return cls.from_doc(unflatten(expand_run_config(run_config)))
