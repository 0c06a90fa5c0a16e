"""Per-tensor encoders and decoders of the baseline schemes, and the universal decoder.

Each ``encode_*`` takes a finite float32 array and returns ``(body, decoded)``, where
``decoded`` is what the receiver will reconstruct (for error feedback; ``None`` when not
asked for). Each ``decode_*`` takes a :class:`wire.TensorRecord`, checks that the body
length is exactly what the shape and parameters imply (``shape mismatch`` otherwise) and
that every scale is finite, and returns a float32 array (RAW returns the original dtype).

Bodies (all little-endian):

- RAW: the original dtype's bytes, C order.
- FP16: float16 values.
- UNIFORM: ``u8 bits, f32 absmax``, packed midrise codes (one scale per tensor).
- BLOCKWISE: ``u8 bits, u32 block``, ``ceil(n/block) x f32`` block absmax, packed
  midrise codes (the last block zero padded).
- QSGD: ``u16 s, u32 bucket``, ``ceil(n/bucket) x f32`` bucket L2 norms, packed codes
  ``sign * level + s`` in ``[0, 2s]`` with ``bit_length(2s)`` bits. QSGD's Elias coding
  of levels is replaced by fixed-width packing (simpler, vectorized; documented cost).
- SIGN: ``f32 scale`` (mean absolute value, as in EF-signSGD), 1 bit per value
  (1 = non-negative).
- TOPK: ``u32 k, u64 n`` (the tensor's size, checked against the shape), ``k x u32``
  strictly increasing indices, ``k x f32`` values.
- SGQ: see :mod:`sgq`.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Mapping

import numpy as np
from numpy.typing import NDArray

from devices.errors import PayloadError

from .bits import pack_bits, packed_size, unpack_bits
from .quant import dequantize_midrise, quantize_midrise
from .sgq import decode_sgq
from .wire import Reader, Scheme, TensorRecord, parse_payload

__all__ = [
    "DEFAULT_MAX_NUMEL",
    "decode_payload",
    "encode_blockwise",
    "encode_fp16",
    "encode_qsgd",
    "encode_raw",
    "encode_sign",
    "encode_topk",
    "encode_uniform",
]

DEFAULT_MAX_NUMEL = 1 << 26
"""Largest tensor a decoder accepts (elements); guards allocation from crafted shapes."""

_F32 = np.dtype("<f4")


def _expect(rec: TensorRecord, expected: int, what: str) -> None:
    if len(rec.body) != expected:
        raise PayloadError(
            f"shape mismatch: tensor '{rec.name}' of shape {rec.shape} needs {expected} "
            f"bytes of {what} data, the body has {len(rec.body)}"
        )


def _check_scales(rec: TensorRecord, scales: NDArray[np.float32]) -> None:
    if not np.isfinite(scales).all() or (scales < 0).any():
        raise PayloadError(f"non-finite or negative scale in tensor '{rec.name}'")


def _width(bits: int) -> tuple[np.float32, np.float32, np.float32]:
    half = np.float32(1 << (bits - 1))
    return half, np.float32(2 * half - 1), np.float32(0.5) - half


# --- RAW / FP16 ---------------------------------------------------------------------------

def encode_raw(x: np.ndarray) -> bytes:
    """Exact bytes of ``x`` in its own dtype (little-endian)."""
    return np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("<")).tobytes()


def _decode_raw(rec: TensorRecord) -> np.ndarray:
    _expect(rec, rec.numel * rec.dtype.itemsize, "raw")
    return np.frombuffer(rec.body, dtype=rec.dtype).copy()


def encode_fp16(name: str, x: NDArray[np.float32], want: bool
                ) -> tuple[bytes, NDArray[np.float32] | None]:
    """Half precision; PayloadError if a value overflows float16's range."""
    with np.errstate(over="ignore"):
        h = x.astype("<f2")
    if not np.isfinite(h).all():
        raise PayloadError(f"tensor '{name}' exceeds the float16 range (|x| > 65504)")
    return h.tobytes(), (h.astype(np.float32) if want else None)


def _decode_fp16(rec: TensorRecord) -> NDArray[np.float32]:
    _expect(rec, rec.numel * 2, "float16")
    return np.frombuffer(rec.body, dtype="<f2").astype(np.float32)


# --- UNIFORM (per tensor) / BLOCKWISE -----------------------------------------------------

def encode_uniform(x: NDArray[np.float32], bits: int, want: bool
                   ) -> tuple[bytes, NDArray[np.float32] | None]:
    """One absmax scale for the whole tensor, ``bits``-bit midrise codes."""
    half, top, off = _width(bits)
    amax = np.float32(np.abs(x).max())
    step = amax / half
    inv = half / amax if amax > 0 else np.float32(0)
    q = quantize_midrise(x.reshape(-1), inv, half, top)
    body = np.array([bits], np.uint8).tobytes() + np.array([amax], _F32).tobytes() \
        + pack_bits(q, bits)
    return body, (dequantize_midrise(q, step, off).reshape(x.shape) if want else None)


def _read_bits(rd: Reader, rec: TensorRecord, hi: int = 8) -> int:
    bits = rd.u8()
    if not 1 <= bits <= hi:
        raise PayloadError(f"malformed body of tensor '{rec.name}': bit-width {bits} "
                           f"outside 1..{hi}")
    return bits


def _decode_uniform(rec: TensorRecord) -> NDArray[np.float32]:
    rd = Reader(rec.body, f"uniform body of tensor '{rec.name}'")
    bits = _read_bits(rd, rec)
    _expect(rec, 5 + packed_size(rec.numel, bits), "uniform")
    amax = rd.array("<f4", 1)
    _check_scales(rec, amax)
    half, _, off = _width(bits)
    q = unpack_bits(rd.take(rd.remaining), bits, rec.numel)
    return dequantize_midrise(q, amax[0] / half, off)


def encode_blockwise(x: NDArray[np.float32], bits: int, block: int, want: bool
                     ) -> tuple[bytes, NDArray[np.float32] | None]:
    """One absmax scale per ``block`` consecutive values, ``bits``-bit midrise codes."""
    n = x.size
    nb = -(-n // block)
    flat = np.zeros(nb * block, np.float32)
    flat[:n] = x.reshape(-1)
    v = flat.reshape(nb, block)
    amax = np.abs(v).max(axis=1)
    half, top, off = _width(bits)
    step = amax / half
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, half / amax, 0).astype(np.float32)
    q = quantize_midrise(v, inv[:, None], half, top)
    body = np.array([bits], np.uint8).tobytes() + np.array([block], "<u4").tobytes() \
        + amax.astype(_F32).tobytes() + pack_bits(q.reshape(-1)[:n], bits)
    dec = None
    if want:
        dec = dequantize_midrise(q, step[:, None], off).reshape(-1)[:n].reshape(x.shape)
    return body, dec


def _decode_blockwise(rec: TensorRecord) -> NDArray[np.float32]:
    rd = Reader(rec.body, f"blockwise body of tensor '{rec.name}'")
    bits = _read_bits(rd, rec)
    (block,) = rd.unpack("I")
    if block == 0:
        raise PayloadError(f"malformed blockwise body of tensor '{rec.name}': block size 0")
    n = rec.numel
    nb = -(-n // block)
    _expect(rec, 5 + 4 * nb + packed_size(n, bits), "blockwise")
    amax = rd.array("<f4", nb)
    _check_scales(rec, amax)
    half, _, off = _width(bits)
    q = unpack_bits(rd.take(rd.remaining), bits, n)
    step = (amax / half).astype(np.float32)
    # index the scales per value: no padded buffer, whose size a crafted block could blow up
    return dequantize_midrise(q, step[np.arange(n) // block], off)


# --- QSGD ---------------------------------------------------------------------------------

def encode_qsgd(x: NDArray[np.float32], levels: int, bucket: int, rng: np.random.Generator,
                want: bool) -> tuple[bytes, NDArray[np.float32] | None]:
    """QSGD (Alistarh et al. 2017): unbiased stochastic rounding to ``levels`` per bucket."""
    n = x.size
    nb = -(-n // bucket)
    flat = np.zeros(nb * bucket, np.float32)
    flat[:n] = x.reshape(-1)
    v = flat.reshape(nb, bucket)
    norm = np.sqrt(np.einsum("ij,ij->i", v, v, dtype=np.float64)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = np.where(norm[:, None] > 0, np.abs(v) / norm[:, None], 0) * levels
    lev = np.floor(scaled + rng.random(scaled.shape, dtype=np.float32))
    np.minimum(lev, levels, out=lev)
    code = (np.where(v < 0, -lev, lev) + levels).astype(np.uint8)
    cb = (2 * levels).bit_length()
    body = np.array([levels], "<u2").tobytes() + np.array([bucket], "<u4").tobytes() \
        + norm.astype(_F32).tobytes() + pack_bits(code.reshape(-1)[:n], cb)
    dec = None
    if want:
        dec = _qsgd_values(code, norm, levels).reshape(-1)[:n].reshape(x.shape)
    return body, dec


def _qsgd_values(code: NDArray[np.uint8], norm: NDArray[np.float32], levels: int
                 ) -> NDArray[np.float32]:
    out = code.astype(np.float32)
    out -= np.float32(levels)
    out *= (norm / np.float32(levels))[:, None]
    return out


def _decode_qsgd(rec: TensorRecord) -> NDArray[np.float32]:
    rd = Reader(rec.body, f"QSGD body of tensor '{rec.name}'")
    levels, bucket = rd.unpack("HI")
    if not 1 <= levels <= 127 or bucket == 0:
        raise PayloadError(f"malformed QSGD body of tensor '{rec.name}': levels {levels}, "
                           f"bucket {bucket}")
    n = rec.numel
    nb = -(-n // bucket)
    cb = (2 * levels).bit_length()
    _expect(rec, 6 + 4 * nb + packed_size(n, cb), "QSGD")
    norm = rd.array("<f4", nb)
    _check_scales(rec, norm)
    q = unpack_bits(rd.take(rd.remaining), cb, n)
    if q.size and int(q.max()) > 2 * levels:
        raise PayloadError(f"malformed QSGD body of tensor '{rec.name}': code above 2s")
    out = q.astype(np.float32)
    out -= np.float32(levels)
    out *= (norm.astype(np.float32) / np.float32(levels))[np.arange(n) // bucket]
    return out


# --- SIGN ---------------------------------------------------------------------------------

def encode_sign(x: NDArray[np.float32], want: bool) -> tuple[bytes, NDArray[np.float32] | None]:
    """Scaled sign (Karimireddy et al. 2019): ``mean(|x|) * sign(x)``, 1 bit per value."""
    scale = np.float32(np.abs(x).mean(dtype=np.float64))
    bitsv = (x.reshape(-1) >= 0).astype(np.uint8)
    body = np.array([scale], _F32).tobytes() + pack_bits(bitsv, 1)
    dec = None
    if want:
        dec = _sign_values(bitsv, scale).reshape(x.shape)
    return body, dec


def _sign_values(bitsv: NDArray[np.uint8], scale: np.float32) -> NDArray[np.float32]:
    out = bitsv.astype(np.float32)
    out *= np.float32(2)
    out -= np.float32(1)
    out *= scale
    return out


def _decode_sign(rec: TensorRecord) -> NDArray[np.float32]:
    rd = Reader(rec.body, f"sign body of tensor '{rec.name}'")
    _expect(rec, 4 + packed_size(rec.numel, 1), "sign")
    scale = rd.array("<f4", 1)
    _check_scales(rec, scale)
    return _sign_values(unpack_bits(rd.take(rd.remaining), 1, rec.numel), scale[0])


# --- TOPK ---------------------------------------------------------------------------------

def encode_topk(x: NDArray[np.float32], ratio: float, want: bool
                ) -> tuple[bytes, NDArray[np.float32] | None]:
    """Keep the ``ceil(ratio * n)`` largest-magnitude values (indices u32, values f32)."""
    flat = x.reshape(-1)
    n = flat.size
    k = min(n, max(1, math.ceil(ratio * n)))
    if k < n:
        idx = np.argpartition(np.abs(flat), n - k)[n - k:]
        idx.sort()
    else:
        idx = np.arange(n)
    vals = flat[idx].astype(_F32)
    body = struct.pack("<IQ", k, n) + idx.astype("<u4").tobytes() + vals.tobytes()
    dec = None
    if want:
        d = np.zeros(n, np.float32)
        d[idx] = vals
        dec = d.reshape(x.shape)
    return body, dec


def _decode_topk(rec: TensorRecord) -> NDArray[np.float32]:
    rd = Reader(rec.body, f"top-k body of tensor '{rec.name}'")
    k, total = rd.unpack("IQ")
    n = rec.numel
    if k > n or total != n:
        raise PayloadError(f"shape mismatch: tensor '{rec.name}' of shape {rec.shape} "
                           f"cannot hold {k} top-k values of a {total}-value tensor")
    _expect(rec, 12 + 8 * k, "top-k")
    idx = rd.array("<u4", k).astype(np.int64)
    vals = rd.array("<f4", k)
    if k and (idx[-1] >= n or (k > 1 and (np.diff(idx) <= 0).any())):
        raise PayloadError(f"malformed top-k body of tensor '{rec.name}': indices out of "
                           "range or not strictly increasing")
    out = np.zeros(n, np.float32)
    out[idx] = vals
    return out


# --- universal decoder --------------------------------------------------------------------

_DECODERS: dict[int, Callable[[TensorRecord], np.ndarray]] = {
    Scheme.RAW: _decode_raw,
    Scheme.FP16: _decode_fp16,
    Scheme.UNIFORM: _decode_uniform,
    Scheme.BLOCKWISE: _decode_blockwise,
    Scheme.QSGD: _decode_qsgd,
    Scheme.SIGN: _decode_sign,
    Scheme.TOPK: _decode_topk,
    Scheme.SGQ: decode_sgq,
}


def decode_payload(payload: bytes | memoryview,
                   expected_shapes: Mapping[str, tuple[int, ...]] | None = None,
                   max_numel: int = DEFAULT_MAX_NUMEL) -> dict[str, np.ndarray]:
    """Decode any tinyfleet payload into named arrays of their original dtypes and shapes.

    Parameters
    ----------
    payload : bytes
        A payload produced by any codec of this package.
    expected_shapes : Mapping[str, tuple[int, ...]], optional
        If given, the payload must hold exactly these names with exactly these shapes.
    max_numel : int
        Largest tensor accepted (guards memory against a crafted shape).

    Raises
    ------
    PayloadError
        If the payload is truncated, corrupted, of another format or version, of the
        wrong shape, or decodes to non-finite values. Nothing is returned in that case.
    """
    _, records = parse_payload(payload)
    if expected_shapes is not None:
        got = [r.name for r in records]
        missing = [k for k in expected_shapes if k not in set(got)]
        extra = [k for k in got if k not in expected_shapes]
        if missing or extra:
            raise PayloadError(f"shape mismatch: payload lacks tensors {missing[:5]} and "
                               f"has unexpected tensors {extra[:5]}")
    out: dict[str, np.ndarray] = {}
    for rec in records:
        if expected_shapes is not None:
            want = tuple(int(d) for d in expected_shapes[rec.name])
            if rec.shape != want:
                raise PayloadError(f"shape mismatch: tensor '{rec.name}' has shape "
                                   f"{rec.shape} in the payload, expected {want}")
        if rec.numel > max_numel:
            raise PayloadError(f"malformed payload: tensor '{rec.name}' claims {rec.numel} "
                               f"elements, more than the limit {max_numel}")
        is_float = rec.dtype.kind == "f"
        if rec.scheme != Scheme.RAW and not is_float:
            raise PayloadError(f"malformed payload: lossy scheme {Scheme(rec.scheme).name} "
                               f"for non-float tensor '{rec.name}' ({rec.dtype})")
        if rec.numel == 0 and rec.scheme != Scheme.RAW:
            raise PayloadError(f"malformed payload: empty tensor '{rec.name}' must be RAW")
        arr = _DECODERS[rec.scheme](rec)
        if is_float and not np.isfinite(arr).all():
            raise PayloadError(f"non-finite values in decoded tensor '{rec.name}'")
        if arr.dtype != rec.dtype:
            arr = arr.astype(rec.dtype)
        out[rec.name] = arr.reshape(rec.shape)
    return out
