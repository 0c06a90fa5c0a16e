"""Device profiles: what one emulated device can do, read from a TOML file.

A profile is a flat TOML file in SI base units (bytes, bytes/s, MAC/s, W, J, s) with a
``[macs_per_s]`` table (sustained MACs per second per dtype) and a ``[sources]`` table
that cites a datasheet or paper for every number. Built-in profiles live next to this
module in ``devices/profiles/``; users add their own as ``NAME.toml`` files in directories
given to :func:`register_profile_dir` or listed in the ``TINYFLEET_PROFILE_PATH``
environment variable (colon-separated).

Search order for a name: registered directories (most recently registered first), then
``TINYFLEET_PROFILE_PATH`` in order, then the built-in directory; the first ``NAME.toml``
found wins, so a user file can shadow a built-in profile.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

from devices.errors import ProfileError

__all__ = [
    "BUILTIN_PROFILE_DIR",
    "DEVICE_CLASSES",
    "DeviceProfile",
    "PROFILE_PATH_ENV",
    "list_profiles",
    "load_profile",
    "load_profile_file",
    "profile_search_path",
    "register_profile_dir",
    "unregister_profile_dir",
]

BUILTIN_PROFILE_DIR = Path(__file__).with_name("profiles")
PROFILE_PATH_ENV = "TINYFLEET_PROFILE_PATH"
DEVICE_CLASSES = ("mcu", "sbc", "gpu")
_REQUIRED_DTYPES = ("fp32", "int8")

_registered_dirs: list[Path] = []


@dataclass(frozen=True)
class DeviceProfile:
    """The capabilities of one kind of device, in SI base units.

    Parameters
    ----------
    name : str
        Profile name, e.g. ``"stm32f746"``.
    device_class : str
        ``"mcu"``, ``"sbc"`` or ``"gpu"``; reports group devices by it.
    ram_bytes : int
        RAM (SRAM on an MCU) available to a training job, in bytes.
    storage_bytes : int
        Non-volatile storage (Flash, eMMC, SD card), in bytes.
    macs_per_s : Mapping[str, float]
        Sustained (not peak) multiply-accumulates per second per dtype; at least
        ``"fp32"`` and ``"int8"``.
    mem_bandwidth_bytes_per_s : float
        Sustained memory bandwidth, bytes/s (the roofline's slope).
    uplink_bytes_per_s, downlink_bytes_per_s : float
        Effective application-level network throughput each way, bytes/s.
    latency_s : float
        One-way network latency, seconds.
    power_compute_w : float
        Whole-device power while computing, watts.
    power_idle_w : float
        Whole-device power while waiting (lowest state that keeps RAM), watts.
    power_radio_w : float
        Whole-device power while transferring data, watts.
    battery_j : float or None
        Battery capacity in joules; ``None`` for a mains-powered device.
    sources : Mapping[str, str]
        Field name -> citation (datasheet, paper or stated assumption).
    frozen_weights_in_storage : bool
        True when frozen weights are read in place from memory-mapped storage (an MCU's
        internal Flash), so only trainable weights need RAM during training.
    """

    name: str
    device_class: str
    ram_bytes: int
    storage_bytes: int
    macs_per_s: Mapping[str, float] = field(hash=False)
    mem_bandwidth_bytes_per_s: float
    uplink_bytes_per_s: float
    downlink_bytes_per_s: float
    latency_s: float
    power_compute_w: float
    power_idle_w: float
    power_radio_w: float
    battery_j: float | None = None
    sources: Mapping[str, str] = field(default_factory=dict, hash=False, compare=False)
    frozen_weights_in_storage: bool = False


# field name -> (kind, what is expected (unit in parentheses), required)
_SCHEMA: dict[str, tuple[str, str, bool]] = {
    "name": ("name", "a non-empty string", True),
    "device_class": ("class", f"one of {list(DEVICE_CLASSES)}", True),
    "ram_bytes": ("pos_int", "a positive integer (bytes)", True),
    "storage_bytes": ("pos_int", "a positive integer (bytes)", True),
    "macs_per_s": ("macs", "a table of dtype -> positive number (MAC/s)", True),
    "mem_bandwidth_bytes_per_s": ("pos_num", "a positive number (bytes/s)", True),
    "uplink_bytes_per_s": ("pos_num", "a positive number (bytes/s)", True),
    "downlink_bytes_per_s": ("pos_num", "a positive number (bytes/s)", True),
    "latency_s": ("nonneg_num", "a non-negative number (seconds)", True),
    "power_compute_w": ("pos_num", "a positive number (watts)", True),
    "power_idle_w": ("nonneg_num", "a non-negative number (watts)", True),
    "power_radio_w": ("nonneg_num", "a non-negative number (watts)", True),
    "battery_j": ("pos_num", "a positive number (joules), or omitted", False),
    "sources": ("sources", "a table of field name -> citation string", False),
    "frozen_weights_in_storage": ("bool", "true or false", False),
}
if set(_SCHEMA) != {f.name for f in fields(DeviceProfile)}:  # pragma: no cover - dev guard
    raise AssertionError("profile schema and DeviceProfile fields disagree")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_value(kind: str, value: object) -> bool:
    """Whether ``value`` is acceptable for a field of this ``kind`` (not tables)."""
    if kind == "name":
        return isinstance(value, str) and bool(value.strip())
    if kind == "class":
        return value in DEVICE_CLASSES
    if kind == "pos_int":
        return isinstance(value, int) and not isinstance(value, bool) and value > 0
    if kind == "bool":
        return isinstance(value, bool)
    if not _is_number(value) or not math.isfinite(float(value)):  # type: ignore[arg-type]
        return False
    if kind == "pos_num":
        return float(value) > 0  # type: ignore[arg-type]
    return float(value) >= 0  # type: ignore[arg-type]  # nonneg_num


def _parse(data: Mapping[str, Any], label: str) -> DeviceProfile:
    """Validate a parsed TOML document and build the profile; ``label`` names it."""

    def fail(message: str) -> ProfileError:
        return ProfileError(f"{label}: {message}")

    unknown = sorted(set(data) - set(_SCHEMA))
    if unknown:
        raise fail(f"unknown field {unknown[0]!r}; expected only {sorted(_SCHEMA)}")
    values: dict[str, Any] = {}
    for key, (kind, expected, required) in _SCHEMA.items():
        if key not in data:
            if required:
                raise fail(f"field {key!r} is missing; expected {expected}")
            continue
        value = data[key]
        if kind == "macs":
            values[key] = _parse_macs(value, fail)
        elif kind == "sources":
            values[key] = _parse_sources(value, fail)
        elif not _check_value(kind, value):
            raise fail(f"field {key!r} must be {expected.split(' (')[0]}, got {value!r}")
        else:
            values[key] = float(value) if kind in ("pos_num", "nonneg_num") else value
    return DeviceProfile(**values)


def _parse_macs(value: object, fail: Any) -> Mapping[str, float]:
    if not isinstance(value, Mapping):
        raise fail(f"field 'macs_per_s' must be a table of dtype -> MAC/s, got {value!r}")
    for dtype in _REQUIRED_DTYPES:
        if dtype not in value:
            raise fail(f"field 'macs_per_s.{dtype}' is missing; expected a positive number")
    out: dict[str, float] = {}
    for dtype, rate in value.items():
        if not _check_value("pos_num", rate):
            raise fail(f"field 'macs_per_s.{dtype}' must be a positive number (MAC/s), "
                       f"got {rate!r}")
        out[str(dtype)] = float(rate)
    return MappingProxyType(out)


def _parse_sources(value: object, fail: Any) -> Mapping[str, str]:
    if not isinstance(value, Mapping):
        raise fail(f"field 'sources' must be a table of field -> citation, got {value!r}")
    out: dict[str, str] = {}
    for key, cite in value.items():
        base = str(key).split(".", 1)[0]
        if base not in _SCHEMA or base in ("sources", "name"):
            raise fail(f"field 'sources.{key}' cites an unknown field; expected one of the "
                       f"profile's numeric fields")
        if not isinstance(cite, str) or not cite.strip():
            raise fail(f"field 'sources.{key}' must be a non-empty citation string, "
                       f"got {cite!r}")
        out[str(key)] = cite
    return MappingProxyType(out)


def load_profile_file(path: str | Path) -> DeviceProfile:
    """Load and validate one profile file.

    Parameters
    ----------
    path : str or Path
        A TOML file.

    Raises
    ------
    ProfileError
        If the file is unreadable, not TOML, or has a missing, mistyped, out-of-range or
        unknown field (the message names the profile, the file, the field and what was
        expected).
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ProfileError(f"profile file {str(path)!r} cannot be read: {exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ProfileError(f"profile file {str(path)!r} is not valid TOML: {exc}") from exc
    name = data.get("name")
    shown = name if isinstance(name, str) and name.strip() else path.stem
    return _parse(data, f"profile {shown!r} ({path.name})")


def profile_search_path() -> list[Path]:
    """The directories searched for ``NAME.toml``, in priority order."""
    env = [Path(p) for p in os.environ.get(PROFILE_PATH_ENV, "").split(os.pathsep) if p]
    return [*reversed(_registered_dirs), *env, BUILTIN_PROFILE_DIR]


def register_profile_dir(path: str | Path) -> None:
    """Add a directory of user profiles (``NAME.toml`` files) ahead of the others.

    Raises
    ------
    ProfileError
        If ``path`` is not an existing directory.
    """
    path = Path(path)
    if not path.is_dir():
        raise ProfileError(f"profile directory {str(path)!r} does not exist or is not a "
                           f"directory")
    resolved = path.resolve()
    if resolved in _registered_dirs:
        _registered_dirs.remove(resolved)
    _registered_dirs.append(resolved)


def unregister_profile_dir(path: str | Path) -> None:
    """Remove a directory added by :func:`register_profile_dir` (no-op if absent)."""
    resolved = Path(path).resolve()
    if resolved in _registered_dirs:
        _registered_dirs.remove(resolved)


def list_profiles() -> list[str]:
    """Names of every profile on the search path, sorted."""
    names: set[str] = set()
    for directory in profile_search_path():
        if directory.is_dir():
            names.update(p.stem for p in directory.glob("*.toml"))
    return sorted(names)


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """Load a profile by name (searched on :func:`profile_search_path`) or by file path.

    A :class:`~pathlib.Path`, or a string ending in ``.toml`` or containing a path
    separator, is read as a file; anything else is a profile name.

    Raises
    ------
    ProfileError
        If the name is unknown (the message lists the known names) or the file is bad.
    """
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or text.endswith(".toml") or os.sep in text:
        return load_profile_file(name_or_path)
    for directory in profile_search_path():
        candidate = directory / f"{text}.toml"
        if candidate.is_file():
            profile = load_profile_file(candidate)
            if profile.name != text:
                raise ProfileError(f"profile {profile.name!r} ({candidate.name}): field 'name' "
                                   f"must match the file name {text!r}, got {profile.name!r}")
            return profile
    raise ProfileError(f"unknown device profile {text!r}; known profiles: {list_profiles()} "
                       f"(add NAME.toml to a directory given to register_profile_dir or "
                       f"${PROFILE_PATH_ENV})")
