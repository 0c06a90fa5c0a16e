"""Experiment configs: validation names the bad field; the run-config form round-trips."""

from __future__ import annotations

from pathlib import Path

import pytest

from clients.spec import flatten, unflatten
from devices.errors import ConfigError
from sim.config import from_doc, load_config

ROOT = Path(__file__).resolve().parents[1]


def _doc(**over: object) -> dict:
    doc: dict = {"seed": 1, "rounds": 2, "fleet": {"size": 10, "mix": {"rpi4": 1.0}}}
    for key, value in over.items():
        node = doc
        parts = key.split("__")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return doc


@pytest.mark.parametrize("name", ["default.toml", "mcu-256kb.toml"])
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(ROOT / "configs" / name)
    assert cfg.rounds >= 1 and cfg.client.fleet.size >= 1


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"train__lr": -1.0}, "train.lr"),
        ({"train__lr": "fast"}, "train.lr"),
        ({"train__batch_size": 0}, "train.batch_size"),
        ({"train__precision": "int4"}, "train.precision"),
        ({"train__bogus": 1}, "train"),
        ({"rounds": 0}, "rounds"),
        ({"fleet__mix": {"toaster": 1.0}}, "fleet.mix.toaster"),
        ({"fleet__mix": {"rpi4": -1.0}}, "fleet.mix.rpi4"),
        ({"fleet__size": 0}, "fleet.size"),
        ({"data__alpha": 0.0}, "data.alpha"),
        ({"data__partition": "random"}, "data.partition"),
        ({"data__source": "npz"}, "data.path"),
        ({"strategy__name": "fedfoo"}, "strategy.name"),
        ({"strategy__fraction_train": 1.5}, "strategy.fraction_train"),
        ({"strategy__min_available": 50}, "strategy"),
        ({"engine__backend": "mpi"}, "engine.backend"),
        ({"unknown_table": {}}, "unknown top-level"),
        ({"strategy__name": "fedbuff", "strategy__deadline_s": 5.0}, "not used by 'fedbuff'"),
    ],
)
def test_bad_fields_are_named(over: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        from_doc(_doc(**over))


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a file"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_run_config_round_trip() -> None:
    cfg = load_config(ROOT / "configs" / "default.toml")
    flat = cfg.to_run_config()
    assert all(isinstance(v, bool | int | float | str) for v in flat.values())
    assert unflatten(flat) == dict(cfg.doc)
    assert from_doc(unflatten(flat)).client == cfg.client


def test_flatten_keeps_json_like_strings_apart() -> None:
    doc = {"a": {"b": "json:not really", "c": [1, 2], "d": {"e": 1}}, "fleet": {"mix": {}}}
    assert unflatten(flatten(doc)) == doc


def test_overrides() -> None:
    cfg = load_config(ROOT / "configs" / "default.toml")
    c2 = cfg.with_overrides(seed=5, **{"train.lr": 0.2})
    assert c2.seed == 5 and c2.client.train.lr == 0.2
    assert cfg.hash() != c2.hash()
