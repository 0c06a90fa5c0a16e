"""Elastic weight consolidation's numerics: a diagonal Fisher, its fleet mean, the penalty.

EWC (Kirkpatrick et al., PNAS 2017) keeps the weights that mattered for earlier tasks near
their old values: ``penalty = lambda / 2 * sum_i F_i (w_i - w*_i)^2``, with ``w*`` the weights
at the end of the earlier tasks and ``F`` the diagonal of the Fisher information there.

Choices made here:

* ``F`` is the *empirical* Fisher, the mean over local samples of the squared per-sample
  gradient of the log-likelihood of the true label (per-sample gradients by
  ``torch.func.vmap``; the model in eval mode, so dropout and batch-norm statistics do not
  move). Squared *mini-batch* gradients would underestimate it by about the batch size.
* In a fleet each device computes ``F`` on its own data and the server averages it weighted
  by sample counts (:func:`aggregate_fisher`), so every device is held to what the fleet as
  a whole found important.
* Fisher and anchors are plain ``dict[str, numpy.ndarray]`` keyed by parameter name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from devices.errors import PayloadError

__all__ = ["aggregate_fisher", "ewc_penalty", "fisher_diagonal"]


def fisher_diagonal(
    model: nn.Module, x: np.ndarray, y: np.ndarray, *, max_samples: int = 512,
    chunk: int = 64,
) -> dict[str, np.ndarray]:
    """Diagonal empirical Fisher of ``model``'s trainable parameters on ``(x, y)``.

    Parameters
    ----------
    max_samples : int
        Use at most the first ``max_samples`` samples (the cost is one backward per sample).
    chunk : int
        Samples whose per-sample gradients are held in memory at once.

    Returns
    -------
    dict of str to numpy.ndarray
        Per parameter, the mean squared per-sample gradient (float32, the parameter's shape).
    """
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    n = min(len(x), max_samples)
    if n == 0:
        return {k: v.numpy().astype(np.float32) for k, v in fisher.items()}
    was_training = model.training
    model.eval()

    def nll(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))

    per_sample = vmap(grad(nll), in_dims=(None, 0, 0))
    xt = torch.from_numpy(np.ascontiguousarray(x[:n]))
    yt = torch.from_numpy(np.asarray(y[:n], dtype=np.int64))
    for start in range(0, n, chunk):
        grads = per_sample(params, xt[start:start + chunk], yt[start:start + chunk])
        for k, g in grads.items():
            fisher[k] += (g ** 2).sum(0)
    model.train(was_training)
    return {k: (v / n).numpy().astype(np.float32) for k, v in fisher.items()}


def aggregate_fisher(
    fishers: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]
) -> dict[str, np.ndarray]:
    """Weighted mean of per-device Fisher diagonals (weights: e.g. each device's samples).

    Raises
    ------
    PayloadError
        If the list is empty, lengths differ, weights are not positive in sum, or the
        devices disagree on parameter names or shapes.
    """
    if not fishers or len(fishers) != len(weights):
        raise PayloadError(f"aggregate_fisher: expected one weight per Fisher, got "
                           f"{len(fishers)} Fishers and {len(weights)} weights")
    w = np.asarray(weights, dtype=np.float64)
    if np.any(w < 0) or w.sum() <= 0:
        raise PayloadError(f"aggregate_fisher: weights must be >= 0 with a positive sum, got {w}")
    names = set(fishers[0])
    out: dict[str, np.ndarray] = {}
    for i, f in enumerate(fishers):
        if set(f) != names:
            raise PayloadError(f"aggregate_fisher: device {i} has parameters {sorted(f)}, "
                               f"expected {sorted(names)}")
    for k in sorted(names):
        shape = np.shape(fishers[0][k])
        acc = np.zeros(shape, dtype=np.float64)
        for i, f in enumerate(fishers):
            if np.shape(f[k]) != shape:
                raise PayloadError(f"aggregate_fisher: {k!r} of device {i} has shape "
                                   f"{np.shape(f[k])}, expected {shape}")
            acc += w[i] * np.asarray(f[k], dtype=np.float64)
        out[k] = (acc / w.sum()).astype(np.float32)
    return out


def ewc_penalty(
    model: nn.Module, fisher: Mapping[str, torch.Tensor], anchor: Mapping[str, torch.Tensor],
    lam: float,
) -> torch.Tensor:
    """``lam / 2 * sum F (w - w*)^2`` over the parameters named in ``fisher``."""
    total = torch.zeros(())
    for name, p in model.named_parameters():
        if name in fisher:
            total = total + (fisher[name] * (p - anchor[name]) ** 2).sum()
    return 0.5 * lam * total
