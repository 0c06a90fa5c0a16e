"""Split training's device side: run the first layers, send compressed features, backprop.

The paper's setting (edge-cloud collaborative training): a device holds the first layers
of the model (up to and including the child module named by ``split.cut``, SmallCNN's
``features``), the server the rest. A round is ``split.steps`` split steps, pipelined
into ``steps + 1`` ``train`` messages told apart by the ``config`` entries ``phase`` and
``step``:

``phase = "forward"``
    ``arrays`` holds the device-side weights. The device draws the batch of step 0 from
    its shard (seeded by run seed, partition, round and step, so every draw is
    reproducible), runs its layers and replies with ``features``: the codec payload of the
    feature maps as a ``uint8`` array (``split.codec``, SGQ with the feature layout by
    default), and ``labels``. It keeps the weights in its ``Context.state``.
``phase = "backward"``, ``step = s``
    ``arrays`` holds ``grad``: the payload of the loss gradient with respect to step
    ``s``'s features (``split.grad_codec``). The device decodes it, backpropagates through
    its layers and takes one SGD step; if ``s + 1 < steps`` it replies with the features
    of step ``s + 1`` (as above, from the updated weights), else with its weights in
    ``arrays``, which the server averages over the round's devices.

The device recomputes its forward pass in the backward phase (the emulation keeps no
activations between two messages; the weights and the batch are the same, so the result
is); the cost model charges the forward MACs to the first phase and the backward MACs to
the second, as a real device that kept its activations would spend them. Memory is that
of a whole training step of the device-side layers. Error feedback is off for both
codecs: each step's features and gradients are new tensors, a residual of the last batch
would only add noise to the next.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from clients.client_app import _spec, build_client_model, device_of, fleet_data
from clients.codecs import Codec, get_codec
from clients.spec import ClientSpec
from devices.cost import check_fit, estimate_training, training_step_cost
from devices.errors import ConfigError, PayloadError
from devices.profiles import DeviceProfile

__all__ = [
    "SplitSettings",
    "app",
    "decode_array",
    "device_forward",
    "encode_array",
    "split_model",
    "split_settings",
]

app = ClientApp()

_KEYS = {"codec", "grad_codec", "cut", "batch_size", "lr", "fraction", "steps"}


@dataclasses.dataclass(frozen=True)
class SplitSettings:
    """The ``[split]`` table: codecs of the two directions, the cut, the step's size.

    ``batch_size`` and ``lr`` default to ``train``'s; ``fraction`` (of the fleet trained
    per round) to ``strategy.fraction_train``.
    """

    codec: str = "sgq:layout=feature"
    grad_codec: str = "sgq:layout=feature"
    cut: str = "features"
    batch_size: int = 0
    lr: float = 0.0
    fraction: float = 0.0
    steps: int = 4


def split_settings(table: Mapping[str, Any] | None) -> SplitSettings:
    """Validated :class:`SplitSettings` from a ``[split]`` table (``None``: defaults).

    Raises
    ------
    ConfigError
        On an unknown key, a codec spec that does not parse, or a bad number.
    """
    t = dict(table or {})
    unknown = sorted(set(t) - _KEYS)
    if unknown:
        raise ConfigError(f"split: unknown field(s) {unknown}; expected some of {sorted(_KEYS)}")
    s = SplitSettings(**t)
    for key in ("codec", "grad_codec"):
        try:
            _codec(str(getattr(s, key)))
        except Exception as exc:  # the codec registry's own error names the option
            raise ConfigError(f"split.{key}: {exc}") from exc
    if not isinstance(s.batch_size, int) or s.batch_size < 0:
        raise ConfigError(f"split.batch_size: expected an integer >= 1, got {s.batch_size!r}")
    if not isinstance(s.steps, int) or s.steps < 1:
        raise ConfigError(f"split.steps: expected an integer >= 1, got {s.steps!r}")
    if not isinstance(s.lr, (int, float)) or s.lr < 0:
        raise ConfigError(f"split.lr: expected a number > 0, got {s.lr!r}")
    if not isinstance(s.fraction, (int, float)) or not 0 <= s.fraction <= 1:
        raise ConfigError(f"split.fraction: expected a number in (0, 1], got {s.fraction!r}")
    return s


@functools.lru_cache(maxsize=32)
def _codec(spec: str) -> Codec:
    """The codec of ``spec`` with error feedback off (see the module docstring)."""
    codec = get_codec(spec)
    if "ef=1" in codec.spec.split(","):
        codec = get_codec(codec.spec.replace("ef=1", "ef=0"))
    return codec


def split_model(model: nn.Module, cut: str) -> tuple[nn.Sequential, nn.Sequential]:
    """The device part (children up to and including ``cut``) and the server part.

    The model's forward must be the composition of its children in order (SmallCNN:
    ``features``, ``pool``, ``classifier``). The parts share the model's modules.

    Raises
    ------
    ConfigError
        When the model has no child named ``cut``, or nothing after it.
    """
    children = list(model.named_children())
    names = [n for n, _ in children]
    if cut not in names or names.index(cut) == len(names) - 1:
        raise ConfigError(f"split.cut: {cut!r} is not a child of {type(model).__name__} with "
                          f"layers after it; expected one of {names[:-1]}")
    i = names.index(cut) + 1
    return (nn.Sequential(OrderedDict(children[:i])), nn.Sequential(OrderedDict(children[i:])))


def encode_array(codec_spec: str, t: torch.Tensor) -> np.ndarray:
    """``t`` encoded with the codec as a ``uint8`` array (a message's payload)."""
    arr = t.detach().to("cpu", torch.float32).contiguous().numpy()
    return np.frombuffer(_codec(codec_spec).encode({"t": arr}), dtype=np.uint8).copy()


def decode_array(codec_spec: str, payload: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """The tensor of ``shape`` a payload from :func:`encode_array` holds.

    Raises
    ------
    PayloadError
        When the payload is not a ``uint8`` array or does not decode to ``shape``.
    """
    if payload.dtype != np.uint8 or payload.ndim != 1:
        raise PayloadError(f"split payload: expected a 1-D uint8 array, got {payload.dtype} "
                           f"{payload.shape}")
    out = _codec(codec_spec).decode(payload.tobytes(), expected_shapes={"t": shape})["t"]
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))


def _device_part(spec: ClientSpec, cut: str, weights: ArrayRecord | None) -> nn.Sequential:
    data = fleet_data(spec)
    device, _ = split_model(build_client_model(spec, data), cut)
    if weights is not None:
        device.load_state_dict(weights.to_torch_state_dict())
    return device


def _batch(spec: ClientSpec, pid: int, server_round: int, step: int, batch: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = fleet_data(spec).device_data(pid)
    rng = np.random.default_rng([spec.seed, pid, server_round, step])
    idx = rng.choice(len(x), size=min(batch, len(x)), replace=False)
    return torch.as_tensor(x[idx], dtype=torch.float32), torch.as_tensor(y[idx]).long()


def device_forward(spec: ClientSpec, settings: SplitSettings, pid: int, server_round: int,
                   weights: ArrayRecord | None, step: int = 0
                   ) -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
    """The device's features of a step's batch, their payload (as sent), the labels."""
    device = _device_part(spec, settings.cut, weights)
    x, y = _batch(spec, pid, server_round, step, _batch_size(spec, settings))
    with torch.no_grad():
        feats = device(x)
    return feats, encode_array(settings.codec, feats), y


def _batch_size(spec: ClientSpec, settings: SplitSettings) -> int:
    return settings.batch_size or spec.train.batch_size


@functools.lru_cache(maxsize=32)
def _phase_costs(spec: ClientSpec, cut: str, batch: int, profile: DeviceProfile
                 ) -> tuple[tuple[float, float], tuple[float, float], int]:
    """(seconds, joules) of the forward and of the backward+update phase, and peak bytes.

    Raises
    ------
    BudgetError
        When a training step of the device-side layers does not fit the device.
    """
    with torch.random.fork_rng(devices=[]):
        device = _device_part(spec, cut, None)
        cost = training_step_cost(device, fleet_data(spec).input_shape, batch,
                                  optimizer="sgd", momentum=0.0)
    check_fit(cost, profile)
    est = estimate_training(cost, profile, steps=1)
    share = cost.fwd_macs / max(cost.macs, 1)
    fwd = (est.compute_s * share, est.energy_j * share)
    bwd = (est.compute_s - fwd[0], est.energy_j - fwd[1])
    return fwd, bwd, int(est.peak_mem_bytes)


def _settings(run_config: Mapping[str, Any]) -> SplitSettings:
    table = {k[len("split."):]: v for k, v in run_config.items() if k.startswith("split.")}
    return split_settings(table)


def _features_reply(msg: Message, settings: SplitSettings, feats: torch.Tensor,
                    y: torch.Tensor, cost: tuple[float, float], peak: int) -> Message:
    payload = encode_array(settings.codec, feats)
    return Message(RecordDict({
        "arrays": ArrayRecord(OrderedDict([("features", Array(payload)),
                                           ("labels", Array(y.numpy().astype(np.int16)))])),
        "metrics": MetricRecord({"num-examples": len(y), "compute-s": cost[0],
                                 "energy-j": cost[1], "peak-mem-bytes": peak, "measured": 0,
                                 "payload-bytes": int(payload.size)}),
    }), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One phase of a split step (see the module docstring)."""
    spec = _spec(context.run_config)
    settings = _settings(context.run_config)
    pid, profile = device_of(spec, context.node_config)
    config = msg.content.config_records.get("config", ConfigRecord())
    phase = str(config.get("phase", ""))
    server_round = int(config.get("server-round", 0))  # type: ignore[arg-type]
    step = int(config.get("step", 0))  # type: ignore[arg-type]
    steps = int(config.get("steps", 1))  # type: ignore[arg-type]
    batch = _batch_size(spec, settings)
    fwd, bwd, peak = _phase_costs(spec, settings.cut, batch, profile)
    if phase == "forward":
        weights = msg.content.array_records["arrays"]
        device = _device_part(spec, settings.cut, weights)
        context.state["split-weights"] = weights
        x, y = _batch(spec, pid, server_round, 0, batch)
        with torch.no_grad():
            feats = device(x)
        return _features_reply(msg, settings, feats, y, fwd, peak)
    if phase != "backward":
        raise PayloadError(f"split: config 'phase' is {phase!r}; expected 'forward' or "
                           "'backward'")
    if "split-weights" not in context.state.array_records:
        raise PayloadError("split: a backward phase arrived before any forward phase")
    device = _device_part(spec, settings.cut, context.state.array_records["split-weights"])
    x, y = _batch(spec, pid, server_round, step, batch)
    feats = device(x)
    grad = decode_array(settings.grad_codec, msg.content.array_records["arrays"]["grad"].numpy(),
                        tuple(feats.shape))
    lr = float(config.get("lr", settings.lr or spec.train.lr))  # type: ignore[arg-type]
    opt = torch.optim.SGD(device.parameters(), lr=lr)
    opt.zero_grad()
    feats.backward(grad)
    opt.step()
    weights = ArrayRecord(device.state_dict())
    context.state["split-weights"] = weights
    if step + 1 < steps:
        x, y = _batch(spec, pid, server_round, step + 1, batch)
        with torch.no_grad():
            nxt = device(x)
        return _features_reply(msg, settings, nxt, y, (bwd[0] + fwd[0], bwd[1] + fwd[1]), peak)
    return Message(RecordDict({
        "arrays": weights,
        "metrics": MetricRecord({"num-examples": steps * len(y), "compute-s": bwd[0],
                                 "energy-j": bwd[1], "peak-mem-bytes": peak, "measured": 0}),
    }), reply_to=msg)
