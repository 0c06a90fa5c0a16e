"""Bad payloads are rejected with a PayloadError saying which fault; never decoded."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clients.codecs import available_codecs, decode_payload, get_codec, parse_header
from clients.codecs.wire import Scheme, TensorRecord, build_payload, reseal
from devices.errors import PayloadError

RNG = np.random.default_rng(7)
TENSORS: dict[str, np.ndarray] = {
    "conv.weight": RNG.standard_normal((16, 8, 3, 3)).astype(np.float32),
    "fc.weight": RNG.standard_normal((10, 40)).astype(np.float32),
    "fc.bias": RNG.standard_normal(10).astype(np.float32),
    "steps": np.array(3, np.int64),
}
PAYLOADS = {spec: get_codec(spec).encode(TENSORS) for spec in available_codecs()}
SGQ = PAYLOADS["sgq"]


@pytest.mark.parametrize("cut", [0, 5, 23, 27, 100, len(SGQ) // 2, len(SGQ) - 1])
def test_truncated(cut: int) -> None:
    with pytest.raises(PayloadError, match="^truncated"):
        decode_payload(SGQ[:cut])


@pytest.mark.parametrize("spec", sorted(PAYLOADS))
def test_flipped_byte_is_corruption(spec: str) -> None:
    payload = PAYLOADS[spec]
    for pos in (30, len(payload) // 2, len(payload) - 2):
        bad = bytearray(payload)
        bad[pos] ^= 0x40
        with pytest.raises(PayloadError, match="^corrupted.*CRC32"):
            decode_payload(bytes(bad))


def test_flipped_length_field_is_header_corruption() -> None:
    bad = bytearray(SGQ)
    bad[13] ^= 1
    with pytest.raises(PayloadError, match="^corrupted payload: header CRC32"):
        decode_payload(bytes(bad))


def test_trailing_bytes() -> None:
    with pytest.raises(PayloadError, match="^corrupted.*beyond the declared length"):
        decode_payload(SGQ + b"\0")


def test_wrong_version_and_magic() -> None:
    bad = bytearray(SGQ)
    bad[4:6] = struct.pack("<H", 2)
    with pytest.raises(PayloadError, match="^unsupported version 2"):
        decode_payload(bytes(bad))
    with pytest.raises(PayloadError, match="^bad magic"):
        decode_payload(b"PK\3\4" + SGQ[4:])


def test_wrong_expected_shape() -> None:
    shapes = {k: v.shape for k, v in TENSORS.items()}
    assert decode_payload(SGQ, expected_shapes=shapes).keys() == shapes.keys()
    with pytest.raises(PayloadError, match="^shape mismatch: tensor 'fc.weight' has shape "
                       r"\(10, 40\) in the payload, expected \(40, 10\)"):
        get_codec("sgq").decode(SGQ, expected_shapes={**shapes, "fc.weight": (40, 10)})
    with pytest.raises(PayloadError, match="^shape mismatch: payload lacks.*'extra'"):
        decode_payload(SGQ, expected_shapes={**shapes, "extra": (1,)})


def _one(scheme: int, shape: tuple[int, ...], body: bytes, dtype: str = "<f4") -> bytes:
    return build_payload("test", 0, [TensorRecord("t", np.dtype(dtype), shape, scheme, body)])


@pytest.mark.parametrize("spec", ["sgq", "fp32", "fp16", "uniform4", "blockwise4-ef", "qsgd",
                                  "ef-signsgd", "topk"])
def test_shape_inconsistent_with_data_length(spec: str) -> None:
    """A sealed payload whose recorded shape disagrees with its body is rejected."""
    payload = get_codec(spec).encode({"t": RNG.standard_normal((16, 40)).astype(np.float32)})
    rec_shape_at = payload.index(struct.pack("<2I", 16, 40))
    bad = bytearray(payload)
    bad[rec_shape_at : rec_shape_at + 8] = struct.pack("<2I", 16, 48)
    with pytest.raises(PayloadError, match="^shape mismatch.*needs|^shape mismatch.*cannot|"
                                           "^shape mismatch.*do not fit"):
        decode_payload(reseal(bytes(bad)))


def test_nan_and_inf_scales_rejected() -> None:
    codes = bytes(20)
    for bad in (np.nan, np.inf, -1.0):
        body = bytes([4]) + np.array([bad], "<f4").tobytes() + codes
        with pytest.raises(PayloadError, match="^non-finite or negative scale in tensor 't'"):
            decode_payload(_one(Scheme.UNIFORM, (40,), body))
    sgq = bytearray(get_codec("sgq").encode({"t": RNG.standard_normal((8, 64)).astype("f4")}))
    # record: u16+name, dtype, ndim, 2 dims, scheme, u64 body length; SGQ body: 12-byte
    # head, 1 width + 1 grid flag (one group of 8 channels), then the f32 group range
    at = 24 + 2 + len(get_codec("sgq").spec) + (2 + 1) + 2 + 8 + 1 + 8 + 12 + 2
    sgq[at : at + 4] = np.array([np.nan], "<f4").tobytes()
    with pytest.raises(PayloadError, match="^non-finite or negative scale in SGQ tensor 't'"):
        decode_payload(reseal(bytes(sgq)))


def test_non_finite_values_rejected() -> None:
    for dtype in ("<f4", "<f2", "<f8"):
        vals = np.array([1.0, np.nan, 2.0], dtype)
        with pytest.raises(PayloadError, match="^non-finite values in decoded tensor 't'"):
            decode_payload(_one(Scheme.RAW if dtype != "<f2" else Scheme.FP16, (3,),
                                vals.tobytes(), dtype if dtype != "<f2" else "<f4"))


def test_malformed_bodies() -> None:
    topk = struct.pack("<IQ", 2, 10) + np.array([5, 3], "<u4").tobytes() + bytes(8)
    with pytest.raises(PayloadError, match="not strictly increasing"):
        decode_payload(_one(Scheme.TOPK, (10,), topk))
    with pytest.raises(PayloadError, match="lossy scheme"):
        decode_payload(_one(Scheme.UNIFORM, (2,), bytes(6), "<i8"))
    with pytest.raises(PayloadError, match="bit-width 9"):
        decode_payload(_one(Scheme.UNIFORM, (2,), bytes([9]) + bytes(12)))
    huge = struct.pack("<IQ", 1, 1 << 40) + np.array([0], "<u4").tobytes() + bytes(4)
    with pytest.raises(PayloadError, match="more than the limit"):
        decode_payload(_one(Scheme.TOPK, (1 << 30, 1 << 10), huge))


def test_header_exposes_spec_and_count() -> None:
    h = parse_header(SGQ)
    assert h.spec == get_codec("sgq").spec and h.count == len(TENSORS) and h.version == 1


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_random_bytes_only_payload_error(data: bytes) -> None:
    sealed = SGQ[:12] + struct.pack("<Q", 28 + len(data)) + SGQ[20:24] + data + bytes(4)
    for candidate in (data, b"TFCD" + data, reseal(sealed)):
        try:
            out = decode_payload(candidate)
        except PayloadError:
            continue
        assert all(np.isfinite(v).all() for v in out.values() if v.dtype.kind == "f")


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(PAYLOADS)), st.lists(
    st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=255)),
    min_size=1, max_size=6), st.booleans())
def test_mutated_sealed_payloads_only_payload_error(spec: str, edits: list[tuple[int, int]],
                                                    fix_length: bool) -> None:
    """Byte edits past the CRC (resealed): parsing must still only succeed or refuse."""
    bad = bytearray(PAYLOADS[spec])
    for pos, val in edits:
        bad[24 + pos % (len(bad) - 28)] = val
    payload = bytes(bad)
    if fix_length:
        payload = payload[:24] + payload[24:-4][: len(payload) // 2] + b"\0\0\0\0"
        payload = payload[:12] + struct.pack("<Q", len(payload)) + payload[20:]
    try:
        out = decode_payload(reseal(payload))
    except PayloadError:
        return
    assert all(np.isfinite(v).all() for v in out.values() if v.dtype.kind == "f")


def test_crafted_block_size_does_not_allocate_beyond_the_tensor() -> None:
    """A sealed blockwise body claiming a 4-G block decodes from the tensor's own size."""
    x = RNG.standard_normal((8, 8)).astype(np.float32)
    payload = get_codec("blockwise:bits=4,block=64").encode({"t": x})
    at = payload.index(struct.pack("<BI", 4, 64)) + 1
    bad = payload[:at] + struct.pack("<I", 0xFFFFFFFF) + payload[at + 4:]
    out = decode_payload(reseal(bad))["t"]  # one block either way: same values, no 4 GB
    np.testing.assert_array_equal(out, decode_payload(payload)["t"])
