"""Frozen backbone, fast: compute its output once, then train the rest on it.

With --freeze the backbone is a fixed function, so when the input transforms are
deterministic every epoch would recompute the same features. They are captured once
at the head's input (a forward pre-hook: no per-model code, or the second output of
the network exported to ONNX Runtime when --engine picks it) and each epoch then costs
only the head's forward and backward on the cached tensors. With --unfreeze=N the
cache is taken at the input of the first unfrozen block instead, and each epoch runs
the last N blocks and the head. With --augment=flip the training images' mirror
images are cached too, and each epoch draws one of the two per image.
"""
import contextlib
import functools
import time

import torch
from torch import nn
from torch.utils import data
from torchvision import transforms as T

from data.dataset import Skipped
from engine import onnx_engine
from utils.progress import Progress

CACHE_LIMIT_BYTES = 4 * 2 ** 30  # beyond this the features stay uncached


class FromCache(nn.Module):
    """Stands in for the model in the training loop: runs what follows the cache on the
    cached tensors, the head (index None) or the blocks from stages()'s blocks[index] on.
    Everything else (save, model_name, state_dict) is the whole model's, so the
    checkpoints are ordinary ones."""

    def __init__(self, model, index=None):
        super().__init__()
        self.model, self.index = model, index

    def forward(self, cached):
        if self.index is None:
            return self.model.head()(cached)
        return self.model.forward_from(self.index, cached)

    def state_dict(self, *args, **kwargs):
        return self.model.state_dict(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.model, name)


def random_transforms(dataset):
    """Names of the random transforms applied to the dataset's images."""
    return [type(t).__name__ for t in transform_steps(dataset)
            if type(t).__name__.startswith('Random') or type(t).__name__ == 'ColorJitter']


def transform_steps(dataset):
    transforms = getattr(dataset, 'transforms', None)
    return getattr(transforms, 'transforms', [transforms])


@contextlib.contextmanager
def flips_off(dataset):
    """The dataset's random horizontal flips turned off: the cache computes each image
    and its mirror image itself."""
    flips = [t for t in transform_steps(dataset) if isinstance(t, T.RandomHorizontalFlip)]
    saved = [t.p for t in flips]
    for t in flips:
        t.p = 0.0
    try:
        yield
    finally:
        for t, p in zip(flips, saved):
            t.p = p


class Indexed(data.Dataset):
    """(index, sample): lets the capture put each image's features at its index."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return index, self.dataset[index]


def collate_indexed(batch, collate):
    """The loader's own collate, plus the indices of the good and of the bad samples."""
    good = [i for i, s in batch if not isinstance(s, Skipped)]
    bad = {i: s for i, s in batch if isinstance(s, Skipped)}
    images, targets, skipped = collate([s for _, s in batch])
    return good, bad, images, targets, skipped


class CachedFeatures(data.Dataset):
    """Index i holds image i's cached tensor (or its Skipped record), so the original
    samplers (per-epoch shuffle, torchrun shards, resume) apply unchanged. With
    `mirrored`, features[i] holds the image's and its mirror image's, and each visit
    draws one of them (a random flip)."""

    def __init__(self, features, targets, unreadable, mirrored=False):
        self.features, self.targets, self.unreadable = features, targets, unreadable
        self.mirrored = mirrored

    def __len__(self):
        return len(self.features)

    def __getitem__(self, index):
        if index in self.unreadable:
            return self.unreadable[index]
        features = self.features[index]
        if self.mirrored:
            features = features[int(torch.randint(2, ()))]
        return features, int(self.targets[index])


@contextlib.contextmanager
def frozen_part(model, placement, network=None, index=None):
    """A function images -> fp32 output of the model's frozen part: with index None the
    head's input (the second output of an ONNX Runtime network when given, else torch's
    forward with a pre-hook on the head: no per-model code); else the input of
    stages()'s blocks[index] (model.forward_to)."""
    if index is not None:
        yield lambda images: placement.forward(lambda x: model.forward_to(index, x), images).cpu()
        return
    if network is not None:
        yield network.features
        return
    captured = []
    hook = model.head().register_forward_pre_hook(
        lambda module, args: captured.append(args[0].detach().float().cpu()))

    def features(images):
        placement.forward(model, images)
        return captured.pop()
    try:
        yield features
    finally:
        hook.remove()


@torch.inference_mode()
def compute_features(model, loader, placement, skipped, desc='feature cache', network=None,
                     index=None, mirrored=False):
    """CachedFeatures of loader's dataset: the output of the model's frozen part
    (frozen_part(); through `network`, an OnnxNetwork of model, when given), of each
    image and with `mirrored` of its mirror image too; None when they would not fit
    in CACHE_LIMIT_BYTES."""
    dataset = loader.dataset
    in_order = data.DataLoader(Indexed(dataset), batch_size=loader.batch_size,
                               num_workers=loader.num_workers,
                               collate_fn=functools.partial(collate_indexed,
                                                            collate=loader.collate_fn))
    model.eval()
    features = targets = None
    unreadable = {}
    # Iterating a loader draws from the global RNG: fork it, so that training after
    # the cache sees the same random stream (dropout) as training without it.
    with torch.random.fork_rng(devices=[]), \
            frozen_part(model, placement, network, index) as extract:
        for good, bad, images, batch_targets, batch_skipped in Progress(in_order, desc):
            skipped.add(batch_skipped)
            unreadable.update(bad)
            if images is None:
                continue
            batch = extract(images)
            if mirrored:
                batch = torch.stack([batch, extract(images.flip(-1))], dim=1)
            if features is None:
                if batch[0].numel() * batch.element_size() * len(dataset) > CACHE_LIMIT_BYTES:
                    return None
                features = batch.new_zeros((len(dataset), *batch.shape[1:]))
                targets = torch.zeros(len(dataset), dtype=torch.long)
            features[good] = batch
            targets[good] = batch_targets
    if features is None:
        return None
    return CachedFeatures(features, targets, unreadable, mirrored)


def cached_loader(cache, loader):
    """loader's batching, sampler and collate, over the cached features."""
    return data.DataLoader(cache, batch_size=loader.batch_size, sampler=loader.sampler,
                           collate_fn=loader.collate_fn)


def cache_point(model):
    """Where the cache is taken: None (the head's input) when only the head trains,
    else the index in stages()'s blocks of the first unfrozen block."""
    if not model.unfrozen:
        return None
    return len(model.stages()[1]) - len(model.unfrozen)


def why_not_cached(run):
    """Why the frozen part's output cannot be computed once, or None when it can."""
    if run.opt.unfreeze == 'all':
        return '--unfreeze=all trains every layer, so there is no fixed part to cache'
    random = [name for name in random_transforms(run.train_loader.dataset)
              if not (name == 'RandomHorizontalFlip' and run.opt.augment == 'flip')]
    if random:
        return (f'the training images go through random transforms ({", ".join(random)}), '
                f'so the frozen part sees different pixels every epoch; pass --augment=flip '
                f'(mirror images, cached too) or --augment=False to compute its output once')
    return None


def use_cached_features(run):
    """The module the training loop runs: run.model, unless part of it is frozen and the
    transforms are deterministic (or flips only); then a stand-in that runs the rest,
    with run.train_loader and run.val_loader replaced by loaders of cached tensors."""
    model = run.model
    if not model.frozen:
        return model
    reason = why_not_cached(run)
    if reason:
        print(f'feature cache off: {reason}')
        return model
    start, index = time.time(), cache_point(model)
    network = None
    if index is None:  # --engine: ONNX Runtime computes the head's input where it is faster
        network = onnx_engine.choose(run.opt, model, run.placement,
                                     len(run.train_loader.dataset) + len(run.val_loader.dataset))
        network = None if network is model else network
    with flips_off(run.train_loader.dataset):
        train_cache = compute_features(model, run.train_loader, run.placement, run.skipped,
                                       'feature cache (train)', network, index,
                                       mirrored=run.opt.augment == 'flip')
    val_cache = train_cache and compute_features(model, run.val_loader, run.placement,
                                                 run.skipped, 'feature cache (val)', network, index)
    if val_cache is None:
        print(f'feature cache off: the features would not fit in '
              f'{CACHE_LIMIT_BYTES / 2 ** 30:.0f} GiB of memory')
        return model
    where = 'the head\'s input' if index is None else f'the input of block {index}'
    print(f'feature cache: {where} for {len(train_cache)} training'
          f'{" (and their mirror images)" if train_cache.mirrored else ""} and '
          f'{len(val_cache)} validation images computed once in {time.time() - start:.1f}s '
          f'(shape {tuple(val_cache.features.shape[1:])}); each epoch trains '
          f'{"the head" if index is None else "the unfrozen blocks and the head"} only')
    run.train_loader = cached_loader(train_cache, run.train_loader)
    run.val_loader = cached_loader(val_cache, run.val_loader)
    return FromCache(model, index)
