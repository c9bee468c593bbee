"""Resume, signals, divergence, hostile files: nothing already trained is lost."""
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import main
from engine.loop import TrainingDiverged
from utils.errors import UserError
from conftest import ROOT
from data.dataset import DogCat
from data.synthetic import make_labelled_images
from models import SmallResNet
from utils.checkpoint import CheckpointError


def weights(path):
    return torch.load(path, weights_only=True)['state_dict']


def assert_same_weights(a, b):
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-5), key


def test_resume_continues_exactly_like_an_uninterrupted_run(fast_options, tmp_path):
    options = dict(fast_options, lr=0.02, optimizer='sgd', max_epoch=3)
    whole = main.train(**dict(options, checkpoint_dir=str(tmp_path / 'whole')))
    main.train(**dict(options, max_epoch=1, checkpoint_dir=str(tmp_path / 'split')))
    rest = main.train(**dict(options, resume='last', checkpoint_dir=str(tmp_path / 'split')))
    assert [r['epoch'] for r in rest.history] == [1, 2]
    assert rest.epoch == whole.epoch == 3
    for a, b in zip(whole.history[1:], rest.history):
        assert a['lrs'] == pytest.approx(b['lrs'])
        assert a['loss'] == pytest.approx(b['loss'], abs=1e-5)
    assert_same_weights(weights(tmp_path / 'whole' / 'SmallResNet_last.pth'),
                        weights(tmp_path / 'split' / 'SmallResNet_last.pth'))


def test_resume_last_without_a_checkpoint_is_a_clear_error(fast_options):
    with pytest.raises(UserError, match='--resume=last: there is no .*SmallResNet_last.pth'):
        main.train(**dict(fast_options, resume='last'))


def start_training(options, env=None):
    args = [f'--{k}={v}' for k, v in options.items()]
    return subprocess.Popen([sys.executable, '-u', 'main.py', 'train', *args], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


def wait_for_line(process, text, timeout=120):
    deadline = time.monotonic() + timeout
    lines = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f'never saw {text!r}:\n' + ''.join(lines))


@pytest.mark.parametrize('signum,code', [(signal.SIGINT, 130), (signal.SIGTERM, 0)])
def test_a_signal_saves_a_checkpoint_that_resumes_mid_epoch(fast_options, tmp_path, signum, code):
    # The book's debug hook holds the run inside its first step (the debugger is
    # replaced by a read from stdin) while the real signal arrives: mid-epoch, for sure.
    options = dict(fast_options, max_epoch=2, debug_file=str(tmp_path / 'debug'))
    (tmp_path / 'debug').write_text('')
    process = start_training(options, env=dict(os.environ, PYTHONBREAKPOINT='builtins.input'))
    wait_for_line(process, 'training and')
    process.send_signal(signum)
    os.remove(tmp_path / 'debug')
    out, _ = process.communicate('\n', timeout=120)  # leave the "debugger"
    assert process.returncode == code, out
    assert 'resume with:' in out and '--resume=' in out
    last = os.path.join(options['checkpoint_dir'], 'SmallResNet_last.pth')
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint['epoch'] == 0 and checkpoint['images_done'] == 16
    result = main.train(**dict(options, resume=last))
    assert [r['epoch'] for r in result.history] == [0, 1]
    first = result.history[0]  # the interrupted epoch trained on each image exactly once
    assert sum(map(sum, first['train_cm'])) == 56 and sum(map(sum, first['val_cm'])) == 24
    assert torch.load(last, weights_only=True)['epoch'] == 2


def test_sigkill_loses_at_most_the_current_epoch(fast_options):
    process = start_training(dict(fast_options, max_epoch=20))
    wait_for_line(process, 'epoch:0')
    time.sleep(0.5)
    process.kill()
    process.wait(timeout=30)
    last = os.path.join(fast_options['checkpoint_dir'], 'SmallResNet_last.pth')
    done = torch.load(last, weights_only=True)['epoch']
    assert 1 <= done < 20  # whole and loadable, at most the running epoch lost
    result = main.train(**dict(fast_options, max_epoch=done + 1, resume='last'))
    assert [r['epoch'] for r in result.history] == [done]


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(fast_options):
    main.train(**fast_options)
    last = os.path.join(fast_options['checkpoint_dir'], 'SmallResNet_last.pth')
    good = weights(last)
    with pytest.raises(TrainingDiverged, match=r'loss became (nan|inf).*epoch 0, image \d+.*lr'):
        main.train(**dict(fast_options, load_model_path=last, optimizer='sgd', lr=1e12,
                          momentum=0.0))
    assert_same_weights(good, weights(last))


class Exploit:
    def __reduce__(self):
        return (os.system, ('touch /tmp/dogcat_pwned',))


def test_a_malicious_pickle_is_refused(tmp_path):
    if os.path.exists('/tmp/dogcat_pwned'):
        os.remove('/tmp/dogcat_pwned')
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': Exploit()}, path)
    with pytest.raises(CheckpointError, match='evil.pth.*holds Python code'):
        SmallResNet().load(str(path))
    assert not os.path.exists('/tmp/dogcat_pwned')


def test_a_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = SmallResNet().save(str(tmp_path / 'cut.pth'))
    data = open(path, 'rb').read()
    open(path, 'wb').write(data[:len(data) // 3])
    with pytest.raises(CheckpointError, match='cut.pth.*not a readable checkpoint'):
        SmallResNet().load(path)


def test_a_1000_class_checkpoint_names_the_mismatch(tmp_path):
    torch.save(SmallResNet(num_classes=1000).state_dict(), tmp_path / 'imagenet.pth')
    with pytest.raises(CheckpointError, match=r'fc.weight \(1000, 256\) vs \(2, 256\)'):
        SmallResNet().load(str(tmp_path / 'imagenet.pth'))


def test_hostile_images_are_read_or_skipped_by_name(tmp_path, monkeypatch):
    make_labelled_images(str(tmp_path), 4, size=32)
    base = Image.open(tmp_path / 'cat.0.jpg').convert('RGB')
    base.save(tmp_path / 'cat.0.jpg', format='PNG')  # PNG content, .jpg name
    base.save(tmp_path / 'cat.1.jpg', format='GIF')
    base.save(tmp_path / 'cat.2.jpg', format='WEBP')
    Image.new('RGB', (1, 1), 'red').save(tmp_path / 'dog.0.jpg')
    Image.new('RGB', (5000, 5000), 'blue').save(tmp_path / 'dog.1.jpg')
    open(tmp_path / 'dog.2.jpg', 'w').write('plain text')
    secret = str(tmp_path / 'dog.3.jpg')
    real_open = Image.open

    def no_permission(path, *args, **kwargs):
        if str(path) == secret:
            raise PermissionError(13, 'Permission denied', secret)
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(Image, 'open', no_permission)
    dataset = DogCat(str(tmp_path), mode='train', val_ratio=0.01, image_size=32)
    results = {os.path.basename(path): dataset[i] for i, (path, _) in enumerate(dataset.samples)}
    for name in ('cat.0.jpg', 'cat.1.jpg', 'cat.2.jpg', 'dog.0.jpg', 'dog.1.jpg'):
        assert results[name][0].shape == (3, 32, 32), name
    assert 'dog.2.jpg' in results['dog.2.jpg'].path
    assert 'Permission denied' in results['dog.3.jpg'].reason


def test_an_empty_test_folder_is_a_clear_error(fast_options, tmp_path):
    main.train(**fast_options)
    (tmp_path / 'empty').mkdir()
    with pytest.raises(UserError, match='empty.*is empty'):
        main.test(**dict(fast_options, test_data_root=str(tmp_path / 'empty')))


def test_cli_errors_for_a_missing_checkpoint(fast_options):
    result = subprocess.run([sys.executable, 'main.py', 'test', '--load_model_path=/nope.pth',
                             f'--test_data_root={fast_options["test_data_root"]}'],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "error: checkpoint '/nope.pth' does not exist" in result.stderr
    assert 'Traceback' not in result.stderr
