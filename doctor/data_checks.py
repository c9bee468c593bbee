"""Checks of what the training loader serves: the sampler's order, and the labels."""
import itertools
import math
import os

import numpy as np
from torch.utils.data import IterableDataset

from data.dataset import CLASSES, LABELLED_NAME, Skipped
from doctor.common import PASS, Result, verdict
from doctor.plots import show_labelled_grid

LOADER_FIX = ('build the training loader as train does: builder.loader(opt, train_data, '
              'shuffle=True), i.e. data.dataset.build_loader (a seeded EpochShuffleSampler)')


# Shuffling ---------------------------------------------------------------------------

def listed_labels(dataset):
    """The label of every item as the dataset lists it (not as it serves it)."""
    samples = getattr(dataset, 'samples', None)
    return None if samples is None else [target for _, target in samples]


def loader_order(loader, dataset_size):
    """The dataset indices the loader's batch sampler visits in one epoch, batch by batch;
    None where the loader has none (an iterable data set)."""
    batch_sampler = getattr(loader, 'batch_sampler', None)
    if batch_sampler is None or isinstance(loader.dataset, IterableDataset):
        return None
    limit = dataset_size // max(getattr(loader, 'batch_size', 1) or 1, 1) + 2
    return [list(batch) for batch in itertools.islice(batch_sampler, limit)]


def runs_z(labels):
    """Wald-Wolfowitz runs test: z far below 0 when equal labels cluster (sorted files),
    about 0 for a random order."""
    n1 = sum(labels)
    n0, n = len(labels) - n1, len(labels)
    if not n0 or not n1:
        return 0.0
    runs = 1 + sum(a != b for a, b in zip(labels, labels[1:]))
    mean = 2 * n0 * n1 / n + 1
    var = (mean - 1) * (mean - 2) / (n - 1)
    return (runs - mean) / math.sqrt(var) if var > 0 else 0.0


def single_class_chance(batches, share):
    """(single-class batches, expected under random sampling, chance of at least that many)
    among the first 64 batches (enough to tell, and the binomial stays in float range)."""
    batches = batches[:64]
    single = sum(len(set(b)) == 1 for b in batches)
    p = float(np.mean([share ** len(b) + (1 - share) ** len(b) for b in batches]))
    n = len(batches)
    chance = sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(single, n + 1))
    return single, p * n, chance


def check_shuffling(ctx):
    """The order train's sampler visits the listed labels in, over a whole epoch: sorted
    files give batches of one class; and what fit() needs of the sampler."""
    loader, dataset = ctx.run.train_loader, ctx.run.train_loader.dataset
    labels = listed_labels(dataset)
    order = loader_order(loader, len(dataset)) if labels is not None else None
    if order is None:
        return Result('shuffling', PASS, 'no listed labels or batch sampler to examine')
    batches = [[labels[i] for i in batch] for batch in order]
    sequence = [label for batch in batches for label in batch]
    share, served = float(np.mean(labels)), float(np.mean(sequence))
    single, expected, chance = single_class_chance(batches, share)
    z, covered = runs_z(sequence), len({i for b in order for i in b}) / len(dataset)
    sampler = type(loader.sampler).__name__
    evidence = (f'{sampler} over {len(dataset)} images, one epoch: {len(batches)} batches, '
                f'{single} single-class (random: {expected:.2g} expected, chance {chance:.1e}), '
                f'runs test z {z:.1f}, dog share served {served:.2f} (listed {share:.2f}), '
                f'{covered:.0%} of the images visited')
    data = dict(single=single, expected=expected, chance=chance, z=z, served=served,
                covered=covered)
    return verdict('shuffling', evidence, data, sampler_problems(loader, data))


def sampler_problems(loader, data):
    problems = []
    if (data['single'] and data['chance'] < 1e-3) or data['z'] < -5:
        problems.append(('the epoch visits the images in class order (batches of one class)',
                         LOADER_FIX))
    if data['served'] in (0.0, 1.0):
        problems.append((f'the sampler serves {CLASSES[int(data["served"])]}s only',
                         LOADER_FIX))
    elif data['covered'] < 0.9:
        problems.append((f'the sampler visits only {data["covered"]:.0%} of the images',
                         LOADER_FIX))
    if not hasattr(loader.sampler, 'set_epoch'):
        problems.append((f'train\'s fit() calls train_loader.sampler.set_epoch(epoch), which '
                         f'{type(loader.sampler).__name__} lacks: train would stop with an '
                         f'AttributeError', LOADER_FIX))
    return problems


# Labels ------------------------------------------------------------------------------

def label_from_name(path):
    """The label a file's folder (cat/, dog/) or name (cat.N.jpg) implies, else None."""
    folder = os.path.basename(os.path.dirname(path)).lower()
    if folder in CLASSES:
        return CLASSES.index(folder)
    match = LABELLED_NAME.match(os.path.basename(path))
    return CLASSES.index(match.group(1).lower()) if match else None


def class_counts(split, dataset):
    """(evidence part, problems, warnings) of one split's class balance."""
    counts = np.bincount(listed_labels(dataset), minlength=len(CLASSES))
    share = counts.min() / max(counts.sum(), 1)
    part = f'{split} {counts[0]} cats/{counts[1]} dogs'
    if counts.min() == 0:
        return part, [(f'no {CLASSES[int(counts.argmin())]} in {split}',
                       'put images of both classes in --train_data_root')], []
    if share < 0.3:
        return part, [], [(f'{split} is unbalanced ({share:.0%} minority)',
                           'balance the classes, or judge by the confusion matrix, not accuracy')]
    return part, [], []


def name_disagreements(splits):
    """(evidence part, problems, wrong count): listed labels against the file names."""
    parts, problems, total = [], [], 0
    for split, dataset in splits:
        named = [(p, t, label_from_name(p)) for p, t in dataset.samples]
        wrong = [(p, t) for p, t, n in named if n is not None and t != n]
        known = sum(n is not None for _, _, n in named)
        parts.append(f'{split} {known - len(wrong)}/{known} labels agree with the file names')
        total += len(wrong)
        if wrong:
            examples = ', '.join(f'{os.path.basename(p)}->{CLASSES[t]}' for p, t in wrong[:3])
            problems.append((f'{len(wrong)} {split} labels contradict the file name/folder '
                             f'({examples})',
                             'derive the label from the file name or folder as data.dataset '
                             'does (label 0 = cat, 1 = dog) and never shuffle labels apart '
                             'from their images'))
    return '; '.join(parts), problems, total


def first_indices(loader, dataset, count=16):
    """The indices of the loader's first batch (a real mix of classes), else `count`
    indices spread over the data set."""
    same = getattr(loader, 'dataset', None) is dataset
    order = loader_order(loader, len(dataset)) if same else None
    if order and order[0]:
        return order[0][:count]
    return np.linspace(0, len(dataset) - 1, min(count, len(dataset))).astype(int).tolist()


def served_labels(dataset, indices, collate):
    """(listed, from __getitem__, after collate_fn) labels of these items, fetched as a
    loader fetches them."""
    good = [(i, item) for i, item in ((i, dataset[i]) for i in indices)
            if not isinstance(item, Skipped)]
    listed = [dataset.samples[i][1] for i, _ in good]
    items = [int(item[1]) for _, item in good]
    collated = collate([item for _, item in good])[1].tolist() if collate and good else items
    return listed, items, collated


def served_problems(ctx):
    """Items served with another label than listed, by __getitem__ or by the collate_fn."""
    problems = []
    for split, dataset, loader in (('train', ctx.run.train_data, ctx.run.train_loader),
                                   ('val', ctx.run.val_data, ctx.run.val_loader)):
        same = getattr(loader, 'dataset', None) is dataset
        listed, items, collated = served_labels(dataset, first_indices(loader, dataset),
                                                same and loader.collate_fn)
        for where, served in (('DogCat.__getitem__', items), ("the loader's collate_fn", collated)):
            differ = sum(a != b for a, b in zip(listed, served))
            if differ:
                problems.append((f'{differ}/{len(listed)} {split} items served with another '
                                 f'label than listed (by {where})',
                                 f'{where} must return the label of samples[index], unchanged'))
                break
    return problems


def overlap_problems(train_data, val_data):
    overlap = ({os.path.realpath(p) for p, _ in train_data.samples}
               & {os.path.realpath(p) for p, _ in val_data.samples})
    part = f'{len(overlap)} files in both train and val'
    if not overlap:
        return part, []
    return part, [(f'{len(overlap)} files in both train and val (e.g. {sorted(overlap)[0]})',
                   'split with data.dataset.split_train_val (disjoint, seeded) and the same '
                   '--seed and --val_ratio for both splits')]


def check_labels(ctx):
    """Class balance, labels against file names, labels as served, train/val overlap, and
    a labelled grid of the first batch for a person to look at."""
    run = ctx.run
    parts, problems, warnings_ = [], [], []
    for split, dataset in (('train', run.train_data), ('val', run.val_data)):
        part, bad, odd = class_counts(split, dataset)
        parts.append(part)
        problems += bad
        warnings_ += odd
    part, wrong, wrong_count = name_disagreements((('train', run.train_data),
                                                   ('val', run.val_data)))
    parts.append(part)
    problems += wrong + served_problems(ctx)
    part, overlap = overlap_problems(run.train_data, run.val_data)
    parts.append(part)
    problems += overlap
    images, targets = ctx.batches[0]
    where = show_labelled_grid(images[:32], targets[:32], ctx.out_dir, run.vis)
    parts.append(f'labelled samples: {where}')
    data = dict(problems=[text for text, _ in problems], wrong=wrong_count, overlap=len(overlap),
                grid=where)
    return verdict('labels', '; '.join(parts), data, problems, warnings_)

