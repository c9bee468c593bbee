"""The book's ResNet34, trained from scratch, with Kaiming initialisation."""
from torch import nn

from .basic_module import BasicModule, kaiming_init


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions plus a shortcut (a 1x1 projection when the shape changes)."""

    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__()
        self.left = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(out_channels))
        self.right = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.right = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.left(x) + self.right(x))


def make_layer(in_channels, out_channels, blocks, stride):
    layers = [ResidualBlock(in_channels, out_channels, stride)]
    layers += [ResidualBlock(out_channels, out_channels) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class ResNet34(BasicModule):
    def __init__(self, num_classes=2):
        super().__init__()
        self.pre = nn.Sequential(
            nn.Conv2d(3, 64, 7, 2, 3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1))
        self.layer1 = make_layer(64, 64, 3, 1)
        self.layer2 = make_layer(64, 128, 4, 2)
        self.layer3 = make_layer(128, 256, 6, 2)
        self.layer4 = make_layer(256, 512, 3, 2)
        # The book pools with a fixed 7x7 window, which only fits 224 px input;
        # adaptive pooling works at any image size.
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        kaiming_init(self)

    def forward(self, x):
        x = self.pre(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))
