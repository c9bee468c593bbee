"""What every check shares: the Result it returns and helpers to train a copy."""
import copy
import math
from dataclasses import dataclass, field

from torch import nn

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



def draw_batches(loader, min_batches=4, min_images=64, max_batches=16):
    """The first batches the training loader delivers, as [(images, targets)]."""
    batches = []
    for images, targets, _ in loader:
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


def set_lr(optimizer, lr, base_lrs):
    """Scale every group to `lr`, keeping the groups' ratios (backbone vs classifier)."""
    for group, base in zip(optimizer.param_groups, base_lrs):
        group['lr'] = lr * base / (base_lrs[0] or 1.0)



def fmt(values):
    return '(' + ', '.join(f'{v:.2f}' for v in values.tolist()) + ')'


def few(names, shown=3):
    return ', '.join(names[:shown]) + (f' (+{len(names) - shown} more)' if len(names) > shown else '')
