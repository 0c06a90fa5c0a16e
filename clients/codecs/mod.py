"""The client-side Flower mod that compresses training updates (and decodes the downlink).

Protocol between :func:`compression_mod` (client) and
``strategies.compressed.CompressedStrategy`` (server), carried in ordinary Flower records:

- Every train message from the server holds a ConfigRecord under :data:`MARKER_KEY` with
  ``"uplink"``: the codec spec the server asks for (used when the mod has none of its own).
- Downlink: when ``"down"`` is set the message's single ArrayRecord holds payloads, not
  arrays. ``"down" == "full"``: one exact payload of the whole model under
  :data:`PAYLOAD_KEY` (a keyframe). ``"down" == "chain"``: the encoded global-model updates
  since version ``"base"``, one payload per version under ``"v<version>"``; the node adds
  them, in order, to the reference model it keeps in ``context.state`` and reaches
  ``"version"`` bitwise identical to the server's decoded model (decoding is pure
  float32 IEEE arithmetic). A node whose reference is not ``"base"`` replies with an
  error; the server then sends it a keyframe.
- Uplink: the reply's ArrayRecord (same key) is replaced by one uint8 Array of the payload
  of ``reply - received`` under :data:`PAYLOAD_KEY`, and a marker ConfigRecord names the
  codec. Error-feedback residuals stay in ``context.state`` (per node, across rounds).

The client app in between sees plain arrays and its own config only: the marker is removed
before it is called. Non-train messages pass through untouched. Put this mod first in
``ClientApp(mods=[compression_mod(...), ...])`` (outermost), so that other mods (clipping,
size logging) also see plain arrays.
"""

from __future__ import annotations

from collections.abc import Mapping
from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    RecordDict,
)
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.constant import ErrorCode
from flwr.supercore import log

from devices.errors import PayloadError

from .codec import Codec, get_codec
from .schemes import decode_payload

__all__ = [
    "MARKER_KEY",
    "PAYLOAD_KEY",
    "REF_KEY",
    "RESIDUAL_KEY",
    "add_update",
    "arrays_to_numpy",
    "compression_mod",
    "numpy_to_arrays",
    "payload_of",
    "payload_record",
    "subtract",
]

MARKER_KEY = "tinyfleet.codec"
PAYLOAD_KEY = "payload"
REF_KEY = "tinyfleet.codec.reference"
RESIDUAL_KEY = "tinyfleet.codec.residual"
META_KEY = "tinyfleet.codec.meta"


def arrays_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The arrays of a record as numpy, in the record's key order."""
    return {k: v.numpy() for k, v in record.items()}


def numpy_to_arrays(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """An ArrayRecord holding ``arrays`` (same key order)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def payload_record(payload: bytes, key: str = PAYLOAD_KEY) -> ArrayRecord:
    """An ArrayRecord carrying a payload as one uint8 Array."""
    return ArrayRecord({key: Array(np.frombuffer(payload, dtype=np.uint8))})


def payload_of(record: ArrayRecord, key: str = PAYLOAD_KEY) -> bytes:
    """The payload bytes a record carries; PayloadError if it carries something else."""
    arr = record.get(key)
    if arr is None:
        raise PayloadError(f"malformed message: no '{key}' payload array, found "
                           f"{sorted(record.keys())[:5]}")
    try:
        data = arr.numpy()
    except Exception as exc:  # a foreign or broken Array serialization
        raise PayloadError(f"malformed message: payload array '{key}' unreadable ({exc})"
                           ) from exc
    if data.dtype != np.uint8 or data.ndim != 1:
        raise PayloadError(f"malformed message: payload array '{key}' must be 1-D uint8, "
                           f"got {data.dtype} {data.shape}")
    return data.tobytes()


def subtract(new: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray]
             ) -> dict[str, np.ndarray]:
    """``new - ref`` per key in the reference's dtype and shape (XOR for booleans).

    A reply may hand back a tensor in another dtype or an equal-sized shape than it got
    (FedAvg turns an int64 scalar into a float64 ``(1,)`` array, a torch client turns it
    back): it is cast to the reference's, which is what the receiver adds the update to.
    """
    if set(new) != set(ref):
        raise PayloadError(f"shape mismatch: the reply's tensors differ from the received "
                           f"ones: {sorted(set(new) ^ set(ref))[:5]}")
    out: dict[str, np.ndarray] = {}
    for k, r in ref.items():
        n = np.asarray(new[k])
        if n.size != r.size:
            raise PayloadError(f"shape mismatch: tensor '{k}' is {n.dtype}{n.shape}, the "
                               f"reference {r.dtype}{r.shape}")
        n = n.reshape(r.shape).astype(r.dtype, copy=False)
        out[k] = np.logical_xor(n, r) if r.dtype == np.bool_ else np.subtract(n, r, dtype=r.dtype)
    return out


def add_update(ref: Mapping[str, np.ndarray], update: Mapping[str, np.ndarray]
               ) -> dict[str, np.ndarray]:
    """``ref + update`` per key in the reference's dtype; PayloadError if non-finite."""
    if list(update) != list(ref):
        raise PayloadError(f"shape mismatch: update tensors {list(update)[:3]}... do not "
                           f"match the reference's {list(ref)[:3]}...")
    out: dict[str, np.ndarray] = {}
    for k, r in ref.items():
        u = update[k]
        if r.dtype == np.bool_:
            out[k] = np.logical_xor(r, u)
            continue
        with np.errstate(over="ignore", invalid="ignore"):
            v = np.add(r, u.astype(r.dtype, copy=False), dtype=r.dtype)
        if v.dtype.kind == "f" and not np.isfinite(v).all():
            raise PayloadError(f"non-finite values in tensor '{k}' after applying the update")
        out[k] = v
    return out


def _error_reply(msg: Message, reason: str) -> Message:
    log(WARNING, "compression_mod: %s", reason)
    return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg)


def _decode_downlink(marker: ConfigRecord, record: ArrayRecord, state: RecordDict
                     ) -> dict[str, np.ndarray]:
    """The model a downlink message encodes; updates the node's reference in ``state``."""
    kind = marker.get("down")
    version = int(marker.get("version", -1))  # type: ignore[arg-type]
    if kind == "full":
        model = decode_payload(payload_of(record))
    elif kind == "chain":
        meta = state.config_records.get(META_KEY)
        have = meta.get("version") if meta is not None else None
        base = marker.get("base")
        if have is None or have != base or REF_KEY not in state.array_records:
            raise PayloadError(f"stale reference: the node holds model version {have!r}, "
                               f"the downlink update is against version {base!r}")
        model = arrays_to_numpy(state.array_records[REF_KEY])
        shapes = {k: v.shape for k, v in model.items()}
        for v in range(int(base) + 1, version + 1):  # type: ignore[arg-type]
            update = decode_payload(payload_of(record, f"v{v}"), expected_shapes=shapes)
            model = add_update(model, update)
    else:
        raise PayloadError(f"malformed message: unknown downlink kind {kind!r}")
    state[REF_KEY] = numpy_to_arrays(model)
    state[META_KEY] = ConfigRecord({"version": version})
    return model


def compression_mod(codec_spec: str | Mapping[str, Any] | Codec | None = None) -> Mod:
    """Build a Flower mod that sends compressed updates and decodes compressed downlinks.

    Parameters
    ----------
    codec_spec : str, mapping or Codec, optional
        The uplink codec (see :func:`get_codec`). ``None`` uses the codec the server names
        in its train messages, and sends plain arrays if it names none.

    Returns
    -------
    Mod
        ``(msg, context, call_next) -> Message``, for ``ClientApp(mods=[...])``.
    """
    fixed = get_codec(codec_spec) if codec_spec is not None else None

    def _mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN or not msg.has_content():
            return call_next(msg, ctxt)
        content = msg.content
        if len(content.array_records) != 1:
            return _error_reply(msg, f"expected one ArrayRecord, found "
                                     f"{len(content.array_records)}")
        arr_key, arr_rec = next(iter(content.array_records.items()))
        marker = content.config_records.get(MARKER_KEY)
        try:
            if marker is not None and marker.get("down"):
                ref = _decode_downlink(marker, arr_rec, ctxt.state)
                arr_rec = numpy_to_arrays(ref)
            else:
                ref = arrays_to_numpy(arr_rec)
        except PayloadError as exc:
            return _error_reply(msg, f"downlink rejected: {exc}")
        plain = RecordDict({k: v for k, v in content.items() if k != MARKER_KEY})
        plain[arr_key] = arr_rec
        msg.content = plain
        wanted = fixed
        if wanted is None and marker is not None and marker.get("uplink"):
            wanted = get_codec(str(marker["uplink"]))
        reply = call_next(msg, ctxt)
        if wanted is None or reply.has_error():
            return reply
        if len(reply.content.array_records) != 1:
            return _error_reply(msg, "the client's reply must hold one ArrayRecord")
        out_key, out_rec = next(iter(reply.content.array_records.items()))
        try:
            update = subtract(arrays_to_numpy(out_rec), ref)
            residuals: dict[str, np.ndarray] = {}
            if wanted.error_feedback and RESIDUAL_KEY in ctxt.state.array_records:
                residuals = arrays_to_numpy(ctxt.state.array_records[RESIDUAL_KEY])
            payload = wanted.encode(update, residuals)
        except (PayloadError, KeyError) as exc:
            return _error_reply(msg, f"update not sent: {exc}")
        if wanted.error_feedback:
            ctxt.state[RESIDUAL_KEY] = numpy_to_arrays(residuals)
        sent = RecordDict({k: v for k, v in reply.content.items() if k != out_key})
        sent[out_key] = payload_record(payload)
        sent[MARKER_KEY] = ConfigRecord({"up": wanted.spec, "bytes": len(payload)})
        reply.content = sent
        return reply

    return _mod
