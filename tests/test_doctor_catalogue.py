"""The doctor's fault catalogue: faults a reader of the book might write, each injected
through a seam train really uses (a Run field, the dataset's transforms or samples, an
option, the model) and none a mock. For each, the first FAIL must be the right check,
name the cause and give a fix; the test applies that fix to the same run and the check
then passes, and no other check FAILs. Harmless variants of standard code must pass
every check.

docs/doctor.md lists the same catalogue as a table."""
import random
import re
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from torchvision import transforms as T

import config
import doctor
from data.dataset import DogCat, collate_skipping_bad, default_transforms
from doctor.data_checks import label_from_name
from engine import builder
from engine.loop import train_step
from models import SmallResNet
from models.basic_module import IMAGENET_MEAN, IMAGENET_STD, kaiming_init


def make_run(options, **overrides):
    """The run train would build from these options, as the doctor examines it."""
    return doctor.examine(config.parse(dict(options, **overrides), verbose=False))


def put(run, target=None, **values):
    """Set fields of the run (or of one of its parts, e.g. run.val_data); the run."""
    for name, value in values.items():
        setattr(run if target is None else target, name, value)
    return run


def with_model(run, model):
    """The run with another model and, as train would build it, its optimizer."""
    run.model = model
    run.optimizer = builder.optimizer(run.opt, model)
    return run


def with_head(run, *layers):
    run.model.fc = nn.Sequential(*layers)
    return with_model(run, run.model)


def training_transforms(run, *steps):
    run.train_data.transforms = T.Compose([T.Resize(32), T.CenterCrop(32), *steps])
    return run


def proper_transforms(run, mode='train'):
    """What the builder gives a split: the model's own normalisation constants."""
    return default_transforms(mode, run.opt.image_size, run.model.input_mean, run.model.input_std)


def step_with(*, zero_grad='before', step_first=False, backward=True, clip=None,
              eval_mode=False, steps=1):
    """A training step (train_step's signature) with one thing changed."""
    def step(model, optimizer, criterion, images, targets, placement):
        if eval_mode:
            model.eval()
        scores = placement.forward(model, images)
        loss = criterion(scores, targets)
        if zero_grad == 'before':
            optimizer.zero_grad()
        for _ in range(steps if step_first else 0):
            optimizer.step()
        if backward:
            loss.backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        for _ in range(0 if step_first else steps):
            optimizer.step()
        if zero_grad == 'after':
            optimizer.zero_grad()
        return scores, loss.item()
    return step


def textbook_step(run, *_):
    return put(run, step=train_step)


# Models a reader might write --------------------------------------------------------

class DetachedSmallResNet(SmallResNet):
    def forward(self, x):
        return self.fc(self.avgpool(self.layers(self.stem(x))).flatten(1).detach())


class SoftmaxSmallResNet(SmallResNet):
    def forward(self, x):
        return torch.softmax(super().forward(x), dim=1)  # functional: no module to spot


class ConstantLabelDogCat(DogCat):
    def __getitem__(self, index):
        item = super().__getitem__(index)
        return item[0], 0  # the bug: a constant where the label belongs


def sorting_collate(batch):
    images, targets, skipped = collate_skipping_bad(batch)
    return images, targets.sort().values, skipped  # labels now apart from their images


def init_weights(run, init):
    for m in run.model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            init(m.weight)
    return run


def reinitialise(run, *_):
    kaiming_init(run.model)
    return run


def freeze_fc(run, frozen):
    run.model.fc.weight.requires_grad_(not frozen)
    return with_model(run, run.model)


def set_bn_momentum(run, momentum):
    for m in run.model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
    return run


def relabel_from_names(run, dataset):
    return put(run, dataset, samples=[(p, label_from_name(p)) for p, _ in dataset.samples])


def suggested_lr(first):
    return float(re.match(r'--lr=([0-9.e-]+)', first.fix).group(1))


# The catalogue -----------------------------------------------------------------------

@dataclass
class Fault:
    name: str
    check: str  # the check whose FAIL must come first
    cause: str  # what the first FAIL's evidence must say (regex)
    fix: str  # what its fix must say (regex)
    inject: Callable  # (run) -> the faulty run
    repair: Callable  # (run, first FAIL, make) -> the run with the printed fix applied
    options: dict = field(default_factory=dict)


FAULTS = [
    # the reference write-up's checklist
    Fault('sorted files, sampler without shuffling', 'shuffling', 'class order',
          r'shuffle=True', lambda r: put(r, r.train_loader.sampler, shuffle=False),
          lambda r, f, m: put(r, train_loader=builder.loader(r.opt, r.train_data, True))),
    Fault('last layer frozen by mistake', 'gradient flow', r'frozen.*fc\.weight',
          'requires_grad=False',
          lambda r: freeze_fc(r, True), lambda r, f, m: freeze_fc(r, False)),
    Fault('classifier left out of the optimizer', 'gradient flow',
          r'not in the optimizer: fc\.weight, fc\.bias', r'builder\.optimizer',
          lambda r: put(r, optimizer=torch.optim.Adam(
              [p for n, p in r.model.named_parameters() if not n.startswith('fc.')])),
          lambda r, f, m: with_model(r, r.model)),
    Fault('step without loss.backward()', 'gradient flow', 'no gradient at all',
          r'loss\.backward\(\)', lambda r: put(r, step=step_with(backward=False)),
          lambda r, f, m: textbook_step(r)),
    Fault('detached features in forward()', 'gradient flow', r'detached graph.*stem\.0\.weight',
          r'\.detach\(\)', lambda r: with_model(r, DetachedSmallResNet()),
          lambda r, f, m: with_model(r, SmallResNet())),
    Fault('raw 0-255 pixels', 'normalisation', 'raw 0-255', 'Normalize',
          lambda r: training_transforms(r, T.PILToTensor(), T.Lambda(lambda x: x.float())),
          lambda r, f, m: put(r, r.train_data, transforms=proper_transforms(r))),
    Fault('labels shuffled apart from their images', 'labels', 'train labels contradict',
          'file name', lambda r: shuffle_labels(r),
          lambda r, f, m: relabel_from_names(r, r.train_data)),
    Fault('softmax module after the logits', 'logits', r'Softmax \(fc\.1\)', 'raw scores',
          lambda r: with_head(r, r.model.fc, nn.Softmax(dim=1)),
          lambda r, f, m: with_head(r, r.model.fc[0])),
    Fault('all-zero initialisation', 'initialisation', r'stem\.0\.weight is all zero',
          'kaiming_init', lambda r: init_weights(r, nn.init.zeros_), reinitialise),
    Fault('learning rate far too high', 'learning rate', 'adam at lr 10', r'--lr=',
          lambda r: r, lambda r, f, m: m(lr=suggested_lr(f)), dict(lr=10.0)),
    # more of the same classes
    Fault('ReLU after the logits', 'logits', r'ReLU \(fc\.1\)', 'raw scores',
          lambda r: with_head(r, r.model.fc, nn.ReLU()),
          lambda r, f, m: with_head(r, r.model.fc[0])),
    Fault('functional softmax in forward()', 'logits', 'softmax of the last layer',
          'raw scores', lambda r: with_model(r, SoftmaxSmallResNet()),
          lambda r, f, m: with_model(r, SmallResNet())),
    Fault('all-positive initialisation', 'initialisation', 'is all positive', 'kaiming_init',
          lambda r: init_weights(r, lambda w: nn.init.uniform_(w, 0, 1.5)), reinitialise),
    Fault('learning rate far too low', 'learning rate', 'adam at lr 1e-07', r'--lr=',
          lambda r: r, lambda r, f, m: m(lr=suggested_lr(f)), dict(lr=1e-7)),
    # what train really uses
    Fault('plain DataLoader(shuffle=True): no set_epoch for fit()', 'shuffling',
          r'set_epoch.*RandomSampler lacks', 'build_loader',
          lambda r: put(r, train_loader=DataLoader(
              r.train_data, 16, shuffle=True, collate_fn=collate_skipping_bad)),
          lambda r, f, m: put(r, train_loader=builder.loader(r.opt, r.train_data, True))),
    Fault('optimizer built over another model instance', 'gradient flow',
          'not the model\'s.*another model instance', r'builder\.optimizer\(opt, run\.model\)',
          lambda r: put(r, optimizer=builder.optimizer(r.opt, SmallResNet())),
          lambda r, f, m: with_model(r, r.model)),
    Fault('class weight 0 in the loss', 'loss', 'ignores dogs', 'weight',
          lambda r: put(r, criterion=nn.CrossEntropyLoss(weight=torch.tensor([1., 0.]))),
          lambda r, f, m: put(r, criterion=nn.CrossEntropyLoss())),
    Fault('softmax inside the loss', 'loss', 'cannot fall below 0.31.*squashes',
          'CrossEntropyLoss', lambda r: put(r, criterion=lambda s, t: F.cross_entropy(
              s.softmax(1), t)),
          lambda r, f, m: put(r, criterion=nn.CrossEntropyLoss())),
    Fault('NLLLoss on raw scores', 'loss', 'goes negative.*NLLLoss', 'CrossEntropyLoss',
          lambda r: put(r, criterion=nn.NLLLoss()),
          lambda r, f, m: put(r, criterion=nn.CrossEntropyLoss())),
    Fault('targets inverted in the loss', 'loss', 'rewards predicting the wrong class',
          'CrossEntropyLoss', lambda r: put(r, criterion=lambda s, t: F.cross_entropy(
              s, 1 - t)),
          lambda r, f, m: put(r, criterion=nn.CrossEntropyLoss())),
    Fault('served labels differ from the listed ones', 'labels',
          r'train items served with another label.*__getitem__', '__getitem__',
          lambda r: put(r, r.train_data, __class__=ConstantLabelDogCat),
          lambda r, f, m: put(r, r.train_data, __class__=DogCat)),
    Fault('collate_fn that reorders the labels', 'labels', 'collate_fn', 'collate_fn',
          lambda r: put(r, train_loader=DataLoader(
              r.train_data, 16, sampler=r.train_loader.sampler, collate_fn=sorting_collate)),
          lambda r, f, m: put(r, train_loader=builder.loader(r.opt, r.train_data, True))),
    # the validation path
    Fault('validation images not normalised', 'validation',
          'val images are prepared differently.*no Normalize', r"default_transforms\('val'",
          lambda r: put(r, r.val_data, transforms=T.Compose(
              [T.Resize(32), T.CenterCrop(32), T.ToTensor()])),
          lambda r, f, m: put(r, r.val_data, transforms=proper_transforms(r, 'val'))),
    Fault('validation labels flipped', 'labels', 'val labels contradict', 'file name',
          lambda r: put(r, r.val_data, samples=[(p, 1 - t) for p, t in r.val_data.samples]),
          lambda r, f, m: relabel_from_names(r, r.val_data)),
    Fault('validation loader over the training split', 'validation',
          'validation loader serves 56/56 training images', r'loader\(opt, val_data',
          lambda r: put(r, val_loader=builder.loader(r.opt, r.train_data, False)),
          lambda r, f, m: put(r, val_loader=builder.loader(r.opt, r.val_data, False))),
    Fault('training files also in validation', 'labels', '5 files in both', 'split_train_val',
          lambda r: put(r, r.val_data, samples=r.val_data.samples + r.train_data.samples[:5]),
          lambda r, f, m: put(r, r.val_data, samples=r.val_data.samples[:-5])),
    # across and between steps
    Fault('no zero_grad(): gradients accumulate', 'training step', 'accumulate',
          r'zero_grad\(\)', lambda r: put(r, step=step_with(zero_grad=None)),
          textbook_step),
    Fault('gradients clipped to nothing (SGD)', 'training step',
          r'applies .*x the update.*scaled or clipped', 'max_norm',
          lambda r: put(r, step=step_with(clip=1e-6)), textbook_step,
          dict(optimizer='sgd', lr=0.01)),
    Fault('model.eval() inside the step', 'training step', 'ran in eval mode', r'model\.eval\(\)',
          lambda r: put(r, step=step_with(eval_mode=True)), textbook_step),
    Fault('BatchNorm momentum 0', 'training step', 'without updating their running statistics',
          'momentum', lambda r: set_bn_momentum(r, 0.0),
          lambda r, f, m: set_bn_momentum(r, 0.1)),
    Fault('optimizer.step() twice per batch', 'training step', 'ran 2 times', 'once per batch',
          lambda r: put(r, step=step_with(steps=2)), textbook_step),
    Fault('optimizer.step() before loss.backward()', 'gradient flow',
          r'no gradient at all when optimizer\.step\(\) runs', r'before optimizer\.step\(\)',
          lambda r: put(r, step=step_with(step_first=True)), textbook_step),
    # extreme regularisation
    Fault('huge weight decay', 'regularisation', 'weight decay 1 on all is extreme regularisation',
          '--weight_decay=1e-4', lambda r: r, lambda r, f, m: m(weight_decay=1e-4),
          dict(weight_decay=1.0)),
    Fault('dropout p=0.99', 'regularisation', r'Dropout drops nearly every feature: fc\.0 p=0\.99',
          'p=0.5', lambda r: with_head(r, nn.Dropout(0.99), r.model.fc),
          lambda r, f, m: put(r, r.model.fc[0], p=0.5)),
    Fault('label smoothing 0.9', 'loss', 'label_smoothing=0.9 is extreme regularisation',
          '--label_smoothing=0.1', lambda r: r, lambda r, f, m: m(label_smoothing=0.1),
          dict(label_smoothing=0.9)),
    # inputs
    Fault('augmentation erases the pictures', 'normalisation', 'carry no picture.*erased',
          'RandomErasing', lambda r: training_transforms(
              r, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
              T.RandomErasing(p=1, scale=(0.9, 0.95), ratio=(1, 1), value=0)),
          lambda r, f, m: put(r, r.train_data, transforms=proper_transforms(r))),
    Fault('0-255 mean/std on 0-1 tensors', 'normalisation', '0-255 scale applied to 0-1 tensors',
          'not 123.7', lambda r: training_transforms(
              r, T.ToTensor(), T.Normalize((123.7, 116.3, 103.5), (58.4, 57.1, 57.4))),
          lambda r, f, m: put(r, r.train_data, transforms=proper_transforms(r))),
    Fault('0-1 mean/std on 0-255 tensors', 'normalisation', 'normalised with 0-1 constants',
          'scale pixels to 0-1', lambda r: training_transforms(
              r, T.PILToTensor(), T.Lambda(lambda x: x.float()),
              T.Normalize(IMAGENET_MEAN, IMAGENET_STD)),
          lambda r, f, m: put(r, r.train_data, transforms=proper_transforms(r))),
]


def shuffle_labels(run):
    labels = [label for _, label in run.train_data.samples]
    random.Random(0).shuffle(labels)
    run.train_data.samples = [(p, label) for (p, _), label in zip(run.train_data.samples, labels)]
    return run


def lines(results):
    return '\n'.join(r.line() for r in results)


def test_the_catalogue_is_large_enough():
    assert len(FAULTS) >= 24 and len({f.name for f in FAULTS}) == len(FAULTS)
    assert len(HARMLESS) >= 6
    assert {f.check for f in FAULTS} == set(doctor.CHECKS) - {'overfit batch'}


@pytest.mark.parametrize('fault', FAULTS, ids=[f.name for f in FAULTS])
def test_first_fail_names_the_cause_and_its_fix_works(fast_options, fault):
    def make(**overrides):
        return make_run(fast_options, **overrides)

    only = doctor.CHECKS[:doctor.CHECKS.index(fault.check) + 1]
    run = fault.inject(make(**fault.options))
    results = doctor.run_checks(run, only=only)
    first = next((r for r in results if r.status == doctor.FAIL), None)
    assert first is not None and first.name == fault.check, lines(results)
    assert re.search(fault.cause, first.evidence), first.line()
    assert re.search(fault.fix, first.fix), first.line()
    # the fix alone makes the whole doctor pass: nothing else was wrong
    again = {r.name: r for r in doctor.run_checks(fault.repair(run, first, make))}
    assert doctor.FAIL not in {r.status for r in again.values()}, lines(again.values())
    assert again[fault.check].status == doctor.PASS, again[fault.check].line()


# Harmless variants of standard code --------------------------------------------------

def pre_shuffled_without_sampler_shuffle(run):
    random.Random(0).shuffle(run.train_data.samples)
    run.train_loader.sampler.shuffle = False  # a fixed but random order: fine
    return run


def zero_last_bn_gamma(run):
    for block in run.model.layers:
        nn.init.zeros_(block.bn2.weight)  # the residual-block trick of Goyal et al.
    return run


def softmax_then_log_nll(run):
    with_head(run, run.model.fc, nn.Softmax(dim=1))
    run.criterion = lambda probabilities, targets: F.nll_loss(torch.log(probabilities), targets)
    return run


HARMLESS = {
    'log_softmax output into CrossEntropyLoss':
        (lambda r: with_head(r, r.model.fc, nn.LogSoftmax(dim=1)), {}),
    'LogSoftmax + NLLLoss (the book\'s style)':
        (lambda r: put(with_head(r, r.model.fc, nn.LogSoftmax(dim=1)), criterion=nn.NLLLoss()),
         {}),
    'softmax output + NLLLoss of its log': (softmax_then_log_nll, {}),
    'zero-initialised last BatchNorm scale in each residual block': (zero_last_bn_gamma, {}),
    'zero_grad() after optimizer.step()':
        (lambda r: put(r, step=step_with(zero_grad='after')), {}),
    'gradient clipping at max_norm=1 with SGD':
        (lambda r: put(r, step=step_with(clip=1.0)), dict(optimizer='sgd', lr=0.01)),
    'dropout 0.5 before the classifier': (lambda r: with_head(r, nn.Dropout(0.5), r.model.fc), {}),
    'AdamW, weight decay 0.05, label smoothing 0.1 (the CPU recipe)':
        (lambda r: r, dict(optimizer='adamw', lr=2e-3, weight_decay=0.05, label_smoothing=0.1)),
    'SGD with momentum and weight decay 5e-4':
        (lambda r: r, dict(optimizer='sgd', lr=0.01, weight_decay=5e-4)),
    'RandomErasing(p=0.5) after normalising':
        (lambda r: put(r, r.train_data, transforms=T.Compose(
            [proper_transforms(r), T.RandomErasing(p=0.5)])), {}),
    'validation resized to 1.14x then centre-cropped':
        (lambda r: put(r, r.val_data, transforms=T.Compose(
            [T.Resize(37), T.CenterCrop(32), T.ToTensor(),
             T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])), {}),
    'samples shuffled once, sampler in order': (pre_shuffled_without_sampler_shuffle, {}),
    'partial fine-tune: ResNet18 with its last 2 blocks unfrozen, flips only':
        (lambda r: r, dict(model='ResNet18', pretrained=False, unfreeze=2, augment='flip')),
}


@pytest.mark.parametrize('name', list(HARMLESS))
def test_harmless_variant_passes_every_check(fast_options, name):
    change, options = HARMLESS[name]
    results = doctor.run_checks(change(make_run(fast_options, **options)))
    assert [r.status for r in results] == [doctor.PASS] * len(doctor.CHECKS), lines(results)
