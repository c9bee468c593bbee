"""torchvision's ResNet34 with ImageNet weights and a 2-class head (the book's
ResNet34 in resnet34.py is the same depth trained from scratch)."""
from torchvision.models import ResNet34_Weights, resnet34

from .resnet18 import ResNet18


class ResNet34Pretrained(ResNet18):
    builder, imagenet_weights = resnet34, ResNet34_Weights.IMAGENET1K_V1
