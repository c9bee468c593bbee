"""Files and events that should stop or skip cleanly: dying decoding processes, files
that are not the image their name says, and images with more than 8 bits per value.

The process tests run the decoding in a subprocess with a timeout, so that a hang is
a failure and not a stuck test run."""
import os
import signal
import struct
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
from PIL import Image

from data.dataset import DogCat, Skipped, SkippedFiles, build_loader, load_rgb
from data.synthetic import make_labelled_images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEATH_MESSAGE = 'a decoding process died'


def many_images(root, n_per_class, size):
    """cat.N.jpg / dog.N.jpg as hard links to one noisy image of size x size: as slow to
    decode as n different ones, but written once."""
    os.makedirs(root)
    noise = np.random.RandomState(0).randint(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(noise).save(os.path.join(root, 'cat.0.jpg'), quality=90)
    for name in ('cat', 'dog'):
        for i in range(n_per_class):
            if (name, i) != ('cat', 0):
                os.link(os.path.join(root, 'cat.0.jpg'), os.path.join(root, f'{name}.{i}.jpg'))
    return root


def start_preload(root, image_size=32, before=''):
    """A subprocess, in a session of its own (finish() can kill its decoders too), that
    runs `before` and then preloads root with at least 2 decoding processes."""
    script = (f'import signal, sys\n{before}\n'
              f'from data.dataset import DogCat\n'
              f'd = DogCat({root!r}, mode="train", val_ratio=0.01, image_size={image_size}, '
              f'preload=True, num_workers=2)\n'
              f'print("decoded", len(d.cache), "images, first", type(d.cache[0]), '
              f'd.cache[0].dtype)')
    return subprocess.Popen([sys.executable, '-c', script], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def children(pid):
    """The ids of pid's child processes, from each process's parent id in /proc."""
    found = []
    for entry in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open(f'/proc/{entry}/stat') as f:
                stat = f.read()
        except OSError:  # it ended meanwhile
            continue
        if int(stat.rsplit(')', 1)[1].split()[1]) == pid:
            found.append(int(entry))
    return found


def wait_for_decoders(child, count=2, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and child.poll() is None:
        decoders = children(child.pid)
        if len(decoders) >= count:
            return decoders
        time.sleep(0.05)
    finish(child, 1)
    pytest.fail('the decoding processes never started')


def finish(child, timeout):
    """(return code, stdout, stderr) of child, or a failure when it is still running
    after timeout seconds (then it and its decoders are killed)."""
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        pytest.fail(f'still running {timeout} s later: the preload hung')
    return child.returncode, out, err


def test_a_killed_decoding_process_is_a_clear_error_within_seconds(tmp_path):
    child = start_preload(many_images(str(tmp_path / 'train'), 300, 1200))
    os.kill(wait_for_decoders(child)[0], signal.SIGKILL)  # as the out-of-memory killer does
    returncode, _, err = finish(child, 20)
    assert returncode != 0
    assert DEATH_MESSAGE in err and '--num_workers=0' in err and '--preload=False' in err


def test_sigterm_to_the_process_group_while_decoding_ends_the_run(tmp_path):
    """As `kill -TERM -PGID` or a job scheduler does during a training's preload: the
    training's own handler only notes SIGTERM (to save and exit after the current step)
    while the decoding processes die of it; the run must still end."""
    notes_only = ('signal.signal(signal.SIGTERM, '
                  'lambda signum, frame: print("SIGTERM received", file=sys.stderr))')
    child = start_preload(many_images(str(tmp_path / 'train'), 300, 1200), before=notes_only)
    wait_for_decoders(child)
    time.sleep(0.5)  # past the decoders' start, when they take the default SIGTERM
    os.killpg(child.pid, signal.SIGTERM)
    returncode, _, err = finish(child, 20)
    assert returncode != 0 and DEATH_MESSAGE in err


def test_many_preloaded_images_hold_no_file_descriptor_each(tmp_path):
    """Decoded images cross from the decoding processes as plain arrays: as torch
    tensors each held a shared-memory file descriptor, and past the open-file limit
    the preload failed with 'received 0 items of ancdata'."""
    root = make_labelled_images(str(tmp_path / 'train'), 150, size=16)
    low_limit = ('import resource\n'
                 'hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n'
                 'resource.setrlimit(resource.RLIMIT_NOFILE, (128, hard))')
    returncode, out, err = finish(start_preload(root, image_size=16, before=low_limit), 60)
    assert returncode == 0, err[-2000:]
    assert "decoded 296 images, first <class 'torch.Tensor'> torch.uint8" in out


def write_postscript(path):
    path.write_bytes(b'%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n'
                     b'newpath 0 0 moveto 8 8 lineto stroke showpage\n%%EOF\n')


def write_corrupt_dds(path):
    """A DDS header whose pixel format no decoder knows (PIL raises NotImplementedError)."""
    header = struct.pack('<4s7I44x2I4s40x', b'DDS ', 124, 0x1007, 4, 4, 0, 0, 0, 32, 0x4, b'ZZZZ')
    path.write_bytes(header + bytes(64))


@pytest.mark.parametrize('preload', [False, True])
def test_postscript_and_dds_files_named_jpg_are_skipped_not_decoded(tmp_path, preload):
    make_labelled_images(str(tmp_path), 6, size=16)
    write_postscript(tmp_path / 'cat.1.jpg')
    write_corrupt_dds(tmp_path / 'dog.2.jpg')
    dataset = DogCat(str(tmp_path), mode='train', val_ratio=0.01, image_size=16,
                     preload=preload, num_workers=2)
    by_name = {os.path.basename(p): dataset[i] for i, (p, _) in enumerate(dataset.samples)}
    for name in ('cat.1.jpg', 'dog.2.jpg'):
        record = by_name[name]
        assert isinstance(record, Skipped) and record.path == str(tmp_path / name)
        # refused as no accepted format: never handed to Ghostscript or the DDS decoder
        assert record.reason == ('UnidentifiedImageError: cannot identify image file '
                                 f"'{tmp_path / name}'")
    skipped, seen = SkippedFiles(), 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        for images, _, bad in build_loader(dataset, batch_size=4, shuffle=False, num_workers=0):
            skipped.add(bad)
            seen += 0 if images is None else len(images)
    assert seen == len(dataset) - 2
    assert sorted(str(w.message).split(' ')[3] for w in caught) == [
        str(tmp_path / 'cat.1.jpg'), str(tmp_path / 'dog.2.jpg')]


def grey_gradient(dtype, low, high):
    return np.linspace(low, high, 64 * 64).reshape(64, 64).astype(dtype)


@pytest.mark.parametrize('name, values', [
    ('16-bit.png', grey_gradient(np.uint16, 0, 65535)),
    ('float-0-1.tif', grey_gradient(np.float32, 0, 1)),
    ('float-wide.tif', grey_gradient(np.float32, -50, 1000)),
    ('int32.tif', grey_gradient(np.int32, 0, 100000)),
])
def test_high_bit_depth_grey_images_keep_their_brightness(tmp_path, name, values):
    """A gradient over the whole range of its type: mid-grey on average once in 8 bits,
    not all white (16-bit, int32) or all black (float in [0, 1])."""
    Image.fromarray(values).save(tmp_path / name)
    assert Image.open(tmp_path / name).mode == {np.uint16: 'I;16', np.float32: 'F',
                                                np.int32: 'I'}[values.dtype.type]
    rgb = np.asarray(load_rgb(str(tmp_path / name)))
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
    assert abs(rgb.mean() - 127.5) < 1 and rgb.min() == 0 and rgb.max() == 255
