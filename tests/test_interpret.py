"""Mistakes you can look at (issue 16): the top-k collector of the validation pass,
`python main.py interpret` (gallery, Grad-CAM overlays, PNGs and an HTML page) and
Grad-CAM itself on a generated "cat" whose stripes fill only the centre."""
import math
import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import config
import main
from data.dataset import (CLASSES, EpochShuffleSampler, ShardSampler, Skipped, SkippedFiles,
                          collate_skipping_bad, list_labelled_images, split_train_val)
from engine.feature_cache import CachedFeatures, cached_loader
from engine.interpret import CAM_PANE, PANE, TopMistakes, grad_cam, interpret
from engine.loop import evaluate
from models import SmallResNet
from utils.device import Placement


@pytest.fixture(scope='module')
def trained(striped_data, tmp_path_factory):
    """SmallResNet trained on the generated set as test_train's learning test trains it
    (>= 90% validation accuracy there)."""
    tmp = tmp_path_factory.mktemp('interpret')
    options = dict(train_data_root=striped_data['train'], model='SmallResNet', image_size=32,
                   batch_size=8, max_epoch=10, lr=2e-3, num_workers=0, vis=False,
                   checkpoint_dir=str(tmp / 'checkpoints'), debug_file=str(tmp / 'no_debug'))
    main.train(**options)
    model = SmallResNet()
    model.load(os.path.join(options['checkpoint_dir'], 'SmallResNet_best.pth'))
    return dict(options, max_epoch=1), model.eval(), tmp


def test_top_mistakes_keeps_the_k_worst_and_skips_dropped_images():
    samples = [(f'img{i}.jpg', i % 2) for i in range(8)]
    top = TopMistakes(samples, k=2)
    # batch 1: indices 0-3, image 1 unreadable (the collate dropped it): 3 score rows
    scores = torch.tensor([[0.0, 3.0], [0.0, 1.0], [0.0, -2.0]])  # for 0, 2, 3
    top.add([0, 1, 2, 3], [Skipped('img1.jpg', 'broken')], scores, torch.tensor([0, 0, 1]))
    # batch 2: every image right but index 6, a cat called dog less confidently
    top.add([4, 5, 6, 7], [], torch.tensor([[2.0, 0.0], [0.0, 2.0], [0.0, 0.5], [0.0, 2.0]]),
            torch.tensor([0, 1, 0, 1]))
    worst = top.worst()
    assert [m.index for m in worst] == [0, 3]  # 3.05 and 2.13 beat image 2 (1.31), 6 (0.97)
    assert worst[0].path == 'img0.jpg' and worst[0].label == 0
    assert worst[0].p_dog == pytest.approx(torch.sigmoid(torch.tensor(3.0)).item())
    assert worst[0].loss == pytest.approx(-math.log(1 - worst[0].p_dog))
    # a loader whose batches do not follow its sampler: one warning, then nothing to show
    with pytest.warns(UserWarning, match='does not batch its sampler in order'):
        top.add([0, 1], [], scores, torch.tensor([0, 0, 1]))
    top.add([0, 1, 2], [], scores, torch.tensor([0, 0, 1]))
    assert top.worst() == []


def test_evaluate_maps_cached_features_to_their_images(tmp_path):
    """Under the feature cache the loader yields features: positions still name the
    dataset's images, with unreadable ones dropped from their batch."""
    torch.manual_seed(0)
    features, targets = torch.randn(23, 4), torch.randint(0, 2, (23,))
    samples = [(f'{i}.jpg', int(t)) for i, t in enumerate(targets)]
    unreadable = {5: Skipped('5.jpg', 'broken'), 16: Skipped('16.jpg', 'broken')}
    plain = torch.utils.data.DataLoader(range(23), batch_size=4, sampler=ShardSampler(range(23)),
                                        collate_fn=collate_skipping_bad)  # as build_loader's
    loader = cached_loader(CachedFeatures(features, targets, unreadable), plain)
    head = nn.Linear(4, 2)
    top = TopMistakes(samples, k=5)
    with pytest.warns(UserWarning, match='skipping unreadable image'):
        meter = evaluate(head, loader, Placement('cpu', channels_last=False), SkippedFiles(),
                         mistakes=top)
    assert meter.total == 21
    wrong = [i for i in range(23) if i not in unreadable
             and head(features[i]).argmax().item() != targets[i]]
    worst = top.worst()
    assert len(worst) == min(5, len(wrong)) and {m.index for m in worst} <= set(wrong)
    for m in worst:
        assert m.p_dog == pytest.approx(head(features[m.index]).softmax(0)[1].item(), abs=1e-6)
        assert m.path == f'{m.index}.jpg'
    assert [m.loss for m in worst] == sorted((m.loss for m in worst), reverse=True)
    # a shuffled loader's batches cannot be matched to images: no gallery, one warning
    shuffled = TopMistakes(samples)
    loader = cached_loader(CachedFeatures(features, targets, {}), torch.utils.data.DataLoader(
        range(23), batch_size=4, sampler=EpochShuffleSampler(range(23), seed=0),
        collate_fn=collate_skipping_bad))
    with pytest.warns(UserWarning, match='does not batch its sampler in order'):
        evaluate(head, loader, Placement('cpu', channels_last=False), SkippedFiles(),
                 mistakes=shuffled)
    assert shuffled.worst() == []


def swap_some_labels(options, tmp):
    """A copy of the training folder where three validation cats and three validation
    dogs trade pixels: same names, so the same split, now six mislabelled photos (the
    Kaggle set's known problem); and one other validation file made unreadable."""
    root = tmp / 'relabelled'
    shutil.copytree(options['train_data_root'], root)
    opt = config.parse(dict(options, train_data_root=str(root)), verbose=False)
    _, val = split_train_val(list_labelled_images(str(root)), opt.val_ratio, opt.seed)
    cats = [path for path, label in val if label == 0]
    dogs = [path for path, label in val if label == 1]
    for cat, dog in zip(cats[:3], dogs[:3]):
        os.rename(cat, f'{cat}.tmp')
        os.rename(dog, cat)
        os.rename(f'{cat}.tmp', dog)
    with open(cats[3], 'wb') as f:
        f.write(b'not a jpeg')
    return str(root), set(cats[:3] + dogs[:3]), cats[3]


@pytest.fixture(scope='module')
def relabelled(trained):
    """`interpret` on the copy with six mislabelled photos and an unreadable one."""
    options, _, tmp = trained
    root, swapped, broken = swap_some_labels(options, tmp)
    with pytest.warns(UserWarning, match='unreadable'):
        shown = main.interpret(**dict(options, train_data_root=root))
    return dict(options, train_data_root=root), shown, swapped, broken


def test_interpret_finds_the_mislabelled_photos_worst_first(relabelled):
    options, shown, swapped, broken = relabelled
    assert 6 <= len(shown) <= 16
    assert [m.loss for m in shown] == sorted((m.loss for m in shown), reverse=True)
    assert all((m.p_dog > 0.5) != bool(m.label) for m in shown)  # misclassified
    assert all(math.exp(-m.loss) == pytest.approx(m.p_dog if m.label else 1 - m.p_dog, abs=1e-6)
               for m in shown)  # the loss is the cross-entropy of the true label
    assert shown[0].path in swapped and len(swapped & {m.path for m in shown}) >= 5
    assert broken not in {m.path for m in shown}
    # positions map to the right files: the model on each file gives the recorded P(dog)
    # (up to --bf16=auto's rounding where the CPU has it)
    run = main.builder.for_evaluation(config.parse(options, verbose=False), 'val')
    with torch.no_grad():
        for m in shown:
            assert run.val_data.samples[m.index][0] == m.path
            scores = run.placement.forward(run.model.eval(), run.val_data[m.index][0][None])
            assert scores.softmax(1)[0, 1].item() == pytest.approx(m.p_dog, abs=2e-3)


def test_interpret_writes_pngs_and_a_page_linking_them(trained, relabelled, capsys):
    options, shown, _, _ = relabelled
    out = os.path.join(options['checkpoint_dir'], 'interpret')
    pngs = sorted(n for n in os.listdir(out) if n.endswith('.png'))
    assert pngs == sorted([f'mistake_{i:02d}.png' for i in range(1, len(shown) + 1)]
                          + [f'gradcam_{i:02d}.png' for i in range(1, len(shown) + 1)])
    with open(os.path.join(out, 'index.html'), encoding='utf-8') as f:
        page = f.read()
    assert sorted(re.findall(r'<img src="([^"]+)"', page)) == pngs  # relative: opens anywhere
    assert [float(x) for x in re.findall(r'loss ([0-9.]+)<br>', page)] == \
        pytest.approx([m.loss for m in shown], abs=1e-3)
    assert all(m.path in page for m in shown)
    with Image.open(os.path.join(out, 'gradcam_01.png')) as overlay, \
            Image.open(os.path.join(out, 'mistake_01.png')) as image:
        assert overlay.size == image.size and image.width >= 160

    # on the clean data there are fewer mistakes: no stale PNGs of the first run remain
    fewer = main.interpret(**trained[0])
    assert len(fewer) < len(shown)
    assert len([n for n in os.listdir(out) if n.endswith('.png')]) == 2 * len(fewer)
    printed = capsys.readouterr().out
    assert all(m.path in printed for m in fewer) and 'index.html' in printed


def test_interpret_draws_both_galleries_in_visdom(relabelled):
    options, shown, _, _ = relabelled
    run = main.builder.for_evaluation(config.parse(options, verbose=False), 'val')
    vis = RecordingVisualizer()
    with pytest.warns(UserWarning, match='unreadable'):
        assert interpret(run, vis) == shown and vis.closed
    assert [(name, len(images), len(captions)) for name, images, captions, _ in vis.panes] == \
        [(PANE, len(shown), len(shown)), (CAM_PANE, len(shown), len(shown))]
    assert vis.panes[0][3].startswith(f'most confident mistakes ({len(shown)} of')
    assert vis.panes[0][2][0].split('\n') == [
        f'true {CLASSES[shown[0].label]}', f'P(dog)={shown[0].p_dog:.3f}',
        os.path.basename(shown[0].path)]


class RecordingVisualizer:
    """Stands in for utils.visualize.Visualizer: records the galleries drawn."""

    def __init__(self):
        self.panes, self.closed = [], False

    def gallery(self, name, images, captions, title=None, **kwargs):
        assert images.shape[1] == 3 and 0 <= images.min() and images.max() <= 1
        self.panes.append((name, images, captions, title))

    def close(self):
        self.closed = True


def centre_striped_cat(size=96, period=8, seed=0):
    """Black and white horizontal stripes (a generated cat, at the training scale) in
    the central half of the image, a flat grey border around them; generator-like noise."""
    rng = np.random.RandomState(seed)
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * np.arange(size) / period)
    image = np.broadcast_to(wave[:, None, None], (size, size, 3)).copy()
    inside = np.zeros((size, size), bool)
    inside[size // 4:3 * size // 4, size // 4:3 * size // 4] = True
    image[~inside] = 0.5
    image = np.clip(image + rng.normal(0, 0.08, image.shape), 0, 1)
    return torch.tensor(image, dtype=torch.float32).permute(2, 0, 1), torch.tensor(inside)


def test_grad_cam_of_a_cat_lights_up_its_stripes_not_the_border(trained):
    _, model, _ = trained
    image, inside = centre_striped_cat()
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (model.input_mean, model.input_std))
    x = ((image - mean) / std)[None]
    with torch.no_grad():
        assert model(x).argmax(1).item() == 0  # a cat
    cam = grad_cam(model, x)[0]  # the predicted class; the input may be larger than trained
    assert cam.shape == (96, 96) and cam.min() >= 0 and cam.max() == pytest.approx(1.0)
    assert cam[inside].mean() > 3 * cam[~inside].mean(), (cam[inside].mean(), cam[~inside].mean())
    assert model.training is False and all(p.grad is None for p in model.parameters())


def test_grad_cam_finds_the_layer_before_the_global_pool_of_any_model():
    """No per-model code: a torchvision ResNet18 (its layer4) and a net whose last
    spatial map comes from a plain Sequential."""
    from torchvision.models import resnet18
    for model in (resnet18(num_classes=2), nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(8, 2))):
        cam = grad_cam(model, torch.randn(2, 3, 64, 64), classes=[0, 1])
        assert cam.shape == (2, 64, 64) and torch.isfinite(cam).all()
