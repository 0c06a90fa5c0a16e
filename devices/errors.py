"""The project's own error type, shared by every package.

``devices`` is the upstream-most package (config -> devices -> clients -> strategies ->
sim), so the base error lives here and every other package may import it.
"""

from __future__ import annotations


class TinyFleetError(Exception):
    """Base class of every error tinyfleet raises on purpose.

    Bad input (a config field, a profile, a payload, a data file) always surfaces as a
    subclass of this type with a message that names what was wrong and what was expected.
    """


class ProfileError(TinyFleetError):
    """A device profile is missing, malformed or names an unknown device."""


class BudgetError(TinyFleetError):
    """A training job does not fit the device (RAM, storage or time)."""


class ConfigError(TinyFleetError):
    """An experiment config field is missing, mistyped or out of range."""


class DataError(TinyFleetError):
    """A data source is unreadable, empty or of the wrong shape."""


class PayloadError(TinyFleetError):
    """A message payload (e.g. a compressed update) is corrupt or of the wrong form."""
