"""Book-style pipeline vs ours, measured side by side in one process.

    .venv/bin/python bench/run.py [--repeats=5] [--threads=2] [--images=64] [--workers=2] [--compile]

Rows: this machine's fp32 and bf16 matmul peaks; data-pipeline images/s in one process
and through a DataLoader with --workers processes (the book's per-image PIL + float
transforms vs our decode-once uint8 path, for the train and the val/test transforms);
train-step and eval images/s per model, with the achieved GFLOP/s against the matmul peak;
`predict` on 1,000 photos with EfficientNetLite0, --engine=torch vs --engine=onnx; with
--compile, SmallResNet's train step eager vs torch.compile; last, a short training
with --vis=True and no Visdom server against --vis=False. Each
number is the median of --repeats timed runs after a warm-up. Run it on an idle
machine: it prints a markdown table to paste into bench/RESULTS.md.
"""
import contextlib
import io
import os
import shutil
import statistics
import sys
import tempfile
import time

import fire
import torch
from torch.utils import data
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from models.basic_module import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from data.dataset import (decode_small, load_rgb,  # noqa: E402
                          preload_sizes, preloaded_transforms)
from models import build_model  # noqa: E402

from bench.shared import SHARED_TRAIN as SHARED, link_subset  # noqa: E402


def median_rate(fn, items, repeats):
    """Median items/s of fn() over `repeats` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return items / statistics.median(times)


def matmul_peak_gflops(repeats, dtype=torch.float32):
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    return median_rate(lambda: torch.mm(a, b), 2 * 2048 ** 3, repeats) / 1e9


def book_train_transform(size):
    return T.Compose([T.Resize(256 * size // 224), T.RandomResizedCrop(size), T.RandomHorizontalFlip(),
                      T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def book_eval_transform(size):
    return T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class Transformed(data.Dataset):
    """items[i] through load then transform: the shape of every pipeline measured here."""

    def __init__(self, items, load, transform):
        self.items, self.load, self.transform = items, load, transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.transform(self.load(self.items[index])), 0


def loader_rate(dataset, workers, repeats):
    loader = data.DataLoader(dataset, batch_size=32, num_workers=workers,
                             persistent_workers=workers > 0)
    return median_rate(lambda: [None for _ in loader], len(dataset), repeats)


def pipeline_rows(paths, size, repeats, workers):
    """(what, baseline, its img/s, ours, our img/s): per image in one process for the
    train and the val/test transforms and the one-time decode, then through a
    DataLoader with `workers` processes."""
    cached = {mode: [decode_small(p, *preload_sizes(mode, size)) for p in paths]
              for mode in ('train', 'val')}
    rows = []
    for label, book in (('train', book_train_transform(size)), ('val/test', book_eval_transform(size))):
        mode = label.split('/')[0]
        ours = preloaded_transforms(mode, size)
        book_rate = median_rate(lambda: [book(load_rgb(p)) for p in paths], len(paths), repeats)
        ours_rate = median_rate(lambda: [ours(c) for c in cached[mode]], len(paths), repeats)
        rows.append((f'data, {label} transforms, {size} px, 1 process',
                     'book: PIL decode + float transforms per image', book_rate,
                     'ours (--preload): uint8 crop (+flip) per epoch', ours_rate))
    decode_rate = median_rate(lambda: [decode_small(p, *preload_sizes('train', size)) for p in paths],
                              len(paths), repeats)
    rows.append((f'data, one-time decode for --preload, {size} px',
                 'book: train transforms per image, every epoch', rows[0][2], 'ours: once per run',
                 decode_rate))
    book = Transformed(paths, load_rgb, book_train_transform(size))
    ours = Transformed(cached['train'], lambda c: c, preloaded_transforms('train', size))
    rows.append((f'data, train transforms, {size} px, DataLoader, {workers} workers',
                 'book: PIL decode + float transforms per image', loader_rate(book, workers, repeats),
                 'ours (--preload)', loader_rate(ours, workers, repeats)))
    return rows


def flops_per_image(model, size):
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, size, size))
    return counter.get_total_flops()


def train_rate(model, size, batch, repeats, channels_last, bf16=False, compiled=False):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    forward = torch.compile(model) if compiled else model
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)
    y = torch.randint(0, 2, (batch,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
            scores = forward(x).float()
        loss = torch.nn.functional.cross_entropy(scores, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return median_rate(step, batch, repeats)


def eval_rate(model, size, batch, repeats, fast, bf16=False):
    fmt = torch.channels_last if fast else torch.contiguous_format
    model = model.to(memory_format=fmt).eval()
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)
    context = torch.inference_mode if fast else torch.no_grad

    def forward():
        with context(), torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
            model(x)
    return median_rate(forward, batch, repeats)


def model_rows(name, size, batch, repeats, peak, bf16_peak):
    """The book's fp32 NCHW path beside ours, fp32 channels-last (the default) and
    with --bf16; 'vs peak' compares each to the matmul peak of its own precision."""
    torch.manual_seed(0)
    model = build_model(name, pretrained=False)
    flops = flops_per_image(model, size)  # forward; a train step is about 3x
    rows = []
    what = f'train step, {name} {size} px, batch {batch}'
    book = train_rate(model, size, batch, repeats, channels_last=False)
    ours = train_rate(model, size, batch, repeats, channels_last=True)
    bf16 = train_rate(model, size, batch, repeats, channels_last=True, bf16=True)
    rows.append((what, 'fp32 NCHW', book, 'fp32 channels-last', ours, 3 * flops, peak))
    rows.append((what, 'fp32 NCHW', book, 'channels-last, --bf16', bf16, 3 * flops, bf16_peak))
    what = f'eval, {name} {size} px, batch {batch}'
    book = eval_rate(model, size, batch, repeats, fast=False)
    ours = eval_rate(model, size, batch, repeats, fast=True)
    bf16 = eval_rate(model, size, batch, repeats, fast=True, bf16=True)
    rows.append((what, 'no_grad NCHW', book, 'inference_mode channels-last', ours, flops, peak))
    rows.append((what, 'no_grad NCHW', book, 'inference_mode channels-last, --bf16', bf16,
                 flops, bf16_peak))
    return rows


def compile_rows(repeats, size=96, batch=64):
    """(precision, eager img/s, compiled img/s, seconds of the first compiled step)."""
    from torch._inductor import config as inductor_config
    inductor_config.force_disable_caches = True  # time a first compilation, as a user's first run
    rows = []
    for bf16 in (True, False):
        torch.manual_seed(0)
        eager = train_rate(build_model('SmallResNet'), size, batch, repeats, True, bf16)
        torch.manual_seed(0)
        start = time.perf_counter()
        compiled = train_rate(build_model('SmallResNet'), size, batch, repeats, True, bf16,
                              compiled=True)
        # the warm-up step compiled: whole call less the timed steps at their median
        first = time.perf_counter() - start - repeats * batch / compiled
        rows.append(('bf16' if bf16 else 'fp32', eager, compiled, first))
    return rows


def vis_row(repeats, images=200, epochs=2):
    """The same short training (a plot every batch) with --vis=False and with --vis=True
    and no server (plots recorded to a file): must be equal within noise.
    bench/vis_overhead.py adds a live and a hung server."""
    from bench.vis_overhead import free_port, short_training, timed_training
    tmp = tempfile.mkdtemp(prefix='bench_vis_')
    base = short_training(tmp, images, epochs)
    modes = {'off': dict(vis=False), 'no server': dict(vis=True, vis_port=free_port())}
    times = {mode: [] for mode in modes}
    with contextlib.redirect_stdout(io.StringIO()):
        timed_training(dict(base, vis=False, checkpoint_dir=os.path.join(tmp, 'warmup')))
        for repeat in range(repeats):
            for mode, extra in modes.items():  # interleaved, so drift hits both alike
                checkpoints = os.path.join(tmp, f'{mode}{repeat}')
                times[mode].append(timed_training(dict(base, checkpoint_dir=checkpoints, **extra)))
    shutil.rmtree(tmp, ignore_errors=True)
    seen = images * epochs  # training images per run (validation included in the time)
    return (f'train loop, SmallResNet 32 px, {images} generated images x {epochs} epochs, a plot every batch',
            '--vis=False', seen / statistics.median(times['off']),
            '--vis=True, no Visdom server', seen / statistics.median(times['no server']))


def predict_row(images=1000, size=224, workers=2):
    """`python main.py predict` on `images` shared photos with EfficientNetLite0 (ImageNet
    backbone and a fresh 2-class head, saved as the checkpoint): --engine=torch against
    --engine=onnx, the whole command timed once each (decoding included, and for ONNX
    Runtime the export too), --bf16 as auto sets it."""
    import main
    tmp = tempfile.mkdtemp(prefix='bench_predict_')
    folder = link_subset(os.path.join(tmp, 'photos'), images)
    torch.manual_seed(0)
    model = build_model('EfficientNetLite0')
    checkpoint = model.save(os.path.join(tmp, 'EfficientNetLite0_best.pth'))
    options = dict(model='EfficientNetLite0', image_size=size, load_model_path=checkpoint,
                   checkpoint_dir=tmp, num_workers=workers, batch_size=32)
    rates = {}
    with contextlib.redirect_stdout(io.StringIO()):
        for engine in ('torch', 'onnx'):
            start = time.perf_counter()
            main.predict(folder, engine=engine, **options)
            rates[engine] = images / (time.perf_counter() - start)
    shutil.rmtree(tmp, ignore_errors=True)
    return (f'predict, EfficientNetLite0 {size} px, {images} photos, whole command',
            '--engine=torch', rates['torch'], '--engine=onnx (export included)', rates['onnx'])


def percent_of_peak(rate, flops, peak):
    return f'{rate * flops / 1e9:.0f} GFLOP/s ({100 * rate * flops / 1e9 / peak:.0f}%)'


def main(repeats=5, threads=2, images=64, workers=2, compile=False):
    torch.set_num_threads(threads)
    peak = matmul_peak_gflops(repeats)
    bf16_peak = matmul_peak_gflops(repeats, torch.bfloat16)
    print(f'machine: {os.cpu_count()} cores, torch {torch.__version__}, {threads} threads; '
          f'matmul peak fp32 {peak:.0f} GFLOP/s, bf16 {bf16_peak:.0f} GFLOP/s\n')
    print('| what | baseline | img/s | ours | img/s | speed-up | ours vs peak |')
    print('|---|---|---|---|---|---|---|')
    if os.path.isdir(SHARED):
        paths = [os.path.join(SHARED, f'{c}.{i}.jpg') for c in ('cat', 'dog') for i in range(images // 2)]
        for size in (224, 64):
            for what, base, base_rate, our, our_rate in pipeline_rows(paths, size, repeats, workers):
                print(f'| {what} | {base} | {base_rate:.0f} | {our} | {our_rate:.0f} | '
                      f'{our_rate / base_rate:.2f}x | |')
    else:
        print(f'| data pipeline | skipped: {SHARED} not found | | | | | |')
    for name, size, batch in (('SmallResNet', 64, 64), ('ResNet34', 224, 16)):
        for what, base, base_rate, our, our_rate, flops, our_peak in model_rows(
                name, size, batch, repeats, peak, bf16_peak):
            print(f'| {what} | {base} | {base_rate:.1f} | {our} | {our_rate:.1f} | '
                  f'{our_rate / base_rate:.2f}x | {percent_of_peak(our_rate, flops, our_peak)} |')
    if os.path.isdir(SHARED):
        what, base, base_rate, our, our_rate = predict_row(workers=workers)
        print(f'| {what} | {base} | {base_rate:.1f} | {our} | {our_rate:.1f} | '
              f'{our_rate / base_rate:.2f}x | |')
    what, base, base_rate, our, our_rate = vis_row(max(repeats, 9))  # ~1 s runs: more repeats
    print(f'| {what} | {base} | {base_rate:.0f} | {our} | {our_rate:.0f} | {our_rate / base_rate:.2f}x | |')
    if compile:
        print('\n| precision | eager img/s | compiled img/s | speed-up | first step (compilation) |')
        print('|---|---|---|---|---|')
        for precision, eager, compiled, first in compile_rows(repeats):
            print(f'| {precision} | {eager:.0f} | {compiled:.0f} | {compiled / eager:.2f}x | {first:.0f} s |')


if __name__ == '__main__':
    fire.Fire(main, serialize=lambda result: None)
