import os
import time
import warnings

import torch
from torch import nn

from utils.checkpoint import CheckpointError, atomic_save, checked_temperature, read_checkpoint
from utils.errors import UserError

# The normalisation ImageNet-trained networks expect; the dataset transforms read
# each model's input_mean/input_std.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_state_dict_checked(module, state_dict, source, name):
    """load_state_dict that fails with the mismatching keys and shapes spelt out."""
    own = module.state_dict()
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
        raise CheckpointError(f'{source!r} does not fit {name}: '
                              + '; '.join(p for p in parts if p))
    module.load_state_dict(state_dict)


def divide_by_temperature(module, inputs, logits):
    return logits if module.temperature == 1 else logits / module.temperature


def kaiming_init(module):
    """He et al. (2015) initialisation, the cure for most stuck-at-50% runs.

    PyTorch's default init scales convolutions for linear activations; behind ReLUs
    the signal shrinks layer by layer. Kaiming normal (fan_out, ReLU) keeps it alive.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            # fan_out of a grouped (depthwise) conv is out_channels / groups * k * k;
            # kaiming_normal_ would count every output channel and start it far too small.
            fan_out = m.out_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
            nn.init.normal_(m.weight, 0, (2.0 / fan_out) ** 0.5)
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


def pytorch_default_init(module):
    """Every layer re-initialised by its own reset_parameters(): PyTorch's defaults, the
    initialisation the write-up's stuck-at-50% runs started from."""
    for m in module.modules():
        if m is not module and hasattr(m, 'reset_parameters'):
            m.reset_parameters()


class BasicModule(nn.Module):
    """nn.Module with save/load of checkpoints and an optimizer factory."""

    # Input normalisation the network expects; the dataset transforms read these.
    input_mean = IMAGENET_MEAN
    input_std = IMAGENET_STD

    def __init__(self):
        super().__init__()
        self.model_name = type(self).__name__
        self.frozen = False  # --freeze: the backbone is fixed, but for the `unfrozen` blocks
        self.unfrozen, self.unfrozen_on = [], False
        # Logits are divided by this (temperature scaling, engine/calibration.py): 1 while
        # training; after training, fitted on the validation split and saved with the weights.
        self.temperature = 1.0
        self.register_forward_hook(divide_by_temperature)

    def save(self, name=None, extra=None, config=None, checkpoint_dir='checkpoints'):
        """Write {model_name, state_dict, config, **extra} atomically; return the path.

        Default name: checkpoints/<model>_<timestamp>.pth.
        """
        if name is None:
            name = os.path.join(checkpoint_dir,
                                f'{self.model_name}_{time.strftime("%Y%m%d_%H%M%S")}.pth')
        checkpoint = {'model_name': self.model_name, 'state_dict': self.state_dict(),
                      'temperature': self.temperature, 'config': dict(config or {}),
                      **(extra or {})}
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
        self.temperature = checked_temperature(checkpoint.get('temperature', 1.0), path)
        return checkpoint

    def load_state_dict_checked(self, state_dict, source):
        load_state_dict_checked(self, state_dict, source, self.model_name)

    def head(self):
        """The freshly initialised classifier of a pretrained model; None for the others.
        It must be the last step of forward(): the feature cache feeds it the backbone's
        output directly."""
        return None

    def stages(self):
        """(stem, blocks, tail) with tail(blocks[-1](...blocks[0](stem(x)))) == forward(x),
        tail ending in head(): the blocks --unfreeze=N trains the last N of. None for a
        model that does not list them."""
        return None

    def forward_to(self, index, x):
        """The activations at the input of stages()'s blocks[index]."""
        stem, blocks, _ = self.stages()
        x = stem(x)
        for block in blocks[:index]:
            x = block(x)
        return x

    def forward_from(self, index, x):
        """forward() from the input of blocks[index] on (what forward_to returned)."""
        _, blocks, tail = self.stages()
        for block in blocks[index:]:
            x = block(x)
        return tail(x)

    def freeze_backbone(self, unfreeze=0):
        """Train the classifier only, plus with `unfreeze` the last N blocks of stages()
        (an int), or every layer ('all'). The unfrozen part joins when
        train_unfrozen(True) is called (the default), so a run can train the head alone
        first (--head_epochs)."""
        if self.head() is None:
            option = '--unfreeze' if unfreeze else '--freeze=True'
            raise UserError(f'{option} needs a model with a pretrained backbone; '
                            f'{self.model_name} trains from scratch (drop {option})')
        self.unfrozen = (list(self.children()) if unfreeze == 'all'
                         else self.last_blocks(int(unfreeze)))
        self.frozen = True
        return self.train_unfrozen(True)

    def last_blocks(self, count):
        if not count:
            return []
        stages = self.stages()
        if stages is None:
            raise UserError(f'--unfreeze=N is not available for {self.model_name}: use '
                            f'--unfreeze=all, or one of ResNet18, ResNet34Pretrained, '
                            f'MobileNetV2, EfficientNetLite0/1/2')
        blocks = stages[1]
        if count > len(blocks):
            raise UserError(f'--unfreeze={count}: {self.model_name} has {len(blocks)} blocks; '
                            f'pass 1 to {len(blocks)}, or all')
        return blocks[-count:]

    def train_unfrozen(self, on):
        """Let the unfrozen blocks train (on) or keep them fixed with the rest of the
        backbone; returns self. Only the head's parameters train while off."""
        head_ids = {id(p) for p in self.head().parameters()}
        unfrozen_ids = {id(p) for m in self.unfrozen for p in m.parameters()} if on else set()
        for p in self.parameters():
            p.requires_grad_(id(p) in head_ids or id(p) in unfrozen_ids)
        self.unfrozen_on = on
        return self.train(self.training)

    def trainable_parameters(self):
        """What the optimizer holds: with --freeze the head and the unfrozen blocks
        (whether or not they have joined yet), else every parameter that requires grad."""
        if not self.frozen:
            return [p for p in self.parameters() if p.requires_grad]
        wanted = {id(p) for m in [self.head(), *self.unfrozen] for p in m.parameters()}
        return [p for p in self.parameters() if id(p) in wanted]

    def train(self, mode=True):
        super().train(mode)
        if self.frozen:
            # A frozen backbone is a fixed feature extractor: its BatchNorm running
            # statistics and dropout stay in inference mode too; only the head (and the
            # unfrozen blocks, once they have joined) train.
            super().train(False)
            for module in [self.head(), *(self.unfrozen if self.unfrozen_on else [])]:
                module.train(mode)
        return self

    def parameter_groups(self, backbone_lr=None, classifier_lr=None):
        """Named groups of trainable parameters: one for a from-scratch model; backbone
        and classifier for a pretrained one, each with its own 'lr' when given. A group
        left empty by freezing is dropped."""
        trainable = self.trainable_parameters()
        if self.head() is None:
            return [{'name': 'all', 'params': trainable}]
        head_ids = {id(p) for p in self.head().parameters()}
        groups = [{'name': 'backbone', 'lr': backbone_lr,
                   'params': [p for p in trainable if id(p) not in head_ids]},
                  {'name': 'classifier', 'lr': classifier_lr,
                   'params': [p for p in trainable if id(p) in head_ids]}]
        for group in groups:
            if group['lr'] is None:
                del group['lr']
        return [g for g in groups if g['params']]

    def get_optimizer(self, lr, weight_decay, optimizer='adam', momentum=0.9,
                      backbone_lr=None, classifier_lr=None):
        """Adam or SGD over parameter_groups(); a group without its own lr gets `lr`."""
        if self.head() is None and (backbone_lr is not None or classifier_lr is not None):
            warnings.warn(f'{self.model_name} has a single parameter group: --backbone_lr and '
                          f'--classifier_lr are ignored, --lr={lr} applies')
        groups = self.parameter_groups(backbone_lr, classifier_lr)
        for group in groups:
            group.setdefault('lr', lr)
        if optimizer == 'sgd':
            return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
        if optimizer == 'adam':
            return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)
        if optimizer == 'adamw':
            return torch.optim.AdamW(without_decay_on_norms(groups, weight_decay), lr=lr,
                                     weight_decay=weight_decay)
        raise UserError(f'--optimizer must be adam, sgd or adamw, not {optimizer!r}')


def without_decay_on_norms(groups, weight_decay):
    """Split each group: weights decay, biases and norm scales (1-d tensors) do not;
    shrinking a BatchNorm scale towards 0 only hurts."""
    split = []
    for group in groups:
        for suffix, decay, params in (('', weight_decay, [p for p in group['params'] if p.ndim > 1]),
                                      ('_no_decay', 0.0, [p for p in group['params'] if p.ndim <= 1])):
            if params:
                split.append(dict(group, name=group['name'] + suffix, params=params,
                                  weight_decay=decay))
    return split


def read_weights(path):
    """The state dict in a --weights file: a bare one, or a checkpoint holding one."""
    if not os.path.isfile(path):
        raise CheckpointError(f'--weights={path!r}: no such file; pass the path of an ImageNet '
                              f'state dict (.pth) saved with torch.save')
    state_dict = read_checkpoint(path)
    if isinstance(state_dict, dict) and isinstance(state_dict.get('state_dict'), dict):
        state_dict = state_dict['state_dict']
    if not (isinstance(state_dict, dict) and state_dict
            and all(torch.is_tensor(v) for v in state_dict.values())):
        raise CheckpointError(f'--weights={path!r} is not a state dict (a dict of tensors)')
    return state_dict


def torchvision_backbone(builder, weights, pretrained, weights_path=None):
    """Build a torchvision model, with ImageNet `weights` when `pretrained`.

    The weights come from `weights_path` (--weights, a local copy of the state dict)
    when given, else through torchvision's weights API: downloaded once into the
    torch hub cache (torch.hub.get_dir()/checkpoints), read from there afterwards.
    """
    if not pretrained:
        if weights_path:
            raise UserError('--weights loads ImageNet weights: drop it, or drop --pretrained=False')
        model = builder(weights=None)
        kaiming_init(model)
        return model
    if weights_path:
        model = builder(weights=None)
        load_state_dict_checked(model, read_weights(weights_path), weights_path,
                                f'torchvision {builder.__name__} (--weights must hold its ImageNet state dict)')
        return model
    try:
        return builder(weights=weights)
    except OSError as exc:  # URLError (offline) is an OSError too
        cached = os.path.join(torch.hub.get_dir(), 'checkpoints', os.path.basename(weights.url))
        raise UserError(
            f'could not load the ImageNet weights {weights.url} ({exc}). On a machine without '
            f'internet, download that file elsewhere and pass --weights=PATH, or put it at '
            f'{cached} (or set TORCH_HOME), or train from scratch with --pretrained=False') from None
    except RuntimeError as exc:
        raise UserError(f'the cached ImageNet weights for {weights} are damaged ({exc}); delete '
                        f'them from {torch.hub.get_dir()}/checkpoints and run again') from None
