"""Checks of the images the model gets: scale and normalisation, pictures blanked or erased
by augmentation, and whether validation and test images are prepared as training ones."""
import os

import numpy as np
import torch
from torchvision import transforms as T

from data.dataset import Skipped, decode_small, load_or_skip
from doctor.common import FAIL, fmt, verdict
from engine import builder

NORMALIZE = ('T.ToTensor() then T.Normalize(mean=model.input_mean, std=model.input_std) '
             '(0-1 scale constants), as data.dataset.default_transforms does')


def normalize_constants(transforms):
    """(mean, std) of the first T.Normalize in a transform pipeline, else None."""
    for t in getattr(transforms, 'transforms', [transforms]):
        if isinstance(t, T.Normalize):
            return tuple(float(v) for v in np.atleast_1d(t.mean)), \
                tuple(float(v) for v in np.atleast_1d(t.std))
    return None


def picture_content(x):
    """Per image: spatial std (averaged over channels), share of flat pixels (no change to
    the right nor below in any channel: erased areas) and neighbour correlation (natural
    pictures about 0.9, noise about 0)."""
    x = x.float()
    spatial = x.flatten(2).std(2).mean(1)
    dx = (x[..., :-1, 1:] - x[..., :-1, :-1]).abs().amax(1)
    dy = (x[..., 1:, :-1] - x[..., :-1, :-1]).abs().amax(1)
    flat = ((dx == 0) & (dy == 0)).flatten(1).float().mean(1)
    c = x - x.mean((2, 3), keepdim=True)
    var = (c * c).mean((2, 3)).clamp_min(1e-12)
    across = (c[..., :, 1:] * c[..., :, :-1]).mean((2, 3)) / var
    down = (c[..., 1:, :] * c[..., :-1, :]).mean((2, 3)) / var
    return spatial, flat, torch.maximum(across, down).mean(1)


def content_problems(x, share_fail=0.5, share_warn=0.2):
    """Images with no picture left: blank, mostly flat (erased) or noise."""
    spatial, flat, corr = picture_content(x)
    blank = spatial <= 1e-4 + 0.01 * float(x.float().std())
    erased = ~blank & (flat > 0.6)
    noise = ~blank & ~erased & (corr < 0.2)
    kinds = [(int(m.sum()), what) for m, what in ((blank, 'blank (no spatial variation)'),
                                                  (erased, 'mostly erased (flat)'),
                                                  (noise, 'mostly noise'))]
    lost = sum(n for n, _ in kinds)
    text = (f'{lost}/{len(x)} images carry no picture: '
            + ', '.join(f'{n} {what}' for n, what in kinds if n))
    fix = ('the transforms erase or blank the picture: lower RandomErasing\'s p/scale '
           '(defaults p=0.5, scale 0.02-0.33) or remove the transform that blanks images')
    if lost >= share_fail * len(x):
        return [(text, fix)], []
    return [], [(text, fix)] if lost >= share_warn * len(x) else []


def scale_problems(stats, constants):
    """Pixels on the wrong scale for the constants used, most specific first."""
    mean, std, lo, hi = stats['mean'], stats['std'], stats['min'], stats['max']
    if not np.isfinite([lo, hi]).all():
        return [('NaN/inf in the input',
                 'find the transform that produces NaN (e.g. division by a zero std)')]
    if 1e-4 < max(std) < 0.05 and min(abs(m) for m in mean) > 1:  # 0-1 pixels / 58: tiny
        used = (f' (the transforms use Normalize(mean={fmt_tuple(constants[0])}, '
                f'std={fmt_tuple(constants[1])}))' if constants else '')
        return [(f'every channel nearly constant near {min(mean):.2f}: mean/std on the 0-255 '
                 f'scale applied to 0-1 tensors{used}',
                 f'use 0-1 constants (e.g. model.input_mean {(0.485, 0.456, 0.406)}, not '
                 f'123.7, 116.3, 103.5): {NORMALIZE}')]
    if hi > 300 or (hi > 20 and lo < 0):  # (255 - 0.485) / 0.229 = 1111: beyond raw pixels
        return [(f'values up to {hi:.0f}: 0-255 pixels normalised with 0-1 constants',
                 f'scale pixels to 0-1 before normalising: {NORMALIZE}')]
    if lo >= 0 and hi > 2:
        return [('looks like raw 0-255 pixels', f'scale and normalise the images: {NORMALIZE}')]
    return []


def fmt_tuple(values):
    return '(' + ', '.join(f'{v:.4g}' for v in values) + ')'


def spread_warnings(stats):
    mean, std, lo, hi = stats['mean'], stats['std'], stats['min'], stats['max']
    if lo >= 0 and hi <= 1:
        return [('[0, 1] pixels, not normalised', f'add the normalisation: {NORMALIZE}')]
    if min(std) < 0.05:
        return [('a channel is nearly constant',
                 'check the images and transforms (blank or one-colour inputs?)')]
    if max(abs(m) for m in mean) > 1.5 or max(std) > 4 or min(std) < 0.2:
        return [('far from zero mean and unit std',
                 f'use the mean/std the model expects: {NORMALIZE}')]
    return []


def channel_stats(x):
    x = x.float()
    per_channel = x.transpose(0, 1).reshape(x.size(1), -1)
    return dict(mean=per_channel.mean(1).tolist(), std=per_channel.std(1).tolist(),
                min=float(x.min()), max=float(x.max()))


def check_normalisation(ctx):
    """Per-channel statistics of what the training loader feeds the model, and what is
    left of each picture."""
    x = torch.cat([images for images, _ in ctx.batches]).float()
    stats = channel_stats(x)
    evidence = (f'{len(x)} images: mean per channel {fmt(torch.tensor(stats["mean"]))}, std '
                f'{fmt(torch.tensor(stats["std"]))}, range [{stats["min"]:.3g}, '
                f'{stats["max"]:.3g}]')
    problems = scale_problems(stats, normalize_constants(ctx.run.train_data.transforms))
    blank, odd = content_problems(x) if not problems else ([], [])
    return verdict('normalisation', evidence, stats, problems + blank,
                   odd + spread_warnings(stats))


# The validation path ---------------------------------------------------------------

def as_training_input(train_data, path):
    """One file through the training transforms, in the form they expect (a decoded PIL
    image, or with --preload the uint8 tensor the cache would hold)."""
    if getattr(train_data, 'cache', None) is not None:
        img = decode_small(path, *train_data.preload_sizes)
    else:
        img = load_or_skip(path)
    return None if isinstance(img, Skipped) else train_data.transforms(img)


def same_images_both_ways(train_data, dataset, count=16):
    """([as served by `dataset`], [the same files through the training transforms])."""
    indices = np.linspace(0, len(dataset) - 1, min(count, len(dataset))).astype(int).tolist()
    served, trained = [], []
    with torch.random.fork_rng():  # the training transforms' random crops, repeatably
        torch.manual_seed(0)
        for i in indices:
            item = dataset[i]
            other = as_training_input(train_data, dataset.samples[i][0])
            if not isinstance(item, Skipped) and other is not None:
                served.append(item[0])
                trained.append(other)
    return served, trained


def stacked(split, images):
    """(one tensor, []) or (None, problems) when the images differ in shape: the loader's
    collate could not batch them either."""
    shapes = sorted({tuple(x.shape) for x in images})
    if len(shapes) == 1:
        return torch.stack(images), []
    return None, [(f'{split} images come in {len(shapes)} shapes ({shapes[0]}, {shapes[-1]}, ...)',
                   f'crop {split} images to one size: T.Resize(image_size) then '
                   f'T.CenterCrop(image_size), as data.dataset.default_transforms does')]


def own_problems(split, served, constants):
    """With training inputs already failing, `split` images judged on their own."""
    fix = (f'prepare {split} images as data.dataset.default_transforms does: ToTensor, then '
           f'Normalize(model.input_mean, model.input_std)')
    found = scale_problems(channel_stats(served), constants) + content_problems(served)[0]
    return [(f'{split} images: {text}', fix) for text, _ in found], []


def preparation_problems(split, served, trained, constants):
    """How `split` images differ from the same images prepared for training."""
    if served.shape[1] != trained.shape[1]:
        return [(f'{split} images have {served.shape[1]} channels, training ones '
                 f'{trained.shape[1]}', 'prepare every split with the same transforms up to '
                 'the random augmentation')], []
    a, b = channel_stats(served), channel_stats(trained)
    shift = max(abs(m - n) / max(s, 1e-6) for m, n, s in zip(a['mean'], b['mean'], b['std']))
    scale = max(max(s / max(t, 1e-6), t / max(s, 1e-6)) for s, t in zip(a['std'], b['std']))
    size, train_size = served.shape[-1], trained.shape[-1]
    text = (f'{split} mean {fmt_tuple(a["mean"])} std {fmt_tuple(a["std"])} vs training '
            f'{fmt_tuple(b["mean"])} {fmt_tuple(b["std"])} for the same images')
    fix = (f'build {split} transforms as the training ones without augmentation: '
           f"default_transforms('{'test' if split == 'test' else 'val'}', image_size, "
           f'model.input_mean, model.input_std) (same size, ToTensor, Normalize)')
    if shift > 1 or scale > 2:
        used = (f'; {split} transforms use Normalize(mean={fmt_tuple(constants[0])}, '
                f'std={fmt_tuple(constants[1])})' if constants else
                f'; {split} transforms have no Normalize')
        return [(f'{split} images are prepared differently from training ones: {text}{used}',
                 fix)], []
    if max(size, train_size) > 1.5 * min(size, train_size):
        return [], [(f'{split} images are {size} px, training ones {train_size} px', fix)]
    return [], []


def loader_problems(run):
    """The validation loader must iterate the validation split, not training images."""
    dataset = getattr(run.val_loader, 'dataset', None)
    samples = getattr(dataset, 'samples', None)
    if dataset is run.val_data or samples is None:
        return []
    training = {os.path.realpath(p) for p, _ in run.train_data.samples}
    shared = sum(os.path.realpath(p) in training for p, _ in samples)
    if not shared:
        return []
    return [(f'the validation loader serves {shared}/{len(samples)} training images',
             "build it over the validation split: builder.loader(opt, val_data, shuffle=False)")]


def test_split(run):
    """The test folder as `test` would read it, or None when there is none to read."""
    root = run.opt.test_data_root
    if not root or not os.path.isdir(root):
        return None
    try:
        return builder.datasets(run.opt, run.model, ('test',))
    except Exception:  # an unreadable test folder is the test command's business
        return None


def check_validation(ctx):
    """The same validation (and test) files through their own transforms and through the
    training ones: scale, normalisation and size must match; and the validation loader
    must serve the validation split."""
    run = ctx.run
    problems, warnings_, parts = loader_problems(run), [], []
    # training images that fail their own check are no reference: judge these on their own
    training_failed = getattr(ctx.result('normalisation'), 'status', None) == FAIL
    for split, dataset in (('val', run.val_data), ('test', test_split(run))):
        if dataset is None or not len(dataset):
            continue
        served, trained = same_images_both_ways(run.train_data, dataset)
        (served, bad), (trained, odd) = stacked(split, served), stacked('training', trained)
        problems += bad + odd
        if served is None or trained is None:
            continue
        compare = own_problems if training_failed else preparation_problems
        bad, odd = compare(split, served, *([] if training_failed else [trained]),
                           normalize_constants(dataset.transforms))
        problems, warnings_ = problems + bad, warnings_ + odd
        stats = channel_stats(served)
        parts.append(f'{len(served)} {split} images: mean {fmt_tuple(stats["mean"])}, std '
                     f'{fmt_tuple(stats["std"])}, {served.shape[-1]} px')
    evidence = ('; '.join(parts) + ', compared with the same files through the training '
                'transforms' if parts else 'no validation images compared')
    return verdict('validation', evidence, dict(parts=parts), problems, warnings_)
