"""Hostile input and real-world signals: each case of the audit, through the real commands."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import main
from conftest import ROOT
from data.dataset import DataError
from models import SmallResNet
from utils.checkpoint import CheckpointError
from utils.errors import UserError


def run_main(argv, capsys):
    """main.run as the shell runs it: (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_:
        main.run(argv)
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


def argv_of(command, options, **extra):
    return [command] + [f'--{k}={v}' for k, v in dict(options, **extra).items()]


@pytest.mark.parametrize('option,value', [
    ('lr', -1), ('weight_decay', -1), ('momentum', -1), ('label_smoothing', 2), ('seed', -1),
    ('num_workers', -1), ('image_size', 7), ('image_size', 1), ('lr_decay', -1),
    ('lr_decay', 0), ('batch_size', 1), ('val_ratio', 1.5)])
def test_bad_values_are_one_line_errors_before_anything_runs(fast_options, capsys, option, value):
    code, out, err = run_main(argv_of('train', fast_options, **{option: value}), capsys)
    assert code == 2 and f'--{option} must be' in err and 'Traceback' not in err + out
    assert 'epoch' not in out  # refused up front


@pytest.mark.parametrize('option', ['load_model_path', 'resume', 'weights'])
def test_a_path_option_without_its_value_is_a_one_line_error(fast_options, capsys, option):
    code, _, err = run_main(argv_of('train', fast_options) + [f'--{option}'], capsys)
    assert code == 2 and f'--{option} needs a value: --{option}=PATH' in err


def test_a_stray_word_is_refused_before_training(fast_options, capsys):
    code, out, err = run_main(argv_of('train', fast_options) + ['foo'], capsys)
    assert code == 2 and "unexpected argument 'foo'" in err and 'epoch:' not in out


@pytest.mark.parametrize('val_ratio,empty', [(0.99, 'training'), (0.01, 'validation')])
def test_a_split_without_images_is_an_error_naming_it(fast_options, val_ratio, empty):
    with pytest.raises(DataError, match=f'leaves no {empty} images out of the 80'):
        main.train(**dict(fast_options, val_ratio=val_ratio))


def test_a_run_where_every_image_is_unreadable_stops(fast_options, tmp_path):
    folder = tmp_path / 'broken'
    folder.mkdir()
    for i in range(4):
        for label in ('cat', 'dog'):
            (folder / f'{label}.{i}.jpg').write_bytes(b'not a jpeg')
    with pytest.warns(UserWarning), pytest.raises(UserError, match='no training image could be used'):
        main.train(**dict(fast_options, train_data_root=str(folder), batch_size=2))
    assert not os.path.exists(os.path.join(fast_options['checkpoint_dir'], 'SmallResNet_best.pth'))


def test_resume_with_another_split_is_refused_and_load_model_path_starts_afresh(fast_options, capsys):
    main.train(**fast_options)
    last = os.path.join(fast_options['checkpoint_dir'], 'SmallResNet_last.pth')
    for change in (dict(seed=7), dict(val_ratio=0.5), dict(image_size=48)):
        with pytest.raises(UserError, match=f'--{next(iter(change))}=.*pass the same values'):
            main.train(**dict(fast_options, max_epoch=2, resume='last', **change))
    state = main.train(**dict(fast_options, max_epoch=2, seed=7, load_model_path=last))
    assert [r['epoch'] for r in state.history] == [0, 1]  # a new run from those weights
    assert '(a new run: seed changed)' in capsys.readouterr().out


def test_evaluating_at_another_size_than_trained_warns(fast_options):
    main.train(**fast_options)
    with pytest.warns(UserWarning, match='trained on 32 px images.*--image_size=32'):
        main.val(**dict(fast_options, image_size=16))


@pytest.mark.parametrize('where', ['missing_folder/result.csv', 'a_folder'])
def test_an_unwritable_result_file_fails_before_predicting(fast_options, tmp_path, capsys, where):
    main.train(**fast_options)
    (tmp_path / 'a_folder').mkdir()
    code, out, err = run_main(argv_of('test', fast_options, result_file=tmp_path / where), capsys)
    assert code == 2 and '--result_file=' in err and 'wrote' not in out


def test_a_text_file_named_pth_is_a_clear_error(tmp_path):
    (tmp_path / 'model.pth').write_text('https://example.com/model.pth')
    with pytest.raises(CheckpointError, match='model.pth.*not a readable checkpoint'):
        SmallResNet().load(str(tmp_path / 'model.pth'))


@pytest.mark.parametrize('field,value', [('epoch', 'ten'), ('images_done', -3),
                                         ('best_val_acc', [1]), ('optimizer', 'adam')])
def test_a_hand_made_checkpoint_with_odd_fields_is_refused(fast_options, field, value):
    main.train(**fast_options)
    last = os.path.join(fast_options['checkpoint_dir'], 'SmallResNet_last.pth')
    checkpoint = torch.load(last, weights_only=True)
    checkpoint[field] = value
    torch.save(checkpoint, last)
    with pytest.raises(CheckpointError, match='damaged or hand-made'):
        main.train(**dict(fast_options, max_epoch=2, resume='last'))


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path):
    """A real failed write: the file-size limit of the process stands in for a full disk."""
    path = tmp_path / 'model.pth'
    SmallResNet().save(str(path))
    before = path.read_bytes()
    script = textwrap.dedent(f'''
        import resource, signal, sys
        sys.path.insert(0, {ROOT!r})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        import main
        from models import SmallResNet
        SmallResNet().save({str(path)!r})
    ''')
    result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    assert 'could not write' in result.stderr and 'previous checkpoint there is intact' in result.stderr
    assert path.read_bytes() == before
    assert not [p for p in os.listdir(tmp_path) if p.endswith('.tmp')]


def test_a_temporary_left_by_a_killed_save_is_removed_at_the_next_save(tmp_path):
    dead = subprocess.Popen(['true'])
    dead.wait()
    stale = tmp_path / f'.model.pth.{dead.pid}.tmp'
    stale.write_bytes(b'x' * 1000)
    SmallResNet().save(str(tmp_path / 'model.pth'))
    assert not stale.exists()


def test_a_second_training_in_the_same_checkpoint_dir_is_refused(fast_options):
    os.makedirs(fast_options['checkpoint_dir'])
    lock = os.path.join(fast_options['checkpoint_dir'], 'SmallResNet.lock')
    with subprocess.Popen(['sleep', '60']) as other:
        with open(lock, 'w') as f:
            f.write(str(other.pid))
        with pytest.raises(UserError, match=f'another training \\(pid {other.pid}\\)'):
            main.train(**fast_options)
        other.kill()
    main.train(**fast_options)  # its process is gone: the lock is taken over
    assert not os.path.exists(lock)


def start_in_own_group(options, **env):
    return subprocess.Popen(
        [sys.executable, '-u', 'main.py'] + argv_of('train', options), cwd=ROOT,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True, env=dict(os.environ, **env))


def wait_for(process, text):
    for line in process.stdout:
        if text in line:
            return
    raise AssertionError(f'the run ended before printing {text!r}')


def test_sigterm_to_the_process_group_with_loader_workers_saves_a_checkpoint(fast_options):
    """What systemd, Slurm and `docker stop` do: SIGTERM to every process of the group,
    the DataLoader workers included, in the middle of a run that loads with them."""
    options = dict(fast_options, max_epoch=200, num_workers=2)
    process = start_in_own_group(options)
    wait_for(process, 'epoch:1')
    os.killpg(process.pid, signal.SIGTERM)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 0, out
    assert 'killed by signal' not in out and 'resume with:' in out
    saved = torch.load(os.path.join(options['checkpoint_dir'], 'SmallResNet_last.pth'),
                       weights_only=True)
    assert 2 <= saved['epoch'] < 200


def test_resume_mid_epoch_with_another_batch_size_uses_each_image_once(fast_options, tmp_path):
    # the book's debug hook holds the run inside its first step while the signal arrives
    options = dict(fast_options, max_epoch=2, debug_file=str(tmp_path / 'debug'))
    (tmp_path / 'debug').write_text('')
    process = start_in_own_group(options, PYTHONBREAKPOINT='builtins.input')
    wait_for(process, 'training and')
    os.killpg(process.pid, signal.SIGTERM)
    os.remove(tmp_path / 'debug')
    out, _ = process.communicate('\n', timeout=120)
    assert process.returncode == 0, out
    last = os.path.join(options['checkpoint_dir'], 'SmallResNet_last.pth')
    assert torch.load(last, weights_only=True)['images_done'] == 16
    state = main.train(**dict(options, batch_size=8, resume='last'))
    assert sum(map(sum, state.history[0]['train_cm'])) == 56  # 16 before, 40 after


def test_the_malicious_pickle_message_says_the_file_holds_code(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (os.system, ('true',))
    torch.save({'state_dict': Exploit()}, tmp_path / 'evil.pth')
    with pytest.raises(CheckpointError, match=r'holds Python code \(a call to posix.system\).*not loaded') as error:
        SmallResNet().load(str(tmp_path / 'evil.pth'))
    assert 'weights_only=False' not in str(error.value)


def test_a_vis_server_that_is_not_a_url_is_a_one_line_error(fast_options, capsys):
    code, _, err = run_main(argv_of('train', fast_options, vis_server='not a url'), capsys)
    assert code == 2 and "--vis_server='not a url'" in err and 'http://localhost' in err
