"""Test-time augmentation for val, test and predict (--tta)."""
import torch


class FlipAverage:
    """--tta=flip: each batch and its mirror image through the network, their class
    probabilities averaged. Called like the network it wraps; returns log-probabilities,
    which CrossEntropyLoss and softmax take as they take logits."""

    def __init__(self, network):
        self.network = network

    def eval(self):
        self.network.eval()
        return self

    def __call__(self, images):
        # two calls rather than one of twice the batch: half the peak memory, same speed
        plain, mirrored = (torch.softmax(self.network(batch).float(), dim=1)
                           for batch in (images, images.flip(-1)))
        return ((plain + mirrored) / 2).log()


def with_tta(network, tta):
    return FlipAverage(network) if tta == 'flip' else network
