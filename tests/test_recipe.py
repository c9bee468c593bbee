"""The CPU recipe's pieces: preloaded images, AdamW without decay on norms, cosine."""
import os
import signal
import subprocess
import sys
import warnings

import pytest
import torch
from torchvision import transforms as T

import main
from conftest import ROOT
from engine.schedules import warmup_cosine_factor
from data.dataset import (DogCat, SkippedFiles, Skipped, build_loader, decode_small,
                          preload_sizes)
from data.preload import fault_in, shared_images
from data.synthetic import make_labelled_images
from models import SmallResNet


def test_cosine_schedule_warms_up_then_decays_to_zero():
    factors = [warmup_cosine_factor(step, 100) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))
    assert factors[-1] < 0.001


def test_adamw_spares_biases_and_norm_scales():
    model = SmallResNet()
    optimizer = model.get_optimizer(0.001, 0.05, 'adamw')
    assert isinstance(optimizer, torch.optim.AdamW)
    by_name = {g['name']: g for g in optimizer.param_groups}
    assert by_name['all']['weight_decay'] == 0.05
    assert by_name['all_no_decay']['weight_decay'] == 0.0
    assert all(p.ndim > 1 for p in by_name['all']['params'])
    assert all(p.ndim == 1 for p in by_name['all_no_decay']['params'])
    assert sum(len(g['params']) for g in optimizer.param_groups) == len(list(model.parameters()))


def test_preloaded_images_match_the_listing_and_skip_bad_files(tmp_path):
    make_labelled_images(str(tmp_path), 10, size=40)
    (tmp_path / 'dog.3.jpg').write_text('not an image')
    plain = DogCat(str(tmp_path), mode='val', image_size=32)
    cached = DogCat(str(tmp_path), mode='val', image_size=32, preload=True, num_workers=2)
    assert cached.samples == plain.samples
    assert all(c.dtype == torch.uint8 and c.shape == (3, 32, 32)
               for c in cached.cache if not isinstance(c, Skipped))
    # stored as the centre crop of the 9/8 square that training's random crops come from
    margin = decode_small(cached.samples[0][0], *preload_sizes('train', 32))
    assert margin.shape == (3, 36, 36)
    assert torch.equal(cached.cache[0], T.functional.center_crop(margin, 32))
    loader = build_loader(cached, 4, False, 0)
    skipped = SkippedFiles()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter('always')
        count = 0
        for images, _, bad in loader:
            skipped.add(bad)
            count += 0 if images is None else len(images)
            assert images is None or images.dtype == torch.float32
    bad_in_val = sum('dog.3.jpg' in p for p, _ in cached.samples)
    assert count == len(cached) - bad_in_val and len(skipped.seen) == bad_in_val


def resident_bytes():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason="Linux's MADV_POPULATE_WRITE")
def test_a_run_of_preloaded_images_gets_its_pages_in_one_call():
    images = shared_images(64, 128)  # 48 KiB an image
    before = resident_bytes()
    fault_in(images, 16, 32)
    grown = resident_bytes() - before
    assert abs(grown - 32 * images[0].nbytes) <= 16 * 4096
    assert not images.any()


def test_preload_in_worker_processes_after_torch_used_its_threads(tmp_path):
    """Images big enough for a parallel torch op (over 32k values), decoded by forked
    workers after the parent ran OpenMP: this hung once. A subprocess with a timeout
    turns a hang into a failure."""
    make_labelled_images(str(tmp_path), 6, size=160)
    script = (f'import torch; torch.set_num_threads(2); (torch.randn(512, 512) @ torch.randn(512, 512)).sum()\n'
              f'from data.dataset import DogCat\n'
              f'd = DogCat({str(tmp_path)!r}, mode="train", image_size=128, preload=True, num_workers=2)\n'
              f'assert d.cache[0].shape == (3, 144, 144), d.cache[0].shape\n'
              f'print("decoded", len(d.cache))')
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child = subprocess.Popen([sys.executable, '-c', script], cwd=root, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = child.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)  # the hung decoders too, not just their parent
        child.communicate()
        pytest.fail('decoding in worker processes hung')
    assert child.returncode == 0, err
    assert 'decoded 8' in out


def test_the_cpu_recipe_learns(fast_options, capfd):
    result = main.train(**dict(fast_options, preload=True, optimizer='adamw', lr=3e-3,
                               weight_decay=0.05, label_smoothing=0.1, lr_schedule='cosine',
                               max_epoch=10, batch_size=8, bf16=True))
    # the decoding pool stops its processes with SIGTERM: they must not take it for
    # the training's save-and-exit signal
    assert 'SIGTERM received' not in capfd.readouterr().err
    history = result.history
    assert max(r['val_acc_cm'] for r in history) >= 90.0
    assert history[-1]['lrs'][0] < 0.1 * 3e-3  # cosine reached the bottom
    assert all(r['lrs'][0] > 0 for r in history)


def test_long_phases_report_progress_in_a_log_file(tmp_path):
    """Without a terminal (a log file, a pipe), decoding and each epoch print a plain
    progress line at most every few seconds: a newcomer never watches a silent log."""
    make_labelled_images(str(tmp_path / 'train'), 40, size=64)
    script = (f'import sys; sys.path.insert(0, {ROOT!r})\n'
              f'import utils.progress; utils.progress.EVERY = 0  # every batch, not every 10 s\n'
              f'import main\n'
              f'main.train(train_data_root={str(tmp_path / "train")!r}, model="SmallResNet", '
              f'image_size=32, batch_size=8, max_epoch=1, num_workers=0, preload=True, vis=False, '
              f'checkpoint_dir={str(tmp_path / "checkpoints")!r})\n')
    result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stderr.splitlines()
    assert any(l.startswith('decoding (--preload): ') and 'images/s' in l for l in lines)
    assert any(l.startswith('epoch 0: ') and 'batches/s' in l and 'ETA' in l for l in lines)
    assert any(l.startswith('validation: ') for l in lines)
    assert '\r' not in result.stderr
