"""tinyfleet's perception ``ClientApp``: fine-tune on a device's video stream, then run a
PASS inference duty cycle at the stream's frame rate and report what it cost.

A run config with a ``[perception]`` table (see :class:`PerceptionSpec`) selects this app
(``sim.runner``). The federated model is a :class:`~clients.pass_skip.PerceptionNet`; with
``gate = "learned"`` the arrays also hold each block's learned PASS gate under
``gates.{block}.{name}``, in the same ``ArrayRecord``, so FedAvg aggregates gates and
weights alike.

Each device ``pid`` owns a deterministic stream (:func:`device_stream`: seed from the run
seed and ``pid``; static background or high motion per config). Round ``r`` uses segment
``r`` of it: the first ``train_frames`` labelled frames fine-tune the network (and then the
gates, backbone frozen, as ``clients.pass_skip.train_gates``); the next ``duty_frames`` are
the duty cycle, run frame by frame through ``clients.pass_skip.prepare`` (``gate = "off"``
computes every frame whole).

Cost model (never host time): training from ``devices.cost.training_step_cost`` and
``estimate_training``; a device whose training step does not fit its RAM does not train
(``trained`` = 0, ``num-examples`` = 0, so FedAvg gives it no weight) but still runs the duty
cycle. Inference is credited only the executed MACs: per frame
``executed MACs / profile.macs_per_s["fp32"]``; a device keeps up when that is at most the
frame deadline ``1 / fps``. The reply's ``compute-s`` is training plus duty-cycle time.

Reply metrics: ``num-examples``, ``trained``, ``train-loss``, ``compute-s``, ``energy-j``,
``train-compute-s``, ``infer-s``, ``infer-energy-j``, ``executed-macs``, ``full-macs``,
``mac-ratio``, ``frame-time-s``, ``deadline-s``, ``keeps-up``, ``stream-acc``,
``duty-frames``, ``partition-id``, ``measured`` (0).
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
from devices.cost import check_fit, estimate_training, training_step_cost
from devices.errors import BudgetError, ConfigError
from devices.profiles import DeviceProfile

__all__ = [
    "GATE_PREFIX",
    "PerceptionSpec",
    "app",
    "build_global_state",
    "device_stream",
    "duty_cycle",
    "perception_of",
]

app = ClientApp()

GATE_PREFIX = "gates."
"""Prefix of the learned gates' arrays in the federated ``ArrayRecord``."""

_STREAMS = {"static": STATIC_BACKGROUND, "high-motion": HIGH_MOTION}


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
        Fine-tuning of the network (Adam, ``train_perception``).
    gate : {"off", "threshold", "learned"}
        PASS gate of the duty cycle ("off": every frame computed whole).
    patch, threshold, keyframe_every : int, float, int
        As ``clients.pass_skip.prepare``.
    gate_steps, gate_lr, sparsity, clip_len : int, float, float, int
        Gate training per round (learned gate only; clips of ``clip_len`` frames).
    switch_every : int
        Frames between digit-class changes of the stream: short enough that a round's
        labelled frames show several classes (fine-tuning on one class collapses the net).
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


@functools.lru_cache(maxsize=16)
def _train_cost(spec: PerceptionSpec, profile: DeviceProfile) -> tuple[float, float, bool]:
    """Cost-model seconds and joules of one fine-tuning step, and whether it fits RAM."""
    with torch.random.fork_rng(devices=[]):
        net = PerceptionNet(1, 10, spec.width)
        cost = training_step_cost(net, (1, spec.size, spec.size), spec.batch_size,
                                  optimizer="adam")
    try:
        check_fit(cost, profile)
    except BudgetError:
        return 0.0, 0.0, False
    est = estimate_training(cost, profile, steps=1)
    return est.compute_s, est.energy_j, True


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
    step_s, step_j, fits = _train_cost(spec, profile)
    loss = float("nan")
    train_s = train_j = 0.0
    if fits and bool((train_y >= 0).any()):
        rng_seed = seed * 1_000_003 + pid * 1_009 + server_round
        losses = train_perception(net, train_x, train_y, steps=spec.train_steps,
                                  batch_size=spec.batch_size, lr=spec.lr, seed=rng_seed)
        loss = float(np.mean(losses))
        train_s, train_j = step_s * spec.train_steps, step_j * spec.train_steps
        if spec.gate == "learned":
            model = _prepare(net.eval(), spec)
            _load_gates(model, gate_state)
            clips = train_x.reshape(-1, spec.clip_len, *train_x.shape[1:])
            clip_y = train_y.reshape(-1, spec.clip_len)
            history = train_gates(model, clips, clip_y, steps=spec.gate_steps,
                                  batch_size=clips.shape[0], lr=spec.gate_lr,
                                  sparsity=spec.sparsity, seed=rng_seed)
            gate_state = _gate_state(model)
            # The gates' steps run clips through every block: cost them as frames of the
            # network's training step (an upper bound; only the gates get gradients).
            gate_frames = spec.gate_steps * clips.shape[0] * spec.clip_len
            scale = gate_frames / spec.batch_size
            train_s, train_j = train_s + step_s * scale, train_j + step_j * scale
            loss = float(np.mean([h["loss"] for h in history]))
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
