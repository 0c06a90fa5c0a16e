"""Bad input: every config field, profile, fleet mix, data file and trace fails clearly.

Each config field of every table (found by introspecting the dataclasses, so a new field
without a case here fails ``test_every_field_has_a_range_case``) is given a wrong type, an
out-of-range value and an unknown sibling key; each must raise ``ConfigError`` naming the
table, the field and what was expected. Profiles, data files and availability traces get
their own project errors (``ProfileError``, ``DataError``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clients.data import DataSpec, FleetData, load_source
from clients.spec import FleetSpec, ModelSpec, TrainSpec
from devices.errors import ConfigError, DataError, ProfileError, TinyFleetError
from devices.profiles import load_profile, load_profile_file
from sim.availability import load_trace
from sim.config import AvailabilitySpec, EngineSpec, StrategySpec, from_doc, load_config

TABLES: dict[str, type] = {
    "fleet": FleetSpec,
    "data": DataSpec,
    "model": ModelSpec,
    "train": TrainSpec,
    "strategy": StrategySpec,
    "engine": EngineSpec,
    "availability": AvailabilitySpec,
}
ALL_FIELDS = [(t, f.name, str(f.type)) for t, cls in TABLES.items() for f in fields(cls)]
_WRONG_TYPE: dict[str, Any] = {"int": "three", "float": "fast", "str": 5, "bool": "yes",
                               "dict": 5}

# table.field -> values out of range (or otherwise invalid though well typed)
OUT_OF_RANGE: dict[str, list[Any]] = {
    "fleet.size": [0, -3, 2**70],
    "fleet.mix": [{}, {"rpi4": -1.0}, {"rpi4": math.nan}, {"rpi4": math.inf}, {"rpi4": 0.0},
                  {"toaster": 1.0}],
    "fleet.link_spread": [-0.1, math.nan, math.inf],
    "fleet.profiles_dir": ["/nonexistent/profiles"],
    "data.source": ["csv"],
    "data.partition": ["random"],
    "data.alpha": [0.0, -1.0, math.inf],
    "data.test_fraction": [0.0, 1.0, 1.5],
    "data.samples_per_device": [-1],
    "data.min_samples": [-1],
    "data.image_size": [3],
    "data.channels": [0],
    "data.synthetic_size": [19],
    "model.name": ["resnet1000"],
    "train.local_epochs": [0],
    "train.batch_size": [0, -1],
    "train.lr": [0.0, -1.0, math.nan],
    "train.momentum": [-0.1, math.nan],
    "train.weight_decay": [-1.0],
    "train.optimizer": ["rmsprop"],
    "train.precision": ["int4"],
    "train.on_budget": ["retry"],
    "train.proximal_mu": [-1.0],
    "train.int8_rounding": ["up"],
    "strategy.name": ["fedfoo"],
    "strategy.fraction_train": [-0.1, 1.5],
    "strategy.fraction_evaluate": [2.0],
    "strategy.min_available": [0, 50],
    "strategy.min_train": [0, 50],
    "strategy.deadline_s": [-1.0, math.nan],
    "strategy.timeout_s": [0.0, -1.0],
    "strategy.overcommit": [0.5],  # OverCommit samples factor x more: >= 1
    "strategy.args": [{"no_such_argument": 1}],
    "engine.name": ["spark"],
    "engine.backend": ["mpi"],
    "engine.actors": [-1],
    "availability.kind": ["sometimes"],
    "availability.period_s": [-1.0],
    "availability.always_on_share": [-0.1, 1.5],
}
# Fields a value can only be judged against the world, with where that happens.
CHECKED_LATER = {
    "data.path": "test_unreadable_data_files (the file is read when the data loads)",
    "model.args": "sim.guard builds the model (test_guard.py)",
    "engine.ray_address": "any string; Ray reports an unreachable address",
    "availability.path": "test_unreadable_traces (the trace is read when the run starts)",
}
# Booleans: every value of the right type is valid (wrong types are tested above).
NO_RANGE = {f"train.{f}": "a bool" for f in ("int8_prc", "int8_lac", "int8_weights", "int8_qas")}
# Cases that need a sibling field set to mean anything.
CONTEXT: dict[str, tuple[dict[str, Any], list[Any]]] = {
    "data.path": ({"source": "npz"}, [""]),
    "availability.path": ({"kind": "trace"}, [""]),
    "availability.period_s": ({"kind": "diurnal"}, [0.0]),
}


def _doc() -> dict[str, Any]:
    return {"seed": 1, "rounds": 2, "fleet": {"size": 10, "mix": {"rpi4": 1.0}}}


def _with(table: str, field: str, value: Any, **siblings: Any) -> dict[str, Any]:
    doc = copy.deepcopy(_doc())
    section = doc.setdefault(table, {})
    section.update(siblings)
    section[field] = value
    return doc


def _raises_naming(doc: dict[str, Any], *words: str) -> str:
    with pytest.raises(ConfigError) as info:
        from_doc(doc)
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{w!r} not named in {msg!r}"
    assert any(w in msg for w in ("expected", "needs", "known profiles")), msg
    return msg


@pytest.mark.parametrize(("table", "field", "kind"), ALL_FIELDS)
def test_wrong_type_names_the_field(table: str, field: str, kind: str) -> None:
    base = "dict" if "dict" in kind else kind
    msg = _raises_naming(_with(table, field, _WRONG_TYPE[base]), f"{table}.{field}")
    assert "expected" in msg


def test_every_field_has_a_range_case() -> None:
    every = {f"{t}.{f}" for t, f, _ in ALL_FIELDS}
    missing = every - set(OUT_OF_RANGE) - set(CHECKED_LATER) - set(NO_RANGE)
    assert not missing, f"add out-of-range cases (and validation) for {sorted(missing)}"


@pytest.mark.parametrize(
    ("key", "value"), [(k, v) for k, vs in OUT_OF_RANGE.items() for v in vs], ids=str
)
def test_out_of_range_names_the_field(key: str, value: Any) -> None:
    table, field = key.split(".")
    _raises_naming(_with(table, field, value), table, field)


@pytest.mark.parametrize("key", sorted(CONTEXT))
def test_out_of_range_in_context(key: str) -> None:
    table, field = key.split(".")
    siblings, values = CONTEXT[key]
    for value in values:
        _raises_naming(_with(table, field, value, **siblings), table, field)


@pytest.mark.parametrize("table", sorted(TABLES))
def test_unknown_key_is_named_with_the_known_ones(table: str) -> None:
    msg = _raises_naming(_with(table, "no_such_field", 1), table, "no_such_field")
    known = sorted(f.name for f in fields(TABLES[table]))
    assert str(known) in msg


@pytest.mark.parametrize(
    ("doc", "words"),
    [
        ({"fleet": {"size": 10}, "bogus": 1}, ["unknown top-level", "bogus"]),
        ({"seed": 1}, ["fleet", "missing"]),
        ({"fleet": {}, "seed": -1}, ["seed", ">= 0"]),
        ({"fleet": {}, "seed": 2**64}, ["seed", "2**63"]),
        ({"fleet": {}, "seed": 1.5}, ["seed", "int"]),
        ({"fleet": {}, "rounds": "ten"}, ["rounds", "integer"]),
        ({"fleet": {}, "rounds": 2**64}, ["rounds", "integer"]),
        ({"fleet": {}, "name": 3}, ["name", "string"]),
        ({"fleet": {}, "description": []}, ["description", "string"]),
        ({"fleet": [1, 2]}, ["fleet", "table"]),
        ({"fleet": {}, "train": "fast"}, ["train", "table"]),
        ({"fleet": {}, "faults": True}, ["faults", "table"]),
        ({"fleet": {}, "compression": 1}, ["compression", "table"]),
    ],
)
def test_top_level_fields(doc: dict[str, Any], words: list[str]) -> None:
    _raises_naming(doc, *words)


def test_fleet_mix_that_cannot_fill_a_round() -> None:
    doc = _doc()
    doc["strategy"] = {"fraction_train": 1.0, "min_train": 20}
    msg = _raises_naming(doc, "strategy", "fleet.size is 10")
    assert "needs 20 devices" in msg
    doc["fleet"]["mix"] = {"rpi4": 0.0, "jetson-nano": 0.0}
    _raises_naming(doc, "fleet.mix", "not all 0")


def test_unknown_device_profile_lists_the_known_ones() -> None:
    with pytest.raises(ProfileError, match="unknown device profile 'toaster'.*rpi4"):
        load_profile("toaster")
    msg = _raises_naming(_with("fleet", "mix", {"toaster": 1.0}), "fleet.mix.toaster")
    assert "rpi4" in msg


def test_bad_user_profile_is_named(tmp_path: Path) -> None:
    (tmp_path / "toaster.toml").write_text('name = "toaster"\ndevice_class = "mcu"\n')
    doc = _with("fleet", "mix", {"toaster": 1.0}, profiles_dir=str(tmp_path))
    _raises_naming(doc, "fleet.mix.toaster", "ram_bytes", "missing")
    with pytest.raises(ProfileError, match="cannot be read"):
        load_profile_file(tmp_path / "missing.toml")


def test_load_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a file"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bin.toml"
    bad.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


# ---------------------------------------------------------------- data files


def _npz(tmp_path: Path, **arrays: Any) -> str:
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return str(path)


_X = np.random.default_rng(0).random((20, 1, 8, 8)).astype(np.float32)
_Y = np.arange(20) % 4


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"images": _X, "labels": _Y}, "expected arrays 'x'"),
        ({"x": _X[:, 0, 0, 0], "y": _Y}, "expected x of shape"),
        ({"x": _X, "y": _Y[:5]}, "expected x of shape"),
        ({"x": _X, "y": _Y[:, None]}, "expected x of shape"),
        ({"x": _X[:0], "y": _Y[:0]}, "N > 0"),
        ({"x": np.zeros((20, 0, 8, 8)), "y": _Y}, "N > 0"),
        ({"x": np.where(_X > 0.5, np.nan, _X), "y": _Y}, "non-finite"),
        ({"x": _X * np.inf, "y": _Y}, "non-finite"),
        ({"x": _X, "y": _Y.astype(float)}, "integer class labels"),
        ({"x": _X, "y": _Y - 5}, "integer class labels"),
        ({"x": np.full((20, 1, 8, 8), "a"), "y": _Y}, "real numbers"),
        ({"x": _X.astype(np.complex64), "y": _Y}, "real numbers"),
    ],
)
def test_bad_npz_contents(tmp_path: Path, arrays: dict[str, Any], match: str) -> None:
    spec = DataSpec(source="npz", path=_npz(tmp_path, **arrays))
    with pytest.raises(DataError, match=match):
        load_source(spec)


def test_unreadable_data_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_source(DataSpec(source="npz", path=str(tmp_path / "missing.npz")))
    for blob in (b"", b"just text\n", b"PK\x03\x04broken zip", b"\x93NUMPY\x01\x00garbage"):
        p = tmp_path / "bad.npz"
        p.write_bytes(blob)
        with pytest.raises(DataError, match="not a readable .npz"):
            load_source(DataSpec(source="npz", path=str(p)))
    pickled = tmp_path / "obj.npz"
    np.savez(pickled, x=np.array([{"a": 1}] * 3, dtype=object), y=np.arange(3))
    with pytest.raises(DataError, match="not a readable .npz"):
        load_source(DataSpec(source="npz", path=str(pickled)))


def test_no_empty_partition(tmp_path: Path) -> None:
    path = _npz(tmp_path, x=_X, y=_Y)
    spec = DataSpec(source="npz", path=path, partition="dirichlet", alpha=0.01)
    data = FleetData(spec, 50, seed=3)  # 16 training examples over 50 devices
    assert all(len(data.device_data(d)[1]) >= 1 for d in range(50))
    with pytest.raises(DataError, match="partition-id 50 out of range"):
        data.device_data(50)
    one = _npz(tmp_path, x=_X[:1], y=_Y[:1])
    with pytest.raises(DataError, match="none for training"):
        FleetData(DataSpec(source="npz", path=one), 2, seed=0)


# ---------------------------------------------------------------- availability traces


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("t.csv", "dev,start,end\n0,0,1\n", "columns device,start_s,end_s"),
        ("t.csv", "device,start_s,end_s\n0,zero,1\n", "unreadable"),
        ("t.csv", "device,start_s,end_s\n0,5,1\n", "bad interval"),
        ("t.csv", "device,start_s,end_s\n-1,0,1\n", "partition id >= 0"),
        ("t.csv", "device,start_s,end_s\n0,0,90000\n", "exceeds the period"),
        ("t.csv", "device,start_s,end_s\n0,nan,1\n", "bad interval"),
        ("t.csv", "device,start_s,end_s\n0\x00,0,1\n", "unreadable"),
        ("t.json", "[[0, 1]]", "JSON object"),
        ("t.json", '{"0": [[0]]}', "unreadable"),
        ("t.json", '{"0": 5}', "unreadable"),
        ("t.json", '{"zero": [[0, 1]]}', "unreadable"),
        ("t.json", "{not json", "unreadable"),
    ],
)
def test_bad_traces(tmp_path: Path, name: str, content: str, match: str) -> None:
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(DataError, match=match):
        load_trace(p, period_s=86400.0)


def test_unreadable_traces(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a file"):
        load_trace(tmp_path / "missing.csv")
    for name in ("bin.csv", "bin.json"):
        p = tmp_path / name
        p.write_bytes(b"\xff\xfe\x81\x00\x00")
        with pytest.raises(TinyFleetError):
            load_trace(p)
