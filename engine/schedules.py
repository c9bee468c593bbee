"""Learning-rate schedules as torch.optim.lr_scheduler objects: their state (the step
count, the last epoch's loss) travels in the checkpoint, so a resumed run lands on
the same learning rates.

Each has `per_step`: True when the loop calls scheduler.step() after every batch,
False when it calls scheduler.step(epoch_loss) after every epoch.
"""
import math

from torch.optim import lr_scheduler


class DecayWhenLossRises(lr_scheduler.LRScheduler):
    """The book's rule: when an epoch's mean training loss is above the previous epoch's,
    multiply every group's lr by `factor`. Optimizer state (momentum, Adam moments)
    is kept; the ratio between groups (backbone vs classifier) too."""
    per_step = False

    def __init__(self, optimizer, factor):
        self.factor = factor
        self.previous_loss = math.inf
        self.decayed = False  # whether the last step decayed, for the epoch report
        super().__init__(optimizer)

    def step(self, loss=None):
        self.decayed = loss is not None and loss > self.previous_loss
        if loss is not None:
            self.previous_loss = loss
        super().step()

    def get_lr(self):
        factor = self.factor if self.decayed else 1.0
        return [group['lr'] * factor for group in self.optimizer.param_groups]


def warmup_cosine_factor(step, total_steps, warmup_fraction=0.1):
    """Linear warm-up over the first steps, then half a cosine down to 0."""
    warmup = max(1, int(total_steps * warmup_fraction))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress))


class WarmupCosine(lr_scheduler.LambdaLR):
    """--lr_schedule=cosine: warm-up over 10% of the steps, then cosine to 0; every
    group follows its own initial lr times the factor of the global step."""
    per_step = True

    def __init__(self, optimizer, total_steps):
        super().__init__(optimizer, lambda step: warmup_cosine_factor(step, total_steps))


def make_scheduler(name, optimizer, lr_decay, total_steps):
    if name == 'cosine':
        return WarmupCosine(optimizer, total_steps)
    return DecayWhenLossRises(optimizer, lr_decay)
