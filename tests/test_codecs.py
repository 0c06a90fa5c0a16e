"""Round trips of every codec: error bounds per bit-width, error feedback, dtypes, specs."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from clients.codecs import available_codecs, get_codec
from clients.codecs.bits import pack_bits, packed_size, unpack_bits
from clients.codecs.sgq import allocate_bits
from devices.errors import ConfigError, PayloadError

RNG = np.random.default_rng(1234)
STRIPE_SLACK = 2 ** (1 / 8)  # SGQ's 8-bit stripe scale codes round ranges up by <= 9 %
EPS = float(np.finfo(np.float32).eps)


def _update() -> dict[str, np.ndarray]:
    """A small model update with channel-wise scale differences (like real updates)."""
    def chan(shape: tuple[int, ...]) -> np.ndarray:
        scale = np.exp(RNG.normal(0, 1.0, size=(shape[0],) + (1,) * (len(shape) - 1)))
        return (RNG.standard_normal(shape) * scale * 1e-2).astype(np.float32)
    return {
        "conv.weight": chan((32, 16, 3, 3)),
        "dw.weight": chan((48, 1, 3, 3)),
        "pw.weight": chan((40, 48, 1, 1)),
        "fc.weight": chan((10, 100)),
        "fc.bias": RNG.standard_normal(10).astype(np.float32),
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),
    }


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / (float(np.linalg.norm(b)) + 1e-30))


@pytest.mark.parametrize("bits", range(1, 9))
def test_bitpack_round_trip(bits: int) -> None:
    for n in (0, 1, 7, 8, 9, 1001):
        codes = RNG.integers(0, 2**bits, size=n).astype(np.uint8)
        buf = pack_bits(codes, bits)
        assert len(buf) == packed_size(n, bits)
        np.testing.assert_array_equal(unpack_bits(buf, bits, n), codes)


def test_bitpack_stream_order_is_little_endian() -> None:
    # code i occupies stream bits [b*i, b*(i+1)), LSB first
    assert pack_bits(np.array([1, 2, 3], np.uint8), 3) == bytes([0b11010001, 0, 0])


@pytest.mark.parametrize("bits", range(2, 9))
def test_sgq_error_bound_per_bitwidth(bits: int) -> None:
    upd = _update()
    codec = get_codec(f"sgq:bits={bits},alloc=uniform")
    out = codec.decode(codec.encode(upd))
    for name, x in upd.items():
        if x.dtype.kind != "f":
            assert out[name].dtype == x.dtype and np.array_equal(out[name], x)
            continue
        assert out[name].shape == x.shape and out[name].dtype == x.dtype
        if x.ndim < 2:
            assert np.array_equal(out[name], x)  # the exact fp32 part
            continue
        # every value is within half a step of its block: <= slack * absmax / 2**bits
        per_channel = np.abs(x).reshape(x.shape[0], -1).max(axis=1).max()
        bound = STRIPE_SLACK * per_channel / 2**bits + 4 * EPS * per_channel
        assert np.abs(out[name] - x).max() <= bound


def test_sgq_error_halves_per_bit() -> None:
    upd = _update()
    errs = []
    for bits in range(2, 9):
        codec = get_codec(f"sgq:bits={bits},alloc=uniform")
        out = codec.decode(codec.encode(upd))
        errs.append(_rel(out["pw.weight"], upd["pw.weight"]))
    for lo, hi in itertools.pairwise(errs):
        assert hi < 0.6 * lo


def test_sgq_grouping_beats_per_tensor_uniform() -> None:
    # channels with very different ranges: grouping by range must help a lot
    upd = _update()
    sgq = get_codec("sgq:bits=4")
    uni = get_codec("uniform4")
    e_sgq = _rel(sgq.decode(sgq.encode(upd))["pw.weight"], upd["pw.weight"])
    e_uni = _rel(uni.decode(uni.encode(upd))["pw.weight"], upd["pw.weight"])
    assert e_sgq < 0.5 * e_uni


def test_sgq_energy_allocation_beats_uniform_allocation_at_equal_budget() -> None:
    upd = _update()
    e = {}
    sizes = {}
    for alloc in ("energy", "uniform"):
        codec = get_codec(f"sgq:bits=3,alloc={alloc}")
        payload = codec.encode(upd)
        sizes[alloc] = len(payload)
        out = codec.decode(payload)
        e[alloc] = sum(float(np.sum((out[k] - upd[k]) ** 2)) for k in upd
                       if upd[k].ndim >= 2)
    assert sizes["energy"] <= sizes["uniform"] * 1.01
    assert e["energy"] < e["uniform"]


def test_allocate_bits_is_the_optimum_under_the_budget() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        w = rng.exponential(size=4) ** 3
        budget = float(rng.uniform(2, 8))
        got = allocate_bits(w, budget)
        assert got.mean() <= budget + 1e-9 and got.min() >= 2 and got.max() <= 8
        best = min(
            (b for b in itertools.product(range(2, 9), repeat=4) if np.mean(b) <= budget),
            key=lambda b: float(np.sum(w * 4.0 ** -np.array(b))),
        )
        assert np.sum(w * 4.0 ** -got.astype(float)) <= np.sum(w * 4.0 ** -np.array(best)) * (
            1 + 1e-12)


def test_sgq_feature_layout_round_trip() -> None:
    fm = np.maximum(RNG.standard_normal((2, 24, 14, 14)), 0).astype(np.float32)
    fm *= np.exp(RNG.normal(size=(1, 24, 1, 1))).astype(np.float32)
    codec = get_codec("sgq:bits=4,layout=feature,alloc=uniform")
    out = codec.decode(codec.encode({"act": fm}))["act"]
    per_channel = np.abs(fm).max()
    # post-ReLU groups use the unsigned grid: range / (2 * 15) per value, zeros exact
    assert np.abs(out - fm).max() <= STRIPE_SLACK * per_channel / 30 + 4 * EPS * per_channel
    assert np.all(out[fm == 0] == 0)
    assert _rel(out, fm) < 0.1


@pytest.mark.parametrize("bits", range(2, 9))
def test_uniform_bound(bits: int) -> None:
    upd = _update()
    codec = get_codec(f"uniform:bits={bits}")
    out = codec.decode(codec.encode(upd))
    for k, x in upd.items():
        if x.dtype.kind == "f":
            amax = np.abs(x).max()
            assert np.abs(out[k] - x).max() <= amax / 2**bits + 4 * EPS * amax


@pytest.mark.parametrize("bits", range(2, 9))
def test_blockwise_bound(bits: int) -> None:
    x = (RNG.standard_normal(1000) * np.repeat(np.exp(RNG.normal(size=16)), 63)[:1000]).astype(
        np.float32)
    codec = get_codec(f"blockwise:bits={bits},block=64,ef=0")
    out = codec.decode(codec.encode({"x": x.reshape(10, 100)}))["x"].reshape(-1)
    pad = np.zeros(1024, np.float32)
    pad[:1000] = x
    amax = np.repeat(np.abs(pad.reshape(16, 64)).max(axis=1), 64)[:1000]
    assert np.all(np.abs(out - x) <= amax / 2**bits + 4 * EPS * amax)


def test_fp16_fp32() -> None:
    upd = _update()
    exact = get_codec("fp32").decode(get_codec("fp32").encode(upd))
    for k in upd:
        assert exact[k].tobytes() == upd[k].tobytes()
    half = get_codec("fp16").decode(get_codec("fp16").encode(upd))
    assert _rel(half["conv.weight"], upd["conv.weight"]) < 1e-3
    with pytest.raises(PayloadError, match="float16 range.*|.*'big'"):
        get_codec("fp16").encode({"big": np.array([1e6], np.float32)})


def test_qsgd_is_unbiased_and_bounded() -> None:
    x = RNG.standard_normal((4, 128)).astype(np.float32)
    codec = get_codec("qsgd:levels=3,bucket=128,seed=5")
    outs = np.stack([codec.decode(codec.encode({"x": x}))["x"] for _ in range(400)])
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    assert np.all(np.abs(outs - x) <= norms / 3 * (1 + 1e-5))
    # the mean of 400 unbiased draws is within 4 standard errors of x
    se = outs.std(axis=0) / np.sqrt(400) + 1e-6
    assert np.mean(np.abs(outs.mean(axis=0) - x) <= 4 * se) > 0.99


def test_sign_and_topk() -> None:
    x = RNG.standard_normal((20, 50)).astype(np.float32)
    s = get_codec("signsgd").decode(get_codec("signsgd").encode({"x": x}))["x"]
    np.testing.assert_allclose(s, np.abs(x).mean() * np.where(x >= 0, 1, -1), rtol=1e-6)
    t = get_codec("topk:ratio=0.1,ef=0").decode(get_codec("topk:ratio=0.1").encode({"x": x}))["x"]
    kept = np.flatnonzero(t)
    assert kept.size == 100
    assert np.array_equal(np.sort(kept), np.sort(np.argsort(-np.abs(x).ravel())[:100]))
    assert np.array_equal(t.ravel()[kept], x.ravel()[kept])


@pytest.mark.parametrize("spec", ["sgq:bits=2", "blockwise4-ef", "ef-signsgd", "topk:ratio=0.05"])
def test_error_feedback_keeps_the_running_sum(spec: str) -> None:
    """With EF, sum of decoded updates = sum of true updates - last residual (bounded)."""
    codec = get_codec(spec)
    state: dict[str, np.ndarray] = {}
    total = np.zeros((16, 64), np.float32)
    sent = np.zeros_like(total)
    for _ in range(30):
        x = (RNG.standard_normal((16, 64)) * 0.01 + 0.003).astype(np.float32)
        total += x
        sent += codec.decode(codec.encode({"w": x}, state))["w"]
    np.testing.assert_allclose(total - sent, state["w"], atol=1e-5)
    # without EF the error of the sum grows; with EF it stays at one round's residual
    assert np.linalg.norm(total - sent) < 0.35 * np.linalg.norm(total)


def test_error_feedback_off_without_state_or_option() -> None:
    x = {"w": RNG.standard_normal((8, 64)).astype(np.float32)}
    a = get_codec("sgq:bits=2")
    assert a.decode(a.encode(x)) is not None  # no state: no EF, no error
    st: dict[str, np.ndarray] = {}
    get_codec("sgq:bits=2,ef=0").encode(x, st)
    assert st == {}


def test_dtypes_shapes_and_order_preserved() -> None:
    tensors: dict[str, np.ndarray] = {
        "z": np.zeros((0, 3), np.float32),
        "s": np.array(2.5, np.float64),
        "d": RNG.standard_normal((8, 70)).astype(np.float64),
        "i": np.arange(6, dtype=np.int32).reshape(2, 3),
        "b": np.array([True, False]),
        "h": RNG.standard_normal((9, 9)).astype(np.float16),
    }
    for spec in available_codecs():
        codec = get_codec(spec)
        out = codec.decode(codec.encode(tensors))
        assert list(out) == list(tensors)
        for k, v in tensors.items():
            assert out[k].dtype == v.dtype and out[k].shape == v.shape, (spec, k)
        assert np.array_equal(out["i"], tensors["i"]) and np.array_equal(out["b"], tensors["b"])


def test_encode_rejects_non_finite_naming_the_tensor() -> None:
    bad = {"ok": np.ones((4, 4), np.float32), "layer3.weight": np.ones((8, 8), np.float32)}
    bad["layer3.weight"][2, 3] = np.nan
    for spec in ("sgq", "fp32", "qsgd", "topk"):
        with pytest.raises(PayloadError, match="layer3.weight"):
            get_codec(spec).encode(bad)
    with pytest.raises(PayloadError, match="'x'"):
        get_codec("sgq").encode({"x": np.array([np.inf, 1.0])})


def test_specs_parse_and_round_trip() -> None:
    for spec in available_codecs():
        codec = get_codec(spec)
        assert get_codec(codec.spec) == codec
    assert get_codec({"name": "sgq", "bits": 3}).params["bits"] == 3
    assert get_codec("uniform4").params["bits"] == 4
    assert get_codec("topk:ratio=0.01").params["ratio"] == 0.01


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("gzip", "unknown codec 'gzip'.*sgq"),
        ("sgq:bitz=4", "no option.*bitz.*expected bits"),
        ("sgq:bits=9", "option 'bits' must be a number in \\[2, 8\\]"),
        ("sgq:bits=four", "option 'bits'"),
        ("sgq:alloc=magic", "option 'alloc' must be one of energy, uniform"),
        ("sgq:bits=3,min_bits=4", "min_bits <= bits"),
        ("topk:ratio=0", "option 'ratio'"),
        ("sgq:bits", "key=value"),
        ({"bits": 4}, "needs a string 'name'"),
    ],
)
def test_bad_specs_raise_config_error(spec: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        get_codec(spec)  # type: ignore[arg-type]


def _sgq_code_bits(payload: bytes) -> tuple[int, int]:
    """(code bits, codes) over the SGQ tensors of a payload, read from its group tables."""
    import struct

    from clients.codecs.sgq import _view_dims
    from clients.codecs.wire import Scheme, parse_payload

    bits = codes = 0
    for rec in parse_payload(payload)[1]:
        if rec.scheme != Scheme.SGQ:
            continue
        layout, _, g, p, groups = struct.unpack("<BBIIH", bytes(rec.body[:12]))
        _, r, w = _view_dims(rec.shape, layout)
        size = g * r * p * -(-w // p)
        widths = np.frombuffer(bytes(rec.body[12 : 12 + groups]), np.uint8)
        bits += int(widths.astype(int).sum()) * size
        codes += groups * size
    return bits, codes


@pytest.mark.parametrize("bits", [2.5, 3, 4, 5.5])
def test_sgq_model_budget_holds_and_favours_large_layers(bits: float) -> None:
    upd = _update()
    upd["fc.weight"] *= 100  # one layer moves far more than the others
    model = get_codec(f"sgq:bits={bits}")
    per_tensor = get_codec(f"sgq:bits={bits},budget=tensor")
    pm, pt = model.encode(upd), per_tensor.encode(upd)
    used, n = _sgq_code_bits(pm)
    assert used <= bits * n
    assert used >= (bits - 0.1) * n  # the budget is spent, not wasted
    err = {}
    for name, codec, payload in (("model", model, pm), ("tensor", per_tensor, pt)):
        out = codec.decode(payload)
        err[name] = sum(float(np.sum((out[k] - upd[k]) ** 2)) for k in upd if upd[k].ndim >= 2)
    assert err["model"] < 0.5 * err["tensor"]
