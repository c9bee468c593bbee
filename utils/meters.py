# coding: utf8
"""Epoch metrics from torchnet meters, plus the running-count accuracy beside them."""
import math

import torch
from torchnet import meter


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
