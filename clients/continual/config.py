"""Reading a config's ``[continual]`` table into a schedule and a method.

One flat table configures both, e.g.::

    [continual]
    kind = "class-incremental"   # the stream (StreamSchedule's fields)
    num_tasks = 5
    rounds_per_task = 4
    offset = 2
    jitter = 1
    method = "replay"            # the method (ContinualMethod's fields)
    replay_fraction = 0.05

``seed`` seeds both. Lists (TOML arrays) become the tuples the dataclasses hold; an unknown
key is an error that lists the known ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from clients.continual.methods import ContinualMethod
from clients.continual.schedule import StreamSchedule
from devices.errors import ConfigError

__all__ = ["continual_from_config"]


def continual_from_config(cfg: Mapping[str, Any]) -> tuple[StreamSchedule, ContinualMethod]:
    """Split a ``[continual]`` table into a :class:`StreamSchedule` and a method.

    Raises
    ------
    ConfigError
        On an unknown key or a bad value (the message names the field).
    """
    sched_keys = {f.name for f in fields(StreamSchedule) if f.init}
    method_keys = {f.name for f in fields(ContinualMethod) if f.init} - {"name"} | {"method"}
    unknown = sorted(set(cfg) - sched_keys - method_keys)
    if unknown:
        raise ConfigError(f"continual: unknown keys {unknown}; expected some of "
                          f"{sorted(sched_keys | method_keys)}")
    sched_kw: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v
                for k, v in cfg.items() if k in sched_keys}
    method_kw = {k: v for k, v in cfg.items() if k in method_keys}
    try:
        return StreamSchedule(**sched_kw), ContinualMethod.from_config(method_kw)
    except TypeError as exc:
        raise ConfigError(f"continual: {exc}") from exc
