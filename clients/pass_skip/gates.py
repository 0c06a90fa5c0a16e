"""Per-patch skip gates: a training-free difference threshold and the learned PASS gate.

Both look at a block's input on the current frame ``x`` and on the previous frame
``prev`` and return one logit per patch (positive: compute, else: reuse the cache), so the
same executor and the same soft training path serve both. Each splits into
``cell_features`` (pooled per patch from that patch alone, so the executor can compute it
only on the patches whose input changed) and ``decide`` (on the whole, small, patch grid).
Frame-by-frame inference uses cell-major twins of both (``patch_table``, ``static_table``,
``still_rows``/``update_static``, ``decide_table``/``decide_cells``: one row of features per
cell, neighbourhood maxima as one ``max_pool2d`` on the rows viewed as a channels-last
grid), the same arithmetic in a few kernels instead of dozens of tiny ones: at 144 cells
per block the gates' Python and dispatch, not their MACs, were their cost.

- ``ThresholdGate``: logit = mean |x - prev| over the patch (and channels) - tau. No
  parameters; the baseline.
- ``LearnedGate``: the PASS gate. Its design is ours where the paper's details are not
  public: per patch it pools [x, x - prev] (means of x, |x - prev| and (x - prev)^2, per
  channel; pooling first keeps it cheap: one pass over the map), then runs a 1x1
  convolution on the patch grid and mixes each cell with its 3x3 neighbourhood (so a
  patch sees its neighbours' change, which reaches it through the receptive-field halo)
  into one logit. Training binarizes
  with logistic (Gumbel) noise and a straight-through estimator (``gumbel_gate``); test
  time thresholds sigmoid(logit) at 0.5, i.e. logit > 0.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "PatchGate",
    "ThresholdGate",
    "LearnedGate",
    "gumbel_gate",
    "neighbour_max",
    "neighbour_table",
    "neighbour_max_rows",
    "neighbour_max_cells",
    "patch_mean_abs_diff",
]


def patch_mean_abs_diff(x: torch.Tensor, prev: torch.Tensor, patch: int) -> torch.Tensor:
    """Mean |x - prev| over each patch and all channels: (N, C, H, W) -> (N, 1, gh, gw)."""
    return F.avg_pool2d((x - prev).abs().mean(1, keepdim=True), patch)


def neighbour_max(x: torch.Tensor, reach: int) -> torch.Tensor:
    """Max over each cell's (2*reach+1)^2 neighbourhood of a non-negative grid (N, C, gh, gw).

    Separable maxima of shifted slices with zero padding (so only for values >= 0);
    ``max_pool2d`` on such tiny grids took tens of microseconds a call here.
    """
    if reach <= 0:
        return x
    gh, gw = x.shape[-2:]
    p = F.pad(x, (reach, reach, reach, reach))
    rows = p[..., 0:gh, :]
    for k in range(1, 2 * reach + 1):
        rows = torch.maximum(rows, p[..., k : k + gh, :])
    out = rows[..., 0:gw]
    for k in range(1, 2 * reach + 1):
        out = torch.maximum(out, rows[..., k : k + gw])
    return out


def neighbour_table(grid: tuple[int, int], reach: int) -> torch.Tensor:
    """Flat indices (cells, (2*reach+1)^2) of each cell's neighbourhood on a (gh, gw) grid.

    A neighbour outside the grid is given the index ``gh * gw``: the zero row that
    ``neighbour_max_rows`` appends, as ``neighbour_max`` pads with zeros.
    """
    gh, gw = grid
    offsets = torch.arange(-reach, reach + 1)
    r = torch.arange(gh)[:, None] + offsets[None, :]  # (gh, m)
    c = torch.arange(gw)[:, None] + offsets[None, :]  # (gw, m)
    inside = ((r >= 0) & (r < gh))[:, None, :, None] & ((c >= 0) & (c < gw))[None, :, None, :]
    idx = r[:, None, :, None] * gw + c[None, :, None, :]  # (gh, gw, m, m)
    idx = torch.where(inside, idx, torch.full_like(idx, gh * gw))
    return idx.reshape(gh * gw, -1)


def neighbour_max_rows(rows: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``neighbour_max`` on cell-major rows (cells, K) of non-negative values.

    ``table`` is the grid's ``neighbour_table``; equal to ``neighbour_max`` (a maximum
    over the same values, zeros outside the grid) in three kernels.
    """
    cells, k = rows.shape
    padded = torch.cat([rows, rows.new_zeros((1, k))])
    return padded.index_select(0, table.view(-1)).view(cells, -1, k).amax(1)


def neighbour_max_cells(rows: torch.Tensor, grid: tuple[int, int], reach: int) -> torch.Tensor:
    """``neighbour_max`` on cell-major rows (cells, K) of non-negative values, by grid shape.

    The rows of a (gh, gw) grid are a channels-last (1, K, gh, gw) map, so this is one
    ``max_pool2d`` (kernel 2*reach+1, stride 1) on a view, without copies. Its -inf
    padding gives the same maxima as ``neighbour_max``'s zeros because each window holds
    its own cell, which is >= 0. One kernel: here about a quarter of the time of
    ``neighbour_max_rows``, whose maximum over the gathered middle axis was slow.
    """
    if reach <= 0:
        return rows
    gh, gw = grid
    k = rows.shape[1]
    cl = rows.view(1, gh, gw, k).permute(0, 3, 1, 2)
    out = F.max_pool2d(cl, 2 * reach + 1, 1, reach)
    return out.permute(0, 2, 3, 1).reshape(gh * gw, k)


def gumbel_gate(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Hard 0/1 gate with a straight-through gradient (Gumbel-sigmoid, training only).

    Forward: 1 where sigmoid((logit + logistic noise) / temperature) > 0.5. Backward: the
    gradient of the soft sigmoid.
    """
    u = torch.rand_like(logits).clamp_(1e-6, 1 - 1e-6)
    soft = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / temperature)
    hard = (soft > 0.5).to(soft.dtype)
    return hard + soft - soft.detach()


class PatchGate(nn.Module):
    """What a gate provides to the executor (see the module docstring)."""

    patch: int

    def cell_features(self, x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """Per-patch features (N, F, gh, gw), each from its own patch of x and prev."""
        raise NotImplementedError

    def static_features(self, x: torch.Tensor) -> torch.Tensor:
        """Features of patches that did not change (x == prev)."""
        return self.cell_features(x, x)

    def decide(self, features: torch.Tensor) -> torch.Tensor:
        """Per-patch logits (N, 1, gh, gw) from the feature grid; compute where > 0."""
        raise NotImplementedError

    def macs(self, channels: int, featured: int, cells: int) -> int:
        """MAC-equivalents of one decision with ``featured`` patches' features computed."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """Logits (N, 1, gh, gw) from whole maps (the training path)."""
        return self.decide(self.cell_features(x, prev))

    # -- cell-major inference path (one frame; rows are cells in row-major order) --------
    def table(self, x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """Features (cells, F) of whole maps x and prev (1, C, H, W)."""
        f = self.cell_features(x, prev)
        return f.reshape(f.shape[1], -1).t().contiguous()

    def static_table(self, x: torch.Tensor) -> torch.Tensor:
        """Features (cells, F) of a whole map (1, C, H, W) that did not change."""
        f = self.static_features(x)
        return f.reshape(f.shape[1], -1).t().contiguous()

    def patch_table(self, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        """Features (n, F) of gathered patches (n, C, patch, patch), new against old."""
        return self.cell_features(new, old).flatten(1)

    def still_rows(self, new: torch.Tensor, rows: torch.Tensor) -> torch.Tensor | None:
        """Static features (n, F) of patches ``new`` whose ``patch_table`` rows are ``rows``
        (what they are on the next frame if unchanged); None: always the same constant."""
        return self.static_features(new).flatten(1)

    def decide_table(self, table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Logits (cells,) from the feature rows (cells, F) of a (gh, gw) grid."""
        gh, gw = grid
        return self.decide(table.t().reshape(1, -1, gh, gw)).reshape(-1)

    def decide_cells(self, table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Flat indices (n,) of the cells to compute (logit > 0), ascending: the inference
        decision from the feature rows (cells, F) of a (gh, gw) grid."""
        return (self.decide_table(table, grid) > 0).nonzero().squeeze(1)

    def update_static(
        self, static: torch.Tensor, cells: torch.Tensor, new: torch.Tensor, rows: torch.Tensor
    ) -> None:
        """Write into ``static`` (cells, F), in place, the rows the rewritten ``cells``
        (patches ``new``, ``patch_table`` rows ``rows``) have on a frame they do not change."""
        still = self.still_rows(new, rows)
        if still is not None:
            static.index_copy_(0, cells, still)


class ThresholdGate(PatchGate):
    """Compute a patch when its mean absolute change exceeds ``tau``.

    With ``reach`` = 0 this is the literal baseline: a patch looks at itself only. But a
    change also reaches the outputs of neighbouring patches through the block's
    receptive-field halo, so a patch-only gate leaves stale bands (ghosts of a moved or
    switched object) in its neighbours until the next key frame. With ``reach`` = r a
    patch is computed when it or any patch within r cells changed by more than ``tau``
    (``prepare`` sets r = ceil(halo / patch), 1 for every block of PerceptionNet); with
    tau = 0 that makes the skipping exact.

    Parameters
    ----------
    patch : int
        Patch side at the block's input.
    tau : float
        Threshold on the mean |x_t - x_{t-1}| over the patch and channels.
    reach : int
        Neighbourhood (in cells) whose change also triggers a patch.
    """

    def __init__(self, patch: int, tau: float, reach: int = 0) -> None:
        super().__init__()
        self.patch = patch
        self.tau = float(tau)
        self.reach = int(reach)

    def cell_features(self, x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """Per-patch features (N, 1, gh, gw): the mean absolute change."""
        return patch_mean_abs_diff(x, prev, self.patch)

    def static_features(self, x: torch.Tensor) -> torch.Tensor:
        """An unchanged patch has no change: zeros (without a pass over x)."""
        n, _, h, w = x.shape
        return x.new_zeros((n, 1, h // self.patch, w // self.patch))

    def decide(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (N, 1, gh, gw): (largest) mean change within reach minus tau."""
        return neighbour_max(features, self.reach) - self.tau

    def static_table(self, x: torch.Tensor) -> torch.Tensor:
        """Zeros (cells, 1)."""
        _, _, h, w = x.shape
        return x.new_zeros(((h // self.patch) * (w // self.patch), 1))

    def patch_table(self, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        """Mean |new - old| (n, 1) per patch."""
        return (new - old).abs_().mean((1, 2, 3)).unsqueeze(1)

    def still_rows(self, new: torch.Tensor, rows: torch.Tensor) -> torch.Tensor | None:
        """None: an unchanged patch's feature is always zero."""
        return None

    def decide_table(self, table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Logits (cells,): largest mean change within reach minus tau."""
        return neighbour_max_cells(table, grid, self.reach).view(-1) - self.tau

    def update_static(
        self, static: torch.Tensor, cells: torch.Tensor, new: torch.Tensor, rows: torch.Tensor
    ) -> None:
        """Nothing: an unchanged patch's feature is always zero."""

    def macs(self, channels: int, featured: int, cells: int) -> int:
        """MAC-equivalents of one decision: one per input element of each featured patch."""
        return featured * channels * self.patch * self.patch


class LearnedGate(PatchGate):
    """The learned PASS gate (see the module docstring for its design).

    Optionally (``prior_tau`` set) its logit is a training-free prior plus the learned
    part: ``prior_scale * (change within reach - prior_tau) + conv(features)``, the
    learned part starting at zero. It then starts as the halo-aware ``ThresholdGate`` and
    training learns where a change does not matter (noise, drift, background) and where
    a patch must be computed anyway. This is our design choice (the paper's gate details
    are not public): with a few dozen training steps the bare learned gate kept missing
    the patches a change reaches through the halo, and lost accuracy.

    Parameters
    ----------
    channels : int
        Channels of the block's input.
    patch : int
        Patch side at the block's input.
    hidden : int
        Channels of the grid convolution.
    init_bias : float
        Initial logit bias without a prior; positive starts by computing everything, and
        the sparsity loss then teaches where skipping is harmless.
    prior_tau : float or None
        Threshold of the prior (None: no prior).
    prior_scale : float
        Slope of the prior's logit per unit of mean absolute change.
    reach : int
        Neighbourhood (cells) of the prior's change (as ``ThresholdGate.reach``).
    residual_bound : float
        With a prior, the learned part is ``b * tanh(raw / b)``: it can overturn the
        prior only where the change is within ``b / prior_scale`` of the threshold (noise,
        drift, jitter), never for a large change such as a moving or switching object. A
        free residual learned, from brief training on small frames, to skip patches the
        static test stream needed (up to 6.6 points of accuracy lost on one seed).

    Training (``forward`` on whole maps, Gumbel noise and a straight-through estimator
    in ``PassModel.forward_clip``) and inference (``decide_cells``: the same logit,
    thresholded at 0) share these parameters; the inference path only regroups the
    arithmetic into fewer tensor operations (see ``decide_cells``).
    """

    def __init__(
        self,
        channels: int,
        patch: int,
        hidden: int = 16,
        init_bias: float = 2.0,
        prior_tau: float | None = None,
        prior_scale: float = 200.0,
        reach: int = 0,
        residual_bound: float = 8.0,
    ) -> None:
        super().__init__()
        self.patch = patch
        self.channels = channels
        self.hidden = hidden
        self.prior_tau = prior_tau
        self.prior_scale = float(prior_scale)
        self.reach = int(reach)
        self.residual_bound = float(residual_bound)
        self.point = nn.Linear(3 * channels, hidden)
        self.out = nn.Linear(2 * hidden, 1)
        if prior_tau is None:
            nn.init.constant_(self.out.bias, init_bias)
        else:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def cell_features(self, x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """Pooled per-patch features (N, 3C, gh, gw): means of x, |x - prev| and
        (x - prev)^2 (the square stands in for a max, which is sensitive to a few strongly
        changed pixels too; max pooling was the gate's slowest kernel here)."""
        d = x - prev
        return torch.cat(
            [
                F.avg_pool2d(x, self.patch),
                F.avg_pool2d(d.abs(), self.patch),
                F.avg_pool2d(d * d, self.patch),
            ],
            dim=1,
        )

    def static_features(self, x: torch.Tensor) -> torch.Tensor:
        """An unchanged patch: its mean, and zero change (no pass over a zero diff)."""
        mean = F.avg_pool2d(x, self.patch)
        return torch.cat([mean, torch.zeros_like(mean), torch.zeros_like(mean)], dim=1)

    def decide(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (N, 1, gh, gw) from the feature grid; compute where logit > 0.

        Per cell a 1x1 convolution (as a matmul over cells) to ``hidden`` channels, ReLU,
        then the cell's own and its 3x3 neighbourhood's (max-pooled) hidden values to one
        logit. (A 3x3 convolution on the tiny grid ran about 0.2 ms per call here, more
        than the patches it saves; this ran in a few microseconds.)
        """
        n, f, gh, gw = features.shape
        h = F.relu(self.point(features.reshape(n, f, gh * gw).transpose(1, 2)))  # (n, cells, k)
        grid = h.transpose(1, 2).reshape(n, -1, gh, gw)
        near = neighbour_max(grid, 1).reshape(n, -1, gh * gw).transpose(1, 2)
        learned = self.out(torch.cat([h, near], dim=2)).transpose(1, 2).reshape(n, 1, gh, gw)
        if self.prior_tau is None:
            return learned
        c = self.channels
        change = features[:, c : 2 * c].mean(1, keepdim=True)  # mean |d| per patch
        change = neighbour_max(change, self.reach)
        b = self.residual_bound
        return self.prior_scale * (change - self.prior_tau) + b * torch.tanh(learned / b)

    def table(self, x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """Rows (cells, 3C) of whole maps: ``cell_features`` with one pooling over the
        stacked [x, |x - prev|, (x - prev)^2] instead of three."""
        d = x - prev
        f = F.avg_pool2d(torch.cat([x, d.abs(), d.mul_(d)], dim=1), self.patch)
        return f.reshape(f.shape[1], -1).t()  # transposed: the matmuls take it as it is

    def static_table(self, x: torch.Tensor) -> torch.Tensor:
        """Rows (cells, 3C): each patch's mean, and zero change."""
        mean = F.avg_pool2d(x, self.patch)
        rows = mean.reshape(mean.shape[1], -1).t()
        return torch.cat([rows, rows.new_zeros((rows.shape[0], 2 * self.channels))], dim=1)

    def patch_table(self, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        """Rows (n, 3C): means of new, |new - old| and (new - old)^2 per patch."""
        d = new - old
        return torch.cat([new, d.abs(), d * d], dim=1).mean((2, 3))

    def still_rows(self, new: torch.Tensor, rows: torch.Tensor) -> torch.Tensor | None:
        """The rows with their change columns zeroed (the mean columns are the same)."""
        zeros = rows.new_zeros((rows.shape[0], 2 * self.channels))
        return torch.cat([rows[:, : self.channels], zeros], dim=1)

    def update_static(
        self, static: torch.Tensor, cells: torch.Tensor, new: torch.Tensor, rows: torch.Tensor
    ) -> None:
        """``still_rows`` in two operations: the rows times a constant 1/0 column mask
        (ones on the mean columns), copied into ``static`` in place."""
        keep = self.__dict__.get("_keep")
        if keep is None or keep.shape[0] != rows.shape[1]:
            keep = torch.zeros(3 * self.channels)
            keep[: self.channels] = 1.0
            self.__dict__["_keep"] = keep
        static.index_copy_(0, cells, rows * keep)

    def _scaled(
        self, table: torch.Tensor, grid: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``decide``'s arithmetic on rows: (u, change), u = tanh(learned / b) with a prior
        (the learned logit itself without; change is then None), change = the largest
        mean |d| within ``reach`` (cells, 1).

        Fewer kernels than the grid path: with reach 1 the prior's change column rides
        along with the hidden values through one neighbourhood maximum (both >= 0), the
        two halves of the output layer are two matmuls into one result (no concatenation)
        and the 1 / b of tanh(learned / b) is folded into the matmuls' scale factors.
        """
        h = torch.addmm(self.point.bias, table, self.point.weight.t()).relu_()
        k = self.hidden
        w_own, w_near = self.out.weight[:, :k].t(), self.out.weight[:, k:].t()
        if self.prior_tau is None:
            near = neighbour_max_cells(h, grid, 1)
            learned = torch.addmm(self.out.bias, h, w_own)
            return learned.addmm_(near, w_near), None
        c = self.channels
        change = table[:, c : 2 * c].mean(1, keepdim=True)
        if self.reach == 1:
            both = neighbour_max_cells(torch.cat([h, change], dim=1), grid, 1)
            near, change = both[:, :k], both[:, k:]
        else:
            near = neighbour_max_cells(h, grid, 1)
            change = neighbour_max_cells(change, grid, self.reach)
        inv = 1.0 / self.residual_bound
        u = torch.addmm(self.out.bias, h, w_own, beta=inv, alpha=inv)
        return u.addmm_(near, w_near, alpha=inv).tanh_(), change

    def decide_table(self, table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Logits (cells,): ``decide``'s arithmetic on rows (see ``_scaled``)."""
        u, change = self._scaled(table, grid)
        if change is None:
            return u.view(-1)
        assert self.prior_tau is not None  # _scaled returns a change column only with a prior
        prior = (change - self.prior_tau).mul_(self.prior_scale)
        return prior.add_(u, alpha=self.residual_bound).view(-1)

    def decide_cells(self, table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Cells with logit > 0 (``decide_table``'s decision, up to rounding), in a dozen
        kernels: at inference the gate's cost was its number of small tensor operations
        (each several microseconds between the patch convolutions), not its MACs.

        With a prior of reach 1 (or no prior) it runs on ``_fused_weights``: the first
        matmul also yields the prior's mean |d| column, one neighbourhood maximum serves
        the hidden values and the prior, and the test is
        tanh(learned / b) + (scale / b) * change > (scale / b) * tau. Other reaches take
        ``_scaled``'s path.
        """
        fused = self._fused_weights()
        if fused is None:
            u, change = self._scaled(table, grid)
            bar = 0.0
            if change is not None:
                r = self.prior_scale / self.residual_bound
                u, bar = u.add_(change, alpha=r), r * float(self.prior_tau)  # type: ignore[arg-type]
            return (u.view(-1) > bar).nonzero().squeeze(1)
        w_in, b_in, w_own, w_near, b_out, pick, r, bar = fused
        gh, gw = grid
        k = w_in.shape[1]
        cells = gh * gw
        z = torch.addmm(b_in, table, w_in).relu_()  # (cells, k): contiguous, cell-major
        pooled = F.max_pool2d(z.as_strided((1, k, gh, gw), (cells * k, 1, gw * k, k)), 3, 1, 1)
        if pooled.is_contiguous(memory_format=torch.channels_last):
            near = pooled.as_strided((cells, k), (k, 1))  # cell-major already
        else:
            near = pooled.permute(0, 2, 3, 1).reshape(cells, k)
        u = torch.addmv(b_out, z, w_own).addmv_(near, w_near)  # (cells,)
        if pick is not None:
            u = u.tanh_().addmv_(near, pick, alpha=r)
        return (u > bar).nonzero().view(-1)

    def _fused_weights(
        self,
    ) -> tuple[Any, Any, Any, Any, Any, Any, float, float] | None:
        """``decide_cells``' operands, derived from the parameters and cached until one
        of them is replaced or changed in place (its storage or version counter moves:
        optimizer steps, ``load_state_dict``, in-place edits under ``no_grad``; an edit
        through ``.data`` is invisible to it). None for a prior whose reach is not 1.

        (w_in, b_in): ``point`` with one more output, the mean |d| over channels (the
        prior's change; >= 0, so the ReLU keeps it). (w_own, w_near, b_out): ``out`` split
        into the own and the neighbourhood half, scaled by 1 / b, zero for the change
        column. pick: selects the change column of the neighbourhood maxima; r = scale /
        b, bar = r * tau.
        """
        if self.prior_tau is not None and self.reach != 1:
            return None
        # (through the modules' dicts: nn.Module attribute lookups cost more, per call)
        modules: dict[str, Any] = self._modules
        point, out = modules["point"]._parameters, modules["out"]._parameters
        w, b, ow, ob = point["weight"], point["bias"], out["weight"], out["bias"]
        key = (
            w.data_ptr(), w._version, b.data_ptr(), b._version,
            ow.data_ptr(), ow._version, ob.data_ptr(), ob._version,
            self.prior_tau, self.prior_scale, self.residual_bound, self.reach,
        )  # fmt: skip
        cached = self.__dict__.get("_fused")
        if cached is not None and cached[0] == key:
            return cached[1]  # type: ignore[no-any-return]
        k, c = self.hidden, self.channels
        with torch.no_grad():
            w, bias = self.point.weight.detach(), self.point.bias.detach()
            w_out, b_out = self.out.weight.detach()[0], self.out.bias.detach()
            fused: tuple[Any, Any, Any, Any, Any, Any, float, float]
            if self.prior_tau is None:
                fused = (
                    w.t().contiguous(),
                    bias.clone(),
                    w_out[:k].clone(),
                    w_out[k:].clone(),
                    b_out.clone(),
                    None,
                    0.0,
                    0.0,
                )
            else:
                change = torch.zeros(1, 3 * c)
                change[0, c : 2 * c] = 1.0 / c
                inv = 1.0 / self.residual_bound
                zero = torch.zeros(1)
                pick = torch.zeros(k + 1)
                pick[k] = 1.0
                r = self.prior_scale * inv
                fused = (
                    torch.cat([w, change]).t().contiguous(),
                    torch.cat([bias, zero]),
                    torch.cat([w_out[:k] * inv, zero]),
                    torch.cat([w_out[k:] * inv, zero]),
                    b_out * inv,
                    pick,
                    r,
                    r * float(self.prior_tau),
                )
        self.__dict__["_fused"] = (key, fused)
        return fused

    def macs(self, channels: int, featured: int, cells: int) -> int:
        """MAC-equivalents of one decision: pooling of each featured patch (twice: changed
        and unchanged features, three passes each) plus the grid convolutions."""
        pooled = 6 * featured * channels * self.patch * self.patch
        return pooled + cells * (3 * channels * self.hidden + 2 * self.hidden)
