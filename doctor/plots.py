"""What the doctor draws for a person to look at: a labelled grid of training images and
the LR range test, as PNGs under <checkpoint_dir>/doctor/ and in Visdom when it runs."""
import math
import os

import numpy as np
from PIL import Image, ImageDraw
from torchvision.transforms.functional import to_pil_image
from torchvision.utils import make_grid

from data.dataset import CLASSES


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

