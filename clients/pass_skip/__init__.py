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
    neighbour_max,
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
    chosen_cells,
    gather_cells,
    mask_table,
    pad_map,
    put_cells,
    to_pixel_major,
    window_table,
)
from clients.pass_skip.perception import (
    GlobalAvgMaxPool,
    PerceptionNet,
    StridedMaxPool2d,
    fold_batch_norm,
)
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
    "chosen_cells",
    "conv_macs",
    "fold_batch_norm",
    "gather_cells",
    "mask_table",
    "neighbour_max",
    "gumbel_gate",
    "layer_spec",
    "patch_mean_abs_diff",
    "plan_block",
    "prepare",
    "pad_map",
    "put_cells",
    "to_pixel_major",
    "window_table",
    "train_gates",
    "train_perception",
]
