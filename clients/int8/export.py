"""Export of a model trained with :func:`clients.int8.prepare`: what a device stores.

Each int8 layer becomes its weight codes (int8, round to nearest, the layer's own
per-tensor or per-channel absmax scales) plus FP32 scales and an FP32 bias (the LAC
correction folded in); every other parameter and buffer (norms, their running stats) is
kept as it is in the state dict.
"""

from __future__ import annotations

import torch
from torch import nn

from clients.int8.modules import Int8Conv2d, Int8Linear
from clients.int8.quant import quantize_forward

__all__ = ["export", "exported_size_bytes"]


def export(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained model as int8 weights, scales and FP32 rest, keyed like a state dict.

    For an int8 layer ``name``: ``name.weight_int8`` (int8, the weight's shape),
    ``name.weight_scale`` (FP32, ``(out,)`` per channel or ``(1,)`` per tensor) and
    ``name.bias`` (FP32, when the layer has a bias or LAC). Other entries are the state
    dict's, detached.
    """
    out: dict[str, torch.Tensor] = {}
    skip: set[str] = set()
    with torch.no_grad():
        for name, m in model.named_modules():
            if not isinstance(m, Int8Linear | Int8Conv2d):
                continue
            prefix = f"{name}." if name else ""
            w = m.weight.detach()
            if m.cfg.per_channel:
                q, s = quantize_forward(w, stochastic=False, channel_dim=0)
                s = s.reshape(-1)
            else:
                q, s = quantize_forward(w, stochastic=False)
                s = s.reshape(1)
            out[prefix + "weight_int8"] = q
            out[prefix + "weight_scale"] = s.float()
            bias = m._effective_bias()
            if bias is not None:
                out[prefix + "bias"] = bias.detach().float().clone()
            skip.update(prefix + k for k in ("weight", "bias", "lac"))
        for key, t in model.state_dict().items():
            if key not in skip:
                out[key] = t.detach().clone()
    return out


def exported_size_bytes(export_dict: dict[str, torch.Tensor]) -> int:
    """Bytes a device stores for an :func:`export` result (tensor payloads only)."""
    return sum(t.numel() * t.element_size() for t in export_dict.values())
