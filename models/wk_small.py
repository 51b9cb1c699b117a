"""Wong and Kolter's small CNN, and a DEQ built at its cost.

The Fashion-MNIST reference numbers this project measures itself against (the "anchor" of the
README and bench/) come from one small CNN, Wong and Kolter's "small" network, in the form of
Croce, Andriushchenko and Hein (AISTATS 2019, Table 1): conv 16 4x4/2, conv 32 4x4/2, fc 100,
fc 10. `WKSmallCNN` (registered as `cnn-wk`) is that network exactly. `WKSmallDEQ` (`deq-wk`)
keeps its two strided convolutions as the input injection and its fc head as the decoder, and
iterates one residual cell on the 7x7x32 map in between, so a solver iteration costs about as
much as the CNN's whole forward and the comparison isolates what the equilibrium (and the paper's
regulation of it) adds.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from torch import Tensor, nn

from .classifier import FeedForwardClassifier, StemCellDEQ
from .config import DEQConfig, ModelConfig
from .layers import ResidualCell
from .registry import register_model


def _check_quartered(image_size: int) -> None:
    # two 4x4 stride-2 convolutions with padding 1 halve exactly only an even size, twice
    if image_size % 4:
        raise ValueError(f"image_size {image_size} must be divisible by 4 for the small CNN's "
                         "stem")


class WKSmallCNNConfig(ModelConfig):
    """conv 16 4x4/2, conv 32 4x4/2, fc 100, fc 10: 166,406 parameters on 28x28x1, the
    baseline every Fashion-MNIST DEQ here has to beat at equal cost."""

    arch: Literal["cnn-wk"] = "cnn-wk"
    channels: tuple[int, int] = (16, 32)
    hidden: int = Field(100, ge=1)

    @model_validator(mode="after")
    def _halves_twice(self) -> WKSmallCNNConfig:
        _check_quartered(self.image_size)
        return self


class WKSmallDEQConfig(DEQConfig):
    """The small CNN's two strided convolutions inject the image into a state of
    size/4 x size/4 x channels[-1] (7x7x32 on Fashion-MNIST), one residual cell is iterated
    there, and the CNN's fc head (`head="fc"`) or a pooled linear one decodes it."""

    arch: Literal["deq-wk"] = "deq-wk"
    channels: tuple[int, int] = (16, 32)
    expansion: int = Field(1, ge=1)
    num_groups: int = Field(4, ge=1)
    head: Literal["fc", "pool"] = "fc"
    hidden: int = Field(100, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    weight_norm: bool = True

    @model_validator(mode="after")
    def _halves_twice(self) -> WKSmallDEQConfig:
        _check_quartered(self.image_size)
        return self


def _conv4x4(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 4, stride=2, padding=1)


def _fc_head(features: int, hidden: int, classes: int) -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(features, hidden), nn.ReLU(),
                         nn.Linear(hidden, classes))


@register_model("cnn-wk", WKSmallCNNConfig)
class WKSmallCNN(FeedForwardClassifier):
    def __init__(self, config: WKSmallCNNConfig):
        super().__init__(config)
        c1, c2 = config.channels
        side = config.image_size // 4
        self.net = nn.Sequential(
            _conv4x4(config.in_channels, c1), nn.ReLU(), _conv4x4(c1, c2), nn.ReLU(),
            _fc_head(c2 * side * side, config.hidden, config.num_classes))

    def forward(self, x: Tensor, **_: object) -> Tensor:
        return self.net(x)


@register_model("deq-wk", WKSmallDEQConfig)
class WKSmallDEQ(StemCellDEQ):
    def __init__(self, config: WKSmallDEQConfig):
        super().__init__(config)
        c = config
        c1, c2 = c.channels
        side = c.image_size // 4
        # no activation after the second convolution: the cell adds u before its own ReLU
        self.stem = nn.Sequential(_conv4x4(c.in_channels, c1), nn.ReLU(), _conv4x4(c1, c2))
        self.cell = ResidualCell(c2, c.expansion, c.num_groups, c.dropout, c.weight_norm)
        if c.head == "fc":
            self.head = _fc_head(c2 * side * side, c.hidden, c.num_classes)
        else:
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                      nn.Linear(c2, c.num_classes))
