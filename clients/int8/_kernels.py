"""Every call to a private PyTorch op of the INT8 path lives here, and nowhere else.

The integer kernels are ``torch._int_mm`` (int8 x int8 -> int32 GEMM) and oneDNN's int8
convolution (``torch.ops.onednn.qconv_prepack`` then ``qconv2d_pointwise`` with an FP32
output). Both are private and may change with a torch upgrade, so this module wraps them in
a few small functions, each with its own tests (``tests/test_int8_kernels.py``), and checks
the op schema it was written against (:func:`check_onednn_schema`).

Conventions
-----------
* Integer operands are symmetric int8 values in ``[-127, 127]``. oneDNN's convolution
  wants unsigned activations, so its input operand is passed as ``uint8 = int8 + 128`` with
  zero point 128 (:func:`to_u8`); padding then reads as 128, i.e. zero.
* Accumulation is int32 in both kernels, and both wrap silently once
  ``|sum| >= 2**31``. With ``|a|, |b| <= 128`` that cannot happen for an inner dimension
  ``K <= 131,071``; every function here splits the inner dimension into chunks of at most
  :data:`SAFE_K` (65,536, a 2x margin) and adds the chunks in FP32.
* ``torch._int_mm`` on CPU (torch 2.13) has no shape constraints (tested from 1x1x1 up,
  odd sizes, transposed views), so nothing is padded; :func:`int_mm` only makes the
  operands contiguous.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "SAFE_K",
    "onednn_conv_available",
    "check_onednn_schema",
    "to_u8",
    "int_mm",
    "int_mm_scaled",
    "qconv2d",
    "qconv2d_input_grad",
    "qconv2d_weight_grad",
    "im2col_conv2d",
    "im2col_conv2d_input_grad",
    "im2col_conv2d_weight_grad",
]

#: The largest inner dimension handed to one integer kernel call (see module docstring).
SAFE_K = 65_536
#: Up to this many im2col columns (C * kh * kw), the shifted-GEMM weight gradient copies
#: the shifted slices side by side and runs one GEMM instead of kh * kw.
_CONCAT_MAX_COLS = 576

#: The schema of ``onednn::qconv2d_pointwise`` this module was written against (torch 2.13).
_QCONV_SCHEMA = (
    "onednn::qconv2d_pointwise(Tensor qx, float x_scale, int x_zero_point, Tensor qw, "
    "Tensor w_scale, Tensor w_zero_point, Tensor? bias, int[] stride, int[] padding, "
    "int[] dilation, int groups, float output_scale, int output_zero_point, "
    "ScalarType? output_dtype, str attr, Scalar?[] scalars, str? algorithm) -> Tensor"
)
_PREPACK_SCHEMA = (
    "onednn::qconv_prepack(Tensor weight, Tensor w_scales, float x_scale, int x_zp, "
    "int[] stride, int[] padding, int[] dilation, int groups, int[]? x_shape=None) -> Tensor"
)

_onednn_ok: bool | None = None


def check_onednn_schema() -> list[str]:
    """Compare the installed oneDNN int8 conv ops with the schemas this module expects.

    Returns
    -------
    list of str
        One line per mismatch (an op missing or with another signature); empty when the
        installed torch matches.
    """
    problems = []
    expected_ops = (("qconv2d_pointwise", _QCONV_SCHEMA), ("qconv_prepack", _PREPACK_SCHEMA))
    for name, expected in expected_ops:
        try:
            schema = str(getattr(torch.ops.onednn, name).default._schema)
        except (AttributeError, RuntimeError) as exc:
            problems.append(f"onednn::{name}: missing ({exc})")
            continue
        if schema != expected:
            problems.append(f"onednn::{name}: schema is {schema!r}, expected {expected!r}")
    return problems


def onednn_conv_available() -> bool:
    """Whether oneDNN's int8 convolution exists here with the expected signature and works.

    Checked once per process: the schema, then one tiny convolution against FP32.
    """
    global _onednn_ok
    if _onednn_ok is None:
        _onednn_ok = False
        if torch.backends.mkldnn.is_available() and not check_onednn_schema():
            try:
                x = torch.randint(-127, 128, (1, 2, 3, 3), dtype=torch.int8)
                w = torch.randint(-127, 128, (2, 2, 3, 3), dtype=torch.int8)
                got = qconv2d(to_u8(x), 1.0, w, torch.ones(2), None, (1, 1), (1, 1), (1, 1), 1)
                ref = F.conv2d(x.float(), w.float(), None, 1, 1)
                _onednn_ok = bool(torch.equal(got, ref))
            except RuntimeError:
                _onednn_ok = False
    return _onednn_ok


def to_u8(q: torch.Tensor) -> torch.Tensor:
    """Shift symmetric int8 values (``[-127, 127]``) to uint8 with zero point 128."""
    return (q.to(torch.int16) + 128).to(torch.uint8)


def _operand(t: torch.Tensor) -> torch.Tensor:
    """An int8 matrix in a layout ``torch._int_mm`` gets right.

    torch 2.13's CPU ``_int_mm`` returns garbage for a column-major operand with a size-1
    dimension (e.g. ``(K, 1).t()``, strides ``(1, 1)``) once ``K`` is in the thousands
    (found here, covered by a test); such operands are re-laid out row-major (a copy of
    at most ``K`` bytes). Other transposed views are fine and are passed as they are.
    """
    if 1 in t.shape and t.stride()[-1] != 1:
        return t.reshape(-1).view(t.shape)
    if 1 in t.shape and t.shape[-1] != 1 and t.stride()[0] != t.shape[-1]:
        return t.reshape(-1).view(t.shape)
    return t


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch._int_mm(_operand(a), _operand(b))


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of int8 matrices, exact, as FP32; never overflows.

    Parameters
    ----------
    a : Tensor
        ``(M, K)`` int8.
    b : Tensor
        ``(K, N)`` int8.

    Returns
    -------
    Tensor
        ``(M, N)`` float32. Exact while ``|result| < 2**24``; the int32 partial sums over
        chunks of at most :data:`SAFE_K` are exact and their FP32 sum rounds like any FP32
        accumulation.
    """
    K = a.shape[1]
    if K <= SAFE_K:
        return _mm(a, b).float()
    out = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float32)
    for k0 in range(0, K, SAFE_K):
        out += _mm(a[:, k0 : k0 + SAFE_K], b[k0 : k0 + SAFE_K])
    return out


def int_mm_scaled(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``(a @ b) * scale`` for int8 ``a``, ``b`` (``scale`` broadcasts over the output)."""
    K = a.shape[1]
    if K <= SAFE_K:
        return _mm(a, b) * scale
    return int_mm(a, b) * scale


_consts: dict[tuple[int, int, torch.dtype], torch.Tensor] = {}


def _const(n: int, value: int, dtype: torch.dtype) -> torch.Tensor:
    """A cached, never-written ``(n,)`` tensor filled with ``value`` (zero points, unit
    scales): one allocation per size instead of one per call."""
    key = (n, value, dtype)
    t = _consts.get(key)
    if t is None:
        t = _consts[key] = torch.full((n,), value, dtype=dtype)
    return t


def _pair(v: int | Sequence[int]) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(e) for e in v]


def qconv2d(
    x_u8: torch.Tensor,
    x_scale: float,
    w_q: torch.Tensor,
    w_scales: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> torch.Tensor:
    """oneDNN int8 convolution with an FP32 output: ``conv(x, w) * x_scale * w_scales + b``.

    Parameters
    ----------
    x_u8 : Tensor
        ``(N, C, H, W)`` uint8 activations, zero point 128 (see :func:`to_u8`).
    x_scale : float
        Scale of the activations.
    w_q : Tensor
        ``(Co, C // groups, kh, kw)`` int8 weights (symmetric).
    w_scales : Tensor
        ``(Co,)`` per-output-channel scale (a per-tensor scale is passed repeated).
    bias : Tensor or None
        ``(Co,)`` FP32 bias added to the output.

    Returns
    -------
    Tensor
        ``(N, Co, Ho, Wo)`` float32, channels-last in memory. The inner dimension
        ``C // groups * kh * kw`` must not exceed :data:`SAFE_K`.
    """
    st, pa, di = _pair(stride), _pair(padding), _pair(dilation)
    ws = w_scales.to(torch.float64)
    packed = torch.ops.onednn.qconv_prepack(w_q, ws, float(x_scale), 128, st, pa, di, groups, None)
    zps = _const(ws.shape[0], 0, torch.int64)
    return torch.ops.onednn.qconv2d_pointwise(
        x_u8, float(x_scale), 128, packed, ws, zps, bias, st, pa, di, groups,
        1.0, 0, torch.float32, "none", [], "",
    )  # fmt: skip


def _transposed_weight(w_q: torch.Tensor, groups: int) -> torch.Tensor:
    """The weight of the convolution that computes a convolution's input gradient."""
    Co, Cg, kh, kw = w_q.shape
    Og = Co // groups
    w = w_q.view(groups, Og, Cg, kh, kw).transpose(1, 2).reshape(groups * Cg, Og, kh, kw)
    return w.flip(2, 3).contiguous()


def _dilate_and_pad(
    g_q: torch.Tensor,
    stride: list[int],
    pads: list[tuple[int, int]],
    fill: int,
) -> torch.Tensor:
    """Insert ``stride - 1`` fill values between the rows/columns of ``g_q`` and pad it.

    ``pads`` holds ``(before, after)`` per spatial axis; negative values crop.
    """
    N, Co, Ho, Wo = g_q.shape
    Hd, Wd = (Ho - 1) * stride[0] + 1, (Wo - 1) * stride[1] + 1
    (t, b), (lft, r) = pads
    Hp, Wp = Hd + t + b, Wd + lft + r
    out = torch.full((N, Co, Hp, Wp), fill, dtype=g_q.dtype)
    # Positions of the dilated grid inside the padded output; crop where padding < 0.
    src = g_q
    row0, col0 = t, lft
    if row0 < 0:
        skip = math.ceil(-row0 / stride[0])
        src, row0 = src[:, :, skip:], row0 + skip * stride[0]
    if col0 < 0:
        skip = math.ceil(-col0 / stride[1])
        src, col0 = src[:, :, :, skip:], col0 + skip * stride[1]
    rows = max(0, min(src.shape[2], math.ceil((Hp - row0) / stride[0])))
    cols = max(0, min(src.shape[3], math.ceil((Wp - col0) / stride[1])))
    out[
        :, :, row0 : row0 + (rows - 1) * stride[0] + 1 : stride[0],
        col0 : col0 + (cols - 1) * stride[1] + 1 : stride[1],
    ] = src[:, :, :rows, :cols]  # fmt: skip
    return out


def qconv2d_input_grad(
    g_u8: torch.Tensor,
    g_scale: float,
    w_q: torch.Tensor,
    input_hw: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> torch.Tensor:
    """Input gradient of a convolution, ``conv_transpose(g, w) * g_scale``, on int8 kernels.

    The transposed convolution is run as an ordinary oneDNN int8 convolution: the output
    gradient is dilated by the stride (zero point 128 between its elements) and padded by
    ``dilation * (k - 1) - padding`` (plus the rows the forward's floor division dropped),
    and the weight is flipped with its in/out channels swapped per group.

    Parameters
    ----------
    g_u8 : Tensor
        ``(N, Co, Ho, Wo)`` uint8 output gradient, zero point 128.
    g_scale : float
        Its scale (any per-output-channel weight scale already folded in).
    w_q : Tensor
        ``(Co, C // groups, kh, kw)`` int8 forward weight.
    input_hw : (int, int)
        The forward input's height and width.

    Returns
    -------
    Tensor
        ``(N, C, H, W)`` float32.
    """
    st, pa, di = _pair(stride), _pair(padding), _pair(dilation)
    _, _, kh, kw = w_q.shape
    Ho, Wo = g_u8.shape[2:]
    pads = []
    for ax, k in enumerate((kh, kw)):
        size = int(input_hw[ax])
        extra = size + 2 * pa[ax] - di[ax] * (k - 1) - 1 - ((Ho, Wo)[ax] - 1) * st[ax]
        before = di[ax] * (k - 1) - pa[ax]
        pads.append((before, before + extra))
    wt = _transposed_weight(w_q, groups)
    ones = _const(wt.shape[0], 1, torch.float64)
    if st == [1, 1] and all(b >= 0 and a == b for a, b in pads):
        x = g_u8
        conv_pad = [pads[0][0], pads[1][0]]
    else:
        x = _dilate_and_pad(g_u8, st, pads, 128)
        conv_pad = [0, 0]
    return qconv2d(x, g_scale, wt, ones, None, (1, 1), conv_pad, di, groups)


def qconv2d_weight_grad(
    x_u8: torch.Tensor,
    x_scale: float,
    g_q: torch.Tensor,
    g_scale: float,
    kernel_hw: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    method: str = "auto",
) -> torch.Tensor:
    """Weight gradient of a convolution on int8 kernels.

    ``dW[o, c, i, j] = sum_{n, h, w} g[n, o, h, w] * x_pad[n, c, h*s + i*d, w*s + j*d]``.
    Two ways, chosen by shape (``method="auto"``) or forced (``"shifted"``, ``"swapped"``);
    ``bench/int8.py --kernels`` times them against im2col and FP32:

    * stride 1, one group: :func:`_shifted_gemm_weight_grad`, ``kh * kw`` int8 GEMMs on
      shifted views (no im2col copy, no weight prepack);
    * otherwise a oneDNN int8 convolution with batch and channels swapped: the input is
      ``x`` as ``(C/groups, groups*N, H, W)``, the "weight" ``g`` as ``(O, N, Ho, Wo)``,
      with the forward's stride as dilation and its dilation as stride. Prepacking that
      large "weight" is the slow part (about 40% of the call).

    The inner dimension (``N * Ho * Wo`` or more) is split by samples into chunks of at
    most :data:`SAFE_K` products, added in FP32.

    Parameters
    ----------
    x_u8 : Tensor
        ``(N, C, H, W)`` uint8 forward input, zero point 128.
    g_q : Tensor
        ``(N, O, Ho, Wo)`` int8 output gradient (symmetric).
    kernel_hw : (int, int)
        The forward kernel's size.

    Returns
    -------
    Tensor
        ``(O, C // groups, kh, kw)`` float32, ``x_scale * g_scale`` applied.
    """
    st, pa, di = _pair(stride), _pair(padding), _pair(dilation)
    N, C, H, W = x_u8.shape
    _, Co, Ho, Wo = g_q.shape
    kh, kw = int(kernel_hw[0]), int(kernel_hw[1])
    shifted_ok = groups == 1 and st == [1, 1] and (H + 2 * pa[0]) * (W + 2 * pa[1]) <= SAFE_K
    if method not in ("auto", "shifted", "swapped"):
        raise ValueError(f"qconv2d_weight_grad: unknown method {method!r}")
    if method == "shifted" and not shifted_ok:
        raise ValueError("qconv2d_weight_grad: 'shifted' needs stride 1 and one group")
    if shifted_ok and method != "swapped":
        dw = _shifted_gemm_weight_grad(x_u8, g_q, (kh, kw), pa, di)
        return dw * (float(x_scale) * float(g_scale))
    Cg, Og = C // groups, Co // groups
    per_sample = Ho * Wo
    if per_sample > SAFE_K:
        raise ValueError(f"qconv2d_weight_grad: Ho*Wo={per_sample} exceeds SAFE_K={SAFE_K}")
    chunk = max(1, SAFE_K // per_sample)
    total: torch.Tensor | None = None
    scales = torch.full((Co,), float(g_scale), dtype=torch.float64)
    for n0 in range(0, N, chunk):
        xc, gc = x_u8[n0 : n0 + chunk], g_q[n0 : n0 + chunk]
        n = xc.shape[0]
        xt = xc.reshape(n, groups, Cg, H, W).permute(2, 1, 0, 3, 4).reshape(Cg, groups * n, H, W)
        gt = gc.reshape(n, groups, Og, Ho, Wo).permute(1, 2, 0, 3, 4).reshape(Co, n, Ho, Wo)
        out = qconv2d(xt, x_scale, gt.contiguous(), scales, None, di, pa, st, groups)
        out = out[:, :, :kh, :kw]
        total = out if total is None else total + out
    assert total is not None
    return total.permute(1, 0, 2, 3).contiguous()


def _shifted_gemm_weight_grad(
    x_u8: torch.Tensor,
    g_q: torch.Tensor,
    kernel_hw: tuple[int, int],
    padding: list[int],
    dilation: list[int],
) -> torch.Tensor:
    """Unscaled ``dW`` of a stride-1, one-group convolution as ``kh * kw`` int8 GEMMs.

    ``x`` is laid out once as a zero-padded ``(N * Hp * Wp, C)`` int8 matrix (rows are
    pixels of the padded grid) and ``g`` as an ``(O, N * Hp * Wp)`` matrix holding
    ``g[n, :, h, w]`` at the column of pixel ``(h, w)`` and zeros elsewhere. Kernel offset
    ``(i, j)`` then reads ``x`` at row ``r + i*d*Wp + j*d`` for output pixel ``r``: a
    contiguous slice, so ``dW[:, :, i, j] = g @ x[off : off + L]`` without any im2col
    copy (this layout ran 1.3-3x faster than ``x.T @ g`` at small channel counts). The
    zero columns of ``g`` cost ``Hp*Wp / (Ho*Wo)`` more MACs (1.27x at 16x16).
    """
    N, C, H, W = x_u8.shape
    _, Co, Ho, Wo = g_q.shape
    kh, kw = kernel_hw
    Hp, Wp = H + 2 * padding[0], W + 2 * padding[1]
    per = Hp * Wp
    L = N * per
    ext = dilation[0] * (kh - 1) * Wp + dilation[1] * (kw - 1)
    xp = torch.zeros(L + ext, C, dtype=torch.int8)
    xp[:L].view(N, Hp, Wp, C)[:, padding[0] : padding[0] + H, padding[1] : padding[1] + W] = (
        x_u8.permute(0, 2, 3, 1).to(torch.int16) - 128
    ).to(torch.int8)
    gb = torch.zeros(Co, L, dtype=torch.int8)
    gb.view(Co, N, Hp, Wp)[:, :, :Ho, :Wo] = g_q.permute(1, 0, 2, 3)
    offsets = [i * dilation[0] * Wp + j * dilation[1] for i in range(kh) for j in range(kw)]
    chunk = max(1, SAFE_K // per) * per
    if C * kh * kw <= _CONCAT_MAX_COLS:
        # Few channels: one GEMM against the kh*kw shifted slices side by side (a small
        # copy) beats kh*kw thin GEMMs and their per-call overhead.
        cols = torch.cat([xp[o : o + L] for o in offsets], dim=1)  # (L, kh*kw*C)
        acc = torch.zeros(Co, kh * kw * C)
        for r0 in range(0, L, chunk):
            acc += _mm(gb[:, r0 : r0 + chunk], cols[r0 : r0 + chunk])
        return acc.view(Co, kh, kw, C).permute(0, 3, 1, 2).contiguous()
    out = torch.zeros(Co, C, kh, kw)
    for r0 in range(0, L, chunk):
        r1 = min(L, r0 + chunk)
        gc = gb[:, r0:r1]
        for idx, o in enumerate(offsets):
            out[:, :, idx // kw, idx % kw] += _mm(gc, xp[r0 + o : r1 + o])
    return out


# --------------------------------------------------------------------------------------
# Fallback: im2col + _int_mm (used where oneDNN's int8 convolution is unavailable).
# --------------------------------------------------------------------------------------


def _im2col(
    x_q: torch.Tensor,
    kernel_hw: Sequence[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> tuple[torch.Tensor, int, int]:
    """Patches of an int8 ``(N, C, H, W)`` tensor as ``(groups, N*Ho*Wo, C/groups*kh*kw)``."""
    N, C, H, W = x_q.shape
    kh, kw = int(kernel_hw[0]), int(kernel_hw[1])
    xp = F.pad(x_q, (padding[1], padding[1], padding[0], padding[0]))
    Ho = (H + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    Wo = (W + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    sN, sC, sH, sW = xp.stride()
    cols = xp.as_strided(
        (N, Ho, Wo, C, kh, kw),
        (sN, sH * stride[0], sW * stride[1], sC, sH * dilation[0], sW * dilation[1]),
    )
    Cg = C // groups
    cols = cols.reshape(N * Ho * Wo, groups, Cg * kh * kw).transpose(0, 1).contiguous()
    return cols, Ho, Wo


def im2col_conv2d(
    x_q: torch.Tensor,
    x_scale: float,
    w_q: torch.Tensor,
    w_scales: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> torch.Tensor:
    """:func:`qconv2d` by im2col and :func:`int_mm`; ``x_q`` is int8 (not shifted)."""
    st, pa, di = _pair(stride), _pair(padding), _pair(dilation)
    N = x_q.shape[0]
    Co = w_q.shape[0]
    cols, Ho, Wo = _im2col(x_q, w_q.shape[2:], st, pa, di, groups)
    wg = w_q.reshape(groups, Co // groups, -1)
    outs = [int_mm(cols[g], wg[g].t().contiguous()) for g in range(groups)]
    out = torch.cat(outs, dim=1) * (w_scales.float() * float(x_scale))
    if bias is not None:
        out = out + bias
    return out.view(N, Ho, Wo, Co).permute(0, 3, 1, 2)


def im2col_conv2d_input_grad(
    g_q: torch.Tensor,
    g_scale: float,
    w_q: torch.Tensor,
    input_hw: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> torch.Tensor:
    """:func:`qconv2d_input_grad` by an int8 GEMM into patch space and an FP32 col2im."""
    st, pa, di = _pair(stride), _pair(padding), _pair(dilation)
    N, Co, Ho, Wo = g_q.shape
    _, Cg, kh, kw = w_q.shape
    Og = Co // groups
    g2 = g_q.permute(0, 2, 3, 1).reshape(N * Ho * Wo, groups, Og)
    wg = w_q.reshape(groups, Og, Cg * kh * kw)
    dcols = torch.stack([int_mm(g2[:, g].contiguous(), wg[g]) for g in range(groups)], 1)
    dcols = dcols.view(N, Ho * Wo, groups * Cg * kh * kw).transpose(1, 2) * float(g_scale)
    return F.fold(
        dcols,
        (int(input_hw[0]), int(input_hw[1])),
        (kh, kw),
        dilation=tuple(di),
        padding=tuple(pa),
        stride=tuple(st),
    )


def im2col_conv2d_weight_grad(
    x_q: torch.Tensor,
    x_scale: float,
    g_q: torch.Tensor,
    g_scale: float,
    kernel_hw: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> torch.Tensor:
    """:func:`qconv2d_weight_grad` by im2col and :func:`int_mm`; ``x_q`` is int8."""
    st, pa, di = _pair(stride), _pair(padding), _pair(dilation)
    N, Co, Ho, Wo = g_q.shape
    Og = Co // groups
    kh, kw = int(kernel_hw[0]), int(kernel_hw[1])
    cols, _, _ = _im2col(x_q, (kh, kw), st, pa, di, groups)
    g2 = g_q.permute(1, 0, 2, 3).reshape(groups, Og, N * Ho * Wo)
    dw = torch.cat([int_mm(g2[g].contiguous(), cols[g]) for g in range(groups)], 0)
    return (dw * (float(x_scale) * float(g_scale))).view(Co, -1, kh, kw)
