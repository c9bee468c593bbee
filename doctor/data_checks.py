"""Checks of what the loader feeds the model: shuffling, normalisation, labels."""
import math
import os

import numpy as np
import torch
from PIL import ImageDraw
from torchvision.transforms.functional import to_pil_image
from torchvision.utils import make_grid

from data.dataset import CLASSES, LABELLED_NAME, Skipped
from doctor.common import FAIL, PASS, WARN, Result, fmt

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


