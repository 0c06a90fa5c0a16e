"""Compressed updates on the server: decode uplinks before aggregation, encode the downlink.

``CompressedStrategy(inner, codec, downlink)`` wraps any message-based Flower strategy and
pairs with ``clients.codecs.compression_mod`` on the clients (the protocol is described in
``clients/codecs/mod.py``).

Uplink. Each train reply carries the payload of ``client model - model it received``. The
wrapper decodes it against the model it sent that node and hands the inner strategy
(FedAvg, FedProx, FedAdam, a user's) ordinary replies with full arrays, so the inner
strategy needs no change. A reply whose payload is rejected (``PayloadError``: truncated,
corrupted, wrong version or shape) or decodes to non-finite values is dropped as that
client's failure for the round: it never reaches the aggregate. The count is returned in
the round's MetricRecord as ``failures-payload`` (and logged), beside ``bytes-up`` and
``bytes-down``, the payload bytes of the round in each direction.

Downlink (optional). The server keeps ``M``, the decoded model every up-to-date client
holds, and a residual ``e``. Each round it encodes ``u = W - M + e`` (``W`` the model the
inner strategy produced), sets ``M <- M + decode(u)`` and ``e <- u - decode(u)``: error
feedback, so what one round loses is sent the next. The inner strategy is configured with
``M`` (the model the clients will actually train from, so FedOpt-style strategies compute
their pseudo-gradient against it). A node at version ``v`` gets the chain of update payloads
since ``v`` and rebuilds ``M`` bitwise (decoding is pure float32 arithmetic; the test suite
checks both sides agree bit for bit); a node the server has no confirmed version for, or
whose chain would outweigh the model, gets a keyframe: the whole model, exact (fp32) by
default; with a lossy ``keyframe`` codec the node holds ``decode(keyframe)``, which the
server knows bitwise and decodes its update against, and gets a keyframe again next time.
A node's version is confirmed by its successful reply; a failed or missing reply forgets
it.
Evaluation messages are not compressed (they are delegated unchanged).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from clients.codecs import Codec, decode_payload, get_codec
from clients.codecs.mod import (
    MARKER_KEY,
    PAYLOAD_KEY,
    add_update,
    arrays_to_numpy,
    numpy_to_arrays,
    payload_of,
    payload_record,
    subtract,
)
from devices.errors import PayloadError
from strategies.wrapper import StrategyWrapper

__all__ = ["CompressedStrategy"]


class CompressedStrategy(StrategyWrapper):
    """Wrap ``inner`` so that train updates travel compressed in one or both directions.

    Parameters
    ----------
    inner : Strategy
        Any message-based Flower strategy; it aggregates decoded, full arrays.
    codec : str, mapping or Codec
        The uplink codec the clients are asked to use (``"sgq"``, ``"topk:ratio=0.01"``...;
        see ``clients.codecs.get_codec``). Replies in any codec are decoded.
    downlink : str, mapping or Codec, optional
        The codec of the global-model updates sent to clients; ``None`` sends plain
        arrays.
    keyframe : str, mapping or Codec
        The codec of the whole model sent to a node without a usable reference (default
        ``"fp32"``, exact). A lossy one (``"sgq:bits=8"``) makes first contacts cheaper:
        such a node holds ``decode(keyframe)``, which the server knows bitwise and
        decodes that node's update against, but it never holds ``M`` exactly, so every
        message to it is a keyframe (the ``downlink`` codec is then not used for it):
        a lossy broadcast of the model, worth it when nodes rarely return.

    Attributes
    ----------
    payload_failures : dict[int, list[int]]
        Per round, the node ids whose payloads were rejected.
    model : dict[str, numpy.ndarray] or None
        The decoded downlink model ``M`` (``None`` without downlink compression).
    """

    def __init__(self, inner: Strategy, codec: str | Mapping[str, Any] | Codec,
                 downlink: str | Mapping[str, Any] | Codec | None = None,
                 keyframe: str | Mapping[str, Any] | Codec = "fp32") -> None:
        super().__init__(inner)
        self.codec = get_codec(codec)
        self.downlink = get_codec(downlink) if downlink is not None else None
        self.payload_failures: dict[int, list[int]] = {}
        self.model: dict[str, np.ndarray] | None = None
        self.version = 0
        self._keyframe = get_codec(keyframe)
        self._exact: set[int] = set()  # nodes sent exactly M this round
        self._residual: dict[str, np.ndarray] = {}
        self._history: list[tuple[int, bytes]] = []  # (version, payload) since oldest kept
        self._node_version: dict[int, int] = {}
        self._sent_ref: dict[int, dict[str, np.ndarray]] = {}
        self._bytes_down = 0

    def summary(self) -> None:
        """Log the codecs, then the inner strategy's summary."""
        log(INFO, "\t├──> Compressed updates: uplink %s, downlink %s", self.codec.spec,
            self.downlink.spec if self.downlink else "(plain)")
        self.inner.summary()

    # --- downlink ---------------------------------------------------------------------

    def _advance_model(self, arrays: ArrayRecord) -> dict[str, np.ndarray]:
        """Encode ``W - M`` (with the residual), update ``M``; return the new ``M``."""
        assert self.downlink is not None
        target = arrays_to_numpy(arrays)
        self.version += 1
        if self.model is None or list(self.model) != list(target) or any(
                self.model[k].shape != v.shape for k, v in target.items()):
            self.model, self._residual, self._history = target, {}, []
            return self.model
        payload = self.downlink.encode(subtract(target, self.model), self._residual)
        shapes = {k: v.shape for k, v in target.items()}
        self.model = add_update(self.model, decode_payload(payload, expected_shapes=shapes))
        self._history.append((self.version, payload))
        limit = sum(v.nbytes for v in self.model.values())
        while sum(len(p) for _, p in self._history) > limit:
            self._history.pop(0)
        return self.model

    def _downlink_record(self, node: int, keyframe: list[tuple[bytes, dict[str, np.ndarray]]]
                         ) -> tuple[ArrayRecord, dict[str, str | int], dict[str, np.ndarray]]:
        """Payload record, marker fields and the model ``node`` will hold after decoding."""
        assert self.model is not None
        have = self._node_version.get(node)
        if have is not None:
            chain = [(v, p) for v, p in self._history if v > have]
            if len(chain) == self.version - have:  # the history covers every step
                record = ArrayRecord()
                for v, p in chain:
                    record[f"v{v}"] = payload_record(p)[PAYLOAD_KEY]
                    self._bytes_down += len(p)
                self._exact.add(node)
                return record, {"down": "chain", "base": have, "version": self.version}, \
                    self.model
        if not keyframe:  # encoded once per round, shared by every node that needs it
            payload = self._keyframe.encode(self.model)
            decoded = decode_payload(payload)
            if all(decoded[k].tobytes() == v.tobytes() for k, v in self.model.items()):
                decoded = self.model
            keyframe.append((payload, decoded))
        payload, held = keyframe[0]
        self._bytes_down += len(payload)
        exact = held is self.model
        if exact:
            self._exact.add(node)
        return payload_record(payload), {"down": "full",
                                         "version": self.version if exact else -1}, held

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Configure the inner strategy's round, then compress what its messages carry."""
        self._bytes_down = 0
        self._sent_ref = {}
        self._exact = set()
        if self.downlink is not None:
            arrays = numpy_to_arrays(self._advance_model(arrays))
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        keyframe: list[tuple[bytes, dict[str, np.ndarray]]] = []
        converted: dict[int, dict[str, np.ndarray]] = {}
        for msg in messages:
            node = msg.metadata.dst_node_id
            content = msg.content
            if len(content.array_records) != 1:
                raise PayloadError(f"configure_train: the inner strategy's message to node "
                                   f"{node} holds {len(content.array_records)} ArrayRecords; "
                                   "CompressedStrategy needs exactly one")
            key, rec = next(iter(content.array_records.items()))
            fields: dict[str, str | int] = {"uplink": self.codec.spec}
            if self.downlink is not None:
                rec, down, self._sent_ref[node] = self._downlink_record(node, keyframe)
                fields.update(down)
            else:
                ref = converted.get(id(rec))
                if ref is None:
                    ref = converted[id(rec)] = arrays_to_numpy(rec)
                self._sent_ref[node] = ref
                self._bytes_down += sum(v.nbytes for v in ref.values())
            new = RecordDict({k: v for k, v in content.items() if k != key})
            new[key] = rec
            new[MARKER_KEY] = ConfigRecord(fields)  # type: ignore[arg-type]
            msg.content = new
        return messages

    # --- uplink -----------------------------------------------------------------------

    def _decode_reply(self, msg: Message, ref: dict[str, np.ndarray] | None) -> int:
        """Replace a reply's payload by full arrays in place; return the payload bytes."""
        content = msg.content
        marker = content.config_records.get(MARKER_KEY)
        if len(content.array_records) != 1:
            raise PayloadError(f"malformed reply: {len(content.array_records)} ArrayRecords")
        key, rec = next(iter(content.array_records.items()))
        if marker is None or "up" not in marker:
            arrays = arrays_to_numpy(rec)  # a plain reply (client without the mod)
            bad = [k for k, v in arrays.items() if v.dtype.kind == "f" and
                   not np.isfinite(v).all()]
            if bad:
                raise PayloadError(f"non-finite values in plain reply tensor '{bad[0]}'")
            return sum(v.nbytes for v in arrays.values())
        if ref is None:
            raise PayloadError("malformed reply: the server sent this node no model")
        payload = payload_of(rec)
        update = decode_payload(payload, expected_shapes={k: v.shape for k, v in ref.items()})
        new = RecordDict({k: v for k, v in content.items() if k not in (key, MARKER_KEY)})
        new[key] = numpy_to_arrays(add_update(ref, update))
        msg.content = new
        return len(payload)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode every reply, drop rejected ones, then let the inner strategy aggregate."""
        kept: list[Message] = []
        failed: list[int] = []
        bytes_up = 0
        confirmed: set[int] = set()
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                kept.append(msg)
                continue
            try:
                bytes_up += self._decode_reply(msg, self._sent_ref.get(node))
            except PayloadError as exc:
                failed.append(node)
                log(WARNING, "aggregate_train: dropped the reply of node %d: %s", node, exc)
                continue
            kept.append(msg)
            confirmed.add(node)
        if self.downlink is not None:
            for node in self._sent_ref:
                if node in confirmed and node in self._exact:
                    self._node_version[node] = self.version
                else:
                    self._node_version.pop(node, None)
        self.payload_failures[server_round] = failed
        arrays, metrics = self.inner.aggregate_train(server_round, kept)
        out = MetricRecord() if metrics is None else metrics
        out["failures-payload"] = len(failed)
        out["bytes-up"] = bytes_up
        out["bytes-down"] = self._bytes_down
        return arrays, out
