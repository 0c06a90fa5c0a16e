"""Measure one real training (or inference) step of a model: MACs, bytes, saved tensors.

This is the measuring half of the cost model (``devices.cost`` turns the measurement into
a ``StepCost``). It runs the model's real forward and backward pass, on the ``meta``
device when the model allows it (no arithmetic, no memory, any batch size) and on the CPU
otherwise (e.g. a layer that calls ``.item()``), and observes:

- every ATen op, through a ``TorchDispatchMode``: its MACs (the formulas of
  ``torch.utils.flop_counter``, divided by 2 since they count a MAC as 2 FLOPs), the bytes
  it reads and writes, and the storages it touches; ops are attributed to the innermost
  ``nn.Module`` running them, forward or backward (see ``_Layers``);
- every tensor autograd saves for backward, through
  ``torch.autograd.graph.saved_tensors_hooks``, deduplicated by storage.

Backward MACs come from the ops autograd really runs given which parameters require grad:
no ``dX`` below the lowest trainable layer, no ``dW`` for frozen weights. One correction to
torch's formulas: ``torch.utils.flop_counter`` counts a grouped convolution's weight
gradient as if it were dense (``groups`` times too many; 19x the forward for
MobileNetV2), so ``convolution_backward`` is counted here as the forward MACs once per
gradient it computes, which is exact for grouped, depthwise and transposed convolutions.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import (
    register_module_forward_hook,
    register_module_forward_pre_hook,
)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import conv_flop_count, flop_registry

__all__ = ["NumClassesMismatchError", "OpRecord", "StepTrace", "trace_step"]

_aten = torch.ops.aten
LOSS_LAYER = "(loss)"
ROOT_LAYER = "(model)"


class NumClassesMismatchError(ValueError):
    """The model's logits disagree with the ``num_classes`` asked for."""


@dataclass
class OpRecord:
    """One ATen op of the step."""

    layer: str
    phase: str  # "fwd" | "bwd"
    macs: int
    bytes: int  # logical bytes read (tensor inputs) + written (tensor outputs)
    storages: list[tuple[int, int]]  # (storage key, storage bytes) of inputs and outputs


@dataclass
class StepTrace:
    """What one step did, before any accounting decisions."""

    ops: list[OpRecord]
    saved: dict[int, tuple[int, str]]  # storage key -> (bytes, layer that saved it first)
    param_keys: set[int]
    buffer_keys: set[int]
    grad_keys: set[int]
    layer_types: dict[str, str]
    layer_order: list[str]  # layers in first-execution order
    device: str
    _keep: list[Any] = field(default_factory=list, repr=False)


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    try:
        storage = t.untyped_storage()
    except RuntimeError:
        # Opaque tensors (e.g. oneDNN's packed int8 weights) have no storage to share:
        # each is its own allocation.
        return id(t), t.numel() * t.element_size()
    return storage._cdata, storage.nbytes()


def _keepalive(t: torch.Tensor) -> Any:
    """What keeps ``t``'s memory alive until accounted (its storage, or itself)."""
    try:
        return t.untyped_storage()
    except RuntimeError:
        return t


def _conv_backward_macs(args: tuple[Any, ...], out: Any) -> int:
    """MACs of ``aten.convolution_backward``: forward MACs once per computed gradient."""
    grad_out, x, w = args[0], args[1], args[2]
    transposed, output_mask = bool(args[7]), args[10]
    fwd = conv_flop_count(list(x.shape), list(w.shape), list(grad_out.shape), transposed) // 2
    return fwd * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def _op_macs(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    packet = func._overloadpacket
    if packet is _aten.convolution_backward:
        return _conv_backward_macs(args, out)
    formula = flop_registry.get(packet)
    if formula is None:
        return 0
    return int(formula(*args, **kwargs, out_val=out)) // 2


class _Layers:
    """Which layer is running: a module stack in forward, autograd nodes in backward.

    Forward: global module pre/post hooks keep a stack of the copy's modules. When a
    module's forward returns, it claims every autograd node between its outputs and its
    inputs that no inner module claimed (post-hooks fire innermost first), so a block's
    residual add belongs to the block and a convolution's node to the convolution.
    Backward: ``torch._C._current_autograd_node()`` names the node being run, hence the
    layer. Ops of no module (the loss) belong to ``LOSS_LAYER``.
    """

    def __init__(self, model: nn.Module) -> None:
        self.names = {id(mod): (name or ROOT_LAYER) for name, mod in model.named_modules()}
        self.stack: list[str] = []
        self.boundaries: list[set[Any]] = []
        self.node_layer: dict[Any, str] = {}
        self._handles: list[Any] = []

    def current(self) -> str:
        node = torch._C._current_autograd_node()
        if node is not None:
            return self.node_layer.get(node, LOSS_LAYER)
        return self.stack[-1] if self.stack else LOSS_LAYER

    def _pre(self, module: nn.Module, args: Any) -> None:
        name = self.names.get(id(module))
        if name is None:
            return
        self.stack.append(name)
        self.boundaries.append({t.grad_fn for t in tree_flatten(args)[0]
                                if isinstance(t, torch.Tensor) and t.grad_fn is not None})

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        name = self.names.get(id(module))
        if name is None:
            return
        self.stack.pop()
        boundary = self.boundaries.pop()
        todo: list[Any] = [t.grad_fn for t in tree_flatten(output)[0]
                           if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        seen: set[Any] = set()
        while todo:
            node = todo.pop()
            if node is None or node in seen or node in boundary:
                continue
            seen.add(node)
            self.node_layer.setdefault(node, name)
            todo.extend(next_node for next_node, _ in node.next_functions)

    def __enter__(self) -> _Layers:
        self._handles = [register_module_forward_pre_hook(self._pre),
                         register_module_forward_hook(self._post)]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()


class _Recorder(TorchDispatchMode):
    """Dispatch mode that records every non-view op and attributes it to a layer."""

    def __init__(self, layers: _Layers) -> None:
        super().__init__()
        self.layers = layers
        self.phase = "fwd"
        self.ops: list[OpRecord] = []
        self.keep: list[Any] = []  # hold storages so their keys are not reused

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if getattr(func, "is_view", False):
            return out
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not ins and not outs:
            return out
        nbytes = sum(t.numel() * t.element_size() for t in ins + outs)
        storages = []
        for t in ins + outs:
            storages.append(_storage_key(t))
            self.keep.append(_keepalive(t))
        self.ops.append(
            OpRecord(self.layers.current(), self.phase, _op_macs(func, args, kwargs, out),
                     nbytes, storages)
        )
        return out


def _loss(out: Any, num_classes: int | None) -> torch.Tensor:
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"model returned {type(out).__name__}, expected a tensor of logits")
    if out.dim() == 2 and out.is_floating_point():
        classes = out.shape[1]
        if num_classes is not None and num_classes != classes:
            raise NumClassesMismatchError(f"num_classes={num_classes} but the model outputs "
                                     f"{classes} logits")
        target = torch.randint(0, classes, (out.shape[0],), device=out.device)
        return nn.functional.cross_entropy(out, target)
    return out.float().square().mean()


def _input_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _run(
    model: nn.Module,
    shape: tuple[int, ...],
    trainable: Collection[str],
    num_classes: int | None,
    training: bool,
    device: str,
) -> StepTrace:
    m = copy.deepcopy(model).to(device)
    for name, p in m.named_parameters():
        p.requires_grad_(training and name in trainable)
    m.train(training)
    layer_types = {name or ROOT_LAYER: type(mod).__name__ for name, mod in m.named_modules()}
    layer_types[LOSS_LAYER] = "loss"
    param_keys = {_storage_key(p)[0] for p in m.parameters()}
    buffer_keys = {_storage_key(b)[0] for b in m.buffers()}
    x = torch.randn(shape, dtype=_input_dtype(m), device=device)
    saved: dict[int, tuple[int, str]] = {}
    layers = _Layers(m)
    recorder = _Recorder(layers)

    def pack(t: torch.Tensor) -> torch.Tensor:
        key, nbytes = _storage_key(t)
        if key not in saved:
            saved[key] = (nbytes, layers.current())
            recorder.keep.append(_keepalive(t))
        return t

    with ExitStack() as stack:
        stack.enter_context(layers)
        stack.enter_context(recorder)
        if training:
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
            loss = _loss(m(x), num_classes)
            recorder.phase = "bwd"
            if loss.requires_grad:
                loss.backward()
        else:
            stack.enter_context(torch.no_grad())
            m(x)
    grad_keys = {_storage_key(p.grad)[0] for p in m.parameters() if p.grad is not None}
    order: list[str] = []
    seen: set[str] = set()
    for op in recorder.ops:
        if op.layer not in seen:
            seen.add(op.layer)
            order.append(op.layer)
    return StepTrace(recorder.ops, saved, param_keys, buffer_keys, grad_keys, layer_types,
                     order, device, recorder.keep)


def trace_step(
    model: nn.Module,
    shape: tuple[int, ...],
    trainable: Collection[str],
    *,
    num_classes: int | None = None,
    training: bool = True,
) -> StepTrace:
    """Run one step of a copy of ``model`` on a batch of ``shape`` and record it.

    Tries the ``meta`` device first and falls back to the CPU if the model cannot run
    there (the CPU run keeps every storage of the step alive until it is accounted, so
    it needs about twice the step's memory). ``model`` itself is not modified (its copy
    is). Layer tracking uses global module hooks, but they ignore every module except the
    copy's, and the dispatch mode and saved-tensor hooks are thread-local, so a model
    training in another thread meanwhile is neither recorded nor disturbed.

    Raises
    ------
    Exception
        Whatever the model's own forward raises on the CPU (e.g. a shape mismatch).
    """
    try:
        return _run(model, shape, trainable, num_classes, training, "meta")
    except Exception:  # any failure on meta: the CPU run decides what is really wrong
        return _run(model, shape, trainable, num_classes, training, "cpu")


def iter_leaf_params(model: nn.Module) -> Iterator[tuple[str, str, nn.Parameter]]:
    """(layer name, full parameter name, parameter) for parameters owned directly by a module."""
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            yield (mod_name or ROOT_LAYER), full, p
