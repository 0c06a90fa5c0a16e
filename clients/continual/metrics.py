"""Continual-learning metrics on an accuracy matrix.

``R[i, j]`` is the accuracy on task ``j`` after training through task ``i`` (rows: tasks
trained, or evaluation rounds; columns: tasks). Entries not measured yet (a task not seen)
are ``NaN`` and ignored. Definitions:

* average accuracy: mean of the last row over its measured tasks;
* forgetting (Chaudhry et al., ECCV 2018): over the tasks ``j`` before the last row's
  newest, the mean of ``max_{l < T-1} R[l, j] - R[T-1, j]`` (>= 0 up to noise);
* backward transfer (Lopez-Paz & Ranzato, NeurIPS 2017): mean over ``j < T-1`` of
  ``R[T-1, j] - R[j, j]`` (negative when training later tasks hurt earlier ones); needs a
  square task matrix, see :func:`task_matrix`.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np
import torch
from torch import nn

from devices.errors import DataError

__all__ = [
    "accuracy_row",
    "average_accuracy",
    "backward_transfer",
    "forgetting",
    "task_matrix",
]


def _matrix(R: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    m = np.asarray(R, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] < 1 or m.shape[1] < 1:
        raise DataError(f"accuracy matrix: expected a non-empty 2-D array, got shape {m.shape}")
    return m


def average_accuracy(R: np.ndarray | Sequence[Sequence[float]]) -> float:
    """Mean accuracy over the measured tasks of the last row."""
    last = _matrix(R)[-1]
    vals = last[np.isfinite(last)]
    if not len(vals):
        raise DataError("accuracy matrix: the last row has no measured task")
    return float(vals.mean())


def forgetting(R: np.ndarray | Sequence[Sequence[float]]) -> float:
    """Chaudhry et al.'s average forgetting at the last row (0 with a single row).

    A task counts when it was measured in an earlier row and in the last one; the newest
    task of the last row (its rightmost measured column) is excluded.
    """
    m = _matrix(R)
    if m.shape[0] < 2:
        return 0.0
    last, earlier = m[-1], m[:-1]
    measured = np.flatnonzero(np.isfinite(last))
    drops = []
    for j in measured[:-1]:
        col = earlier[:, j][np.isfinite(earlier[:, j])]
        if len(col):
            drops.append(col.max() - last[j])
    return float(np.mean(drops)) if drops else 0.0


def backward_transfer(R: np.ndarray | Sequence[Sequence[float]]) -> float:
    """Lopez-Paz & Ranzato's BWT: mean of ``R[T-1, j] - R[j, j]`` for ``j < T-1``.

    Raises
    ------
    DataError
        If ``R`` is not square (rows must be task ends; see :func:`task_matrix`).
    """
    m = _matrix(R)
    if m.shape[0] != m.shape[1]:
        raise DataError(f"backward_transfer: expected a square task matrix, got {m.shape}")
    t = m.shape[0]
    if t < 2:
        return 0.0
    return float(np.mean([m[-1, j] - m[j, j] for j in range(t - 1)]))


def task_matrix(round_matrix: np.ndarray, round_tasks: Sequence[int]) -> np.ndarray:
    """Rows of a per-round matrix taken at each task's last round.

    Parameters
    ----------
    round_matrix : numpy.ndarray
        ``(rounds, tasks)`` accuracies, row r measured after round r.
    round_tasks : sequence of int
        The task trained in each round (non-decreasing).

    Returns
    -------
    numpy.ndarray
        ``(tasks_reached, tasks)``: row i is the last round of task i.
    """
    m = _matrix(round_matrix)
    tasks = np.asarray(round_tasks)
    if len(tasks) != m.shape[0] or np.any(np.diff(tasks) < 0):
        raise DataError(f"round_tasks: expected {m.shape[0]} non-decreasing task ids, got "
                        f"{list(tasks)}")
    rows = [int(np.flatnonzero(tasks == t)[-1]) for t in range(int(tasks.max()) + 1)
            if np.any(tasks == t)]
    return m[rows]


@torch.no_grad()
def accuracy_row(
    model: nn.Module, tasks: Sequence[tuple[np.ndarray, np.ndarray]], batch_size: int = 512,
    only: Collection[int] | None = None,
) -> np.ndarray:
    """Accuracy of ``model`` on each task's ``(x, y)``: one row of ``R``.

    ``NaN`` for an empty task and, when ``only`` is given (e.g. a device's
    ``schedule.seen_tasks(round, device)``), for every task not in it.
    """
    was_training = model.training
    model.eval()
    out = np.full(len(tasks), np.nan)
    for j, (x, y) in enumerate(tasks):
        if len(x) == 0 or (only is not None and j not in only):
            continue
        correct = 0
        for s in range(0, len(x), batch_size):
            pred = model(torch.from_numpy(np.ascontiguousarray(x[s:s + batch_size]))).argmax(1)
            correct += int((pred.numpy() == y[s:s + batch_size]).sum())
        out[j] = correct / len(x)
    model.train(was_training)
    return out
