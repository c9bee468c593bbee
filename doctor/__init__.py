"""The 50% doctor: the reference write-up's stuck-at-50% checklist, run automatically, and
the faults beyond it that keep a run at 50%.

It examines the very objects train would use, built by engine/builder.py from the same
options (loader and sampler, datasets, model on its device, optimizer, loss, and the
training step run.step). Each check returns a Result with a status (PASS / WARN /
FAIL), the measured evidence and, when not PASS, the fix. The checks run in an order
where causes come before their consequences, so the first FAIL names the cause. Tests
hand the checks a run with one faulty piece instead.
"""
import os
import time
from urllib.parse import urlparse

from doctor.common import FAIL, PASS, WARN, Context, Result, device_of, draw_batches
from doctor.data_checks import check_labels, check_shuffling
from doctor.input_checks import check_normalisation, check_validation
from doctor.loss_checks import check_loss, check_regularisation
from doctor.model_checks import check_initialisation, check_logits
from doctor.step_checks import check_gradient_flow, check_training_step
from doctor.training_checks import check_learning_rate, check_overfit
from engine import builder
from utils.errors import UserError

# In checklist order: what is fed, what the model makes of it, what is optimised, what
# a step applies, and last whether it learns.
PLAN = (('shuffling', check_shuffling), ('labels', check_labels),
        ('normalisation', check_normalisation), ('validation', check_validation),
        ('initialisation', check_initialisation), ('logits', check_logits),
        ('loss', check_loss), ('regularisation', check_regularisation),
        ('gradient flow', check_gradient_flow), ('training step', check_training_step),
        ('learning rate', check_learning_rate), ('overfit batch', check_overfit))
CHECKS = tuple(name for name, _ in PLAN)

__all__ = ['CHECKS', 'FAIL', 'PASS', 'WARN', 'Result', 'examine', 'live_visualizer', 'run_checks',
           'run_doctor']


def examine(opt):
    """The run train would build from these options, with a live Visdom or none."""
    run = builder.for_training(opt, vis=False)
    run.vis = live_visualizer(opt)
    return run


def live_visualizer(opt):
    """A Visualizer when --vis=True and a Visdom server answers; else None (PNGs only)."""
    if not opt.vis:
        return None
    from utils.visdom_server import page_answers
    from utils.visualize import Visualizer
    server = opt.vis_server if '://' in opt.vis_server else f'http://{opt.vis_server}'
    host = urlparse(server).hostname
    if not page_answers(opt.vis_port, host or 'localhost'):
        return None
    return Visualizer(env=opt.env, port=opt.vis_port, server=opt.vis_server, log_warnings=False)


def run_one(name, check, ctx):
    started = time.time()
    try:
        result = check(ctx)
    except UserError:
        raise
    except Exception as exc:  # a broken setup can crash a check: that is a finding too
        result = Result(name, FAIL, f'crashed: {type(exc).__name__}: {exc}',
                        'fix this error: the same code runs in train')
    result.seconds = time.time() - started
    return result


def run_checks(run, only=CHECKS):
    """The checks named in `only` (default: all) on one run, in checklist order."""
    unknown = set(only) - set(CHECKS)
    if unknown:
        raise ValueError(f'unknown checks {sorted(unknown)}; choose from {CHECKS}')
    device = device_of(run.model)
    batches = [(x.to(device), t.to(device)) for x, t in draw_batches(run.train_loader)]
    ctx = Context(run, batches, os.path.join(run.opt.checkpoint_dir, 'doctor'))
    for name, check in PLAN:
        if name in only:
            ctx.results[name] = run_one(name, check, ctx)
    return list(ctx.results.values())


def run_doctor(opt):
    """`python main.py doctor`: print one line per check; True when any check FAILs."""
    started = time.time()
    run = examine(opt)
    print(f'doctor: {opt.model} on {opt.train_data_root} ({len(run.train_data)} train / '
          f'{len(run.val_data)} val images), {opt.image_size} px, batch {opt.batch_size}, '
          f'optimizer {opt.optimizer} lr {opt.lr}'
          + (f' momentum {opt.momentum}' if opt.optimizer == 'sgd' else '')
          + f', weight decay {opt.weight_decay}, label smoothing {opt.label_smoothing}')
    results = run_checks(run)
    for result in results:
        print(result.line())
    counts = {s: sum(r.status == s for r in results) for s in (PASS, WARN, FAIL)}
    first = next((r for r in results if r.status == FAIL), None)
    print(f'{counts[PASS]} passed, {counts[WARN]} warnings, {counts[FAIL]} failed '
          f'in {time.time() - started:.0f} s'
          + (f'; fix the first FAIL ({first.name}) first: later ones may follow from it'
             if counts[FAIL] > 1 else ''))
    if run.vis is not None:
        for result in results:
            run.vis.log(result.line(), win='doctor')
        run.vis.close()  # deliver the queued plots before the process ends
    return counts[FAIL] > 0
