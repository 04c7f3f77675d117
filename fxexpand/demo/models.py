"""Small reference models shipped with fxexpand (usable as factories ``fxexpand:<name>``)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SmallNet", "TinyConv1d", "DigitsNet"]


class SmallNet(nn.Module):
    """ExpandNets' CIFAR SmallNet: three 7x7 convs (8/16/32 channels) with BN, ReLU and 2x2 max-pool,
    then FC 64 and FC ``num_classes``."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32, width: int = 8):
        super().__init__()
        w = width
        layers = []
        c = in_channels
        for out in (w, 2 * w, 4 * w):
            layers += [nn.Conv2d(c, out, 7, padding=3, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            c = out
        self.features = nn.Sequential(*layers)
        side = image_size // 8
        if side < 1:
            raise ValueError("image_size must be at least 8")
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c * side * side, 64), nn.ReLU(inplace=True),
                                        nn.Linear(64, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class _DwPw1d(nn.Module):
    """Depthwise (kernel k, stride s) + BN + ReLU, then pointwise + BN + ReLU (MobileNet-v1 style)."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int):
        super().__init__()
        self.dw = nn.Conv1d(cin, cin, kernel_size, stride=stride, padding=kernel_size // 2, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm1d(cin)
        self.pw = nn.Conv1d(cin, cout, 1, bias=False)
        self.bn2 = nn.BatchNorm1d(cout)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.bn2(self.pw(self.act(self.bn1(self.dw(x))))))


class TinyConv1d(nn.Module):
    """A MobileNet-style Conv1d net for MNIST-1D (the demo's model zoo).

    Stem conv (kernel 5) + BN + ReLU; three depthwise (kernel 5) + pointwise blocks at widths
    ``w, 2w, 2w`` with strides 1, 2, 2; global average pooling; a hidden FC (``hidden``) + ReLU and
    the logit FC. Every method applies: NetBooster (pointwise convs), ExpandNets CL (every kernel-5
    conv), CK (kernel 5 = two 3-taps), FC (the hidden FC), NetAug (every free channel group) and
    early exits (after each block). ``width=4`` has 766 parameters, ``width=6`` 1,388, ``width=8``
    2,138; all under-fit MNIST-1D's 3,200 training samples.
    """

    def __init__(self, width: int = 6, hidden: int = 16, num_classes: int = 10, in_channels: int = 1,
                 kernel_size: int = 5):
        super().__init__()
        w = int(width)
        if w < 1 or hidden < 1:
            raise ValueError("width and hidden must be >= 1")
        self.stem = nn.Sequential(nn.Conv1d(in_channels, w, kernel_size, padding=kernel_size // 2, bias=False),
                                  nn.BatchNorm1d(w), nn.ReLU())
        self.blocks = nn.Sequential(_DwPw1d(w, w, kernel_size, 1), _DwPw1d(w, 2 * w, kernel_size, 2),
                                    _DwPw1d(2 * w, 2 * w, kernel_size, 2))
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc1 = nn.Linear(2 * w, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x):
        x = self.pool(self.blocks(self.stem(x))).flatten(1)
        return self.fc2(self.act(self.fc1(x)))


class DigitsNet(nn.Module):
    """A tiny CNN for 8x8 digits (~3.4k parameters): stem 3x3, two pointwise+depthwise blocks, head."""

    def __init__(self, num_classes: int = 10, width: int = 12):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.block1 = _DigitsBlock(w, 2 * w, stride=1)
        self.block2 = _DigitsBlock(2 * w, 4 * w, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x):
        x = self.block2(self.block1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class _DigitsBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.pw = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.dw = nn.Conv2d(cout, cout, 3, stride=stride, padding=1, groups=cout, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.bn2(self.dw(self.act(self.bn1(self.pw(x))))))
