"""One gated block: decide per patch, run the block on the gathered patches, put them back.

``PatchBlock`` wraps a block (an ``nn.Sequential`` of convolutions, pooling and pointwise
layers) for frame-by-frame inference. On a key frame it runs the block whole and caches the
output. On any other frame its gate decides per patch; only the chosen patches' input
windows (patch plus the block's summed receptive-field halo) are gathered into one batch,
run through padding-free twins of the block's convolutions (same parameters), and written
into the cached output. Skipped patches keep the previous output. Executed MACs are
counted analytically per executed patch (halo recomputation included) plus the gate's.

Memory layout, chosen so the per-frame cost follows the changed patches and not the frame
size: each block's input lives inside a persistent zero-bordered buffer (the border is the
block's halo), and the previous block writes its output patches straight into it. A block
hands the next one a ``Change``: which cells it rewrote, with their old and new values, so
the next gate computes its per-patch features only there (elsewhere the input is bit-for-
bit unchanged; their features are cached). Without that (the first block, or grids that
do not line up) the block keeps a copy of its previous input and compares whole maps.

Per gated frame a block runs some 40 small tensor operations besides its convolutions,
and between the patch convolutions each cost several microseconds (cold caches), as did
Python around them (``nn.Module`` attribute writes and calls): hence the host-side border
test, the cached pixel views and index tables, counters written through ``__dict__`` and
the gates' ``decide_cells``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from clients.pass_skip.gates import PatchGate
from clients.pass_skip.geometry import BlockPlan, conv_macs, layer_spec, plan_block
from clients.pass_skip.patches import (
    gather_rows,
    mask_table,
    pixel_view,
    put_rows,
    window_table,
)
from devices.errors import ConfigError, DataError

__all__ = ["PatchBlock", "PatchConv", "Change", "block_stride"]


@dataclass
class Change:
    """Cells of a map rewritten this frame: flat cell indices (n,) and old/new patches.

    After a dense run every cell was rewritten; ``new_map`` then holds the whole new map
    (``old`` and ``new`` are empty) and the caller runs the following blocks whole.
    """

    cells: torch.Tensor
    old: torch.Tensor
    new: torch.Tensor
    new_map: torch.Tensor | None = None


class PatchConv(nn.Module):
    """A padding-free twin of a ``Conv2d`` (same parameters) run on gathered windows.

    The original convolution is held outside the module tree so its parameters are not
    registered twice; hooks on this module see exactly the patch batches executed.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        object.__setattr__(self, "_conv", conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv: nn.Conv2d = self._conv  # type: ignore[assignment]
        return F.conv2d(x, conv.weight, conv.bias, conv.stride, 0, 1, conv.groups)


def block_stride(block: nn.Sequential) -> int:
    """Total stride of a block (product of its layers' strides)."""
    return math.prod(layer_spec(m).stride for m in block)


class PatchBlock(nn.Module):
    """A block with a per-patch gate and an output cache (see the module docstring).

    Parameters
    ----------
    block : nn.Sequential
        The layers (evaluated whole on key frames).
    gate : PatchGate
        Per-patch ``cell_features`` and grid-wide ``decide`` (compute where logit > 0).
    in_patch : int
        Patch side at the block's input; a multiple of the block's total stride.
    dense_above : float
        When the gate chooses more than this share of the patches, run the block on the
        whole map instead (computing every patch, which is exact, and on this CPU cheaper
        than gathering most of the map with halos); 1.0 never does.

    Raises
    ------
    ConfigError
        If a layer cannot be cut into patches or the patch does not fit the stride.
    """

    def __init__(
        self, block: nn.Sequential, gate: PatchGate, in_patch: int, dense_above: float = 1.0
    ) -> None:
        super().__init__()
        specs = [layer_spec(m) for m in block]
        stride = block_stride(block)
        if in_patch < stride or in_patch % stride:
            raise ConfigError(
                f"pass.patch: patch side {in_patch} at a block input is not a multiple of "
                f"the block's stride {stride}"
            )
        if not 0.0 <= dense_above <= 1.0:
            raise ConfigError(f"pass.dense_above: expected a share in [0, 1], got {dense_above}")
        self.block = block
        self.gate: PatchGate = gate
        self.dense_above = float(dense_above)
        self.plan: BlockPlan = plan_block(specs, in_patch // stride)
        self._patch_macs = self.plan.patch_macs()
        self.patch_layers = nn.ModuleList(
            [PatchConv(m) if isinstance(m, nn.Conv2d) else m for m in block]
        )
        self._masked = [
            i
            for i, lp in enumerate(self.plan.layers)
            if i > 0 and lp.spec.kind == "conv" and lp.spec.padding > 0
        ]
        # What run_patches calls: no Identity (a folded batch norm), ReLU as a function
        # (in place after the first layer: it then acts on a fresh intermediate), a
        # PatchConv as a module (so hooks on it see every executed batch), other layers
        # by their forward (a module call's hook machinery cost more than a pooling).
        self._steps: list[tuple[int, Callable[[torch.Tensor], torch.Tensor]]] = []
        for i, m in enumerate(self.patch_layers):
            if isinstance(m, nn.Identity):
                continue
            if type(m) is nn.ReLU:
                self._steps.append((i, torch.relu_ if self._steps else torch.relu))
            else:
                self._steps.append((i, m if isinstance(m, PatchConv) else m.forward))
        self._shape: tuple[int, int, int] | None = None
        self._grid = (0, 0)
        self.full_macs_per_frame = 0
        self._ready = False
        self.reset_stats()

    # -- state -------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the cache: the next frame must be a key frame."""
        self._ready = False

    def reset_stats(self) -> None:
        """Zero the counters."""
        self.executed_macs = 0
        self.gate_macs = 0
        self.full_macs = 0
        self.executed_patches = 0
        self.total_patches = 0

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (gh, gw) of the bound input size."""
        return self._grid

    @property
    def input_view(self) -> torch.Tensor:
        """The block's current input (1, C, H, W), a view into its bordered buffer."""
        return self._x

    @property
    def input_buffer(self) -> tuple[torch.Tensor, int]:
        """The bordered (channels-last) input buffer and the width of its top/left border."""
        return self._buf, self.plan.in_halo

    def bind(
        self, in_shape: tuple[int, int, int], out: tuple[torch.Tensor, int], track_prev: bool
    ) -> None:
        """Allocate the buffers for inputs of ``in_shape`` (C, H, W).

        Parameters
        ----------
        out : (torch.Tensor, int)
            The channels-last buffer the block writes its output into (the next block's
            bordered input buffer) and the width of its top/left border.
        track_prev : bool
            Keep a copy of the previous input (no ``Change`` will be handed in).
        """
        c, h, w = in_shape
        p = self.plan.in_patch
        if h % p or w % p:
            raise DataError(f"pass: block input {h}x{w} is not a multiple of the patch side {p}")
        self._shape = in_shape
        gh, gw = h // p, w // p
        self._grid = (gh, gw)
        halo, right = self.plan.in_halo, max(self.plan.in_window - p - self.plan.in_halo, 0)
        cl = torch.channels_last
        self._buf = torch.zeros(1, c, h + halo + right, w + halo + right).to(memory_format=cl)
        self._x = self._buf[:, :, halo : halo + h, halo : halo + w]
        self._out_buf, self._out_off = out
        ho, wo = gh * self.plan.out_patch, gw * self.plan.out_patch
        off = self._out_off
        self._out = self._out_buf[:, :, off : off + ho, off : off + wo]
        self._prev = torch.zeros(1, c, h, w).to(memory_format=cl) if track_prev else None
        plan = self.plan
        win, po, co = plan.in_window, plan.out_patch, self._out_buf.shape[1]
        self._ws_in = torch.empty(gh * gw * win * win, c)
        self._ws_old = torch.empty(gh * gw * po * po, co)
        self._in_table = window_table((gh, gw), p, win, 0, self._buf.shape[3])
        self._out_table = window_table((gh, gw), po, po, self._out_off, self._out_buf.shape[3])
        self._masks = {
            i: mask_table(
                (gh, gw), lp.in_patch, lp.in_window, lp.in_halo, gh * lp.in_patch, gw * lp.in_patch
            )
            for i, lp in enumerate(plan.layers)
            if i in self._masked
        }
        # One border test per frame: the cells whose window crosses the image border at
        # any masked layer (masking a cell that does not is a multiplication by one).
        border = torch.zeros(gh * gw, dtype=torch.bool)
        for _, crosses in self._masks.values():
            border |= crosses
        self._border = frozenset(border.nonzero().view(-1).tolist())
        self._in_pixels, self._out_pixels = pixel_view(self._buf), pixel_view(self._out_buf)
        self._empty = torch.zeros((0, co, po, po))
        self._no_cells = torch.zeros(0, dtype=torch.long)
        self.full_macs_per_frame = sum(
            conv_macs(
                lp.spec, gh * (lp.in_patch // lp.spec.stride), gw * (lp.in_patch // lp.spec.stride)
            )
            for lp in self.plan.layers
            if lp.spec.kind == "conv"
        )
        self._ready = False

    # -- execution ---------------------------------------------------------------------
    def run_patches(self, windows: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        """Run the block on gathered windows (n, C, w, w) -> output patches (n, C', p, p)."""
        h = windows
        # (a set test on the host: cheaper here than three small tensor operations)
        border = bool(self._border) and not self._border.isdisjoint(cells.tolist())
        for i, layer in self._steps:
            if border and i in self._masks:
                h = h * self._masks[i][0].index_select(0, cells)
            h = layer(h)
        return h

    def keyframe(self, x: torch.Tensor) -> torch.Tensor:
        """Compute a whole frame from input ``x`` (1, C, H, W); refresh every cache."""
        gh, gw = self._grid
        self._x.copy_(x)
        out = self.block(x)
        expected = (gh * self.plan.out_patch, gw * self.plan.out_patch)
        if tuple(out.shape[2:]) != expected:
            raise ConfigError(
                f"pass: block output {tuple(out.shape[2:])} is not input/stride {expected}; "
                "use 'same'-style padding"
            )
        self._out.copy_(out)
        if self._prev is not None:
            self._prev.copy_(x)
        else:  # cached feature rows; a block comparing whole maps does not read them
            self._static = self.gate.static_table(x)
        self._ready = True
        self._count(gh * gw, self.full_macs_per_frame, gh * gw, self.full_macs_per_frame, 0)
        return out

    def _count(self, total: int, full: int, executed: int, macs: int, gate: int) -> None:
        """Add to the counters (through ``__dict__``: ``nn.Module.__setattr__``, which a
        plain ``+=`` goes through, cost more per frame than several tensor operations)."""
        d = self.__dict__
        d["total_patches"] += total
        d["full_macs"] += full
        d["executed_patches"] += executed
        d["executed_macs"] += macs
        d["gate_macs"] += gate

    def step(self, change: Change | None) -> Change:
        """Process a non-key frame whose input is already in ``input_view``.

        Parameters
        ----------
        change : Change or None
            The input cells the previous block rewrote (None: unknown, compare with the
            kept copy of the previous input).

        Returns
        -------
        Change
            The output cells this block rewrote.
        """
        if not self._ready:
            raise ConfigError("pass: a block must see a key frame before a gated frame")
        gh, gw = self._grid
        gate = self.gate
        if change is not None and change.new_map is not None:
            raise ConfigError("pass: after a dense block the next blocks must run whole")
        if change is None:
            if self._prev is None:
                raise ConfigError("pass: block without a change record needs track_prev=True")
            features = gate.table(self._x, self._prev)
            self._prev.copy_(self._x)
            featured = gh * gw
        else:
            # Feature rows (one per cell): cached for the cells whose input did not
            # change, computed from the old and new patches for the others.
            features = self._static
            featured = int(change.cells.numel())
            if featured:
                dyn = gate.patch_table(change.new, change.old)
                features = features.index_copy(0, change.cells, dyn)
                gate.update_static(self._static, change.cells, change.new, dyn)
        cells = gate.decide_cells(features, self._grid)
        n = int(cells.numel())
        gate_macs = int(gate.macs(self._shape[0] if self._shape else 0, featured, gh * gw))
        po = self.plan.out_patch
        if n > self.dense_above * gh * gw:
            return self._dense(gate_macs)
        macs = gate_macs + n * self._patch_macs
        self._count(gh * gw, self.full_macs_per_frame, n, macs, gate_macs)
        if n == 0:
            return Change(self._no_cells, self._empty, self._empty)
        win = self.plan.in_window
        windows = gather_rows(
            self._in_pixels, self._in_table.index_select(0, cells).view(-1), win, self._ws_in
        )
        new = self.run_patches(windows, cells)
        # The output pixels of the chosen cells, looked up once for both directions.
        pixels = self._out_table.index_select(0, cells).view(-1)
        old = gather_rows(self._out_pixels, pixels, po, self._ws_old)
        put_rows(self._out_pixels, pixels, new)
        return Change(cells, old, new)

    def _dense(self, gate_macs: int) -> Change:
        """Run the block on the whole map (most patches chosen); report every cell."""
        gh, gw = self._grid
        out = self.block(self._x)
        self._out.copy_(out)
        full = self.full_macs_per_frame
        self._count(gh * gw, full, gh * gw, gate_macs + full, gate_macs)
        empty = out.new_zeros((0,))
        return Change(torch.arange(gh * gw), empty, empty, out)
