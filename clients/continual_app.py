"""tinyfleet's continual-learning ``ClientApp``: each device trains on its data stream.

The project's ClientApp (:mod:`clients.client_app`) trains every round on a device's whole
shard. Here the shard *arrives over time*: a run config with a ``[continual]`` table (see
:func:`clients.continual.continual_from_config`) gives each device a
:class:`~clients.continual.StreamSchedule`, and in round ``r`` the device trains only on
``make_task_data(shard, schedule.task_at(r, device))``, the current task's classes in its
domain, with the configured :class:`~clients.continual.ContinualMethod`.

Message contract (as the project's ClientApp, plus):

- ``train`` receives ``arrays`` (the global model), ``config`` (``server-round``,
  optionally ``lr``, ``local-epochs``) and, for EWC methods once the server has one,
  ``fleet-fisher``: a second ``ArrayRecord`` holding the fleet's mean Fisher diagonal keyed
  by parameter name. The device stores it as its pending Fisher
  (:func:`~clients.continual.set_pending_fisher`), so at its next task boundary it
  consolidates what the whole fleet found important.
- The reply's ``arrays`` hold the local model and, for EWC methods, the device's own
  Fisher of this round under the key prefix :data:`FISHER_PREFIX` (``"fisher/"``): one
  ``ArrayRecord`` per reply, as FedAvg requires; the server's wrapper
  (``sim.continual_server.FisherSharing``) strips the prefixed arrays before the inner
  strategy aggregates and averages them, weighted by ``fisher-examples``. A Fisher is as
  big as the model, too big for a ``MetricRecord``; its bytes count on the link both ways.
- The reply's ``metrics`` carry the usual cost figures (``num-examples``, ``train-loss``,
  ``compute-s``, ``energy-j``, ``peak-mem-bytes``, ``macs``, ``measured`` = 0) and the
  continual ones: ``partition-id``, ``task``, ``replay-size``, ``replay-capacity``, ``state-bytes``,
  ``fisher-examples``, ``teacher-examples``, ``replayed-examples``.

Per-device state (replay buffer, EWC Fisher and anchor, LwF teacher, last task) is a
``dict[str, numpy.ndarray]`` kept as one ``ArrayRecord`` under ``context.state``'s
:data:`STATE_KEY`; the engine's disk-backed store persists it between rounds.

Cost model. All work is charged by the cost model (``devices.cost``), never host time:

- training steps at the *effective* batch (local samples plus replayed ones, so replayed
  examples cost compute and their activations count in the RAM check);
- EWC's Fisher: one forward and backward at batch 1 per Fisher sample (no optimizer
  update);
- LwF: one teacher forward per distilled example;
- RAM: the step's peak plus what stays resident for the method (the replay buffer, EWC's
  Fisher and anchor, LwF's teacher); storage: the model plus the stored state. A device
  whose budget this exceeds fails with :class:`~devices.errors.BudgetError`.

Only FP32 SGD training is supported here (``train.optimizer = "sgd"``, ``train.precision =
"fp32"``, no ``[compression]``): :func:`~clients.continual.train_local` runs plain SGD.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.client_app import (
    _plan,
    _spec,
    build_training_model,
    device_of,
    evaluation_reply,
    fleet_data,
)
from clients.continual import (
    ContinualMethod,
    StreamSchedule,
    continual_from_config,
    make_task_data,
    pending_fisher,
    set_pending_fisher,
    train_local,
)
from clients.spec import ClientSpec, expand_run_config, unflatten
from clients.training import freeze_except
from devices.cost import estimate_training, inference_cost, step_time_s
from devices.errors import BudgetError, ConfigError, PayloadError
from devices.profiles import DeviceProfile

__all__ = [
    "FISHER_PREFIX",
    "FLEET_FISHER_KEY",
    "STATE_KEY",
    "app",
    "continual_of",
    "device_seed",
    "state_from_record",
    "state_to_record",
    "train_continual",
]

app = ClientApp()

STATE_KEY = "continual"
"""Key of the device's continual state (an ``ArrayRecord``) in ``context.state``."""
FISHER_PREFIX = "fisher/"
"""Prefix of the Fisher arrays inside a train reply's ``arrays``."""
FLEET_FISHER_KEY = "fleet-fisher"
"""Key of the fleet's mean Fisher (an ``ArrayRecord``) in a train message."""


@functools.lru_cache(maxsize=4)
def _continual_cached(key: tuple[tuple[str, Any], ...]) -> tuple[StreamSchedule, ContinualMethod]:
    doc = unflatten(expand_run_config(dict(key)))
    table = doc.get("continual")
    if not isinstance(table, Mapping):
        raise ConfigError("continual: expected a [continual] table in the run config")
    if doc.get("compression"):
        raise ConfigError("compression: not supported with [continual] (the continual apps "
                          "send plain arrays); remove the [compression] table")
    return continual_from_config(table)


def continual_of(run_config: Mapping[str, Any]) -> tuple[StreamSchedule, ContinualMethod]:
    """The stream schedule and the method a flat run config's ``continual.*`` keys give."""
    return _continual_cached(tuple(sorted(run_config.items())))


def _check_spec(spec: ClientSpec) -> None:
    if spec.train.optimizer != "sgd" or spec.train.precision != "fp32":
        raise ConfigError(f"train.optimizer/precision: continual learning trains with FP32 "
                          f"SGD, got {spec.train.optimizer!r}/{spec.train.precision!r}")


def device_seed(schedule: StreamSchedule, pid: int) -> int:
    """Seed of a device's domain noise (``make_task_data``): distinct per device."""
    return schedule.seed * 65_537 + pid + 1


def state_to_record(state: Mapping[str, np.ndarray]) -> ArrayRecord:
    """A device's continual state as an ``ArrayRecord`` (for ``context.state``)."""
    return ArrayRecord(OrderedDict((k, Array(np.ascontiguousarray(v)))
                                   for k, v in sorted(state.items())))


def state_from_record(record: ArrayRecord | None) -> dict[str, np.ndarray]:
    """Invert :func:`state_to_record` (an empty dict for a device without state)."""
    if record is None:
        return {}
    return {k: v.numpy() for k, v in record.items()}


def _nbytes(arrays: Mapping[str, np.ndarray], prefix: str) -> int:
    return sum(int(v.nbytes) for k, v in arrays.items() if k.startswith(prefix))


@functools.lru_cache(maxsize=16)
def _teacher_step_s(spec: ClientSpec, profile: DeviceProfile, batch: int) -> float:
    """Roofline seconds of one teacher forward of ``batch`` samples (LwF)."""
    with torch.random.fork_rng(devices=[]):
        cost = inference_cost(build_training_model(spec), fleet_data(spec).input_shape, batch)
    return step_time_s(cost, profile)


def _effective_batch(method: ContinualMethod, batch: int) -> int:
    """Samples in one step: the local batch plus the replayed ones (``replay_batch``)."""
    if not method.uses_replay or method.replay_capacity == 0:
        return batch
    return batch + min(method.replay_batch_size or batch, method.replay_capacity)


def train_continual(
    spec: ClientSpec,
    schedule: StreamSchedule,
    base: ContinualMethod,
    pid: int,
    profile: DeviceProfile,
    arrays: ArrayRecord,
    config: Mapping[str, Any],
    state: Mapping[str, np.ndarray],
    fleet_fisher: Mapping[str, np.ndarray] | None = None,
) -> tuple[ArrayRecord, MetricRecord, dict[str, np.ndarray]]:
    """One device's round on its stream; the pure core of the ``train`` handler.

    Returns
    -------
    arrays : ArrayRecord
        The local model, plus the device's Fisher under :data:`FISHER_PREFIX` (EWC).
    metrics : MetricRecord
        Cost and continual figures (see the module docstring).
    state : dict of str to numpy.ndarray
        The device's new continual state.

    Raises
    ------
    BudgetError
        When a step (with the replayed samples) or what the method keeps does not fit the
        device's RAM or storage.
    """
    _check_spec(spec)
    data = fleet_data(spec)
    x_dev, y_dev = data.device_data(pid)
    rnd = int(config.get("server-round", 1))
    task = schedule.task_at(rnd, pid)
    x, y = make_task_data(x_dev, y_dev, task, schedule, seed=device_seed(schedule, pid))
    method = base.for_device(profile.ram_bytes, profile.storage_bytes, data.input_shape)
    batch = max(1, min(spec.train.batch_size, len(x_dev)))
    eff = _effective_batch(method, batch)
    # Plans are cached per process; computing one must not move the training's RNG.
    with torch.random.fork_rng(devices=[]):
        trainable, cost, _ = _plan(spec, profile, eff)
        fisher_cost = _plan(spec, profile, 1)[1] if method.uses_ewc else None
    model = build_training_model(spec)
    model.load_state_dict(arrays.to_torch_state_dict(), strict=False)
    freeze_except(model, trainable)
    st = dict(state)
    if fleet_fisher is not None and method.uses_ewc:
        st = set_pending_fisher(st, fleet_fisher)
    lr = float(config.get("lr", spec.train.lr))
    epochs = int(config.get("local-epochs", spec.train.local_epochs))
    seed = (spec.seed * 1_000_003 + rnd * 10_007 + pid) % 2**31
    out, new_state = train_local(model, x, y, method=method, epochs=epochs, batch_size=batch,
                                 lr=lr, momentum=spec.train.momentum, state=st, task=task,
                                 seed=seed)
    replayed = out["examples"] - epochs * len(x)
    # Training steps: the cost model's step is a full effective batch; scale by examples.
    est = estimate_training(cost, profile, steps=1)
    factor = out["examples"] / eff
    compute_s, macs = est.compute_s * factor, est.macs * factor
    fisher_n = int(out.get("fisher_examples", 0))
    if fisher_cost is not None and fisher_n:
        # Per-sample forward + backward, no optimizer update.
        per = (step_time_s(fisher_cost, profile)
               - fisher_cost.update_bytes / profile.mem_bandwidth_bytes_per_s)
        compute_s += per * fisher_n
        macs += fisher_cost.macs * fisher_n
    teacher_n = int(out.get("teacher_examples", 0))
    if teacher_n:
        compute_s += _teacher_step_s(spec, profile, batch) * teacher_n / batch
        macs += teacher_n * _teacher_macs(spec)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    resident = (_nbytes(new_state, "replay/") + _nbytes(new_state, "ewc/fisher/")
                + _nbytes(new_state, "ewc/anchor/") + _nbytes(new_state, "lwf/teacher/"))
    peak = int(est.peak_mem_bytes + resident)
    stored = int(out["state_bytes"] + weight_bytes)
    _check_budget(profile, peak, stored)
    reply = OrderedDict((k, Array(v.detach().cpu().numpy()))
                        for k, v in model.state_dict().items())
    if method.uses_ewc:
        for k, v in pending_fisher(new_state).items():
            reply[FISHER_PREFIX + k] = Array(np.ascontiguousarray(v))
    metrics = MetricRecord({
        "num-examples": len(x),
        "train-loss": out["loss"],
        "compute-s": compute_s,
        "energy-j": compute_s * profile.power_compute_w,
        "peak-mem-bytes": peak,
        "macs": int(macs),
        "train-steps": int(out["steps"]),
        "trainable-params": cost.trainable_param_count,
        "measured": 0,
        "partition-id": pid,
        "task": task,
        "replay-size": int(out["replay_size"]),
        "replay-capacity": method.replay_capacity if method.uses_replay else 0,
        "replayed-examples": int(replayed),
        "state-bytes": int(out["state_bytes"]),
        "fisher-examples": fisher_n,
        "teacher-examples": teacher_n,
    })
    return ArrayRecord(reply), metrics, new_state


@functools.lru_cache(maxsize=4)
def _teacher_macs(spec: ClientSpec) -> int:
    with torch.random.fork_rng(devices=[]):
        cost = inference_cost(build_training_model(spec), fleet_data(spec).input_shape, 1)
    return int(cost.macs)


def _check_budget(profile: DeviceProfile, peak: int, stored: int) -> None:
    problems = []
    if peak > profile.ram_bytes:
        problems.append(f"a continual training step with its resident state needs {peak} "
                        f"bytes of RAM; the device has {profile.ram_bytes}")
    if stored > profile.storage_bytes:
        problems.append(f"the model and continual state need {stored} bytes of storage; "
                        f"the device has {profile.storage_bytes}")
    if problems:
        raise BudgetError(f"{profile.name}: " + "; ".join(problems))


def _fleet_fisher(content: RecordDict) -> dict[str, np.ndarray] | None:
    rec = content.array_records.get(FLEET_FISHER_KEY)
    if rec is None:
        return None
    out = {k: v.numpy() for k, v in rec.items()}
    bad = [k for k, v in out.items() if not np.all(np.isfinite(v))]
    if bad:
        raise PayloadError(f"{FLEET_FISHER_KEY}: non-finite values in {bad}")
    return out


def _node(msg: Message, context: Context) -> tuple[
        ClientSpec, StreamSchedule, ContinualMethod, int, DeviceProfile, Mapping[str, Any]]:
    """What a handler needs: experiment, stream, method, device and the message's config."""
    spec = _spec(context.run_config)
    schedule, base = continual_of(context.run_config)
    pid, profile = device_of(spec, context.node_config)
    config: Mapping[str, Any] = msg.content.config_records.get("config", {})
    return spec, schedule, base, pid, profile, config


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train on the current task of this device's stream; reply with model, Fisher, costs."""
    spec, schedule, base, pid, profile, config = _node(msg, context)
    state = state_from_record(context.state.array_records.get(STATE_KEY))
    arrays, metrics, new_state = train_continual(
        spec, schedule, base, pid, profile, msg.content.array_records["arrays"], config,
        state, _fleet_fisher(msg.content))
    context.state[STATE_KEY] = state_to_record(new_state)
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on every task this device has met, in their domains."""
    spec, schedule, _, pid, profile, config = _node(msg, context)
    rnd = int(config.get("server-round", 1))
    data = fleet_data(spec)
    x_dev, y_dev = data.device_data(pid)
    parts = [make_task_data(x_dev, y_dev, t, schedule, seed=device_seed(schedule, pid))
             for t in schedule.seen_tasks(rnd, pid)]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    return evaluation_reply(msg, spec, profile, x, y)
