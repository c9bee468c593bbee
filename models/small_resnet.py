"""SmallResNet: a ResNet-10-style network sized for CPUs at 64-128 px.

A 3x3 stride-2 stem, then one basic block per stage at 32/64/128/256 channels;
about 1.2M parameters and 64M multiply-adds per 64 px image (ResNet34 at 224 px
needs 3.6G), so it trains at hundreds of images per second on a laptop CPU.
"""
from torch import nn

from .basic_module import BasicModule, kaiming_init


class DownsampleShortcut(nn.Sequential):
    """Average-pool then 1x1 conv: unlike a strided 1x1 conv it sees every pixel. The
    pool rounds an odd side up, as the block's strided 3x3 conv does (any image size)."""

    def __init__(self, in_channels, out_channels, stride):
        super().__init__(
            nn.AvgPool2d(stride, stride, ceil_mode=True) if stride > 1 else nn.Identity(),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels))


class BasicBlock(nn.Module):
    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = (DownsampleShortcut(in_channels, out_channels, stride)
                         if stride != 1 or in_channels != out_channels else nn.Identity())

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class SmallResNet(BasicModule):
    def __init__(self, num_classes=2, widths=(32, 64, 128, 256)):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, 2, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True))
        stages, in_channels = [], widths[0]
        for i, width in enumerate(widths):
            stages.append(BasicBlock(in_channels, width, stride=1 if i == 0 else 2))
            in_channels = width
        self.layers = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        kaiming_init(self)

    def forward(self, x):
        return self.fc(self.avgpool(self.layers(self.stem(x))).flatten(1))
