"""The quantized layers that :func:`clients.int8.prepare` swaps in, with LAC.

``Int8Linear`` and ``Int8Conv2d`` subclass ``nn.Linear`` and ``nn.Conv2d``: same
parameters, same state-dict keys (plus the LAC ones), same constructor-free conversion via
``from_float``, so code that inspects layers by type keeps working.

LAC (loss-aware compensation) adds ``y = x + alpha * mu + o`` after the layer. The
authors' shapes are not public; here ``alpha``, ``mu`` and ``o`` are per output channel
(feature), so their size does not depend on the input resolution and they are known at
prepare time; they are the rows of one ``(3, C)`` parameter ``lac`` per layer, and the
int8 autograd function adds the correction with the bias and returns its gradient
itself (separate tensors and autograd nodes cost 0.15 ms per layer per step at SmallCNN
sizes, more than the int8 GEMM saved there). ``alpha`` starts at 1 and ``mu``, ``o`` at
0; :func:`lac_penalty` is the L2 penalty on ``mu`` and ``o`` that the training loop adds
to its loss. Per channel, the
correction is an extra, L2-tied offset beside the bias; it is folded into the bias the
kernel adds, so it costs nothing per element.

In eval mode (``model.eval()``) the forward rounds to nearest instead of stochastically,
so evaluation is deterministic.

With int8 weights (``prepare(weights="int8")``) there is no FP32 master copy: the weight
parameter always holds values on its int8 grid ``s_w * q`` (the host keeps them in an FP32
tensor; the cost model counts them at one byte each, as the device stores them, through
the layer's ``tinyfleet_param_itemsize``). Each forward and each ``state_dict`` read first
projects the weight onto its grid (stochastic rounding in training, to nearest in eval;
a no-op when nothing changed), so the optimizer's step in between is what a device's
in-place int8 update does.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any

import torch
from torch import nn

from clients.int8._compile import one_kernel
from clients.int8.functional import Int8Config, grid_weight, int8_conv2d, int8_linear, lac_bias

__all__ = ["Int8Linear", "Int8Conv2d", "lac_penalty"]


class _LACPenalty(torch.autograd.Function):
    """``sum(mu**2 + o**2)`` over ``(3, C)`` LAC parameters (rows 1 and 2), one node."""

    @staticmethod
    def forward(ctx: Any, *lacs: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(*lacs)
        flat = torch.cat([t[1:].reshape(-1) for t in lacs])
        return torch.dot(flat, flat)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        grads = []
        for t in ctx.saved_tensors:
            d = 2 * g * t
            d[0] = 0
            grads.append(d)
        return tuple(grads)


def _project(w: torch.Tensor, cfg: Int8Config, stochastic: bool) -> None:
    with torch.no_grad():
        w.copy_(grid_weight(w, cfg, stochastic))


#: Under the cost model's tracer the projection is weight-storage upkeep done in place,
#: not part of the step's working set: one kernel, as a device's int8 update would be.
_project_in_place = one_kernel(_project)


#: Per int8-weight layer, the weight tensor and version last projected: kept outside the
#: module so that it pickles (``torch.save(model)``) and deep-copies as any module does.
_GRID_SEEN: weakref.WeakKeyDictionary[Any, tuple[weakref.ref[torch.Tensor], int]] = (
    weakref.WeakKeyDictionary()
)


def _project_before_read(module: nn.Module, prefix: str, keep_vars: bool) -> None:
    """``state_dict`` pre-hook: what is read (sent, saved) is the on-grid weight."""
    getattr(module, "_project_weight")()  # noqa: B009


class _LAC:
    """Mixin holding the LAC parameter and the effective bias."""

    lac: nn.Parameter | None

    def _init_lac(
        self, module: nn.Module, channels: int, enabled: bool, like: torch.Tensor
    ) -> None:
        if enabled:
            init = torch.zeros(3, channels, dtype=like.dtype, device=like.device)
            init[0] = 1.0
            module.lac = nn.Parameter(init)
        else:
            module.register_parameter("lac", None)

    def _cfg(self) -> Int8Config:
        """The layer's numerics; in eval mode rounding is to nearest (no noise in tests)."""
        cfg: Int8Config = getattr(self, "cfg")  # noqa: B009 - set by from_float
        if getattr(self, "training", True) or not cfg.stochastic:
            return cfg
        eval_cfg: Int8Config | None = getattr(self, "_eval_cfg", None)
        if eval_cfg is None:
            eval_cfg = dataclasses.replace(cfg, stochastic=False)
            object.__setattr__(self, "_eval_cfg", eval_cfg)
        return eval_cfg

    def _init_int8_weights(self, module: nn.Module) -> None:
        """Keep ``module.weight`` on its int8 grid when the config asks for int8 weights."""
        cfg: Int8Config = getattr(self, "cfg")  # noqa: B009 - set by from_float
        if not cfg.int8_weights:
            return
        object.__setattr__(module, "tinyfleet_param_itemsize", {"weight": 1})
        module.register_state_dict_pre_hook(_project_before_read)
        self._project_weight()

    def _project_weight(self) -> None:
        """Put the weight on its int8 grid, in place (stochastic rounding in training),
        unless it is unchanged since the last projection (same tensor, same version)."""
        cfg: Int8Config = getattr(self, "cfg")  # noqa: B009 - set by from_float
        if not cfg.int8_weights:
            return
        w: torch.Tensor = getattr(self, "weight")  # noqa: B009
        seen = _GRID_SEEN.get(self)
        if seen is not None and seen[0]() is w and seen[1] == w._version:
            return
        _project_in_place(w, cfg, bool(getattr(self, "training", True)))  # noqa: B009
        _GRID_SEEN[self] = (weakref.ref(w), w._version)

    def _effective_bias(self) -> torch.Tensor | None:
        """``bias + alpha * mu + o`` (what export stores; training folds it in-kernel)."""
        return lac_bias(getattr(self, "bias", None), self.lac)


class Int8Linear(nn.Linear, _LAC):
    """``nn.Linear`` trained with int8 forward and backward (see :mod:`functional`)."""

    cfg: Int8Config

    @classmethod
    def from_float(cls, mod: nn.Linear, cfg: Int8Config, lac: bool) -> Int8Linear:
        """Convert ``mod``, sharing its weight and bias parameters."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = mod.in_features, mod.out_features
        new.weight, new.bias = mod.weight, mod.bias
        new.cfg = cfg
        new._init_lac(new, mod.out_features, lac, mod.weight)
        new.train(mod.training)
        new._init_int8_weights(new)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._project_weight()
        return int8_linear(x, self.weight, self.bias, self._cfg(), self.lac)

    def extra_repr(self) -> str:
        weights = ", weights=int8" if self.cfg.int8_weights else ""
        return f"{super().extra_repr()}, int8, lac={self.lac is not None}{weights}"


class Int8Conv2d(nn.Conv2d, _LAC):
    """``nn.Conv2d`` (zero padding) trained with int8 forward and backward."""

    cfg: Int8Config

    @classmethod
    def from_float(cls, mod: nn.Conv2d, cfg: Int8Config, lac: bool) -> Int8Conv2d:
        """Convert ``mod``, sharing its weight and bias parameters."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for attr in (
            "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
            "transposed", "output_padding", "groups", "padding_mode",
            "_reversed_padding_repeated_twice",
        ):  # fmt: skip
            setattr(new, attr, getattr(mod, attr))
        new.weight, new.bias = mod.weight, mod.bias
        new.cfg = cfg
        new._init_lac(new, mod.out_channels, lac, mod.weight)
        new.train(mod.training)
        new._init_int8_weights(new)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._project_weight()
        pad = self.padding
        assert not isinstance(pad, str)  # prepare() resolves "same"/"valid"
        return int8_conv2d(
            x,
            self.weight,
            self.bias,
            self._cfg(),
            (int(self.stride[0]), int(self.stride[1])),
            (int(pad[0]), int(pad[1])),
            (int(self.dilation[0]), int(self.dilation[1])),
            self.groups,
            self.lac,
        )

    def extra_repr(self) -> str:
        weights = ", weights=int8" if self.cfg.int8_weights else ""
        return f"{super().extra_repr()}, int8, lac={self.lac is not None}{weights}"


def lac_penalty(model: nn.Module, weight: float = 1e-4) -> torch.Tensor:
    """The LAC L2 penalty ``weight * sum(mu**2 + o**2)`` over the model's int8 layers.

    Add it to the training loss. Zero (a 0-d tensor) when no layer has LAC.
    """
    terms = [
        m.lac
        for m in model.modules()
        if isinstance(m, Int8Linear | Int8Conv2d) and m.lac is not None
    ]
    if not terms:
        return torch.zeros(())
    total: torch.Tensor = _LACPenalty.apply(*terms)
    return total * weight
