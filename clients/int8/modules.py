"""The quantized layers that :func:`clients.int8.prepare` swaps in, with LAC.

``Int8Linear`` and ``Int8Conv2d`` subclass ``nn.Linear`` and ``nn.Conv2d``: same
parameters, same state-dict keys (plus the LAC ones), same constructor-free conversion via
``from_float``, so code that inspects layers by type keeps working.

LAC (loss-aware compensation) adds ``y = x + alpha * mu + o`` after the layer. The
authors' shapes are not public; here ``alpha``, ``mu`` and ``o`` are per output channel
(feature), so their size does not depend on the input resolution and they are known at
prepare time. ``alpha`` starts at 1 and ``mu``, ``o`` at 0; :func:`lac_penalty` is the L2
penalty on ``mu`` and ``o`` that the training loop adds to its loss. Per channel, the
correction is an extra, L2-tied offset beside the bias; it is folded into the bias the
kernel adds, so it costs nothing per element.

In eval mode (``model.eval()``) the forward rounds to nearest instead of stochastically,
so evaluation is deterministic.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from clients.int8.functional import Int8Config, int8_conv2d, int8_linear

__all__ = ["Int8Linear", "Int8Conv2d", "lac_penalty"]


class _LAC:
    """Mixin holding the LAC parameters and the effective bias."""

    lac_alpha: nn.Parameter | None
    lac_mu: nn.Parameter | None
    lac_o: nn.Parameter | None

    def _init_lac(
        self, module: nn.Module, channels: int, enabled: bool, like: torch.Tensor
    ) -> None:
        if enabled:
            dt, dev = like.dtype, like.device
            module.lac_alpha = nn.Parameter(torch.ones(channels, dtype=dt, device=dev))
            module.lac_mu = nn.Parameter(torch.zeros(channels, dtype=dt, device=dev))
            module.lac_o = nn.Parameter(torch.zeros(channels, dtype=dt, device=dev))
        else:
            module.register_parameter("lac_alpha", None)
            module.register_parameter("lac_mu", None)
            module.register_parameter("lac_o", None)

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

    def _effective_bias(self) -> torch.Tensor | None:
        bias: torch.Tensor | None = getattr(self, "bias", None)
        if self.lac_mu is None or self.lac_alpha is None or self.lac_o is None:
            return bias
        comp = self.lac_alpha * self.lac_mu + self.lac_o
        return comp if bias is None else bias + comp


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
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight, self._effective_bias(), self._cfg())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, int8, lac={self.lac_mu is not None}"


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
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = self.padding
        assert not isinstance(pad, str)  # prepare() resolves "same"/"valid"
        return int8_conv2d(
            x,
            self.weight,
            self._effective_bias(),
            self._cfg(),
            (int(self.stride[0]), int(self.stride[1])),
            (int(pad[0]), int(pad[1])),
            (int(self.dilation[0]), int(self.dilation[1])),
            self.groups,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, int8, lac={self.lac_mu is not None}"


def lac_penalty(model: nn.Module, weight: float = 1e-4) -> torch.Tensor:
    """The LAC L2 penalty ``weight * sum(mu**2 + o**2)`` over the model's int8 layers.

    Add it to the training loss. Zero (a 0-d tensor) when no layer has LAC.
    """
    total: torch.Tensor | None = None
    for m in model.modules():
        if isinstance(m, Int8Linear | Int8Conv2d) and m.lac_mu is not None:
            assert m.lac_o is not None
            term = m.lac_mu.pow(2).sum() + m.lac_o.pow(2).sum()
            total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return total * weight
