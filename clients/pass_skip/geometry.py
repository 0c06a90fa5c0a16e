"""Patch geometry of a block: receptive-field halos, window sizes and MAC counts.

Pure functions on layer shapes, kept apart from the modules so they can be tested alone.
A block is a chain of layers of three kinds: convolutions (kernel k, stride s, zero padding
p), pooling (k, s, no padding) and pointwise layers (activations, eval-mode batch norm). For
an output patch of side ``Po`` the input window each layer needs is found backwards from
the block's output: a layer with (k, s, p) needs ``(len_out - 1) * s + k`` inputs starting
``p`` before ``start_out * s``. Because every quantity is affine in the patch index, one
plan (window side and left halo per layer) serves every patch of the grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from devices.errors import ConfigError

__all__ = ["LayerSpec", "LayerPlan", "BlockPlan", "layer_spec", "plan_block", "conv_macs"]

LayerKind = Literal["conv", "pool", "pointwise"]

_POINTWISE = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.SiLU,
    nn.GELU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Identity,
    nn.BatchNorm2d,
    nn.Dropout,
)


@dataclass(frozen=True)
class LayerSpec:
    """Spatial behaviour of one layer: kind, kernel, stride, zero padding, channels."""

    kind: LayerKind
    kernel: int = 1
    stride: int = 1
    padding: int = 0
    in_channels: int = 0
    out_channels: int = 0
    groups: int = 1


@dataclass(frozen=True)
class LayerPlan:
    """Where a layer reads, for one patch of the grid.

    Attributes
    ----------
    spec : LayerSpec
        The layer.
    in_patch : int
        Patch side at this layer's input (``out_patch * stride``).
    in_window : int
        Side of the input window read per patch (patch plus halos).
    in_halo : int
        Left/top halo of that window: it starts at ``index * in_patch - in_halo``.
    out_window : int
        Side of the output the layer computes per patch (what the MACs are counted on).
    """

    spec: LayerSpec
    in_patch: int
    in_window: int
    in_halo: int
    out_window: int


@dataclass(frozen=True)
class BlockPlan:
    """One block's patch plan: per-layer windows, total stride, patch sides in and out."""

    layers: tuple[LayerPlan, ...]
    in_patch: int
    out_patch: int
    stride: int

    @property
    def in_window(self) -> int:
        """Side of the window gathered from the block's input per patch."""
        return self.layers[0].in_window

    @property
    def in_halo(self) -> int:
        """Left/top halo of the gathered window (the summed halo of the block)."""
        return self.layers[0].in_halo

    def patch_macs(self) -> int:
        """MACs the block executes for one gathered patch (halo recomputation included)."""
        return sum(
            conv_macs(lp.spec, lp.out_window, lp.out_window)
            for lp in self.layers
            if lp.spec.kind == "conv"
        )


def _square(value: int | tuple[int, ...], name: str, layer: nn.Module) -> int:
    if isinstance(value, int):
        return value
    if len(set(value)) != 1:
        raise ConfigError(
            f"pass: {type(layer).__name__}.{name}={value}: only square values are supported"
        )
    return int(value[0])


def layer_spec(layer: nn.Module) -> LayerSpec:
    """Describe a layer's spatial behaviour, or refuse one PASS cannot cut into patches.

    Raises
    ------
    ConfigError
        For a layer type, padding mode, dilation or pooling padding that patch execution
        would not reproduce exactly.
    """
    if isinstance(layer, nn.Conv2d):
        if _square(layer.dilation, "dilation", layer) != 1:
            raise ConfigError("pass: Conv2d.dilation must be 1")
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise ConfigError(
                "pass: Conv2d.padding must be explicit integers with padding_mode='zeros'"
            )
        return LayerSpec(
            "conv",
            _square(layer.kernel_size, "kernel_size", layer),
            _square(layer.stride, "stride", layer),
            _square(layer.padding, "padding", layer),
            layer.in_channels,
            layer.out_channels,
            layer.groups,
        )
    if isinstance(layer, nn.MaxPool2d | nn.AvgPool2d):
        kernel = _square(layer.kernel_size, "kernel_size", layer)  # type: ignore[arg-type]
        stride = _square(layer.stride or kernel, "stride", layer)  # type: ignore[arg-type]
        if _square(layer.padding, "padding", layer) != 0 or layer.ceil_mode:  # type: ignore[arg-type]
            raise ConfigError(f"pass: {type(layer).__name__} must have padding=0, ceil_mode=False")
        if isinstance(layer, nn.MaxPool2d) and _square(layer.dilation, "dilation", layer) != 1:
            raise ConfigError("pass: MaxPool2d.dilation must be 1")
        return LayerSpec("pool", kernel, stride, 0)
    if isinstance(layer, _POINTWISE):
        return LayerSpec("pointwise")
    raise ConfigError(
        f"pass: cannot cut a {type(layer).__name__} into patches; supported: Conv2d, "
        "MaxPool2d, AvgPool2d and pointwise layers (activations, BatchNorm2d in eval mode)"
    )


def plan_block(specs: list[LayerSpec], out_patch: int) -> BlockPlan:
    """Plan the per-patch windows of a block whose output patches have side ``out_patch``.

    Raises
    ------
    ConfigError
        If the block is empty or ``out_patch`` < 1.
    """
    if not specs:
        raise ConfigError("pass: a block needs at least one layer")
    if out_patch < 1:
        raise ConfigError(f"pass: patch side at a block output must be >= 1, got {out_patch}")
    plans: list[LayerPlan] = []
    window, halo, patch = out_patch, 0, out_patch
    for spec in reversed(specs):
        in_window = (window - 1) * spec.stride + spec.kernel
        in_halo = halo * spec.stride + spec.padding
        in_patch = patch * spec.stride
        plans.append(LayerPlan(spec, in_patch, in_window, in_halo, window))
        window, halo, patch = in_window, in_halo, in_patch
    plans.reverse()
    stride = patch // out_patch
    return BlockPlan(tuple(plans), patch, out_patch, stride)


def conv_macs(spec: LayerSpec, out_h: int, out_w: int) -> int:
    """Multiply-accumulates of a convolution producing an ``out_h`` x ``out_w`` map."""
    per_output = (spec.in_channels // spec.groups) * spec.kernel * spec.kernel
    return per_output * spec.out_channels * out_h * out_w
