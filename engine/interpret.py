"""Mistakes you can look at: the validation images the model gets most confidently
wrong (fastai's plot_top_losses), and Grad-CAM maps of what drove those decisions.

TopMistakes rides along evaluate()'s validation pass (engine/loop.py): one
cross-entropy per batch and a heap of k, no second pass. `train` shows the gallery in
Visdom after each validation; `python main.py interpret` adds the Grad-CAM overlays and
writes PNGs and an HTML page to <checkpoint_dir>/interpret/. The Kaggle training set
holds mislabelled and non-cat/dog photos: they come out on top here.
"""
import glob
import heapq
import html
import math
import os
import warnings
from collections import namedtuple

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from data.dataset import CLASSES, Skipped
from utils import checkpoint, distributed
from utils.visualize import pixels

PANE = 'most confident mistakes'
CAM_PANE = 'Grad-CAM of the mistakes'
TOP_K = 16
MIN_PNG_WIDTH = 160  # small inputs (32-64 px) are scaled up, pixel for pixel, to see them

# loss first: the heap and the sort order by it
Mistake = namedtuple('Mistake', 'loss index path p_dog label')


class TopMistakes:
    """The k misclassified images with the highest loss seen in one pass over a dataset
    whose `samples` are [(path, label)]."""

    def __init__(self, samples, k=TOP_K):
        self.samples, self.k, self.heap = samples, k, []
        self.lost = False  # batches no longer name their images: stop, say so once

    def add(self, indices, skipped, scores, targets):
        """One batch: `indices` are the dataset indices its sampler drew, `skipped` the
        Skipped records the collate dropped (they have no row in `scores`)."""
        if skipped and indices is not None:
            dropped = {s.path for s in skipped}
            indices = [i for i in indices if self.samples[i][0] not in dropped]
        if self.lost or indices is None or len(indices) != len(scores):
            if not self.lost:  # a diagnostic pane must not stop a training run
                warnings.warn('the validation loader does not batch its sampler in order: '
                              'no gallery of the most confident mistakes')
            self.lost, self.heap = True, []
            return
        scores, targets = scores.detach().float().cpu(), targets.cpu()
        wrong = (scores.argmax(1) != targets).nonzero().flatten().tolist()
        if not wrong:
            return
        losses = F.cross_entropy(scores, targets, reduction='none').tolist()
        p_dog = scores.softmax(1)[:, 1].tolist()
        for j in wrong:
            index = indices[j]
            item = Mistake(losses[j], index, self.samples[index][0], p_dog[j], int(targets[j]))
            if len(self.heap) < self.k:
                heapq.heappush(self.heap, item)
            else:
                heapq.heappushpop(self.heap, item)

    def worst(self):
        """The k worst over every rank, highest loss first, on rank 0 (a collective
        call under torchrun: every rank makes it; the others get [])."""
        gathered = distributed.gather_to_main(self.heap)
        return sorted(gathered or [], reverse=True)[:self.k]


def in_order_batches(loader):
    """An iterator over the dataset indices of each batch `loader` yields, when its
    sampler has a fixed order (evaluation's ShardSampler); else None."""
    if getattr(loader, 'batch_sampler', None) is None or getattr(loader.sampler, 'shuffle', False):
        return None
    return iter(loader.batch_sampler)


def caption(mistake):
    """Three short lines under a 128-pixel tile: true label, P(dog), file name."""
    name = os.path.basename(mistake.path)
    name = name if len(name) <= 20 else '...' + name[-17:]
    return f'true {CLASSES[mistake.label]}\nP(dog)={mistake.p_dog:.3f}\n{name}'


def load_images(dataset, mistakes):
    """The mistakes' images from the dataset itself (under the feature cache the
    validation loader holds features, not pixels); a file gone since is left out."""
    kept, images = [], []
    for mistake in mistakes:
        sample = dataset[mistake.index]
        if not isinstance(sample, Skipped):
            kept.append(mistake)
            images.append(sample[0])
    return kept, (torch.stack(images) if images else None)


def draw_gallery(vis, name, images, captions, title, **normalisation):
    """A gallery pane, or a line saying there is nothing to show (the last epoch's
    gallery would otherwise stay in the pane, looking current)."""
    if not captions:
        vis.show(name, lambda: vis.text('no misclassified validation image', win=name,
                                        opts=dict(title=title)))
        return
    vis.gallery(name, images, captions, title=title, **normalisation)


def epoch_mistakes(run, mistakes, val_meter, epoch):
    """After a validation in `train`: gather the worst, show them (rank 0 with Visdom)."""
    worst = mistakes.worst()
    if run.vis is not None:
        kept, images = load_images(run.val_data, worst)
        draw_gallery(run.vis, PANE, images, [caption(m) for m in kept],
                     f'epoch {epoch}: most confident mistakes ({len(kept)} of '
                     f'{val_meter.total - val_meter.correct}, by loss)',
                     mean=run.model.input_mean, std=run.model.input_std)


def grad_cam(model, images, classes=None):
    """Grad-CAM (Selvaraju et al., 2017): (N,H,W) maps in [0,1] of where `images` drove
    the scores of `classes` (default: the predicted ones). The layer is found without
    per-model code: the last module forward runs whose output is a spatial map
    (N,C,H,W with H*W > 1), i.e. the input of the global pool. Needs autograd: do not
    call it under torch.inference_mode."""
    last = {}

    def keep(module, args, output):
        if torch.is_tensor(output) and output.dim() == 4:
            last['any'] = output
            if output.shape[2] * output.shape[3] > 1:
                last['spatial'] = output
    hooks = [m.register_forward_hook(keep) for m in model.modules() if m is not model]
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            # the input needs grad, so that a frozen backbone still builds the graph
            scores = model(images.detach().float().requires_grad_(True)).float()
            feature = last.get('spatial', last.get('any'))
            if feature is None:
                raise ValueError(f'{type(model).__name__} has no layer with a spatial output')
            classes = scores.argmax(1) if classes is None else torch.as_tensor(classes)
            chosen = scores.gather(1, classes.view(-1, 1).to(scores.device)).sum()
            (grads,) = torch.autograd.grad(chosen, feature)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    weights = grads.float().mean((2, 3), keepdim=True)  # each channel's importance
    cam = F.relu((weights * feature.detach().float()).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=images.shape[-2:], mode='bilinear', align_corners=False)
    peak = cam.flatten(1).max(1).values.clamp_min(1e-12).view(-1, 1, 1, 1)
    return (cam / peak)[:, 0].cpu()


def jet(values):
    """A jet colour map (blue -> red) for values in [0,1]: (H,W) -> (H,W,3) in [0,1]."""
    v = np.asarray(values, dtype=np.float32)[..., None]
    return np.clip(1.5 - np.abs(4 * v - np.array([3.0, 2.0, 1.0])), 0, 1)


def overlays(images, cams, alpha=0.5):
    """Images (N,3,H,W) in [0,1] blended with their CAMs' colours: (N,3,H,W) in [0,1]."""
    heat = jet(np.asarray(cams)).transpose(0, 3, 1, 2)
    return (1 - alpha) * images + alpha * heat


def save_png(image, path):
    """(3,H,W) in [0,1] as a PNG at least MIN_PNG_WIDTH wide (nearest: pixels stay sharp)."""
    picture = Image.fromarray((image.transpose(1, 2, 0) * 255).round().astype(np.uint8))
    factor = max(1, math.ceil(MIN_PNG_WIDTH / picture.width))
    picture.resize((picture.width * factor, picture.height * factor), Image.NEAREST).save(path)


def interpret(run, vis=None, k=TOP_K):
    """`python main.py interpret`: one validation pass keeping the k worst mistakes, their
    Grad-CAM overlays (for the class predicted), the PNGs and index.html in
    <checkpoint_dir>/interpret/, and both galleries in Visdom when `vis` is given.
    Returns the mistakes shown, worst first (None on other torchrun ranks)."""
    from engine import onnx_engine
    from engine.loop import evaluate  # engine.loop imports this module: import here
    mistakes = TopMistakes(run.val_data.samples, k)
    network = onnx_engine.for_inference(run)  # the pass as `val` runs it (--engine)
    meter = evaluate(network, run.val_loader, run.placement, run.skipped, mistakes=mistakes)
    meter.all_reduce(run.placement.device)
    worst = mistakes.worst()
    if not distributed.is_main():
        return None
    model = run.model
    kept, images = load_images(run.val_data, worst)
    pictures = blended = np.zeros((0, 3, 1, 1), np.float32)
    if kept:
        pictures = pixels(images, model.input_mean, model.input_std)
        cams = grad_cam(model, run.placement.place(images), [1 - m.label for m in kept])
        blended = overlays(pictures, cams.numpy())
    page = write_report(run.opt, kept, pictures, blended, meter)
    if vis is not None:
        captions = [caption(m) for m in kept]
        wrong = meter.total - meter.correct
        draw_gallery(vis, PANE, pictures, captions,
                     f'most confident mistakes ({len(kept)} of {wrong}, by loss)')
        draw_gallery(vis, CAM_PANE, blended, captions, 'Grad-CAM: red drove the prediction')
        vis.close()
    print(f'{meter.total - meter.correct} of {meter.total} validation images misclassified; '
          f'the {len(kept)} with the highest loss (true label, P(dog), loss, file):')
    for m in kept:
        print(f'  {CLASSES[m.label]}  P(dog)={m.p_dog:.4f}  loss {m.loss:.3f}  {m.path}')
    print(f'gallery and Grad-CAM overlays: {page}')
    if run.skipped.summary():
        warnings.warn(run.skipped.summary())
    return kept


def write_report(opt, mistakes, pictures, blended, meter):
    """mistake_NN.png, gradcam_NN.png and index.html (relative links: the folder opens
    anywhere, without a server) in <checkpoint_dir>/interpret/; returns the page's path."""
    out = os.path.join(opt.checkpoint_dir, 'interpret')
    os.makedirs(out, exist_ok=True)
    for stale in glob.glob(os.path.join(out, 'mistake_*.png')) + \
            glob.glob(os.path.join(out, 'gradcam_*.png')):
        os.remove(stale)  # a previous run's extra mistakes
    rows = []
    for rank, (m, picture, overlay) in enumerate(zip(mistakes, pictures, blended), 1):
        names = f'mistake_{rank:02d}.png', f'gradcam_{rank:02d}.png'
        save_png(picture, os.path.join(out, names[0]))
        save_png(overlay, os.path.join(out, names[1]))
        rows.append(f'<tr><td>{rank}</td><td><img src="{names[0]}" alt="image"></td>'
                    f'<td><img src="{names[1]}" alt="Grad-CAM"></td><td>true '
                    f'<b>{CLASSES[m.label]}</b>, predicted {CLASSES[1 - m.label]}<br>'
                    f'P(dog) = {m.p_dog:.4f}<br>loss {m.loss:.3f}<br>'
                    f'<code>{html.escape(m.path)}</code></td></tr>')
    wrong = meter.total - meter.correct
    weights = opt.load_model_path or checkpoint.paths(opt.checkpoint_dir, opt.model)[1]
    summary = (f'{opt.model} from {html.escape(weights)}: '
               f'{wrong} of {meter.total} validation images misclassified '
               f'({meter.accuracy_cm:.2f}% accuracy). ')
    summary += (f'The {len(rows)} with the highest loss, worst first; left the image, right '
                f'Grad-CAM of the predicted class (red: the pixels that drove it).'
                if rows else 'Nothing to show.')
    page = os.path.join(out, 'index.html')
    with open(page, 'w', encoding='utf-8') as f:
        f.write(HTML.format(summary=summary, rows='\n'.join(rows)))
    return page


HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dogcat: most confident mistakes</title>
<style>body {{ font-family: sans-serif; margin: 2em; }} td {{ padding: 4px 12px; }}
img {{ width: 160px; image-rendering: pixelated; }} code {{ font-size: 90%; }}</style>
</head><body><h1>Most confident mistakes</h1><p>{summary}</p>
<table>
{rows}
</table></body></html>
"""
