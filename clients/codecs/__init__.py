"""codecs: compressed model updates (SGQ and baselines), their wire format and Flower mod.

Lives here: the Codec interface, get_codec, the payload format, the client-side mod, the
split-learning cut. Must not: aggregate updates or hold server state (strategies does).
"""

from .boundary import CompressedBoundary
from .codec import (
    BlockwiseCodec,
    Codec,
    FP16Codec,
    FP32Codec,
    QSGDCodec,
    SGQCodec,
    SignCodec,
    TopKCodec,
    UniformCodec,
    available_codecs,
    get_codec,
)
from .mod import compression_mod
from .schemes import decode_payload
from .wire import PayloadHeader, parse_header

__all__ = [
    "BlockwiseCodec",
    "Codec",
    "CompressedBoundary",
    "FP16Codec",
    "FP32Codec",
    "PayloadHeader",
    "QSGDCodec",
    "SGQCodec",
    "SignCodec",
    "TopKCodec",
    "UniformCodec",
    "available_codecs",
    "compression_mod",
    "decode_payload",
    "get_codec",
    "parse_header",
]
