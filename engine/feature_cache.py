"""Frozen backbone, fast: compute its features once, then train the head on them.

With --freeze the backbone is a fixed function, so when the input transforms are
deterministic every epoch would recompute the same features. They are captured once
at the head's input (a forward pre-hook: no per-model code, or the second output of
the network exported to ONNX Runtime when --engine picks it) and each epoch then costs
only the head's forward and backward on the cached tensors.
"""
import contextlib
import functools
import time

import torch
from torch import nn
from torch.utils import data

from data.dataset import Skipped
from engine import onnx_engine
from utils.progress import Progress

CACHE_LIMIT_BYTES = 4 * 2 ** 30  # beyond this the features stay uncached


class HeadOnFeatures(nn.Module):
    """Stands in for the model in the training loop: runs its head on cached
    features. Everything else (save, model_name, state_dict) is the whole model's,
    so the checkpoints are ordinary ones."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, features):
        return self.model.head()(features)

    def state_dict(self, *args, **kwargs):
        return self.model.state_dict(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.model, name)


def random_transforms(dataset):
    """Names of the random transforms applied to the dataset's images."""
    transforms = getattr(dataset, 'transforms', None)
    steps = getattr(transforms, 'transforms', [transforms])
    return [type(t).__name__ for t in steps
            if type(t).__name__.startswith('Random') or type(t).__name__ == 'ColorJitter']


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
    """Index i holds image i's backbone features (or its Skipped record), so the
    original samplers (per-epoch shuffle, torchrun shards, resume) apply unchanged."""

    def __init__(self, features, targets, unreadable):
        self.features, self.targets, self.unreadable = features, targets, unreadable

    def __len__(self):
        return len(self.features)

    def __getitem__(self, index):
        if index in self.unreadable:
            return self.unreadable[index]
        return self.features[index], int(self.targets[index])


@contextlib.contextmanager
def backbone_features(model, placement, network=None):
    """A function images -> fp32 features at the head's input: the second output of an
    ONNX Runtime network (engine/onnx_engine.py), else torch's forward with a pre-hook
    on the head (no per-model code)."""
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
def compute_features(model, loader, placement, skipped, desc='feature cache', network=None):
    """CachedFeatures of loader's dataset, captured at the head's input (through
    `network`, an OnnxNetwork of model, when given); None when they would not fit in
    CACHE_LIMIT_BYTES."""
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
            backbone_features(model, placement, network) as extract:
        for good, bad, images, batch_targets, batch_skipped in Progress(in_order, desc):
            skipped.add(batch_skipped)
            unreadable.update(bad)
            if images is None:
                continue
            batch_features = extract(images)
            if features is None:
                if batch_features[0].numel() * batch_features.element_size() * len(dataset) \
                        > CACHE_LIMIT_BYTES:
                    return None
                features = batch_features.new_zeros((len(dataset), *batch_features.shape[1:]))
                targets = torch.zeros(len(dataset), dtype=torch.long)
            features[good] = batch_features
            targets[good] = batch_targets
    return CachedFeatures(features, targets, unreadable) if features is not None else None


def cached_loader(cache, loader):
    """loader's batching, sampler and collate, over the cached features."""
    return data.DataLoader(cache, batch_size=loader.batch_size, sampler=loader.sampler,
                           collate_fn=loader.collate_fn)


def use_cached_features(run):
    """The module the training loop runs: run.model, unless its backbone is frozen and
    the transforms are deterministic; then a stand-in that runs the head only, with
    run.train_loader and run.val_loader replaced by loaders of cached features."""
    model = run.model
    if not model.frozen:
        return model
    random = random_transforms(run.train_loader.dataset)
    if random:
        print(f'feature cache off: the training images go through random transforms '
              f'({", ".join(random)}), so the frozen backbone sees different pixels every '
              f'epoch; pass --augment=False to compute its features once')
        return model
    start = time.time()
    # --engine: ONNX Runtime computes the features where it is faster (the head trains in torch)
    network = onnx_engine.choose(run.opt, model, run.placement,
                                 len(run.train_loader.dataset) + len(run.val_loader.dataset))
    network = None if network is model else network
    train_cache = compute_features(model, run.train_loader, run.placement, run.skipped,
                                   'feature cache (train)', network)
    val_cache = train_cache and compute_features(model, run.val_loader, run.placement,
                                                 run.skipped, 'feature cache (val)', network)
    if val_cache is None:
        print(f'feature cache off: the features would not fit in '
              f'{CACHE_LIMIT_BYTES / 2 ** 30:.0f} GiB of memory')
        return model
    print(f'feature cache: backbone features of {len(train_cache)} training and '
          f'{len(val_cache)} validation images computed once in {time.time() - start:.1f}s '
          f'(shape {tuple(train_cache.features.shape[1:])}); each epoch trains the head only')
    run.train_loader = cached_loader(train_cache, run.train_loader)
    run.val_loader = cached_loader(val_cache, run.val_loader)
    return HeadOnFeatures(model)
