"""Learning-rate schedules as torch.optim.lr_scheduler objects: their state (the step
count, the last epoch's loss) travels in the checkpoint, so a resumed run lands on
the same learning rates.

With --time_budget the schedule follows the wall clock instead (WallClockCosine).
Each has `per_step`: True when the loop calls scheduler.step() after every batch,
False when it calls scheduler.step(epoch_loss) after every epoch.
"""
import math
import time

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
        self.total_steps = total_steps
        super().__init__(optimizer, lambda step: warmup_cosine_factor(step, total_steps))

    def progress(self):
        """0 at the first step, 1 at the last."""
        return min(1.0, self.last_epoch / max(1, self.total_steps))


class TimeBudget:
    """The run's clock. With --time_budget (minutes) it also tells when training must
    stop: the wall clock of the whole command (set-up and decoding count), minus a
    reserve for the last validation and checkpoint, measured as the run goes. Without
    one (None) it never runs out."""

    def __init__(self, minutes, started, used=0.0):
        self.seconds = minutes * 60 if minutes else math.inf
        self.started = started  # time.monotonic() when this process began the command
        self.used_before = used  # seconds spent by the runs this one resumes
        self.reserve = 0.05 * self.seconds if minutes else 0.0  # until a validation is timed

    def elapsed(self):
        return self.used_before + time.monotonic() - self.started

    def progress(self):
        """0 at the start, 1 when training must stop to validate and save in time."""
        if math.isinf(self.seconds):
            return 0.0
        return min(1.0, self.elapsed() / max(self.seconds - self.reserve, 1e-9))

    def exhausted(self):
        return self.progress() >= 1.0

    def measured_end(self, seconds):
        """A validation plus checkpoint took `seconds`: keep that much (and a margin)."""
        self.reserve = min(1.2 * seconds + 2.0, 0.5 * self.seconds)


class WallClockCosine(lr_scheduler.LRScheduler):
    """With --time_budget: warm-up over the first 10% of the budget, then cosine to 0 at
    its end, by the wall clock rather than by step count (the step time of this machine
    is not known in advance)."""
    per_step = True

    def __init__(self, optimizer, budget):
        self.budget = budget
        super().__init__(optimizer)

    def get_lr(self):
        factor = wall_clock_factor(self.budget.progress())
        return [base * factor for base in self.base_lrs]

    def progress(self):
        return self.budget.progress()

    def state_dict(self):
        return {key: value for key, value in super().state_dict().items() if key != 'budget'}


def wall_clock_factor(progress, warmup=0.1):
    if progress < warmup:
        return max(progress / warmup, 0.01)
    return 0.5 * (1 + math.cos(math.pi * (progress - warmup) / (1 - warmup)))


def progressive_size(image_size, progress):
    """--progressive: the side of the training images at this point of the schedule
    (0 to 1): 2/3 of image_size for the first half, 5/6 until three quarters, then the
    full size, so that the last quarter, at low learning rates, adapts the network to
    the size it is validated at. Multiples of 8, at least 16."""
    share = 2 / 3 if progress < 0.5 else 5 / 6 if progress < 0.75 else 1
    return max(16, round(image_size * share / 8) * 8)


def make_scheduler(name, optimizer, lr_decay, total_steps, budget=None):
    if budget is not None:
        return WallClockCosine(optimizer, budget)
    if name == 'cosine':
        return WarmupCosine(optimizer, total_steps)
    return DecayWhenLossRises(optimizer, lr_decay)
