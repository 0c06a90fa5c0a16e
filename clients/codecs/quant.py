"""Scalar quantization numerics shared by the codecs: midrise codes and exact scale tables.

Midrise uniform quantization with ``b`` bits and range ``r`` (the absmax of the values it
covers) uses the step ``s = r / 2**(b-1)`` and the ``2**b`` levels ``(q - 2**(b-1) + 0.5) s``
for ``q = 0 .. 2**b - 1``. Every value in ``[-r, r]`` is reconstructed within ``s / 2``
(the extremes are clipped to the outermost level, also within ``s / 2``), so the error of
each element is bounded by ``r / 2**b``. Midrise is chosen over a symmetric midtread grid
because it uses all ``2**b`` codes: at 2 bits it has 4 levels instead of 3, which lowers
the mean squared error on bell-shaped update distributions by about 40 %.

Decoded values must be bitwise identical on every machine (the server and the clients
rebuild the same downlink model from the same payload), so decoding uses only IEEE
float32 multiply/add, and the 2**(-k/8) table of SGQ's stripe scales is built from exact
hexadecimal constants and power-of-two shifts rather than from ``exp2``/``pow``.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

__all__ = ["STRIPE_TABLE", "dequantize_midrise", "quantize_midrise", "stripe_codes"]

# 2**(-j/8) for j = 0..7, correctly rounded to float32 (exact hex literals).
_FRAC = np.array(
    [float.fromhex(h) for h in (
        "0x1.000000p+0", "0x1.d5818ep-1", "0x1.ae89fap-1", "0x1.8ace54p-1",
        "0x1.6a09e6p-1", "0x1.4bfdaep-1", "0x1.306fe0p-1", "0x1.172b84p-1",
    )],
    dtype=np.float32,
)


def _stripe_table() -> NDArray[np.float32]:
    k = np.arange(256)
    table = np.ldexp(_FRAC[k % 8], -(k // 8)).astype(np.float32)
    table[255] = 0.0  # code 255 marks an all-zero stripe
    return table


STRIPE_TABLE: NDArray[np.float32] = _stripe_table()
"""``STRIPE_TABLE[k] == 2**(-k/8)`` in float32 for k < 255, and 0 for k = 255."""


def stripe_codes(block_absmax: NDArray[np.float32], group_absmax: NDArray[np.float32]
                 ) -> NDArray[np.uint8]:
    """8-bit log-ratio codes of block ranges relative to their group's range.

    ``k = floor(-8 log2(a / A))`` so that ``A * 2**(-k/8) >= a``: the coded range never
    falls below the block's absmax, keeping the ``r / 2**b`` error bound (the coded range
    is at most ``2**(1/8)``, 9 %, above the true one). Blocks whose ratio is below
    ``2**(-254/8)`` (or exactly zero) get code 255 and decode to zeros.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = block_absmax / group_absmax[:, None]
        k = np.floor(-8.0 * np.log2(ratio))
    k = np.where(ratio > 0, k, 255.0)
    np.clip(k, 0, 255, out=k)
    codes = k.astype(np.uint8)
    # Guard float rounding: the coded range must cover the block's absmax.
    r = group_absmax[:, None] * STRIPE_TABLE[codes]
    low = (r < block_absmax) & (codes > 0) & (codes < 255)
    if low.any():
        codes[low] -= 1
    return codes


def quantize_midrise(x: NDArray[np.float32], inv_step: NDArray[np.float32] | np.float32,
                     half: NDArray[np.float32] | np.float32,
                     top: NDArray[np.float32] | np.float32) -> NDArray[np.uint8]:
    """Codes ``clip(floor(x / s + 2**(b-1)), 0, 2**b - 1)``, all operands broadcast.

    ``inv_step`` is ``1 / s`` (0 where the range is 0), ``half`` is ``2**(b-1)`` and
    ``top`` is ``2**b - 1``.
    """
    q = x * inv_step
    q += half
    np.floor(q, out=q)
    np.clip(q, np.float32(0), top, out=q)  # clip is much faster than maximum+minimum
    return q.astype(np.uint8)


def dequantize_midrise(q: NDArray[np.uint8], step: NDArray[np.float32] | np.float32,
                       offset: NDArray[np.float32] | np.float32) -> NDArray[np.float32]:
    """Values ``(q + offset) * step`` with ``offset = 0.5 - 2**(b-1)`` (float32)."""
    out = q.astype(np.float32)
    out += offset
    out *= step
    return out
