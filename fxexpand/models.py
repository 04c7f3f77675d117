"""Small reference models shipped with fxexpand (usable as factories ``fxexpand:<name>``)."""

from __future__ import annotations

from torch import nn

__all__ = ["SmallNet"]


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
