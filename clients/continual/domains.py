"""Deterministic domain transforms of image batches: rotation, additive noise, contrast.

Each transform takes ``(N, C, H, W)`` float arrays and returns a new array of the same shape
and dtype; none of them reads global random state. They are the numerics behind the
"domain-shift" streams of :mod:`clients.continual.schedule`, kept apart so they can be
tested on their own.
"""

from __future__ import annotations

import numpy as np

from devices.errors import DataError

__all__ = ["DOMAINS", "add_noise", "adjust_contrast", "apply_domain", "rotate_images"]

DOMAINS = ("identity", "rotation", "noise", "contrast")


def _check_images(x: np.ndarray) -> None:
    if x.ndim != 4:
        raise DataError(f"x: expected images shaped (N, C, H, W), got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"x: expected a float array, got dtype {x.dtype}")


def rotate_images(x: np.ndarray, degrees: float, fill: float = 0.0) -> np.ndarray:
    """Rotate every image about its centre by ``degrees`` (counter-clockwise).

    Bilinear interpolation; pixels that come from outside the image take ``fill``. Written
    in numpy so that it works for any ``(N, C, H, W)`` without a vision library.
    """
    _check_images(x)
    n, c, h, w = x.shape
    theta = np.deg2rad(degrees)
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64),
                         indexing="ij")
    # Inverse map: for each output pixel, where in the input it comes from.
    cos, sin = np.cos(theta), np.sin(theta)
    src_x = cos * (xx - cx) - sin * (yy - cy) + cx
    src_y = sin * (xx - cx) + cos * (yy - cy) + cy
    x0, y0 = np.floor(src_x).astype(np.int64), np.floor(src_y).astype(np.int64)
    fx, fy = src_x - x0, src_y - y0
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=fill)
    out = np.zeros_like(x, dtype=np.float64)
    for dy, dx, wgt in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx),
                        (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
        yi = np.clip(y0 + dy + 1, 0, h + 1)
        xi = np.clip(x0 + dx + 1, 0, w + 1)
        out += wgt * padded[:, :, yi, xi]  # clipped indices land in the fill border
    return out.astype(x.dtype)


def add_noise(
    x: np.ndarray, sigma: float, rng: np.random.Generator,
    value_range: tuple[float, float] | None = (0.0, 1.0),
) -> np.ndarray:
    """Add Gaussian noise of standard deviation ``sigma``, clipped to ``value_range``."""
    _check_images(x)
    out = x + rng.normal(0.0, sigma, size=x.shape).astype(x.dtype)
    if value_range is not None:
        out = np.clip(out, value_range[0], value_range[1])
    return out.astype(x.dtype)


def adjust_contrast(
    x: np.ndarray, factor: float, value_range: tuple[float, float] | None = (0.0, 1.0)
) -> np.ndarray:
    """Blend each image with its own mean: ``factor * x + (1 - factor) * mean(x)``.

    As torchvision's ``adjust_contrast``: ``factor < 1`` flattens, ``> 1`` sharpens.
    """
    _check_images(x)
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    out = factor * x + (1.0 - factor) * mean
    if value_range is not None:
        out = np.clip(out, value_range[0], value_range[1])
    return out.astype(x.dtype)


def apply_domain(
    x: np.ndarray, name: str, strength: float, rng: np.random.Generator,
    value_range: tuple[float, float] | None = (0.0, 1.0),
) -> np.ndarray:
    """Apply the domain ``name`` at ``strength`` (degrees, noise sigma or contrast factor)."""
    if name == "identity":
        _check_images(x)
        return x.copy()
    if name == "rotation":
        fill = 0.0 if value_range is None else value_range[0]
        return rotate_images(x, strength, fill=fill)
    if name == "noise":
        return add_noise(x, strength, rng, value_range)
    if name == "contrast":
        return adjust_contrast(x, strength, value_range)
    raise DataError(f"domain: expected one of {DOMAINS}, got {name!r}")
