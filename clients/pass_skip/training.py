"""Short training loops: the perception model on frames, the learned gates on clips.

``train_gates`` follows the PASS recipe: the backbone and head stay frozen (so the full,
threshold and learned variants share the very same weights) and only the gates learn, from
the task loss on every frame of a clip plus ``sparsity`` times the expected share of block
MACs executed (``PassModel.forward_clip``), which pushes them towards skipping wherever
skipping does not hurt the task.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from clients.pass_skip.gates import LearnedGate
from clients.pass_skip.model import PassModel
from devices.errors import ConfigError, DataError

__all__ = ["train_perception", "train_gates"]


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ConfigError(f"{name}: expected > 0, got {value!r}")


def train_perception(
    model: nn.Module,
    frames: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    extra_loss: Callable[[nn.Module], torch.Tensor] | None = None,
) -> list[float]:
    """Train a per-frame classifier with Adam on (N, C, H, W) frames; returns the losses.

    ``extra_loss(model)`` is added to each step's loss (e.g. ``clients.int8.lac_penalty``).

    Raises
    ------
    DataError
        If frames and labels disagree in length or there are no labelled frames.
    """
    _check_positive(steps=steps, batch_size=batch_size, lr=lr)
    keep = labels >= 0
    frames, labels = frames[keep], labels[keep]
    if frames.shape[0] == 0 or frames.shape[0] != labels.shape[0]:
        raise DataError(f"frames/labels: need matching labelled frames, got {frames.shape[0]}")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses: list[float] = []
    for _ in range(steps):
        idx = torch.randint(0, frames.shape[0], (batch_size,), generator=gen)
        loss = F.cross_entropy(model(frames[idx]), labels[idx])
        if extra_loss is not None:
            loss = loss + extra_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def _full_logits(pass_model: PassModel, frames: torch.Tensor) -> torch.Tensor:
    """The unmodified model's output on frames (N, C, H, W), every block run whole."""
    h = frames
    for block in pass_model.patch_blocks:
        h = block.block(h)
    return pass_model.head(h)


def train_gates(
    pass_model: PassModel,
    clips: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int = 100,
    batch_size: int = 8,
    lr: float = 1e-2,
    sparsity: float = 1.0,
    temperature: float = 1.0,
    distill: float = 0.0,
    seed: int = 0,
) -> list[dict[str, float]]:
    """Train the learned gates of a ``PassModel`` on clips, all other weights frozen.

    Parameters
    ----------
    pass_model : PassModel
        Prepared with ``gate="learned"``.
    clips : torch.Tensor
        (N, T, C, H, W); frame 0 of each clip is a key frame.
    labels : torch.Tensor
        (N, T) class per frame (-1: ignored).
    steps, batch_size, lr : int, int, float
        Adam on the gates only.
    sparsity : float
        Weight of the expected executed-MAC share in the loss.
    temperature : float
        Gumbel-sigmoid temperature.
    distill : float
        Weight of a distillation term: KL divergence from the full model's per-frame
        class distribution to the gated one's. It penalizes stale caches directly, also on
        frames where the label alone would tolerate them (our addition; 0 disables it).
    seed : int
        Seeds the batch order and the Gumbel noise.

    Returns
    -------
    list of dict
        Per step: ``loss``, ``task`` and ``compute`` (expected MAC share on gated frames).

    Raises
    ------
    ConfigError
        If the model has no learned gate.
    DataError
        If clips and labels do not match.
    """
    _check_positive(steps=steps, batch_size=batch_size, lr=lr, temperature=temperature)
    gates = [b.gate for b in pass_model.patch_blocks if isinstance(b.gate, LearnedGate)]
    if not gates:
        raise ConfigError("pass.gate: train_gates needs a model prepared with gate='learned'")
    if clips.dim() != 5 or labels.shape != clips.shape[:2]:
        raise DataError(
            f"clips/labels: expected (N, T, C, H, W) and (N, T), got {tuple(clips.shape)} "
            f"and {tuple(labels.shape)}"
        )
    for p in pass_model.parameters():
        p.requires_grad_(False)
    params = [p for g in gates for p in g.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    pass_model.eval()
    for g in gates:
        g.train()
    history: list[dict[str, float]] = []
    try:
        for _ in range(steps):
            idx = torch.randint(0, clips.shape[0], (batch_size,), generator=gen)
            batch = clips[idx]
            logits, compute = pass_model.forward_clip(batch, temperature)
            flat = logits.reshape(-1, logits.shape[-1])
            task = F.cross_entropy(flat, labels[idx].reshape(-1), ignore_index=-1)
            loss = task + sparsity * compute
            if distill > 0:
                with torch.no_grad():
                    teacher = F.log_softmax(_full_logits(pass_model, batch.flatten(0, 1)), -1)
                kl = F.kl_div(
                    F.log_softmax(flat, -1), teacher, log_target=True, reduction="batchmean"
                )
                loss = loss + distill * kl
            opt.zero_grad()
            loss.backward()
            opt.step()
            history.append(
                {
                    "loss": float(loss.detach()),
                    "task": float(task.detach()),
                    "compute": float(compute.detach()),
                }
            )
    finally:
        for g in gates:
            g.eval()
        for p in pass_model.parameters():
            p.requires_grad_(True)
    return history
