"""A bounded replay buffer (reservoir or class-balanced reservoir) that lives in plain arrays.

The buffer's size comes from the device's budget (:func:`replay_capacity`), it never holds
more than that, and it round-trips through ``dict[str, numpy.ndarray]`` so the engine's
per-device store can keep it between rounds. No random state has to be stored: the draw of
each :meth:`ReplayBuffer.add` comes from ``(seed, samples seen so far)``.

Sampling rules
--------------
* Reservoir (Vitter's algorithm R): every sample of the stream is in the buffer with the
  same probability ``capacity / seen``.
* Class-balanced reservoir (CBRS, Chrysakis & Moens, ICML 2020): once full, a sample of a
  class that is not among the largest in the buffer replaces a random sample of a largest
  class; a sample of a largest class replaces a random sample of its own class with
  probability ``stored_c / seen_c``. Rare classes are kept, frequent ones are thinned.

Samples carry a 64-bit key (by default a hash of their bytes and label): offering a sample
already in the buffer is a no-op, so a device that trains on the same task data for several
rounds does not fill its buffer with copies.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from devices.errors import BudgetError, PayloadError

__all__ = ["ReplayBuffer", "content_keys", "replay_capacity", "sample_nbytes"]


def sample_nbytes(sample_shape: tuple[int, ...], x_dtype: npt.DTypeLike = np.float32,
                  y_dtype: npt.DTypeLike = np.int64, key_bytes: int = 8) -> int:
    """Bytes one stored sample takes: its pixels, its label and its key."""
    pixels = int(np.prod(sample_shape, dtype=np.int64)) * np.dtype(x_dtype).itemsize
    return pixels + np.dtype(y_dtype).itemsize + key_bytes


def replay_capacity(ram_bytes: int, storage_bytes: int, sample_bytes: int,
                    fraction: float = 0.05) -> int:
    """How many samples a device can keep for replay.

    The buffer is persisted in storage between rounds and loaded whole into RAM to draw
    replay batches, so it must fit ``fraction`` of *both*: the capacity is
    ``floor(fraction * min(ram_bytes, storage_bytes) / sample_bytes)``. An STM32F746 (320 KB
    SRAM, 1 MB Flash) giving 5% keeps 62 digits (264 bytes each); a Jetson Nano (4 GB)
    keeps hundreds of thousands.

    Raises
    ------
    BudgetError
        If a size is not positive or ``fraction`` is not in ``(0, 1]``.
    """
    if ram_bytes <= 0 or storage_bytes <= 0 or sample_bytes <= 0:
        raise BudgetError(f"replay_capacity: ram_bytes, storage_bytes and sample_bytes must be "
                          f"positive, got {ram_bytes}, {storage_bytes}, {sample_bytes}")
    if not 0.0 < fraction <= 1.0:
        raise BudgetError(f"replay_capacity: fraction must be in (0, 1], got {fraction}")
    return int(fraction * min(ram_bytes, storage_bytes) // sample_bytes)


def content_keys(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A 64-bit key per sample from its bytes and label (BLAKE2b), as int64."""
    xc = np.ascontiguousarray(x)
    out = np.empty(len(xc), dtype=np.int64)
    for i in range(len(xc)):
        h = hashlib.blake2b(xc[i].tobytes(), digest_size=8)
        h.update(np.int64(y[i]).tobytes())
        out[i] = np.frombuffer(h.digest(), dtype=np.int64)[0]
    return out


class ReplayBuffer:
    """Samples kept from a device's past stream, at most ``capacity`` of them.

    Parameters
    ----------
    capacity : int
        Largest number of samples held (see :func:`replay_capacity`); 0 keeps nothing.
    class_balanced : bool
        Use the class-balanced reservoir (CBRS) instead of plain reservoir sampling.
    seed : int
        Seed of the insertion draws and of :meth:`sample`'s default generator.
    """

    def __init__(self, capacity: int, *, class_balanced: bool = False, seed: int = 0) -> None:
        if capacity < 0:
            raise BudgetError(f"replay buffer capacity: expected >= 0, got {capacity}")
        self.capacity = int(capacity)
        self.class_balanced = bool(class_balanced)
        self.seed = int(seed)
        self.seen = 0
        self._x: np.ndarray | None = None
        self._y = np.zeros(0, dtype=np.int64)
        self._keys = np.zeros(0, dtype=np.int64)
        self._class_seen: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._y)

    @property
    def x(self) -> np.ndarray:
        """The stored inputs, ``(len, *sample_shape)`` (empty ``(0,)`` before any add)."""
        return self._x if self._x is not None else np.zeros(0, dtype=np.float32)

    @property
    def y(self) -> np.ndarray:
        """The stored labels."""
        return self._y

    def class_counts(self) -> dict[int, int]:
        """Stored samples per class."""
        labels, counts = np.unique(self._y, return_counts=True)
        return {int(k): int(v) for k, v in zip(labels, counts, strict=True)}

    # -- insertion ------------------------------------------------------------------------

    def add(self, x: np.ndarray, y: np.ndarray, keys: np.ndarray | None = None) -> int:
        """Offer a batch of samples to the buffer, in order; returns how many were stored."""
        if len(x) != len(y):
            raise PayloadError(f"replay add: x has {len(x)} samples but y has {len(y)}")
        if len(x) == 0:
            return 0
        if self._x is None:
            self._x = np.zeros((0, *x.shape[1:]), dtype=x.dtype)
        elif x.shape[1:] != self._x.shape[1:]:
            raise PayloadError(f"replay add: sample shape {x.shape[1:]} differs from the "
                               f"buffer's {self._x.shape[1:]}")
        keys = content_keys(x, y) if keys is None else np.asarray(keys, dtype=np.int64)
        rng = np.random.default_rng([self.seed, self.seen, 0xB0F])
        stored = set(self._keys.tolist())
        bx, by, bk = list(self._x), self._y.tolist(), self._keys.tolist()
        added = 0
        for xi, yi, ki in zip(x, y.tolist(), keys.tolist(), strict=True):
            if ki in stored:
                continue
            self.seen += 1
            self._class_seen[yi] = self._class_seen.get(yi, 0) + 1
            slot = self._slot(by, yi, rng)
            if slot is None:
                continue
            if slot == len(by):
                bx.append(xi)
                by.append(yi)
                bk.append(ki)
            else:
                stored.discard(bk[slot])
                bx[slot], by[slot], bk[slot] = xi, yi, ki
            stored.add(ki)
            added += 1
        self._x = np.stack(bx).astype(self._x.dtype) if bx else self._x[:0]
        self._y = np.asarray(by, dtype=np.int64)
        self._keys = np.asarray(bk, dtype=np.int64)
        return added

    def _slot(self, labels: list[int], label: int, rng: np.random.Generator) -> int | None:
        """Where the incoming sample goes: ``len(labels)`` appends, ``None`` drops it."""
        if len(labels) < self.capacity:
            return len(labels)
        if self.capacity == 0:
            return None
        if not self.class_balanced:
            j = int(rng.integers(0, self.seen))
            return j if j < self.capacity else None
        arr = np.asarray(labels)
        classes, counts = np.unique(arr, return_counts=True)
        largest = set(classes[counts == counts.max()].tolist())
        if label not in largest:
            victim_class = int(rng.choice(sorted(largest)))
            return int(rng.choice(np.flatnonzero(arr == victim_class)))
        own = np.flatnonzero(arr == label)
        if rng.random() < len(own) / self._class_seen[label]:
            return int(rng.choice(own))
        return None

    # -- use ------------------------------------------------------------------------------

    def sample(self, n: int, rng: np.random.Generator | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Draw ``min(n, len)`` stored samples without replacement."""
        rng = rng if rng is not None else np.random.default_rng([self.seed, self.seen])
        k = min(int(n), len(self))
        idx = rng.choice(len(self), size=k, replace=False) if k else np.zeros(0, np.int64)
        return self.x[idx], self._y[idx]

    # -- persistence ----------------------------------------------------------------------

    def to_state(self) -> dict[str, np.ndarray]:
        """The buffer as plain arrays (for the per-device store)."""
        labels = np.asarray(sorted(self._class_seen), dtype=np.int64)
        return {
            "x": self.x.copy(),
            "y": self._y.copy(),
            "keys": self._keys.copy(),
            "meta": np.asarray([self.capacity, int(self.class_balanced), self.seed, self.seen],
                               dtype=np.int64),
            "class_seen": np.stack([labels, np.asarray([self._class_seen[int(k)]
                                                        for k in labels], dtype=np.int64)]),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, np.ndarray]) -> ReplayBuffer:
        """Rebuild a buffer from :meth:`to_state`'s arrays.

        Raises
        ------
        PayloadError
            If an array is missing or the arrays do not fit together.
        """
        missing = [k for k in ("x", "y", "keys", "meta", "class_seen") if k not in state]
        if missing:
            raise PayloadError(f"replay state: missing arrays {missing}")
        meta = np.asarray(state["meta"]).reshape(-1)
        if meta.shape != (4,):
            raise PayloadError(f"replay state 'meta': expected 4 integers, got {meta.shape}")
        x, y, keys = np.asarray(state["x"]), np.asarray(state["y"]), np.asarray(state["keys"])
        cs = np.asarray(state["class_seen"])
        n = len(y)
        if (len(keys) != n or (n and len(x) != n) or n > meta[0]
                or cs.ndim != 2 or cs.shape[0] != 2):
            raise PayloadError(f"replay state: {len(x)} inputs, {n} labels, {len(keys)} keys, "
                               f"class_seen {cs.shape} for capacity {meta[0]}")
        buf = cls(int(meta[0]), class_balanced=bool(meta[1]), seed=int(meta[2]))
        buf.seen = int(meta[3])
        if x.ndim > 1:
            buf._x = x.copy()
        buf._y = y.astype(np.int64)
        buf._keys = keys.astype(np.int64)
        buf._class_seen = {int(k): int(v) for k, v in zip(cs[0], cs[1], strict=True)}
        return buf
