"""The cost model: what one training (or inference) step of a real model costs on a device.

``training_step_cost`` measures a real step of the model (see ``devices._trace``) and
accounts it as a :class:`StepCost`; the other functions turn a ``StepCost`` and a
:class:`~devices.profiles.DeviceProfile` into time, energy and fit decisions.

Memory accounting of one training step (``StepCost.peak_bytes``), in bytes:

- ``weight_bytes``: every parameter and buffer (BN running statistics included), at the
  bytes per element a device stores: the tensor's own, or what its module declares in
  ``tinyfleet_param_itemsize`` (``{"weight": 1}`` for int8-grid weights, see
  ``clients.int8.prepare(weights="int8")``);
- ``grad_bytes``: one gradient per trainable parameter (the tensor's dtype: FP32 for
  int8-grid weights too, a conservative count);
- ``optimizer_bytes``: optimizer state per trainable parameter: SGD 0, SGD with momentum
  1 buffer, Adam/AdamW 2 buffers;
- ``activation_bytes``: the tensors autograd really saves for backward, deduplicated by
  storage, minus parameters and buffers (a saved weight is a weight, not an activation).
  All of them are alive at once at the turn from forward to backward, so the sum is the
  saved-tensor peak. An INT8 layer that saves int8 tensors counts 1 byte per element;
- ``transient_bytes``: the largest total, over the ops of the step in execution order, of
  the storages that are live at that op and not already counted above, where a storage
  is live from the first op that touches it to the last (e.g. a frozen layer's input and
  output in forward, a residual input waiting for its add, or ``grad_output`` and
  ``grad_input`` in backward).

``peak_bytes`` is their sum, a conservative bound: saved activations are counted at
their maximum (the turn from forward to backward) for the whole step, though backward
frees them as it goes, and a storage is taken to die only after its last use. Against
the peak resident-set growth of a real CPU step (``bench/cost_model.py``), activations +
gradients + transient came out 12-19% above what was measured in the three cases
measured (SmallCNN, MobileNetV2-w0.35, ResNet-18), never below.

On a device with ``frozen_weights_in_storage`` (an MCU executing from memory-mapped
Flash), frozen parameters stay in Flash and :func:`ram_needed_bytes` subtracts them.

Results are cached per (architecture signature, trainable set, input shape, batch size,
dtype, optimizer, momentum on/off, num_classes), because measuring slows a step several
fold; see :func:`cost_cache_info`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass

from torch import nn

from devices._trace import (
    LOSS_LAYER,
    ROOT_LAYER,
    NumClassesMismatchError,
    StepTrace,
    iter_leaf_params,
    trace_step,
)
from devices.errors import BudgetError, ConfigError, ProfileError
from devices.profiles import DeviceProfile
from devices.units import format_bytes

__all__ = [
    "LayerCost",
    "OPTIMIZERS",
    "SparsePlan",
    "StepCost",
    "TrainingEstimate",
    "check_fit",
    "clear_cost_cache",
    "comm_energy_j",
    "comm_time_s",
    "cost_cache_info",
    "describe_cost",
    "estimate_training",
    "idle_energy_j",
    "inference_cost",
    "plan_sparse_update",
    "ram_needed_bytes",
    "step_energy_j",
    "step_time_s",
    "training_step_cost",
    "with_memory_of",
]

# optimizer -> (state buffers per trainable parameter with momentum 0, with momentum > 0)
OPTIMIZERS: dict[str, tuple[int, int]] = {"sgd": (0, 1), "adam": (2, 2), "adamw": (2, 2)}
_CACHE_SIZE = 256


@dataclass(frozen=True)
class LayerCost:
    """Cost of one layer (the innermost module running an op) in one step.

    ``fwd_bytes``/``bwd_bytes`` are the bytes its ops read plus write (unfused), the
    roofline's memory term. ``params`` counts the parameters the module owns directly.
    ``dtype`` selects the profile throughput (``macs_per_s[dtype]``). ``saved_bytes`` is
    what autograd saved for backward while this layer ran (first saver of a storage).
    """

    name: str
    op_type: str
    fwd_macs: int
    bwd_macs: int
    fwd_bytes: int
    bwd_bytes: int
    params: int
    trainable: bool
    depthwise: bool
    dtype: str
    saved_bytes: int = 0


@dataclass(frozen=True)
class StepCost:
    """Measured cost of one step of a model; see the module docstring for the memory terms.

    ``kind`` is ``"training"`` or ``"inference"``. ``update_bytes`` is the memory traffic
    of the optimizer update (memory-bound). ``frozen_weight_bytes`` is the part of
    ``weight_bytes`` that is never written during the step (frozen parameters; everything
    for inference).
    """

    kind: str
    layers: tuple[LayerCost, ...]
    fwd_macs: int
    bwd_macs: int
    weight_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    transient_bytes: int
    peak_bytes: int
    param_count: int
    trainable_param_count: int
    frozen_weight_bytes: int
    update_bytes: int
    input_shape: tuple[int, ...]
    batch_size: int
    dtype: str
    optimizer: str
    trainable: tuple[str, ...]
    transient_layer: str
    measured_on: str

    @property
    def macs(self) -> int:
        """Forward plus backward MACs of the step."""
        return self.fwd_macs + self.bwd_macs


@dataclass(frozen=True)
class TrainingEstimate:
    """Time, energy and memory of ``steps`` training steps on one device."""

    compute_s: float
    energy_j: float
    peak_mem_bytes: int
    steps: int
    macs: int


@dataclass(frozen=True)
class SparsePlan:
    """Which parameters to train so that a step fits the device's RAM.

    ``bias_layers``/``weight_layers``: how many of the last parametrized layers train
    their biases / all their parameters (all of them when ``full``, i.e. when the full
    update fits).
    """

    trainable: tuple[str, ...]
    cost: StepCost
    full_cost: StepCost
    bias_layers: int
    weight_layers: int
    ram_needed_bytes: int
    ram_budget_bytes: int
    full: bool
    summary: str


# --------------------------------------------------------------------------- caching

_cache: OrderedDict[tuple[object, ...], StepCost] = OrderedDict()
_stats = {"hits": 0, "misses": 0}


def clear_cost_cache() -> None:
    """Forget every cached :class:`StepCost` and reset the hit/miss counters."""
    _cache.clear()
    _stats.update(hits=0, misses=0)


def cost_cache_info() -> dict[str, int]:
    """``{"hits": ..., "misses": ..., "size": ...}`` of the step-cost cache."""
    return {**_stats, "size": len(_cache)}


_PLAIN = (int, float, str, bool, tuple, type(None))


def _signature(model: nn.Module) -> str:
    """A digest of the architecture: module tree (classes and their plain attributes, so a
    custom module without ``extra_repr`` still counts), parameter and buffer shapes and
    dtypes. Weight values do not matter to the cost, so they are not part of it."""
    parts = [type(model).__qualname__, repr(model)]
    for name, mod in model.named_modules():
        attrs = sorted((k, repr(v)) for k, v in vars(mod).items()
                       if not k.startswith("_") and k != "training" and isinstance(v, _PLAIN))
        parts.append(f"{name}:{type(mod).__module__}.{type(mod).__qualname__}:{attrs}")
    parts += [f"{n}:{tuple(p.shape)}:{p.dtype}" for n, p in model.named_parameters()]
    parts += [f"{n}:{tuple(b.shape)}:{b.dtype}" for n, b in model.named_buffers()]
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()


# --------------------------------------------------------------------------- validation


def _check_shape(input_shape: object, batch_size: object) -> tuple[int, ...]:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    if (not isinstance(input_shape, tuple | list) or not input_shape
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0
                       for d in input_shape)):
        raise ConfigError(f"input_shape must be a non-empty tuple of positive integers "
                          f"(per sample, no batch), got {input_shape!r}")
    return tuple(input_shape)


def _resolve_trainable(model: nn.Module, trainable: Collection[str] | None) -> frozenset[str]:
    names = {n for n, _ in model.named_parameters()}
    if trainable is None:
        return frozenset(n for n, p in model.named_parameters() if p.requires_grad)
    if isinstance(trainable, str):
        raise ConfigError(f"trainable must be a collection of parameter names, got the "
                          f"string {trainable!r}")
    unknown = sorted(set(trainable) - names)
    if unknown:
        raise ConfigError(f"trainable: unknown parameter names {unknown[:5]}; the model's "
                          f"parameters are e.g. {sorted(names)[:5]}")
    return frozenset(trainable)


def _optimizer_buffers(optimizer: str, momentum: float) -> int:
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}")
    if momentum < 0:
        raise ConfigError(f"momentum must be >= 0, got {momentum!r}")
    return OPTIMIZERS[optimizer][1 if momentum > 0 else 0]


# --------------------------------------------------------------------------- accounting


def _depthwise(module: nn.Module | None) -> bool:
    groups = getattr(module, "groups", 1)
    return isinstance(groups, int) and groups > 1 and groups == getattr(module, "in_channels",
                                                                        None)


def _live_peak(trace: StepTrace, persistent: set[int]) -> tuple[int, str]:
    """Largest bytes of non-persistent storages live at one op, and that op's layer.

    A storage is live from the first op that touches it to the last one (inclusive).
    """
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    size: dict[int, int] = {}
    for i, op in enumerate(trace.ops):
        for key, nbytes in op.storages:
            if key in persistent:
                continue
            first.setdefault(key, i)
            last[key] = i
            size[key] = max(size.get(key, 0), nbytes)
    delta = [0] * (len(trace.ops) + 1)
    for key, start in first.items():
        delta[start] += size[key]
        delta[last[key] + 1] -= size[key]
    live, peak, where = 0, 0, ""
    for i, op in enumerate(trace.ops):
        live += delta[i]
        if live > peak:
            peak, where = live, op.layer
    return peak, where


def _stored_itemsize(module: nn.Module | None, full: str, p: nn.Parameter) -> int:
    """Bytes per element a device stores for parameter ``full``: the tensor's own, unless
    its module declares ``tinyfleet_param_itemsize`` (e.g. ``{"weight": 1}`` for int8-grid
    weights that the host keeps in FP32)."""
    declared = getattr(module, "tinyfleet_param_itemsize", None)
    if isinstance(declared, dict):
        size = declared.get(full.rsplit(".", 1)[-1])
        if isinstance(size, int) and size > 0:
            return size
    return p.element_size()


def _account(
    model: nn.Module,
    trace: StepTrace,
    *,
    kind: str,
    trainable: frozenset[str],
    input_shape: tuple[int, ...],
    batch_size: int,
    dtype: str,
    optimizer: str,
    state_buffers: int,
) -> StepCost:
    modules = dict(model.named_modules())
    own_params: dict[str, int] = {}
    own_trainable: dict[str, bool] = {}
    weight_bytes = grad_bytes = param_count = trainable_count = frozen_param_bytes = 0
    for layer, full, p in iter_leaf_params(model):
        nbytes = p.numel() * p.element_size()
        stored = p.numel() * _stored_itemsize(modules.get(layer), full, p)
        own_params[layer] = own_params.get(layer, 0) + p.numel()
        train = full in trainable
        own_trainable[layer] = own_trainable.get(layer, False) or train
        weight_bytes += stored
        param_count += p.numel()
        if train:
            grad_bytes += nbytes
            trainable_count += p.numel()
        else:
            frozen_param_bytes += stored
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    weight_bytes += buffer_bytes

    persistent = trace.param_keys | trace.buffer_keys
    saved = {k: v for k, v in trace.saved.items() if k not in persistent}
    activation_bytes = sum(nbytes for nbytes, _ in saved.values())
    persistent = persistent | set(saved) | trace.grad_keys

    per_layer: dict[str, list[int]] = {name: [0, 0, 0, 0, 0] for name in trace.layer_order}
    for op in trace.ops:
        acc = per_layer[op.layer]
        if op.phase == "fwd":
            acc[0] += op.macs
            acc[2] += op.bytes
        else:
            acc[1] += op.macs
            acc[3] += op.bytes
    transient, transient_layer = _live_peak(trace, persistent)
    for nbytes, layer in saved.values():
        per_layer.setdefault(layer, [0, 0, 0, 0, 0])[4] += nbytes

    layers = tuple(
        LayerCost(
            name=name,
            op_type=trace.layer_types.get(name, "?"),
            fwd_macs=acc[0],
            bwd_macs=acc[1],
            fwd_bytes=acc[2],
            bwd_bytes=acc[3],
            params=own_params.get(name, 0),
            trainable=own_trainable.get(name, False),
            depthwise=_depthwise(modules.get(name)) if name not in (LOSS_LAYER,
                                                                     ROOT_LAYER) else False,
            dtype=dtype,
            saved_bytes=acc[4],
        )
        for name, acc in per_layer.items()
    )
    optimizer_bytes = state_buffers * grad_bytes
    # update traffic: read w and g, write w; each state buffer is read and written
    update_bytes = (3 + 2 * state_buffers) * grad_bytes if grad_bytes else 0
    frozen = frozen_param_bytes if kind == "training" else weight_bytes
    peak = weight_bytes + grad_bytes + optimizer_bytes + activation_bytes + transient
    return StepCost(
        kind=kind,
        layers=layers,
        fwd_macs=sum(layer.fwd_macs for layer in layers),
        bwd_macs=sum(layer.bwd_macs for layer in layers),
        weight_bytes=weight_bytes,
        grad_bytes=grad_bytes,
        optimizer_bytes=optimizer_bytes,
        activation_bytes=activation_bytes,
        transient_bytes=transient,
        peak_bytes=peak,
        param_count=param_count,
        trainable_param_count=trainable_count,
        frozen_weight_bytes=frozen,
        update_bytes=update_bytes,
        input_shape=input_shape,
        batch_size=batch_size,
        dtype=dtype,
        optimizer=optimizer,
        trainable=tuple(sorted(trainable)),
        transient_layer=transient_layer,
        measured_on=trace.device,
    )


def _measured(
    model: nn.Module,
    input_shape: tuple[int, ...],
    batch_size: int,
    *,
    kind: str,
    trainable: frozenset[str],
    optimizer: str,
    momentum: float,
    dtype: str,
    num_classes: int | None,
) -> StepCost:
    state_buffers = _optimizer_buffers(optimizer, momentum) if kind == "training" else 0
    if not isinstance(dtype, str) or not dtype:
        raise ConfigError(f"dtype must be a throughput key such as 'fp32' or 'int8', "
                          f"got {dtype!r}")
    key = (_signature(model), kind, trainable, input_shape, batch_size, dtype, optimizer,
           state_buffers, num_classes)
    if key in _cache:
        _stats["hits"] += 1
        _cache.move_to_end(key)
        return _cache[key]
    _stats["misses"] += 1
    try:
        trace = trace_step(model, (batch_size, *input_shape), trainable,
                           num_classes=num_classes, training=kind == "training")
    except NumClassesMismatchError as exc:
        raise ConfigError(f"num_classes: {exc}") from exc
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ConfigError(f"input_shape {input_shape!r} (batch {batch_size}): the model "
                          f"cannot run a step on it: {exc}") from exc
    cost = _account(model, trace, kind=kind, trainable=trainable, input_shape=input_shape,
                    batch_size=batch_size, dtype=dtype, optimizer=optimizer,
                    state_buffers=state_buffers)
    _cache[key] = cost
    if len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return cost


def training_step_cost(
    model: nn.Module,
    input_shape: tuple[int, ...],
    batch_size: int,
    *,
    trainable: Collection[str] | None = None,
    optimizer: str = "sgd",
    momentum: float = 0.0,
    dtype: str = "fp32",
    num_classes: int | None = None,
) -> StepCost:
    """Measure one real training step (forward, loss, backward) of ``model``.

    Parameters
    ----------
    model : nn.Module
        The model; it is copied, never modified.
    input_shape : tuple of int
        Shape of one sample, without the batch dimension, e.g. ``(3, 224, 224)``.
    batch_size : int
        Samples per step.
    trainable : collection of str, optional
        Names (as in ``named_parameters()``) of the parameters that train; ``None`` means
        every parameter whose ``requires_grad`` is set (by default all of them).
    optimizer : {"sgd", "adam", "adamw"}
        Decides the optimizer state per trainable parameter.
    momentum : float
        SGD momentum; any value > 0 adds one state buffer.
    dtype : str
        Which profile throughput (``macs_per_s[dtype]``) the layers use. Bytes are always
        those the model's tensors really have.
    num_classes : int, optional
        Expected number of logits (checked against the model's output).

    Raises
    ------
    ConfigError
        If an argument is malformed or the model cannot run on that input.
    """
    shape = _check_shape(input_shape, batch_size)
    return _measured(model, shape, batch_size, kind="training",
                     trainable=_resolve_trainable(model, trainable), optimizer=optimizer,
                     momentum=momentum, dtype=dtype, num_classes=num_classes)


#: The terms of a :class:`StepCost` that say what memory the step holds (and of which
#: parameters), as opposed to what work it does.
_MEMORY_TERMS = ("activation_bytes", "transient_bytes", "peak_bytes", "weight_bytes",
                 "grad_bytes", "optimizer_bytes", "param_count", "trainable_param_count",
                 "frozen_weight_bytes", "trainable")


def with_memory_of(work: StepCost, memory: StepCost) -> StepCost:
    """A step that does ``work``'s work (layers, MACs, bytes moved: its time and energy)
    and holds ``memory``'s memory.

    For a model whose kernels the flop counter cannot see (the int8 GEMMs and convolutions
    of ``clients.int8``): ``work`` is the traced FP32 twin with ``dtype="int8"``, ``memory``
    the traced step of the converted model, which holds int8 codes.
    """
    return dataclasses.replace(work, **{name: getattr(memory, name) for name in _MEMORY_TERMS})


def inference_cost(
    model: nn.Module, input_shape: tuple[int, ...], batch_size: int = 1, *, dtype: str = "fp32"
) -> StepCost:
    """Measure one forward pass (eval mode, no grad), e.g. for a perception duty cycle.

    ``peak_bytes`` is the weights plus the largest live working set; every weight
    counts as frozen (``frozen_weight_bytes == weight_bytes``).
    """
    shape = _check_shape(input_shape, batch_size)
    return _measured(model, shape, batch_size, kind="inference", trainable=frozenset(),
                     optimizer="sgd", momentum=0.0, dtype=dtype, num_classes=None)


# --------------------------------------------------------------------------- time, energy


def _rate(profile: DeviceProfile, dtype: str) -> float:
    try:
        return profile.macs_per_s[dtype]
    except KeyError:
        raise ProfileError(f"profile {profile.name!r}: field 'macs_per_s' has no throughput "
                           f"for dtype {dtype!r}; it has {sorted(profile.macs_per_s)}") from None


def step_time_s(cost: StepCost, profile: DeviceProfile) -> float:
    """Roofline time of one step: per layer and direction, ``max(MACs / MAC rate, bytes /
    bandwidth)``, summed, plus the optimizer update as memory-bound traffic."""
    total = cost.update_bytes / profile.mem_bandwidth_bytes_per_s
    return total + sum(_layer_times(layer, profile)[0] for layer in cost.layers)


def _layer_times(layer: LayerCost, profile: DeviceProfile) -> tuple[float, bool]:
    """Roofline seconds of one layer (fwd + bwd) and whether memory bounds its forward."""
    bandwidth = profile.mem_bandwidth_bytes_per_s
    rate = _rate(profile, layer.dtype) if layer.fwd_macs or layer.bwd_macs else 1.0
    fwd_c, fwd_m = layer.fwd_macs / rate, layer.fwd_bytes / bandwidth
    seconds = max(fwd_c, fwd_m) + max(layer.bwd_macs / rate, layer.bwd_bytes / bandwidth)
    return seconds, fwd_m > fwd_c


def describe_cost(cost: StepCost, profile: DeviceProfile | None = None, *, top: int = 8) -> str:
    """A readable summary of a step: totals, memory terms and the costliest layers.

    With a profile, layers are ranked by roofline time and marked ``mem`` when memory
    traffic bounds their forward; without one, by MACs.
    """
    lines = [
        f"{cost.kind} step, batch {cost.batch_size} x {cost.input_shape}, {cost.dtype}, "
        f"{cost.optimizer}: {cost.fwd_macs / 1e6:,.1f} M MACs forward, "
        f"{cost.bwd_macs / 1e6:,.1f} M backward; {cost.trainable_param_count:,} of "
        f"{cost.param_count:,} parameters train",
        f"memory: weights {format_bytes(cost.weight_bytes)} + grads "
        f"{format_bytes(cost.grad_bytes)} + optimizer {format_bytes(cost.optimizer_bytes)} + "
        f"saved activations {format_bytes(cost.activation_bytes)} + transient "
        f"{format_bytes(cost.transient_bytes)} (at {cost.transient_layer}) = peak "
        f"{format_bytes(cost.peak_bytes)}",
    ]
    if profile is not None:
        lines.append(f"on {profile.name}: {step_time_s(cost, profile) * 1e3:,.2f} ms, "
                     f"{step_energy_j(cost, profile) * 1e3:,.3f} mJ, RAM "
                     f"{format_bytes(ram_needed_bytes(cost, profile))} of "
                     f"{format_bytes(profile.ram_bytes)}")
        timed = sorted(((*_layer_times(layer, profile), layer) for layer in cost.layers),
                       key=lambda row: -row[0])
        for seconds, memory_bound, layer in timed[:top]:
            lines.append(f"  {layer.name:<28} {layer.op_type:<18} {seconds * 1e3:>10.3f} ms"
                         f"{'  mem' if memory_bound else ''}")
    else:
        for layer in sorted(cost.layers, key=lambda row: -(row.fwd_macs + row.bwd_macs))[:top]:
            lines.append(f"  {layer.name:<28} {layer.op_type:<18} "
                         f"{(layer.fwd_macs + layer.bwd_macs) / 1e6:>10.2f} M MACs")
    return "\n".join(lines)


def step_energy_j(cost: StepCost, profile: DeviceProfile) -> float:
    """Energy of one step: its roofline time at the device's compute power."""
    return step_time_s(cost, profile) * profile.power_compute_w


def ram_needed_bytes(cost: StepCost, profile: DeviceProfile) -> int:
    """RAM one step needs on this device: ``peak_bytes``, less the frozen weights when the
    device reads them in place from storage (``frozen_weights_in_storage``)."""
    if profile.frozen_weights_in_storage:
        return cost.peak_bytes - cost.frozen_weight_bytes
    return cost.peak_bytes


def estimate_training(cost: StepCost, profile: DeviceProfile, steps: int) -> TrainingEstimate:
    """Compute time, energy, RAM and MACs of ``steps`` training steps."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ConfigError(f"steps must be a non-negative integer, got {steps!r}")
    t = step_time_s(cost, profile)
    return TrainingEstimate(
        compute_s=t * steps,
        energy_j=t * steps * profile.power_compute_w,
        peak_mem_bytes=ram_needed_bytes(cost, profile),
        steps=steps,
        macs=cost.macs * steps,
    )


def _check_bytes(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def comm_time_s(profile: DeviceProfile, bytes_up: int, bytes_down: int) -> float:
    """Transfer time: each direction that carries bytes costs ``latency + bytes / rate``."""
    up, down = _check_bytes("bytes_up", bytes_up), _check_bytes("bytes_down", bytes_down)
    total = 0.0
    if up:
        total += profile.latency_s + up / profile.uplink_bytes_per_s
    if down:
        total += profile.latency_s + down / profile.downlink_bytes_per_s
    return total


def comm_energy_j(profile: DeviceProfile, bytes_up: int, bytes_down: int) -> float:
    """Energy of a transfer: the device's radio-state power times :func:`comm_time_s`."""
    return profile.power_radio_w * comm_time_s(profile, bytes_up, bytes_down)


def idle_energy_j(profile: DeviceProfile, seconds: float) -> float:
    """Energy of waiting ``seconds`` in the idle state."""
    if seconds < 0:
        raise ConfigError(f"seconds must be >= 0, got {seconds!r}")
    return profile.power_idle_w * seconds


# --------------------------------------------------------------------------- budgets


def _fit_problems(cost: StepCost, profile: DeviceProfile, ram_budget: int,
                  weight_storage_bytes: int | None) -> list[str]:
    problems = []
    need = ram_needed_bytes(cost, profile)
    if need > ram_budget:
        problems.append(f"one {cost.kind} step needs {format_bytes(need)} of RAM; the device "
                        f"has {format_bytes(ram_budget)}")
    stored = cost.weight_bytes if weight_storage_bytes is None else weight_storage_bytes
    if stored > profile.storage_bytes:
        problems.append(f"the model's weights need {format_bytes(stored)} of storage; the "
                        f"device has {format_bytes(profile.storage_bytes)}")
    return problems


def check_fit(
    cost: StepCost, profile: DeviceProfile, *, weight_storage_bytes: int | None = None
) -> None:
    """Check that the weights fit storage and one step fits RAM.

    Parameters
    ----------
    weight_storage_bytes : int, optional
        Bytes the weights take in storage (e.g. int8-packed); default ``cost.weight_bytes``.

    Raises
    ------
    BudgetError
        E.g. ``"stm32f746: one training step needs 1.9 MB of RAM; the device has 320 KB"``
        (units as :func:`~devices.units.format_bytes`: 1 KB = 1024 bytes); both problems
        are reported, joined by ``"; "``, when both occur.
    """
    problems = _fit_problems(cost, profile, profile.ram_bytes, weight_storage_bytes)
    if problems:
        raise BudgetError(f"{profile.name}: " + "; ".join(problems))


# --------------------------------------------------------------------------- sparse update


def _largest(n: int, fits: Callable[[int], bool]) -> int:
    """Largest k in 1..n with ``fits(k)`` (assumed monotone: true up to some k), else 0."""
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def plan_sparse_update(
    model: nn.Module,
    input_shape: tuple[int, ...],
    batch_size: int,
    profile: DeviceProfile,
    *,
    optimizer: str = "sgd",
    momentum: float = 0.0,
    dtype: str = "fp32",
    num_classes: int | None = None,
    ram_budget_bytes: int | None = None,
    weight_storage_bytes: int | None = None,
    work_model: nn.Module | None = None,
) -> SparsePlan:
    """Choose which parameters train so that one step fits the device's RAM.

    In the spirit of sparse update in "On-Device Training Under 256KB Memory" (Lin et al.,
    NeurIPS 2022), in this priority order: (1) the last layer's bias (the minimum; if
    even that does not fit, no plan does); (2) the last layer's weights too (the
    classifier, which a new task needs most); (3) the biases of earlier layers, as many
    layers back as fit (a bias gradient needs no saved input); (4) all parameters of the
    last ``k`` layers, as many as fit. Everything else is frozen, and a frozen prefix
    needs neither saved activations nor ``dX``. Layers are the
    parametrized modules in execution order; every candidate is measured on the real
    graph (:func:`training_step_cost`), and the largest counts that fit are found by
    bisection (assuming the step's RAM grows with the number of layers trained).

    Parameters
    ----------
    ram_budget_bytes : int, optional
        RAM available to training; default ``profile.ram_bytes``.
    weight_storage_bytes : int, optional
        Bytes the weights take in storage (see :func:`check_fit`).
    work_model : nn.Module, optional
        A model with the same layers whose graph gives the step's work, for a ``model``
        whose kernels the flop counter cannot see (``clients.int8``: its FP32 twin). The
        plan is chosen on ``model``'s memory; the full and the chosen step are then costed
        :func:`with_memory_of` the twin's step with the same trainable parameters (those
        the twin has).

    Raises
    ------
    BudgetError
        If the weights do not fit storage (no plan can help), or if even training only
        the last layer's bias does not fit; the message gives that minimum and the layer
        where the live working set peaks.
    """
    budget = profile.ram_bytes if ram_budget_bytes is None else ram_budget_bytes

    def cost_of(trainable: Collection[str]) -> StepCost:
        return training_step_cost(model, input_shape, batch_size, trainable=trainable,
                                  optimizer=optimizer, momentum=momentum, dtype=dtype,
                                  num_classes=num_classes)

    def with_work(cost: StepCost) -> StepCost:
        if work_model is None:
            return cost
        names = {n for n, _ in work_model.named_parameters()}
        work = training_step_cost(work_model, input_shape, batch_size,
                                  trainable=[n for n in cost.trainable if n in names],
                                  optimizer=optimizer, momentum=momentum, dtype=dtype,
                                  num_classes=num_classes)
        return with_memory_of(work, cost)

    full = with_work(cost_of([n for n, _ in model.named_parameters()]))
    storage = _fit_problems(full, profile, 2**62, weight_storage_bytes)
    if storage:
        raise BudgetError(f"{profile.name}: {storage[0]}; no sparse update can fix that")

    def plan(cost: StepCost, k_bias: int, k_weight: int, summary: str) -> SparsePlan:
        return SparsePlan(cost.trainable, cost, full, k_bias, k_weight,
                          ram_needed_bytes(cost, profile), budget,
                          cost is full, summary)

    owned: dict[str, list[str]] = {}
    for layer, full_name, _ in iter_leaf_params(model):
        owned.setdefault(layer, []).append(full_name)
    layers = [layer.name for layer in full.layers if layer.name in owned]
    bias_of = {layer: [n for n in owned[layer] if n.rsplit(".", 1)[-1] == "bias"]
               for layer in layers}
    bias_layers = [layer for layer in layers if bias_of[layer]]
    full_need = ram_needed_bytes(full, profile)
    if full_need <= budget:
        return plan(full, len(bias_layers), len(layers), f"{profile.name}: the full update "
                    f"fits: {format_bytes(full_need)} of {format_bytes(budget)} RAM")

    def bias_set(k: int) -> set[str]:
        return {n for layer in bias_layers[len(bias_layers) - k:] for n in bias_of[layer]}

    def weight_set(k: int) -> set[str]:
        return {n for layer in layers[len(layers) - k:] for n in owned[layer]}

    def fits(trainable: set[str]) -> bool:
        return ram_needed_bytes(cost_of(trainable), profile) <= budget

    minimal = bias_set(1) if bias_layers else weight_set(1)
    if not fits(minimal):
        smallest = cost_of(minimal)
        what = (f"only the bias of {bias_layers[-1]!r}" if bias_layers
                else f"only {layers[-1]!r}")
        raise BudgetError(
            f"{profile.name}: no sparse update fits {format_bytes(budget)} of RAM: training "
            f"{what} needs {format_bytes(ram_needed_bytes(smallest, profile))} (full update: "
            f"{format_bytes(full_need)}); the largest live working set is "
            f"{format_bytes(smallest.transient_bytes)} in {smallest.transient_layer!r}, and "
            f"{format_bytes(smallest.activation_bytes)} of activations are saved")
    head = weight_set(1) if fits(minimal | weight_set(1)) else set()
    k_bias = _largest(len(bias_layers), lambda k: fits(head | bias_set(k)))
    base = head | bias_set(k_bias)
    k_weight = _largest(len(layers), lambda k: fits(base | weight_set(k)))
    chosen = with_work(cost_of(base | weight_set(k_weight)))
    summary = (
        f"{profile.name}: sparse update trains the biases of the last {k_bias} of "
        f"{len(bias_layers)} biased layers and all parameters of the last {k_weight} of "
        f"{len(layers)} layers ({chosen.trainable_param_count:,} of {chosen.param_count:,} "
        f"parameters): {format_bytes(ram_needed_bytes(chosen, profile))} of "
        f"{format_bytes(budget)} RAM (full update: {format_bytes(full_need)}); backward "
        f"{chosen.bwd_macs / 1e6:.1f} M MACs (full: {full.bwd_macs / 1e6:.1f} M)")
    return plan(chosen, k_bias, k_weight, summary)
