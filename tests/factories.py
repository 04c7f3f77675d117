"""Model factories used by the CLI tests (importable, so they can be allowed by name)."""

from torch import nn


def tiny(width: int = 4) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 2))


class DataDependentNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        y = self.conv(x)
        if y.mean() > 0:
            return y
        return -y


CALLED = []


def evil():  # a factory the tests never allow: it must never be imported or called
    CALLED.append(True)
    return tiny()
