"""AlexNet (Krizhevsky et al. 2012), trained from scratch, with Kaiming initialisation."""
from torch import nn

from .basic_module import BasicModule, kaiming_init


class AlexNet(BasicModule):
    def __init__(self, num_classes=2):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2))
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))  # any input size from 64 px up
        # Ends in a plain Linear: CrossEntropyLoss wants raw logits, and an
        # activation here is one of the classic causes of a run stuck at 50%.
        self.classifier = nn.Sequential(
            nn.Dropout(), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(inplace=True),
            nn.Dropout(), nn.Linear(4096, 4096), nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes))
        kaiming_init(self)

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)).flatten(1))
