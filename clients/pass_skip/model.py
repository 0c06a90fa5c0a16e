"""``prepare`` (torch.ao style) and the stateful ``PassModel`` it returns.

``PassModel`` runs a model one frame at a time: each backbone block is a ``PatchBlock``
(gate + gathered patch execution + cache), the head runs whole on the last block's output.
Every ``keyframe_every`` frames (and after ``reset()``) a key frame is computed whole and
refreshes every cache, which bounds the drift skipped patches can accumulate.

``forward_clip`` is the training path of the learned gates: on a batch of clips it mixes,
per patch, the block's full output (gate 1) with the previous frame's output (gate 0), the
same arithmetic as the skipping path, but differentiable (Gumbel noise and
straight-through binarization while a learned gate is in training mode, a hard 0.5
threshold otherwise).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from clients.pass_skip.executor import Change, PatchBlock, block_stride
from clients.pass_skip.gates import LearnedGate, PatchGate, ThresholdGate, gumbel_gate
from devices.errors import ConfigError, DataError

__all__ = ["PassModel", "prepare"]

GateKind = Literal["threshold", "learned"]


def _head_macs(head: nn.Module, features: torch.Tensor) -> int:
    """MACs of the head's Conv2d and Linear layers on one frame's features (by hooks)."""
    total = 0

    def count(module: nn.Module, _inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Linear):
            total += module.in_features * module.out_features * (out.numel() // out.shape[-1])
        elif isinstance(module, nn.Conv2d):
            per = (
                module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            )
            total += per * out.numel()

    handles = [m.register_forward_hook(count) for m in head.modules()]
    try:
        with torch.no_grad():
            head(features)
    finally:
        for handle in handles:
            handle.remove()
    return total


class PassModel(nn.Module):
    """A model prepared for patch skipping on a stream (see the module docstring).

    Attributes
    ----------
    blocks : nn.ModuleList of PatchBlock
        The gated backbone blocks.
    head : nn.Module
        Run whole every frame (identity for a bare block).
    keyframe_every : int
        Period of key frames (0: only the first frame after a reset).
    """

    def __init__(self, blocks: list[PatchBlock], head: nn.Module, keyframe_every: int) -> None:
        super().__init__()
        if keyframe_every < 0:
            raise ConfigError(f"pass.keyframe_every: expected >= 0, got {keyframe_every}")
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.keyframe_every = int(keyframe_every)
        self._since_reset = 0
        self._head_macs: int | None = None
        self._bound: tuple[int, ...] | None = None
        self._aligned: list[bool] = []
        self._final = torch.zeros(0)
        self.frames = 0
        self.keyframes = 0
        self.head_macs = 0

    # -- state and stats ---------------------------------------------------------------
    def reset(self) -> None:
        """Drop every cache: the next frame is a key frame. Counters are kept."""
        self._since_reset = 0
        for block in self.patch_blocks:
            block.reset()

    def reset_stats(self) -> None:
        """Zero every counter (not the caches)."""
        self.frames = 0
        self.keyframes = 0
        self.head_macs = 0
        for block in self.patch_blocks:
            block.reset_stats()

    @property
    def patch_blocks(self) -> list[PatchBlock]:
        """The gated blocks, in order (typed view of ``blocks``)."""
        return [b for b in self.blocks if isinstance(b, PatchBlock)]

    @property
    def executed_macs(self) -> int:
        """MACs executed since the last ``reset_stats``: computed patches, gates and head."""
        return self.head_macs + sum(b.executed_macs for b in self.patch_blocks)

    @property
    def full_macs(self) -> int:
        """MACs the unmodified model would have executed on the same frames."""
        return self.head_macs + sum(b.full_macs for b in self.patch_blocks)

    @property
    def gate_macs(self) -> int:
        """Part of ``executed_macs`` spent in the gates."""
        return sum(b.gate_macs for b in self.patch_blocks)

    @property
    def executed_patches(self) -> int:
        """Patches computed (summed over blocks and frames; a key frame computes all)."""
        return sum(b.executed_patches for b in self.patch_blocks)

    @property
    def total_patches(self) -> int:
        """Patches seen (summed over blocks and frames)."""
        return sum(b.total_patches for b in self.patch_blocks)

    def stats(self) -> dict[str, Any]:
        """Counters since the last ``reset_stats`` as a plain dict (for the cost model)."""
        full = self.full_macs
        return {
            "frames": self.frames,
            "keyframes": self.keyframes,
            "executed_macs": self.executed_macs,
            "full_macs": full,
            "gate_macs": self.gate_macs,
            "mac_ratio": self.executed_macs / full if full else 1.0,
            "executed_patches": self.executed_patches,
            "total_patches": self.total_patches,
            "blocks": [
                {
                    "executed_macs": b.executed_macs,
                    "full_macs": b.full_macs,
                    "executed_patches": b.executed_patches,
                    "total_patches": b.total_patches,
                }
                for b in self.patch_blocks
            ],
        }

    # -- inference ---------------------------------------------------------------------
    def forward(self, frame: torch.Tensor) -> torch.Tensor:
        """Process the next frame of the stream, (C, H, W) or (1, C, H, W).

        Returns the head's output for this frame (batch dimension 1).
        """
        if frame.dim() == 3:
            frame = frame.unsqueeze(0)
        if frame.dim() != 4 or frame.shape[0] != 1:
            raise DataError(f"pass: expected one frame (C, H, W), got {tuple(frame.shape)}")
        keyframe = self._since_reset == 0 or (
            self.keyframe_every > 0 and self._since_reset % self.keyframe_every == 0
        )
        blocks = self.patch_blocks
        # inference_mode, not no_grad: no version counters or views tracked on the
        # dozens of small tensors a gated frame makes (the caches are never trained on).
        with torch.inference_mode():
            frame = frame.detach().to(torch.float32)
            if self._bound != tuple(frame.shape):
                self._bind(frame)
                keyframe = True
            if keyframe:
                h = frame
                for block in blocks:
                    h = block.keyframe(h)
            else:
                blocks[0].input_view.copy_(frame)
                change: Change | None = None
                for b, (block, aligned) in enumerate(zip(blocks, self._aligned, strict=True)):
                    change = block.step(change if aligned else None)
                    if change.new_map is not None:
                        # Most of this block changed: run the rest whole (exact, and
                        # cheaper than gating maps that will mostly change too).
                        h = change.new_map
                        for later in blocks[b + 1 :]:
                            h = later.keyframe(h)
                        break
            out = self.head(self._final)
            if self._head_macs is None:
                self._head_macs = _head_macs(self.head, self._final)
        d = self.__dict__  # plain counters: around nn.Module.__setattr__ (see PatchBlock)
        d["head_macs"] += self._head_macs
        d["frames"] += 1
        d["keyframes"] += int(keyframe)
        d["_since_reset"] += 1
        return out

    def _bind(self, frame: torch.Tensor) -> None:
        """Size every block's buffers for frames of this shape (one dry run for shapes)."""
        blocks = self.patch_blocks
        if not blocks:
            raise ConfigError("pass: nothing to gate (no blocks)")
        shapes: list[tuple[int, int, int]] = []
        h = torch.zeros_like(frame)
        for block in blocks:
            shapes.append((h.shape[1], h.shape[2], h.shape[3]))
            h = block.block(h)
        self._final = torch.zeros_like(h, memory_format=torch.channels_last)
        self._aligned = [False] + [
            blocks[i - 1].plan.out_patch == blocks[i].plan.in_patch for i in range(1, len(blocks))
        ]
        out = (self._final, 0)
        for i in reversed(range(len(blocks))):
            blocks[i].bind(shapes[i], out, track_prev=not self._aligned[i])
            out = blocks[i].input_buffer
        self._bound = tuple(frame.shape)
        self._head_macs = None

    # -- training path -----------------------------------------------------------------
    def forward_clip(
        self, clips: torch.Tensor, temperature: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Differentiable pass over clips (B, T, C, H, W), frame 0 a key frame.

        Returns
        -------
        logits : torch.Tensor
            (B, T, ...) head outputs.
        compute : torch.Tensor
            Scalar: the expected share of block MACs executed on gated frames (each
            block's gate rate weighted by its per-frame patch MACs); the sparsity loss.
        """
        if clips.dim() != 5:
            raise DataError(f"pass: clips must be (B, T, C, H, W), got {tuple(clips.shape)}")
        blocks = self.patch_blocks
        prev_in: list[torch.Tensor] = [clips.new_zeros(())] * len(blocks)
        prev_out: list[torch.Tensor] = [clips.new_zeros(())] * len(blocks)
        outputs: list[torch.Tensor] = []
        shares: list[torch.Tensor] = []
        for t in range(clips.shape[1]):
            h = clips[:, t]
            key = t == 0 or (self.keyframe_every > 0 and t % self.keyframe_every == 0)
            cost = h.new_zeros(())
            weight = 0.0
            for b, block in enumerate(blocks):
                full = block.block(h)
                if key:
                    out = full
                else:
                    logits = block.gate(h, prev_in[b])
                    if block.gate.training and isinstance(block.gate, LearnedGate):
                        g = gumbel_gate(logits, temperature)
                    else:
                        g = (logits > 0).to(full.dtype)
                    p = block.plan.out_patch
                    mask = g.repeat_interleave(p, 2).repeat_interleave(p, 3)
                    out = mask * full + (1 - mask) * prev_out[b]
                    cells = g.shape[-1] * g.shape[-2]
                    w = float(block.plan.patch_macs() * cells)
                    cost = cost + g.mean() * w
                    weight += w
                prev_in[b], prev_out[b] = h, out
                h = out
            if not key:
                shares.append(cost / weight)
            outputs.append(self.head(h))
        compute = torch.stack(shares).mean() if shares else clips.new_ones(())
        return torch.stack(outputs, 1), compute


def _split(model: nn.Module) -> tuple[list[nn.Sequential], nn.Module]:
    """Find the gateable blocks and the head of a model (see ``prepare``)."""
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, nn.Sequential):
        head = getattr(model, "head", None)
        if not isinstance(head, nn.Module):
            raise ConfigError("pass: a model with a 'backbone' needs a 'head' module too")
        blocks = [m if isinstance(m, nn.Sequential) else nn.Sequential(m) for m in backbone]
        return blocks, head
    if isinstance(model, nn.Sequential):
        return [model], nn.Identity()
    if isinstance(model, nn.Conv2d):
        return [nn.Sequential(model)], nn.Identity()
    raise ConfigError(
        f"pass: cannot prepare a {type(model).__name__}; expected a model with 'backbone' "
        "(nn.Sequential of blocks) and 'head', an nn.Sequential block, or a Conv2d"
    )


def _in_channels(block: nn.Sequential, previous: int | None) -> int:
    for layer in block:
        if isinstance(layer, nn.Conv2d):
            return int(layer.in_channels)
        if isinstance(layer, nn.BatchNorm2d):
            return int(layer.num_features)
    if previous is None:
        raise ConfigError("pass: cannot tell a block's input channels (no Conv2d in it)")
    return previous


def _out_channels(block: nn.Sequential, previous: int) -> int:
    channels = previous
    for layer in block:
        if isinstance(layer, nn.Conv2d):
            channels = int(layer.out_channels)
    return channels


def prepare(
    model_or_block: nn.Module,
    *,
    patch: int | Sequence[int] = 8,
    gate: GateKind = "threshold",
    threshold: float | Sequence[float] = 0.02,
    keyframe_every: int = 16,
    gate_hidden: int = 16,
    dense_above: float = 1.0,
    halo_aware: bool = True,
    learned_prior: bool = True,
    inplace: bool = False,
) -> PassModel:
    """Prepare a model (or one block) for patch-skipping inference on a stream.

    Parameters
    ----------
    model_or_block : nn.Module
        A model with ``backbone`` (an ``nn.Sequential`` of blocks, each an
        ``nn.Sequential`` of Conv2d / MaxPool2d / AvgPool2d / pointwise layers) and
        ``head`` (e.g. ``PerceptionNet``); or a single such block; or a ``Conv2d``.
    patch : int or sequence of int
        An int: patch side in frame pixels, one grid for all blocks (block b's patch is
        ``patch / stride before b``). A sequence: each block's patch side at its own input.
    gate : {"threshold", "learned"}
        The training-free difference threshold, or the learned PASS gate (train it with
        ``train_gates``; untrained it computes everything).
    threshold : float or sequence of float
        Threshold gate's tau on the mean |x_t - x_{t-1}| per patch (one per block or one
        for all).
    keyframe_every : int
        A full key frame every K frames (0: only after ``reset()``).
    gate_hidden : int
        Hidden channels of the learned gate.
    dense_above : float
        A block whose gate chooses more than this share of its patches runs on the whole
        map instead, and so do the blocks after it on that frame (exact, counted as full
        MACs); 1.0 (default) never does.
    halo_aware : bool
        Threshold gate only: also compute the patches a change reaches through the
        block's receptive-field halo (see ``ThresholdGate``); False is the literal
        patch-only baseline.
    learned_prior : bool
        Learned gate only: add the threshold gate's logit (with ``threshold``) as a
        training-free prior to the learned logit (see ``LearnedGate``).
    inplace : bool
        Reuse the model's modules (False: work on a deep copy, as torch.ao does).

    Returns
    -------
    PassModel
        In eval mode; call it frame by frame.

    Raises
    ------
    ConfigError
        On an unsupported model or layer, a patch that does not fit the strides, or a bad
        gate/threshold/keyframe setting.
    """
    if gate not in ("threshold", "learned"):
        raise ConfigError(f"pass.gate: expected 'threshold' or 'learned', got {gate!r}")
    model = model_or_block if inplace else copy.deepcopy(model_or_block)
    model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    blocks, head = _split(model)
    n = len(blocks)
    if isinstance(patch, int):
        patches: list[int] = []
        stride = 1
        for block in blocks:
            if patch % stride:
                raise ConfigError(
                    f"pass.patch: {patch} px is not a multiple of the stride {stride} "
                    "before a block"
                )
            patches.append(patch // stride)
            stride *= block_stride(block)
    else:
        patches = [int(p) for p in patch]
        if len(patches) != n:
            raise ConfigError(
                f"pass.patch: expected {n} patch sides (one per block), got {len(patches)}"
            )
    taus = [float(threshold)] * n if isinstance(threshold, int | float) else list(threshold)
    if len(taus) != n:
        raise ConfigError(f"pass.threshold: expected {n} values (one per block), got {len(taus)}")
    wrapped: list[PatchBlock] = []
    channels: int | None = None
    for block, p, tau in zip(blocks, patches, taus, strict=True):
        cin = _in_channels(block, channels)
        g: PatchGate = (
            ThresholdGate(p, tau)
            if gate == "threshold"
            else LearnedGate(cin, p, gate_hidden, prior_tau=tau if learned_prior else None)
        )
        wrapped.append(PatchBlock(block, g, p, dense_above))
        if isinstance(g, ThresholdGate | LearnedGate) and halo_aware:
            plan = wrapped[-1].plan
            halo = max(plan.in_halo, plan.in_window - plan.in_patch - plan.in_halo)
            g.reach = -(-halo // plan.in_patch)
        channels = _out_channels(block, cin)
    return PassModel(wrapped, head, keyframe_every).eval()
