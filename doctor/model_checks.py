"""Checks of the model as training starts it: initialisation and what its output is."""
import copy
import math

import torch
from torch.nn import functional as F

from doctor.common import (ACTIVATIONS, FAIL, NORMS, PASS, RELUS, WARN, WEIGHTED, Result,
                           verdict)


def forward_recording(model, images, kinds):
    """model(images) in training mode, on a copy; returns (output, calls) where calls
    lists (name, module, output copy) of the leaf modules of `kinds`, in call order.
    A copy of each output: an in-place ReLU may overwrite it."""
    model = copy.deepcopy(model).train()  # as the first training step sees it
    calls = []

    def record(name):
        def hook(module, inputs, output):
            if torch.is_tensor(output):
                calls.append((name, module, output.detach().float().clone()))
        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in model.named_modules()
             if not list(m.children()) and isinstance(m, kinds)]
    try:
        with torch.no_grad():
            out = model(images).detach().float()
    finally:
        for h in hooks:
            h.remove()
    return out, calls


def head_index(calls):
    """Index in `calls` of the last Linear/Conv call: the layer that makes the scores."""
    return max((i for i, (_, m, _) in enumerate(calls) if isinstance(m, WEIGHTED)), default=None)


# Initialisation ----------------------------------------------------------------------

def weight_problems(model):
    problems = []
    for name, module in model.named_modules():
        if isinstance(module, WEIGHTED) and module.weight.numel() > 1:
            w = module.weight.detach()
            if not w.any():
                problems.append(f'{name}.weight is all zero')
            elif float(w.std()) == 0:
                problems.append(f'{name}.weight is constant ({float(w.flatten()[0]):.3g})')
            elif w.numel() >= 16 and (bool((w >= 0).all()) or bool((w <= 0).all())):
                problems.append(f'{name}.weight is all {"positive" if w.sum() > 0 else "negative"}')
    return problems


def dead_share(y):
    """Share of channels silent (<= 0) for every input."""
    return float((y.transpose(0, 1).reshape(y.size(1), -1).amax(1) <= 0).float().mean())


def activation_stats(calls):
    """(name, kind, mean, std, dead share or None) per call up to the head: what comes
    after the head is the logits check's business."""
    last = head_index(calls)
    stats = []
    for name, module, y in calls[:None if last is None else last + 1]:
        dead = dead_share(y) if isinstance(module, RELUS) and y.dim() >= 2 else None
        stats.append((name, type(module).__name__, float(y.mean()), float(y.std()), dead))
    return stats


def activation_problems(stats):
    problems, warnings_ = [], []
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
    return problems, warnings_


def check_initialisation(ctx):
    """Degenerate weights, and per-layer activation statistics and dead-ReLU share on one
    batch, with the model as training would start it."""
    images, _ = ctx.probe()
    _, calls = forward_recording(ctx.run.model, images, WEIGHTED + RELUS)
    stats = activation_stats(calls)
    problems, warnings_ = activation_problems(stats)
    problems = weight_problems(ctx.run.model) + problems
    stds = [s for _, kind, _, s, _ in stats if kind not in ('ReLU', 'ReLU6')] or [math.nan]
    worst = max(((d, n) for n, _, _, _, d in stats if d is not None), default=(0.0, '-'))
    evidence = (f'{len(stds)} Conv/Linear layers on {len(images)} images: activation std '
                f'{min(stds):.3g}..{max(stds):.3g} (first {stds[0]:.3g}, last {stds[-1]:.3g}); '
                f'most dead ReLU channels {worst[0]:.0%} ({worst[1]})')
    fix = ('initialise with models.basic_module.kaiming_init (Kaiming normal for conv, '
           'small normal for Linear, zero bias), or start from pretrained weights')
    shown = problems[:4] + ([f'+{len(problems) - 4} more'] if len(problems) > 4 else [])
    return verdict('initialisation', evidence, dict(layers=stats, problems=problems),
                   [(text, fix) for text in shown], [(text, fix) for text in warnings_[:4]])


# Logits ------------------------------------------------------------------------------

# What may stand between the last layer's output z and the model's output.
FORMS = (('raw scores', lambda z: z), ('log_softmax', lambda z: F.log_softmax(z, 1)),
         ('softmax', lambda z: F.softmax(z, 1)), ('sigmoid', torch.sigmoid),
         ('relu', torch.relu), ('tanh', torch.tanh))
FORM = dict(FORMS)


def output_form(out, last):
    """The name of the f in FORMS with out == f(last), or None. A last layer with spatial
    output (SqueezeNet's 1x1 conv) is pooled first."""
    if last.dim() == 4 and out.dim() == 2:
        last = last.mean((2, 3))
    if last.shape != out.shape:
        return None
    return next((name for name, f in FORMS
                 if torch.allclose(out, f(last), rtol=1e-4, atol=1e-5)), None)


def loss_of(criterion, scores, targets):
    """criterion(scores, targets) as a float, NaN where it cannot take them."""
    try:
        with torch.no_grad():
            return float(criterion(scores, targets))
    except Exception:  # a criterion that rejects the probe scores is not equivalent
        return math.nan


def same_as_cross_entropy(criterion, form, device):
    """Does criterion(f(z)) give CrossEntropyLoss on z (or criterion on z itself), on
    scores spread wide enough to tell them apart?"""
    generator = torch.Generator().manual_seed(0)
    z = (torch.randn(32, 2, generator=generator) * 3).to(device)
    t = torch.randint(0, 2, (32,), generator=generator).to(device)
    through = loss_of(criterion, FORM[form](z), t)
    plain = (loss_of(criterion, z, t), float(F.cross_entropy(z, t)))
    return any(math.isclose(through, v, rel_tol=1e-3, abs_tol=1e-5) for v in plain)


def check_logits(ctx):
    """The model must hand the loss raw scores (or log-probabilities, which
    CrossEntropyLoss treats alike): nothing squashing them after the last layer, and
    outputs that vary with the input."""
    images, _ = ctx.probe()
    out, calls = forward_recording(ctx.run.model, images, WEIGHTED + ACTIVATIONS + NORMS)
    last = head_index(calls)
    head = calls[last][0] if last is not None else None
    form = output_form(out, calls[last][2]) if last is not None else None
    after = calls[last + 1:] if last is not None else calls
    culprits = [f'{type(m).__name__} ({n})' for n, m, _ in after
                if isinstance(m, ACTIVATIONS + NORMS)]
    spread = (out - out.mean(1, keepdim=True)).std(0).max().item() if len(out) > 1 else math.nan
    evidence = (f'last layer {head}; output: {form or "not a known function of it"}, in '
                f'[{out.min():.3g}, {out.max():.3g}], row sums {out.sum(1).min():.3g}..'
                f'{out.sum(1).max():.3g}, spread across inputs {spread:.2g}')
    data = dict(head=head, form=form, culprits=culprits, spread=spread)
    equivalent = form not in (None, 'raw scores') and same_as_cross_entropy(
        ctx.run.criterion, form, out.device)
    if equivalent:
        return Result('logits', PASS, evidence + f'; {form} into the loss: the same as '
                      f'CrossEntropyLoss on raw scores', data=data)
    return logits_verdict(evidence, data, out, form, culprits, spread)


def logits_verdict(evidence, data, out, form, culprits, spread):
    fix = ('return the raw scores of the last Linear/Conv layer: CrossEntropyLoss applies '
           'log-softmax itself (softmax only for reporting probabilities, as test does)')
    row_sums = out.sum(1)
    if culprits:  # even where they change nothing on this batch (ReLU of positive scores)
        return Result('logits', FAIL, evidence + f'; after the last layer: {", ".join(culprits)}',
                      fix, data)
    if form in ('softmax', 'sigmoid', 'relu', 'tanh'):
        return Result('logits', FAIL, evidence + f'; the output is {form} of the last layer\'s '
                      f'output', fix, data)
    if out.min() >= 0 and torch.allclose(row_sums, torch.ones_like(row_sums), atol=1e-4):
        return Result('logits', FAIL, evidence + '; rows sum to 1: softmax probabilities', fix,
                      data)
    if spread < 1e-6:
        return Result('logits', FAIL, evidence + '; the same output for every input',
                      'the input does not reach the output: see the initialisation and '
                      'gradient checks (zero weights, dead layers, detached graph)', data)
    if form is None:
        return Result('logits', WARN, evidence + '; the output is not the last layer\'s output',
                      fix, data)
    return Result('logits', PASS, evidence, data=data)
