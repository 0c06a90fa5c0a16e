"""Device profiles: built-ins load with sources, bad files are refused by field, user dirs."""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devices import (
    BUILTIN_PROFILE_DIR,
    DEVICE_CLASSES,
    PROFILE_PATH_ENV,
    DeviceProfile,
    ProfileError,
    format_bytes,
    list_profiles,
    load_profile,
    load_profile_file,
    register_profile_dir,
    unregister_profile_dir,
)

BUILTINS = ["jetson-nano", "jetson-orin-nano", "nrf52840", "rpi4", "stm32f746"]
NUMERIC = [
    "ram_bytes", "storage_bytes", "mem_bandwidth_bytes_per_s", "uplink_bytes_per_s",
    "downlink_bytes_per_s", "latency_s", "power_compute_w", "power_idle_w", "power_radio_w",
]


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)


def _dump(data: dict[str, Any]) -> str:
    """A tiny TOML writer for flat profiles with one level of tables."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for k, v in data.items():
        if isinstance(v, dict):
            lines.append(f"[{k}]")
            lines += [f'"{kk}" = {_toml_value(vv)}' for kk, vv in v.items()]
    return "\n".join(lines) + "\n"


def _valid(name: str = "mydev") -> dict[str, Any]:
    data = tomllib.loads((BUILTIN_PROFILE_DIR / "stm32f746.toml").read_text())
    data["name"] = name
    return data


def _write(directory: Path, data: dict[str, Any], stem: str = "mydev") -> Path:
    path = directory / f"{stem}.toml"
    path.write_text(_dump(data))
    return path


@pytest.fixture
def user_dir(tmp_path: Path) -> Iterator[Path]:
    register_profile_dir(tmp_path)
    yield tmp_path
    unregister_profile_dir(tmp_path)


def test_every_builtin_profile_loads_with_a_source_for_every_number() -> None:
    assert set(BUILTINS) <= set(list_profiles())
    for name in BUILTINS:
        profile = load_profile(name)
        assert profile.name == name
        assert profile.device_class in DEVICE_CLASSES
        assert {"fp32", "int8"} <= set(profile.macs_per_s)
        cited = set(profile.sources)
        missing = [f for f in NUMERIC if f not in cited]
        missing += [f"macs_per_s.{d}" for d in profile.macs_per_s
                    if f"macs_per_s.{d}" not in cited]
        if profile.battery_j is not None and "battery_j" not in cited:
            missing.append("battery_j")
        assert not missing, f"{name}: no source for {missing}"


def test_builtin_figures_match_the_datasheets() -> None:
    stm = load_profile("stm32f746")
    assert format_bytes(stm.ram_bytes) == "320 KB" and format_bytes(stm.storage_bytes) == "1 MB"
    assert stm.frozen_weights_in_storage
    nrf = load_profile("nrf52840")
    assert nrf.ram_bytes == 256 * 1024 and nrf.storage_bytes == 1024 * 1024
    # sustained throughput is below the cores' peaks (2 int8 MAC/cycle, 216 / 64 MHz)
    assert stm.macs_per_s["int8"] < 2 * 216e6 and nrf.macs_per_s["int8"] < 2 * 64e6
    # an MCU's BLE link is hundreds of kbit/s, not Mbit/s
    assert 100e3 / 8 <= stm.uplink_bytes_per_s <= 1e6 / 8
    assert load_profile("jetson-nano").ram_bytes == 4 * 1024**3
    assert load_profile("jetson-orin-nano").ram_bytes == 8 * 1024**3


def test_profile_is_frozen_and_hashable() -> None:
    profile = load_profile("rpi4")
    with pytest.raises(dataclasses.FrozenInstanceError):
        profile.ram_bytes = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        profile.macs_per_s["fp32"] = 1.0  # type: ignore[index]
    assert hash(profile) == hash(load_profile("rpi4"))
    assert isinstance(profile, DeviceProfile)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d.pop("ram_bytes"),
         "field 'ram_bytes' is missing; expected a positive integer (bytes)"),
        (lambda d: d.update(ram_bytes=-5), "field 'ram_bytes' must be a positive integer, got -5"),
        (lambda d: d.update(ram_bytes="lots"), "field 'ram_bytes' must be a positive integer"),
        (lambda d: d.update(ram_bytes=1.5), "field 'ram_bytes' must be a positive integer"),
        (lambda d: d.update(latency_s=True), "field 'latency_s' must be a non-negative number"),
        (lambda d: d.update(power_compute_w=0), "field 'power_compute_w' must be a positive"),
        (lambda d: d.update(device_class="fpga"), "field 'device_class' must be one of"),
        (lambda d: d.update(ramm_bytes=5), "unknown field 'ramm_bytes'"),
        (lambda d: d["macs_per_s"].pop("int8"), "field 'macs_per_s.int8' is missing"),
        (lambda d: d["macs_per_s"].update(fp32=-1.0), "field 'macs_per_s.fp32' must be a pos"),
        (lambda d: d["sources"].update(bogus="x"), "field 'sources.bogus' cites an unknown"),
    ],
)
def test_bad_profile_is_refused_naming_profile_and_field(
    tmp_path: Path, mutate: Any, expected: str
) -> None:
    data = _valid()
    mutate(data)
    path = _write(tmp_path, data)
    with pytest.raises(ProfileError) as err:
        load_profile_file(path)
    message = str(err.value)
    assert message.startswith("profile 'mydev' (mydev.toml): ")
    assert expected in message


def test_invalid_toml_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("ram_bytes = = 3\n")
    with pytest.raises(ProfileError, match="broken.toml.*not valid TOML"):
        load_profile(path)


def test_unknown_name_lists_known_profiles() -> None:
    with pytest.raises(ProfileError) as err:
        load_profile("stm32f999")
    assert "unknown device profile 'stm32f999'" in str(err.value)
    for name in BUILTINS:
        assert name in str(err.value)


def test_user_profile_dir_adds_and_shadows_profiles(user_dir: Path) -> None:
    _write(user_dir, _valid("mydev"))
    shadow = _valid("rpi4")
    shadow["ram_bytes"] = 1024
    _write(user_dir, shadow, stem="rpi4")
    assert "mydev" in list_profiles()
    assert load_profile("mydev").ram_bytes == 327680
    assert load_profile("rpi4").ram_bytes == 1024  # user dir comes before the built-ins
    unregister_profile_dir(user_dir)
    assert load_profile("rpi4").ram_bytes == 4 * 1024**3
    assert "mydev" not in list_profiles()


def test_profile_path_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    _write(second, _valid("envdev"), stem="envdev")
    monkeypatch.setenv(PROFILE_PATH_ENV, f"{first}:{second}")
    assert load_profile("envdev").name == "envdev"
    monkeypatch.delenv(PROFILE_PATH_ENV)
    with pytest.raises(ProfileError, match="unknown device profile"):
        load_profile("envdev")


def test_name_must_match_file_name(user_dir: Path) -> None:
    _write(user_dir, _valid("other"), stem="mydev")
    with pytest.raises(ProfileError, match="field 'name' must match the file name 'mydev'"):
        load_profile("mydev")


def test_register_missing_dir_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="does not exist"):
        register_profile_dir(tmp_path / "nope")


def test_format_bytes_convention() -> None:
    assert format_bytes(512) == "512 B"
    assert format_bytes(327680) == "320 KB"
    assert format_bytes(int(1.94 * 1024**2)) == "1.9 MB"
    assert format_bytes(int(12.34 * 1024**2)) == "12.3 MB"
    assert format_bytes(4 * 1024**3) == "4 GB"
