"""devices: what an emulated device can do, and what a training job costs on it.

Lives here: device profiles (TOML, with datasheet sources), the cost model (MACs, bytes,
peak memory, time, energy) and budget checks. Must not: train, aggregate or schedule.
"""

from devices.errors import (
    BudgetError,
    ConfigError,
    DataError,
    PayloadError,
    ProfileError,
    TinyFleetError,
)

__all__ = [
    "BudgetError",
    "ConfigError",
    "DataError",
    "PayloadError",
    "ProfileError",
    "TinyFleetError",
]
