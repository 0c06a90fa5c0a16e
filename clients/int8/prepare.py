"""``prepare``: the model transform that makes conv/linear layers train in INT8.

In the style of ``torch.ao.quantization.prepare_qat``: it takes a model and returns one
whose ``nn.Linear`` and ``nn.Conv2d`` layers are :class:`Int8Linear` /
:class:`Int8Conv2d`, sharing the original parameters. Every other layer (norms,
activations, pooling) is left as it is, in FP32.
"""

from __future__ import annotations

import copy
from collections.abc import Collection
from typing import Any

import torch
from torch import nn

from clients.int8 import _kernels
from clients.int8._compile import resolve_compile
from clients.int8.functional import Int8Config
from clients.int8.modules import Int8Conv2d, Int8Linear
from devices.errors import ConfigError

__all__ = ["prepare", "UNSUPPORTED"]

#: Layer types with weights that INT8 training does not cover: ``prepare`` refuses them
#: unless they are left in FP32 (``leave_fp32``).
UNSUPPORTED: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.RNNBase,
    nn.RNNCellBase,
    nn.Bilinear,
    nn.MultiheadAttention,
)


def _resolve_conv_padding(name: str, m: nn.Conv2d) -> tuple[int, int] | None:
    """Numeric padding of a Conv2d, or None where the int8 path cannot express it."""
    if m.padding_mode != "zeros":
        return None
    pad = m.padding
    if pad == "valid":
        return (0, 0)
    if pad == "same":
        total = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size, strict=True)]
        if any(t % 2 for t in total):
            return None
        return (total[0] // 2, total[1] // 2)
    assert not isinstance(pad, str)
    return (int(pad[0]), int(pad[1]))


def _unsupported_reason(m: nn.Module) -> str | None:
    if isinstance(m, UNSUPPORTED):
        return type(m).__name__
    if isinstance(m, nn.Conv2d) and type(m) is nn.Conv2d and _resolve_conv_padding("", m) is None:
        return f"Conv2d(padding={m.padding!r}, padding_mode={m.padding_mode!r})"
    return None


def prepare(
    model: nn.Module,
    *,
    prc: bool | str = True,
    lac: bool = True,
    weights: str = "fp32",
    qas: bool | None = None,
    stochastic: bool = True,
    per_channel: bool = False,
    leave_fp32: Collection[str] | bool = False,
    compile: bool | str = "auto",
    inplace: bool = False,
    prc_fraction: float = 0.95,
    prc_z: float = 2.5,
) -> nn.Module:
    """Make a model's ``nn.Linear`` and ``nn.Conv2d`` layers train in INT8 (Octo).

    Parameters
    ----------
    model : nn.Module
        The FP32 model.
    prc : bool or str
        Parameterized range clipping of the output gradient before it is quantized:
        ``True`` or ``"range"`` clips to ``[0.95 min, 0.95 max]`` (the authors' code,
        fraction ``prc_fraction``), ``"sigma"`` to ``mean +- prc_z * std``, ``False`` not
        at all.
    lac : bool
        Add loss-aware compensation parameters to each quantized layer (add
        :func:`lac_penalty` to the loss).
    weights : {"fp32", "int8"}
        ``"fp32"`` (Octo): FP32 master weights, quantized afresh in each forward.
        ``"int8"``: no FP32 master copy; each weight stays on its int8 grid ``s_w * q``
        (projected after every update with stochastic rounding), as a device that stores
        int8 weights holds it, and the cost model counts it at one byte per element.
    qas : bool, optional
        Quantization-aware gradient scaling (Lin et al., NeurIPS 2022), for
        ``weights="int8"``: the int8 codes' gradient is scaled by ``s_w**-2`` so that an
        update has FP32's scale; without it a step moves a weight by ``s_w**2`` times
        FP32's step. Default: on with int8 weights. With FP32 master weights the gradient
        already has FP32's scale, so ``qas=True`` there is an error.
    stochastic : bool
        Stochastic rounding of the forward operands (else round to nearest).
    per_channel : bool
        Per-output-channel weight scales (else one per tensor).
    leave_fp32 : bool or collection of str
        ``True`` leaves every unsupported layer in FP32 instead of raising; a collection
        names modules (by ``named_modules`` name) to keep in FP32, supported or not.
    compile : bool or "auto"
        Fuse the quantize ops with ``torch.compile`` ("auto": when available).
    inplace : bool
        Convert ``model`` itself instead of a deep copy.

    Returns
    -------
    nn.Module
        The converted model (``model`` itself if ``inplace``).

    Raises
    ------
    ConfigError
        For an unsupported layer (listed by name) not left in FP32, or bad options.
    """
    if weights not in ("fp32", "int8"):
        raise ConfigError(f"int8.weights: expected 'fp32' or 'int8', got {weights!r}")
    if qas is None:
        qas = weights == "int8"
    if qas and weights != "int8":
        raise ConfigError(
            "int8.qas: QAS rescales the gradients of int8-stored weights; with FP32 master "
            "weights (weights='fp32') they already have FP32's scale; expected "
            "weights='int8' or qas=False"
        )
    if prc is True:
        mode = "range"
    elif prc is False:
        mode = "none"
    elif prc in ("range", "sigma", "none"):
        mode = str(prc)
    else:
        raise ConfigError(f"int8.prc: expected a bool, 'range', 'sigma' or 'none', got {prc!r}")
    if not 0.0 < prc_fraction <= 1.0:
        raise ConfigError(f"int8.prc_fraction: expected a value in (0, 1], got {prc_fraction}")
    if prc_z <= 0:
        raise ConfigError(f"int8.prc_z: expected a positive value, got {prc_z}")
    try:
        do_compile = resolve_compile(compile)
    except ValueError as exc:
        raise ConfigError(f"int8.compile: {exc}") from exc
    keep_all = leave_fp32 is True
    keep: set[str] = set() if isinstance(leave_fp32, bool) else {str(n) for n in leave_fp32}
    names = {n for n, _ in model.named_modules()}
    missing = sorted(keep - names)
    if missing:
        raise ConfigError(f"int8.leave_fp32: no modules named {missing} in the model")

    def kept(name: str) -> bool:
        return any(name == k or name.startswith(k + ".") for k in keep)

    bad = [
        f"{name} ({reason})"
        for name, m in model.named_modules()
        if (reason := _unsupported_reason(m)) is not None and not keep_all and not kept(name)
    ]
    if bad:
        raise ConfigError(
            "int8: layers not supported by INT8 training: " + ", ".join(bad)
            + "; leave them in FP32 with leave_fp32=True or leave_fp32=[names]"
        )  # fmt: skip
    cfg = Int8Config(
        stochastic=stochastic,
        per_channel=per_channel,
        prc=mode,
        prc_fraction=prc_fraction,
        prc_z=prc_z,
        compile=do_compile,
        use_onednn=_kernels.onednn_conv_available(),
        int8_weights=weights == "int8",
        qas=bool(qas),
    )
    if not inplace:
        model = copy.deepcopy(model)
    _swap(model, "", cfg, lac, kept)
    for m in model.modules():
        if isinstance(m, nn.GroupNorm):
            m.register_forward_pre_hook(_group_norm_input)
    return model


def _group_norm_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """A contiguous copy of a channels-last GroupNorm input that needs no gradient.

    The int8 convolutions return channels-last FP32 (oneDNN's layout). torch 2.13's CPU
    GroupNorm backward crashes the process (segmentation fault) on a channels-last input
    that needs no gradient while the norm's weight or bias does: exactly a sparse
    update's frozen prefix followed by a trained norm. Such an input has no backward to
    slow down, so the copy costs one pass over it in the forward.
    """
    x = args[0] if args else None
    if (
        isinstance(x, torch.Tensor)
        and x.dim() == 4
        and not x.requires_grad
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
        and torch.is_grad_enabled()
        and any(p.requires_grad for p in module.parameters())
    ):
        return (x.contiguous(), *args[1:])
    return None


def _swap(module: nn.Module, prefix: str, cfg: Int8Config, lac: bool, kept: object) -> None:
    assert callable(kept)
    if isinstance(module, UNSUPPORTED):
        return  # left in FP32 (checked above), and never convert inside it (e.g. MHA)
    for child_name, child in module.named_children():
        name = f"{prefix}.{child_name}" if prefix else child_name
        if kept(name):
            continue
        new: nn.Module | None = None
        if type(child) is nn.Linear:
            new = Int8Linear.from_float(child, cfg, lac)
        elif type(child) is nn.Conv2d:
            pad = _resolve_conv_padding(name, child)
            if pad is not None:
                new = Int8Conv2d.from_float(child, cfg, lac)
                new.padding = pad
        if new is not None:
            setattr(module, child_name, new)
        else:
            _swap(child, name, cfg, lac, kept)
