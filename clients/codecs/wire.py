"""The wire format of every compressed payload in tinyfleet (version 1).

A payload is one self-describing byte string; all integers are little-endian.

Header (24 bytes, fixed)::

    offset size  field
    0      4     magic            b"TFCD"
    4      2     version          u16, currently 1
    6      2     flags            u16; bit 0: error feedback was applied by the sender
    8      4     tensor count     u32
    12     8     total length     u64, bytes of the whole payload including the trailer
    20     4     header CRC32     zlib.crc32 of bytes 0..19

Then::

    u16 spec length, spec (ASCII)      the canonical codec spec, e.g. "sgq:bits=4,..."
    tensor records, ``tensor count`` of them, in the sender's key order
    u32 payload CRC32                  zlib.crc32 of every byte before it

Tensor record::

    u16 name length, name (UTF-8)      unique within a payload
    u8  dtype code                     see ``DTYPES`` (float16/32/64, ints, uint8, bool)
    u8  ndim (<= 8), ndim x u32 dims   C-order shape
    u8  scheme                         see :class:`Scheme`
    u64 body length, body              scheme-specific; each scheme's decoder checks that
                                       the length is exactly what shape and parameters
                                       imply, so a shape that disagrees with the data is
                                       rejected, never reinterpreted

Why this layout: the fixed header lets a receiver tell a truncated payload (length below
the declared total) from a corrupted one (CRC mismatch) and from a foreign or future one
(magic, version) before it parses anything; the header has its own CRC so a flipped
length field reads as corruption, not truncation. Scheme bodies carry their own group
tables, bit-widths and scales, so any codec's payload decodes with one universal decoder
(:func:`parse_payload` plus the scheme table in ``schemes``), and a server can accept
clients that use different codecs.

Every malformed input raises :class:`devices.errors.PayloadError` with a message that
starts with the kind of fault: ``truncated``, ``corrupted``, ``bad magic``,
``unsupported version``, ``malformed``, ``shape mismatch`` or ``non-finite``.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from devices.errors import PayloadError

__all__ = [
    "DTYPES",
    "FLAG_ERROR_FEEDBACK",
    "MAGIC",
    "MAX_NDIM",
    "VERSION",
    "PayloadHeader",
    "Reader",
    "Scheme",
    "TensorRecord",
    "build_payload",
    "parse_payload",
]

MAGIC = b"TFCD"
VERSION = 1
FLAG_ERROR_FEEDBACK = 1
MAX_NDIM = 8
_FIXED = struct.Struct("<4sHHIQ")  # magic, version, flags, count, total length
_HEADER_LEN = _FIXED.size + 4  # + header CRC32
_TRAILER_LEN = 4

DTYPES: dict[int, np.dtype] = {
    1: np.dtype("<f4"),
    2: np.dtype("<f2"),
    3: np.dtype("<f8"),
    4: np.dtype("<i8"),
    5: np.dtype("<i4"),
    6: np.dtype("<i2"),
    7: np.dtype("i1"),
    8: np.dtype("u1"),
    9: np.dtype("?"),
}
_DTYPE_CODES = {dt: code for code, dt in DTYPES.items()}


class Scheme(IntEnum):
    """Per-tensor encoding schemes (the ``scheme`` byte of a tensor record)."""

    RAW = 0  # exact bytes of the original dtype
    FP16 = 1  # IEEE half precision
    UNIFORM = 2  # one absmax scale per tensor, b-bit midrise codes
    BLOCKWISE = 3  # one absmax scale per flat block, b-bit midrise codes
    QSGD = 4  # per-bucket L2 norm, stochastic levels in [-s, s]
    SIGN = 5  # one scale (mean |x|), 1 bit per element
    TOPK = 6  # k (index, value) pairs
    SGQ = 7  # stripe-wise group quantization (see ``sgq``)


@dataclass(frozen=True)
class TensorRecord:
    """One tensor as it travels: identity, original dtype and shape, scheme and body."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    scheme: int
    body: bytes | memoryview

    @property
    def numel(self) -> int:
        """Number of elements the shape implies (exact Python integer)."""
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class PayloadHeader:
    """What the header says: codec spec, flags and tensor count."""

    version: int
    flags: int
    count: int
    spec: str


def dtype_code(dtype: np.dtype) -> int:
    """Return the wire code of ``dtype``; PayloadError for an unsupported one."""
    code = _DTYPE_CODES.get(np.dtype(dtype).newbyteorder("<"))
    if code is None:
        code = _DTYPE_CODES.get(np.dtype(dtype))
    if code is None:
        raise PayloadError(f"unsupported dtype {np.dtype(dtype)}; expected one of "
                           f"{sorted(str(d) for d in DTYPES.values())}")
    return code


class Reader:
    """A bounds-checked cursor over a byte buffer: every short read is a PayloadError."""

    def __init__(self, buf: bytes | memoryview, what: str) -> None:
        self._buf = memoryview(buf)
        self._pos = 0
        self._what = what

    @property
    def remaining(self) -> int:
        """Bytes not yet consumed."""
        return len(self._buf) - self._pos

    def take(self, n: int) -> memoryview:
        """Consume ``n`` bytes."""
        if n < 0 or n > self.remaining:
            raise PayloadError(
                f"malformed {self._what}: needs {n} more bytes at offset {self._pos}, "
                f"{self.remaining} left"
            )
        out = self._buf[self._pos : self._pos + n]
        self._pos += n
        return out

    def unpack(self, fmt: str) -> tuple[int, ...]:
        """Consume and unpack a struct format (little-endian)."""
        s = struct.Struct("<" + fmt)
        return s.unpack(self.take(s.size))

    def u8(self) -> int:
        """Consume one unsigned byte."""
        return int(self.unpack("B")[0])

    def array(self, dtype: str, count: int) -> np.ndarray:
        """Consume ``count`` items of ``dtype`` as a read-only array view."""
        dt = np.dtype(dtype)
        return np.frombuffer(self.take(dt.itemsize * count), dtype=dt)

    def finish(self) -> None:
        """Require that every byte was consumed."""
        if self.remaining:
            raise PayloadError(
                f"malformed {self._what}: {self.remaining} unexpected trailing bytes"
            )


def build_payload(spec: str, flags: int, records: list[TensorRecord]) -> bytes:
    """Serialize records into a sealed payload (header, records, CRC32 trailer)."""
    parts: list[bytes | memoryview] = []
    spec_b = spec.encode("ascii")
    parts.append(struct.pack("<H", len(spec_b)))
    parts.append(spec_b)
    for rec in records:
        name_b = rec.name.encode("utf-8")
        if len(name_b) > 0xFFFF:
            raise PayloadError(f"tensor name too long ({len(name_b)} bytes): {rec.name[:40]}")
        if len(rec.shape) > MAX_NDIM:
            raise PayloadError(
                f"tensor '{rec.name}' has {len(rec.shape)} dims; at most {MAX_NDIM} allowed"
            )
        parts.append(struct.pack("<H", len(name_b)))
        parts.append(name_b)
        parts.append(
            struct.pack(f"<BB{len(rec.shape)}I", dtype_code(rec.dtype), len(rec.shape),
                        *rec.shape)
        )
        parts.append(struct.pack("<BQ", int(rec.scheme), len(rec.body)))
        parts.append(rec.body)
    body = b"".join(parts)
    total = _HEADER_LEN + len(body) + _TRAILER_LEN
    fixed = _FIXED.pack(MAGIC, VERSION, flags, len(records), total)
    head = fixed + struct.pack("<I", zlib.crc32(fixed))
    crc = zlib.crc32(body, zlib.crc32(head))
    return head + body + struct.pack("<I", crc)


def reseal(payload: bytes) -> bytes:
    """Recompute both CRCs of ``payload`` (for tests that craft malformed contents)."""
    fixed = payload[: _FIXED.size]
    head = fixed + struct.pack("<I", zlib.crc32(fixed))
    body = payload[_HEADER_LEN:-_TRAILER_LEN]
    return head + body + struct.pack("<I", zlib.crc32(body, zlib.crc32(head)))


def parse_header(payload: bytes | memoryview) -> PayloadHeader:
    """Check framing (length, magic, version, CRCs) and return the header.

    Raises
    ------
    PayloadError
        ``truncated``, ``bad magic``, ``unsupported version`` or ``corrupted``.
    """
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise PayloadError(f"malformed payload: expected bytes, got {type(payload).__name__}")
    view = memoryview(payload)
    n = len(view)
    if n < _HEADER_LEN + _TRAILER_LEN:
        raise PayloadError(
            f"truncated payload: {n} bytes, shorter than the "
            f"{_HEADER_LEN + _TRAILER_LEN}-byte header and trailer"
        )
    magic, version, flags, count, total = _FIXED.unpack(view[: _FIXED.size])
    if magic != MAGIC:
        raise PayloadError(f"bad magic {bytes(magic)!r}: not a tinyfleet payload "
                           f"(expected {MAGIC!r})")
    if version != VERSION:
        raise PayloadError(
            f"unsupported version {version}: this decoder reads version {VERSION}"
        )
    (head_crc,) = struct.unpack("<I", view[_FIXED.size : _HEADER_LEN])
    if zlib.crc32(view[: _FIXED.size]) != head_crc:
        raise PayloadError("corrupted payload: header CRC32 mismatch")
    if n < total:
        raise PayloadError(f"truncated payload: got {n} of {total} bytes")
    if n > total:
        raise PayloadError(f"corrupted payload: {n - total} bytes beyond the declared "
                           f"length {total}")
    (crc,) = struct.unpack("<I", view[n - _TRAILER_LEN :])
    if zlib.crc32(view[: n - _TRAILER_LEN]) != crc:
        raise PayloadError("corrupted payload: CRC32 checksum mismatch")
    r = Reader(view[_HEADER_LEN : n - _TRAILER_LEN], "payload header")
    (spec_len,) = r.unpack("H")
    try:
        spec = bytes(r.take(spec_len)).decode("ascii")
    except UnicodeDecodeError as exc:
        raise PayloadError("malformed payload: codec spec is not ASCII") from exc
    return PayloadHeader(version=version, flags=flags, count=count, spec=spec)


def parse_payload(payload: bytes | memoryview) -> tuple[PayloadHeader, list[TensorRecord]]:
    """Check framing and split a payload into tensor records (bodies not yet decoded)."""
    header = parse_header(payload)
    view = memoryview(payload)
    r = Reader(view[_HEADER_LEN + 2 + len(header.spec) : len(view) - _TRAILER_LEN], "payload")
    records: list[TensorRecord] = []
    seen: set[str] = set()
    for i in range(header.count):
        (name_len,) = r.unpack("H")
        try:
            name = bytes(r.take(name_len)).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PayloadError(f"malformed payload: tensor {i} name is not UTF-8") from exc
        if name in seen:
            raise PayloadError(f"malformed payload: tensor '{name}' appears twice")
        seen.add(name)
        code, ndim = r.unpack("BB")
        if code not in DTYPES:
            raise PayloadError(f"malformed payload: tensor '{name}' has unknown dtype code "
                               f"{code}")
        if ndim > MAX_NDIM:
            raise PayloadError(f"malformed payload: tensor '{name}' has {ndim} dims "
                               f"(at most {MAX_NDIM})")
        shape = tuple(int(d) for d in r.unpack(f"{ndim}I"))
        scheme, body_len = r.unpack("BQ")
        if scheme not in Scheme._value2member_map_:
            raise PayloadError(f"malformed payload: tensor '{name}' has unknown scheme "
                               f"{scheme}")
        body = r.take(body_len)
        records.append(TensorRecord(name, DTYPES[code], shape, scheme, body))
    r.finish()
    return header, records
