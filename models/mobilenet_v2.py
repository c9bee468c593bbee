"""torchvision's MobileNetV2 with ImageNet weights and a 2-class head: 3.5M
parameters and 0.3 GFLOPs at 224 px, light enough to fine-tune on a CPU."""
import torch
from torch import nn
from torchvision.models import MobileNet_V2_Weights, mobilenet_v2

from .basic_module import BasicModule, kaiming_init, torchvision_backbone


class MobileNetV2(BasicModule):
    def __init__(self, num_classes=2, pretrained=True, weights=None):
        super().__init__()
        self.backbone = torchvision_backbone(mobilenet_v2, MobileNet_V2_Weights.IMAGENET1K_V1,
                                             pretrained, weights)
        # classifier = Dropout(0.2), Linear(1280, 1000): keep the dropout, replace the layer
        self.backbone.classifier[-1] = nn.Linear(self.backbone.last_channel, num_classes)
        kaiming_init(self.backbone.classifier)

    def forward(self, x):
        return self.backbone(x)

    def head(self):
        return self.backbone.classifier

    def stages(self):
        net = self.backbone  # forward: features, average pool, flatten, classifier
        return (net.features[0], list(net.features[1:]),
                lambda x: net.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)))
