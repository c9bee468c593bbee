"""What every check shares: the Result it returns, the Context it reads, and small helpers."""
import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from engine.loop import NonFiniteLoss
from utils.errors import UserError

PASS, WARN, FAIL = 'PASS', 'WARN', 'FAIL'
LN2 = math.log(2)  # the loss of a 50/50 guess between two classes

# What must not come after a classifier's last layer: CrossEntropyLoss wants raw logits.
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
               nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish,
               nn.Softplus, nn.Softsign, nn.Softmax, nn.Softmax2d, nn.Softmin, nn.LogSigmoid,
               nn.Threshold)
NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.LayerNorm,
         nn.GroupNorm, nn.LocalResponseNorm)
BATCHNORMS = (nn.modules.batchnorm._BatchNorm,)
DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
            nn.FeatureAlphaDropout)
RELUS = (nn.ReLU, nn.ReLU6)
WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass
class Result:
    name: str
    status: str
    evidence: str
    fix: str = ''
    data: dict = field(default_factory=dict)  # the measured figures, for other checks and tests
    seconds: float = 0.0

    def line(self):
        text = f'{self.status}  {self.name:<14} {self.evidence} ({self.seconds:.1f} s)'
        return text + (f'\n      fix: {self.fix}' if self.status != PASS and self.fix else '')


def verdict(name, evidence, data, problems=(), warnings=()):
    """FAIL listing every (problem, fix), most fundamental first; else WARN; else PASS."""
    found = list(problems) or list(warnings)
    if not found:
        return Result(name, PASS, evidence, data=data)
    fixes = '; '.join(dict.fromkeys(fix for _, fix in found if fix))  # each fix once
    return Result(name, FAIL if problems else WARN,
                  evidence + '; ' + '; '.join(text for text, _ in found), fixes, data)


@dataclass
class Context:
    """What the checks examine: the run train would use, the first batches its training
    loader delivers (on the model's device), the results so far, and measurements
    shared between checks (memo), each made once."""
    run: object
    batches: list
    out_dir: str
    results: dict = field(default_factory=dict)
    memo: dict = field(default_factory=dict)

    @property
    def device(self):
        return device_of(self.run.model)

    def probe(self, size=16):
        images, targets = self.batches[0]
        return images[:size], targets[:size]

    def step(self, model, optimizer, criterion, images, targets, step=None):
        """run.step (or `step`) as train calls it; the loss before the update, NaN where
        train would stop on a NaN/inf loss."""
        try:
            return (step or self.run.step)(model, optimizer, criterion, images, targets,
                                           self.run.placement)[1]
        except NonFiniteLoss:
            return math.nan

    def remember(self, key, compute):
        if key not in self.memo:
            self.memo[key] = compute()
        return self.memo[key]

    def result(self, name):
        return self.results.get(name)


def draw_batches(loader, min_batches=4, min_images=64, max_batches=16):
    """The first batches the training loader delivers, as [(images, targets)]."""
    batches = []
    for images, targets, *_ in loader:
        if images is None:
            continue
        batches.append((images, targets))
        seen = sum(len(t) for _, t in batches)
        if len(batches) >= max_batches or (len(batches) >= min_batches and seen >= min_images):
            break
    if not batches:
        raise UserError('the training loader delivered no readable image; check --train_data_root')
    return batches


def device_of(model):
    return next(model.parameters()).device


def copy_training(model, optimizer):
    """Independent copies of model and optimizer (one deepcopy keeps the optimizer pointing
    at the copied parameters), so a check can train without touching the originals."""
    return copy.deepcopy((model, optimizer))


def configured_lr(group):
    """A group's LR as configured: a warm-up schedule starts below it (initial_lr is
    what the scheduler ramps to)."""
    return group.get('initial_lr', group['lr'])


def set_lr(optimizer, lr, base_lrs):
    """Scale every group to `lr`, keeping the groups' ratios (backbone vs classifier)."""
    for group, base in zip(optimizer.param_groups, base_lrs):
        group['lr'] = lr * base / (base_lrs[0] or 1.0)


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def optimizer_ids(optimizer):
    return {id(p) for group in optimizer.param_groups for p in group['params']}


def fmt(values):
    return '(' + ', '.join(f'{v:.2f}' for v in values.tolist()) + ')'


def few(names, shown=3):
    names = list(names)
    more = f' (+{len(names) - shown} more)' if len(names) > shown else ''
    return ', '.join(names[:shown]) + more


def flat(tensors):
    """One vector from a list of tensors (None skipped)."""
    parts = [t.detach().float().flatten() for t in tensors if t is not None]
    return torch.cat(parts) if parts else torch.zeros(0)


def ratio(a, b):
    """|a| / |b| of two vectors, inf when only b vanishes."""
    na, nb = float(a.norm()), float(b.norm())
    return na / nb if nb > 0 else (1.0 if na == 0 else math.inf)


def cosine(a, b):
    na, nb = float(a.norm()), float(b.norm())
    return float(a @ b) / (na * nb) if na > 0 and nb > 0 else 0.0
