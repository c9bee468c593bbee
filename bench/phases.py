"""Each long phase of a run, timed with the share of CPU time spent in the kernel.

    .venv/bin/python bench/phases.py [--images=1000] [--isa=both|native|avx2]

Runs every phase twice: with the CPU's own instruction set, and limited to AVX2 the
way most laptops are (ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
ATEN_CPU_CAPABILITY=avx2: no AMX, no AVX-512, no native bf16), each in a fresh
process. Phases, on the first --images shared Kaggle photos (half cats, half dogs),
all built through engine.builder as `train`, `val` and `test` build them:
  decode      --preload's one-time decoding at 96 px; then of all 15,000 photos at 96 and
              224 px, each beside the kernel's cost of as much fresh memory, nothing decoded
  bare step   SmallResNet 96 px train step on one batch, repeated (the model alone)
  train loop  one epoch of `fit`'s loop on the preloaded images (loader, meter, step)
  val         the validation pass of the same model
  features    frozen EfficientNetLite0 at 224 px, the feature cache (torch, then onnx)
  test        EfficientNetLite0 224 px predictions on the same photos (torch, then onnx)
Prints a markdown table: img/s, and the kernel's share of the CPU time (sys / (user + sys),
children included).
"""
import argparse
import json
import mmap
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.shared import SHARED_TRAIN  # noqa: E402
from data.preload import shared_images  # noqa: E402
AVX2 = dict(ONEDNN_MAX_CPU_ISA='AVX2', MKL_ENABLE_INSTRUCTIONS='AVX2', ATEN_CPU_CAPABILITY='avx2')


class Timer:
    """Wall time and CPU times (this process and its children) of a block."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), os.times()
        return self

    def __exit__(self, *exc):
        end = os.times()
        self.seconds = time.perf_counter() - self.wall
        user = end.user - self.cpu.user + end.children_user - self.cpu.children_user
        system = end.system - self.cpu.system + end.children_system - self.cpu.children_system
        self.sys_share = system / max(user + system, 1e-9)

    def row(self, images):
        return dict(rate=images / self.seconds, sys=self.sys_share)


def link_train_and_test(folder, count):
    """train/ with the first count/2 cats and dogs, test1/ with them as 1.jpg, 2.jpg, ...:
    links, the photos stay where they are."""
    for sub in ('train', 'test1'):
        os.makedirs(os.path.join(folder, sub))
    for label in ('cat', 'dog'):
        for n in range(count // 2):
            source = os.path.join(SHARED_TRAIN, f'{label}.{n}.jpg')
            os.symlink(source, os.path.join(folder, 'train', f'{label}.{n}.jpg'))
            number = 2 * n + 1 + (label == 'dog')
            os.symlink(source, os.path.join(folder, 'test1', f'{number}.jpg'))
    return folder


# the feature-cache and test phases measure the older pretrained recipe's network (the
# recipe itself now uses EfficientNetLite1And2 at 260 px), so the rows stay comparable
LITE0 = dict(model='EfficientNetLite0', image_size=224, tta='none', select='best')


def options(data, tmp, **extra):
    return dict(dict(train_data_root=os.path.join(data, 'train'),
                     test_data_root=os.path.join(data, 'test1'), vis=False, num_workers=0,
                     checkpoint_dir=os.path.join(tmp, 'checkpoints')), **extra)


def small_resnet_phases(data, tmp):
    import config
    from engine import builder
    from engine.loop import TrainState, evaluate, train_one_epoch
    # at full size throughout, so that the loop compares with the bare step at 96 px
    opt = config.parse(options(data, tmp, recipe='cpu', max_epoch=1, progressive=False),
                       verbose=False)
    with Timer() as decode:
        run = builder.for_training(opt, vis=False)
    images, targets, _ = next(iter(run.train_loader))
    with Timer() as bare:
        for _ in range(6):
            run.step(run.model, run.optimizer, run.criterion, images, targets, run.placement)
    with Timer() as loop:
        meter = train_one_epoch(run, run.model, TrainState())
    with Timer() as val:
        evaluate(run.model, run.val_loader, run.placement, run.skipped)
    total = len(run.train_data) + len(run.val_data)  # both splits are decoded
    return {'decode (--preload, 96 px)': decode.row(total),
            'bare train step (SmallResNet 96 px, batch 64)': bare.row(6 * len(images)),
            'train loop, one epoch (SmallResNet 96 px)': loop.row(meter.total),
            'val (SmallResNet 96 px)': val.row(len(run.val_data))}


def decode_at_scale(tmp, image_size):
    """--preload's decoding of all 15,000 shared photos (both splits), the
    datasets alone: at 1,000 photos the fixed costs (forking the pool) weigh on the row.
    Then the same number of bytes of fresh shared memory, each page written once and
    nothing decoded: the kernel time that any cache this size costs on this machine."""
    import config
    from engine import builder
    from models import build_model
    opt = config.parse(options(tmp, tmp, recipe='cpu', image_size=image_size,
                               train_data_root=SHARED_TRAIN), verbose=False)
    model = build_model(opt.model)
    with Timer() as decode:
        splits = builder.datasets(opt, model)
    shapes = [(len(split), split.preload_sizes[1]) for split in splits]
    count, size = sum(n for n, _ in shapes), sum(n * 3 * side ** 2 for n, side in shapes)
    del splits  # frees the cache: the next row gets as much fresh memory again
    with Timer() as memory:
        for shape in shapes:
            shared_images(*shape).reshape(-1)[::mmap.PAGESIZE] = 1
    return {f'decode (--preload, {image_size} px, all 15,000 photos)': decode.row(count),
            f'fresh shared memory alone, as much as that cache ({size / 1e9:.2f} GB)':
            memory.row(count)}


def efficientnet_phases(data, tmp, engine):
    import config
    import main
    from engine import builder
    from engine.feature_cache import compute_features
    from engine.onnx_engine import for_inference
    opt = config.parse(options(data, tmp, recipe='pretrained', engine=engine, **LITE0),
                       verbose=False)
    run = builder.for_training(opt, vis=False)
    network = for_inference(run)
    network = None if network is run.model else network  # torch: the pre-hook path
    with Timer() as features:
        compute_features(run.model, run.train_loader, run.placement, run.skipped,
                         network=network)
    run.model.save(os.path.join(opt.checkpoint_dir, f'{opt.model}_best.pth'))
    with Timer() as test:
        rows = main.test(**options(data, tmp, recipe='pretrained', engine=engine, **LITE0,
                                   result_file=os.path.join(tmp, 'result.csv')))
    return {f'feature cache (EfficientNetLite0 224 px, {engine})': features.row(len(run.train_data)),
            f'test (EfficientNetLite0 224 px, {engine})': test.row(len(rows))}


def measure_here(images):
    """Every phase in this process (one ISA); prints a JSON line."""
    tmp = tempfile.mkdtemp(prefix='phases_')
    data = link_train_and_test(os.path.join(tmp, 'data'), images)
    rows = small_resnet_phases(data, os.path.join(tmp, 'small'))
    for image_size in (96, 224):
        rows.update(decode_at_scale(tmp, image_size))
    for engine in ('torch', 'onnx'):
        rows.update(efficientnet_phases(data, os.path.join(tmp, engine), engine))
    print(json.dumps(rows))


def measure_in_child(images, env):
    out = subprocess.run([sys.executable, __file__, '--images', str(images), '--child'],
                         env=dict(os.environ, **env), capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main_():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--images', type=int, default=1000)
    parser.add_argument('--isa', default='both', choices=('both', 'native', 'avx2'))
    parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return measure_here(args.images)
    if not os.path.isdir(SHARED_TRAIN):
        sys.exit(f'no shared images at {SHARED_TRAIN}')
    runs = {isa: measure_in_child(args.images, {} if isa == 'native' else AVX2)
            for isa in (('native', 'avx2') if args.isa == 'both' else (args.isa,))}
    print(f'| phase ({args.images} photos) | ' + ' | '.join(f'{isa} img/s | {isa} sys %' for isa in runs) + ' |')
    print('|---|' + '---|---|' * len(runs))
    for phase in next(iter(runs.values())):
        cells = ' | '.join(f'{r[phase]["rate"]:.1f} | {100 * r[phase]["sys"]:.1f}%' for r in runs.values())
        print(f'| {phase} | {cells} |')


if __name__ == '__main__':
    main_()
