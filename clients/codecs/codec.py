"""The codec interface, the codecs (SGQ and the baselines) and ``get_codec`` spec parsing.

A codec turns a mapping of named arrays into one payload (:mod:`wire`) and back. The
sender may pass a ``state`` mapping: codecs with error feedback keep there, per tensor,
the residual ``r = (x + r_prev) - decoded`` and add it to the next tensor of the same
name (Seide et al. 2014; Karimireddy et al. 2019), so what quantization drops is sent
later instead of lost. Non-float tensors (e.g. BatchNorm's ``num_batches_tracked``) and
empty ones always travel exactly (RAW). Encoding a tensor with NaN or inf raises
:class:`PayloadError` naming it. Decoding is universal (:func:`schemes.decode_payload`):
every codec reads every codec's payload.

Specs: ``"name"`` or ``"name:opt=value,opt=value"``, or a mapping ``{"name": ..., opt:
value}``. Names and their options are listed by :func:`available_codecs`; aliases expand
to a name plus options (``"uniform4"`` is ``"uniform:bits=4"``). :attr:`Codec.spec` is the
canonical spec with every option, which :func:`get_codec` parses back to an equal codec.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from numpy.typing import NDArray

from devices.errors import ConfigError, PayloadError

from . import schemes
from .sgq import Prepared, allocate_bits, choose_layout, encode_sgq, finish_sgq, prepare_sgq
from .wire import FLAG_ERROR_FEEDBACK, Scheme, TensorRecord, build_payload

__all__ = [
    "BlockwiseCodec",
    "Codec",
    "FP16Codec",
    "FP32Codec",
    "QSGDCodec",
    "SGQCodec",
    "SignCodec",
    "TopKCodec",
    "UniformCodec",
    "available_codecs",
    "get_codec",
]

Encoded = tuple[int, bytes, NDArray[np.float32] | None]


@dataclass(frozen=True)
class _Option:
    kind: type  # int, float, bool or str
    default: Any
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] = ()

    def expected(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.kind is bool:
            return "a boolean (1/0, true/false)"
        rng = f" in [{self.lo}, {self.hi}]" if self.lo is not None else ""
        return f"{'an integer' if self.kind is int else 'a number'}{rng}"

    def parse(self, codec: str, key: str, raw: object) -> Any:
        bad = ConfigError(f"codec '{codec}' option '{key}' must be {self.expected()}, "
                          f"got {raw!r}")
        if self.kind is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise bad
        if self.kind is str:
            if str(raw) not in self.choices:
                raise bad
            return str(raw)
        try:
            num = float(raw) if not isinstance(raw, bool) else math.nan  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise bad from None
        if not math.isfinite(num) or (self.kind is int and num != int(num)):
            raise bad
        if self.lo is not None and not (self.lo <= num <= (self.hi or math.inf)):
            raise bad
        return int(num) if self.kind is int else num


class Codec(ABC):
    """A named, configured encoder/decoder of named-array payloads.

    Attributes
    ----------
    name : str
        Family name (``"sgq"``, ``"fp16"``, ...).
    error_feedback : bool
        Whether :meth:`encode` keeps and applies residuals in the ``state`` it is given.
    """

    name: ClassVar[str]
    options: ClassVar[dict[str, _Option]] = {}

    def __init__(self, **opts: Any) -> None:
        self.params: dict[str, Any] = {}
        for key, opt in self.options.items():
            self.params[key] = opt.parse(self.name, key, opts.pop(key)) if key in opts \
                else opt.default
        if opts:
            raise ConfigError(
                f"codec '{self.name}' has no option(s) {sorted(opts)}; expected "
                f"{', '.join(self.options) or 'no options'}"
            )
        self._check()

    def _check(self) -> None:  # noqa: B027 - optional hook, deliberately not abstract
        """Validate option combinations (ConfigError); none by default."""

    @property
    def error_feedback(self) -> bool:
        """Whether residuals are kept in ``state`` (the ``ef`` option where it exists)."""
        return bool(self.params.get("ef", False))

    @property
    def spec(self) -> str:
        """Canonical spec string, parseable by :func:`get_codec`."""
        if not self.params:
            return self.name
        def fmt(v: Any) -> str:
            return str(int(v)) if isinstance(v, bool) else str(v)
        return self.name + ":" + ",".join(f"{k}={fmt(v)}" for k, v in self.params.items())

    def __repr__(self) -> str:
        return f"<Codec {self.spec}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Codec) and other.spec == self.spec

    def __hash__(self) -> int:
        return hash(self.spec)

    @abstractmethod
    def _encode_float(self, name: str, x: NDArray[np.float32], orig: np.ndarray,
                      want: bool) -> Encoded:
        """Encode one finite, non-empty float tensor: (scheme, body, decoded or None).

        ``orig`` is the tensor in its own dtype (for exact schemes); ``decoded`` may be
        ``None`` for an exact scheme, meaning "no residual".
        """

    def encode(self, tensors: Mapping[str, np.ndarray],
               state: MutableMapping[str, np.ndarray] | None = None) -> bytes:
        """Encode named arrays into one payload.

        Parameters
        ----------
        tensors : Mapping[str, numpy.ndarray]
            Arrays to send, in the order the receiver will get them back.
        state : MutableMapping[str, numpy.ndarray], optional
            The sender's error-feedback residuals, read and updated in place when
            :attr:`error_feedback` is on (ignored otherwise).

        Raises
        ------
        PayloadError
            If a float tensor holds NaN or inf (the message names the tensor).
        """
        ef = self.error_feedback and state is not None
        # (name, dtype, shape, float32 input with residual, same in its own dtype)
        items: list[tuple[str, np.dtype, tuple[int, ...], NDArray[np.float32], np.ndarray]] = []
        raw: dict[str, TensorRecord] = {}
        for name, value in tensors.items():
            arr = np.asarray(value)
            if arr.dtype.kind != "f" or arr.size == 0:
                if arr.dtype.kind not in "fiub":
                    raise PayloadError(f"tensor '{name}' has unsupported dtype {arr.dtype}")
                raw[name] = TensorRecord(name, arr.dtype, arr.shape, Scheme.RAW,
                                         schemes.encode_raw(arr))
                continue
            x = np.ascontiguousarray(arr, dtype=np.float32)
            if not np.isfinite(x).all():
                raise PayloadError(f"tensor '{name}' holds non-finite values (NaN or inf, "
                                   "or beyond float32); refusing to encode it")
            dtype = arr.dtype
            if ef:
                assert state is not None
                res = state.get(name)
                if res is not None and res.shape == x.shape:
                    x = x + res
                    arr = x.astype(dtype, copy=False)
            items.append((name, dtype, arr.shape, x, arr))
        encoded = self._encode_all([(n, x, a) for n, _, _, x, a in items], ef)
        done: dict[str, TensorRecord] = {}
        for (name, dtype, shape, x, _), (scheme, body, decoded) in zip(items, encoded,
                                                                       strict=True):
            if ef:
                assert state is not None
                if decoded is None:
                    state.pop(name, None)
                else:
                    state[name] = x - decoded
            done[name] = TensorRecord(name, dtype, shape, scheme, body)
        records = [raw[n] if n in raw else done[n] for n in tensors]
        return build_payload(self.spec, FLAG_ERROR_FEEDBACK if ef else 0, records)

    def _encode_all(self, items: list[tuple[str, NDArray[np.float32], np.ndarray]],
                    want: bool) -> list[Encoded]:
        """Encode every float tensor of a payload; by default one at a time.

        Codecs that decide across tensors (SGQ's model-wide bit budget) override this.
        """
        return [self._encode_float(name, x, orig, want) for name, x, orig in items]

    def decode(self, payload: bytes, expected_shapes: Mapping[str, tuple[int, ...]] | None
               = None) -> dict[str, np.ndarray]:
        """Decode a payload (of any codec); see :func:`schemes.decode_payload`."""
        return schemes.decode_payload(payload, expected_shapes)


class FP32Codec(Codec):
    """Exact transfer in the tensors' own dtypes (the uncompressed reference)."""

    name = "fp32"

    def _encode_float(self, name: str, x: NDArray[np.float32], orig: np.ndarray,
                      want: bool) -> Encoded:
        return Scheme.RAW, schemes.encode_raw(orig), None


class FP16Codec(Codec):
    """IEEE half precision for every float tensor."""

    name = "fp16"

    def _encode_float(self, name: str, x: NDArray[np.float32], orig: np.ndarray,
                      want: bool) -> Encoded:
        return (Scheme.FP16, *schemes.encode_fp16(name, x, want))


class UniformCodec(Codec):
    """Uniform per-tensor quantization: one absmax scale, ``bits``-bit codes."""

    name = "uniform"
    options = {"bits": _Option(int, 8, 1, 8), "ef": _Option(bool, False)}

    def _encode_float(self, name: str, x: NDArray[np.float32], orig: np.ndarray,
                      want: bool) -> Encoded:
        return (Scheme.UNIFORM, *schemes.encode_uniform(x, self.params["bits"], want))


class BlockwiseCodec(Codec):
    """Blockwise quantization: an absmax scale per ``block`` flat values, error feedback."""

    name = "blockwise"
    options = {"bits": _Option(int, 4, 1, 8), "block": _Option(int, 64, 1, 1 << 20),
               "ef": _Option(bool, True)}

    def _encode_float(self, name: str, x: NDArray[np.float32], orig: np.ndarray,
                      want: bool) -> Encoded:
        p = self.params
        return (Scheme.BLOCKWISE, *schemes.encode_blockwise(x, p["bits"], p["block"], want))


class QSGDCodec(Codec):
    """QSGD: stochastic, unbiased quantization to ``levels`` levels per bucket norm."""

    name = "qsgd"
    options = {"levels": _Option(int, 7, 1, 127), "bucket": _Option(int, 512, 1, 1 << 20),
               "seed": _Option(int, 0, 0, 2**63 - 1), "ef": _Option(bool, False)}

    def _check(self) -> None:
        self._rng = np.random.default_rng(self.params["seed"])

    def _encode_float(self, name: str, x: NDArray[np.float32], orig: np.ndarray,
                      want: bool) -> Encoded:
        p = self.params
        return (Scheme.QSGD,
                *schemes.encode_qsgd(x, p["levels"], p["bucket"], self._rng, want))


class SignCodec(Codec):
    """Scaled sign compression; with ``ef`` (the default) this is EF-signSGD."""

    name = "sign"
    options = {"ef": _Option(bool, True)}

    def _encode_float(self, name: str, x: NDArray[np.float32], orig: np.ndarray,
                      want: bool) -> Encoded:
        return (Scheme.SIGN, *schemes.encode_sign(x, want))


class TopKCodec(Codec):
    """Top-k sparsification by magnitude, per tensor, optional error feedback."""

    name = "topk"
    options = {"ratio": _Option(float, 0.01, 1e-9, 1.0), "ef": _Option(bool, True)}

    def _encode_float(self, name: str, x: NDArray[np.float32], orig: np.ndarray,
                      want: bool) -> Encoded:
        return (Scheme.TOPK, *schemes.encode_topk(x, self.params["ratio"], want))


class SGQCodec(Codec):
    """Stripe-wise group quantization (see :mod:`sgq` for every design choice).

    Options: ``bits`` average code bits (2..8, may be fractional), ``min_bits`` and
    ``max_bits`` bounds per group, ``group`` channels per group, ``stripe`` longest
    stripe, ``alloc`` ``energy`` (significance) or ``uniform``, ``layout`` ``weight``
    (model updates) or ``feature`` (``(N, C, H, W)`` feature maps), ``small`` the part
    for 1-D and tiny tensors (``fp32`` exact, ``fp16`` or ``int8``), ``min_size`` the
    smallest tensor SGQ handles, ``budget`` whether the average ``bits`` holds over the
    whole payload (``model``: groups of every tensor compete for bits, so layers whose
    update is large get more) or per tensor (``tensor``), ``ef`` error feedback.
    """

    name = "sgq"
    options = {
        "bits": _Option(float, 4.0, 2, 8),
        "min_bits": _Option(int, 2, 2, 8),
        "max_bits": _Option(int, 8, 2, 8),
        "group": _Option(int, 8, 1, 1 << 16),
        "stripe": _Option(int, 32, 1, 1 << 20),
        "alloc": _Option(str, "energy", choices=("energy", "uniform")),
        "layout": _Option(str, "weight", choices=("weight", "feature")),
        "small": _Option(str, "fp32", choices=("fp32", "fp16", "int8")),
        "min_size": _Option(int, 64, 1, 1 << 30),
        "budget": _Option(str, "model", choices=("model", "tensor")),
        "ef": _Option(bool, True),
    }

    def _check(self) -> None:
        p = self.params
        if not p["min_bits"] <= p["bits"] <= p["max_bits"]:
            raise ConfigError(
                f"codec 'sgq' needs min_bits <= bits <= max_bits, got {p['min_bits']}, "
                f"{p['bits']}, {p['max_bits']}"
            )
        if p["alloc"] == "uniform" and p["bits"] != int(p["bits"]):
            raise ConfigError(f"codec 'sgq' option 'bits' must be an integer with "
                              f"alloc=uniform, got {p['bits']}")

    def _is_small(self, x: NDArray[np.float32]) -> bool:
        return x.ndim < 2 or x.size < self.params["min_size"]

    def _encode_small(self, name: str, x: NDArray[np.float32], orig: np.ndarray,
                      want: bool) -> Encoded:
        small = self.params["small"]
        if small == "fp16":
            return (Scheme.FP16, *schemes.encode_fp16(name, x, want))
        if small == "int8":
            return (Scheme.UNIFORM, *schemes.encode_uniform(x, 8, want))
        return Scheme.RAW, schemes.encode_raw(orig), None

    def _encode_float(self, name: str, x: NDArray[np.float32], orig: np.ndarray,
                      want: bool) -> Encoded:
        p = self.params
        if self._is_small(x):
            return self._encode_small(name, x, orig, want)
        body, decoded = encode_sgq(
            x, layout=choose_layout(x.shape, p["layout"]), bits=p["bits"], group=p["group"],
            stripe=p["stripe"], min_bits=p["min_bits"], max_bits=p["max_bits"],
            alloc=p["alloc"], want_decoded=want,
        )
        return Scheme.SGQ, body, decoded

    def _encode_all(self, items: list[tuple[str, NDArray[np.float32], np.ndarray]],
                    want: bool) -> list[Encoded]:
        p = self.params
        if p["budget"] == "tensor" or p["alloc"] == "uniform":
            return super()._encode_all(items, want)
        out: list[Encoded | None] = [None] * len(items)
        preps: dict[int, Prepared] = {}
        for i, (name, x, orig) in enumerate(items):
            if self._is_small(x):
                out[i] = self._encode_small(name, x, orig, want)
            else:
                preps[i] = prepare_sgq(x, layout=choose_layout(x.shape, p["layout"]),
                                       group=p["group"], stripe=p["stripe"])
        if preps:
            energy = np.concatenate([pr.energy() for pr in preps.values()])
            sizes = np.concatenate([np.full(pr.geometry[1], pr.group_size, np.int64)
                                    for pr in preps.values()])
            widths = allocate_bits(energy, p["bits"], p["min_bits"], p["max_bits"], sizes)
            start = 0
            for i, pr in preps.items():
                stop = start + pr.geometry[1]
                out[i] = (Scheme.SGQ, *finish_sgq(pr, widths[start:stop], want))
                start = stop
        return [e for e in out if e is not None]


_CODECS: dict[str, type[Codec]] = {
    c.name: c for c in (FP32Codec, FP16Codec, UniformCodec, BlockwiseCodec, QSGDCodec,
                        SignCodec, TopKCodec, SGQCodec)
}
_ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "uniform8": ("uniform", {"bits": 8}),
    "uniform4": ("uniform", {"bits": 4}),
    "blockwise4-ef": ("blockwise", {"bits": 4, "ef": True}),
    "blockwise4": ("blockwise", {"bits": 4, "ef": False}),
    "ef-signsgd": ("sign", {"ef": True}),
    "signsgd": ("sign", {"ef": False}),
}


def available_codecs() -> dict[str, str]:
    """Names and aliases accepted by :func:`get_codec`, each with what it means."""
    out = {n: ", ".join(f"{k}={o.default}" for k, o in c.options.items()) or "(no options)"
           for n, c in _CODECS.items()}
    out.update({a: f"{n}:" + ",".join(f"{k}={v}" for k, v in o.items())
                for a, (n, o) in _ALIASES.items()})
    return out


def get_codec(spec: str | Mapping[str, Any] | Codec) -> Codec:
    """Build a codec from a spec string (``"sgq:bits=3"``), a mapping or a codec.

    Raises
    ------
    ConfigError
        For an unknown codec name or option, or an option value of the wrong kind; the
        message names it and what was expected.
    """
    if isinstance(spec, Codec):
        return spec
    if isinstance(spec, Mapping):
        opts = dict(spec)
        name = opts.pop("name", None)
        if not isinstance(name, str):
            raise ConfigError(f"codec spec mapping needs a string 'name', got {name!r}")
    elif isinstance(spec, str):
        name, _, rest = spec.strip().partition(":")
        opts = {}
        for item in filter(None, (s.strip() for s in rest.split(","))):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise ConfigError(f"codec spec '{spec}': option '{item}' must look like "
                                  "key=value")
            opts[key.strip()] = value.strip()
    else:
        raise ConfigError(f"codec spec must be a string or mapping, got {type(spec).__name__}")
    name = name.strip().lower()
    if name in _ALIASES:
        base, preset = _ALIASES[name]
        opts = {**preset, **opts}
        name = base
    cls = _CODECS.get(name)
    if cls is None:
        raise ConfigError(f"unknown codec '{name}'; expected one of "
                          f"{', '.join(sorted([*_CODECS, *_ALIASES]))}")
    return cls(**opts)
