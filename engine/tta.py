"""Test-time augmentation for val, test and predict (--tta)."""
import torch


class FlipAverage:
    """--tta=flip: each image and its mirror image in one batch, their class
    probabilities averaged. Called like the network it wraps; returns log-probabilities,
    which CrossEntropyLoss and softmax take as they take logits."""

    def __init__(self, network):
        self.network = network

    def eval(self):
        self.network.eval()
        return self

    def __call__(self, images):
        scores = self.network(torch.cat([images, images.flip(-1)])).float()
        probabilities = torch.softmax(scores, dim=1)
        plain, mirrored = probabilities.split(len(images))
        return ((plain + mirrored) / 2).log()


def with_tta(network, tta):
    return FlipAverage(network) if tta == 'flip' else network
