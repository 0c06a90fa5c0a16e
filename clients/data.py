"""Data for the fleet: scikit-learn digits, user ``.npz`` arrays, and synthetic images.

Every source yields ``(x, y)`` with ``x`` float32 ``(N, C, H, W)`` in ``[0, 1]`` and ``y``
int64 class labels. A held-out test set is split off once; the rest is partitioned across
``num_devices`` shards, IID or Dirichlet(alpha) non-IID, deterministically from the seed.

For fleets larger than the data (say 10,000 devices on 1,437 digits) a device's shard is
*drawn* rather than cut: each device samples its own class mixture (Dirichlet(alpha), or
uniform for IID) and its own examples, with seeded affine and noise augmentations, from
``(seed, device_id)`` alone. Nothing per device is precomputed, so an idle device costs no
memory, and no device is ever empty.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from devices.errors import ConfigError, DataError

__all__ = ["DataSpec", "FleetData", "load_source", "partition_indices"]

_SOURCES = ("digits", "npz", "synthetic")
_PARTITIONS = ("iid", "dirichlet")


@dataclass(frozen=True)
class DataSpec:
    """What data a fleet trains on and how it is split.

    Parameters
    ----------
    source : str
        ``"digits"`` (scikit-learn's, real, ships with the package), ``"npz"`` (a user's file
        with arrays ``x`` and ``y``) or ``"synthetic"`` (class-conditional images at
        ``image_size`` with ``channels`` channels, made from upscaled digits).
    partition : str
        ``"iid"`` or ``"dirichlet"``.
    alpha : float
        Dirichlet concentration (smaller is more skewed).
    test_fraction : float
        Share of the data held out for the server's test set.
    path : str
        The ``.npz`` file for ``source = "npz"``.
    samples_per_device : int
        Examples a device draws when the fleet is larger than the data can be cut for
        (``0``: cut the data into shards when possible, draw otherwise).
    min_samples : int
        Smallest shard a cut partition may produce before devices switch to drawing.
    image_size : int
        Side of the synthetic images (``source = "synthetic"``); digits are 8.
    channels : int
        Channels of the synthetic images.
    synthetic_size : int
        Number of synthetic examples in the pool (train + test).
    """

    source: str = "digits"
    partition: str = "dirichlet"
    alpha: float = 0.5
    test_fraction: float = 0.2
    path: str = ""
    samples_per_device: int = 0
    min_samples: int = 8
    image_size: int = 8
    channels: int = 1
    synthetic_size: int = 2000

    def __post_init__(self) -> None:
        if self.source not in _SOURCES:
            raise ConfigError(f"data.source: expected one of {_SOURCES}, got {self.source!r}")
        if self.partition not in _PARTITIONS:
            raise ConfigError(
                f"data.partition: expected one of {_PARTITIONS}, got {self.partition!r}"
            )
        if not self.alpha > 0:
            raise ConfigError(f"data.alpha: expected a number > 0, got {self.alpha!r}")
        if not 0 < self.test_fraction < 1:
            raise ConfigError(
                f"data.test_fraction: expected a number in (0, 1), got {self.test_fraction!r}"
            )
        if self.source == "npz" and not self.path:
            raise ConfigError("data.path: source 'npz' needs the path of an .npz file")
        for name, low in (("samples_per_device", 0), ("min_samples", 0), ("image_size", 4),
                          ("channels", 1), ("synthetic_size", 20)):
            if getattr(self, name) < low:
                raise ConfigError(
                    f"data.{name}: expected an integer >= {low}, got {getattr(self, name)}"
                )


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None, :, :]
    return x, d.target.astype(np.int64)


def _load_npz(path: str) -> tuple[np.ndarray, np.ndarray]:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data.path: {path!r} does not exist or is not a file")
    try:
        with np.load(p, allow_pickle=False) as f:
            if "x" not in f or "y" not in f:
                raise DataError(
                    f"{path}: expected arrays 'x' (N, C, H, W) and 'y' (N,), found {sorted(f)}"
                )
            x, y = np.asarray(f["x"]), np.asarray(f["y"])
    except DataError:
        raise
    except Exception as exc:  # zipfile and numpy's reader raise a zoo of types on bad bytes
        raise DataError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from exc
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or y.ndim != 1 or len(x) != len(y) or x.size == 0:
        raise DataError(
            f"{path}: expected x of shape (N, C, H, W) or (N, H, W) and y of shape (N,), "
            f"N > 0, got x {x.shape} and y {y.shape}"
        )
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
        raise DataError(f"{path}: y must hold non-negative integer class labels")
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)
            or x.dtype == np.bool_):
        raise DataError(f"{path}: x must hold real numbers, got dtype {x.dtype}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise DataError(f"{path}: x holds non-finite values")
    if x.max() > 1.0:
        x = x / 255.0 if x.max() <= 255.0 else x / x.max()
    return x, y.astype(np.int64)


def _synthetic(spec: DataSpec, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class-conditional images at ``image_size``: digits upscaled, tinted, shifted, noised."""
    base_x, base_y = _load_digits()
    rng = np.random.default_rng([seed, 7])
    idx = rng.integers(0, len(base_x), spec.synthetic_size)
    x = torch.from_numpy(base_x[idx])
    x = F.interpolate(x, size=(spec.image_size, spec.image_size), mode="bilinear")
    tint = torch.from_numpy(rng.uniform(0.5, 1.0, (len(idx), spec.channels, 1, 1)).astype("f4"))
    x = x.expand(-1, spec.channels, -1, -1) * tint
    noise = torch.from_numpy(rng.normal(0, 0.05, tuple(x.shape)).astype(np.float32))
    x = (x + noise).clamp(0, 1)
    return x.numpy().astype(np.float32), base_y[idx]


def load_source(spec: DataSpec, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Load the whole pool of examples named by ``spec``."""
    if spec.source == "digits":
        return _load_digits()
    if spec.source == "npz":
        return _load_npz(spec.path)
    return _synthetic(spec, seed)


def partition_indices(
    labels: np.ndarray, num_devices: int, partition: str, alpha: float, seed: int
) -> list[np.ndarray]:
    """Cut ``labels``' indices into ``num_devices`` shards, deterministically.

    IID shuffles and splits evenly. Dirichlet draws, per class, the share of that class
    each device gets from Dir(alpha) (the usual label-skew partition of Hsu et al., 2019).
    """
    rng = np.random.default_rng([seed, 1])
    n = len(labels)
    if partition == "iid":
        return [np.sort(s) for s in np.array_split(rng.permutation(n), num_devices)]
    shards: list[list[int]] = [[] for _ in range(num_devices)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        props = rng.dirichlet(np.full(num_devices, alpha))
        cuts = (np.cumsum(props) * len(idx)).astype(int)[:-1]
        for dev, part in enumerate(np.split(idx, cuts)):
            shards[dev].extend(part.tolist())
    return [np.sort(np.asarray(s, dtype=np.int64)) for s in shards]


def _augment(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Seeded small affine transform (rotation, scale, shift) plus Gaussian noise."""
    n = len(x)
    ang = rng.uniform(-0.26, 0.26, n)
    scale = rng.uniform(0.9, 1.1, n)
    shift = rng.uniform(-0.1, 0.1, (n, 2))
    theta = np.zeros((n, 2, 3), dtype=np.float32)
    theta[:, 0, 0] = np.cos(ang) / scale
    theta[:, 0, 1] = -np.sin(ang) / scale
    theta[:, 1, 0] = np.sin(ang) / scale
    theta[:, 1, 1] = np.cos(ang) / scale
    theta[:, :, 2] = shift
    xt = torch.from_numpy(x)
    grid = F.affine_grid(torch.from_numpy(theta), list(xt.shape), align_corners=False)
    out = F.grid_sample(xt, grid, align_corners=False, padding_mode="zeros")
    out = out + torch.from_numpy(rng.normal(0, 0.03, out.shape).astype(np.float32))
    return out.clamp(0, 1).numpy()


class FleetData:
    """A test set plus a deterministic shard per device.

    Parameters
    ----------
    spec : DataSpec
        What to load and how to split it.
    num_devices : int
        Fleet size.
    seed : int
        Seed of every split and draw.
    """

    def __init__(self, spec: DataSpec, num_devices: int, seed: int) -> None:
        if num_devices < 1:
            raise ConfigError(f"fleet.size: expected an integer >= 1, got {num_devices}")
        self.spec = spec
        self.num_devices = num_devices
        self.seed = seed
        x, y = load_source(spec, seed)
        rng = np.random.default_rng([seed, 0])
        perm = rng.permutation(len(x))
        n_test = max(1, int(round(spec.test_fraction * len(x))))
        test, train = perm[:n_test], perm[n_test:]
        if len(train) == 0:
            raise DataError(f"data: {len(x)} examples leave none for training")
        self.x_train, self.y_train = x[train], y[train]
        self.x_test, self.y_test = x[test], y[test]
        self.num_classes = int(max(y.max() + 1, 2))
        self.input_shape: tuple[int, ...] = tuple(int(d) for d in x.shape[1:])
        self._shards: list[np.ndarray] | None = None
        self.drawn = bool(spec.samples_per_device) or (
            len(train) / num_devices < 2 * spec.min_samples
        )
        if not self.drawn:
            shards = partition_indices(
                self.y_train, num_devices, spec.partition, spec.alpha, seed
            )
            if min(len(s) for s in shards) < spec.min_samples:
                self.drawn = True  # a cut partition would leave devices (near) empty
            else:
                self._shards = shards
        self._per_device = spec.samples_per_device or max(
            spec.min_samples, len(train) // num_devices
        )
        self._by_class = [np.flatnonzero(self.y_train == c) for c in range(self.num_classes)]

    def device_data(self, device_id: int) -> tuple[np.ndarray, np.ndarray]:
        """The shard of ``device_id``: the same arrays every time, in every process."""
        if not 0 <= device_id < self.num_devices:
            raise DataError(f"partition-id {device_id} out of range [0, {self.num_devices})")
        if self._shards is not None:
            idx = self._shards[device_id]
            return self.x_train[idx], self.y_train[idx]
        rng = np.random.default_rng([self.seed, 2, device_id])
        present = [c for c in range(self.num_classes) if len(self._by_class[c])]
        if self.spec.partition == "dirichlet":
            p = rng.dirichlet(np.full(len(present), self.spec.alpha))
        else:
            p = np.full(len(present), 1.0 / len(present))
        classes = rng.choice(present, size=self._per_device, p=p)
        idx = np.array([rng.choice(self._by_class[c]) for c in classes], dtype=np.int64)
        return _augment(self.x_train[idx], rng), self.y_train[idx]

    def test_data(self) -> tuple[np.ndarray, np.ndarray]:
        """The held-out test set the server evaluates on."""
        return self.x_test, self.y_test

    def fingerprint(self) -> str:
        """A short hash of the test set, to check two processes see the same data."""
        return hashlib.sha256(self.x_test.tobytes() + self.y_test.tobytes()).hexdigest()[:12]
