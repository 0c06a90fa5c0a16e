"""Side-by-side runs of the continual methods on one device's digits stream.

A measurement, not a test: each method trains through the tasks of a schedule in order
(one :func:`~clients.continual.train.train_local` call per task, the model carried over),
and after each task its accuracy on every task's held-out data fills a row of ``R``. The
table it prints (mean +- std over seeds of average accuracy, forgetting and BWT) is what
``python -m clients.continual.compare`` shows; everything is seeded.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import numpy as np
import torch
from sklearn.datasets import load_digits

from clients.continual.methods import METHODS, ContinualMethod
from clients.continual.metrics import (
    accuracy_row,
    average_accuracy,
    backward_transfer,
    forgetting,
)
from clients.continual.schedule import StreamSchedule, make_task_data
from clients.continual.train import train_local
from clients.models import MLP

__all__ = ["compare_methods", "digits_arrays", "main"]


def digits_arrays(seed: int = 0, test_fraction: float = 0.25
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's digits as ``(N, 1, 8, 8)`` float32 in [0, 1], shuffled and split."""
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(seed).permutation(len(y))
    cut = int(len(y) * (1 - test_fraction))
    tr, te = perm[:cut], perm[cut:]
    return x[tr], y[tr], x[te], y[te]


def compare_methods(
    schedule: StreamSchedule,
    methods: Sequence[ContinualMethod],
    *,
    seeds: Sequence[int] = (0, 1, 2),
    epochs: int = 3,
    batch_size: int = 16,
    lr: float = 0.1,
    hidden: int = 64,
) -> dict[str, list[np.ndarray]]:
    """Accuracy matrices ``R`` (one per seed) of each method on ``schedule``'s tasks."""
    xtr, ytr, xte, yte = digits_arrays()
    tasks = range(schedule.num_tasks)
    train = [make_task_data(xtr, ytr, t, schedule, seed=1) for t in tasks]
    test = [make_task_data(xte, yte, t, schedule, seed=2) for t in tasks]
    out: dict[str, list[np.ndarray]] = {}
    for method in methods:
        mats = []
        for seed in seeds:
            torch.manual_seed(seed)
            model = MLP(int(np.prod(xtr.shape[1:])), hidden, 1, schedule.num_classes)
            state: dict[str, np.ndarray] = {}
            rows = []
            for t in tasks:
                _, state = train_local(model, *train[t], method=method, epochs=epochs,
                                       batch_size=batch_size, lr=lr, state=state, task=t,
                                       seed=seed)
                rows.append(accuracy_row(model, test, only=range(t + 1)))
            mats.append(np.array(rows))
        out[method.name] = mats
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """Print the comparison table for one stream kind."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", default="class-incremental",
                    choices=["class-incremental", "domain-shift", "mix"])
    ap.add_argument("--tasks", type=int, default=5)
    ap.add_argument("--capacity", type=int, default=62,
                    help="replay samples (62: 5%% of an STM32F746's 320 KB SRAM)")
    ap.add_argument("--ewc-lambda", type=float, default=ContinualMethod.ewc_lambda)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    schedule = StreamSchedule(kind=args.kind, num_tasks=args.tasks, rounds_per_task=1, seed=0)
    methods = [ContinualMethod(n, replay_capacity=args.capacity, ewc_lambda=args.ewc_lambda)
               for n in METHODS]
    t0 = time.perf_counter()
    res = compare_methods(schedule, methods, seeds=range(args.seeds), epochs=args.epochs)
    print(f"{args.kind}, {args.tasks} tasks, replay {args.capacity} samples, "
          f"EWC lambda {args.ewc_lambda:g}, {args.seeds} seeds, {args.epochs} epochs/task")
    print(f"{'method':<12}{'avg acc':>16}{'forgetting':>16}{'BWT':>16}")
    for name, mats in res.items():
        cols = [np.array([f(m) for m in mats])
                for f in (average_accuracy, forgetting, backward_transfer)]
        print(f"{name:<12}" + "".join(f"{c.mean():>10.3f} +-{c.std():.3f}" for c in cols))
    print(f"({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
