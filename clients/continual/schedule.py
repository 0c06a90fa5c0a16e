"""Per-device data streams over rounds: which task a device is on, and that task's data.

A *task* is a stage of a device's stream. In a ``"class-incremental"`` stream each task
brings a new group of classes (digits 0-1, then 2-3, ...); in a ``"domain-shift"`` stream
every task has all classes but a new input domain (task 0 is clean; later tasks are rotated,
noisy or low-contrast versions); in a ``"mix"`` stream both change at every task (task k
has class group ``k mod G`` in domain ``k mod D``, so after G tasks old classes come back in
a new domain).

Devices need not switch tasks together: each device's boundaries are shifted by a constant
per-device ``offset`` (0..``offset`` rounds) and each boundary by its own ``jitter``
(-``jitter``..``jitter``), both drawn from ``(seed, device_id)`` alone, so any process can
recompute any device's schedule without a table.

The domain's parameters (angle, noise level, contrast factor) depend on ``(schedule.seed,
task)`` only, so task j is the same domain on every device; the noise *realisation* depends
on the ``seed`` passed to :func:`make_task_data` (e.g. per device).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from clients.continual.domains import DOMAINS, apply_domain
from devices.errors import ConfigError, DataError

__all__ = ["KINDS", "StreamSchedule", "TaskSpec", "make_task_data"]

KINDS = ("class-incremental", "domain-shift", "mix")

# Ranges the per-task domain strength is drawn from (uniform): rotation in degrees (either
# sign), noise standard deviation on [0, 1] pixels, contrast factor (< 1 flattens).
_STRENGTH = {"rotation": (30.0, 90.0), "noise": (0.15, 0.35), "contrast": (0.25, 0.5)}


def _device_key(device_id: int | str) -> int:
    """A stable non-negative integer for a device id (ints as is, strings by CRC32)."""
    if isinstance(device_id, (int, np.integer)):
        if device_id < 0:
            raise ConfigError(f"device_id: expected a non-negative id, got {device_id}")
        return int(device_id)
    return zlib.crc32(str(device_id).encode())


@dataclass(frozen=True)
class TaskSpec:
    """What one task is: its classes and its input domain.

    Attributes
    ----------
    classes : tuple of int
        The labels present in the task.
    domain : str
        One of ``domains.DOMAINS``.
    strength : float
        The domain's parameter (degrees, noise sigma or contrast factor; 0 for identity).
    """

    classes: tuple[int, ...]
    domain: str
    strength: float


@dataclass(frozen=True)
class StreamSchedule:
    """When each device moves from one task to the next, and what each task holds.

    Parameters
    ----------
    kind : str
        ``"class-incremental"``, ``"domain-shift"`` or ``"mix"``.
    num_tasks : int
        Number of tasks in the stream (the last one lasts until the run ends).
    rounds_per_task : int
        Nominal length of a task, in rounds.
    num_classes : int
        Classes of the dataset (labels ``0 .. num_classes - 1``).
    classes_per_task : int
        Size of a class group (class-incremental and mix); 0 splits ``num_classes`` evenly
        over ``num_tasks`` (class-incremental) or into groups of 2 (mix).
    domains : tuple of str
        The shifted domains, cycled over tasks (domain-shift: task 0 is ``"identity"``, task
        k > 0 is ``domains[(k - 1) % len(domains)]``; mix: task k is
        ``("identity",) + domains`` at ``k % (len(domains) + 1)``).
    offset : int
        Largest constant per-device delay of all boundaries, in rounds.
    jitter : int
        Largest per-boundary shift, in rounds (either way); must be below
        ``rounds_per_task / 2`` so boundaries stay ordered.
    first_round : int
        The round the stream starts at (Flower counts rounds from 1).
    seed : int
        Seed of the offsets, jitters and domain parameters.
    value_range : tuple of float or None
        Range pixel values are clipped to after noise or contrast (``None``: no clipping).
    """

    kind: str = "class-incremental"
    num_tasks: int = 5
    rounds_per_task: int = 4
    num_classes: int = 10
    classes_per_task: int = 0
    domains: tuple[str, ...] = ("rotation", "noise", "contrast")
    offset: int = 0
    jitter: int = 0
    first_round: int = 1
    seed: int = 0
    value_range: tuple[float, float] | None = (0.0, 1.0)
    _groups: tuple[tuple[int, ...], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"continual.kind: expected one of {KINDS}, got {self.kind!r}")
        ints = ("num_tasks", "rounds_per_task", "num_classes", "classes_per_task", "offset",
                "jitter", "first_round", "seed")
        for name in ints:
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
                raise ConfigError(f"continual.{name}: expected an integer, got {v!r}")
        for name in ("num_tasks", "rounds_per_task", "num_classes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"continual.{name}: expected an integer >= 1, "
                                  f"got {getattr(self, name)!r}")
        if self.offset < 0 or self.jitter < 0 or self.classes_per_task < 0:
            raise ConfigError("continual.offset/jitter/classes_per_task: expected integers "
                              f">= 0, got {self.offset}, {self.jitter}, {self.classes_per_task}")
        if self.num_tasks > 1 and 2 * self.jitter >= self.rounds_per_task:
            raise ConfigError(f"continual.jitter: expected < rounds_per_task / 2 = "
                              f"{self.rounds_per_task / 2}, got {self.jitter}")
        bad = [d for d in self.domains if d not in DOMAINS or d == "identity"]
        if bad or (self.kind != "class-incremental" and not self.domains):
            raise ConfigError(f"continual.domains: expected a non-empty list from "
                              f"{DOMAINS[1:]}, got {list(self.domains)}")
        object.__setattr__(self, "_groups", self._make_groups())

    def _make_groups(self) -> tuple[tuple[int, ...], ...]:
        if self.kind == "domain-shift":
            return (tuple(range(self.num_classes)),)
        per = self.classes_per_task
        if per == 0:
            per = -(-self.num_classes // self.num_tasks) if self.kind == "class-incremental" else 2
        if per > self.num_classes:
            raise ConfigError(f"continual.classes_per_task: expected <= num_classes = "
                              f"{self.num_classes}, got {per}")
        groups = [tuple(range(s, min(s + per, self.num_classes)))
                  for s in range(0, self.num_classes, per)]
        if self.kind == "class-incremental" and len(groups) < self.num_tasks:
            raise ConfigError(f"continual.num_tasks: {self.num_classes} classes in groups of "
                              f"{per} make only {len(groups)} tasks, got {self.num_tasks}")
        return tuple(groups)

    # -- timing ---------------------------------------------------------------------------

    def boundaries(self, device_id: int | str) -> list[int]:
        """Rounds at which the device starts tasks 1, 2, ... (task 0 starts at once)."""
        rng = np.random.default_rng([self.seed, _device_key(device_id), 0x5C4ED])
        shift = int(rng.integers(0, self.offset + 1))
        jit = rng.integers(-self.jitter, self.jitter + 1, size=max(self.num_tasks - 1, 0))
        out: list[int] = []
        for k in range(1, self.num_tasks):
            b = self.first_round + k * self.rounds_per_task + shift + int(jit[k - 1])
            out.append(max(b, out[-1] + 1 if out else self.first_round + 1))
        return out

    def task_at(self, round: int, device_id: int | str) -> int:
        """The task the device trains on in ``round`` (rounds before the start: task 0)."""
        return sum(1 for b in self.boundaries(device_id) if round >= b)

    def seen_tasks(self, round: int, device_id: int | str) -> list[int]:
        """Every task the device has met by ``round``, the current one included."""
        return list(range(self.task_at(round, device_id) + 1))

    def tasks_reached(self, round: int, device_ids: Iterable[int | str]) -> list[int]:
        """Tasks that at least one of ``device_ids`` has met by ``round`` (a fleet's row)."""
        return list(range(max((self.task_at(round, d) for d in device_ids), default=0) + 1))

    # -- content --------------------------------------------------------------------------

    def task_spec(self, task: int) -> TaskSpec:
        """The classes and domain of ``task`` (same on every device)."""
        if not 0 <= task < self.num_tasks:
            raise ConfigError(f"task: expected 0 <= task < {self.num_tasks}, got {task}")
        groups = self._groups
        if self.kind == "class-incremental":
            return TaskSpec(groups[task], "identity", 0.0)
        if self.kind == "domain-shift":
            domain = "identity" if task == 0 else self.domains[(task - 1) % len(self.domains)]
            return TaskSpec(groups[0], domain, self._strength(domain, task))
        cycle = ("identity", *self.domains)
        domain = cycle[task % len(cycle)]
        return TaskSpec(groups[task % len(groups)], domain, self._strength(domain, task))

    def _strength(self, domain: str, task: int) -> float:
        if domain == "identity":
            return 0.0
        rng = np.random.default_rng([self.seed, task, 0xD0])
        lo, hi = _STRENGTH[domain]
        value = float(rng.uniform(lo, hi))
        if domain == "rotation" and rng.random() < 0.5:
            value = -value
        return value


def make_task_data(
    x: np.ndarray, y: np.ndarray, task: int, schedule: StreamSchedule, seed: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The part of ``(x, y)`` that belongs to ``task``, in the task's domain.

    Parameters
    ----------
    x, y : numpy.ndarray
        Images ``(N, C, H, W)`` (float) and integer labels ``(N,)``, e.g. a device's shard
        or the test set.
    task : int
        The task (see :meth:`StreamSchedule.task_at`).
    schedule : StreamSchedule
        The stream.
    seed : int, optional
        Seed of the noise realisation (default: ``schedule.seed``); pass a per-device seed
        to give devices different noise of the same level.

    Returns
    -------
    tuple of numpy.ndarray
        ``(x_task, y_task)``: only the task's classes, transformed; may be empty.
    """
    if x.ndim != 4 or y.ndim != 1 or len(x) != len(y):
        raise DataError(f"x, y: expected (N, C, H, W) images and (N,) labels, got shapes "
                        f"{x.shape} and {y.shape}")
    spec = schedule.task_spec(task)
    keep = np.isin(y, np.asarray(spec.classes, dtype=y.dtype))
    xs, ys = x[keep], y[keep]
    rng = np.random.default_rng([schedule.seed if seed is None else seed, task, 0x401])
    xs = apply_domain(xs, spec.domain, spec.strength, rng, schedule.value_range)
    return xs, ys.copy()
