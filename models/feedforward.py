"""Explicit (non-DEQ) baselines: a small CNN and the paper's ResNet-18."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import Tensor, nn

from .classifier import FeedForwardClassifier
from .config import ModelConfig
from .layers import conv1x1, conv3x3
from .registry import register_model


class CNNConfig(ModelConfig):
    """Feedforward baseline of about the tiny DEQ's parameter count."""

    arch: Literal["cnn"] = "cnn"
    widths: tuple[int, ...] = (32, 64, 64)
    head_width: int = Field(128, ge=4)


class ResNetConfig(ModelConfig):
    """torchvision ResNet-18 with a CIFAR stem (3x3 conv, no max-pool): the paper's baseline."""

    arch: Literal["resnet18"] = "resnet18"
    in_channels: int = Field(3, ge=1)
    image_size: int = Field(32, ge=8)


@register_model("cnn", CNNConfig)
class SmallCNN(FeedForwardClassifier):
    """About the tiny DEQ's parameter count, so robustness comparisons are like for like."""

    def __init__(self, config: CNNConfig):
        super().__init__(config)
        layers: list[nn.Module] = []
        cin = config.in_channels
        for i, w in enumerate(config.widths):
            layers += [conv3x3(cin, w, stride=1 if i == 0 else 2), nn.GroupNorm(4, w), nn.ReLU()]
            cin = w
        layers += [conv1x1(cin, config.head_width), nn.GroupNorm(4, config.head_width), nn.ReLU(),
                   nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                   nn.Linear(config.head_width, config.num_classes)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, **_: object) -> Tensor:
        return self.net(x)


@register_model("resnet18", ResNetConfig)
class ResNet18(FeedForwardClassifier):
    """torchvision's ResNet-18 with the usual CIFAR stem (3x3 conv, stride 1, no max-pool)."""

    def __init__(self, config: ResNetConfig):
        # imported here: registering the architecture must not load torchvision for every
        # `import deqguard.models` (serving and the client's local scoring never build one)
        from torchvision.models import resnet18

        super().__init__(config)
        net = resnet18(num_classes=config.num_classes)
        net.conv1 = nn.Conv2d(config.in_channels, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
        self.net = net

    def forward(self, x: Tensor, **_: object) -> Tensor:
        return self.net(x)
