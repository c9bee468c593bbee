"""Generated stand-ins for the Kaggle images, for the demo and the tests.

"Cats" carry horizontal stripes, "dogs" vertical ones, on random colours with noise:
a pattern a small CNN learns in a few epochs, which random augmentation preserves
(flips and crops keep stripe orientation).
"""
import os

import numpy as np
from PIL import Image


def striped_image(label, size, rng):
    """An RGB uint8 array: stripes across rows for a cat (0), columns for a dog (1)."""
    period = rng.uniform(size / 6, size / 3)
    phase = rng.uniform(0, 2 * np.pi)
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * np.arange(size) / period + phase)
    pattern = np.broadcast_to(wave[:, None] if label == 0 else wave[None, :], (size, size))
    fg, bg = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    img = pattern[..., None] * fg + (1 - pattern[..., None]) * bg
    img += rng.normal(0, 20, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_labelled_images(root, n_per_class, size=80, seed=0, layout='kaggle'):
    """Write cat.N.jpg / dog.N.jpg (layout 'kaggle') or cat/N.jpg, dog/N.jpg ('folders')."""
    rng = np.random.RandomState(seed)
    os.makedirs(root, exist_ok=True)
    for label, name in enumerate(('cat', 'dog')):
        for i in range(n_per_class):
            if layout == 'kaggle':
                path = os.path.join(root, f'{name}.{i}.jpg')
            else:
                os.makedirs(os.path.join(root, name), exist_ok=True)
                path = os.path.join(root, name, f'{i}.jpg')
            Image.fromarray(striped_image(label, size, rng)).save(path, quality=90)
    return root


def make_test_images(root, n, size=80, seed=1):
    """Write 1.jpg ... n.jpg; returns {id: label} (the truth Kaggle keeps hidden)."""
    rng = np.random.RandomState(seed)
    os.makedirs(root, exist_ok=True)
    truth = {}
    for image_id in range(1, n + 1):
        truth[image_id] = int(rng.randint(2))
        Image.fromarray(striped_image(truth[image_id], size, rng)).save(
            os.path.join(root, f'{image_id}.jpg'), quality=90)
    return truth
