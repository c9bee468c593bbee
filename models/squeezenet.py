"""torchvision's SqueezeNet 1.1 with ImageNet weights and a 2-class head."""
from torch import nn
from torchvision.models import SqueezeNet1_1_Weights, squeezenet1_1

from .basic_module import BasicModule, kaiming_init, torchvision_backbone


class SqueezeNet(BasicModule):
    def __init__(self, num_classes=2, pretrained=True, weights=None):
        super().__init__()
        net = torchvision_backbone(squeezenet1_1, SqueezeNet1_1_Weights.IMAGENET1K_V1, pretrained,
                                   weights)
        self.features = net.features
        # torchvision's head (and the book's) is Dropout, Conv, ReLU, AvgPool. The ReLU
        # clips every negative logit to 0: when both logits are <= 0 the softmax is
        # exactly 50/50 and no gradient flows, a classic stuck-at-50% run. Raw logits out.
        self.classifier = nn.Sequential(
            nn.Dropout(p=0.5),
            nn.Conv2d(512, num_classes, kernel_size=1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(1))  # inside the head, so head() alone maps features to logits
        kaiming_init(self.classifier)

    def forward(self, x):
        return self.classifier(self.features(x))

    def head(self):
        return self.classifier
