# coding: utf8
"""torchvision's ResNet34 with ImageNet weights and a 2-class head (the book's
ResNet34 in resnet34.py is the same depth trained from scratch)."""
from torch import nn
from torchvision.models import ResNet34_Weights, resnet34

from .basic_module import BasicModule, kaiming_init, torchvision_backbone


class ResNet34Pretrained(BasicModule):
    def __init__(self, num_classes=2, pretrained=True, weights=None):
        super().__init__()
        self.backbone = torchvision_backbone(resnet34, ResNet34_Weights.IMAGENET1K_V1,
                                             pretrained, weights)
        self.backbone.fc = nn.Linear(self.backbone.fc.in_features, num_classes)
        kaiming_init(self.backbone.fc)

    def forward(self, x):
        return self.backbone(x)

    def head(self):
        return self.backbone.fc
