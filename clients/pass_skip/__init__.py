"""pass_skip: PASS, the patch automatic skip scheme, for perception on video streams.

Lives here: patch geometry, gather/scatter, the threshold and learned gates, ``prepare``
and the stateful ``PassModel``, ``PerceptionNet`` and short training loops.
Must not: generate streams (clients.video), cost a device (devices) or schedule duties.
"""

from clients.pass_skip.executor import Change, PatchBlock, PatchConv, block_stride
from clients.pass_skip.gates import (
    LearnedGate,
    PatchGate,
    ThresholdGate,
    gumbel_gate,
    patch_mean_abs_diff,
)
from clients.pass_skip.geometry import (
    BlockPlan,
    LayerPlan,
    LayerSpec,
    conv_macs,
    layer_spec,
    plan_block,
)
from clients.pass_skip.model import PassModel, prepare
from clients.pass_skip.patches import (
    border_mask,
    gather_windows,
    grid_indices,
    pad_map,
    put_patches,
    take_patches,
)
from clients.pass_skip.perception import GlobalAvgMaxPool, PerceptionNet, StridedMaxPool2d
from clients.pass_skip.training import train_gates, train_perception

__all__ = [
    "BlockPlan",
    "Change",
    "block_stride",
    "GlobalAvgMaxPool",
    "LayerPlan",
    "LayerSpec",
    "LearnedGate",
    "PassModel",
    "PatchBlock",
    "PatchGate",
    "PatchConv",
    "PerceptionNet",
    "StridedMaxPool2d",
    "ThresholdGate",
    "border_mask",
    "conv_macs",
    "gather_windows",
    "grid_indices",
    "gumbel_gate",
    "layer_spec",
    "patch_mean_abs_diff",
    "plan_block",
    "prepare",
    "pad_map",
    "put_patches",
    "take_patches",
    "train_gates",
    "train_perception",
]
