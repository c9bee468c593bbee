"""Checks of what training optimises: the real criterion (fed what the model outputs) and
the regularisation around it (dropout, weight decay)."""
import math

import torch
from torch.nn import functional as F

from data.dataset import CLASSES
from doctor.common import DROPOUTS, configured_lr, few, flat, verdict
from doctor.model_checks import FORM, loss_of
from doctor.step_checks import recorded
from doctor.step_recorder import expected_modes

MARGINS = (-8, -4, -2, 0, 2, 4, 8)  # score of the right class minus the other's
LOSS_FIX = ('use nn.CrossEntropyLoss() on the raw scores, as builder.criterion does '
            '(CrossEntropyLoss(label_smoothing=--label_smoothing))')


# Loss ------------------------------------------------------------------------------

def probe(label, margin, device):
    """Two images of `label` scored at `margin`, two of the other class at 50/50."""
    z = torch.zeros(4, 2, device=device)
    z[:2, label], z[:2, 1 - label] = margin / 2, -margin / 2
    return z, torch.tensor([label, label, 1 - label, 1 - label], device=device)


def loss_curves(criterion, form, device, reference=None):
    """Per class, the loss at each margin: through the model's output form into the
    real criterion, or (reference) into `reference` on the raw scores."""
    curves = {}
    for label in range(len(CLASSES)):
        points = [probe(label, m, device) for m in MARGINS]
        curves[label] = [reference(z, t) if reference else loss_of(criterion, FORM[form](z), t)
                         for z, t in points]
    return curves


def all_scored(criterion, form, device, margin):
    """The loss when every image, of either class, is scored at `margin`."""
    z, t = probe(0, margin, device)
    z[2:] = z[:2].flip(1)
    return loss_of(criterion, FORM[form](z), t)


def lowest_loss(criterion, form, device):
    """The loss when every image is scored right, as sure as the probes go: about 0 for
    cross-entropy, its floor for label smoothing, higher when scores are squashed."""
    values = [all_scored(criterion, form, device, m) for m in (2, 4, 8, 16)]
    return min((v for v in values if math.isfinite(v)), default=math.nan)


def cross_entropy_like(criterion):
    """F.cross_entropy with the criterion's own weight and label smoothing, and the two."""
    weight = getattr(criterion, 'weight', None)
    smoothing = float(getattr(criterion, 'label_smoothing', 0.0) or 0.0)

    def reference(z, t):
        return float(F.cross_entropy(z, t, weight=None if weight is None else weight.to(z.device),
                                     label_smoothing=smoothing))
    return reference, weight, smoothing


def settings_problems(weight, smoothing):
    """What a CrossEntropyLoss's own settings do to learning."""
    problems, warnings_ = [], []
    if smoothing >= 0.4:
        target = f'{1 - smoothing / 2:.0%}/{smoothing / 2:.0%}'
        found = (f'label_smoothing={smoothing:g} is extreme regularisation: the target is '
                 f'{target}, the best prediction {"50/50" if smoothing >= 1 else "nearly 50/50"}, '
                 f'the gradient {1 - smoothing:.2g}x as strong',
                 '--label_smoothing=0.1 (or 0)')
        (problems if smoothing >= 0.8 else warnings_).append(found)
    if weight is not None:
        w = [float(v) for v in weight]
        if min(w) <= 0:
            problems.append((f'class weight {w}: the loss ignores {CLASSES[w.index(min(w))]}s',
                             'drop weight= from CrossEntropyLoss (or give every class a '
                             'positive weight)'))
        elif max(w) / min(w) > 10:
            warnings_.append((f'class weights {w} differ {max(w) / min(w):.0f}x', LOSS_FIX))
    return problems, warnings_


def shape_problems(curves, lowest):
    """What any usable classification loss must do, judged on its curve per class."""
    problems = []
    for label, curve in curves.items():
        at = dict(zip(MARGINS, curve))
        name = CLASSES[label]
        if not all(math.isfinite(v) for v in curve):
            problems.append((f'the loss is NaN/inf for some {name} scores', LOSS_FIX))
        elif abs(at[4] - at[0]) < 1e-4 and abs(at[-4] - at[0]) < 1e-4:
            problems.append((f'the loss ignores {name} targets (it does not change with their '
                             f'scores)', LOSS_FIX))
        elif at[4] > at[0] > at[-4]:
            problems.append((f'the loss rewards predicting the wrong class for {name}s (targets '
                             f'inverted?)', LOSS_FIX))
        elif not at[2] < at[0]:
            problems.append((f'the loss does not fall as the {name} score rises', LOSS_FIX))
    if problems:  # the floor of a loss that rewards the wrong class says nothing more
        return problems
    if lowest < -0.01:
        problems.append((f'the loss goes negative ({lowest:.3g}) and has no minimum: NLLLoss on '
                         f'raw scores?', LOSS_FIX + ', or log_softmax before NLLLoss'))
    elif lowest > 0.3:
        problems.append((f'the loss cannot fall below {lowest:.3f} even for confident right '
                         f'answers: it squashes the scores (softmax/sigmoid) before the '
                         f'cross-entropy', LOSS_FIX))
    return problems


def check_loss(ctx):
    """run.criterion, fed what the model outputs, on probe scores: 50/50, then more and
    more sure of the right (or wrong) class, for each class."""
    criterion, device = ctx.run.criterion, ctx.device
    # through the model's output form where the logits check accepts it (log_softmax);
    # a form it FAILs is its finding, and the criterion is judged on raw scores
    logits = ctx.result('logits')
    accepted = logits is not None and logits.status != 'FAIL'
    form = (logits.data.get('form') if accepted else None) or 'raw scores'
    curves = loss_curves(criterion, form, device)
    reference, weight, smoothing = cross_entropy_like(criterion)
    expected = loss_curves(criterion, form, device, reference)
    same = all(math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-5)
               for c in curves for a, b in zip(curves[c], expected[c]))
    problems, warnings_ = settings_problems(weight, smoothing) if same else ([], [])
    lowest = lowest_loss(criterion, form, device)
    problems += shape_problems(curves, lowest) if not problems else []
    name = getattr(criterion, '__name__', None) or type(criterion).__name__
    evidence = (f'{name} on {form}{" (cross-entropy)" if same and "Entropy" not in name else ""}: '
                f'{all_scored(criterion, form, device, 0):.3f} at 50/50, '
                f'{all_scored(criterion, form, device, 4):.3f} / '
                f'{all_scored(criterion, form, device, -4):.3f} when sure right / wrong, '
                f'lowest {lowest:.3f}')
    return verdict('loss', evidence, dict(curves=curves, lowest=lowest, form=form,
                                          cross_entropy=same, smoothing=smoothing),
                   problems, warnings_)


# Regularisation --------------------------------------------------------------------

def dropout_problems(model):
    """Dropout layers that train with p near 1 drop nearly every feature."""
    training = expected_modes(model)
    found = [(n, float(m.p)) for n, m in model.named_modules()
             if isinstance(m, DROPOUTS) and training.get(n, True)]
    high = [f'{n} p={p:g}' for n, p in found if p >= 0.8]
    some = [f'{n} p={p:g}' for n, p in found if 0.6 <= p < 0.8]
    fix = 'lower the dropout to p=0.5 at most (0.2 in MobileNetV2, 0.5 in AlexNet/SqueezeNet)'
    problems = [(f'Dropout drops nearly every feature: {few(high)}', fix)] if high else []
    warnings_ = [(f'strong dropout: {few(some)}', fix)] if some else []
    return problems, warnings_, found


def decoupled(optimizer, group):
    return isinstance(optimizer, torch.optim.AdamW) or bool(group.get('decoupled_weight_decay'))


def decay_figures(run, clean):
    """Per group with weight decay: (name, wd, lr, pull), pull = how the decay compares
    with learning: for L2 decay (Adam, SGD) its gradient against the loss's on the same
    weights; for decoupled decay (AdamW) the share of the weights it removes per step."""
    names = {id(p): n for n, p in run.model.named_parameters()}
    figures = []
    for i, group in enumerate(run.optimizer.param_groups):
        wd = float(group.get('weight_decay', 0) or 0)
        params = [p for p in group['params'] if id(p) in names]
        if wd <= 0 or not params:
            continue
        if decoupled(run.optimizer, group):
            pull = wd * configured_lr(group) * 100  # percent per step
        else:
            loss_grad = flat([clean.get(names[id(p)]) for p in params]).norm()
            pull = float(wd * flat(params).norm() / loss_grad.clamp_min(1e-12))
        figures.append((group.get('name', str(i)), wd, configured_lr(group), pull,
                        decoupled(run.optimizer, group)))
    return figures


def decay_problems(figures):
    problems, warnings_ = [], []
    fix = ('--weight_decay=1e-4 (Adam/SGD add it to the gradient: 1e-5..5e-4 is usual), or '
           '--optimizer=adamw --weight_decay=0.05')
    for name, wd, lr, pull, is_decoupled in figures:
        if pull > (1 if is_decoupled else 10):
            problems.append((f'weight decay {wd:g} on {name} is extreme regularisation: the '
                             f'weights shrink to 0', fix))
        elif pull > (0.1 if is_decoupled else 2):
            warnings_.append((f'strong weight decay {wd:g} on {name}', fix))
    return problems, warnings_


def check_regularisation(ctx):
    """Dropout probabilities and weight decay strength, as train configures them."""
    run = ctx.run
    problems, warnings_, dropouts = dropout_problems(run.model)
    figures = decay_figures(run, recorded(ctx)[0].clean)
    bad, odd = decay_problems(figures)
    parts = [f'dropout {", ".join(f"p={p:g}" for _, p in dropouts) or "none"}']
    parts += [f'weight decay {wd:g} on {name}: ' + (
        f'removes {pull:.2g}% of the weights per step (decoupled)' if d else
        f'pulls {pull:.2g}x as hard as the loss\'s gradient (L2)')
        for name, wd, _, pull, d in figures] or ['no weight decay']
    return verdict('regularisation', '; '.join(parts), dict(dropouts=dropouts, decay=figures),
                   problems + bad, warnings_ + odd)

