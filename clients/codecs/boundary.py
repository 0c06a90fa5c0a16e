"""A split-learning cut: features and their gradients cross it as real codec payloads.

In split training a device runs the first layers, sends the feature maps to the server,
and gets back the gradient of the loss with respect to them. :class:`CompressedBoundary`
is that cut as a module: in the forward pass the features are encoded with a codec
(SGQ with ``layout=feature`` by default: channel groups x image-row stripes, the paper's
case), turned into bytes and decoded; in the backward pass the incoming gradient takes the
same trip back. The values downstream of the cut are exactly what a receiver would
decode, and ``bytes_forward`` / ``bytes_backward`` count the real payload sizes. Because
SGQ's error per value is bounded (``range / 2**b`` of its block), so is the deviation of
the gradient that reaches the device (the paper's backward bound).

The module has no parameters and is placed between a device-side and a server-side
``nn.Sequential``; it is the transport only (who runs which half is the split trainer's
business).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from .codec import Codec, get_codec

__all__ = ["CompressedBoundary"]


def _round_trip(codec: Codec, t: torch.Tensor) -> tuple[torch.Tensor, int]:
    arr = t.detach().to("cpu", torch.float32).contiguous().numpy()
    payload = codec.encode({"t": arr})
    out = codec.decode(payload, expected_shapes={"t": arr.shape})["t"]
    return torch.from_numpy(np.ascontiguousarray(out)).to(t.device, t.dtype), len(payload)


class _Cross(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, cut: CompressedBoundary) -> torch.Tensor:
        ctx.cut = cut
        y, n = _round_trip(cut.forward_codec, x)
        cut.bytes_forward += n
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        cut: CompressedBoundary = ctx.cut
        if cut.backward_codec is None:
            return grad, None
        g, n = _round_trip(cut.backward_codec, grad)
        cut.bytes_backward += n
        return g, None


class CompressedBoundary(nn.Module):
    """Pass features (and, backwards, their gradients) through encode -> bytes -> decode.

    Parameters
    ----------
    forward_codec : str, mapping or Codec
        Codec of the features sent downstream (default SGQ, 4 bits, feature layout).
    backward_codec : str, mapping or Codec, optional
        Codec of the gradients sent back; ``None`` sends them exactly (and counts nothing).

    Attributes
    ----------
    bytes_forward, bytes_backward : int
        Payload bytes that crossed the cut so far in each direction.
    """

    def __init__(self, forward_codec: str | Mapping[str, Any] | Codec = "sgq:layout=feature",
                 backward_codec: str | Mapping[str, Any] | Codec | None
                 = "sgq:layout=feature") -> None:
        super().__init__()
        self.forward_codec = get_codec(forward_codec)
        self.backward_codec = get_codec(backward_codec) if backward_codec is not None else None
        self.bytes_forward = 0
        self.bytes_backward = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features as the other side decodes them (gradients likewise on the way back)."""
        return _Cross.apply(x, self)  # type: ignore[no-any-return]

    def extra_repr(self) -> str:
        back = self.backward_codec.spec if self.backward_codec else "exact"
        return f"forward={self.forward_codec.spec}, backward={back}"
