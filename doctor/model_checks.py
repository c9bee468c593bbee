"""Checks of the model and its training step: gradient flow, logits, initialisation."""
import copy
import math

import torch

from doctor.common import (ACTIVATIONS, FAIL, NORMS, PASS, RELUS, WARN, WEIGHTED, Result,
                           copy_training, few)

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


