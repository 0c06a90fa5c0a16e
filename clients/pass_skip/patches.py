"""Gather patch windows (with their halo) from a feature map and put patches back.

Small tensor functions, apart from the modules. Maps are kept channels-last (pixel-major:
each pixel's C values are contiguous), so a window of w x w pixels is w*w contiguous
C-vectors and gathering the chosen windows is one ``index_select`` over pixels, with no
layout shuffle; the gathered batch comes out channels-last, which oneDNN convolves
directly (on this CPU channels-last convolution also ran faster than NCHW).

Patches are addressed by their flat cell index ``i * gw + j`` on a (gh, gw) grid. Index
and mask tables are built once per frame size, so that per frame the work is a handful
of kernels whatever the number of patches:

- ``to_pixel_major`` makes a (1, C, H, W) map channels-last (what the others expect);
- ``pad_map`` adds the zero border a block's windows need;
- ``window_table`` lists, per cell, the flat pixel indices of its window;
- ``gather_cells`` copies the chosen cells' windows into one batch;
- ``put_cells`` writes whole patches into a map (in place, a bordered buffer allowed);
- ``gather_rows`` / ``put_rows``: the same two from pixel indices looked up once (a block
  reads the old values of the patches it is about to overwrite);
- ``mask_table`` marks what lies outside the image inside each cell's window (a block's
  inner layers must see zeros there, as their own padding would, not values computed
  from the outer padding);
- ``chosen_cells`` lists the cells a gate chose.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "to_pixel_major",
    "pad_map",
    "window_table",
    "gather_cells",
    "gather_rows",
    "put_cells",
    "put_rows",
    "pixel_view",
    "mask_table",
    "chosen_cells",
]

_CL = torch.channels_last


def chosen_cells(decision: torch.Tensor) -> torch.Tensor:
    """Flat indices (n,) of the True cells of a decision grid, in row-major order."""
    return decision.reshape(-1).nonzero().squeeze(1)


def to_pixel_major(x: torch.Tensor) -> torch.Tensor:
    """The map (1, C, H, W) in channels-last memory (a no-op when it already is)."""
    return x.contiguous(memory_format=_CL)


def pad_map(x: torch.Tensor, patch: int, window: int, halo: int) -> torch.Tensor:
    """Zero-pad a map (1, C, H, W) so every patch's window lies inside (channels-last):
    ``halo`` on the top/left, ``max(window - patch - halo, 0)`` on the bottom/right."""
    right = max(window - patch - halo, 0)
    return to_pixel_major(F.pad(x, (halo, right, halo, right)))


def pixel_view(buf: torch.Tensor) -> torch.Tensor:
    """The (H*W, C) view of a channels-last (1, C, H, W) map that the functions here
    gather from and write into (in place, it aliases ``buf``); a 2-D one as it is."""
    if buf.dim() == 2:
        return buf
    _, c, h, w = buf.shape
    if not buf.is_contiguous(memory_format=_CL):
        raise ValueError("patch maps must be channels-last contiguous")
    return buf.permute(0, 2, 3, 1).view(h * w, c)


def window_table(
    grid: tuple[int, int], patch: int, window: int, offset: int, width: int
) -> torch.Tensor:
    """Flat pixel indices (gh*gw, window*window) of every cell's window.

    The window of cell (i, j) starts at (i * patch + offset, j * patch + offset) of a
    map ``width`` pixels wide (``offset``: 0 for a window with its halo in a map padded by
    that halo; the border width to address bare patches of a bordered buffer).
    """
    gh, gw = grid
    span = torch.arange(window)
    r = torch.arange(gh)[:, None] * patch + offset + span[None, :]  # (gh, w)
    c = torch.arange(gw)[:, None] * patch + offset + span[None, :]  # (gw, w)
    idx = r[:, None, :, None] * width + c[None, :, None, :]  # (gh, gw, w, w)
    return idx.reshape(gh * gw, window * window)


def gather_cells(
    buf: torch.Tensor,
    table: torch.Tensor,
    cells: torch.Tensor,
    window: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Copy the windows of the chosen cells of a channels-last map into one batch.

    Parameters
    ----------
    buf : torch.Tensor
        (1, C, H', W') channels-last map (with its halo border where windows need one).
    table : torch.Tensor
        ``window_table`` of the map.
    cells : torch.Tensor
        Flat cell indices (n,).
    window : int
        Window side.
    out : torch.Tensor, optional
        A reusable (>= n * window * window, C) workspace to gather into (a fresh large
        tensor per frame costs page faults that here took longer than the copy itself);
        the result then aliases it.

    Returns
    -------
    torch.Tensor
        (n, C, window, window), channels-last contiguous.
    """
    return gather_rows(buf, table.index_select(0, cells).reshape(-1), window, out)


def put_cells(
    buf: torch.Tensor, table: torch.Tensor, cells: torch.Tensor, values: torch.Tensor
) -> None:
    """Write patches (n, C, p, p) into the chosen cells of a channels-last map, in place
    (``table``: the map's ``window_table`` for windows of side p)."""
    put_rows(buf, table.index_select(0, cells).reshape(-1), values)


def gather_rows(
    buf: torch.Tensor, pixels: torch.Tensor, window: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``gather_cells`` from the flat pixel indices (n * window * window,) of the chosen
    cells' windows (their ``window_table`` rows, concatenated). ``buf`` may also be its
    (H*W, C) pixel view (``pixel_view``), which saves two view operations per call."""
    c = buf.shape[1]
    if out is None:
        taken = pixel_view(buf).index_select(0, pixels)
    else:
        taken = torch.index_select(pixel_view(buf), 0, pixels, out=out[: pixels.numel()])
    return taken.view(-1, window, window, c).permute(0, 3, 1, 2)


def put_rows(buf: torch.Tensor, pixels: torch.Tensor, values: torch.Tensor) -> None:
    """``put_cells`` to the flat pixel indices of the patches (``buf`` as in
    ``gather_rows``)."""
    n, c, p, _ = values.shape
    src = values.permute(0, 2, 3, 1).reshape(n * p * p, c)
    pixel_view(buf).index_copy_(0, pixels, src)


def mask_table(
    grid: tuple[int, int], patch: int, window: int, halo: int, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inside-the-image masks of every cell's window, and which cells need one.

    The window of cell (i, j) starts at (i * patch - halo, j * patch - halo) of a
    (height, width) map. Returns a float table (gh*gw, 1, window, window), 1 inside and 0
    outside, and a bool (gh*gw,) that is True where a window crosses the border.
    """
    gh, gw = grid
    span = torch.arange(window)
    r = torch.arange(gh)[:, None] * patch - halo + span[None, :]
    c = torch.arange(gw)[:, None] * patch - halo + span[None, :]
    row_ok = (r >= 0) & (r < height)  # (gh, w)
    col_ok = (c >= 0) & (c < width)  # (gw, w)
    ok = row_ok[:, None, :, None] & col_ok[None, :, None, :]  # (gh, gw, w, w)
    ok = ok.reshape(gh * gw, 1, window, window)
    return ok.to(torch.float32), ~ok.reshape(gh * gw, -1).all(dim=1)
