# coding: utf8
import os
import pickle
import time

import torch
from torch import nn

from utils.errors import UserError


class CheckpointError(UserError):
    pass


def atomic_save(obj, path):
    """torch.save through a temporary file and a rename: a crash never leaves half a file."""
    folder = os.path.dirname(path) or '.'
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f'.{os.path.basename(path)}.{os.getpid()}.tmp')
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def read_checkpoint(path):
    """torch.load with weights_only=True (a .pth is a pickle: never run code from one)."""
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint {path!r} does not exist; check --load_model_path '
                              f'(train writes checkpoints/<model>_last.pth and _best.pth)')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        lines = [l.strip() for l in str(exc).splitlines() if l.strip()] or [type(exc).__name__]
        # torch's weights_only refusal is long: keep its one informative line
        first_line = next((l for l in lines if 'Unsupported global' in l), lines[0])
        raise CheckpointError(f'{path!r} is not a readable checkpoint (truncated, corrupt, or '
                              f'not made by torch.save of tensors): {first_line}') from None


def kaiming_init(module):
    """He et al. (2015) initialisation, the cure for most stuck-at-50% runs.

    PyTorch's default init scales convolutions for linear activations; behind ReLUs
    the signal shrinks layer by layer. Kaiming normal (fan_out, ReLU) keeps it alive.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            # Small weights: logits start near zero, so the loss starts at ln(2)
            # and no class is favoured before training.
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


class BasicModule(nn.Module):
    """nn.Module with save/load of checkpoints and an optimizer factory."""

    def __init__(self):
        super().__init__()
        self.model_name = type(self).__name__

    def save(self, name=None, extra=None, config=None, checkpoint_dir='checkpoints'):
        """Write {model_name, state_dict, config, **extra} atomically; return the path.

        Default name: checkpoints/<model>_<timestamp>.pth.
        """
        if name is None:
            name = os.path.join(checkpoint_dir,
                                f'{self.model_name}_{time.strftime("%Y%m%d_%H%M%S")}.pth')
        checkpoint = {'model_name': self.model_name, 'state_dict': self.state_dict(),
                      'config': dict(config or {}), **(extra or {})}
        return atomic_save(checkpoint, name)

    def load(self, path):
        """Load this project's checkpoint or a bare state dict; return the checkpoint dict."""
        checkpoint = read_checkpoint(path)
        if isinstance(checkpoint, dict) and 'state_dict' in checkpoint:
            saved_name = checkpoint.get('model_name')
            if saved_name and saved_name != self.model_name:
                raise CheckpointError(f'{path!r} holds a {saved_name}, not a {self.model_name}: '
                                      f'pass --model={saved_name}')
            state_dict = checkpoint['state_dict']
        elif isinstance(checkpoint, dict) and all(torch.is_tensor(v) for v in checkpoint.values()):
            state_dict, checkpoint = checkpoint, {}
        else:
            raise CheckpointError(f'{path!r} is neither a checkpoint of this project nor a state dict')
        self.load_state_dict_checked(state_dict, path)
        return checkpoint

    def load_state_dict_checked(self, state_dict, source):
        """load_state_dict that fails with the mismatching keys and shapes spelt out."""
        own = self.state_dict()
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        resized = [f'{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}'
                   for k, v in own.items() if k in state_dict and state_dict[k].shape != v.shape]
        if missing or unexpected or resized:
            def few(keys):
                return ', '.join(keys[:4]) + (f' (+{len(keys) - 4} more)' if len(keys) > 4 else '')
            parts = [f'missing keys: {few(missing)}' if missing else '',
                     f'unexpected keys: {few(unexpected)}' if unexpected else '',
                     f'shape mismatch (file vs model): {few(resized)}' if resized else '']
            raise CheckpointError(f'{source!r} does not fit {self.model_name}: '
                                  + '; '.join(p for p in parts if p))
        self.load_state_dict(state_dict)

    def head(self):
        """The freshly initialised classifier of a pretrained model; None for the others."""
        return None

    def parameter_groups(self):
        """Named parameter groups: one for a from-scratch model, backbone and classifier
        for a pretrained one, so that each can get its own learning rate."""
        trainable = [p for p in self.parameters() if p.requires_grad]
        if self.head() is None:
            return [{'name': 'all', 'params': trainable}]
        head_ids = {id(p) for p in self.head().parameters()}
        return [{'name': 'backbone', 'params': [p for p in trainable if id(p) not in head_ids]},
                {'name': 'classifier', 'params': [p for p in trainable if id(p) in head_ids]}]

    def get_optimizer(self, lr, weight_decay, optimizer='adam', momentum=0.9):
        """Adam or SGD over parameter_groups(); each group keeps its own 'lr'."""
        groups = [dict(g) for g in self.parameter_groups()]
        for group in groups:
            group.setdefault('lr', lr)
        if optimizer == 'sgd':
            return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
        if optimizer == 'adam':
            return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)
        raise UserError(f'--optimizer must be adam or sgd, not {optimizer!r}')


def torchvision_backbone(builder, weights, pretrained):
    """Build a torchvision model, with ImageNet `weights` when `pretrained`.

    The weights come through torchvision's weights API: downloaded once into the
    torch hub cache (torch.hub.get_dir()/checkpoints), read from there afterwards.
    """
    if not pretrained:
        model = builder(weights=None)
        kaiming_init(model)
        return model
    try:
        return builder(weights=weights)
    except OSError as exc:  # URLError (offline) is an OSError too
        cached = os.path.join(torch.hub.get_dir(), 'checkpoints', os.path.basename(weights.url))
        raise UserError(
            f'could not load the ImageNet weights {weights.url} ({exc}). On a machine without '
            f'internet, download that file elsewhere and put it at {cached} '
            f'(or set TORCH_HOME), or train from scratch with --pretrained=False') from None
    except RuntimeError as exc:
        raise UserError(f'the cached ImageNet weights for {weights} are damaged ({exc}); delete '
                        f'them from {torch.hub.get_dir()}/checkpoints and run again') from None
