"""clients.continual: continual learning on each device's data stream, without Flower.

Lives here: stream schedules and domain transforms, replay buffers, EWC/LwF terms, the local
training loop and forgetting metrics. Must not: aggregate across the fleet or touch Flower.
"""

from clients.continual.config import continual_from_config
from clients.continual.domains import (
    DOMAINS,
    add_noise,
    adjust_contrast,
    apply_domain,
    rotate_images,
)
from clients.continual.ewc import aggregate_fisher, ewc_penalty, fisher_diagonal
from clients.continual.lwf import distillation_loss
from clients.continual.methods import (
    METHODS,
    ContinualMethod,
    pending_fisher,
    set_pending_fisher,
)
from clients.continual.metrics import (
    accuracy_row,
    average_accuracy,
    backward_transfer,
    forgetting,
    task_matrix,
)
from clients.continual.replay import ReplayBuffer, content_keys, replay_capacity, sample_nbytes
from clients.continual.schedule import KINDS, StreamSchedule, TaskSpec, make_task_data
from clients.continual.train import train_local

__all__ = [
    "DOMAINS",
    "KINDS",
    "METHODS",
    "ContinualMethod",
    "ReplayBuffer",
    "StreamSchedule",
    "TaskSpec",
    "accuracy_row",
    "add_noise",
    "adjust_contrast",
    "aggregate_fisher",
    "apply_domain",
    "average_accuracy",
    "backward_transfer",
    "content_keys",
    "continual_from_config",
    "distillation_loss",
    "ewc_penalty",
    "fisher_diagonal",
    "forgetting",
    "make_task_data",
    "pending_fisher",
    "replay_capacity",
    "rotate_images",
    "sample_nbytes",
    "set_pending_fisher",
    "task_matrix",
    "train_local",
]
