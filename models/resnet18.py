"""torchvision's ResNet18 with ImageNet weights, fine-tuned with a 2-class head."""
import torch
from torch import nn
from torchvision.models import ResNet18_Weights, resnet18

from .basic_module import BasicModule, kaiming_init, torchvision_backbone


class ResNet18(BasicModule):
    builder, imagenet_weights = resnet18, ResNet18_Weights.IMAGENET1K_V1

    def __init__(self, num_classes=2, pretrained=True, weights=None):
        super().__init__()
        self.backbone = torchvision_backbone(type(self).builder, self.imagenet_weights,
                                             pretrained, weights)
        self.backbone.fc = nn.Linear(self.backbone.fc.in_features, num_classes)
        kaiming_init(self.backbone.fc)

    def forward(self, x):
        return self.backbone(x)

    def head(self):
        return self.backbone.fc

    def stages(self):
        net = self.backbone
        blocks = [*net.layer1, *net.layer2, *net.layer3, *net.layer4]
        return (nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool), blocks,
                lambda x: net.fc(torch.flatten(net.avgpool(x), 1)))
