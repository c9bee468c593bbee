"""Epoch metrics from torchnet meters, plus the running-count accuracy beside them."""
import math

import torch
from torchnet import meter

from utils import distributed


class ClassificationMeter:
    """Loss (AverageValueMeter), confusion matrix (ConfusionMeter) and running correct
    counts for one pass over the data. Both accuracies come from the same predictions,
    so they must agree; showing both is the write-up's cross-check."""

    def __init__(self, num_classes=2):
        self.loss = meter.AverageValueMeter()
        self.confusion = meter.ConfusionMeter(num_classes)
        self.correct = 0
        self.total = 0
        self.nll_sum = 0.0  # summed per-image cross-entropy, for the log loss

    def add(self, scores, targets, loss=None):
        scores, targets = scores.detach().float().cpu(), targets.detach().cpu()
        self.confusion.add(scores, targets)
        self.correct += (scores.argmax(1) == targets).sum().item()
        self.total += targets.numel()
        self.nll_sum += torch.nn.functional.cross_entropy(scores, targets, reduction='sum').item()
        if loss is not None:
            self.loss.add(float(loss))

    @property
    def cm(self):
        """Confusion matrix, rows = true class, columns = predicted class."""
        return self.confusion.value()

    @property
    def accuracy_cm(self):
        cm = self.cm
        return 100.0 * float(cm.trace()) / max(float(cm.sum()), 1.0)

    @property
    def accuracy_counts(self):
        return 100.0 * self.correct / max(self.total, 1)

    @property
    def mean_loss(self):
        """Mean of the per-batch losses added (the book's loss_meter.value()[0])."""
        return float(self.loss.value()[0]) if self.loss.n else math.nan

    @property
    def log_loss(self):
        """Mean cross-entropy per image (Kaggle's metric for this competition)."""
        return self.nll_sum / max(self.total, 1)

    def state_dict(self):
        """Plain numbers and a tensor: fits in a weights_only checkpoint."""
        return {'loss_sum': float(self.loss.sum), 'loss_n': int(self.loss.n),
                'confusion': torch.from_numpy(self.cm.copy()), 'correct': self.correct,
                'total': self.total, 'nll_sum': self.nll_sum}

    def load_state_dict(self, state):
        """Restore through the meters' own add(): the loss as one add of its sum over n
        batches (the running mean is then sum / n, as it was), the confusion matrix as
        its (true, predicted) pairs."""
        self.loss.reset()
        if state['loss_n']:
            self.loss.add(state['loss_sum'], n=state['loss_n'])
        self.confusion.reset()
        cm = torch.as_tensor(state['confusion'])
        truth, predicted = torch.nonzero(cm >= 0, as_tuple=True)
        counts = cm.flatten()
        if counts.sum() > 0:
            self.confusion.add(predicted.repeat_interleave(counts), truth.repeat_interleave(counts))
        self.correct, self.total, self.nll_sum = state['correct'], state['total'], state['nll_sum']
        return self

    def all_reduce(self, device):
        """Sum counts over torchrun ranks so the metrics cover the whole data set."""
        cm = self.cm
        flat = [self.loss.sum, self.loss.n, self.correct, self.total, self.nll_sum,
                *cm.flatten().tolist()]
        summed = distributed.all_reduce_sum(flat, device)
        state = {'loss_sum': summed[0], 'loss_n': int(round(summed[1])),
                 'correct': int(round(summed[2])), 'total': int(round(summed[3])),
                 'nll_sum': summed[4],
                 'confusion': torch.tensor([int(round(v)) for v in summed[5:]]).reshape(cm.shape)}
        return self.load_state_dict(state)
