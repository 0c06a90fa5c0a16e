"""Models defined in the project (no torchvision): a small CNN, MobileNetV2, ResNet-18.

All models take ``(N, C, H, W)`` float inputs and return logits. The architectures follow
the original papers (and torchvision's reference implementations) so that MAC counts match
the published figures: MobileNetV2-1.0 at 224x224 is about 300 M MACs, ResNet-18 about
1.8 G MACs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from devices.errors import ConfigError

__all__ = ["SmallCNN", "MLP", "MobileNetV2", "ResNet18", "build_model", "MODELS"]


class SmallCNN(nn.Module):
    """A small CNN for 8x8 (digits) or larger single-channel images.

    Parameters
    ----------
    in_channels : int
        Input channels.
    num_classes : int
        Output classes.
    width : int
        Channels of the first convolution; the second has twice as many.
    norm : bool
        GroupNorm after each convolution (2 groups): it keeps federated averaging of
        non-IID updates well conditioned and, unlike BatchNorm, holds no batch statistics
        that differ between devices.
    """

    def __init__(
        self, in_channels: int = 1, num_classes: int = 10, width: int = 16, norm: bool = True
    ) -> None:
        super().__init__()
        def _norm(c: int) -> nn.Module:
            return nn.GroupNorm(2, c) if norm else nn.Identity()

        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            _norm(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            _norm(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width * 16, 64),
            nn.ReLU(),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


class MLP(nn.Module):
    """A multi-layer perceptron on flattened inputs."""

    def __init__(
        self, in_features: int = 64, hidden: int = 256, depth: int = 2, num_classes: int = 10
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class _ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=False),
        )


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = int(round(cin * expand))
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_ConvBNReLU(cin, hidden, kernel=1))
        layers += [
            _ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al., 2018) with a width multiplier.

    Parameters
    ----------
    width_mult : float
        Width multiplier (1.0 is the reference network, 0.35 the one of MCUNet-style
        on-device training).
    num_classes : int
        Output classes.
    in_channels : int
        Input channels.
    """

    _SETTING = [
        # expand, channels, repeats, stride
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ]

    def __init__(
        self, width_mult: float = 1.0, num_classes: int = 1000, in_channels: int = 3
    ) -> None:
        super().__init__()
        cin = _make_divisible(32 * width_mult)
        last = _make_divisible(1280 * max(1.0, width_mult))
        layers: list[nn.Module] = [_ConvBNReLU(in_channels, cin, stride=2)]
        for t, c, n, s in self._SETTING:
            cout = _make_divisible(c * width_mult)
            for i in range(n):
                layers.append(_InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        layers.append(_ConvBNReLU(cin, last, kernel=1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.down: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.down(x))


class ResNet18(nn.Module):
    """ResNet-18 (He et al., 2016), the ImageNet variant (7x7 stem and max-pool)."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        )
        blocks: list[nn.Module] = []
        cin = 64
        for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            blocks += [_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


MODELS: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": SmallCNN,
    "mlp": MLP,
    "mobilenet_v2": MobileNetV2,
    "resnet18": ResNet18,
}


def build_model(name: str, **kwargs: object) -> nn.Module:
    """Build a model by its registry name.

    Parameters
    ----------
    name : str
        One of ``MODELS``' keys.
    **kwargs
        Passed to the model's constructor (e.g. ``num_classes``, ``width_mult``).

    Raises
    ------
    ConfigError
        If the name is unknown or an argument does not fit the constructor.
    """
    if name not in MODELS:
        raise ConfigError(f"model.name: unknown model {name!r}; expected one of {sorted(MODELS)}")
    try:
        return MODELS[name](**kwargs)
    except TypeError as exc:
        raise ConfigError(f"model: bad arguments for {name!r}: {exc}") from exc
