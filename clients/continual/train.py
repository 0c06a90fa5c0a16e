"""One local training of a continual-learning method (plain torch SGD, no Flower).

The ClientApp calls :func:`train_local` with the round's task data and the device's stored
state, and stores the state it returns. Everything is deterministic given ``seed``. One
device's round, in outline::

    task = schedule.task_at(server_round, device_id)
    x_t, y_t = make_task_data(x_dev, y_dev, task, schedule, seed=device_seed)
    method = base.for_device(profile.ram_bytes, profile.storage_bytes, x_dev.shape[1:])
    metrics, store[device_id] = train_local(
        model, x_t, y_t, method=method, epochs=e, batch_size=b, lr=lr,
        state=store.get(device_id), task=task, seed=round_seed)

With EWC the reply also carries ``pending_fisher(state)`` weighted by
``metrics["fisher_examples"]``; the server's ``aggregate_fisher`` of those goes back to
every device, which stores it with ``set_pending_fisher`` before its next round.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from clients.continual.methods import BaseLoss, ContinualMethod
from devices.errors import ConfigError, DataError

__all__ = ["train_local"]


def train_local(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    method: ContinualMethod,
    epochs: int,
    batch_size: int,
    lr: float,
    state: Mapping[str, np.ndarray] | None = None,
    task: int | None = None,
    momentum: float = 0.0,
    seed: int = 0,
    base_loss: BaseLoss | None = None,
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Train ``model`` in place on ``(x, y)`` with ``method``; return metrics and new state.

    Parameters
    ----------
    model : torch.nn.Module
        The model, holding the weights the round starts from.
    x, y : numpy.ndarray
        This round's local data: float inputs ``(N, ...)`` and int labels ``(N,)``.
    method : ContinualMethod
        The method (its hyper-parameters; its runtime state is reset here).
    epochs, batch_size, lr, momentum
        SGD's settings.
    state : mapping of str to numpy.ndarray, optional
        The device's continual state from the previous round (empty for a new device).
    task : int, optional
        The device's current task (``StreamSchedule.task_at``); a change from the stored
        task is a task boundary (EWC consolidates, LwF takes a teacher).
    seed : int
        Seed of the batch order and replay draws.
    base_loss : callable, optional
        ``(logits, labels) -> loss``; cross-entropy by default.

    Returns
    -------
    metrics : dict of str to float
        ``loss`` (mean training loss, terms included), ``examples`` (samples processed,
        replayed ones included), ``steps``, ``replay_size``; where they apply, the mean
        ``ewc_penalty`` / ``distill`` / ``fisher_capped`` and the extra work
        ``teacher_examples`` (LwF forwards) / ``fisher_examples`` (EWC per-sample
        backwards) for the cost model, and ``state_bytes``, what the new state takes in
        the device's storage.
    new_state : dict of str to numpy.ndarray
        The state to store for the device.
    """
    if epochs < 0 or batch_size < 1 or lr <= 0:
        raise ConfigError(f"train: expected epochs >= 0, batch_size >= 1, lr > 0, got "
                          f"{epochs}, {batch_size}, {lr}")
    if len(x) != len(y):
        raise DataError(f"x, y: {len(x)} inputs but {len(y)} labels")
    loss_fn = base_loss if base_loss is not None else nn.CrossEntropyLoss()
    method.begin(model, state, task, lr=lr)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng([seed, 0x7E])
    xt = torch.from_numpy(np.ascontiguousarray(x))
    yt = torch.from_numpy(np.asarray(y, dtype=np.int64))
    model.train()
    total, seen, steps = 0.0, 0, 0
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        for start in range(0, len(xt), batch_size):
            idx = perm[start:start + batch_size]
            xb, yb = method.replay_batch(xt[idx], yt[idx], rng)
            opt.zero_grad(set_to_none=True)
            loss = method.loss(model, xb, yb, loss_fn)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(xb)
            seen += len(xb)
            steps += 1
    new_state = method.end(model, x, y)
    metrics: dict[str, float] = {
        "loss": total / max(seen, 1),
        "examples": float(seen),
        "steps": float(steps),
        "replay_size": float(len(method.buffer)) if method.buffer is not None else 0.0,
    }
    metrics.update(method.term_means())
    metrics.update({k: float(v) for k, v in method.extra_work().items()})
    metrics["state_bytes"] = float(sum(v.nbytes for v in new_state.values()))
    return metrics, new_state
