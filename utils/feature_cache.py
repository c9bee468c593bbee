# coding: utf8
"""Frozen backbone, fast: compute its features once, then train the head on them.

With --freeze the backbone is a fixed function, so when the input transforms are
deterministic every epoch would recompute the same features. They are captured once
at the head's input (a forward pre-hook: no per-model code) and each epoch then costs
only the head's forward and backward on the cached tensors.
"""
import time

import torch
from torch import nn
from torch.utils import data

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


@torch.inference_mode()
def compute_features(model, loader, device, skipped):
    """(features, targets) at the head's input for every readable image in loader;
    None when they would not fit in CACHE_LIMIT_BYTES."""
    captured, targets = [], []
    hook = model.head().register_forward_pre_hook(
        lambda module, args: captured.append(args[0].detach().cpu()))
    model.eval()
    # Iterating a loader draws from the global RNG: fork it, so that training after
    # the cache sees the same random stream (dropout) as training without it.
    with torch.random.fork_rng(devices=[]):
        try:
            for images, batch_targets, bad in loader:
                skipped.add(bad)
                if images is None:
                    continue
                model(images.to(device))
                targets.append(batch_targets)
                per_image = captured[0][0].numel() * captured[0].element_size()
                if per_image * len(loader.dataset) > CACHE_LIMIT_BYTES:
                    return None
        finally:
            hook.remove()
    return torch.cat(captured), torch.cat(targets)


def in_order(loader):
    """The loader's dataset unshuffled: cached features keep the dataset's order, so
    the cached loader shuffles them exactly as the original loader shuffles images."""
    return data.DataLoader(loader.dataset, batch_size=loader.batch_size, shuffle=False,
                           num_workers=loader.num_workers, collate_fn=loader.collate_fn)


def cached_loader(features, targets, batch_size, shuffle, seed):
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return data.DataLoader(data.TensorDataset(features, targets), batch_size=batch_size,
                           shuffle=shuffle, generator=generator,
                           collate_fn=lambda batch: (torch.stack([f for f, _ in batch]),
                                                     torch.stack([t for _, t in batch]), []))


def use_cached_features(model, train_loader, val_loader, opt, skipped):
    """(model, train_loader, val_loader) for the training loop: unchanged unless the
    backbone is frozen and the transforms are deterministic; then loaders of cached
    features and a stand-in that runs the head only."""
    if not model.frozen:
        return model, train_loader, val_loader
    random = random_transforms(train_loader.dataset)
    if random:
        print(f'feature cache off: the training images go through random transforms '
              f'({", ".join(random)}), so the frozen backbone sees different pixels every '
              f'epoch; pass --augment=False to compute its features once')
        return model, train_loader, val_loader
    start = time.time()
    train_features = compute_features(model, in_order(train_loader), opt.device, skipped)
    val_features = (compute_features(model, in_order(val_loader), opt.device, skipped)
                    if train_features else None)
    if val_features is None:
        print(f'feature cache off: the features would not fit in '
              f'{CACHE_LIMIT_BYTES / 2 ** 30:.0f} GiB of memory')
        return model, train_loader, val_loader
    print(f'feature cache: backbone features of {len(train_features[1])} training and '
          f'{len(val_features[1])} validation images computed once in {time.time() - start:.1f}s '
          f'(shape {tuple(train_features[0].shape[1:])}); each epoch trains the head only')
    return (HeadOnFeatures(model),
            cached_loader(*train_features, opt.batch_size, True, opt.seed),
            cached_loader(*val_features, opt.batch_size, False, opt.seed))
