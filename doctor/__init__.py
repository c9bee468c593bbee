"""The 50% doctor: the reference write-up's stuck-at-50% checklist, run automatically.

It examines the very objects train would use, built by engine/builder.py from the same
options (loader and sampler, datasets, model on its device, optimizer, loss, and the
training step run.step). Each check returns a Result with a status (PASS / WARN /
FAIL), the measured evidence and, when not PASS, the fix. Tests hand the checks a run
with one faulty piece instead.
"""
import copy
import math
import os
import time
from urllib.parse import urlparse

from doctor.common import FAIL, PASS, WARN, Result, device_of, draw_batches
from doctor.data_checks import check_labels, check_normalisation, check_shuffling, dataset_labels
from doctor.model_checks import check_gradient_flow, check_initialisation, check_logits
from doctor.training_checks import balanced_subset, check_learning_rate, check_overfit
from engine import builder
from engine.loop import NonFiniteLoss
from utils.errors import UserError

CHECKS = ('shuffling', 'gradient flow', 'normalisation', 'labels', 'logits', 'initialisation',
          'learning rate', 'overfit batch')


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
    host = urlparse(opt.vis_server if '://' in opt.vis_server else f'http://{opt.vis_server}').hostname
    if not page_answers(opt.vis_port, host or 'localhost'):
        return None
    return Visualizer(env=opt.env, port=opt.vis_port, server=opt.vis_server, log_warnings=False)


def loss_step(run):
    """run.step as the checks call it: step(model, optimizer, criterion, images, targets)
    -> the loss before the update; NaN where train would stop on a NaN/inf loss."""
    def step(model, optimizer, criterion, images, targets):
        try:
            return run.step(model, optimizer, criterion, images, targets, run.placement)[1]
        except NonFiniteLoss:
            return math.nan
    return step


def plan_checks(run, batches, results, max_probe=16):
    """Each check's call on this run, by name."""
    opt, model, optimizer, criterion = run.opt, run.model, run.optimizer, run.criterion
    step, out_dir = loss_step(run), os.path.join(opt.checkpoint_dir, 'doctor')
    probe_x, probe_t = batches[0][0][:max_probe], batches[0][1][:max_probe]

    def other_optimizer(kind):
        variant = copy.copy(opt)
        variant.optimizer = kind
        return builder.optimizer(variant, model)

    def overfit_lr():
        # overfitting tests the wiring, not the LR: the suggested LR where the configured one
        # is off, and within the band the faster of the two (SGD at 1e-3 crawls)
        lr_result = next((r for r in results if r.name == 'learning rate'), None)
        suggested = lr_result.data.get('suggested') if lr_result is not None else None
        if suggested is None or lr_result.status != PASS:
            return suggested
        return max(suggested, optimizer.param_groups[0]['lr'])

    return {
        'shuffling': lambda: check_shuffling(batches, dataset_labels(run.train_data)),
        'gradient flow': lambda: check_gradient_flow(model, optimizer, criterion, step,
                                                     probe_x, probe_t),
        'normalisation': lambda: check_normalisation(batches),
        'labels': lambda: check_labels(run.train_data, run.val_data, batches, out_dir, run.vis),
        'logits': lambda: check_logits(model, probe_x),
        'initialisation': lambda: check_initialisation(model, probe_x),
        'learning rate': lambda: check_learning_rate(model, optimizer, criterion, step, batches,
                                                     opt, out_dir, run.vis, other_optimizer),
        'overfit batch': lambda: check_overfit(model, optimizer, criterion, step,
                                               *balanced_subset(batches, 8), lr=overfit_lr()),
    }


def run_checks(run, only=CHECKS):
    """The checks named in `only` (default: all eight) on one run, in checklist order."""
    device = device_of(run.model)
    batches = [(x.to(device), t.to(device)) for x, t in draw_batches(run.train_loader)]
    results = []
    plan = plan_checks(run, batches, results)
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


def run_doctor(opt):
    """`python main.py doctor`: print one line per check; True when any check FAILs."""
    started = time.time()
    run = examine(opt)
    print(f'doctor: {opt.model} on {opt.train_data_root} ({len(run.train_data)} train / '
          f'{len(run.val_data)} val images), {opt.image_size} px, batch {opt.batch_size}, '
          f'optimizer {opt.optimizer} lr {opt.lr}'
          + (f' momentum {opt.momentum}' if opt.optimizer == 'sgd' else '')
          + f', weight decay {opt.weight_decay}')
    results = run_checks(run)
    for result in results:
        print(result.line())
    counts = {s: sum(r.status == s for r in results) for s in (PASS, WARN, FAIL)}
    print(f'{counts[PASS]} passed, {counts[WARN]} warnings, {counts[FAIL]} failed '
          f'in {time.time() - started:.0f} s')
    if run.vis is not None:
        for result in results:
            run.vis.log(result.line(), win='doctor')
        run.vis.close()  # deliver the queued plots before the process ends
    return counts[FAIL] > 0
