"""Which profile each device of a fleet has: a mix of shares turned into an assignment.

The assignment is a pure function of ``(mix, size, seed)`` so that the server, the engine
and every ClientApp (in any process, or on a real SuperNode) derive the same one.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from devices.errors import ConfigError

__all__ = ["assign_profiles", "profile_counts"]


def profile_counts(mix: Mapping[str, float], size: int) -> dict[str, int]:
    """Split ``size`` devices by the shares in ``mix`` (largest remainder, exact total).

    Raises
    ------
    ConfigError
        If a share is negative or all are zero.
    """
    if size < 1:
        raise ConfigError(f"fleet.size: expected an integer >= 1, got {size}")
    names = sorted(mix)
    shares = np.array([float(mix[n]) for n in names])
    if (shares < 0).any() or shares.sum() <= 0:
        raise ConfigError(f"fleet.mix: shares must be >= 0 and not all 0, got {dict(mix)}")
    exact = shares / shares.sum() * size
    counts = np.floor(exact).astype(int)
    order = np.argsort(-(exact - counts), kind="stable")
    for i in order[: size - counts.sum()]:
        counts[i] += 1
    return {n: int(c) for n, c in zip(names, counts, strict=True) if c > 0}


def assign_profiles(mix: Mapping[str, float], size: int, seed: int) -> list[str]:
    """The profile name of each device ``0 .. size-1``, shuffled deterministically."""
    counts = profile_counts(mix, size)
    names = np.array([n for n, c in counts.items() for _ in range(c)])
    perm = np.random.default_rng([seed, 3]).permutation(size)
    return [str(n) for n in names[perm]]
