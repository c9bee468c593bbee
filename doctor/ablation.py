"""When the loss will not fall: change one option or component at a time, on copies, and
name the first change that lets a small batch be learnt."""
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from doctor.common import (DROPOUTS, LN2, PASS, configured_lr, copy_training, optimizer_ids,
                           set_lr, trainable)
from doctor.step_checks import mode_problems, recorded
from doctor.step_recorder import expected_modes
from engine import builder
from engine.loop import train_step
from models.basic_module import kaiming_init


def unchanged(images):
    return images


@dataclass
class Trial:
    """What one attempt trains with: copies of the model and optimizer, the criterion,
    a step (ctx.step's signature) and what is done to the images first."""
    model: nn.Module
    optimizer: object
    criterion: Callable
    step: Callable
    lr: float
    inputs: Callable = unchanged


def as_configured(ctx, lr=None):
    """A trial as train would run it, at `lr` instead of the configured LR if given."""
    model, optimizer = copy_training(ctx.run.model, ctx.run.optimizer)
    configured = [configured_lr(g) for g in optimizer.param_groups]
    set_lr(optimizer, lr or configured[0], configured)
    return Trial(model, optimizer, ctx.run.criterion, ctx.step, optimizer.param_groups[0]['lr'])


def fit_batch(trial, images, targets, goal, steps):
    """Train on one small batch until the loss is below `goal`; the losses."""
    losses = []
    images = trial.inputs(images)
    for _ in range(steps):
        losses.append(trial.step(trial.model, trial.optimizer, trial.criterion, images, targets))
        if not math.isfinite(losses[-1]) or losses[-1] < goal:
            break
    return losses


def learnt(losses, goal):
    return bool(losses) and math.isfinite(losses[-1]) and losses[-1] < goal


# The changes, each on a fresh trial; CHANGES below lists them, most specific first.

def new_optimizer(ctx, trial):
    trial.optimizer = builder.optimizer(ctx.run.opt, trial.model)
    set_lr(trial.optimizer, trial.lr, [g['lr'] for g in trial.optimizer.param_groups])


def textbook_step(ctx, trial):
    trial.step = lambda *args: ctx.step(*args, step=train_step)


def plain_loss(ctx, trial):
    trial.criterion = nn.CrossEntropyLoss()


def no_weight_decay(ctx, trial):
    for group in trial.optimizer.param_groups:
        group['weight_decay'] = 0.0


def no_dropout(ctx, trial):
    for module in trial.model.modules():
        if isinstance(module, DROPOUTS):
            module.p = 0.0


def training_modes(ctx, trial):
    """Each BatchNorm/Dropout layer put in its training mode right before it runs."""
    expected = expected_modes(trial.model)
    for name, module in trial.model.named_modules():
        if name in expected:
            module.register_forward_pre_hook(
                lambda m, inputs, mode=expected[name]: setattr(m, 'training', mode))


def renormalised(ctx, trial):
    def inputs(images):
        mean = images.float().mean((0, 2, 3), keepdim=True)
        std = images.float().std((0, 2, 3), keepdim=True).clamp_min(1e-6)
        return ((images.float() - mean) / std).to(images.dtype)
    trial.inputs = inputs


def reinitialised(ctx, trial):
    kaiming_init(trial.model)
    new_optimizer(ctx, trial)  # Adam's state belongs to the old weights' scale


def is_plain_cross_entropy(criterion):
    return (type(criterion) is nn.CrossEntropyLoss and criterion.weight is None
            and not criterion.label_smoothing)


def failed(ctx, check):
    return getattr(ctx.result(check), 'status', PASS) != PASS


def foreign_optimizer(ctx):
    return optimizer_ids(ctx.run.optimizer) != {id(p) for p in trainable(ctx.run.model).values()}


def wrong_modes(ctx):
    return bool(mode_problems(ctx.run.model, recorded(ctx)[0])[0])


def decays(ctx):
    return any(group.get('weight_decay') for group in ctx.run.optimizer.param_groups)


def drops(ctx):
    return any(isinstance(m, DROPOUTS) and m.p > 0 for m in ctx.run.model.modules())


# (what changes, the fix it points to, does it apply to this run, the change)
CHANGES = (
    ('the optimizer rebuilt over run.model', 'build the optimizer with builder.optimizer(opt, '
     'run.model) once the model is final', foreign_optimizer, new_optimizer),
    ('engine.loop.train_step instead of run.step', 'use engine.loop.train_step, or make run.step '
     'zero the gradients, backward() the loss and optimizer.step() once',
     lambda ctx: ctx.run.step is not train_step, textbook_step),
    ('a plain CrossEntropyLoss', 'use nn.CrossEntropyLoss() on raw scores (--label_smoothing 0.1 '
     'at most, no class weight of 0)', lambda ctx: not is_plain_cross_entropy(ctx.run.criterion),
     plain_loss),
    ('weight decay 0', '--weight_decay=0, or 1e-4 (Adam/SGD), 0.05 with --optimizer=adamw',
     decays, no_weight_decay),
    ('dropout off', 'lower the Dropout p (0.5 at most)', drops, no_dropout),
    ('BatchNorm/Dropout forced into training mode', 'keep the model in training mode during '
     'the steps: no model.eval() in the step or forward()', wrong_modes, training_modes),
    ('Kaiming initialisation', 'initialise with models.basic_module.kaiming_init, or start '
     'from pretrained weights', lambda ctx: failed(ctx, 'initialisation'), reinitialised),
    ('inputs re-normalised per channel', 'normalise the inputs: T.ToTensor() then '
     'T.Normalize(model.input_mean, model.input_std)',
     lambda ctx: failed(ctx, 'normalisation'), renormalised),
)


def find_culprit(ctx, images, targets, goal, lr, steps=15):
    """(what changed, fix, losses) of the first single change that lets the batch be
    learnt at `lr`; None when none does. Made once per run (memo)."""
    def search():
        for what, fix, applies, change in CHANGES:
            if not applies(ctx):
                continue
            trial = as_configured(ctx, lr)
            change(ctx, trial)
            losses = fit_batch(trial, images, targets, goal, steps)
            if learnt(losses, goal):
                return what, fix, losses
        return None
    return ctx.remember('culprit', search)


def overfit_goal(ctx):
    """Well below 50/50: a quarter of the way from the loss's floor (0 for cross-entropy,
    more with label smoothing) to ln 2."""
    loss = ctx.result('loss')
    floor = loss.data.get('lowest', 0.0) if loss is not None else 0.0
    floor = floor if math.isfinite(floor) and 0 <= floor < LN2 else 0.0
    return floor + (LN2 - floor) / 4


def balanced_subset(batches, size):
    """Up to `size` images with the classes as even as the batches allow."""
    images = torch.cat([x for x, _ in batches])
    targets = torch.cat([t for _, t in batches])
    per_class = [torch.nonzero(targets == c).flatten() for c in range(2)]
    order = [int(i) for pair in zip(*per_class) for i in pair]
    taken = set(order)
    order += [i for i in range(len(targets)) if i not in taken]
    chosen = torch.tensor(order[:size])
    return images[chosen], targets[chosen]
