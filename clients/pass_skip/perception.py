"""PerceptionNet: a small CNN backbone (three gateable blocks) and a classification head.

Most of its work sits at full and half resolution, where patch skipping pays: for a
1x64x64 frame and width 32 about 105 M MACs, 36% in the first block, 54% in the second.
The backbone is an ``nn.Sequential`` of blocks and the head a separate module, the layout
``clients.pass_skip.prepare`` expects. Batch norm makes the short training converge; for
inference ``fold_batch_norm`` merges each BatchNorm2d into the convolution before it (the
usual deployment step), so neither the full model nor PASS pays for it per frame.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["PerceptionNet", "GlobalAvgMaxPool", "StridedMaxPool2d", "fold_batch_norm"]


class StridedMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` with kernel == stride, computed as a maximum of strided slices.

    Same result (a maximum is exact), but on this CPU ``aten::max_pool2d`` on a
    (1, 48, 96, 96) map took about 2.3 ms against 0.16 ms here: left as is, pooling would
    dominate the full model's time. The full model and the patch path both use it, so the
    baseline is not slowed down artificially.
    """

    def __init__(self, kernel_size: int) -> None:
        super().__init__(kernel_size, kernel_size)
        self.k = int(kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.k
        h, w = x.shape[-2] // k * k, x.shape[-1] // k * k
        out = x[..., 0:h:k, 0:w:k]
        for i in range(k):
            for j in range(k):
                if i or j:
                    out = torch.maximum(out, x[..., i:h:k, j:w:k])
        return out


class GlobalAvgMaxPool(nn.Module):
    """Concatenate global average and global max pooling: (N, C, H, W) -> (N, 2C).

    The max keeps a small object's evidence from being diluted by a large background.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)


class PerceptionNet(nn.Module):
    """A per-frame classifier for video streams.

    Parameters
    ----------
    in_channels : int
        Frame channels.
    num_classes : int
        Output classes.
    width : int
        Channels of the first block; the second and third have twice as many.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        w = width

        def unit(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

        self.backbone = nn.Sequential(
            nn.Sequential(*unit(in_channels, w), *unit(w, w)),
            nn.Sequential(StridedMaxPool2d(2), *unit(w, 2 * w), *unit(2 * w, 2 * w)),
            nn.Sequential(StridedMaxPool2d(2), *unit(2 * w, 2 * w)),
        )
        self.head = nn.Sequential(GlobalAvgMaxPool(), nn.Linear(4 * w, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def fold_batch_norm(model: nn.Module) -> nn.Module:
    """Fold every eval-mode ``BatchNorm2d`` that follows a ``Conv2d`` in an ``nn.Sequential``
    into that convolution's weight and bias, in place; the BatchNorm becomes Identity.

    y = gamma * (conv(x) - mean) / sqrt(var + eps) + beta is again a convolution with
    weight scaled per output channel and a shifted bias. Returns ``model`` (in eval mode).
    """
    model.eval()
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        for i in range(1, len(seq)):
            conv, bn = seq[i - 1], seq[i]
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)):
                continue
            assert bn.running_mean is not None and bn.running_var is not None
            scale = bn.running_var.add(bn.eps).rsqrt()
            if bn.weight is not None:
                scale = scale * bn.weight.detach()
            bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(scale)
            shift = bn.bias.detach() if bn.bias is not None else torch.zeros_like(scale)
            with torch.no_grad():
                conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
                new_bias = (bias - bn.running_mean) * scale + shift
                if conv.bias is None:
                    conv.bias = nn.Parameter(new_bias)
                else:
                    conv.bias.copy_(new_bias)
            seq[i] = nn.Identity()
    return model
