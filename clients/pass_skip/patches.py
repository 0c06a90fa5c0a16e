"""Gather patch windows (with their halo) from a feature map and put patches back.

Small tensor functions, apart from the modules. They work on strided views too (the
executor keeps each map inside a zero-bordered buffer, so gathering a window with its halo
needs no padding copy per frame):

- ``pad_map`` adds the zero border a block's windows need (tests and one-off use);
- ``gather_windows`` copies the chosen patches' windows out of a padded map into a batch;
- ``take_patches`` / ``put_patches`` read / write whole patches of an unpadded map;
- ``border_mask`` zeroes what lies outside the image inside a window (a block's inner
  layers must see zeros there, as their own padding would, not values computed from the
  outer padding);
- ``grid_indices`` lists the cells a gate chose.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "pad_map",
    "gather_windows",
    "take_patches",
    "put_patches",
    "border_mask",
    "grid_indices",
]


def grid_indices(decision: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices of the True cells of a (gh, gw) decision grid, row-major."""
    gw = decision.shape[-1]
    flat = decision.reshape(-1).nonzero().squeeze(1)
    return torch.div(flat, gw, rounding_mode="floor"), flat % gw


def pad_map(x: torch.Tensor, patch: int, window: int, halo: int) -> torch.Tensor:
    """Zero-pad a map (N, C, H, W) so every patch's window lies inside: ``halo`` on the
    top/left, ``max(window - patch - halo, 0)`` on the bottom/right."""
    right = max(window - patch - halo, 0)
    return F.pad(x, (halo, right, halo, right))


def gather_windows(
    padded: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, patch: int, window: int
) -> torch.Tensor:
    """Copy the windows of the chosen patches out of a padded map into one batch.

    Parameters
    ----------
    padded : torch.Tensor
        (1, C, H', W'): the map with its halo border (see ``pad_map``); the window of patch
        (i, j) starts at (i * patch, j * patch) of ``padded``.
    rows, cols : torch.Tensor
        Grid indices (n,) of the patches.
    patch : int
        Patch side (the stride between windows).
    window : int
        Window side (patch plus halos).

    Returns
    -------
    torch.Tensor
        (n, C, window, window), contiguous.
    """
    views = padded[0].unfold(1, window, patch).unfold(2, window, patch)  # (C, gh, gw, w, w)
    return views[:, rows, cols].transpose(0, 1).contiguous()


def take_patches(
    x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, patch: int
) -> torch.Tensor:
    """Copy whole patches (n, C, patch, patch) out of a map (1, C, H, W)."""
    return gather_windows(x, rows, cols, patch, patch)


def put_patches(
    x: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> None:
    """Write patches (n, C, p, p) into a map (1, C, gh*p, gw*p) in place (views allowed)."""
    p = values.shape[-1]
    views = x[0].unfold(1, p, p).unfold(2, p, p)  # (C, gh, gw, p, p), aliasing x
    views[:, rows, cols] = values.transpose(0, 1)


def border_mask(
    rows: torch.Tensor,
    cols: torch.Tensor,
    patch: int,
    window: int,
    halo: int,
    height: int,
    width: int,
) -> torch.Tensor | None:
    """1 where a window position lies inside the (height, width) map, 0 outside.

    The window of patch (i, j) starts at (i * patch - halo, j * patch - halo) in map
    coordinates. Returns a (n, 1, window, window) float mask, or None when every chosen
    window lies fully inside the map (nothing to zero).
    """
    offsets = torch.arange(window, device=rows.device)
    r = rows[:, None] * patch - halo + offsets[None, :]
    c = cols[:, None] * patch - halo + offsets[None, :]
    row_ok = (r >= 0) & (r < height)
    col_ok = (c >= 0) & (c < width)
    if bool(row_ok.all()) and bool(col_ok.all()):
        return None
    mask = row_ok[:, None, :, None] & col_ok[:, None, None, :]
    return mask.to(torch.float32)
