"""tinyfleet's Flower ``ClientApp``: train and evaluate on a device's shard, report costs.

Message API contract (flwr 1.41+):

- ``train`` receives ``arrays`` (an ``ArrayRecord``, the global model) and ``config`` (a
  ``ConfigRecord``: ``server-round``, optionally ``lr``, ``local-epochs``, ``proximal-mu``);
  it replies with ``arrays`` (the local model) and ``metrics`` (a ``MetricRecord``):
  ``num-examples``, ``train-loss``, ``compute-s``, ``energy-j`` (compute only),
  ``peak-mem-bytes``, ``macs``, ``train-steps``, ``trainable-params`` and ``measured``
  (0: emulated by the cost model; 1: measured on real hardware).
- ``evaluate`` receives ``arrays`` and replies with ``metrics``: ``num-examples``,
  ``eval-loss``, ``eval-acc``, ``compute-s``, ``energy-j``.

The experiment reaches the app as Flower's flat run config (``clients.spec``). The node
config names the device: ``partition-id`` (and ``num-partitions``, as Flower's simulation
sets them) and optionally ``device`` (a profile name); without it the device follows from
the fleet mix and the seed, exactly as the engine assigns it. Communication time and
energy depend on the serialized messages, which only the runner sees: it adds them.

A job that does not fit the device's RAM raises :class:`~devices.errors.BudgetError`
(Flower turns it into an error reply naming what the step needs and what the device has),
unless ``train.on_budget = "sparse"``, in which case only the layers that fit train.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from clients.codecs import compression_mod
from clients.data import FleetData
from clients.measure import Meter, measure_enabled, process_age_s
from clients.models import build_model
from clients.spec import ClientSpec, TrainSpec
from clients.training import evaluate_model, freeze_except, make_optimizer, train_model
from devices.cost import (
    StepCost,
    check_fit,
    estimate_training,
    inference_cost,
    plan_sparse_update,
    step_time_s,
    training_step_cost,
    with_memory_of,
)
from devices.errors import BudgetError
from devices.fleet import assign_profiles
from devices.profiles import DeviceProfile, load_profile, register_profile_dir

__all__ = [
    "app",
    "build_client_model",
    "build_training_model",
    "device_of",
    "evaluation_reply",
    "fleet_data",
    "train_on_device",
]

# compression_mod sends the compressed update the server asks for (its train messages
# name the codec; ``strategies.CompressedStrategy``) and is a pass-through otherwise.
app = ClientApp(mods=[compression_mod()])


@functools.lru_cache(maxsize=4)
def _spec_cached(key: tuple[tuple[str, Any], ...]) -> ClientSpec:
    spec = ClientSpec.from_run_config(dict(key))
    if spec.fleet.profiles_dir:
        register_profile_dir(spec.fleet.profiles_dir)
    return spec


def _spec(run_config: Mapping[str, Any]) -> ClientSpec:
    return _spec_cached(tuple(sorted(run_config.items())))


@functools.lru_cache(maxsize=4)
def fleet_data(spec: ClientSpec) -> FleetData:
    """The fleet's data, loaded once per process and shared by every device it runs."""
    return FleetData(spec.data, spec.fleet.size, spec.seed)


@functools.lru_cache(maxsize=4)
def _assignment(spec: ClientSpec) -> tuple[str, ...]:
    return tuple(assign_profiles(spec.fleet.mix, spec.fleet.size, spec.seed))


def device_of(spec: ClientSpec, node_config: Mapping[str, Any]) -> tuple[int, DeviceProfile]:
    """The partition id and device profile of the node this app runs on."""
    pid = int(node_config.get("partition-id", 0))
    name = node_config.get("device")
    if not name:
        name = _assignment(spec)[pid % spec.fleet.size]
    return pid, load_profile(str(name))


def build_client_model(spec: ClientSpec, data: FleetData) -> nn.Module:
    """The configured model, sized for the data (channels, classes), in FP32 or INT8."""
    kwargs: dict[str, Any] = {"num_classes": data.num_classes, **spec.model.args}
    if spec.model.name in ("mlp",):
        kwargs.setdefault("in_features", int(np.prod(data.input_shape)))
    else:
        kwargs.setdefault("in_channels", data.input_shape[0])
    return build_model(spec.model.name, **kwargs)


def build_training_model(spec: ClientSpec) -> nn.Module:
    """The model as devices train it (INT8-prepared when configured): the server builds
    its initial global model with this too, so both sides hold the same state-dict keys."""
    model = build_client_model(spec, fleet_data(spec))
    return _prepare_precision(model, spec.train)


def int8_options(train: TrainSpec) -> dict[str, Any]:
    """``clients.int8.prepare`` options of a ``[train]`` table (``int8_*`` fields)."""
    return {
        "prc": train.int8_prc,
        "lac": train.int8_lac,
        "stochastic": train.int8_rounding == "stochastic",
        "weights": "int8" if train.int8_weights else "fp32",
        "qas": train.int8_qas and train.int8_weights,
    }


def _prepare_precision(model: nn.Module, train: TrainSpec) -> nn.Module:
    if train.precision == "int8":
        from clients import int8

        return int8.prepare(model, **int8_options(train))
    return model


@functools.lru_cache(maxsize=64)
def _plan(
    spec: ClientSpec, profile: DeviceProfile, batch: int
) -> tuple[tuple[str, ...] | None, StepCost, str]:
    """Which parameters train on this device, the step's cost, and a note on the plan.

    Cached per (experiment, profile, batch): the plan is the same for every device of a
    profile, and counting a step is several times slower than running one.
    """
    data = fleet_data(spec)
    model = _prepare_precision(build_client_model(spec, data), spec.train)
    kw = {
        "optimizer": spec.train.optimizer,
        "momentum": spec.train.momentum,
        "dtype": spec.train.precision,
    }
    storage = _weight_storage_bytes(model, spec.train.precision)
    cost = training_step_cost(model, data.input_shape, batch, **kw)  # type: ignore[arg-type]
    if spec.train.precision == "int8":
        cost = _int8_cost(spec, data, batch, cost, kw)
    try:
        check_fit(cost, profile, weight_storage_bytes=storage)
        return None, cost, "full"
    except BudgetError:
        if spec.train.on_budget != "sparse":
            raise
    # INT8: the work of each plan from the FP32 twin (see _int8_cost)
    work = build_client_model(spec, data) if spec.train.precision == "int8" else None
    plan = plan_sparse_update(
        model, data.input_shape, batch, profile, weight_storage_bytes=storage,
        work_model=work, **kw
    )  # type: ignore[arg-type]
    return plan.trainable, plan.cost, plan.summary


def _int8_cost(
    spec: ClientSpec, data: FleetData, batch: int, measured: StepCost, kw: dict[str, Any]
) -> StepCost:
    """An INT8 step's cost: MACs and time from the FP32 graph at INT8 throughput,
    memory from a real step of the INT8 model.

    torch's flop counter does not see the int8 kernels (``_int_mm``, oneDNN's int8
    convolution), so the INT8 model's own trace reports no MACs; the layer structure,
    and so the work, is that of the FP32 model, which the cost model runs with the
    profile's ``int8`` throughput for conv/linear layers. The bytes the step really holds
    (int8 saved codes, FP32 master weights, gradients, optimizer state) come from
    ``measured``, the traced step of the prepared model.
    """
    twin = training_step_cost(build_client_model(spec, data), data.input_shape, batch, **kw)
    return with_memory_of(twin, measured)


def _weight_storage_bytes(model: nn.Module, precision: str) -> int:
    if precision == "int8":
        from clients import int8

        return int(int8.exported_size_bytes(int8.export(model)))
    return sum(p.numel() * p.element_size() for p in model.parameters())


def train_on_device(
    spec: ClientSpec,
    pid: int,
    profile: DeviceProfile,
    arrays: ArrayRecord,
    config: Mapping[str, Any],
) -> tuple[ArrayRecord, MetricRecord]:
    """Train the global model on one device's shard; the pure core of the ``train`` handler.

    Raises
    ------
    BudgetError
        When the step does not fit the device and sparse adaptation is off (or cannot help).
    """
    data = fleet_data(spec)
    x, y = data.device_data(pid)
    batch = min(spec.train.batch_size, len(x))
    # The plan is cached per process: whether this call computes it must not change the
    # RNG stream the training sees (else results would depend on which worker ran it).
    with torch.random.fork_rng(devices=[]):
        trainable, cost, _ = _plan(spec, profile, batch)
    model = build_training_model(spec)
    model.load_state_dict(arrays.to_torch_state_dict(), strict=False)
    freeze_except(model, trainable)
    lr = float(config.get("lr", spec.train.lr))
    epochs = int(config.get("local-epochs", spec.train.local_epochs))
    mu = float(config.get("proximal-mu", spec.train.proximal_mu))
    opt = make_optimizer(model, spec.train.optimizer, lr, spec.train.momentum,
                         spec.train.weight_decay)
    extra = _extra_loss(model, mu, spec.train.precision)
    result = train_model(model, x, y, epochs=epochs, batch_size=batch, optimizer=opt,
                         extra_loss=extra)
    # The cost model's step is a full batch; scale by the examples really processed.
    est = estimate_training(cost, profile, steps=1)
    factor = result.examples / batch
    metrics = MetricRecord(
        {
            "num-examples": len(x),
            "train-loss": result.loss,
            "compute-s": est.compute_s * factor,
            "energy-j": est.energy_j * factor,
            "peak-mem-bytes": est.peak_mem_bytes,
            "macs": int(est.macs * factor),
            "train-steps": result.steps,
            "trainable-params": cost.trainable_param_count,
            "measured": 0,
        }
    )
    return ArrayRecord(model.state_dict()), metrics


def _extra_loss(model: nn.Module, mu: float, precision: str) -> Any:
    terms = []
    if mu > 0:
        anchor = [p.detach().clone() for p in model.parameters()]

        def prox(m: nn.Module) -> torch.Tensor:
            return (mu / 2) * sum(
                ((p - a) ** 2).sum()
                for p, a in zip(m.parameters(), anchor, strict=True)
                if p.requires_grad
            )

        terms.append(prox)
    if precision == "int8":
        from clients import int8

        terms.append(int8.lac_penalty)
    if not terms:
        return None
    return lambda m: sum(t(m) for t in terms)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train on this device's shard and reply with the local model and its costs."""
    spec = _spec(context.run_config)
    pid, profile = device_of(spec, context.node_config)
    config = msg.content.config_records.get("config", {})
    arrays = msg.content.array_records["arrays"]
    if measure_enabled(context.node_config):
        return _measured_train(msg, spec, pid, profile, arrays, config)
    new_arrays, metrics = train_on_device(spec, pid, profile, arrays, config)
    return Message(RecordDict({"arrays": new_arrays, "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on this device's shard."""
    spec = _spec(context.run_config)
    pid, profile = device_of(spec, context.node_config)
    if measure_enabled(context.node_config):
        return _measured_evaluate(msg, spec, pid, profile)
    data = fleet_data(spec)
    x, y = data.device_data(pid)
    return evaluation_reply(msg, spec, profile, x, y)


def evaluation_reply(
    msg: Message, spec: ClientSpec, profile: DeviceProfile, x: np.ndarray, y: np.ndarray
) -> Message:
    """Evaluate the received model on ``(x, y)``; reply with its metrics and device cost.

    Shared by every evaluate handler of the project's apps: the emulated inference time
    is the cost model's per-sample time on ``profile`` (counted under a forked RNG, so a
    process's cache state never changes what a later task draws).
    """
    model = build_training_model(spec)
    model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict(),
                          strict=False)
    loss, acc = evaluate_model(model, x, y) if len(x) else (0.0, 0.0)
    with torch.random.fork_rng(devices=[]):
        cost = inference_cost(model, fleet_data(spec).input_shape, batch_size=1)
    compute = step_time_s(cost, profile) * len(x)
    metrics = MetricRecord(
        {
            "num-examples": len(x),
            "eval-loss": loss,
            "eval-acc": acc,
            "compute-s": compute,
            "energy-j": compute * profile.power_compute_w,
            "measured": 0,
        }
    )
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


# --- Real devices (clients.measure): the same work, measured instead of emulated -------


def _device_record(pid: int, profile: DeviceProfile, meter: Meter) -> ConfigRecord:
    """Who replied: the server side files measured rows under this device and profile."""
    return ConfigRecord({
        "partition-id": pid,
        "profile": profile.name,
        "device-class": profile.device_class,
        "energy-source": meter.energy_source,
    })


def _measured_train(msg: Message, spec: ClientSpec, pid: int, profile: DeviceProfile,
                    arrays: ArrayRecord, config: Mapping[str, Any]) -> Message:
    app_start = process_age_s()
    # Load the data and plan the step first: the cost model's counting is bookkeeping,
    # not the device's training, and must not be timed as compute.
    x, _ = fleet_data(spec).device_data(pid)
    _plan(spec, profile, min(spec.train.batch_size, len(x)))
    with Meter() as meter:
        new_arrays, emulated = train_on_device(spec, pid, profile, arrays, config)
    metrics = MetricRecord(dict(emulated))
    metrics["compute-s"] = meter.wall_s
    metrics["energy-j"] = meter.energy_j
    metrics["peak-mem-bytes"] = meter.peak_mem_bytes
    metrics["measured"] = 1
    metrics["app-start-s"] = app_start
    content = RecordDict({"arrays": new_arrays, "metrics": metrics,
                          "device": _device_record(pid, profile, meter)})
    return Message(content, reply_to=msg)


def _measured_evaluate(msg: Message, spec: ClientSpec, pid: int,
                       profile: DeviceProfile) -> Message:
    app_start = process_age_s()
    x, y = fleet_data(spec).device_data(pid)
    with Meter() as meter:
        model = build_training_model(spec)
        model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict(),
                              strict=False)
        loss, acc = evaluate_model(model, x, y)
    metrics = MetricRecord({
        "num-examples": len(x),
        "eval-loss": loss,
        "eval-acc": acc,
        "compute-s": meter.wall_s,
        "energy-j": meter.energy_j,
        "measured": 1,
        "app-start-s": app_start,
    })
    content = RecordDict({"metrics": metrics, "device": _device_record(pid, profile, meter)})
    return Message(content, reply_to=msg)
