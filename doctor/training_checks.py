"""Checks that train copies of the model: the LR range test and overfitting one batch."""
import math
import os

import numpy as np
import torch
from PIL import Image, ImageDraw

from data.dataset import CLASSES
from doctor.common import FAIL, LN2, PASS, WARN, Result, copy_training, set_lr

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


