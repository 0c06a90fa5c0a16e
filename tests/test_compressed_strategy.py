"""compression_mod + CompressedStrategy with real flwr Messages and flwr's own strategies."""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import pytest
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg
from flwr.supercore.task_identity import TaskIdentity

from clients.codecs import compression_mod, get_codec
from clients.codecs.mod import (
    MARKER_KEY,
    PAYLOAD_KEY,
    REF_KEY,
    arrays_to_numpy,
    numpy_to_arrays,
    payload_of,
    payload_record,
)
from clients.codecs.wire import reseal
from strategies.compressed import CompressedStrategy

SHAPES = {"conv.weight": (8, 4, 3, 3), "fc.weight": (10, 72), "fc.bias": (10,)}


@pytest.fixture(autouse=True)
def _task_identity() -> Iterator[None]:
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    state = random.getstate()
    random.seed(0)  # flwr's sample_nodes draws from the global generator
    yield
    random.setstate(state)
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def _initial() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    out["bn.num_batches_tracked"] = np.array(0, np.int64)
    return out


def _train(msg: Message, ctxt: Context) -> Message:
    """A deterministic 'training': pull the model towards a node-specific target."""
    model = arrays_to_numpy(msg.content.array_records["arrays"])
    rng = np.random.default_rng(ctxt.node_id)
    new = {}
    for k, v in model.items():
        if k != "bn.num_batches_tracked":
            target = rng.standard_normal(v.shape).astype(np.float32)
            new[k] = (v + 0.1 * (target - v)).astype(v.dtype)
        else:
            new[k] = v + 5
    return Message(RecordDict({"arrays": numpy_to_arrays(new),
                               "metrics": MetricRecord({"num-examples": 10 + ctxt.node_id})}),
                   reply_to=msg)


def _evaluate(msg: Message, ctxt: Context) -> Message:
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1, "loss": 0.5})}),
                   reply_to=msg)


class _LocalGrid(Grid):
    """Runs each message through a node's mods and client function, in process.

    With ``client_app`` set, messages go through that Flower ``ClientApp`` (its own mod
    chaining) instead of the mods from ``mods``.
    """

    def __init__(self, nodes: int, mods: Callable[[int], list[Mod]],
                 client_app: ClientApp | None = None) -> None:
        self.nodes = list(range(1, nodes + 1))
        self.contexts = {n: Context(1, n, {}, RecordDict(), {}) for n in self.nodes}
        self.mods = mods
        self.client_app = client_app
        self.sent: list[Message] = []
        self.replies: list[Message] = []

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        replies = []
        for msg in messages:
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            delivered = copy.deepcopy(msg)  # what travels is a copy, as on a real wire

            def client(m: Message, c: Context) -> Message:
                fn = _train if m.metadata.message_type == MessageType.TRAIN else _evaluate
                return fn(m, c)

            handler: ClientAppCallable = client if self.client_app is None else self.client_app
            for mod in reversed(self.mods(node)):
                handler = (lambda md, nxt: lambda m, c: md(m, c, nxt))(mod, handler)
            replies.append(copy.deepcopy(handler(delivered, self.contexts[node])))
        self.replies += replies
        return replies

    # the rest of the Grid interface is not used by Strategy.start
    def set_run(self, run_id: int) -> None:  # type: ignore[override]
        raise NotImplementedError

    @property
    def run(self):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def get_nodes(self):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def pull_messages(self, message_ids):  # type: ignore[no-untyped-def]
        raise NotImplementedError


def _fedavg(fraction: float = 1.0, nodes: int = 4) -> FedAvg:
    return FedAvg(fraction_train=fraction, fraction_evaluate=0.0,
                  min_train_nodes=max(1, int(nodes * fraction)), min_available_nodes=nodes)


def _run(strategy: object, grid: _LocalGrid, rounds: int = 3) -> ArrayRecord:
    result = strategy.start(grid, numpy_to_arrays(_initial()), num_rounds=rounds)  # type: ignore[attr-defined]
    return result.arrays


def _metric(result: object, rnd: int, key: str) -> float:
    value = result.train_metrics_clientapp[rnd][key]  # type: ignore[attr-defined]
    assert isinstance(value, int | float)
    return float(value)


def _close(a: ArrayRecord, b: ArrayRecord, tol: float) -> None:
    x, y = arrays_to_numpy(a), arrays_to_numpy(b)
    assert list(x) == list(y)
    for k in x:
        assert np.all(np.isfinite(x[k]))
        np.testing.assert_allclose(x[k], y[k], atol=tol, err_msg=k)


def test_uplink_round_trip_matches_plain_fedavg() -> None:
    plain = _run(_fedavg(), _LocalGrid(4, lambda n: []))
    strategy = CompressedStrategy(_fedavg(), "sgq:bits=8")
    grid = _LocalGrid(4, lambda n: [compression_mod()])  # codec named by the server
    compressed = _run(strategy, grid)
    _close(compressed, plain, tol=0.02)
    # the counter travels exactly (RAW); FedAvg itself averages it in float64
    assert float(arrays_to_numpy(compressed)["bn.num_batches_tracked"][0]) == pytest.approx(15)
    assert strategy.fraction_train == 1.0  # attribute look-ups reach the inner strategy
    train_msgs = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    assert all(m.content[MARKER_KEY]["uplink"] == get_codec("sgq:bits=8").spec
               for m in train_msgs)


def test_round_metrics_count_bytes_and_failures() -> None:
    strategy = CompressedStrategy(_fedavg(), "sgq:bits=4")
    grid = _LocalGrid(4, lambda n: [compression_mod()])
    result = strategy.start(grid, numpy_to_arrays(_initial()), num_rounds=2)
    raw = sum(v.nbytes for v in _initial().values())
    assert _metric(result, 2, "failures-payload") == 0
    assert 0 < _metric(result, 2, "bytes-up") < 4 * raw / 4  # 4 clients, SGQ-4 > 4x smaller
    assert _metric(result, 2, "bytes-down") == 4 * raw  # plain downlink


def _corrupt(node: int, how: str) -> Mod:
    def mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, ctxt)
        if ctxt.node_id != node:
            return reply
        payload = bytearray(payload_of(reply.content.array_records["arrays"]))
        if how == "flip":
            payload[len(payload) // 2] ^= 0xFF
            data = bytes(payload)
        elif how == "truncate":
            data = bytes(payload[:-7])
        else:  # a sealed payload with a NaN value: only the finiteness check stops it
            data = bytes(payload)
            # fc.bias record: name, dtype, ndim, one u32 dim, scheme, u64 length, body
            at = data.index(b"fc.bias") + 7 + 1 + 1 + 4 + 1 + 8
            data = reseal(data[:at] + np.array([np.nan], "<f4").tobytes() + data[at + 4:])
        reply.content["arrays"] = payload_record(data)
        return reply
    return mod


@pytest.mark.parametrize("how", ["flip", "truncate", "nan"])
def test_corrupted_payload_dropped_and_counted(how: str) -> None:
    strategy = CompressedStrategy(_fedavg(), "fp32")
    grid = _LocalGrid(4, lambda n: [_corrupt(3, how), compression_mod()])
    result = strategy.start(grid, numpy_to_arrays(_initial()), num_rounds=1)
    honest = CompressedStrategy(_fedavg(), "fp32")
    grid2 = _LocalGrid(4, lambda n: [compression_mod()])
    grid2.nodes = [1, 2, 4]
    honest.inner.min_available_nodes = honest.inner.min_train_nodes = 3  # type: ignore[attr-defined]
    expected = honest.start(grid2, numpy_to_arrays(_initial()), num_rounds=1)
    _close(result.arrays, expected.arrays, tol=1e-6)  # node 3 never touched the model
    assert _metric(result, 1, "failures-payload") == 1
    assert strategy.payload_failures[1] == [3]


def test_non_finite_client_update_never_reaches_the_model() -> None:
    def nan_client(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, ctxt)
        if ctxt.node_id == 2:
            arrays = arrays_to_numpy(reply.content.array_records["arrays"])
            arrays["fc.weight"][0, 0] = np.inf
            reply.content["arrays"] = numpy_to_arrays(arrays)
        return reply

    strategy = CompressedStrategy(_fedavg(), "sgq")
    grid = _LocalGrid(4, lambda n: [compression_mod(), nan_client])
    out = _run(strategy, grid, rounds=1)
    assert all(np.isfinite(v).all() for v in arrays_to_numpy(out).values())


@pytest.mark.parametrize("downlink", ["sgq:bits=3", "uniform4", "topk:ratio=0.05"])
def test_lossy_downlink_server_and_clients_agree_bitwise(downlink: str) -> None:
    strategy = CompressedStrategy(_fedavg(fraction=0.5), "sgq", downlink=downlink)
    grid = _LocalGrid(4, lambda n: [compression_mod()])
    kinds: list[str] = []
    result = strategy.start(grid, numpy_to_arrays(_initial()), num_rounds=6)
    assert strategy.model is not None
    for msg in grid.sent:
        kinds.append(str(msg.content[MARKER_KEY]["down"]))
    assert "full" in kinds and "chain" in kinds  # keyframes and update chains both used
    chains = [len(m.content.array_records["arrays"]) for m in grid.sent
              if m.content[MARKER_KEY]["down"] == "chain"]
    assert max(chains) >= 2  # a node that skipped rounds caught up through a chain
    # every node that is up to date holds exactly the server's decoded model
    in_sync = [n for n, v in strategy._node_version.items() if v == strategy.version]
    assert in_sync
    for n in in_sync:
        ref = arrays_to_numpy(grid.contexts[n].state.array_records[REF_KEY])
        for k, v in strategy.model.items():
            assert v.tobytes() == ref[k].tobytes(), (n, k)
    assert _metric(result, 6, "bytes-down") > 0


def test_lossy_downlink_uses_chains_smaller_than_keyframes() -> None:
    strategy = CompressedStrategy(_fedavg(), "sgq", downlink="sgq:bits=4")
    grid = _LocalGrid(4, lambda n: [compression_mod()])
    result = strategy.start(grid, numpy_to_arrays(_initial()), num_rounds=3)
    raw = sum(v.nbytes for v in _initial().values())
    assert _metric(result, 1, "bytes-down") >= 4 * raw  # keyframes
    assert _metric(result, 3, "bytes-down") < 4 * raw / 3  # one SGQ-4 step
    # and the run still converges close to the plain one
    plain = _run(_fedavg(), _LocalGrid(4, lambda n: []))
    _close(result.arrays, plain, tol=0.1)


def test_stale_node_gets_a_keyframe_and_resyncs() -> None:
    strategy = CompressedStrategy(_fedavg(), "sgq", downlink="sgq:bits=4")
    grid = _LocalGrid(4, lambda n: [compression_mod()])
    strategy.start(grid, numpy_to_arrays(_initial()), num_rounds=2)
    grid.contexts[2] = Context(1, 2, {}, RecordDict(), {})  # node 2 lost its state
    result = strategy.start(grid, numpy_to_arrays(_initial()), num_rounds=2)
    # its first reply is an error (stale reference), then it is sent a keyframe
    errors = [r for r in grid.replies if r.has_error()]
    assert len(errors) == 1 and errors[0].metadata.src_node_id == 2
    assert "stale reference" in str(errors[0].error.reason)
    assert 2 in strategy._node_version and strategy._node_version[2] == strategy.version
    ref = arrays_to_numpy(grid.contexts[2].state.array_records[REF_KEY])
    assert all(ref[k].tobytes() == v.tobytes() for k, v in strategy.model.items())  # type: ignore[union-attr]
    assert all(np.isfinite(v).all() for v in arrays_to_numpy(result.arrays).values())


def test_fedadam_inner_and_evaluate_pass_through() -> None:
    inner = FedAdam(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=3,
                    min_evaluate_nodes=3, min_available_nodes=3)
    strategy = CompressedStrategy(inner, "blockwise4-ef", downlink="fp16")
    grid = _LocalGrid(3, lambda n: [compression_mod()])
    result = strategy.start(grid, numpy_to_arrays(_initial()), num_rounds=2)
    assert all(np.isfinite(v).all() for v in arrays_to_numpy(result.arrays).values())
    assert result.evaluate_metrics_clientapp[2]["loss"] == pytest.approx(0.5)
    evals = [m for m in grid.sent if m.metadata.message_type == MessageType.EVALUATE]
    assert evals and all(MARKER_KEY not in m.content for m in evals)


def test_mod_passes_non_train_messages_and_fixed_codec() -> None:
    mod = compression_mod("uniform8")
    ctxt = Context(1, 7, {}, RecordDict(), {})
    ev = Message(RecordDict({"arrays": numpy_to_arrays(_initial()),
                             "config": ConfigRecord({"a": 1})}), dst_node_id=7,
                 message_type=MessageType.EVALUATE)
    out = mod(ev, ctxt, _evaluate)
    assert out.content["metrics"]["loss"] == 0.5
    tr = Message(RecordDict({"arrays": numpy_to_arrays(_initial()),
                             "config": ConfigRecord({"a": 1})}), dst_node_id=7,
                 message_type=MessageType.TRAIN)
    reply = mod(tr, ctxt, _train)
    assert reply.content[MARKER_KEY]["up"] == get_codec("uniform8").spec
    assert list(reply.content["arrays"].keys()) == [PAYLOAD_KEY]


def test_through_a_flower_client_app_with_lossy_downlink() -> None:
    app = ClientApp(mods=[compression_mod()])
    app.train()(_train)
    strategy = CompressedStrategy(_fedavg(), "sgq:bits=3", downlink="sgq:bits=3")
    grid = _LocalGrid(4, lambda n: [], client_app=app)
    result = strategy.start(grid, numpy_to_arrays(_initial()), num_rounds=3)
    assert _metric(result, 3, "failures-payload") == 0
    assert strategy.model is not None
    for n in grid.nodes:
        ref = arrays_to_numpy(grid.contexts[n].state.array_records[REF_KEY])
        assert all(ref[k].tobytes() == v.tobytes() for k, v in strategy.model.items())


def test_lossy_keyframes_stay_bitwise_known_to_the_server() -> None:
    strategy = CompressedStrategy(_fedavg(fraction=0.5), "sgq", downlink="sgq:bits=3",
                                  keyframe="sgq:bits=8")
    exact = CompressedStrategy(_fedavg(fraction=0.5), "sgq", downlink="sgq:bits=3")
    grid, grid_exact = (_LocalGrid(4, lambda n: [compression_mod()]) for _ in range(2))
    arrays = numpy_to_arrays(_initial())
    down = {"lossy": 0.0, "exact": 0.0}
    for _ in range(5):
        random.seed(len(grid.sent))
        result = strategy.start(grid, arrays, num_rounds=1)
        random.seed(len(grid_exact.sent))
        down["exact"] += _metric(exact.start(grid_exact, arrays, num_rounds=1), 1, "bytes-down")
        down["lossy"] += _metric(result, 1, "bytes-down")
        assert _metric(result, 1, "failures-payload") == 0
        for node, ref in strategy._sent_ref.items():  # what each client holds, bit for bit
            held = arrays_to_numpy(grid.contexts[node].state.array_records[REF_KEY])
            assert all(held[k].tobytes() == v.tobytes() for k, v in ref.items())
        arrays = result.arrays
    kinds = [m.content[MARKER_KEY]["version"] for m in grid.sent]
    assert -1 in kinds  # lossy keyframes were sent (and never confirmed as versions)
    assert down["lossy"] < down["exact"]
