"""Checks that train copies of the model: the LR range test, and overfitting one small
batch at the configured options; when the loss will not fall, ablation names why."""
import copy
import math

import numpy as np

from doctor.ablation import (as_configured, balanced_subset, find_culprit, fit_batch, learnt,
                             overfit_goal)
from doctor.common import FAIL, PASS, WARN, Result, configured_lr, copy_training, set_lr
from doctor.plots import plot_range
from engine import builder

STUCK_FIX = ('the model cannot learn at any LR: fix the failing checks above (gradient flow, '
             'logits, initialisation) first')


# Learning rate -----------------------------------------------------------------------

def lr_range_test(ctx, optimizer=None, lr_min=1e-5, lr_max=1.0, steps=17, max_images=16):
    """Train a copy with the LR rising exponentially from lr_min to lr_max, one batch per
    LR, until the loss turns clearly worse than at the start. Returns the LRs, the losses,
    the smoothed losses and the LR at which it diverged (None if it never did)."""
    model, optimizer = copy_training(ctx.run.model, optimizer or ctx.run.optimizer)
    base_lrs = [g['lr'] for g in optimizer.param_groups]
    lrs, losses, smoothed, average = [], [], [], 0.0
    for i in range(steps):
        lr = lr_min * (lr_max / lr_min) ** (i / (steps - 1))
        set_lr(optimizer, lr, base_lrs)
        images, targets = ctx.batches[i % len(ctx.batches)]
        loss = ctx.step(model, optimizer, ctx.run.criterion, images[:max_images],
                        targets[:max_images])
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


def culprit_fix(ctx, lr):
    """The fix ablation finds for a loss that will not fall, or the generic one."""
    images, targets = balanced_subset(ctx.batches, 8)
    found = find_culprit(ctx, images, targets, overfit_goal(ctx), lr)
    if found is None:
        return 'no single change among the options and components tried lets it learn: ' \
               + STUCK_FIX, None
    what, fix, losses = found
    return fix, (f'with {what} 8 images are learnt (loss {losses[0]:.3f} -> {losses[-1]:.3f} '
                 f'in {len(losses)} steps)')


def never_fell(ctx, name, lrs, smoothed, where, data):
    fix, found = culprit_fix(ctx, configured_lr(ctx.run.optimizer.param_groups[0]))
    evidence = (f'{name}: the loss never fell over lr {lrs[0]:.0e}..{lrs[-1]:.0e} '
                f'({smoothed[0]:.3f} -> {min(smoothed):.3f}); plot {where}'
                + (f'; {found}' if found else ''))
    return Result('learning rate', FAIL, evidence, fix, data)


def other_optimizer(ctx, data, smoothed, evidence, fix):
    """Where the configured LR is off: does the other optimizer (Adam vs SGD with
    momentum) do better in the same quick test?"""
    opt = ctx.run.opt
    other = 'sgd' if opt.optimizer == 'adam' else 'adam'
    variant = copy.copy(opt)
    variant.optimizer = other
    o_lrs, _, o_smoothed, _ = lr_range_test(ctx, builder.optimizer(variant, ctx.run.model))
    o_suggested, o_band = analyse_range(o_lrs, o_smoothed)
    data['alternative'] = dict(optimizer=other, suggested=o_suggested,
                               best=min(o_smoothed, default=math.inf))
    if o_band is None:
        return evidence, fix
    favoured = other if min(o_smoothed) < min(smoothed) else opt.optimizer
    evidence += (f'; {other} reaches loss {min(o_smoothed):.3f} (suggested lr {o_suggested:.2g}) '
                 f'vs {min(smoothed):.3f}: the quick test favours {favoured}')
    if favoured == other:
        fix += f', or --optimizer={other} --lr={o_suggested:.2g}'
    return evidence, fix


def check_learning_rate(ctx):
    """LR range test with the configured optimizer, loss and step; where the configured
    LR is off, a second test with the other optimizer says which one to use."""
    opt, lr = ctx.run.opt, configured_lr(ctx.run.optimizer.param_groups[0])
    lrs, losses, smoothed, diverged = lr_range_test(ctx)
    suggested, band = analyse_range(lrs, smoothed)
    name = opt.optimizer + (f' (momentum {opt.momentum})' if opt.optimizer == 'sgd' else '')
    data = dict(lrs=lrs, losses=losses, suggested=suggested, band=band, diverged=diverged)
    if len(smoothed) < 3:
        return Result('learning rate', FAIL, f'{name}: the loss is NaN/inf from lr '
                      f'{diverged:.0e} on', STUCK_FIX, data)
    data['plot'] = where = plot_range(lrs, losses, smoothed, lr, band, suggested, ctx.out_dir,
                                      ctx.run.vis, opt.optimizer)
    if band is None:
        return never_fell(ctx, name, lrs, smoothed, where, data)
    evidence = (f'{name} at lr {lr:.3g}: usable band {band[0]:.2g}..{band[1]:.2g}, suggested '
                f'{suggested:.2g}, loss {smoothed[0]:.3f} -> {min(smoothed):.3f}'
                + (f', diverges from {diverged:.2g}' if diverged else '') + f'; plot {where}')
    if band[0] <= lr <= band[1]:
        return Result('learning rate', PASS, evidence, data=data)
    earlier = next((r.name for r in ctx.results.values() if r.status == FAIL), None)
    if earlier:  # a band measured with a broken loss or step suggests nothing
        return Result('learning rate', WARN, evidence + f'; measured with the {earlier} FAIL '
                      f'above', f'fix the {earlier} FAIL first, then run the doctor again', data)
    absurd = lr > 10 * band[1] or lr < band[0] / 100 or (diverged is not None and lr >= diverged)
    evidence, fix = other_optimizer(ctx, data, smoothed, evidence, f'--lr={suggested:.2g}')
    return Result('learning rate', FAIL if absurd else WARN, evidence, fix, data)


# Overfit one batch -------------------------------------------------------------------

def describe(losses, lr, goal):
    return (f'lr {lr:.2g}: loss {losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} steps '
            f'(goal < {goal:.3f})')


def check_overfit(ctx, size=8, max_steps=40):
    """Overfit one small batch as train would run it (configured LR, weight decay, loss
    and step); if that fails, at the suggested LR; if that fails too, by ablation."""
    images, targets = balanced_subset(ctx.batches, size)
    goal, configured = overfit_goal(ctx), as_configured(ctx)
    losses = fit_batch(configured, images, targets, goal, max_steps)
    decay = max(g.get('weight_decay', 0) for g in configured.optimizer.param_groups)
    evidence = (f'{len(targets)} images ({int(targets.sum())} dogs) as configured (weight decay '
                f'{decay:g}), ' + describe(losses, configured.lr, goal))
    data = dict(losses=losses, steps=len(losses), goal=goal)
    if learnt(losses, goal):
        return Result('overfit batch', PASS, evidence, data=data)
    lr_result = ctx.result('learning rate')
    suggested = lr_result.data.get('suggested') if lr_result is not None else None
    if suggested and not 0.5 < suggested / configured.lr < 2:
        at_suggested = fit_batch(as_configured(ctx, suggested), images, targets, goal, max_steps)
        evidence += '; at the suggested ' + describe(at_suggested, suggested, goal)
        if learnt(at_suggested, goal):
            fell = losses[-1] < losses[0] - 0.3 * (losses[0] - goal)
            return Result('overfit batch', WARN if fell else FAIL, evidence,
                          f'--lr={suggested:.2g}', data)
    fix, found = culprit_fix(ctx, suggested or configured.lr)
    return Result('overfit batch', FAIL, evidence + (f'; {found}' if found else ''), fix, data)
