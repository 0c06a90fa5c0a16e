"""Local training and evaluation loops, independent of Flower.

The loops are deterministic given the torch seed (the engine seeds every task from the
run seed, the round and the node), and report what the cost model needs: how many
examples and optimizer steps a device really processed.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

__all__ = ["TrainResult", "evaluate_model", "freeze_except", "make_optimizer", "train_model"]


@dataclass(frozen=True)
class TrainResult:
    """What a local training did: mean loss, examples seen and optimizer steps."""

    loss: float
    examples: int
    steps: int


def freeze_except(model: nn.Module, trainable: Collection[str] | None) -> None:
    """Let only the named parameters train (all when ``trainable`` is ``None``)."""
    for name, p in model.named_parameters():
        p.requires_grad_(trainable is None or name in trainable)


def make_optimizer(
    model: nn.Module, name: str, lr: float, momentum: float = 0.0, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """SGD (with optional momentum) or Adam over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def train_model(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    optimizer: torch.optim.Optimizer,
    extra_loss: Callable[[nn.Module], torch.Tensor] | None = None,
) -> TrainResult:
    """Train ``model`` on ``(x, y)`` for ``epochs`` with mini-batches of ``batch_size``.

    Parameters
    ----------
    extra_loss : callable, optional
        A term added to each step's loss (FedProx's proximal term, INT8 LAC's penalty).
    """
    model.train()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    n = len(xt)
    total, steps, seen = 0.0, 0, 0
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(epochs):
        perm = torch.randperm(n)
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(xt[idx]), yt[idx])
            if extra_loss is not None:
                loss = loss + extra_loss(model)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
            steps += 1
    return TrainResult(loss=total / max(seen, 1), examples=seen, steps=steps)


@torch.no_grad()
def evaluate_model(
    model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 512
) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy of ``model`` on ``(x, y)``."""
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    total, correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        xb = torch.from_numpy(x[start : start + batch_size])
        yb = torch.from_numpy(y[start : start + batch_size])
        out = model(xb)
        total += float(loss_fn(out, yb))
        correct += int((out.argmax(1) == yb).sum())
    n = max(len(x), 1)
    return total / n, correct / n
