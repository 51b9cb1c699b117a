"""The anchor paper's CNN and a DEQ built at its cost (issue 21).

The Fashion-MNIST reference numbers this project measures itself against come from one small CNN
(Croce, Andriushchenko, Hein, AISTATS 2019, Table 1): conv 16 4x4/2, conv 32 4x4/2, fc 100, fc 10.
`AnchorCNN` is that network exactly. `AnchorDEQ` keeps its two strided convolutions as the input
injection and its fc head as the decoder, and iterates one residual cell on the 7x7x32 map in
between, so a solver iteration costs about as much as the anchor's whole forward and the
comparison isolates what the equilibrium (and the paper's regulation of it) adds.
"""

from __future__ import annotations

from torch import Tensor, nn

from .classifier import FeedForwardClassifier, StemCellDEQ
from .config import AnchorCNNConfig, AnchorDEQConfig
from .layers import ResidualCell


def _conv4x4(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 4, stride=2, padding=1)


def _fc_head(features: int, hidden: int, classes: int) -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(features, hidden), nn.ReLU(),
                         nn.Linear(hidden, classes))


class AnchorCNN(FeedForwardClassifier):
    def __init__(self, config: AnchorCNNConfig):
        super().__init__(config)
        c1, c2 = config.channels
        side = config.image_size // 4
        self.net = nn.Sequential(
            _conv4x4(config.in_channels, c1), nn.ReLU(), _conv4x4(c1, c2), nn.ReLU(),
            _fc_head(c2 * side * side, config.hidden, config.num_classes))

    def forward(self, x: Tensor, **_: object) -> Tensor:
        return self.net(x)


class AnchorDEQ(StemCellDEQ):
    def __init__(self, config: AnchorDEQConfig):
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
