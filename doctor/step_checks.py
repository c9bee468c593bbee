"""Checks of train's step: which parameters it trains (gradient flow), and whether what
it applies over two steps is what a clean step of the same loss would (training step)."""
import math

import torch

from doctor.common import BATCHNORMS, cosine, few, flat, optimizer_ids, ratio, verdict
from doctor.step_recorder import expected_modes, two_steps

OPTIMIZER_FIX = ('build the optimizer from the model train uses, after it is final: '
                 'builder.optimizer(opt, run.model), i.e. model.get_optimizer(...) '
                 '(parameter_groups()) as train does')


def recorded(ctx):
    return ctx.remember('two steps', lambda: two_steps(ctx))


# Gradient flow -----------------------------------------------------------------------

def identity_problems(model, optimizer):
    """Parameters frozen by mistake, missing from the optimizer, or an optimizer that
    updates tensors that are not this model's."""
    params = dict(model.named_parameters())
    own = {id(p) for p in params.values()}
    in_optimizer = optimizer_ids(optimizer)
    head = model.head() if hasattr(model, 'head') else None
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    meant_frozen = getattr(model, 'frozen', False)  # --freeze: a frozen backbone is the intent
    frozen = [n for n, p in params.items() if not p.requires_grad
              and (not meant_frozen or id(p) in head_ids)]
    missing = [n for n, p in params.items() if p.requires_grad and id(p) not in in_optimizer]
    foreign = len(in_optimizer - own)
    problems = []
    if foreign:
        problems.append((f'the optimizer updates {foreign} tensors that are not the model\'s '
                         f'({len(in_optimizer & own)} of the model\'s {len(own)} are in it): '
                         f'it was built over another model instance', OPTIMIZER_FIX))
    if frozen:
        problems.append((f'{len(frozen)} frozen (requires_grad=False): {few(frozen)}',
                         'do not set requires_grad=False on parameters that should learn '
                         '(only --freeze fixes a pretrained backbone)'))
    if missing and not foreign:
        problems.append((f'{len(missing)} trainable but not in the optimizer: {few(missing)}',
                         OPTIMIZER_FIX))
    return problems, dict(frozen=frozen, missing=missing, foreign=foreign)


def flow_findings(records):
    """Per finding, the parameter names: judged over both steps, so a parameter gated at
    the first step (a zero-initialised BatchNorm scale behind it) is not blamed."""
    first = records[0]
    names = list(first.clean)
    cut_off = [n for n in names if all(r.clean[n] is None for r in records)]
    no_grad = [n for n in names if n not in cut_off and all(r.grads[n] is None for r in records)]
    seen = [(n, r.grads[n]) for r in records for n in names if r.grads[n] is not None]
    not_finite = sorted({n for n, g in seen if not torch.isfinite(g).all()})
    zero = [n for n in names if n not in cut_off + no_grad + not_finite
            and all(r.grads[n] is None or not r.grads[n].any() for r in records)]
    # a gradient scaled to nothing before optimizer.step() is the training step check's
    unchanged = [n for n in names if n not in cut_off + no_grad + not_finite + zero
                 and all(not r.applied[n].any() and not shrunk(r, n) for r in records)]
    return dict(cut_off=cut_off, no_grad=no_grad, not_finite=not_finite, zero=zero,
                unchanged=unchanged, total=len(names))


def shrunk(record, name):
    """Did the step's gradient reach optimizer.step() at under a fifth of the loss's?"""
    seen, clean = record.grads[name], record.clean[name]
    return seen is not None and clean is not None and float(seen.norm()) < 0.2 * float(clean.norm())


def flow_problems(found, losses):
    problems = []
    if not all(math.isfinite(v) for v in losses):
        problems.append((f'the step\'s loss is NaN/inf ({losses})',
                         'look for log(0), division by zero or a far too high --lr'))
    if found['cut_off']:
        problems.append((f'{len(found["cut_off"])} the loss does not depend on (detached graph): '
                         f'{few(found["cut_off"])}',
                         'remove .detach(), .data, .item()/.numpy() round trips and '
                         'torch.no_grad() from the forward pass'))
    if found['no_grad']:
        everything = len(found['no_grad']) + len(found['cut_off']) == found['total']
        problems.append(('no gradient at all when optimizer.step() runs' if everything else
                         f'{len(found["no_grad"])} without gradient: {few(found["no_grad"])}',
                         'call loss.backward() in the training step, before optimizer.step()'
                         if everything else 'check that every parameter is used in forward()'))
    if found['not_finite']:
        problems.append((f'{len(found["not_finite"])} with NaN/inf gradients: '
                         f'{few(found["not_finite"])}',
                         'look for log(0), division by zero or a far too high --lr'))
    if found['zero']:
        problems.append((f'{len(found["zero"])} with all-zero gradients in both steps: '
                         f'{few(found["zero"])}',
                         'a dead path (zero weights, ReLU after the logits, all-dead ReLUs) '
                         'blocks the gradient; see the initialisation and logits checks'))
    if found['unchanged']:
        problems.append((f'{len(found["unchanged"])} unchanged by both steps although they have '
                         f'gradients: {few(found["unchanged"])}',
                         'call optimizer.step() after loss.backward(), with an --lr that is '
                         'not 0 or vanishingly small'))
    return problems


def check_gradient_flow(ctx):
    """Two real training steps: every trainable parameter must be in the optimizer, get
    a finite, non-zero gradient and change; none may be frozen by mistake."""
    records = recorded(ctx)
    identity, data = identity_problems(ctx.run.model, ctx.run.optimizer)
    found = flow_findings(records)
    # what the optimizer does not hold cannot change: that follows from the cause
    found['unchanged'] = [] if data['foreign'] else [
        n for n in found['unchanged'] if n not in data['missing']]
    norms = [float(g.norm()) for r in records for g in r.grads.values()
             if g is not None and torch.isfinite(g).all()]
    changed = sum(any(r.applied[n].any() for r in records) for n in records[0].applied)
    losses = [r.loss for r in records]
    evidence = (f'two real steps, loss {", ".join(f"{v:.4f}" for v in losses)}: '
                f'{found["total"]} trainable tensors, gradient norms {min(norms, default=0):.2g}'
                f'..{max(norms, default=0):.2g}, {changed} changed by the steps')
    return verdict('gradient flow', evidence, {**data, **found},
                   identity + flow_problems(found, losses))


# Training step -----------------------------------------------------------------------

def vectors(record, fields, names):
    return [flat([getattr(record, f)[n] for n in names]) for f in fields]


def comparable(records):
    """Names with a gradient in both the step and the clean computation of every step."""
    return [n for n in records[0].clean
            if all(r.clean[n] is not None and r.grads[n] is not None for r in records)]


def mode_problems(model, record):
    expected = expected_modes(model)
    wrong = [n for n, mode in record.modes.items() if n in expected and mode != expected[n]]
    kinds = {n: type(m) for n, m in model.named_modules()}
    norms = [n for n in wrong if issubclass(kinds[n], BATCHNORMS)]
    if not wrong:
        return [], []
    text = (f'{len(wrong)} BatchNorm/Dropout layers ran in '
            f'{"eval" if not record.modes[wrong[0]] else "training"} mode during the training '
            f'step ({few(wrong)})')
    fix = ('train_one_epoch calls model.train() before its steps: do not call model.eval() '
           '(or train(False)) in the step or in forward(); evaluate() switches back itself')
    return ([(text, fix)], []) if norms else ([], [(text, fix)])


def stats_problems(model, record):
    """BatchNorm layers that trained without updating their running statistics: evaluation
    then normalises with the initial ones."""
    modules = dict(model.named_modules())
    # unmoved with a momentum is a batch whose statistics equal the running ones (zero
    # activations): the initialisation check's business
    stuck = [n for n, moved in record.stats_moved.items()
             if record.modes.get(n) and not moved and modules[n].momentum == 0]
    if not stuck:
        return []
    return [(f'{len(stuck)} BatchNorm layers trained without updating their running '
             f'statistics (momentum 0): {few(stuck)}; validation would normalise with '
             f'the initial ones',
             'keep BatchNorm momentum at its default 0.1 (or None), track_running_stats=True')]


def accumulation_problems(records, names):
    g1, = vectors(records[0], ('grads',), names)
    g2, c2 = vectors(records[1], ('grads', 'clean'), names)
    if ratio(g2 - c2, c2) > 0.2 and ratio(g2 - c2 - g1, c2) < 0.05:
        return [('the second step\'s gradients are the sum of both steps\' (they accumulate '
                 'across steps)', 'call optimizer.zero_grad() in every step, before '
                 'loss.backward() (train_step does)')]
    return []


def update_problems(record, names):
    """The change the step applied against what the optimizer makes of the clean gradient."""
    grads, clean, applied, expected = vectors(record, ('grads', 'clean', 'applied', 'expected'),
                                              names)
    scale, update = ratio(grads, clean), ratio(applied, expected)
    if record.optimizer_steps > 1:
        return [(f'optimizer.step() ran {record.optimizer_steps} times in one training step',
                 'call optimizer.step() once per batch')]
    if update < 0.05:
        why = (f'the gradients reaching optimizer.step() are {scale:.2g}x the loss\'s (scaled or '
               f'clipped)' if scale < 0.2 else 'the update is shrunk inside the step')
        return [(f'the step applies {update:.2g}x the update the optimizer makes of this '
                 f'batch\'s gradient: {why}',
                 'do not scale the loss or gradients down; clip_grad_norm_ with a max_norm of '
                 'about 1 or more; let optimizer.step() apply the configured --lr')]
    if update > 5:
        return [(f'the step applies {update:.2g}x the update the optimizer makes of this '
                 f'batch\'s gradient', 'do not scale the loss or gradients up')]
    if cosine(applied, expected) < 0.5:
        return [(f'the update does not follow this batch\'s gradient (cosine '
                 f'{cosine(applied, expected):.2f})',
                 'compute the step\'s loss with run.criterion on this batch\'s scores, then '
                 'loss.backward() and optimizer.step()')]
    return []


def check_training_step(ctx):
    """What two real steps applied, against a clean autograd step of run.criterion on the
    same weights and batches: modes, BatchNorm statistics, gradients, update sizes."""
    records, model = recorded(ctx), ctx.run.model
    names = comparable(records)
    bad_modes, odd_modes = mode_problems(model, records[0])
    problems = bad_modes + stats_problems(model, records[0])
    # in the wrong mode, or with another model's optimizer, a clean step is no reference
    foreign = identity_problems(model, ctx.run.optimizer)[1]['foreign']
    evidence = ('gradients not compared: the layers ran in another mode than a clean step\'s'
                if bad_modes else 'gradients not compared: the optimizer holds another '
                'model\'s tensors' if foreign else 'no gradients to compare (see gradient flow)')
    if names and not bad_modes and not foreign:
        grads, clean, applied, expected = vectors(records[1], ('grads', 'clean', 'applied',
                                                               'expected'), names)
        problems += accumulation_problems(records, names) + update_problems(records[1], names)
        evidence = (f'second step: gradients at optimizer.step() {ratio(grads, clean):.3g}x '
                    f'autograd of the loss (cosine {cosine(grads, clean):.3f}), update '
                    f'{ratio(applied, expected):.3g}x the optimizer\'s own (cosine '
                    f'{cosine(applied, expected):.3f})')
    training = sum(records[0].modes.values())
    evidence += f'; {training}/{len(records[0].modes)} BatchNorm/Dropout layers in training mode'
    return verdict('training step', evidence, dict(compared=len(names)), problems, odd_modes)
