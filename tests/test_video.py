"""Tests of the synthetic video streams and the npz loader (clients.video)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clients.video import (
    HIGH_MOTION,
    STATIC_BACKGROUND,
    VideoStreamConfig,
    generate_stream,
    load_npz_stream,
    unchanged_patch_share,
)
from devices.errors import ConfigError, DataError

SMALL = VideoStreamConfig(num_frames=12, height=32, width=32, switch_every=4)


def test_same_seed_gives_identical_arrays() -> None:
    cfg = replace(HIGH_MOTION, num_frames=10, height=32, width=32, channels=3)
    a, b = generate_stream(cfg, 7), generate_stream(cfg, 7)
    assert np.array_equal(a.frames, b.frames)
    assert np.array_equal(a.labels, b.labels)
    assert np.array_equal(a.positions, b.positions)
    c = generate_stream(cfg, 8)
    assert not np.array_equal(a.frames, c.frames)


def test_shapes_dtypes_and_labels() -> None:
    s = generate_stream(replace(SMALL, num_sprites=2), 0)
    assert s.frames.shape == (12, 1, 32, 32) and s.frames.dtype == np.float32
    assert s.labels.shape == (12,) and s.labels.dtype == np.int64
    assert s.positions.shape == (12, 2, 2)
    assert (s.counts == 2).all()
    assert ((s.labels >= 0) & (s.labels < 10)).all()
    # The class holds for switch_every frames, then changes to another class.
    for start in range(0, 12, 4):
        assert (s.labels[start : start + 4] == s.labels[start]).all()
    assert (s.labels[4::4] != s.labels[0:-4:4]).all()


def test_motion_knobs_control_the_unchanged_share() -> None:
    still = replace(SMALL, speed=0.0, switch_every=0)
    s = generate_stream(still, 1)
    assert unchanged_patch_share(s.frames, 8) == 1.0
    static = unchanged_patch_share(
        generate_stream(replace(STATIC_BACKGROUND, num_frames=24), 1).frames, 8
    )
    high = unchanged_patch_share(generate_stream(replace(HIGH_MOTION, num_frames=24), 1).frames, 8)
    assert static > 0.7
    assert high < 0.1
    drift = replace(SMALL, speed=0.0, switch_every=0, background_drift=0.5)
    assert unchanged_patch_share(generate_stream(drift, 1).frames, 8) < 0.5


def test_sprite_is_drawn_where_positions_say() -> None:
    cfg = replace(SMALL, background_contrast=0.0, speed=2.0)
    s = generate_stream(cfg, 3)
    for t in range(len(s)):
        top, left = (int(v) for v in s.positions[t, 0])
        inside = s.frames[t, 0, top : top + 16, left : left + 16]
        outside = s.frames[t, 0].copy()
        outside[top : top + 16, left : left + 16] = 0.25
        assert inside.max() > 0.9
        assert np.allclose(outside, 0.25)


@pytest.mark.parametrize(
    "field,value",
    [
        ("channels", 2),
        ("num_frames", 0),
        ("speed", -1.0),
        ("sprite_scale", 5),
        ("noise", float("nan")),
    ],
)
def test_config_rejects_bad_values(field: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=field):
        replace(SMALL, **{field: value})


def test_npz_roundtrip_and_grey_uint8(tmp_path: Path) -> None:
    s = generate_stream(SMALL, 0)
    path = tmp_path / "s.npz"
    np.savez(path, frames=s.frames, labels=s.labels, positions=s.positions)
    loaded = load_npz_stream(path)
    assert np.array_equal(loaded.frames, s.frames)
    assert np.array_equal(loaded.labels, s.labels)
    assert loaded.counts.tolist() == [1] * 12
    grey = tmp_path / "g.npz"
    np.savez(grey, frames=np.full((3, 8, 8), 255, dtype=np.uint8))
    g = load_npz_stream(grey)
    assert g.frames.shape == (3, 1, 8, 8) and np.allclose(g.frames, 1.0)
    assert (g.labels == -1).all() and g.positions.shape == (3, 0, 2)


@pytest.mark.parametrize(
    "arrays,match",
    [
        ({"labels": np.zeros(3, dtype=np.int64)}, "missing key 'frames'"),
        ({"frames": np.zeros((3, 8))}, "'frames' must have shape"),
        ({"frames": np.zeros((3, 1, 8, 8)), "labels": np.zeros(2, dtype=np.int64)}, "'labels'"),
        ({"frames": np.zeros((3, 1, 8, 8)), "labels": np.zeros(3)}, "'labels'"),
        ({"frames": np.full((2, 1, 4, 4), np.nan)}, "NaN"),
        ({"frames": np.zeros((3, 1, 8, 8)), "positions": np.zeros((3, 2))}, "'positions'"),
    ],
)
def test_npz_errors(tmp_path: Path, arrays: dict[str, np.ndarray], match: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)  # type: ignore[arg-type]
    with pytest.raises(DataError, match=match):
        load_npz_stream(path)


def test_npz_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "junk.npz"
    path.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot read"):
        load_npz_stream(path)
    with pytest.raises(DataError):
        load_npz_stream(tmp_path / "absent.npz")
