"""The 50% doctor: the reference write-up's stuck-at-50% checklist, run automatically.

Each check is a short function that examines the objects train builds (loader,
datasets, model, optimizer, the training step itself) and returns a Result with a
status (PASS / WARN / FAIL), the measured evidence and, when not PASS, the fix.
build_setup() makes those objects from the options through train's own factories;
tests hand the checks faulty ones instead. collapse_warning() is the alarm train
raises after each validation pass.
"""
import copy
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn
from torchvision.transforms.functional import to_pil_image
from torchvision.utils import make_grid

from data.dataset import CLASSES, LABELLED_NAME, Skipped, SkippedFiles, build_loader
from models import build_model
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


@dataclass
class Setup:
    """The objects train works with; a test replaces one of them with a faulty one."""
    model: nn.Module
    optimizer: torch.optim.Optimizer
    criterion: nn.Module
    train_loader: object
    train_data: object
    val_data: object
    step: Callable  # step(model, optimizer, criterion, images, targets) -> loss before the update
    opt: object  # the parsed DefaultConfig
    out_dir: str = '.'  # where the PNGs go
    vis: object = None  # a Visualizer talking to a live server, or None


def build_setup(opt, load_datasets, train_one_epoch):
    """Model, datasets, loader, optimizer and training step exactly as `train` makes them
    (main.py passes its load_datasets and train_one_epoch)."""
    torch.manual_seed(opt.seed)
    model = build_model(opt.model, opt.pretrained, weights=opt.weights,
                        freeze=opt.freeze).to(opt.device)
    if opt.load_model_path:
        model.load(opt.load_model_path)
    train_data, val_data = load_datasets(opt, model)
    loader = build_loader(train_data, opt.batch_size, True, opt.num_workers, opt.use_gpu, opt.seed)
    optimizer = model.get_optimizer(opt.lr, opt.weight_decay, opt.optimizer, opt.momentum,
                                    opt.backbone_lr, opt.classifier_lr)

    def step(model, optimizer, criterion, images, targets):
        # one batch through train's own epoch loop: zero_grad, forward, backward, step
        try:
            meter = train_one_epoch(model, [(images, targets, [])], criterion, optimizer, opt, 0,
                                    SkippedFiles(), None)
        except UserError:  # train stops on a NaN/inf loss before stepping: for a check, a finding
            return math.nan
        return meter.mean_loss

    return Setup(model, optimizer, nn.CrossEntropyLoss(), loader, train_data, val_data, step, opt,
                 out_dir=os.path.join(opt.checkpoint_dir, 'doctor'), vis=live_visualizer(opt))


def live_visualizer(opt):
    """A Visualizer when --vis=True and a Visdom server answers; else None (PNGs only)."""
    if not opt.vis:
        return None
    from utils.visdom_server import page_answers
    from utils.visualize import Visualizer
    host = urlparse(opt.vis_server if '://' in opt.vis_server else f'http://{opt.vis_server}').hostname
    if not page_answers(opt.vis_port, host or 'localhost'):
        return None
    return Visualizer(env=opt.env, port=opt.vis_port, server=opt.vis_server, log_warnings=False)


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


# 1. Shuffling -----------------------------------------------------------------------

def binomial_tail(n, k, p):
    """P(X >= k) for X ~ Binomial(n, p)."""
    return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k, n + 1))


def check_shuffling(batches, dataset_labels):
    """Single-class batches among the first ones, against what random sampling gives."""
    share = float(np.mean(dataset_labels))  # share of dogs in the whole training set
    sizes = [len(t) for _, t in batches]
    dog_shares = [float(t.float().mean()) for _, t in batches]
    single = sum(s in (0.0, 1.0) for s in dog_shares)
    expected = [share ** b + (1 - share) ** b for b in sizes]
    p_single = float(np.mean(expected))
    # how likely this many single-class batches are under random sampling
    chance = binomial_tail(len(batches), single, p_single) if single else 1.0
    # spread of the per-batch class mix against the binomial spread (1 when random)
    dispersion = float(np.mean([(d - share) ** 2 * b / max(share * (1 - share), 1e-9)
                                for d, b in zip(dog_shares, sizes)]))
    evidence = (f'first {len(batches)} batches: {single} single-class (random sampling: '
                f'{p_single * len(batches):.2g} expected, chance {chance:.1e}); dog share per '
                f'batch {" ".join(f"{d:.2f}" for d in dog_shares)} (data set {share:.2f})')
    data = dict(single=single, expected=p_single * len(batches), chance=chance,
                dispersion=dispersion)
    fix = ('shuffle the training data: build_loader(train_data, ..., shuffle=True) as train '
           'does (DataLoader(shuffle=True) or a RandomSampler); sorted files give batches of one class')
    if single and chance < 1e-3:
        return Result('shuffling', FAIL, evidence, fix, data)
    if len(batches) >= 4 and dispersion > 5:
        return Result('shuffling', WARN, evidence + f'; class mix {dispersion:.1f}x more uneven '
                      f'than random', fix, data)
    return Result('shuffling', PASS, evidence, data=data)


# 2. Gradient flow --------------------------------------------------------------------

def check_gradient_flow(model, optimizer, criterion, step, images, targets):
    """One real training step: every trainable parameter must get a finite, non-zero
    gradient and change; none may be frozen by mistake or missing from the optimizer."""
    model, optimizer = copy_training(model, optimizer)
    params = dict(model.named_parameters())
    head = model.head() if hasattr(model, 'head') else None
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    # --freeze: a frozen pretrained backbone is the intent, a frozen classifier never is
    meant_frozen = getattr(model, 'frozen', False)
    frozen = [n for n, p in params.items() if not p.requires_grad]
    wrongly_frozen = [n for n in frozen if not meant_frozen or id(params[n]) in head_ids]
    trainable = {n: p for n, p in params.items() if p.requires_grad}
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g['params']}
    missing = [n for n, p in trainable.items() if id(p) not in in_optimizer]

    before = {n: p.detach().clone() for n, p in trainable.items()}
    for p in params.values():
        p.grad = None
    step_loss = step(model, optimizer, criterion, images, targets)
    no_grad = [n for n, p in trainable.items() if p.grad is None]
    cut_off = []
    if no_grad:  # tell a detached graph (the loss does not reach them) from a missing backward()
        model.train()
        loss = criterion(model(images), targets)
        reach = (torch.autograd.grad(loss, [trainable[n] for n in no_grad], allow_unused=True)
                 if loss.requires_grad else [None] * len(no_grad))
        cut_off = [n for n, g in zip(no_grad, reach) if g is None]
        no_grad = [n for n in no_grad if n not in cut_off]
    grads = {n: p.grad for n, p in trainable.items() if p.grad is not None}
    not_finite = [n for n, g in grads.items() if not torch.isfinite(g).all()]
    zero = [n for n, g in grads.items() if n not in not_finite and not g.any()]
    unchanged = [n for n, p in trainable.items()
                 if id(p) in in_optimizer and torch.equal(p.detach(), before[n])]
    norms = [float(g.norm()) for n, g in grads.items() if n not in not_finite]

    def few(names):
        return ', '.join(names[:3]) + (f' (+{len(names) - 3} more)' if len(names) > 3 else '')

    problems, fixes = [], []
    if wrongly_frozen:
        problems.append(f'{len(wrongly_frozen)} frozen (requires_grad=False): {few(wrongly_frozen)}')
        fixes.append('do not set requires_grad=False on parameters that should learn '
                     '(only --freeze fixes a pretrained backbone)')
    if missing:
        problems.append(f'{len(missing)} trainable but not in the optimizer: {few(missing)}')
        fixes.append('build the optimizer from all trainable parameters: '
                     'model.get_optimizer(...) (parameter_groups()) as train does')
    if cut_off:
        problems.append(f'{len(cut_off)} the loss does not depend on (detached graph): {few(cut_off)}')
        fixes.append('remove .detach(), .data, .item()/.numpy() round trips and torch.no_grad() '
                     'from the forward pass')
    if no_grad and not grads:
        problems.append('no gradient at all after the training step')
        fixes.append('call loss.backward() in the training step, before optimizer.step()')
    elif no_grad:
        problems.append(f'{len(no_grad)} without gradient: {few(no_grad)}')
        fixes.append('check that every parameter is used in forward()')
    if not_finite:
        problems.append(f'{len(not_finite)} with NaN/inf gradients: {few(not_finite)}')
        fixes.append('look for log(0), division by zero or a far too high --lr')
    if zero:
        problems.append(f'{len(zero)} with all-zero gradients: {few(zero)}')
        fixes.append('a dead path (zero weights, ReLU after the logits, all-dead ReLUs) blocks '
                     'the gradient; see the initialisation and logits checks')
    changed_expected = [n for n in unchanged if n in grads and n not in zero]
    if changed_expected:
        problems.append(f'{len(changed_expected)} unchanged by the step although they have '
                        f'gradients: {few(changed_expected)}')
        fixes.append('call optimizer.step() after loss.backward(), with an --lr that is not 0 '
                      'or vanishingly small')
    evidence = (f'one step on {len(targets)} images, loss {step_loss:.4f}: {len(trainable)} trainable '
                f'tensors, gradient norms {min(norms, default=0):.2g}..{max(norms, default=0):.2g}, '
                f'{len(trainable) - len(unchanged)} changed by the step'
                + (f', {len(frozen)} frozen by --freeze' if frozen and not wrongly_frozen else ''))
    data = dict(frozen=wrongly_frozen, missing=missing, cut_off=cut_off, no_grad=no_grad,
                not_finite=not_finite, zero=zero, unchanged=unchanged)
    if problems:
        return Result('gradient flow', FAIL, evidence + '; ' + '; '.join(problems),
                      '; '.join(fixes), data)
    return Result('gradient flow', PASS, evidence, data=data)


# 3. Input normalisation -----------------------------------------------------------

def check_normalisation(batches):
    """Per-channel statistics of what the loader feeds the model."""
    x = torch.cat([images for images, _ in batches]).float()
    per_channel = x.transpose(0, 1).reshape(x.size(1), -1)
    mean, std = per_channel.mean(1), per_channel.std(1)
    lo, hi = float(x.min()), float(x.max())
    evidence = (f'{len(x)} images: mean per channel {fmt(mean)}, std {fmt(std)}, '
                f'range [{lo:.3g}, {hi:.3g}]')
    data = dict(mean=mean.tolist(), std=std.tolist(), min=lo, max=hi)
    normalize = ('T.ToTensor() then T.Normalize(mean=model.input_mean, std=model.input_std), '
                 'as data.dataset.default_transforms does')
    if not torch.isfinite(x).all():
        return Result('normalisation', FAIL, evidence + '; NaN/inf in the input',
                      'find the transform that produces NaN (e.g. division by a zero std)', data)
    if lo >= 0 and hi > 2:
        return Result('normalisation', FAIL, evidence + '; looks like raw 0-255 pixels',
                      f'scale and normalise the images: {normalize}', data)
    if lo >= 0 and hi <= 1:
        return Result('normalisation', WARN, evidence + '; [0, 1] pixels, not normalised',
                      f'add the normalisation: {normalize}', data)
    if std.min() < 0.05:
        return Result('normalisation', WARN, evidence + '; a channel is nearly constant',
                      'check the images and transforms (blank or one-colour inputs?)', data)
    if mean.abs().max() > 1.5 or std.max() > 4 or std.min() < 0.2:
        return Result('normalisation', WARN, evidence + '; far from zero mean and unit std',
                      f'use the mean/std the model expects: {normalize}', data)
    return Result('normalisation', PASS, evidence, data=data)


def fmt(values):
    return '(' + ', '.join(f'{v:.2f}' for v in values.tolist()) + ')'


# 4. Labels --------------------------------------------------------------------------

def label_from_name(path):
    """The label a file's folder (cat/, dog/) or name (cat.N.jpg) implies, else None."""
    folder = os.path.basename(os.path.dirname(path)).lower()
    if folder in CLASSES:
        return CLASSES.index(folder)
    match = LABELLED_NAME.match(os.path.basename(path))
    return CLASSES.index(match.group(1).lower()) if match else None


def dataset_labels(dataset):
    return [target for _, target in dataset.samples]


def check_labels(train_data, val_data, batches, out_dir, vis=None, spot_checks=8):
    """Class balance, labels against file names, train/val overlap, and a labelled grid."""
    problems, fixes, warnings_ = [], [], []
    parts = []
    for split, dataset in (('train', train_data), ('val', val_data)):
        counts = np.bincount(dataset_labels(dataset), minlength=len(CLASSES))
        parts.append(f'{split} {counts[0]} cats/{counts[1]} dogs')
        share = counts.min() / max(counts.sum(), 1)
        if counts.min() == 0:
            problems.append(f'no {CLASSES[int(counts.argmin())]} in {split}')
            fixes.append('put images of both classes in --train_data_root')
        elif share < 0.3:
            warnings_.append(f'{split} is unbalanced ({share:.0%} minority)')
            fixes.append('balance the classes, or judge by the confusion matrix, not accuracy')

    named = [(p, t, label_from_name(p)) for p, t in train_data.samples + val_data.samples]
    named = [(p, t, n) for p, t, n in named if n is not None]
    wrong = [(p, t) for p, t, n in named if t != n]
    parts.append(f'{len(named) - len(wrong)}/{len(named)} labels agree with the file names')
    if wrong:
        examples = ', '.join(f'{os.path.basename(p)}->{CLASSES[t]}' for p, t in wrong[:3])
        problems.append(f'{len(wrong)} labels contradict the file name/folder ({examples})')
        fixes.append('derive the label from the file name or folder as data.dataset does '
                      '(label 0 = cat, 1 = dog) and never shuffle labels apart from their images')
    # what __getitem__ returns must be the listed label (no target transform in between)
    indices = np.linspace(0, len(train_data) - 1, min(spot_checks, len(train_data))).astype(int)
    served = [(i, train_data[int(i)]) for i in indices]
    differ = [i for i, item in served
              if not isinstance(item, Skipped) and item[1] != train_data.samples[i][1]]
    if differ:
        problems.append(f'{len(differ)}/{len(served)} items served with another label than listed')
        fixes.append('DogCat.__getitem__ must return the label of samples[index]')

    overlap = ({os.path.realpath(p) for p, _ in train_data.samples}
               & {os.path.realpath(p) for p, _ in val_data.samples})
    parts.append(f'{len(overlap)} files in both train and val')
    if overlap:
        problems.append(f'{len(overlap)} files in both train and val (e.g. {sorted(overlap)[0]})')
        fixes.append('split with data.dataset.split_train_val (disjoint, seeded) and the same '
                     '--seed and --val_ratio for both splits')

    images, targets = batches[0]
    where = show_labelled_grid(images[:32], targets[:32], out_dir, vis)
    parts.append(f'labelled samples: {where}')
    evidence = '; '.join(parts + problems + warnings_)
    data = dict(wrong=len(wrong), overlap=len(overlap), differ=len(differ), grid=where)
    if problems:
        return Result('labels', FAIL, evidence, '; '.join(fixes), data)
    if warnings_:
        return Result('labels', WARN, evidence, '; '.join(fixes), data)
    return Result('labels', PASS, evidence, data=data)


def displayable(images):
    """Images back in [0, 1] for a person to look at, whatever scale they arrived in."""
    x = images.detach().float().cpu()
    if x.min() < 0:  # normalised: undo it per image, enough to see the content
        lo = x.amin((1, 2, 3), keepdim=True)
        hi = x.amax((1, 2, 3), keepdim=True)
        return (x - lo) / (hi - lo).clamp_min(1e-6)
    return (x / 255 if x.max() > 2 else x).clamp(0, 1)


def show_labelled_grid(images, targets, out_dir, vis=None, nrow=8):
    """Visdom when it runs, else a PNG with each image's label written on it; returns where."""
    captions = [CLASSES[t] for t in targets.tolist()]
    x = displayable(images)
    if vis is not None:
        vis.img_grid('doctor: labelled training samples', x, captions, nrow=nrow)
        return f'Visdom env {vis.env!r}'
    grid = to_pil_image(make_grid(x, nrow=nrow, padding=2))
    draw = ImageDraw.Draw(grid)
    side = x.size(-1) + 2
    for i, caption in enumerate(captions):
        left, top = (i % nrow) * side + 3, (i // nrow) * side + 3
        draw.rectangle([left, top, left + 6 * len(caption) + 2, top + 11], fill='black')
        draw.text((left + 1, top), caption, fill='yellow')
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, 'labelled_samples.png')
    grid.save(path)
    return path


# 5. Logits --------------------------------------------------------------------------

@torch.no_grad()
def check_logits(model, images):
    """The model must end in raw scores: nothing squashing or normalising them after the
    last Linear/Conv layer, and outputs that vary with the input."""
    model = copy.deepcopy(model).train()  # the scores CrossEntropyLoss gets in training
    calls, last = [], {}

    def record(name):
        def hook(module, inputs, output):
            calls.append((name, module))
            if isinstance(module, WEIGHTED):  # keep a copy: an in-place ReLU may follow
                last.update(name=name, output=output.detach().float().clone())
        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in model.named_modules()
             if not list(m.children())]
    try:
        out = model(images).detach().float()
    finally:
        for h in hooks:
            h.remove()
    head = last.get('name')
    after_head = calls[max(i for i, (n, _) in enumerate(calls) if n == head) + 1:] if head else []
    culprits = [f'{type(m).__name__} ({n})' for n, m in after_head if isinstance(m, ACTIVATIONS + NORMS)]
    spread = (out - out.mean(1, keepdim=True)).std(0).max().item() if len(out) > 1 else math.nan
    row_sums = out.sum(1)
    zeros = float((out == 0).float().mean())
    evidence = (f'last layer {head}; outputs in [{out.min():.3g}, {out.max():.3g}], '
                f'{float((out >= 0).float().mean()):.0%} >= 0, {zeros:.0%} exactly 0, row sums '
                f'{row_sums.min():.3g}..{row_sums.max():.3g}, spread across inputs {spread:.2g}')
    data = dict(head=head, culprits=culprits, spread=spread)
    fix = ('return the raw scores of the last Linear/Conv layer: CrossEntropyLoss applies '
           'log-softmax itself (softmax only for reporting probabilities, as test does)')
    if culprits:
        return Result('logits', FAIL, evidence + f'; after the last layer: {", ".join(culprits)}',
                      fix, data)
    if head is not None and last['output'].shape == out.shape and not torch.allclose(
            out, last['output'], rtol=1e-4, atol=1e-6):
        name = next((name for name, f in (('relu', torch.relu), ('sigmoid', torch.sigmoid),
                                          ('softmax', lambda t: torch.softmax(t, 1)),
                                          ('tanh', torch.tanh))
                     if torch.allclose(out, f(last['output']), rtol=1e-4, atol=1e-6)), None)
        what = f'{name} of' if name else 'not'
        return Result('logits', FAIL, evidence + f'; the output is {what} the last layer\'s output',
                      fix, data)
    if out.min() >= 0 and torch.allclose(row_sums, torch.ones_like(row_sums), atol=1e-4):
        return Result('logits', FAIL, evidence + '; rows sum to 1: softmax probabilities', fix, data)
    if out.min() >= 0 and zeros > 0:
        return Result('logits', FAIL, evidence + '; clipped at 0 (ReLU-like)', fix, data)
    if spread < 1e-6:
        return Result('logits', FAIL, evidence + '; the same output for every input',
                      'the input does not reach the output: see the initialisation and '
                      'gradient checks (zero weights, dead layers, detached graph)', data)
    return Result('logits', PASS, evidence, data=data)


# 6. Initialisation ------------------------------------------------------------------

@torch.no_grad()
def check_initialisation(model, images):
    """Per-layer activation statistics and dead-ReLU share on one batch, plus degenerate
    weights, with the model as training would start it."""
    model = copy.deepcopy(model).train()  # BatchNorm as the first training step sees it
    stats = []  # (name, kind, mean, std, dead channel share or None)

    def record(name):
        def hook(module, inputs, output):
            y = output.detach().float()
            dead = None
            if isinstance(module, RELUS) and y.dim() >= 2:  # channels silent for every input
                dead = float((y.transpose(0, 1).reshape(y.size(1), -1).amax(1) <= 0).float().mean())
            stats.append((name, type(module).__name__, float(y.mean()), float(y.std()), dead))
        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in model.named_modules()
             if isinstance(m, WEIGHTED + RELUS)]
    try:
        model(images)
    finally:
        for h in hooks:
            h.remove()
    problems, warnings_ = [], []
    for name, module in model.named_modules():
        if isinstance(module, WEIGHTED) and module.weight.numel() > 1:
            w = module.weight.detach()
            if not w.any():
                problems.append(f'{name}.weight is all zero')
            elif float(w.std()) == 0:
                problems.append(f'{name}.weight is constant ({float(w.flatten()[0]):.3g})')
            elif w.numel() >= 16 and (bool((w >= 0).all()) or bool((w <= 0).all())):
                problems.append(f'{name}.weight is all {"positive" if w.sum() > 0 else "negative"}')
    for name, kind, mean, std, dead in stats:
        if not (math.isfinite(mean) and math.isfinite(std)):
            problems.append(f'{name} outputs NaN/inf')
        elif kind not in ('ReLU', 'ReLU6') and std < 1e-5:
            problems.append(f'{name} output vanished (std {std:.2g})')
        elif std > 1e3:
            problems.append(f'{name} output exploded (std {std:.3g})')
        if dead is not None and dead > 0.9:
            problems.append(f'{name}: {dead:.0%} of channels dead (zero for every input)')
        elif dead is not None and dead > 0.5:
            warnings_.append(f'{name}: {dead:.0%} of channels dead')
    stds = [s for _, kind, _, s, _ in stats if kind not in ('ReLU', 'ReLU6')] or [math.nan]
    deads = [(d, n) for n, _, _, _, d in stats if d is not None]
    worst_dead = max(deads, default=(0.0, '-'))
    evidence = (f'{len(stds)} Conv/Linear layers on {len(images)} images: activation std '
                f'{min(stds):.3g}..{max(stds):.3g} (first {stds[0]:.3g}, last {stds[-1]:.3g}); '
                f'most dead ReLU channels {worst_dead[0]:.0%} ({worst_dead[1]})')
    data = dict(layers=stats, problems=problems)
    fix = ('initialise with models.basic_module.kaiming_init (Kaiming normal for conv, '
           'small normal for Linear, zero bias), or start from pretrained weights')
    shown = problems[:4] + ([f'+{len(problems) - 4} more'] if len(problems) > 4 else [])
    if problems:
        return Result('initialisation', FAIL, evidence + '; ' + '; '.join(shown), fix, data)
    if warnings_:
        return Result('initialisation', WARN, evidence + '; ' + '; '.join(warnings_[:4]), fix, data)
    return Result('initialisation', PASS, evidence, data=data)


# 7. Learning rate -------------------------------------------------------------------

def lr_range_test(model, optimizer, criterion, step, batches, lr_min=1e-5, lr_max=1.0,
                  steps=17, max_images=16):
    """Train a copy with the LR rising exponentially from lr_min to lr_max, one batch per
    LR, until the loss turns clearly worse than at the start. Returns the LRs, the losses,
    the smoothed losses and the LR at which it diverged (None if it never did)."""
    model, optimizer = copy_training(model, optimizer)
    base_lrs = [g['lr'] for g in optimizer.param_groups]
    lrs, losses, smoothed, average = [], [], [], 0.0
    for i in range(steps):
        lr = lr_min * (lr_max / lr_min) ** (i / (steps - 1))
        set_lr(optimizer, lr, base_lrs)
        images, targets = batches[i % len(batches)]
        loss = step(model, optimizer, criterion, images[:max_images], targets[:max_images])
        if not math.isfinite(loss):
            return lrs, losses, smoothed, lr
        average = 0.6 * average + 0.4 * loss  # bias-corrected exponential moving average
        lrs.append(lr)
        losses.append(loss)
        smoothed.append(average / (1 - 0.6 ** (i + 1)))
        if i >= 4 and smoothed[-1] > min(4 * min(smoothed), 1.5 * smoothed[0]):
            return lrs, losses, smoothed, lr
    return lrs, losses, smoothed, None


def analyse_range(lrs, smoothed):
    """(suggested lr, usable band (low, high)); (None, None) when the loss never fell."""
    if len(smoothed) < 3:
        return None, None
    best = int(np.argmin(smoothed))
    start = smoothed[0]
    if smoothed[best] > 0.95 * start:
        return None, None
    # the band runs from where the loss has clearly started to fall to a little past the
    # lowest loss, stopping before the loss is back above its start; the sweep lags (an LR
    # shows its effect steps later), hence the margins
    onset = next(i for i, s in enumerate(smoothed) if s < start - 0.1 * (start - smoothed[best]))
    worse = next((lrs[i - 1] for i in range(best + 1, len(smoothed)) if smoothed[i] >= start),
                 math.inf)
    return lrs[best] / 10, (lrs[onset] / 10, min(3 * lrs[best], worse))


def check_learning_rate(model, optimizer, criterion, step, batches, opt, out_dir, vis=None,
                        make_optimizer=None, steps=17):
    """LR range test with the configured optimizer; where the configured LR is off, a second
    test with the other optimizer (Adam vs SGD with momentum) says which one to use."""
    lr = optimizer.param_groups[0]['lr']
    lrs, losses, smoothed, diverged = lr_range_test(model, optimizer, criterion, step, batches,
                                                    steps=steps)
    suggested, band = analyse_range(lrs, smoothed)
    name = f'{opt.optimizer}' + (f' (momentum {opt.momentum})' if opt.optimizer == 'sgd' else '')
    if len(smoothed) < 3:
        return Result('learning rate', FAIL, f'{name}: the loss is NaN/inf from lr {diverged:.0e} on',
                      'the model cannot learn at any LR: fix the failing checks above first',
                      dict(lrs=lrs, losses=losses, band=None, suggested=None, diverged=diverged))
    where = plot_range(lrs, losses, smoothed, lr, band, suggested, out_dir, vis, opt.optimizer)
    data = dict(lrs=lrs, losses=losses, suggested=suggested, band=band, diverged=diverged,
                plot=where)
    if band is None:
        return Result('learning rate', FAIL,
                      f'{name}: the loss never fell over lr {lrs[0]:.0e}..{lrs[-1]:.0e} '
                      f'({smoothed[0]:.3f} -> {min(smoothed):.3f}); plot {where}',
                      'the model cannot learn at any LR: fix the failing checks above '
                      '(gradient flow, logits, initialisation) first', data)
    evidence = (f'{name} at lr {lr:.3g}: usable band {band[0]:.2g}..{band[1]:.2g}, suggested '
                f'{suggested:.2g}, loss {smoothed[0]:.3f} -> {min(smoothed):.3f}'
                + (f', diverges from {diverged:.2g}' if diverged else '') + f'; plot {where}')
    if band[0] <= lr <= band[1]:
        return Result('learning rate', PASS, evidence, data=data)
    absurd = lr > 10 * band[1] or lr < band[0] / 100 or (diverged is not None and lr >= diverged)
    fix = f'--lr={suggested:.2g}'
    if make_optimizer is not None:
        other = 'sgd' if opt.optimizer == 'adam' else 'adam'
        o_lrs, _, o_smoothed, _ = lr_range_test(model, make_optimizer(other), criterion, step,
                                                batches, steps=steps)
        o_suggested, o_band = analyse_range(o_lrs, o_smoothed)
        data['alternative'] = dict(optimizer=other, suggested=o_suggested,
                                   best=min(o_smoothed, default=math.inf))
        if o_band is not None:
            favoured = other if min(o_smoothed) < min(smoothed) else opt.optimizer
            evidence += (f'; {other} reaches loss {min(o_smoothed):.3f} (suggested lr '
                         f'{o_suggested:.2g}) vs {min(smoothed):.3f}: the quick test favours {favoured}')
            if favoured == other:
                fix += f', or --optimizer={other} --lr={o_suggested:.2g}'
    return Result('learning rate', FAIL if absurd else WARN, evidence, fix, data)


def plot_range(lrs, losses, smoothed, lr, band, suggested, out_dir, vis, optimizer_name):
    """The range test as a PNG (log LR against loss), and to Visdom when it runs."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, 'lr_range_test.png')
    width, height, margin = 640, 400, 50
    img = Image.new('RGB', (width, height), 'white')
    draw = ImageDraw.Draw(img)
    x_lo, x_hi = math.log10(min(lrs + [lr])), math.log10(max(lrs + [lr]))
    finite = [v for v in losses + smoothed if math.isfinite(v)]
    y_lo, y_hi = min(finite), max(finite)

    def xy(x, y):
        px = margin + (math.log10(x) - x_lo) / max(x_hi - x_lo, 1e-9) * (width - 2 * margin)
        py = height - margin - (y - y_lo) / max(y_hi - y_lo, 1e-9) * (height - 2 * margin)
        return px, py

    if band is not None:
        draw.rectangle([xy(band[0], y_hi)[0], margin, xy(band[1], y_lo)[0], height - margin],
                       fill=(225, 245, 225))
    draw.rectangle([margin, margin, width - margin, height - margin], outline='black')
    for decade in range(math.ceil(x_lo), math.floor(x_hi) + 1):
        px, _ = xy(10 ** decade, y_lo)
        draw.line([px, height - margin, px, height - margin + 5], fill='black')
        draw.text((px - 12, height - margin + 8), f'1e{decade}', fill='black')
    for value in (y_lo, y_hi):
        draw.text((5, xy(lrs[0], value)[1] - 5), f'{value:.3f}', fill='black')
    draw.line([xy(a, b) for a, b in zip(lrs, losses)], fill=(160, 160, 220), width=1)
    draw.line([xy(a, b) for a, b in zip(lrs, smoothed)], fill='blue', width=2)
    draw.line([xy(lr, y_lo), xy(lr, y_hi)], fill='red', width=2)
    if suggested is not None:
        draw.line([xy(suggested, y_lo), xy(suggested, y_hi)], fill='green', width=2)
    draw.text((margin, 15), f'LR range test ({optimizer_name}): loss against learning rate; red = '
              f'configured, green = suggested, shaded = usable band', fill='black')
    img.save(path)
    if vis is not None:
        vis.vis.line(X=np.array(lrs), Y=np.array(smoothed), win='doctor: lr range test',
                     opts=dict(title=f'LR range test ({optimizer_name})', xtype='log',
                               xlabel='learning rate', ylabel='loss (smoothed)'))
        return f'{path} and Visdom env {vis.env!r}'
    return path


# 8. Can it learn at all -------------------------------------------------------------

def balanced_subset(batches, size):
    """Up to `size` images with the classes as even as the batches allow."""
    images = torch.cat([x for x, _ in batches])
    targets = torch.cat([t for _, t in batches])
    per_class = [torch.nonzero(targets == c).flatten() for c in range(len(CLASSES))]
    order = [int(i) for pair in zip(*per_class) for i in pair]
    order += [int(i) for i in range(len(targets)) if i not in set(order)]
    chosen = torch.tensor(order[:size])
    return images[chosen], targets[chosen]


def check_overfit(model, optimizer, criterion, step, images, targets, lr=None, max_steps=60,
                  goal=LN2 / 4):
    """Overfit one small batch: the loss must fall well below ln 2 within max_steps."""
    model, optimizer = copy_training(model, optimizer)
    if lr is not None:
        set_lr(optimizer, lr, [g['lr'] for g in optimizer.param_groups])
    losses = []
    for _ in range(max_steps):
        losses.append(step(model, optimizer, criterion, images, targets))
        if not math.isfinite(losses[-1]) or losses[-1] < goal:
            break
    at_lr = optimizer.param_groups[0]['lr']
    evidence = (f'{len(targets)} images ({int(targets.sum())} dogs), lr {at_lr:.2g}: loss '
                f'{losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} steps (goal < {goal:.3f})')
    data = dict(losses=losses, steps=len(losses))
    if math.isfinite(losses[-1]) and losses[-1] < goal:
        return Result('overfit batch', PASS, evidence, data=data)
    return Result('overfit batch', FAIL, evidence,
                  'the model/loss/optimizer wiring is broken whatever the data: fix the FAILs '
                  'above; a CrossEntropyLoss on raw logits, a step that calls backward() and '
                  'step(), and a sane --lr must fit 8 images', data)


# The doctor -------------------------------------------------------------------------

CHECKS = ('shuffling', 'gradient flow', 'normalisation', 'labels', 'logits', 'initialisation',
          'learning rate', 'overfit batch')


def run_checks(setup, only=CHECKS, max_probe=16):
    """The checks named in `only` (default: all eight) on one setup, in checklist order."""
    opt = setup.opt
    batches = draw_batches(setup.train_loader)
    device = device_of(setup.model)
    batches = [(x.to(device), t.to(device)) for x, t in batches]
    probe_x, probe_t = batches[0][0][:max_probe], batches[0][1][:max_probe]
    model, optimizer, criterion, step = setup.model, setup.optimizer, setup.criterion, setup.step

    def make_optimizer(kind):
        return model.get_optimizer(opt.lr, opt.weight_decay, kind, opt.momentum,
                                   opt.backbone_lr, opt.classifier_lr)

    def small_batch():
        return balanced_subset(batches, 8)

    def overfit_lr():
        # overfitting tests the wiring, not the LR: the suggested LR where the configured one
        # is off, and within the band the faster of the two (SGD at 1e-3 crawls)
        lr_result = next((r for r in results if r.name == 'learning rate'), None)
        suggested = lr_result.data.get('suggested') if lr_result is not None else None
        if suggested is None or lr_result.status != PASS:
            return suggested
        return max(suggested, optimizer.param_groups[0]['lr'])

    plan = {
        'shuffling': lambda: check_shuffling(batches, dataset_labels(setup.train_data)),
        'gradient flow': lambda: check_gradient_flow(model, optimizer, criterion, step,
                                                     probe_x, probe_t),
        'normalisation': lambda: check_normalisation(batches),
        'labels': lambda: check_labels(setup.train_data, setup.val_data, batches, setup.out_dir,
                                       setup.vis),
        'logits': lambda: check_logits(model, probe_x),
        'initialisation': lambda: check_initialisation(model, probe_x),
        'learning rate': lambda: check_learning_rate(model, optimizer, criterion, step, batches,
                                                     opt, setup.out_dir, setup.vis, make_optimizer),
        'overfit batch': lambda: check_overfit(model, optimizer, criterion, step, *small_batch(),
                                               lr=overfit_lr()),
    }
    results = []
    for name in CHECKS:
        if name not in only:
            continue
        started = time.time()
        try:
            result = plan[name]()
        except UserError:
            raise
        except Exception as exc:  # a broken setup can crash a check: that is a finding too
            result = Result(name, FAIL, f'crashed: {type(exc).__name__}: {exc}',
                            'fix this error: the same code runs in train')
        result.seconds = time.time() - started
        results.append(result)
    return results


def run_doctor(opt, load_datasets, train_one_epoch):
    """`python main.py doctor`: print one line per check; True when any check FAILs."""
    started = time.time()
    setup = build_setup(opt, load_datasets, train_one_epoch)
    print(f'doctor: {opt.model} on {opt.train_data_root} ({len(setup.train_data)} train / '
          f'{len(setup.val_data)} val images), {opt.image_size} px, batch {opt.batch_size}, '
          f'optimizer {opt.optimizer} lr {opt.lr}'
          + (f' momentum {opt.momentum}' if opt.optimizer == 'sgd' else '')
          + f', weight decay {opt.weight_decay}')
    results = run_checks(setup)
    for result in results:
        print(result.line())
    counts = {s: sum(r.status == s for r in results) for s in (PASS, WARN, FAIL)}
    print(f'{counts[PASS]} passed, {counts[WARN]} warnings, {counts[FAIL]} failed '
          f'in {time.time() - started:.0f} s')
    if setup.vis is not None:
        for result in results:
            setup.vis.log(result.line(), win='doctor')
        setup.vis.close()  # deliver the queued plots before the process ends
    return counts[FAIL] > 0


# The alarm during training ----------------------------------------------------------

def collapse_warning(train_losses, val_meter, one_class=0.95, balanced=0.3, near=0.01):
    """After a validation pass: a message when the run shows the stuck-at-50% symptoms
    (predictions nearly all one class while the labels are balanced, or the training loss
    at ln 2 for two epochs), else None."""
    cm = np.asarray(val_meter.cm, dtype=float)
    symptoms = []
    if cm.sum() > 0:
        truth, predicted = cm.sum(1) / cm.sum(), cm.sum(0) / cm.sum()
        if truth.min() >= balanced and predicted.max() >= one_class:
            labels = ' / '.join(f'{share:.0%} {name}' for share, name in zip(truth, CLASSES))
            symptoms.append(f'{predicted.max():.0%} of the validation predictions are '
                            f'"{CLASSES[int(predicted.argmax())]}" although the labels are '
                            f'{labels} (confusion matrix {cm.astype(int).tolist()})')
    recent = list(train_losses)[-2:]
    if len(recent) == 2 and all(abs(loss - LN2) <= near for loss in recent):
        symptoms.append(f'the training loss has stayed at ln 2 = {LN2:.3f} for two epochs '
                        f'({recent[0]:.4f}, {recent[1]:.4f})')
    if not symptoms:
        return None
    return ('the run looks stuck at 50%: ' + '; '.join(symptoms) + '. Run `python main.py '
            'doctor` with the same options to find the cause.')
