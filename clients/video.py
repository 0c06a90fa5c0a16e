"""Labelled video streams for perception duties: a seeded generator and an npz loader.

The generator moves scikit-learn ``digits`` sprites (8x8, upscaled) over a smooth noise
texture. Every knob that decides how much of a frame changes from one frame to the next is
explicit (sprite speed and count, background drift, camera jitter, sensor noise), so that a
stream can range from "static background, one slow sprite" (most patches unchanged) to
"high motion" (almost every patch changes). The same seed always gives identical arrays.

Per-frame targets: ``labels`` is the digit class shown (all sprites of a stream show the
same class at a time, in different handwriting samples, so the class is well defined with
several sprites); it switches to another class every ``switch_every`` frames. ``counts``
is the number of sprites and ``positions`` their rendered top-left corners.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np

from devices.errors import ConfigError, DataError

__all__ = [
    "VideoStreamConfig",
    "VideoStream",
    "generate_stream",
    "load_npz_stream",
    "unchanged_patch_share",
    "STATIC_BACKGROUND",
    "HIGH_MOTION",
]

DigitSplit = Literal["train", "test", "all"]
_SPLIT_AT = 1400  # digits samples [0, 1400) train, [1400, 1797) test


@dataclass(frozen=True)
class VideoStreamConfig:
    """How a synthetic stream looks and moves.

    Parameters
    ----------
    num_frames : int
        Frames T of the stream.
    height, width : int
        Frame size in pixels.
    channels : int
        1 (grey) or 3 (colour: the texture and each sprite get their own tint).
    num_sprites : int
        Moving digit sprites (0 gives an empty scene; labels are then -1).
    sprite_scale : int
        Integer upscaling of the 8x8 digit (2 gives 16x16 sprites).
    speed : float
        Sprite speed in pixels per frame (each sprite gets a random direction and bounces
        off the frame border); 0 keeps the sprites still.
    background_drift : float
        Speed of the background texture in pixels per frame (bilinear, wraps around); 0
        gives a static background.
    background_sigma : float
        Smoothness of the texture (Gaussian correlation length in pixels).
    background_contrast : float
        Peak-to-peak amplitude of the texture around its mean of 0.25.
    camera_jitter : float
        Standard deviation in pixels of an independent per-frame integer shift of the whole
        scene (a shaky camera).
    noise : float
        Standard deviation of additive Gaussian sensor noise per pixel and frame.
    switch_every : int
        Frames between changes of the digit class (0: never).
    digit_split : {"train", "test", "all"}
        Which digits samples sprites are drawn from (train: the first 1400, test: the
        other 397), so that a model trained on "train" streams is tested on unseen writing.
    """

    num_frames: int = 64
    height: int = 64
    width: int = 64
    channels: int = 1
    num_sprites: int = 1
    sprite_scale: int = 2
    speed: float = 1.0
    background_drift: float = 0.0
    background_sigma: float = 4.0
    background_contrast: float = 0.4
    camera_jitter: float = 0.0
    noise: float = 0.0
    switch_every: int = 16
    digit_split: DigitSplit = "all"

    def __post_init__(self) -> None:
        positive = ("num_frames", "height", "width", "sprite_scale")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ConfigError(
                    f"video.{name}: expected an integer >= 1, got {getattr(self, name)!r}"
                )
        if self.channels not in (1, 3):
            raise ConfigError(f"video.channels: expected 1 or 3, got {self.channels!r}")
        non_negative = (
            "num_sprites",
            "speed",
            "background_drift",
            "background_contrast",
            "camera_jitter",
            "noise",
            "switch_every",
        )
        for name in non_negative:
            value = getattr(self, name)
            if not math.isfinite(float(value)) or value < 0:
                raise ConfigError(f"video.{name}: expected a finite value >= 0, got {value!r}")
        if not self.background_sigma > 0:
            raise ConfigError(
                f"video.background_sigma: expected > 0, got {self.background_sigma!r}"
            )
        side = 8 * self.sprite_scale
        if self.num_sprites and (side > self.height or side > self.width):
            raise ConfigError(
                f"video.sprite_scale: sprites of {side}x{side} px do not fit a "
                f"{self.height}x{self.width} frame"
            )
        if self.digit_split not in ("train", "test", "all"):
            raise ConfigError(
                f"video.digit_split: expected 'train', 'test' or 'all', got {self.digit_split!r}"
            )


STATIC_BACKGROUND = VideoStreamConfig(
    num_sprites=1, speed=1.0, background_drift=0.0, camera_jitter=0.0, noise=0.0
)
"""One slow sprite over a still background: most patches do not change."""

HIGH_MOTION = VideoStreamConfig(
    num_sprites=3, speed=4.0, background_drift=0.5, camera_jitter=1.0, noise=0.01
)
"""Three fast sprites, a drifting background, a shaky camera and sensor noise."""


@dataclass
class VideoStream:
    """A labelled stream of frames.

    Attributes
    ----------
    frames : numpy.ndarray
        float32, shape (T, C, H, W), values about [0, 1].
    labels : numpy.ndarray
        int64, shape (T,): the digit class per frame (-1 where unknown).
    positions : numpy.ndarray
        float32, shape (T, S, 2): each sprite's rendered top-left (row, column); S may be 0.
    counts : numpy.ndarray
        int64, shape (T,): sprites per frame.
    config : VideoStreamConfig or None
        The generator's config (None for a loaded stream).
    """

    frames: np.ndarray
    labels: np.ndarray
    positions: np.ndarray
    counts: np.ndarray
    config: VideoStreamConfig | None = None

    def __len__(self) -> int:
        return int(self.frames.shape[0])


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (np.asarray(data.images, dtype=np.float32) / 16.0).clip(0.0, 1.0)
    return images, np.asarray(data.target, dtype=np.int64)


def _split_indices(split: DigitSplit) -> np.ndarray:
    images, _ = _digits()
    n = images.shape[0]
    if split == "train":
        return np.arange(0, _SPLIT_AT)
    if split == "test":
        return np.arange(_SPLIT_AT, n)
    return np.arange(n)


def _texture(rng: np.random.Generator, h: int, w: int, sigma: float, channels: int) -> np.ndarray:
    """Periodic smooth noise (white noise low-passed by a Gaussian in Fourier space)."""
    white = rng.standard_normal((channels, h, w))
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.fftfreq(w)[None, :]
    gain = np.exp(-2.0 * (math.pi * sigma) ** 2 * (fy**2 + fx**2))
    smooth = np.real(np.fft.ifft2(np.fft.fft2(white) * gain))
    lo = smooth.min(axis=(1, 2), keepdims=True)
    hi = smooth.max(axis=(1, 2), keepdims=True)
    return ((smooth - lo) / np.maximum(hi - lo, 1e-12)).astype(np.float64)


def _crop_wrapped(tex: np.ndarray, oy: float, ox: float, h: int, w: int) -> np.ndarray:
    """Bilinear crop of size (h, w) at a fractional offset from a periodic texture."""
    th, tw = tex.shape[1:]
    y0, x0 = math.floor(oy), math.floor(ox)
    fy, fx = oy - y0, ox - x0
    rows = (np.arange(y0, y0 + h + 1) % th)[:, None]
    cols = (np.arange(x0, x0 + w + 1) % tw)[None, :]
    patch = tex[:, rows, cols]
    top = patch[:, :-1, :-1] * (1 - fx) + patch[:, :-1, 1:] * fx
    bottom = patch[:, 1:, :-1] * (1 - fx) + patch[:, 1:, 1:] * fx
    if fy == 0.0:
        return top
    return top * (1 - fy) + bottom * fy


def _sprite(index: int, scale: int) -> np.ndarray:
    images, _ = _digits()
    return np.kron(images[index], np.ones((scale, scale), dtype=np.float32))


def generate_stream(config: VideoStreamConfig, seed: int) -> VideoStream:
    """Render a labelled stream; the same (config, seed) always gives identical arrays.

    Parameters
    ----------
    config : VideoStreamConfig
        Scene and motion.
    seed : int
        Seed of every random choice (texture, digits, directions, jitter, noise).

    Returns
    -------
    VideoStream
        Frames (T, C, H, W) float32 in about [0, 1], labels, positions, counts.
    """
    rng = np.random.default_rng(seed)
    T, C, H, W = config.num_frames, config.channels, config.height, config.width
    S = config.num_sprites
    side = 8 * config.sprite_scale
    _, targets = _digits()
    pool = _split_indices(config.digit_split)

    tex = _texture(rng, 2 * H, 2 * W, config.background_sigma, C)
    tint = rng.uniform(0.6, 1.0, size=(C, 1, 1)) if C == 3 else np.ones((1, 1, 1))
    background_mean, contrast = 0.25, config.background_contrast
    drift_angle = rng.uniform(0, 2 * math.pi)
    drift = config.background_drift * np.array([math.sin(drift_angle), math.cos(drift_angle)])
    origin = rng.uniform(0, [2 * H, 2 * W])

    pos = rng.uniform(0, [max(H - side, 0), max(W - side, 0)], size=(S, 2))
    angles = rng.uniform(0, 2 * math.pi, size=S)
    vel = config.speed * np.stack([np.sin(angles), np.cos(angles)], axis=1)
    colours = rng.uniform(0.7, 1.0, size=(S, C, 1, 1)) if C == 3 else np.ones((S, 1, 1, 1))

    def pick(exclude: int) -> tuple[int, np.ndarray]:
        classes = [c for c in range(10) if c != exclude]
        cls = int(rng.choice(classes))
        candidates = pool[targets[pool] == cls]
        return cls, rng.choice(candidates, size=S)

    cls, samples = pick(-1)
    frames = np.empty((T, C, H, W), dtype=np.float32)
    labels = np.full(T, -1, dtype=np.int64)
    positions = np.zeros((T, S, 2), dtype=np.float32)
    for t in range(T):
        if t and config.switch_every and t % config.switch_every == 0:
            cls, samples = pick(cls)
        jitter = (
            np.rint(rng.normal(0.0, config.camera_jitter, size=2)).astype(int)
            if config.camera_jitter > 0
            else np.zeros(2, dtype=int)
        )
        oy, ox = origin + drift * t - jitter
        bg = background_mean + contrast * (_crop_wrapped(tex, oy, ox, H, W) - 0.5)
        frame = bg * tint
        for s in range(S):
            top, left = (int(v) for v in np.rint(pos[s]) + jitter)
            alpha = _sprite(int(samples[s]), config.sprite_scale)
            y0, y1 = max(top, 0), min(top + side, H)
            x0, x1 = max(left, 0), min(left + side, W)
            if y1 > y0 and x1 > x0:
                a = alpha[y0 - top : y1 - top, x0 - left : x1 - left][None]
                frame[:, y0:y1, x0:x1] = frame[:, y0:y1, x0:x1] * (1 - a) + a * colours[s]
            positions[t, s] = (top, left)
        if config.noise > 0:
            frame = frame + rng.normal(0.0, config.noise, size=frame.shape)
        frames[t] = frame
        labels[t] = cls if S else -1
        # Move and bounce for the next frame.
        pos = pos + vel
        limits = np.array([H - side, W - side], dtype=np.float64)
        for d in range(2):
            low, high = pos[:, d] < 0, pos[:, d] > limits[d]
            pos[low, d] = -pos[low, d]
            pos[high, d] = 2 * limits[d] - pos[high, d]
            vel[low | high, d] = -vel[low | high, d]
    counts = np.full(T, S, dtype=np.int64)
    return VideoStream(frames, labels, positions, counts, config)


def load_npz_stream(path: str | Path) -> VideoStream:
    """Load a user's stream from an ``.npz`` file.

    Keys
    ----
    ``frames`` (required)
        Float or integer array (T, C, H, W) or (T, H, W) (grey); integer frames are
        divided by 255. T >= 1, every value finite.
    ``labels`` (optional)
        Integer array (T,); -1 where unknown. Missing: all -1.
    ``positions`` (optional)
        Array (T, S, 2) of object top-left corners. Missing: (T, 0, 2).
    ``counts`` (optional)
        Integer array (T,). Missing: S per frame.

    Raises
    ------
    DataError
        If the file is unreadable, ``frames`` is missing, or any array has the wrong
        shape, dtype or non-finite values.
    """
    where = str(path)
    try:
        with np.load(where, allow_pickle=False) as data:
            arrays = {k: np.asarray(data[k]) for k in data.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"{where}: cannot read as .npz: {exc}") from exc
    if "frames" not in arrays:
        raise DataError(f"{where}: missing key 'frames' (T, C, H, W); found {sorted(arrays)}")
    frames = arrays["frames"]
    if frames.ndim == 3:
        frames = frames[:, None]
    if frames.ndim != 4 or min(frames.shape) < 1:
        raise DataError(
            f"{where}: 'frames' must have shape (T, C, H, W) or (T, H, W), "
            f"got {arrays['frames'].shape}"
        )
    if np.issubdtype(frames.dtype, np.integer):
        frames = frames.astype(np.float32) / 255.0
    elif np.issubdtype(frames.dtype, np.floating):
        frames = frames.astype(np.float32)
    else:
        raise DataError(f"{where}: 'frames' must be numeric, got dtype {frames.dtype}")
    if not np.isfinite(frames).all():
        raise DataError(f"{where}: 'frames' contains NaN or infinite values")
    T = frames.shape[0]

    labels = arrays.get("labels")
    if labels is None:
        labels = np.full(T, -1, dtype=np.int64)
    elif labels.shape != (T,) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{where}: 'labels' must be integers of shape ({T},), got {labels.dtype} {labels.shape}"
        )
    positions = arrays.get("positions")
    if positions is None:
        positions = np.zeros((T, 0, 2), dtype=np.float32)
    elif positions.ndim != 3 or positions.shape[0] != T or positions.shape[2] != 2:
        raise DataError(f"{where}: 'positions' must have shape ({T}, S, 2), got {positions.shape}")
    counts = arrays.get("counts")
    if counts is None:
        counts = np.full(T, positions.shape[1], dtype=np.int64)
    elif counts.shape != (T,) or not np.issubdtype(counts.dtype, np.integer):
        raise DataError(
            f"{where}: 'counts' must be integers of shape ({T},), got {counts.dtype} {counts.shape}"
        )
    return VideoStream(
        frames,
        labels.astype(np.int64),
        positions.astype(np.float32),
        counts.astype(np.int64),
        None,
    )


def unchanged_patch_share(frames: np.ndarray, patch: int, tol: float = 0.0) -> float:
    """Share of (frame, patch) pairs whose max |x_t - x_{t-1}| is <= ``tol``.

    A description of a stream (how much a perfect skip scheme could save at the input),
    computed over frames 1..T-1 on a grid of ``patch`` x ``patch`` squares; a ragged border
    is dropped.
    """
    if frames.ndim != 4 or frames.shape[0] < 2:
        raise DataError(f"frames: expected (T >= 2, C, H, W), got {frames.shape}")
    if patch < 1:
        raise ConfigError(f"patch: expected >= 1, got {patch}")
    T, C, H, W = frames.shape
    gh, gw = H // patch, W // patch
    diff = np.abs(np.diff(frames[:, :, : gh * patch, : gw * patch], axis=0))
    per = diff.reshape(T - 1, C, gh, patch, gw, patch).max(axis=(1, 3, 5))
    return float((per <= tol).mean())
