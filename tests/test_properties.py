"""Property-based tests: random configs, files and run configs at every loader.

The only outcomes allowed are success or a subclass of ``TinyFleetError``; any other
exception (``TypeError``, ``KeyError``, ``OverflowError``...) fails the test with the input
hypothesis shrank it to. Where a loader succeeds, what it returns is checked too (a config
survives its run-config round trip; loaded data has the documented shapes and ranges).
Every test has a bounded ``max_examples`` so the file runs in well under a minute.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import tomllib
import zipfile
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from clients.data import DataSpec, load_source
from clients.spec import ClientSpec, FleetSpec, ModelSpec, TrainSpec, flatten, unflatten
from devices.errors import TinyFleetError
from devices.profiles import BUILTIN_PROFILE_DIR, load_profile_file
from sim.availability import load_trace
from sim.config import AvailabilitySpec, EngineSpec, StrategySpec, from_doc

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DOC = tomllib.loads((ROOT / "configs" / "default.toml").read_text())
_TABLES: dict[str, type] = {
    "fleet": FleetSpec, "data": DataSpec, "model": ModelSpec, "train": TrainSpec,
    "strategy": StrategySpec, "engine": EngineSpec, "availability": AvailabilitySpec,
}
# Field names of every table: random documents use them as keys often, so the random
# values reach each field's validation instead of stopping at "unknown field".
_FIELD_NAMES = sorted({f.name for cls in _TABLES.values() for f in fields(cls)})
_TOP = ["seed", "rounds", "name", "description", "compression", "faults", "tinyfleet",
        *_TABLES]
_PROFILE_NAMES = ["rpi4", "stm32f746", "jetson-nano", "nrf52840", "toaster"]
_BASE = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                        HealthCheck.function_scoped_fixture])


def _examples(n: int) -> settings:
    return settings(_BASE, max_examples=n)

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-3, max_value=12),
    st.floats(),
    st.floats(min_value=-2, max_value=2),
    st.text(max_size=12),
    st.sampled_from(["fedavg", "fedadam", "iid", "npz", "digits", "synthetic", "sgd", "int8",
                     "trace", "diurnal", "ray", "local", "flower", "sparse", "mlp", "json:",
                     "json:{", "json:[1]"]),
)
_keys = st.one_of(st.sampled_from(_FIELD_NAMES + _PROFILE_NAMES), st.text(max_size=8))
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(_keys, inner, max_size=4)),
    max_leaves=8,
)
_random_docs = st.dictionaries(
    st.one_of(st.sampled_from(_TOP), st.sampled_from(_TOP), st.text(max_size=6)),
    st.one_of(st.dictionaries(_keys, _values, max_size=6), _values),
    max_size=8,
).map(lambda d: {**d, "fleet": d.get("fleet", {})})


def _check_config(doc: Any) -> None:
    """``from_doc`` succeeds or raises the project's error; a success round-trips."""
    try:
        cfg = from_doc(doc)
    except TinyFleetError:
        return
    try:
        flat = cfg.to_run_config()
    except TinyFleetError:
        return  # e.g. a key with '.' inside a free-form table: named, not crashed
    again = from_doc(unflatten(flat))
    assert again.hash() == cfg.hash()
    assert again.client == cfg.client or again.client.key == cfg.client.key


@_examples(150)
@given(_random_docs)
def test_random_documents(doc: dict[str, Any]) -> None:
    _check_config(doc)


def _paths(node: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            out.append((*prefix, k))
            out.extend(_paths(v, (*prefix, k)))
    return out


_ALL_PATHS = sorted(set(_paths(DEFAULT_DOC)) | {(k,) for k in _TOP}
                    | {(t, f.name) for t, cls in _TABLES.items() for f in fields(cls)})


@st.composite
def _mutated_default(draw: st.DrawFn) -> dict[str, Any]:
    """configs/default.toml with a few keys dropped, retyped or set to random values."""
    doc = copy.deepcopy(DEFAULT_DOC)
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(_ALL_PATHS))
        node = doc
        for part in path[:-1]:
            nxt = node.get(part) if isinstance(node, dict) else None
            if not isinstance(nxt, dict):
                nxt = {}
                node[part] = nxt
            node = nxt
        op = draw(st.sampled_from(["drop", "value", "retype", "number"]))
        key = path[-1]
        if op == "drop":
            node.pop(key, None)
        elif op == "value":
            node[key] = draw(_values)
        elif op == "retype":
            old = node.get(key)
            node[key] = (str(old) if not isinstance(old, str)
                         else draw(st.one_of(st.integers(), st.floats(), st.booleans())))
        else:
            node[key] = draw(st.one_of(st.integers(-(2**70), 2**70), st.floats(),
                                       st.integers(-2, 3)))
    return doc


@_examples(300)
@given(_mutated_default())
def test_mutated_default_config(doc: dict[str, Any]) -> None:
    _check_config(doc)


@_examples(100)
@given(st.dictionaries(st.sampled_from(["raise_rate", "hang_rate", "nan_rate",
                                        "oversize_rate", "kill_actor_round", "hang_wall_s"]),
                       _values, max_size=3))
def test_random_faults_tables(table: dict[str, Any]) -> None:
    _check_config({"fleet": {}, "faults": table})


# ---------------------------------------------------------------- run configs


_flat = st.dictionaries(
    st.one_of(st.text(max_size=10), st.sampled_from(["train.lr", "fleet.size", "fleet.mix",
                                                     "data", "data.alpha", "a.b.c", "a.b",
                                                     "tinyfleet.experiment"])),
    st.one_of(_scalars, st.text(max_size=10).map(lambda s: "json:" + s),
              _values.map(json.dumps), _values.map(lambda v: "json:" + json.dumps(v))),
    max_size=6,
)


@_examples(300)
@given(_flat)
def test_unflatten_random_run_configs(flat: dict[str, Any]) -> None:
    try:
        doc = unflatten(flat)
    except TinyFleetError:
        return
    assert isinstance(doc, dict)
    with contextlib.suppress(TinyFleetError):
        ClientSpec.from_run_config(flat)


_toml_scalars = st.one_of(st.booleans(), st.integers(), st.text(max_size=8),
                          st.floats(allow_nan=False))
_toml_keys = st.text(max_size=6).filter(lambda k: "." not in k)
_toml_docs = st.recursive(
    st.dictionaries(_toml_keys, _toml_scalars, max_size=4),
    lambda inner: st.dictionaries(
        _toml_keys, st.one_of(inner, _toml_scalars, st.lists(_toml_scalars, max_size=3)),
        max_size=4),
    max_leaves=12,
)


@_examples(300)
@given(_toml_docs)
def test_flatten_unflatten_round_trip(doc: dict[str, Any]) -> None:
    flat = flatten(doc)
    assert all(isinstance(v, bool | int | float | str) for v in flat.values())
    assert unflatten(flat) == doc


# ---------------------------------------------------------------- files


def _write(tmp: Path, name: str, blob: bytes) -> Path:
    p = tmp / name
    p.write_bytes(blob)
    return p


def _valid_npz() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, x=np.random.default_rng(0).random((6, 1, 4, 4)), y=np.arange(6) % 3)
    return buf.getvalue()


_NPZ = _valid_npz()


def _check_npz(path: Path) -> None:
    try:
        x, y = load_source(DataSpec(source="npz", path=str(path)))
    except TinyFleetError:
        return
    assert x.dtype == np.float32 and x.ndim == 4 and len(x) == len(y) > 0
    assert np.isfinite(x).all() and x.min() >= 0 - 1e-6 and x.max() <= 1 + 1e-6
    assert y.dtype == np.int64 and y.min() >= 0


@_examples(200)
@given(st.one_of(st.binary(max_size=300), st.binary(max_size=200).map(lambda b: b"PK\x03\x04" + b)))
def test_npz_loader_random_bytes(tmp_path: Path, blob: bytes) -> None:
    _check_npz(_write(tmp_path, "r.npz", blob))


@_examples(100)
@given(st.data())
def test_npz_loader_corrupted_file(tmp_path: Path, data: st.DataObject) -> None:
    blob = bytearray(_NPZ)
    if data.draw(st.booleans()):
        del blob[data.draw(st.integers(1, len(blob) - 1)):]
    for _ in range(data.draw(st.integers(1, 6))):
        blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    _check_npz(_write(tmp_path, "c.npz", bytes(blob)))


_dtypes = st.one_of(hnp.integer_dtypes(), hnp.unsigned_integer_dtypes(), hnp.floating_dtypes(),
                    hnp.boolean_dtypes(), hnp.complex_number_dtypes(),
                    st.just(np.dtype("U2")), st.just(np.dtype("M8[s]")))
_arrays = _dtypes.flatmap(lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=5,
                                                                     min_side=0, max_side=4)))


@_examples(200)
@given(st.dictionaries(st.sampled_from(["x", "y", "z"]), _arrays, max_size=3))
def test_npz_loader_random_arrays(tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    p = tmp_path / "a.npz"
    with zipfile.ZipFile(p, "w") as zf:  # np.savez, but any dtype (even datetime) allowed
        for k, v in arrays.items():
            buf = io.BytesIO()
            np.save(buf, v, allow_pickle=False)
            zf.writestr(f"{k}.npy", buf.getvalue())
    _check_npz(p)


def _toml(doc: dict[str, Any]) -> str:
    """A small TOML writer: top-level scalars, then one level of tables."""

    def val(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, float):
            return "nan" if math.isnan(v) else ("inf" if v == math.inf else
                                                "-inf" if v == -math.inf else repr(v))
        if isinstance(v, int | str):
            return json.dumps(v)
        return "[" + ", ".join(val(x) for x in v) + "]"

    def key(k: str) -> str:
        return json.dumps(k)

    lines = [f"{key(k)} = {val(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for k, v in doc.items():
        if isinstance(v, dict):
            lines.append(f"[{key(k)}]")
            lines += [f"{key(a)} = {val(b)}" for a, b in v.items() if not isinstance(b, dict)]
    return "\n".join(lines) + "\n"


_PROFILE_DOCS = [tomllib.loads(p.read_text()) for p in sorted(BUILTIN_PROFILE_DIR.glob("*.toml"))]
_toml_values = st.one_of(st.booleans(), st.integers(), st.integers(-3, 10), st.floats(),
                         st.text(max_size=8), st.lists(st.integers(), max_size=2),
                         st.sampled_from(["mcu", "sbc", "gpu", ""]))


@st.composite
def _mutated_profile(draw: st.DrawFn) -> dict[str, Any]:
    doc = copy.deepcopy(draw(st.sampled_from(_PROFILE_DOCS)))
    for _ in range(draw(st.integers(1, 3))):
        table = draw(st.sampled_from([None, "macs_per_s", "sources"]))
        node = doc if table is None else doc.setdefault(table, {})
        if not isinstance(node, dict):
            continue
        keys = sorted(node) + ["bogus", "fp32", "int8", "macs_per_s", "sources"]
        k = draw(st.sampled_from(keys))
        if draw(st.booleans()):
            node.pop(k, None)
        else:
            node[k] = draw(_toml_values)
    return doc


@_examples(200)
@given(_mutated_profile())
def test_profile_loader_mutated_profiles(tmp_path: Path, doc: dict[str, Any]) -> None:
    p = tmp_path / "p.toml"
    p.write_text(_toml(doc))
    try:
        prof = load_profile_file(p)
    except TinyFleetError:
        return
    assert prof.ram_bytes > 0 and prof.macs_per_s["fp32"] > 0


@_examples(200)
@given(st.text(max_size=200))
def test_profile_loader_random_text(tmp_path: Path, text: str) -> None:
    p = tmp_path / "t.toml"
    p.write_text(text, encoding="utf-8")
    with contextlib.suppress(TinyFleetError):
        load_profile_file(p)


@_examples(100)
@given(st.binary(max_size=200))
def test_profile_loader_random_bytes(tmp_path: Path, blob: bytes) -> None:
    with contextlib.suppress(TinyFleetError):
        load_profile_file(_write(tmp_path, "b.toml", blob))


def _check_trace(path: Path, period_s: float) -> None:
    try:
        trace = load_trace(path, period_s)
    except TinyFleetError:
        return
    for t in (0.0, 1.0, 3600.0, 1e6):
        trace.next_change(t)
        for dev in (0, 1, 2):
            if trace.online(dev, t):
                assert trace.online_until(dev, t) > t


_period = st.sampled_from([0.0, 86400.0, 10.0])


@_examples(200)
@given(st.binary(max_size=200), st.sampled_from(["t.csv", "t.json"]), _period)
def test_trace_loader_random_bytes(tmp_path: Path, blob: bytes, name: str, period: float) -> None:
    _check_trace(_write(tmp_path, name, blob), period)


_cells = st.one_of(st.integers(-2, 5), st.floats(), st.text(max_size=4),
                   st.sampled_from(["", "nan", "inf", "1e400", "0", "3600"]))


@_examples(200)
@given(st.lists(st.lists(_cells, min_size=0, max_size=4), max_size=5), _period,
       st.sampled_from(["device,start_s,end_s", "device,start_s", "start_s,end_s,device", ""]))
def test_trace_loader_random_csv(
    tmp_path: Path, rows: list[list[Any]], period: float, header: str
) -> None:
    text = header + "\n" + "\n".join(",".join(str(c) for c in row) for row in rows)
    assume("\r" not in text)
    p = tmp_path / "t.csv"
    p.write_text(text)
    _check_trace(p, period)


@_examples(200)
@given(st.one_of(_values, st.dictionaries(st.sampled_from(["0", "1", "-1", "x", "2"]),
                                          st.lists(st.lists(_cells, max_size=3), max_size=3),
                                          max_size=3)), _period)
def test_trace_loader_random_json(tmp_path: Path, raw: Any, period: float) -> None:
    p = tmp_path / "t.json"
    p.write_text(json.dumps(raw))
    _check_trace(p, period)
