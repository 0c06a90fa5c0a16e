"""Vectorized packing of b-bit unsigned codes (b = 1..8) into a little-endian bit stream.

The stream layout is the one every codec in this package writes: code ``i`` occupies stream
bits ``[b*i, b*(i+1))`` with its least significant bit first, and stream bit ``j`` is bit
``j % 8`` of byte ``j // 8``. The stream is padded with zero bits to a whole number of
8-code words, so ``n`` codes of ``b`` bits take ``ceil(n / 8) * b`` bytes.

Packing never loops over elements in Python: widths 2 and 4 combine the codes held in one
u32 / u16 lane into a byte with a few shifts and masks, width 1 is ``np.packbits``, and the
other widths merge neighbouring lanes in a tree (pairs in u16, quads in u32, octets in u64)
and keep the first ``b`` bytes of each 64-bit word. Lane views assume nothing about the
host: every view is little-endian explicitly.
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


_LANES = (("<u2", 8), ("<u4", 16), ("<u8", 32))  # (lane dtype, half-lane bits)


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
    if bits == 2:  # 4 codes in a little-endian u32 -> one byte
        w = flat.view("<u4")
        return ((w & 3) | ((w >> 6) & 0xC) | ((w >> 12) & 0x30) | ((w >> 18) & 0xC0)
                ).astype(np.uint8).tobytes()
    if bits == 4:  # 2 codes in a u16 -> one byte
        h = flat.view("<u2")
        return ((h & 0x0F) | ((h >> 4) & 0xF0)).astype(np.uint8).tobytes()
    # Merge neighbours in a tree: pairs in u16 lanes, quads in u32, octets in u64; then
    # the first ``bits`` bytes of each little-endian u64 hold 8 codes.
    x: np.ndarray = flat
    width = bits
    for dt, half in _LANES:
        w = x.view(dt)
        ty = w.dtype.type
        x = (w & ty((1 << width) - 1)) | ((w >> ty(half - width))
                                          & ty(((1 << width) - 1) << width))
        width *= 2
    return x.view(np.uint8).reshape(-1, 8)[:, :bits].tobytes()


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
        r = raw.astype("<u4")
        return ((r & 3) | ((r & 0xC) << 6) | ((r & 0x30) << 12) | ((r & 0xC0) << 18)
                ).view(np.uint8)[:count]
    if bits == 4:
        h = raw.astype("<u2")
        return ((h & 0x0F) | ((h & 0xF0) << 4)).view(np.uint8)[:count]
    words = np.zeros((raw.size // bits, 8), dtype=np.uint8)
    words[:, :bits] = raw.reshape(-1, bits)
    x: np.ndarray = words.view("<u8").reshape(-1)
    width = 4 * bits
    for dt, half in reversed(_LANES):  # split octets into quads, quads into pairs, ...
        ty = x.dtype.type
        x = (x & ty((1 << width) - 1)) | ((x << ty(half - width))
                                          & ty(((1 << width) - 1) << half))
        width //= 2
        if dt != "<u2":
            x = x.view("<u4" if dt == "<u8" else "<u2")
    return x.view(np.uint8)[:count]
