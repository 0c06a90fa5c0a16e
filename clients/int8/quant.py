"""Quantization numerics of the INT8 path: scales, stochastic rounding, range clipping.

Pure tensor functions, no modules. Each has an eager reference implementation here; the
hot ones are also run fused under ``torch.compile`` through :mod:`clients.int8._compile`
(see :func:`fused`), which falls back to these same eager functions.

Scales are symmetric absmax (``s = max|v| / 127``, zero point 0), per tensor or per output
channel. The authors' code takes one scale from each tensor's min/max; symmetric absmax is
that rule for the signed case and is what oneDNN's int8 weights require (their zero point
must be 0). Activations use the full int8 range too and are shifted to uint8 (zero point
128) only at the oneDNN boundary.
"""

from __future__ import annotations

import torch

__all__ = [
    "QMAX",
    "absmax_scale",
    "hash_uniform",
    "new_seed",
    "round_stochastic",
    "quantize_forward",
    "prc_bounds",
    "quantize_backward",
    "quantize_backward_both",
    "project_to_grid",
]

#: Largest int8 magnitude used: values are in ``[-127, 127]`` so that negation is exact.
QMAX = 127.0
_TINY = 1e-30


def absmax_scale(v: torch.Tensor, channel_dim: int | None = None) -> torch.Tensor:
    """Symmetric scale ``max|v| / 127``: a 0-d tensor, or one per index of ``channel_dim``.

    A tensor of zeros gets a tiny positive scale (its codes are then all zero).
    """
    if channel_dim is None:
        m = v.abs().amax()
    else:
        dims = [d for d in range(v.dim()) if d != channel_dim]
        m = v.abs().amax(dim=dims, keepdim=True)
    return (m / QMAX).clamp_min(_TINY)


_MASK32 = 0xFFFFFFFF


def hash_uniform(v: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """Uniform ``[0, 1)`` noise shaped like ``v``: a counter-based hash of (index, seed).

    Inductor's in-kernel ``rand`` (Philox) and eager ``rand_like`` cost 4-10 ns per element
    on this CPU, more than the rest of the quantization; this integer hash of the element
    index (the "lowbias32" shape of mixing: xor-shift, multiply, with multipliers below
    2**31 so the int64 products never overflow) vectorizes and fuses into the quantize
    kernel. 24 bits of it make the uniform value. Its moments, histogram and lag/seed
    correlations are tested (``tests/test_int8.py``); a fresh ``seed`` (drawn from torch's
    generator, so ``torch.manual_seed`` makes runs repeatable) is used for each tensor.
    """
    i = torch.arange(v.numel(), dtype=torch.int64, device=v.device).view(v.shape)
    h = (i * 0x2545F491 + seed) & _MASK32
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & _MASK32
    h = h ^ (h >> 15)
    h = (h * 0x5BD1E995) & _MASK32
    h = h ^ (h >> 16)
    return (h >> 8).to(torch.float32) * (1.0 / 16777216.0)


def new_seed() -> torch.Tensor:
    """A 0-d int64 seed for :func:`hash_uniform`, from torch's default generator."""
    return torch.randint(0, 2**31 - 1, (), dtype=torch.int64)


def round_stochastic(v: torch.Tensor, seed: torch.Tensor | None = None) -> torch.Tensor:
    """``floor(v + U[0, 1))``: unbiased rounding, ``E[round_stochastic(v)] = v``.

    ``U`` is ``torch.rand_like`` noise, or :func:`hash_uniform` noise when ``seed`` is
    given (the fused, compiled path).
    """
    noise = torch.rand_like(v) if seed is None else hash_uniform(v, seed)
    return torch.floor(v + noise)


def quantize_forward(
    v: torch.Tensor,
    *,
    stochastic: bool = True,
    channel_dim: int | None = None,
    offset: int = 0,
    seed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a forward operand (activation or weight) to 8 bits.

    Parameters
    ----------
    v : Tensor
        FP32 values.
    stochastic : bool
        Stochastic rounding (Octo's forward rule) if True, else round to nearest.
    channel_dim : int or None
        Per-channel scales along this dim (weights), else one scale per tensor.
    offset : int
        0 returns int8 codes; 128 returns ``uint8 = code + 128`` (oneDNN activations).
    seed : Tensor or None
        Seed of the stochastic rounding's hash noise (else ``torch.rand_like``).

    Returns
    -------
    (Tensor, Tensor)
        The codes (int8 in ``[-127, 127]``, or uint8 in ``[1, 255]``) and the scale(s).
    """
    s = absmax_scale(v, channel_dim)
    x = v / s
    x = round_stochastic(x, seed) if stochastic else torch.round(x)
    x = x.clamp(-QMAX, QMAX)
    if offset:
        return (x + offset).to(torch.uint8), s
    return x.to(torch.int8), s


def prc_bounds(
    g: torch.Tensor, mode: str = "range", fraction: float = 0.95, z: float = 2.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """PRC (parameterized range clipping) bounds of a backward tensor.

    ``mode="range"``: ``[fraction * min, fraction * max]`` (the authors' code, 0.95).
    ``mode="sigma"``: ``[mean - z * std, mean + z * std]`` cut to ``[min, max]`` (the
    rule the paper hints at, z around 2-2.6). ``mode="none"``: ``[min, max]``.
    """
    lo, hi = g.amin(), g.amax()
    if mode == "range":
        return lo * fraction, hi * fraction
    if mode == "sigma":
        mean, std = g.mean(), g.std(unbiased=False)
        return torch.maximum(lo, mean - z * std), torch.minimum(hi, mean + z * std)
    return lo, hi


def quantize_backward(
    g: torch.Tensor,
    *,
    prc: str = "range",
    fraction: float = 0.95,
    z: float = 2.5,
    channel_factor: torch.Tensor | None = None,
    offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize an output gradient: optional PRC clip, symmetric per-tensor, round to nearest.

    Parameters
    ----------
    g : Tensor
        FP32 gradient.
    prc : str
        ``"range"``, ``"sigma"`` or ``"none"`` (see :func:`prc_bounds`).
    channel_factor : Tensor or None
        Multiplied into ``g`` before quantizing (broadcasting). Folding per-output-channel
        weight scales here keeps ``dX = g @ W`` a single-scale integer product.
    offset : int
        0 for int8 codes, 128 for uint8 codes (oneDNN input operand).

    Returns
    -------
    (Tensor, Tensor)
        Codes and a 0-d scale.
    """
    x, s = _backward_levels(g, prc, fraction, z, channel_factor)
    if offset:
        return (x + offset).to(torch.uint8), s
    return x.to(torch.int8), s


def quantize_backward_both(
    g: torch.Tensor, *, prc: str = "range", fraction: float = 0.95, z: float = 2.5
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`quantize_backward` returning int8 codes, their uint8 (+128) form and the scale.

    Both casts are taken from the same float levels (no int8 -> uint8 conversion pass),
    which keeps the fused kernel vectorized.
    """
    x, s = _backward_levels(g, prc, fraction, z, None)
    return x.to(torch.int8), (x + 128).to(torch.uint8), s


def _backward_levels(
    g: torch.Tensor, prc: str, fraction: float, z: float, channel_factor: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    if channel_factor is not None:
        g = g * channel_factor
    lo, hi = prc_bounds(g, prc, fraction, z)
    s = (torch.maximum(lo.abs(), hi.abs()) / QMAX).clamp_min(_TINY)
    x = torch.round(torch.minimum(torch.maximum(g, lo), hi) / s).clamp(-QMAX, QMAX)
    return x, s


def project_to_grid(
    w: torch.Tensor,
    *,
    stochastic: bool = True,
    channel_dim: int | None = None,
    seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """``w`` on its int8 grid, ``s * q`` with ``q = quantize_forward(w)``: the weight a
    device that stores int8 weights holds after an update.

    Idempotent up to the float rounding of the scale: a tensor already on its grid maps
    to itself (its absmax gives the same scale, and stochastic rounding of an integer is
    that integer), so projecting after every step and again before a read is safe.
    Stochastic rounding keeps updates smaller than one grid step alive in expectation.
    """
    q, s = quantize_forward(w, stochastic=stochastic, channel_dim=channel_dim, seed=seed)
    return q.to(w.dtype) * s

