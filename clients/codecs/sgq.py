"""SGQ, stripe-wise group quantization: the numerics of one tensor (scheme ``Scheme.SGQ``).

The paper (NeurIPS 2022) describes a hierarchical channel-spatial encoding but publishes
no code; this is the most faithful version we could design. Every choice below is ours.

1. View. A tensor becomes a ``(C, R, W)`` array of C channels, R natural rows ("stripes")
   and W values per row:

   - ``LAYOUT_FEATURE`` (feature maps ``(N, C, H, W)``, or ``(N, C, L)``): channels are
     axis 1, rows are the ``N*H`` image rows, W the row length. This is the paper's case.
   - ``LAYOUT_CONV`` (conv weights ``(O, I, kh, kw)``): channels are the output channels,
     rows the ``kh`` kernel rows, each row holds ``I*kw`` values (one kernel row across
     all input channels).
   - ``LAYOUT_MATRIX`` (linear weights ``(O, I)`` and any other tensor of 2+ dims): channels
     are axis 0, a single row holds the rest.

   Long rows are cut into ``P = ceil(W / stripe)`` equal pieces (column or input-channel
   blocks, zero padded to ``P * L`` with ``L = ceil(W / P)``), giving ``S = R*P`` stripes
   of ``L`` values per channel. ``stripe`` (default 32) bounds the stripe length.
2. Channel groups. Channels are sorted by their absmax (descending) and cut into
   ``ceil(C / group)`` groups of equal size (at most 256 groups; the last group is padded
   with zero channels). Sorting by range is exact 1-D clustering of the statistic that
   matters here: channels in a group share every stripe scale, so putting channels of
   similar range together wastes the fewest levels. A cheap rule (one argsort) keeps
   encoding fast. The group of each channel is sent as a packed label table
   (``ceil(log2 groups)`` bits per channel), not as a permutation; within a group,
   channels keep ascending index order, so the decoder rebuilds the order with a stable
   argsort of the labels.
3. Scales (hierarchical). A quantization block is one group x one stripe (``G * L``
   values). Each group has a float32 range ``A_g`` (its absmax); each block has an 8-bit
   log-ratio code ``k`` with range ``A_g * 2**(-k/8) >= absmax(block)`` (see
   :func:`quant.stripe_codes`), so a block costs 8 bits of scale, not 32.
4. Bit-widths (significance). Each group gets ``b_g`` in ``[min_bits, max_bits]``
   (default 2..8) with the mean over codes at most ``bits`` (the average budget, may be
   fractional). The midrise error of a block with range r and b bits has variance about
   ``r**2 4**-b / 3``, so the group's significance is its distortion weight
   ``w_g = sum over its blocks of G*L*r**2`` (its quantized energy), and the allocation
   minimises ``sum_g w_g 4**-b_g``: the greedy / reverse water-filling solution, computed
   with one sort of the (group, next bit) increments, where an increment from b to b+1
   ranks by ``b + 0.5 - log2(w_g / n_g) / 2`` (``n_g`` codes in the group, the cost of a
   bit) and is taken while it fits the budget (:func:`allocate_bits`). High-energy groups
   get more bits, low-energy groups fewer. By default the budget holds over the whole
   payload (``budget=model`` in the codec): the groups of all tensors compete, so the
   layers whose update is large (typically the last ones) get more bits, which minimises
   the error of the whole update; ``budget=tensor`` holds it per tensor.
   ``alloc=uniform`` gives every group ``bits``.
   The budget counts code bits only; scale and table overhead is reported by the
   benchmark through the real payload size.
5. Codes. Midrise b-bit codes (:mod:`quant`), error per value at most
   ``range / 2**b`` (``<= 2**(1/8) * absmax(block) / 2**b``): the bounded deviation the
   paper relies on. A group with no negative value (post-ReLU feature maps) uses an
   unsigned grid instead: ``2**b`` levels on ``[0, range]`` with zero exact, error at most
   ``range / (2 (2**b - 1))``. Codes are packed per bit-width (all groups with the same
   b together, in group order) with :func:`bits.pack_bits`.
6. Sizes. Tensors with fewer than 2 dims or ``min_size`` values (biases, norms) go to the
   small part, exact fp32 by default (``small=fp16`` or ``int8`` on request); non-float
   tensors always travel exactly.

Body layout (after the tensor record header of :mod:`wire`)::

    u8  layout                  0 matrix, 1 conv, 2 feature
    u8  reserved (0)
    u32 G                       channels per group
    u32 P                       pieces per row
    u16 groups                  must equal ceil(C / G)
    groups x u8                 bit-width of each group
    groups x u8                 grid of each group: 0 signed midrise, 1 unsigned
    groups x f32                group range A_g
    packed labels               C labels of ceil(log2 groups) bits (>= 1 bit)
    groups*S x u8               stripe codes k, group-major
    packed codes                for each bit-width b ascending: the groups with b, in
                                order, G*S*L codes each (channel, stripe, position order)
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from devices.errors import PayloadError

from .bits import pack_bits, packed_size, unpack_bits
from .quant import STRIPE_TABLE, dequantize_midrise, quantize_midrise, stripe_codes
from .wire import Reader, TensorRecord

__all__ = [
    "LAYOUT_CONV",
    "LAYOUT_FEATURE",
    "LAYOUT_MATRIX",
    "allocate_bits",
    "choose_layout",
    "Prepared",
    "decode_sgq",
    "encode_sgq",
    "finish_sgq",
    "prepare_sgq",
]

LAYOUT_MATRIX = 0
LAYOUT_CONV = 1
LAYOUT_FEATURE = 2
MAX_GROUPS = 256
_HEAD = struct.Struct("<BBIIH")


def choose_layout(shape: tuple[int, ...], kind: str) -> int:
    """Pick the view of a tensor: ``kind`` is "weight" (updates) or "feature" (maps)."""
    if kind == "feature" and len(shape) >= 3:
        return LAYOUT_FEATURE
    if len(shape) == 4:
        return LAYOUT_CONV
    return LAYOUT_MATRIX


def _view_dims(shape: tuple[int, ...], layout: int) -> tuple[int, int, int]:
    """(C, R, W) of the channel-stripe view; PayloadError if the layout cannot apply."""
    if layout == LAYOUT_MATRIX and len(shape) >= 2:
        return shape[0], 1, math.prod(shape[1:])
    if layout == LAYOUT_CONV and len(shape) == 4:
        o, i, kh, kw = shape
        return o, kh, i * kw
    if layout == LAYOUT_FEATURE and len(shape) >= 3:
        return shape[1], shape[0] * math.prod(shape[2:-1]), shape[-1]
    raise PayloadError(f"malformed SGQ body: layout {layout} does not apply to shape {shape}")


def _to_view(x: NDArray[np.float32], layout: int) -> NDArray[np.float32]:
    c, r, w = _view_dims(x.shape, layout)
    if layout == LAYOUT_CONV:
        return x.transpose(0, 2, 1, 3).reshape(c, r, w)
    if layout == LAYOUT_FEATURE:
        return np.moveaxis(x, 1, 0).reshape(c, r, w)
    return x.reshape(c, r, w)


def _from_view(v: NDArray[np.float32], shape: tuple[int, ...], layout: int
               ) -> NDArray[np.float32]:
    if layout == LAYOUT_CONV:
        o, i, kh, kw = shape
        return np.ascontiguousarray(v.reshape(o, kh, i, kw).transpose(0, 2, 1, 3))
    if layout == LAYOUT_FEATURE:
        moved = (shape[1], shape[0], *shape[2:])
        return np.ascontiguousarray(np.moveaxis(v.reshape(moved), 0, 1))
    return v.reshape(shape)


def allocate_bits(weights: NDArray[np.float64], budget: float, min_bits: int = 2,
                  max_bits: int = 8, sizes: NDArray[np.int64] | None = None
                  ) -> NDArray[np.uint8]:
    """Bit-widths minimising ``sum w_g 4**-b_g`` with ``sum n_g b_g <= budget * sum n_g``.

    Greedy reverse water-filling: start every group at ``min_bits`` and take the (group,
    next bit) increments in order of distortion saved per bit spent, i.e. ascending
    ``b + 0.5 - log2(w_g / n_g) / 2``, while they fit the budget, then fill the rest with
    later increments that still fit. Increments of one group come in increasing order and
    are taken as a prefix per group. For equal sizes this is the exact integer optimum.

    Parameters
    ----------
    weights : numpy.ndarray
        Non-negative distortion weights (significance) of the groups.
    budget : float
        Average bits per code, in ``[min_bits, max_bits]``.
    min_bits, max_bits : int
        Bounds of each group's width.
    sizes : numpy.ndarray, optional
        Codes per group (the cost of one more bit); equal sizes if omitted.
    """
    n = weights.size
    span = max_bits - min_bits
    out = np.full(n, min_bits, dtype=np.uint8)
    if n == 0 or span == 0:
        return out
    cost = np.ones(n, np.float64) if sizes is None else sizes.astype(np.float64)
    allowance = (budget - min_bits) * float(cost.sum()) + 1e-9 * float(cost.max())
    density = np.maximum(weights, 1e-300) / cost
    events = (np.arange(min_bits, max_bits, dtype=np.float64) + 0.5)[None, :] \
        - 0.5 * np.log2(density)[:, None]
    order = np.argsort(events.reshape(-1), kind="stable")
    spent = np.cumsum(np.repeat(cost, span)[order])
    stop = int(np.searchsorted(spent, allowance, side="right"))
    out += np.bincount(order[:stop] // span, minlength=n).astype(np.uint8)
    left = allowance - (float(spent[stop - 1]) if stop else 0.0)
    if stop < order.size and left >= float(cost.min()):
        # Fill what the first misfit left with later increments that still fit (a group
        # whose increment was skipped takes no further ones, keeping prefixes per group).
        blocked: set[int] = set()
        costs = cost.tolist()
        smallest = float(cost.min())
        for e in order[stop:].tolist():
            grp = e // span
            if grp in blocked:
                continue
            if costs[grp] <= left:
                out[grp] += 1
                left -= costs[grp]
                if left < smallest:
                    break
            else:
                blocked.add(grp)
    return out


def _geometry(c: int, r: int, w: int, group: int, stripe: int) -> tuple[int, int, int, int]:
    """(G, groups, P, L) for a view, with groups <= MAX_GROUPS and balanced padding."""
    groups = min(-(-c // max(group, 1)), MAX_GROUPS)
    g = -(-c // groups)
    groups = -(-c // g)
    p = max(1, -(-w // max(stripe, 1)))
    length = -(-w // p)
    return g, groups, p, length


def _grid(bits: NDArray[np.uint8], unsigned: NDArray[np.bool_]
          ) -> tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.float32]]:
    """Per-group (levels per range, code shift, decode offset) of the two grids.

    Signed midrise: ``q = floor(x * half / r + half)``, ``x = (q + 0.5 - half) r / half``.
    Unsigned (a group with no negative value, e.g. post-ReLU features): levels ``0 ..
    2**b - 1`` spanning ``[0, r]`` with zero exact, ``q = floor(x * top / r + 0.5)``,
    ``x = q r / top``.
    """
    half = np.ldexp(np.float32(1.0), bits.astype(np.int32) - 1).astype(np.float32)
    top = (2 * half - 1).astype(np.float32)
    per_range = np.where(unsigned, top, half).astype(np.float32)
    shift = np.where(unsigned, np.float32(0.5), half).astype(np.float32)
    offset = np.where(unsigned, np.float32(0), np.float32(0.5) - half).astype(np.float32)
    return per_range, shift, offset


def _reconstruct(q: NDArray[np.uint8], bits: NDArray[np.uint8], unsigned: NDArray[np.bool_],
                 group_range: NDArray[np.float32], codes: NDArray[np.uint8],
                 perm: NDArray[np.intp], shape: tuple[int, ...], layout: int,
                 geometry: tuple[int, int, int, int]) -> NDArray[np.float32]:
    """Decoded tensor from codes ``q`` of shape (groups, G, S, L) and the side tables."""
    c, r, w = _view_dims(shape, layout)
    g, groups, p, length = geometry
    per_range, _, off = _grid(bits, unsigned)
    block_range = group_range[:, None] * STRIPE_TABLE[codes]  # (groups, S)
    step = block_range / per_range[:, None]
    offset = off[:, None, None, None]
    vals = dequantize_midrise(q, step[:, None, :, None], offset)
    vals = vals.reshape(groups * g, r * p, length)[:c]
    view = np.empty((c, r * p, length), dtype=np.float32)
    view[perm] = vals
    view3 = view.reshape(c, r, p * length)
    if p * length != w:
        view3 = view3[:, :, :w]
    return _from_view(np.ascontiguousarray(view3), shape, layout)


@dataclass
class Prepared:
    """One tensor after grouping and scaling, before bit-widths are chosen."""

    shape: tuple[int, ...]
    layout: int
    geometry: tuple[int, int, int, int]  # (G, groups, P, L)
    grouped: NDArray[np.float32]  # (groups, G, S, L)
    labels: NDArray[np.uint8]
    perm: NDArray[np.intp]
    codes: NDArray[np.uint8]  # (groups, S) stripe scale codes
    group_range: NDArray[np.float32]
    block_range: NDArray[np.float32]  # (groups, S)
    unsigned: NDArray[np.bool_]

    @property
    def group_size(self) -> int:
        """Codes per group (padding included): the cost of one more bit."""
        return int(self.grouped[0].size)

    def energy(self) -> NDArray[np.float64]:
        """Each group's significance: sum over its blocks of block size x range**2."""
        g, _, _, length = self.geometry
        return (self.block_range.astype(np.float64) ** 2).sum(axis=1) * (g * length)


def prepare_sgq(x: NDArray[np.float32], *, layout: int, group: int, stripe: int) -> Prepared:
    """View, group and scale one float32 tensor (finite, 2+ dims, non-empty)."""
    shape = x.shape
    c, r, w = _view_dims(shape, layout)
    g, groups, p, length = _geometry(c, r, w, group, stripe)
    s = r * p
    view = _to_view(x, layout)
    if p * length != w:
        padded = np.zeros((c, r, p * length), dtype=np.float32)
        padded[:, :, :w] = view
        view = padded
    view = view.reshape(c, s, length)
    # Reductions run over long contiguous rows or across channels (fast in numpy); the
    # short stripe axis is reduced last, on a G-times smaller array. No |x| pass: the
    # absmax is max(max, -min).
    rows = view.reshape(c, -1)
    order = np.argsort(-np.maximum(rows.max(axis=1), -rows.min(axis=1)), kind="stable")
    labels = np.empty(c, dtype=np.uint8)
    labels[order] = (np.arange(c) // g).astype(np.uint8)
    perm = np.argsort(labels, kind="stable")
    pad = groups * g - c
    grouped = np.take(view, perm, axis=0)  # faster than fancy indexing
    if pad:
        grouped = np.concatenate([grouped, np.zeros((pad, s, length), np.float32)])
    grouped = grouped.reshape(groups, g, s, length)
    hi = grouped.max(axis=1)  # (groups, S, L)
    lo = grouped.min(axis=1)
    unsigned = lo.reshape(groups, -1).min(axis=1) >= 0
    np.negative(lo, out=lo)
    block_max = np.maximum(hi, lo, out=hi).max(axis=2)  # (groups, S): one short reduction
    group_range = block_max.max(axis=1).astype(np.float32)
    codes = stripe_codes(block_max, group_range)
    return Prepared(
        shape=shape, layout=layout, geometry=(g, groups, p, length), grouped=grouped,
        labels=labels, perm=perm, codes=codes, group_range=group_range,
        block_range=group_range[:, None] * STRIPE_TABLE[codes], unsigned=unsigned,
    )


def finish_sgq(prep: Prepared, widths: NDArray[np.uint8], want_decoded: bool
               ) -> tuple[bytes, NDArray[np.float32] | None]:
    """Quantize a prepared tensor with per-group ``widths`` into an SGQ body.

    Returns the body and, if ``want_decoded``, the tensor the receiver will decode
    (bitwise identical to :func:`decode_sgq` of the body), for error feedback.
    """
    g, groups, p, _ = prep.geometry
    per_range, shift, _ = _grid(widths, prep.unsigned)
    with np.errstate(divide="ignore"):
        inv = np.where(prep.block_range > 0, per_range[:, None] / prep.block_range, 0
                       ).astype(np.float32)
    top = np.ldexp(np.float32(1.0), widths.astype(np.int32)).astype(np.float32) - 1
    q = quantize_midrise(prep.grouped, inv[:, None, :, None], shift[:, None, None, None],
                         top[:, None, None, None])
    flat = q.reshape(groups, -1)
    label_bits = max(1, (groups - 1).bit_length())
    parts = [
        _HEAD.pack(prep.layout, 0, g, p, groups),
        widths.tobytes(),
        prep.unsigned.astype(np.uint8).tobytes(),
        prep.group_range.astype("<f4").tobytes(),
        pack_bits(prep.labels, label_bits),
        prep.codes.tobytes(),
    ]
    for b in np.unique(widths):
        parts.append(pack_bits(flat[widths == b], int(b)))
    decoded = None
    if want_decoded:
        decoded = _reconstruct(q, widths, prep.unsigned, prep.group_range, prep.codes,
                               prep.perm, prep.shape, prep.layout, prep.geometry)
    return b"".join(parts), decoded


def encode_sgq(x: NDArray[np.float32], *, layout: int, bits: float, group: int, stripe: int,
               min_bits: int, max_bits: int, alloc: str, want_decoded: bool
               ) -> tuple[bytes, NDArray[np.float32] | None]:
    """Encode one tensor with its own bit budget (:func:`prepare_sgq` + :func:`finish_sgq`)."""
    prep = prepare_sgq(x, layout=layout, group=group, stripe=stripe)
    groups = prep.geometry[1]
    if alloc == "uniform":
        widths = np.full(groups, int(round(bits)), dtype=np.uint8)
    else:
        widths = allocate_bits(prep.energy(), bits, min_bits, max_bits)
    return finish_sgq(prep, widths, want_decoded)


def decode_sgq(rec: TensorRecord) -> NDArray[np.float32]:
    """Decode an SGQ body; PayloadError on any inconsistency with the record's shape."""
    rd = Reader(rec.body, f"SGQ body of tensor '{rec.name}'")
    layout, _, g, p, groups = rd.unpack("BBIIH")
    c, r, w = _view_dims(rec.shape, layout)
    if c == 0 or r * w == 0 or g == 0 or p == 0 or p > w or groups != -(-c // g) \
            or groups > MAX_GROUPS:
        raise PayloadError(
            f"shape mismatch: SGQ tables of tensor '{rec.name}' (G={g}, P={p}, "
            f"groups={groups}) do not fit its shape {rec.shape}"
        )
    length = -(-w // p)
    s = r * p
    widths = rd.array("u1", groups)
    if widths.min() < 1 or widths.max() > 8:
        raise PayloadError(f"malformed SGQ body of tensor '{rec.name}': bit-widths outside 1..8")
    unsigned = rd.array("u1", groups)
    if unsigned.max() > 1:
        raise PayloadError(f"malformed SGQ body of tensor '{rec.name}': grid flag above 1")
    label_bits = max(1, (groups - 1).bit_length())
    per_group = g * s * length
    counts = np.bincount(widths, minlength=9)
    expected = (_HEAD.size + groups * 6 + packed_size(c, label_bits) + groups * s
                + sum(packed_size(int(n) * per_group, b) for b, n in enumerate(counts) if n))
    if len(rec.body) != expected:
        raise PayloadError(
            f"shape mismatch: tensor '{rec.name}' of shape {rec.shape} needs {expected} "
            f"bytes of SGQ data, the body has {len(rec.body)}"
        )
    group_range = rd.array("<f4", groups)
    if not np.isfinite(group_range).all() or (group_range < 0).any():
        raise PayloadError(f"non-finite or negative scale in SGQ tensor '{rec.name}'")
    labels = unpack_bits(rd.take(packed_size(c, label_bits)), label_bits, c)
    sizes = np.bincount(labels, minlength=groups)
    want = np.full(groups, g)
    want[-1] = c - (groups - 1) * g
    if sizes.size != groups or not np.array_equal(sizes, want):
        raise PayloadError(f"malformed SGQ body of tensor '{rec.name}': group table "
                           "does not match the group sizes")
    perm = np.argsort(labels, kind="stable")
    codes = rd.array("u1", groups * s).reshape(groups, s)
    q = np.empty((groups, per_group), dtype=np.uint8)
    for b in np.unique(widths):
        sel = widths == b
        n = int(sel.sum()) * per_group
        q[sel] = unpack_bits(rd.take(packed_size(n, int(b))), int(b), n).reshape(-1, per_group)
    rd.finish()
    return _reconstruct(q.reshape(groups, g, s, length), widths, unsigned.astype(bool),
                        group_range.astype(np.float32),
                        codes, perm, rec.shape, layout, (g, groups, p, length))
