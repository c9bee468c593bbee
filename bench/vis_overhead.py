"""What Visdom costs a training run: the same short training (generated images,
print_freq=1 so every batch plots) with --vis=False, with no server (recording only),
with a live server, and with a server that hangs (SIGSTOP: every request would time out).

    .venv/bin/python bench/vis_overhead.py [--repeats=3] [--epochs=2] [--images=200]

Run it on an otherwise idle machine; it prints the median seconds per mode.
"""
import argparse
import os
import signal
import socket
import statistics
import sys
import tempfile
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import config  # noqa: E402
from engine import builder  # noqa: E402
from engine.loop import fit  # noqa: E402
from utils.interrupt import GracefulStop  # noqa: E402
from data.synthetic import make_labelled_images  # noqa: E402
from utils import visdom_server  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def timed_training(options, freeze_server=None):
    """Seconds to build and train; with `freeze_server` (a Visdom server process) the
    server hangs right after the Visualizer found it up."""
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # the no-server warning, once per run
        run = builder.for_training(config.parse(options, verbose=False))
        if freeze_server is not None:
            freeze_server.send_signal(signal.SIGSTOP)
        with GracefulStop() as stop:
            fit(run, stop)
    return time.perf_counter() - started


def short_training(tmp, images, epochs):
    """Options of a short training on generated images in tmp, plotting every batch."""
    data = make_labelled_images(os.path.join(tmp, 'train'), n_per_class=images // 2, size=48, seed=0)
    return dict(train_data_root=data, model='SmallResNet', image_size=32, batch_size=16,
                max_epoch=epochs, num_workers=0, print_freq=1, env='bench',
                debug_file=os.path.join(tmp, 'no_debug'))


def main_(args):
    tmp = tempfile.mkdtemp(prefix='vis_overhead_')
    base = short_training(tmp, args.images, args.epochs)
    port = free_port()
    server = visdom_server.start(port, env_path=os.path.join(tmp, 'envs'), bind_local=True)
    modes = {
        'vis=False': dict(vis=False),
        'no server (recording)': dict(vis=True, vis_port=free_port()),
        'live server': dict(vis=True, vis_port=port),
        'hung server': dict(vis=True, vis_port=port),
    }
    times = {mode: [] for mode in modes}
    try:
        timed_training(dict(base, vis=False, checkpoint_dir=os.path.join(tmp, 'warmup')))
        for repeat in range(args.repeats):
            for mode, extra in modes.items():  # interleaved, so drift hits every mode alike
                options = dict(base, checkpoint_dir=os.path.join(tmp, f'{repeat}{len(times[mode])}'),
                               **extra)
                try:
                    times[mode].append(timed_training(
                        options, server if mode == 'hung server' else None))
                finally:
                    server.send_signal(signal.SIGCONT)
    finally:
        visdom_server.stop(server)
    reference = statistics.median(times['vis=False'])
    print(f'{args.images} images, {args.epochs} epochs, print_freq=1, {args.repeats} repeats')
    for mode, values in times.items():
        median = statistics.median(values)
        print(f'{mode:<24} {median:7.2f} s  ({100 * (median / reference - 1):+.1f}% vs vis=False)')


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--epochs', type=int, default=2)
    parser.add_argument('--images', type=int, default=200)
    main_(parser.parse_args())
