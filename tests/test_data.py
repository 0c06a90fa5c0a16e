"""Data: digits, npz, synthetic; IID and Dirichlet partitions, deterministic from the seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clients.data import DataSpec, FleetData, partition_indices
from devices.errors import DataError
from devices.fleet import assign_profiles, profile_counts


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_partitions_are_deterministic_and_disjoint(partition: str) -> None:
    labels = np.random.default_rng(0).integers(0, 10, 1000)
    a = partition_indices(labels, 20, partition, 0.5, seed=3)
    b = partition_indices(labels, 20, partition, 0.5, seed=3)
    c = partition_indices(labels, 20, partition, 0.5, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert any(not np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    allidx = np.concatenate(a)
    assert len(allidx) == 1000 and len(np.unique(allidx)) == 1000


def test_dirichlet_is_skewed_iid_is_not() -> None:
    labels = np.repeat(np.arange(10), 100)

    def mean_classes(shards: list[np.ndarray]) -> float:
        return float(np.mean([len(np.unique(labels[s])) for s in shards if len(s)]))

    iid = partition_indices(labels, 10, "iid", 0.1, seed=0)
    skew = partition_indices(labels, 10, "dirichlet", 0.1, seed=0)
    assert mean_classes(iid) == 10
    assert mean_classes(skew) < 6


def test_fleet_data_cut_and_drawn() -> None:
    small = FleetData(DataSpec(partition="iid"), 10, seed=1)
    assert not small.drawn
    x0, y0 = small.device_data(0)
    assert x0.shape[1:] == (1, 8, 8) and x0.dtype == np.float32 and len(x0) > 100
    big = FleetData(DataSpec(), 5000, seed=1)
    assert big.drawn
    xa, ya = big.device_data(4321)
    xb, yb = big.device_data(4321)
    assert len(xa) >= 8 and np.array_equal(xa, xb) and np.array_equal(ya, yb)
    assert xa.min() >= 0.0 and xa.max() <= 1.0
    with pytest.raises(DataError, match="partition-id"):
        big.device_data(5000)


def test_test_set_is_held_out_and_stable() -> None:
    a = FleetData(DataSpec(), 10, seed=1)
    b = FleetData(DataSpec(), 10, seed=1)
    assert a.fingerprint() == b.fingerprint()
    assert len(a.x_test) == pytest.approx(0.2 * 1797, abs=1)


def test_npz_source(tmp_path: Path) -> None:
    p = tmp_path / "d.npz"
    rng = np.random.default_rng(0)
    np.savez(p, x=rng.integers(0, 255, (60, 12, 12)).astype(np.uint8), y=rng.integers(0, 3, 60))
    fd = FleetData(DataSpec(source="npz", path=str(p), partition="iid", min_samples=2), 4, 0)
    x, _ = fd.device_data(1)
    assert x.shape[1:] == (1, 12, 12) and x.max() <= 1.0
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((3, 2, 2)))
    with pytest.raises(DataError, match="expected arrays 'x'"):
        FleetData(DataSpec(source="npz", path=str(bad)), 2, 0)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable"):
        FleetData(DataSpec(source="npz", path=str(junk)), 2, 0)
    with pytest.raises(DataError, match="does not exist"):
        FleetData(DataSpec(source="npz", path=str(tmp_path / "none.npz")), 2, 0)


def test_synthetic_images() -> None:
    fd = FleetData(DataSpec(source="synthetic", image_size=32, channels=3,
                            synthetic_size=100, samples_per_device=4), 8, 0)
    x, y = fd.device_data(3)
    assert x.shape == (4, 3, 32, 32) and len(y) == 4


def test_profile_assignment() -> None:
    mix = {"stm32f746": 0.7, "rpi4": 0.2, "jetson-nano": 0.1}
    assert profile_counts(mix, 100) == {"jetson-nano": 10, "rpi4": 20, "stm32f746": 70}
    assert sum(profile_counts(mix, 7).values()) == 7
    a = assign_profiles(mix, 100, seed=1)
    assert a == assign_profiles(mix, 100, seed=1) and a != assign_profiles(mix, 100, seed=2)
