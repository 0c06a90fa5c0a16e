"""Continual-learning methods as loss hooks with per-device state in plain arrays.

A :class:`ContinualMethod` is configured once (``"finetune"``, ``"replay"``, ``"ewc"``,
``"lwf"`` or ``"replay+ewc"``) and used for one local training at a time: :meth:`begin`
loads the device's state, :meth:`replay_batch` and :meth:`loss` shape each step, and
:meth:`end` returns the new state. :func:`clients.continual.train.train_local` drives the
three; a ClientApp with its own loop can call them itself.

Device state (``dict[str, numpy.ndarray]``, the engine's per-device store keeps it):

``task``
    The task the device trained on last (one int64).
``replay/...``
    The :class:`~clients.continual.replay.ReplayBuffer` (``replay`` methods).
``ewc/fisher/<param>``, ``ewc/anchor/<param>``
    The consolidated Fisher diagonal and the weights it anchors to (``ewc`` methods).
``ewc/pending/<param>``
    The Fisher of the latest round's data at the trained weights. A fleet sends it to the
    server, which averages it across devices (``aggregate_fisher``); the ClientApp may put
    the fleet mean back with :func:`set_pending_fisher`. At the device's next task boundary
    it is consolidated: ``fisher += pending`` (online EWC, no decay) and ``anchor`` becomes
    the model the device received for its first round on the new task.
``lwf/teacher/<name>``
    The teacher's ``state_dict``: the model the device held when its current task began
    (``lwf``). It costs one more copy of the model in storage.

Before the first boundary EWC and LwF have nothing to protect and train as fine-tuning.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
from torch import nn

from clients.continual.ewc import ewc_penalty, fisher_diagonal
from clients.continual.lwf import distillation_loss
from clients.continual.replay import ReplayBuffer, replay_capacity, sample_nbytes
from devices.errors import ConfigError, PayloadError

__all__ = ["METHODS", "ContinualMethod", "pending_fisher", "set_pending_fisher"]

METHODS = ("finetune", "replay", "ewc", "lwf", "replay+ewc")

BaseLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _sub(state: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _put(state: dict[str, np.ndarray], prefix: str, arrays: Mapping[str, Any]) -> None:
    for k in [k for k in state if k.startswith(prefix)]:
        del state[k]
    for k, v in arrays.items():
        state[prefix + k] = np.array(v.detach().cpu().numpy() if torch.is_tensor(v) else v)  # copy


def pending_fisher(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The Fisher of the latest round (to send to the server), keyed by parameter name."""
    return _sub(state, "ewc/pending/")


def set_pending_fisher(
    state: Mapping[str, np.ndarray], fisher: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """A copy of ``state`` whose pending Fisher is ``fisher`` (e.g. the fleet's mean)."""
    out = dict(state)
    _put(out, "ewc/pending/", fisher)
    return out


@dataclass
class ContinualMethod:
    """A continual-learning method and its hyper-parameters.

    Parameters
    ----------
    name : str
        One of ``METHODS``.
    replay_capacity : int
        Buffer size for a device that has none yet; a stored buffer keeps its own.
    replay_fraction : float
        When > 0, :meth:`for_device` sets ``replay_capacity`` from this share of a device's
        RAM and storage (see ``replay_capacity()``), so an MCU keeps dozens of samples and
        a Jetson thousands under one config.
    replay_batch_size : int
        Replayed samples appended to each batch (0: as many as the batch has).
    class_balanced : bool
        Class-balanced reservoir instead of plain reservoir sampling.
    ewc_lambda : float
        EWC's ``lambda``.
    fisher_samples : int
        Local samples the Fisher is estimated on (one backward each).
    lwf_alpha : float
        Weight of the distillation term.
    lwf_temperature : float
        Distillation temperature.
    seed : int
        Seed of a new replay buffer.
    """

    name: str = "finetune"
    replay_capacity: int = 0
    replay_fraction: float = 0.0
    replay_batch_size: int = 0
    class_balanced: bool = False
    ewc_lambda: float = 100.0
    fisher_samples: int = 256
    lwf_alpha: float = 1.0
    lwf_temperature: float = 2.0
    seed: int = 0
    _buffer: ReplayBuffer | None = field(default=None, init=False, repr=False)
    _fisher: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False)
    _anchor: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False)
    _teacher: nn.Module | None = field(default=None, init=False, repr=False)
    _state: dict[str, np.ndarray] = field(default_factory=dict, init=False, repr=False)
    _terms: dict[str, list[float]] = field(default_factory=dict, init=False, repr=False)
    _counts: dict[str, int] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise ConfigError(f"continual.method: expected one of {METHODS}, got {self.name!r}")
        if self.replay_capacity < 0 or self.replay_batch_size < 0 or self.fisher_samples < 1:
            raise ConfigError("continual.replay_capacity/replay_batch_size/fisher_samples: "
                              f"expected >= 0, >= 0, >= 1, got {self.replay_capacity}, "
                              f"{self.replay_batch_size}, {self.fisher_samples}")
        if not 0.0 <= self.replay_fraction <= 1.0:
            raise ConfigError(f"continual.replay_fraction: expected a share in [0, 1], got "
                              f"{self.replay_fraction}")
        if self.ewc_lambda < 0 or self.lwf_alpha < 0 or self.lwf_temperature <= 0:
            raise ConfigError("continual.ewc_lambda/lwf_alpha/lwf_temperature: expected >= 0, "
                              f">= 0, > 0, got {self.ewc_lambda}, {self.lwf_alpha}, "
                              f"{self.lwf_temperature}")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> ContinualMethod:
        """Build from a config table (``method`` is accepted for ``name``)."""
        known = {f.name for f in fields(cls) if f.init}
        kw = dict(cfg)
        if "method" in kw:
            kw["name"] = kw.pop("method")
        unknown = sorted(set(kw) - known)
        if unknown:
            raise ConfigError(f"continual: unknown keys {unknown}; expected some of "
                              f"{sorted(known | {'method'})}")
        return cls(**kw)

    def for_device(self, ram_bytes: int, storage_bytes: int,
                   sample_shape: tuple[int, ...]) -> ContinualMethod:
        """A fresh copy whose ``replay_capacity`` fits this device (when ``replay_fraction``).

        ``sample_shape`` is one input's shape, e.g. ``(1, 8, 8)``; samples are counted as
        float32 pixels plus an int64 label and an int64 key.
        """
        kw = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        if self.uses_replay and self.replay_fraction > 0:
            kw["replay_capacity"] = replay_capacity(ram_bytes, storage_bytes,
                                                    sample_nbytes(sample_shape),
                                                    fraction=self.replay_fraction)
        return ContinualMethod(**kw)

    @property
    def uses_replay(self) -> bool:
        """Whether batches are extended with replayed samples."""
        return self.name in ("replay", "replay+ewc")

    @property
    def uses_ewc(self) -> bool:
        """Whether the EWC penalty is added."""
        return self.name in ("ewc", "replay+ewc")

    @property
    def uses_lwf(self) -> bool:
        """Whether the LwF distillation term is added."""
        return self.name == "lwf"

    @property
    def buffer(self) -> ReplayBuffer | None:
        """The replay buffer loaded by :meth:`begin` (``None`` for non-replay methods)."""
        return self._buffer

    # -- the three hooks ------------------------------------------------------------------

    def begin(self, model: nn.Module, state: Mapping[str, np.ndarray] | None,
              task: int | None = None, lr: float | None = None) -> None:
        """Load a device's state before training ``model`` on ``task``.

        ``model`` holds the weights the device starts the round from (the global model in a
        fleet). When ``task`` differs from the state's last task, this is a task boundary:
        EWC consolidates its pending Fisher and anchors to ``model``; LwF takes ``model`` as
        its new teacher. ``task=None`` never counts as a boundary.

        With the SGD step size ``lr`` given, the Fisher used in the penalty is capped at
        ``1 / (lr * ewc_lambda)``: the penalty is a quadratic of curvature ``lambda * F``,
        and plain SGD on it diverges once ``lr * lambda * F > 2``; with the cap each step
        moves a weight at most all the way back to its anchor. The share of capped entries
        is reported by :meth:`term_means` as ``fisher_capped``.
        """
        st = dict(state or {})
        prev = int(np.asarray(st["task"]).reshape(-1)[0]) if "task" in st else None
        boundary = task is not None and prev is not None and task != prev
        self._terms = {}
        self._counts = {}
        self._buffer = None
        if self.uses_replay:
            sub = _sub(st, "replay/")
            self._buffer = (ReplayBuffer.from_state(sub) if sub else ReplayBuffer(
                self.replay_capacity, class_balanced=self.class_balanced, seed=self.seed))
        if self.uses_ewc and boundary:
            pending = _sub(st, "ewc/pending/")
            if pending:
                old = _sub(st, "ewc/fisher/")
                _put(st, "ewc/fisher/", {k: v + old[k] if k in old else v
                                         for k, v in pending.items()})
                _put(st, "ewc/anchor/", {k: p for k, p in model.named_parameters()
                                         if k in pending})
                _put(st, "ewc/pending/", {})
        self._fisher = {k: torch.from_numpy(np.asarray(v, dtype=np.float32))
                        for k, v in _sub(st, "ewc/fisher/").items()} if self.uses_ewc else {}
        self._anchor = {k: torch.from_numpy(np.asarray(v, dtype=np.float32))
                        for k, v in _sub(st, "ewc/anchor/").items()} if self.uses_ewc else {}
        if lr is not None and self._fisher and self.ewc_lambda > 0:
            cap = 1.0 / (lr * self.ewc_lambda)
            total = sum(f.numel() for f in self._fisher.values())
            capped = sum(int((f > cap).sum()) for f in self._fisher.values())
            self._fisher = {k: f.clamp(max=cap) for k, f in self._fisher.items()}
            self._terms["fisher_capped"] = [capped / max(total, 1)]
        if set(self._fisher) != set(self._anchor):
            raise PayloadError(f"continual state: EWC fisher has {sorted(self._fisher)} but "
                               f"anchor has {sorted(self._anchor)}")
        self._teacher = None
        if self.uses_lwf:
            if boundary:
                _put(st, "lwf/teacher/", model.state_dict())
            saved = _sub(st, "lwf/teacher/")
            if saved:
                self._teacher = copy.deepcopy(model)
                self._teacher.load_state_dict({k: torch.from_numpy(np.array(v))
                                               for k, v in saved.items()})
                self._teacher.eval()
                for p in self._teacher.parameters():
                    p.requires_grad_(False)
        if task is not None:
            st["task"] = np.asarray([task], dtype=np.int64)
        self._state = st

    def replay_batch(self, x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` extended with replayed samples (unchanged without a buffer)."""
        buf = self._buffer
        if buf is None or len(buf) == 0:
            return x, y
        rx, ry = buf.sample(self.replay_batch_size or len(x), rng)
        return (torch.cat([x, torch.from_numpy(rx).to(x.dtype)]),
                torch.cat([y, torch.from_numpy(ry).to(y.dtype)]))

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             base_loss: BaseLoss) -> torch.Tensor:
        """The training loss: ``base_loss(model(x), y)`` plus the method's terms."""
        logits = model(x)
        total = base_loss(logits, y)
        if self._fisher:
            pen = ewc_penalty(model, self._fisher, self._anchor, self.ewc_lambda)
            self._terms.setdefault("ewc_penalty", []).append(float(pen.detach()))
            total = total + pen
        if self._teacher is not None:
            with torch.no_grad():
                teacher_logits = self._teacher(x)
            self._counts["teacher_examples"] = self._counts.get("teacher_examples", 0) + len(x)
            dist = distillation_loss(logits, teacher_logits, self.lwf_temperature)
            self._terms.setdefault("distill", []).append(float(dist.detach()))
            total = total + self.lwf_alpha * dist
        return total

    def end(self, model: nn.Module, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
        """The device's new state after training ``model`` on this round's ``(x, y)``."""
        st = dict(self._state)
        if self._buffer is not None:
            self._buffer.add(x, y)
            _put(st, "replay/", self._buffer.to_state())
        if self.uses_ewc:
            _put(st, "ewc/pending/", fisher_diagonal(model, x, y,
                                                     max_samples=self.fisher_samples))
            self._counts["fisher_examples"] = min(len(x), self.fisher_samples)
        return st

    def term_means(self) -> dict[str, float]:
        """Mean of each extra loss term over the steps since :meth:`begin`."""
        return {k: float(np.mean(v)) for k, v in self._terms.items() if v}

    def extra_work(self) -> dict[str, int]:
        """Work beyond the training steps since :meth:`begin`, for a cost model.

        ``teacher_examples``: samples through the LwF teacher (forward only);
        ``fisher_examples``: samples with a forward and a backward for the Fisher.
        """
        return dict(self._counts)
