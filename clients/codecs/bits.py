"""Vectorized packing of b-bit unsigned codes (b = 1..8) into a little-endian bit stream.

The stream layout is the one every codec in this package writes: code ``i`` occupies stream
bits ``[b*i, b*(i+1))`` with its least significant bit first, and stream bit ``j`` is bit
``j % 8`` of byte ``j // 8``. The stream is padded with zero bits to a whole number of
8-code words, so ``n`` codes of ``b`` bits take ``ceil(n / 8) * b`` bytes.

Packing never loops over elements in Python: widths 1, 2, 4 and 8 use byte arithmetic on
strided views; the other widths pack 8 codes into one 64-bit little-endian word with 8
vectorized shifts and keep its first ``b`` bytes.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

__all__ = ["pack_bits", "packed_size", "unpack_bits"]


def packed_size(count: int, bits: int) -> int:
    """Return the bytes that ``count`` codes of ``bits`` bits take in the stream."""
    return -(-count // 8) * bits


def _pad8(codes: NDArray[np.uint8]) -> NDArray[np.uint8]:
    rem = (-codes.size) % 8
    if rem:
        codes = np.concatenate([codes, np.zeros(rem, dtype=np.uint8)])
    return codes


def pack_bits(codes: NDArray[np.uint8], bits: int) -> bytes:
    """Pack ``codes`` (any shape, uint8, each ``< 2**bits``) into the bit stream.

    Parameters
    ----------
    codes : numpy.ndarray
        Unsigned codes; flattened in C order. Values must already fit in ``bits`` bits
        (higher bits would corrupt neighbours, so callers clip first).
    bits : int
        Code width, 1..8.

    Returns
    -------
    bytes
        ``packed_size(codes.size, bits)`` bytes.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    flat = _pad8(np.ascontiguousarray(codes, dtype=np.uint8).reshape(-1))
    if bits == 8:
        return flat.tobytes()
    if bits == 1:
        return np.packbits(flat, bitorder="little").tobytes()
    if bits == 2:
        v = flat.reshape(-1, 4)
        return (v[:, 0] | (v[:, 1] << 2) | (v[:, 2] << 4) | (v[:, 3] << 6)).tobytes()
    if bits == 4:
        v = flat.reshape(-1, 2)
        return (v[:, 0] | (v[:, 1] << 4)).tobytes()
    v = flat.reshape(-1, 8)
    word = v[:, 0].astype(np.uint64)
    for i in range(1, 8):
        word |= v[:, i].astype(np.uint64) << np.uint64(bits * i)
    return word.astype("<u8").view(np.uint8).reshape(-1, 8)[:, :bits].tobytes()


def unpack_bits(buf: bytes | memoryview, bits: int, count: int) -> NDArray[np.uint8]:
    """Inverse of :func:`pack_bits`: read ``count`` codes of ``bits`` bits.

    ``buf`` must hold exactly ``packed_size(count, bits)`` bytes (the caller checks the
    length against the payload first, so a short buffer is a programming error here).
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    raw = np.frombuffer(buf, dtype=np.uint8)
    if raw.size != packed_size(count, bits):
        raise ValueError(f"expected {packed_size(count, bits)} bytes, got {raw.size}")
    if bits == 8:
        return raw[:count].copy()
    if bits == 1:
        return np.unpackbits(raw, bitorder="little")[:count]
    if bits == 2:
        out = np.empty((raw.size, 4), dtype=np.uint8)
        out[:, 0] = raw & 3
        out[:, 1] = (raw >> 2) & 3
        out[:, 2] = (raw >> 4) & 3
        out[:, 3] = raw >> 6
        return out.reshape(-1)[:count]
    if bits == 4:
        out = np.empty((raw.size, 2), dtype=np.uint8)
        out[:, 0] = raw & 15
        out[:, 1] = raw >> 4
        return out.reshape(-1)[:count]
    words = np.zeros((raw.size // bits, 8), dtype=np.uint8)
    words[:, :bits] = raw.reshape(-1, bits)
    w = words.view("<u8").reshape(-1)
    mask = np.uint64((1 << bits) - 1)
    out = np.empty((w.size, 8), dtype=np.uint8)
    for i in range(8):
        out[:, i] = (w >> np.uint64(bits * i)) & mask
    return out.reshape(-1)[:count]
