"""INT8 linear and 2-D convolution as autograd functions (forward and backward on int8).

Forward: the input and the weight are quantized (absmax scales, stochastic rounding by
default) and multiplied on an int8 kernel (``torch._int_mm`` for linear, oneDNN's int8
convolution for conv, see :mod:`clients.int8._kernels`); the int32 result is rescaled by
``s_x * s_w`` in FP32 and the FP32 bias added.

Backward: the output gradient is PRC-clipped and quantized (symmetric, per tensor, round to
nearest); ``dX`` and ``dW`` are int8 products of it with the int8 weight and the int8 input
saved by the forward, rescaled in FP32; ``db`` is the FP32 sum of the output gradient.

Only the int8 (or uint8) codes of the input and the weight are saved for backward, plus
their FP32 scales; the weight codes are saved only when the input needs a gradient and the
input codes only when the weight does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from clients.int8 import _kernels
from clients.int8._compile import fused, one_kernel
from clients.int8.quant import (
    new_seed,
    project_to_grid,
    quantize_backward,
    quantize_backward_both,
    quantize_forward,
)

__all__ = ["Int8Config", "int8_linear", "int8_conv2d", "lac_bias", "grid_weight"]


@dataclass(frozen=True)
class Int8Config:
    """Numerics of a quantized layer (see :func:`clients.int8.prepare`)."""

    stochastic: bool = True
    per_channel: bool = False
    prc: str = "range"
    prc_fraction: float = 0.95
    prc_z: float = 2.5
    compile: bool = True
    use_onednn: bool = True
    int8_weights: bool = False
    qas: bool = False


class _DeviceKernels:
    """The int8 kernels of :mod:`clients.int8._kernels`, each of which a tracer (the cost
    model) sees as one device kernel: int8 operands in, the rescaled FP32 result out."""

    SAFE_K = _kernels.SAFE_K
    int_mm_scaled = staticmethod(one_kernel(_kernels.int_mm_scaled))
    qconv2d = staticmethod(one_kernel(_kernels.qconv2d))
    im2col_conv2d = staticmethod(one_kernel(_kernels.im2col_conv2d))
    qconv2d_input_grad = staticmethod(one_kernel(_kernels.qconv2d_input_grad))
    im2col_conv2d_input_grad = staticmethod(one_kernel(_kernels.im2col_conv2d_input_grad))
    qconv2d_weight_grad = staticmethod(one_kernel(_kernels.qconv2d_weight_grad))
    im2col_conv2d_weight_grad = staticmethod(one_kernel(_kernels.im2col_conv2d_weight_grad))


K = _DeviceKernels


# --- the fused elementwise functions (each compiled once, shared by all layers) --------


#: Offset of the weight's hash seed from the input's in one fused call.
_W_SEED_SHIFT = 1_000_003


def _q_fwd(
    x: torch.Tensor,
    w: torch.Tensor,
    stochastic: bool,
    offset: int,
    per_channel: bool,
    seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward operands in one fused call: ``x`` (1-D) and ``w`` (``(O, -1)``)."""
    xq, sx = quantize_forward(x, stochastic=stochastic, offset=offset, seed=seed)
    wseed = None if seed is None else seed + _W_SEED_SHIFT
    wq, sw = quantize_forward(
        w, stochastic=stochastic, channel_dim=0 if per_channel else None, seed=wseed
    )
    return xq, sx, wq, sw


def _q_bwd(
    g: torch.Tensor,
    w: torch.Tensor | None,
    prc: str,
    fraction: float,
    z: float,
    per_channel: bool,
    both: bool,
) -> tuple[torch.Tensor | None, ...]:
    """Backward operands in one fused call: the output gradient ``g`` (1-D; int8 codes and,
    if ``both``, their uint8 shift too) and, if given, ``w`` re-quantized to nearest."""
    qu: torch.Tensor | None = None
    if both:
        q, qu, s = quantize_backward_both(g, prc=prc, fraction=fraction, z=z)
    else:
        q, s = quantize_backward(g, prc=prc, fraction=fraction, z=z)
    if w is None:
        return q, qu, s, None, None
    wq, sw = quantize_forward(w, stochastic=False, channel_dim=0 if per_channel else None)
    return q, qu, s, wq, sw


def _seed(cfg: Int8Config) -> torch.Tensor | None:
    """Hash-noise seed on the compiled path (fused noise), None for eager ``rand_like``."""
    return new_seed() if cfg.compile and cfg.stochastic else None


def _q_grad_factor(
    g: torch.Tensor, factor: torch.Tensor, prc: str, fraction: float, z: float, offset: int
) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_backward(
        g, prc=prc, fraction=fraction, z=z, channel_factor=factor, offset=offset
    )


_fn_cache: dict[tuple[str, Int8Config], Callable[..., Any]] = {}


def _f(name: str, fn: Callable[..., Any], cfg: Int8Config) -> Callable[..., Any]:
    """The fused ``fn`` for this config's variant (looked up once per config)."""
    key = (name, cfg)
    got = _fn_cache.get(key)
    if got is None:
        variant = f"{name}[prc={cfg.prc},per_channel={cfg.per_channel},sr={cfg.stochastic}]"
        got = _fn_cache[key] = fused(variant, fn, cfg.compile)
    return got


def _flat(x: torch.Tensor) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """A 1-D view of ``x`` in memory order, and how to give a same-size result its shape."""
    shape = x.shape
    if x.is_contiguous():
        return x.view(-1), lambda q: q.view(shape)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        n, c, h, w = shape
        return x.permute(0, 2, 3, 1).reshape(-1), lambda q: q.view(n, h, w, c).permute(0, 3, 1, 2)
    return x.contiguous().view(-1), lambda q: q.view(shape)


def _quantize_forward(
    x: torch.Tensor, w: torch.Tensor, cfg: Int8Config, offset: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input codes (``x``'s shape and memory order) and 0-d scale, weight codes (the
    weight's shape) and ``(Co,)`` scales, rounded as configured."""
    flat, unflat = _flat(x)
    out = w.shape[0]
    xq, sx, wq, sw = _f("quantize_forward", _q_fwd, cfg)(
        flat, w.reshape(out, -1), cfg.stochastic, offset, cfg.per_channel, _seed(cfg)
    )
    return unflat(xq), sx, wq.view(w.shape), sw.reshape(-1).expand(out)


def _quantize_backward(
    g: torch.Tensor, w: torch.Tensor | None, cfg: Int8Config, both: bool
) -> tuple[Any, ...]:
    """Output-gradient codes (int8; and uint8 if ``both``), their scale, and if ``w`` is
    given, the weight re-quantized to nearest (the authors' rule for backward operands, so
    the forward's codes need not be saved) with ``(Co,)`` scales."""
    flat, unflat = _flat(g)
    w2 = None if w is None else w.reshape(w.shape[0], -1)
    q, qu, s, wq, sw = _f("quantize_backward", _q_bwd, cfg)(
        flat, w2, cfg.prc, cfg.prc_fraction, cfg.prc_z, cfg.per_channel, both
    )
    if w is not None:
        wq, sw = wq.view(w.shape), sw.reshape(-1).expand(w.shape[0])
    return unflat(q), None if qu is None else unflat(qu), s, wq, sw


def _quantize_grad_scaled(
    g3: torch.Tensor, factor: torch.Tensor, cfg: Int8Config, offset: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``g3 * factor`` (``g3`` as ``(A, C, B)``, factor ``(1, C, 1)``)."""
    return _f("quantize_grad_scaled", _q_grad_factor, cfg)(  # type: ignore[no-any-return]
        g3, factor, cfg.prc, cfg.prc_fraction, cfg.prc_z, offset
    )


def lac_bias(bias: torch.Tensor | None, lac: torch.Tensor | None) -> torch.Tensor | None:
    """The bias the kernel adds: ``bias + alpha * mu + o`` with LAC's ``(3, C)`` rows."""
    if lac is None:
        return bias
    comp = torch.addcmul(lac[2], lac[0], lac[1])
    return comp if bias is None else comp + bias


def _bias_grads(
    ctx: Any, db: torch.Tensor | None, lac: torch.Tensor | None, i: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of the bias (input ``i``) and the LAC parameter (input ``i + 1``)."""
    if db is None:
        return None, None
    dbias = db if ctx.has_bias and ctx.needs_input_grad[i] else None
    dlac = None
    if lac is not None and ctx.needs_input_grad[i + 1]:
        dlac = torch.stack([db * lac[1], db * lac[0], db])
    return dbias, dlac


def _q_grid(
    w: torch.Tensor, stochastic: bool, per_channel: bool, seed: torch.Tensor | None
) -> torch.Tensor:
    """``w`` (``(O, -1)``) on its int8 grid, ``s * q`` (see :func:`project_to_grid`)."""
    return project_to_grid(w, stochastic=stochastic, channel_dim=0 if per_channel else None,
                           seed=seed)


def grid_weight(w: torch.Tensor, cfg: Int8Config, stochastic: bool) -> torch.Tensor:
    """The weight projected onto its int8 grid (fused like the other quantize ops)."""
    flat = w.detach().reshape(w.shape[0], -1)
    seed = new_seed() if cfg.compile and stochastic else None
    name = "project_grid_sr" if stochastic else "project_grid_nearest"
    out = _f(name, _q_grid, cfg)(flat, stochastic, cfg.per_channel, seed)
    return out.view(w.shape)  # type: ignore[no-any-return]


def _needs_sw(cfg: Int8Config) -> bool:
    """Whether the backward needs the weight's scale even without ``dX`` (no-QAS int8
    weights rescale ``dW`` by it)."""
    return cfg.int8_weights and not cfg.qas


def _int_unit_grad(dw: torch.Tensor, sw: torch.Tensor, cfg: Int8Config) -> torch.Tensor:
    """The weight gradient an int8-weight device applies, in FP32 weight units.

    With FP32 master weights (the default) ``dw`` is returned as is. With int8 weights
    (``cfg.int8_weights``) a device updates the codes ``q = w / s_w``: their gradient is
    ``s_w * dw``, and a step of it moves ``w`` by ``lr * s_w**2 * dw``, a scale mismatch of
    ``s_w**2`` (about 1e-5 here) that stalls learning. QAS (Lin et al., NeurIPS 2022)
    multiplies the codes' gradient by ``s_w**-2``, which restores ``dw`` exactly; without
    QAS the mismatched ``s_w**2 * dw`` is what the FP32-side optimizer must see.
    """
    if not _needs_sw(cfg):
        return dw
    return dw * (sw * sw).view(-1, *([1] * (dw.dim() - 1)))


# --- linear ---------------------------------------------------------------------------


class _Int8Linear(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lac: torch.Tensor | None,
        cfg: Int8Config,
    ) -> torch.Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)
        xq, sx, wq, sw = _quantize_forward(x2, weight, cfg, 0)
        y = K.int_mm_scaled(xq, wq.t(), sw * sx)
        b = lac_bias(bias, lac)
        if b is not None:
            y = y + b
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # The weight itself (no copy) is saved, to be re-quantized in backward.
        keep_w = need_dx or _needs_sw(cfg)
        ctx.save_for_backward(xq if need_dw else None, weight if keep_w else None, sx, lac)
        ctx.cfg, ctx.lead, ctx.has_bias = cfg, lead, bias is not None
        return y.view(*lead, weight.shape[0])

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        xq, weight, sx, lac = ctx.saved_tensors
        cfg: Int8Config = ctx.cfg
        g = gy.reshape(-1, gy.shape[-1])
        dx = dw = db = None
        gq, _, sg, wq, sw = _quantize_backward(g, weight, cfg, both=False)
        if ctx.needs_input_grad[0]:
            if cfg.per_channel:
                gq2, sg2 = _quantize_grad_scaled(g.unsqueeze(-1), sw.view(1, -1, 1), cfg, 0)
                dx = K.int_mm_scaled(gq2.view(g.shape), wq, sg2)
            else:
                dx = K.int_mm_scaled(gq, wq, sg * sw[:1])
            dx = dx.view(*ctx.lead, wq.shape[1])
        if ctx.needs_input_grad[1]:
            dw = _int_unit_grad(K.int_mm_scaled(gq.t().contiguous(), xq, sg * sx), sw, cfg)
        if (ctx.has_bias and ctx.needs_input_grad[2]) or (
            lac is not None and ctx.needs_input_grad[3]
        ):
            db = g.sum(0)
        return dx, dw, *_bias_grads(ctx, db, lac, 2), None


def int8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cfg: Int8Config,
    lac: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with forward and backward on int8 GEMMs.

    ``lac``: an optional ``(3, out)`` LAC parameter (rows alpha, mu, o) whose correction
    ``alpha * mu + o`` is added with the bias, inside the same autograd node.
    """
    return _Int8Linear.apply(x, weight, bias, lac, cfg)  # type: ignore[no-any-return]


# --- conv2d ---------------------------------------------------------------------------


class _Int8Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lac: torch.Tensor | None,
        cfg: Int8Config,
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
        groups: int,
    ) -> torch.Tensor:
        Co, Cg, kh, kw = weight.shape
        fits = max(Cg, Co // groups) * kh * kw <= K.SAFE_K
        onednn = cfg.use_onednn and fits
        xq, sx_t, wq, sw = _quantize_forward(x, weight, cfg, 128 if onednn else 0)
        sx = float(sx_t)
        conv = K.qconv2d if onednn else K.im2col_conv2d
        y = conv(xq, sx, wq, sw, lac_bias(bias, lac), stride, padding, dilation, groups)
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # The weight itself (no copy) is saved, to be re-quantized in backward.
        keep_w = need_dx or _needs_sw(cfg)
        ctx.save_for_backward(xq if need_dw else None, weight if keep_w else None, lac)
        ctx.sx, ctx.onednn, ctx.cfg, ctx.has_bias = sx, onednn, cfg, bias is not None
        ctx.geom = (tuple(x.shape[2:]), stride, padding, dilation, groups)
        ctx.kernel_hw = (kh, kw)
        return y

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        xq, weight, lac = ctx.saved_tensors
        cfg: Int8Config = ctx.cfg
        hw, stride, padding, dilation, groups = ctx.geom
        onednn: bool = ctx.onednn
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dx = dw = db = None
        both = onednn and need_dx and not cfg.per_channel
        gq, gu, sg_t, wq, sw = _quantize_backward(gy, weight, cfg, both=both)
        sg = float(sg_t)
        if need_dx:
            if cfg.per_channel:
                n, o = gy.shape[:2]
                g3 = gy.reshape(n, o, -1)
                gd, sgd_t = _quantize_grad_scaled(g3, sw.view(1, -1, 1), cfg, 128 if onednn else 0)
                gd, sgd = gd.view(gy.shape), float(sgd_t)
            else:
                gd = gu if both else gq
                sgd = sg * float(sw[0])
            dgrad = K.qconv2d_input_grad if onednn else K.im2col_conv2d_input_grad
            dx = dgrad(gd, sgd, wq, hw, stride, padding, dilation, groups)
        if need_dw:
            kernel = ctx.kernel_hw
            use_onednn_dw = onednn and gy.shape[2] * gy.shape[3] <= K.SAFE_K
            if use_onednn_dw:
                dw = K.qconv2d_weight_grad(
                    xq, ctx.sx, gq, sg, kernel, stride, padding, dilation, groups
                )
            else:
                x8 = (xq.to(torch.int16) - 128).to(torch.int8) if onednn else xq
                dw = K.im2col_conv2d_weight_grad(
                    x8, ctx.sx, gq, sg, kernel, stride, padding, dilation, groups
                )
            dw = _int_unit_grad(dw, sw, cfg)
        if (ctx.has_bias and ctx.needs_input_grad[2]) or (
            lac is not None and ctx.needs_input_grad[3]
        ):
            db = gy.sum((0, 2, 3))
        return dx, dw, *_bias_grads(ctx, db, lac, 2), None, None, None, None, None


def int8_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cfg: Int8Config,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    lac: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.conv2d`` (zero padding, numeric padding only) with forward and backward on int8.

    The output is FP32 in channels-last memory format (oneDNN's layout). ``lac`` as in
    :func:`int8_linear`.
    """
    return _Int8Conv2d.apply(  # type: ignore[no-any-return]
        x, weight, bias, lac, cfg, stride, padding, dilation, groups
    )
