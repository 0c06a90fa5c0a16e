"""Learning without forgetting's numerics: distillation to an earlier model's outputs.

LwF (Li & Hoiem, TPAMI 2018) adds to the task loss a term that keeps the new model's
outputs on the *current* data close to those the earlier model gave, with no stored data.
Here the earlier model is the one the device held when its current task began; the term is
Hinton et al.'s soft-target cross-entropy at temperature ``T``, scaled by ``T^2`` so its
gradient does not shrink with the temperature. With one shared head (class-incremental
digits) all outputs are distilled, as in iCaRL's and the LwF.MC baselines.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["distillation_loss"]


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0
) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch."""
    t = float(temperature)
    log_p = F.log_softmax(student_logits / t, dim=1)
    q = F.softmax(teacher_logits.detach() / t, dim=1)
    return F.kl_div(log_p, q, reduction="batchmean") * t * t
