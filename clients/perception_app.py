"""tinyfleet's perception ``ClientApp``: fine-tune on a device's video stream, then run a
PASS inference duty cycle at the stream's frame rate and report what it cost.

A run config with a ``[perception]`` table (see :class:`PerceptionSpec`) selects this app
(``sim.runner``). The federated model is a :class:`~clients.pass_skip.PerceptionNet`; with
``gate = "learned"`` the arrays also hold each block's learned PASS gate under
``gates.{block}.{name}``, in the same ``ArrayRecord``, so FedAvg aggregates gates and
weights alike.

Each device ``pid`` owns a deterministic stream (:func:`device_stream`: seed from the run
seed and ``pid``; static background or high motion per config). Round ``r`` uses segment
``r`` of it: the first ``train_frames`` labelled frames fine-tune the network
(:func:`fine_tune`: Adam, then a batch-norm recalibration pass) and then the gates, backbone
frozen, as ``clients.pass_skip.train_gates``; the next ``duty_frames`` are the duty cycle,
run frame by frame through ``clients.pass_skip.prepare`` (``gate = "off"`` computes every
frame whole).

Precision: ``perception.precision = "int8"`` (or ``train.precision = "int8"``, the switch
the other apps read) fine-tunes with Octo's INT8 training (``clients.int8.prepare``: int8
forward and backward of every conv/linear layer, LAC penalty in the loss). The federated
arrays stay those of the FP32 ``PerceptionNet``: after the steps each layer's FP32 master
weight is kept and its LAC correction folded into its bias (LAC is a per-channel offset,
``bias + alpha * mu + o``, as ``clients.int8.export`` folds it). What runs after the
fine-tuning stays FP32 in both precisions, and is costed so: the batch-norm recalibration,
the gates' training (``clients.pass_skip`` has no int8 path) and the PASS duty cycle.

Cost model (never host time): training from ``devices.cost.training_step_cost`` and
``estimate_training``; an INT8 step is costed as ``clients.client_app`` costs one (MACs of
the FP32 graph at the profile's ``int8`` throughput, memory from a traced step of the
prepared model, weight storage from its int8 export). A device whose training step does
not fit its RAM does not train (``trained`` = 0, ``num-examples`` = 0, so FedAvg gives it
no weight) but still runs the duty cycle. Inference is credited only the executed MACs: per
frame ``executed MACs / profile.macs_per_s["fp32"]``; a device keeps up when that is at
most the frame deadline ``1 / fps``. The reply's ``compute-s`` is training plus duty-cycle
time.

Reply metrics: ``num-examples``, ``trained``, ``train-loss``, ``compute-s``, ``energy-j``,
``train-compute-s``, ``infer-s``, ``infer-energy-j``, ``executed-macs``, ``full-macs``,
``mac-ratio``, ``frame-time-s``, ``deadline-s``, ``keeps-up``, ``stream-acc``,
``duty-frames``, ``partition-id``, ``measured`` (0), ``int8`` (1 when the fine-tuning ran
in INT8).
"""

from __future__ import annotations

import dataclasses
import functools
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from clients.client_app import _spec, device_of
from clients.pass_skip import (
    LearnedGate,
    PassModel,
    PerceptionNet,
    prepare,
    train_gates,
    train_perception,
)
from clients.spec import expand_run_config, unflatten
from clients.video import HIGH_MOTION, STATIC_BACKGROUND, VideoStream, generate_stream
from devices.cost import (
    StepCost,
    check_fit,
    estimate_training,
    inference_cost,
    step_time_s,
    training_step_cost,
    with_memory_of,
)
from devices.errors import BudgetError, ConfigError
from devices.profiles import DeviceProfile

__all__ = [
    "GATE_PREFIX",
    "PerceptionSpec",
    "app",
    "build_global_state",
    "device_stream",
    "duty_cycle",
    "fine_tune",
    "fine_tune_cost",
    "perception_of",
]

app = ClientApp()

GATE_PREFIX = "gates."
"""Prefix of the learned gates' arrays in the federated ``ArrayRecord``."""

_STREAMS = {"static": STATIC_BACKGROUND, "high-motion": HIGH_MOTION}
_PRECISIONS = ("fp32", "int8")


@dataclasses.dataclass(frozen=True)
class PerceptionSpec:
    """The ``[perception]`` table: stream, model, PASS and duty-cycle settings.

    Parameters
    ----------
    stream : {"static", "high-motion"}
        ``clients.video.STATIC_BACKGROUND`` or ``HIGH_MOTION``, resized to ``size``.
    size : int
        Frame side in pixels (square grey frames).
    width : int
        ``PerceptionNet`` width.
    fps : float
        Frame rate of the stream; the per-frame deadline is ``1 / fps``.
    duty_frames : int
        Frames of the inference duty cycle per round.
    train_frames : int
        Labelled frames fine-tuned on per round (a multiple of ``clip_len``).
    train_steps, batch_size, lr : int, int, float
        Fine-tuning of the network (Adam, :func:`fine_tune`).
    precision : {"fp32", "int8"}
        Arithmetic of the fine-tuning steps ("int8": ``clients.int8``, Octo). Unset, it
        follows ``train.precision``; both set and different is an error.
    gate : {"off", "threshold", "learned"}
        PASS gate of the duty cycle ("off": every frame computed whole).
    patch, threshold, keyframe_every : int, float, int
        As ``clients.pass_skip.prepare``.
    gate_steps, gate_lr, sparsity, clip_len : int, float, float, int
        Gate training per round (learned gate only; clips of ``clip_len`` frames).
    switch_every : int
        Frames between digit changes of the stream (each change a new class and a new
        handwritten sample). It sets how many different samples a round's labelled frames
        hold (``train_frames / switch_every``): with 4, 32 frames held 8 and FedAvg stalled
        near 0.33 after 4 rounds (each device fitting its 8); ``configs/perception.toml``
        uses 1. Too long a period and a round shows one class, which collapses the net.
    """

    stream: str = "static"
    size: int = 48
    width: int = 16
    fps: float = 30.0
    duty_frames: int = 32
    train_frames: int = 32
    train_steps: int = 20
    batch_size: int = 16
    lr: float = 2e-3
    precision: str = "fp32"
    gate: str = "threshold"
    patch: int = 8
    threshold: float = 0.02
    keyframe_every: int = 16
    gate_steps: int = 10
    gate_lr: float = 1e-2
    sparsity: float = 1.0
    clip_len: int = 8
    switch_every: int = 4

    def __post_init__(self) -> None:
        if self.stream not in _STREAMS:
            raise ConfigError(f"perception.stream: expected one of {sorted(_STREAMS)}, "
                              f"got {self.stream!r}")
        if self.gate not in ("off", "threshold", "learned"):
            raise ConfigError(f"perception.gate: expected 'off', 'threshold' or 'learned', "
                              f"got {self.gate!r}")
        if self.precision not in _PRECISIONS:
            raise ConfigError(f"perception.precision: expected one of {_PRECISIONS}, "
                              f"got {self.precision!r}")
        for name in ("size", "width", "duty_frames", "train_frames", "train_steps",
                     "batch_size", "patch", "gate_steps", "clip_len", "switch_every"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"perception.{name}: expected an integer >= 1, "
                                  f"got {getattr(self, name)!r}")
        for name in ("fps", "lr", "gate_lr"):
            if not float(getattr(self, name)) > 0:
                raise ConfigError(f"perception.{name}: expected > 0, got {getattr(self, name)!r}")
        if self.train_frames % self.clip_len:
            raise ConfigError(f"perception.train_frames: expected a multiple of clip_len "
                              f"({self.clip_len}), got {self.train_frames}")

    @property
    def segment(self) -> int:
        """Frames of the stream one round uses (fine-tuning, then the duty cycle)."""
        return self.train_frames + self.duty_frames

    @property
    def deadline_s(self) -> float:
        """Time budget of one frame."""
        return 1.0 / self.fps


@functools.lru_cache(maxsize=4)
def _perception_cached(key: tuple[tuple[str, Any], ...]) -> tuple[PerceptionSpec, int, int]:
    doc = unflatten(expand_run_config(dict(key)))
    table = doc.get("perception")
    if not isinstance(table, Mapping):
        raise ConfigError("perception: expected a [perception] table in the run config")
    known = {f.name for f in dataclasses.fields(PerceptionSpec)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"perception: unknown keys {unknown}; expected some of {sorted(known)}")
    table = dict(table)
    train = doc.get("train")
    inherited = train.get("precision") if isinstance(train, Mapping) else None
    if inherited is not None:
        own = table.setdefault("precision", inherited)
        if own != inherited:
            raise ConfigError(f"perception.precision: {own!r} disagrees with train.precision "
                              f"{inherited!r}; set one of them (or both alike)")
    return PerceptionSpec(**table), int(doc.get("seed", 0)), int(doc.get("rounds", 1))


def perception_of(run_config: Mapping[str, Any]) -> tuple[PerceptionSpec, int, int]:
    """The perception settings, the run seed and the rounds a flat run config gives."""
    return _perception_cached(tuple(sorted(run_config.items())))


@functools.lru_cache(maxsize=64)
def device_stream(spec: PerceptionSpec, seed: int, rounds: int, pid: int) -> VideoStream:
    """Device ``pid``'s stream: one segment per round, deterministic in (seed, pid).

    Sprites come from the digits' train split; the server tests on the test split.
    """
    base = _STREAMS[spec.stream]
    config = dataclasses.replace(base, num_frames=spec.segment * max(rounds, 1),
                                 height=spec.size, width=spec.size, digit_split="train",
                                 switch_every=spec.switch_every)
    return generate_stream(config, seed * 10_007 + pid + 1)


def _segment(stream: VideoStream, spec: PerceptionSpec, server_round: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    segments = len(stream) // spec.segment
    start = ((max(server_round, 1) - 1) % segments) * spec.segment
    frames = torch.from_numpy(stream.frames[start : start + spec.segment])
    labels = torch.from_numpy(stream.labels[start : start + spec.segment])
    return frames, labels


def _prepare(net: PerceptionNet, spec: PerceptionSpec) -> PassModel:
    gate = "learned" if spec.gate == "learned" else "threshold"
    # "off": every frame a key frame, computed whole (executed MACs = full MACs).
    keyframe_every = 1 if spec.gate == "off" else spec.keyframe_every
    return prepare(net, patch=spec.patch, gate=gate, threshold=spec.threshold,  # type: ignore[arg-type]
                   keyframe_every=keyframe_every)


def _gate_state(model: PassModel) -> dict[str, torch.Tensor]:
    return OrderedDict(
        (f"{GATE_PREFIX}{b}.{k}", v.detach().clone())
        for b, block in enumerate(model.patch_blocks) if isinstance(block.gate, LearnedGate)
        for k, v in block.gate.state_dict().items()
    )


def _load_gates(model: PassModel, state: Mapping[str, torch.Tensor]) -> None:
    for b, block in enumerate(model.patch_blocks):
        prefix = f"{GATE_PREFIX}{b}."
        own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if own:
            block.gate.load_state_dict(own)


def _split_state(state: Mapping[str, torch.Tensor]
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    net = {k: v for k, v in state.items() if not k.startswith(GATE_PREFIX)}
    gates = {k: v for k, v in state.items() if k.startswith(GATE_PREFIX)}
    return net, gates


def build_global_state(spec: PerceptionSpec, seed: int) -> dict[str, torch.Tensor]:
    """The initial federated state: the network's and (learned gate) the gates' arrays."""
    torch.manual_seed(seed)
    net = PerceptionNet(in_channels=1, num_classes=10, width=spec.width)
    state: dict[str, torch.Tensor] = OrderedDict(net.state_dict())
    if spec.gate == "learned":
        state.update(_gate_state(_prepare(net.eval(), spec)))
    return state


def duty_cycle(net: PerceptionNet, frames: torch.Tensor, labels: torch.Tensor,
               spec: PerceptionSpec, profile: DeviceProfile,
               gates: Mapping[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Run ``frames`` through PASS one by one; the emulated cost of what really ran.

    Returns executed and full MACs, per-frame emulated time (executed MACs at the
    profile's FP32 rate), the duty cycle's time and energy, whether the device keeps up
    with ``spec.fps`` and the accuracy on the labelled frames.
    """
    model = _prepare(net.eval(), spec)
    if gates:
        _load_gates(model, gates)
    model.reset()
    model.reset_stats()
    correct = seen = 0
    for frame, label in zip(frames, labels, strict=True):
        out = model(frame)
        if int(label) >= 0:
            seen += 1
            correct += int(int(out.argmax(-1)) == int(label))
    stats = model.stats()
    n = max(int(stats["frames"]), 1)
    infer_s = float(stats["executed_macs"]) / profile.macs_per_s["fp32"]
    frame_s = infer_s / n
    return {
        "executed-macs": float(stats["executed_macs"]),
        "full-macs": float(stats["full_macs"]),
        "mac-ratio": float(stats["mac_ratio"]),
        "infer-s": infer_s,
        "infer-energy-j": infer_s * profile.power_compute_w,
        "frame-time-s": frame_s,
        "deadline-s": spec.deadline_s,
        "keeps-up": float(frame_s <= spec.deadline_s),
        "stream-acc": correct / seen if seen else 0.0,
        "duty-frames": float(n),
    }


def _int8_prepare(net: PerceptionNet) -> nn.Module:
    from clients import int8

    return int8.prepare(net)


@functools.lru_cache(maxsize=8)
def fine_tune_cost(spec: PerceptionSpec) -> tuple[StepCost, int, StepCost, StepCost]:
    """The cost-model steps of a round's training, per spec (not per device).

    Returns
    -------
    step : StepCost
        One fine-tuning step (batch ``batch_size``) in ``spec.precision``. INT8 as
        ``clients.client_app`` costs it: MACs and layers of the FP32 graph with
        ``dtype="int8"`` (torch's counter does not see the int8 kernels), the memory terms
        of a traced step of the ``clients.int8``-prepared model.
    storage : int
        Bytes of weights a device stores (the int8 export's under INT8).
    fp32_step : StepCost
        The same step in FP32: what a gate-training frame costs (the gates train in FP32).
    recalibration : StepCost
        The batch-norm recalibration pass: one forward of the ``train_frames`` frames.
    """
    shape = (1, spec.size, spec.size)
    with torch.random.fork_rng(devices=[]):
        net = PerceptionNet(1, 10, spec.width)
        fp32 = training_step_cost(net, shape, spec.batch_size, optimizer="adam")
        recalibration = inference_cost(net, shape, spec.train_frames)
        storage = sum(p.numel() * p.element_size() for p in net.parameters())
        step = fp32
        if spec.precision == "int8":
            from clients import int8

            prepared = _int8_prepare(net)
            measured = training_step_cost(prepared, shape, spec.batch_size, optimizer="adam",
                                          dtype="int8")
            twin = training_step_cost(net, shape, spec.batch_size, optimizer="adam",
                                      dtype="int8")
            step = with_memory_of(twin, measured)
            storage = int(int8.exported_size_bytes(int8.export(prepared)))
    return step, storage, fp32, recalibration


@functools.lru_cache(maxsize=16)
def _train_cost(spec: PerceptionSpec, profile: DeviceProfile
                ) -> tuple[float, float, float, float, bool]:
    """Seconds of one fine-tuning step, of one FP32 step (a gate-training batch), of the
    recalibration pass, the device's compute power, and whether the step fits."""
    step, storage, fp32, recalibration = fine_tune_cost(spec)
    try:
        check_fit(step, profile, weight_storage_bytes=storage)
    except BudgetError:
        return 0.0, 0.0, 0.0, profile.power_compute_w, False
    est = estimate_training(step, profile, steps=1)
    return (est.compute_s, step_time_s(fp32, profile), step_time_s(recalibration, profile),
            profile.power_compute_w, True)


_RECALIBRATION_CHUNK = 256


def _recalibrate(net: PerceptionNet, frames: torch.Tensor) -> None:
    """Reset every batch norm's running statistics to those of ``net`` on ``frames``.

    Twenty-odd Adam steps move the weights faster than the running statistics follow
    (momentum 0.1): measured on this config, the fine-tuned net in eval mode got 0-25% of
    its own training frames right in round 1 at a training loss of 0.2-0.5. One forward
    pass in training mode with a cumulative average (``momentum=None``) makes them the
    statistics of the final weights on this round's frames.
    """
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    net.train()
    with torch.no_grad():
        for chunk in frames.split(_RECALIBRATION_CHUNK):  # a cumulative mean over chunks
            net(chunk)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    net.eval()


def _fold_int8(trained: nn.Module, net: PerceptionNet) -> None:
    """Copy an INT8-trained model's weights into the FP32 ``net``, LAC folded into biases."""
    from clients import int8
    from clients.int8.functional import lac_bias

    state = trained.state_dict()
    for name, module in trained.named_modules():
        if isinstance(module, int8.Int8Conv2d | int8.Int8Linear):
            prefix = f"{name}." if name else ""
            state.pop(prefix + "lac", None)
            bias = lac_bias(module.bias, module.lac)
            if bias is not None:
                state[prefix + "bias"] = bias.detach().clone()
    net.load_state_dict(state)


def fine_tune(net: PerceptionNet, frames: torch.Tensor, labels: torch.Tensor,
              spec: PerceptionSpec, seed: int) -> tuple[list[float], nn.Module]:
    """Fine-tune ``net`` in place on labelled frames; returns the losses and the module
    that ran the steps (``net`` itself in FP32, its ``clients.int8``-prepared copy in
    INT8, whose weights, LAC folded in, are then copied back into ``net``).

    ``train_steps`` Adam steps on random batches of ``batch_size`` labelled frames
    (``clients.pass_skip.train_perception``), the LAC penalty added under INT8;
    then :func:`_recalibrate` on the frames, in FP32, as the net will infer.
    """
    int8_mode = spec.precision == "int8"
    model: nn.Module = _int8_prepare(net) if int8_mode else net
    extra = None
    if int8_mode:
        from clients import int8

        extra = int8.lac_penalty
    losses = train_perception(model, frames, labels, steps=spec.train_steps,
                              batch_size=spec.batch_size, lr=spec.lr, seed=seed,
                              extra_loss=extra)
    if int8_mode:
        _fold_int8(model, net)
    _recalibrate(net, frames[labels >= 0])
    return losses, model


def train_on_stream(run_config: Mapping[str, Any], pid: int, profile: DeviceProfile,
                    arrays: ArrayRecord, server_round: int) -> tuple[ArrayRecord, MetricRecord]:
    """Fine-tune on this round's labelled frames, then run the duty cycle (the pure core
    of the ``train`` handler)."""
    spec, seed, rounds = perception_of(run_config)
    stream = device_stream(spec, seed, rounds, pid)
    frames, labels = _segment(stream, spec, server_round)
    train_x, train_y = frames[: spec.train_frames], labels[: spec.train_frames]
    duty_x, duty_y = frames[spec.train_frames :], labels[spec.train_frames :]
    net_state, gate_state = _split_state(arrays.to_torch_state_dict())
    net = PerceptionNet(1, 10, spec.width)
    net.load_state_dict(net_state)
    step_s, fp32_s, recal_s, power_w, fits = _train_cost(spec, profile)
    loss = float("nan")
    train_s = 0.0
    if fits and bool((train_y >= 0).any()):
        rng_seed = seed * 1_000_003 + pid * 1_009 + server_round
        losses, _ = fine_tune(net, train_x, train_y, spec, rng_seed)
        loss = float(np.mean(losses))
        train_s = step_s * spec.train_steps + recal_s
        if spec.gate == "learned":
            model = _prepare(net.eval(), spec)
            _load_gates(model, gate_state)
            clips = train_x.reshape(-1, spec.clip_len, *train_x.shape[1:])
            clip_y = train_y.reshape(-1, spec.clip_len)
            history = train_gates(model, clips, clip_y, steps=spec.gate_steps,
                                  batch_size=clips.shape[0], lr=spec.gate_lr,
                                  sparsity=spec.sparsity, seed=rng_seed)
            gate_state = _gate_state(model)
            # The gates' steps run clips through every block, in FP32: cost them as frames
            # of the network's FP32 training step (an upper bound; only the gates get
            # gradients).
            gate_frames = spec.gate_steps * clips.shape[0] * spec.clip_len
            train_s += fp32_s * gate_frames / spec.batch_size
            loss = float(np.mean([h["loss"] for h in history]))
    train_j = train_s * power_w
    duty = duty_cycle(net, duty_x, duty_y, spec, profile, gate_state)
    state: dict[str, torch.Tensor] = OrderedDict(net.state_dict())
    state.update(gate_state)
    metrics = MetricRecord({
        "num-examples": spec.train_frames if fits else 0,
        "trained": int(fits),
        "train-loss": loss if fits else 0.0,
        "train-compute-s": train_s,
        "compute-s": train_s + duty["infer-s"],
        "energy-j": train_j + duty["infer-energy-j"],
        "partition-id": pid,
        "measured": 0,
        "int8": int(spec.precision == "int8" and fits),
        **duty,
    })
    return ArrayRecord(state), metrics


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Fine-tune on this device's stream, run its duty cycle, reply with model and costs."""
    spec = _spec(context.run_config)
    pid, profile = device_of(spec, context.node_config)
    config = msg.content.config_records.get("config")
    server_round = int(config["server-round"]) if config and "server-round" in config else 1  # type: ignore[arg-type]
    arrays, metrics = train_on_stream(context.run_config, pid, profile,
                                      msg.content.array_records["arrays"], server_round)
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)
