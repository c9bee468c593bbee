"""The checkpoint format, in one place.

A checkpoint is a dict written by torch.save:
    model_name, state_dict, config         every checkpoint (BasicModule.save)
    epoch, images_done, best_val_acc       where training stands (images_done: of an
                                           interrupted epoch, 0 after a whole one)
    seconds                                wall time used so far (--time_budget)
    optimizer, scheduler, rng              what an exact resume needs
    partial_epoch                          the interrupted epoch's meter
    val_acc                                this epoch's validation accuracy
    temperature                            logits are divided by it (1 while training)
train writes <checkpoint_dir>/<model>_last.pth every epoch and _best.pth when the
validation accuracy improves; val and test read the one --select names (_best.pth by
default) unless told otherwise.
"""
import contextlib
import os
import pickle
import re
import shutil

import torch

from utils.errors import UserError

TRAINING_FIELDS = ('epoch', 'images_done', 'best_val_acc', 'seconds')


class CheckpointError(UserError):
    pass


def atomic_save(obj, path):
    """torch.save through a temporary file and a rename: a crash never leaves half a file,
    and a failed write (disk full) leaves the previous checkpoint as it was."""
    folder = os.path.dirname(path) or '.'
    os.makedirs(folder, exist_ok=True)
    remove_stale_temporaries(folder, os.path.basename(path))
    tmp = os.path.join(folder, f'.{os.path.basename(path)}.{os.getpid()}.tmp')
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        if not isinstance(exc, OSError) and 'inline_container' not in str(exc):
            raise  # torch's zip writer reports a failed write as "[enforce fail at inline_container.cc...]"
        free = shutil.disk_usage(folder).free
        raise CheckpointError(
            f'could not write {path} ({first_line(exc)}; {free / 2 ** 20:.0f} MiB free on its '
            f'disk): the disk is full or the file too large. The previous checkpoint there '
            f'is intact; free some space or pass another --checkpoint_dir') from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def remove_stale_temporaries(folder, name):
    """Temporaries of `name` left by a process killed while saving (its pid is gone)."""
    for entry in os.listdir(folder):
        match = re.fullmatch(rf'\.{re.escape(name)}\.(\d+)\.tmp', entry)
        if match and not pid_alive(int(match.group(1))):
            os.remove(os.path.join(folder, entry))


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def first_line(exc):
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def read_checkpoint(path):
    """torch.load with weights_only=True (a .pth is a pickle: never run code from one)."""
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint {path!r} does not exist; check --load_model_path '
                              f'(train writes checkpoints/<model>_last.pth and _best.pth)')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, KeyError) as exc:
        # KeyError: a text file (a URL saved as .pth) read as a legacy pickle
        code = re.search(r'(?:unsupported|Unsupported global:) GLOBAL (\S+)', str(exc))
        if code:  # a pickle that would call a function: refused, whatever torch suggests
            raise CheckpointError(f'{path!r} holds Python code (a call to {code.group(1)}), not '
                                  f'just tensors: it was not loaded. Use checkpoints written by '
                                  f'this project, or state dicts saved with torch.save') from None
        reason = 'not a file written by torch.save' if isinstance(exc, KeyError) else first_line(exc)
        raise CheckpointError(f'{path!r} is not a readable checkpoint (truncated, corrupt, or '
                              f'not made by torch.save of tensors): {reason}') from None


def paths(checkpoint_dir, model_name):
    """(last, best): where train writes this model's checkpoints."""
    stem = os.path.join(checkpoint_dir, model_name)
    return f'{stem}_last.pth', f'{stem}_best.pth'


def to_resume(resume, load_model_path, checkpoint_dir, model_name):
    """--resume=last means this model's last checkpoint; a path, or --load_model_path
    (weights only, unless it is a training checkpoint of the same optimizer), works too."""
    if resume == 'last':
        last, _ = paths(checkpoint_dir, model_name)
        if not os.path.isfile(last):
            raise UserError(f'--resume=last: there is no {last} to resume from '
                            f'(check --checkpoint_dir and --model)')
        return last
    return resume or load_model_path


@contextlib.contextmanager
def training_lock(checkpoint_dir, model_name):
    """<checkpoint_dir>/<model>.lock holds the pid of the training that writes there:
    a second one would silently overwrite the first one's checkpoints. A lock whose
    process is gone (killed) is taken over."""
    path = os.path.join(checkpoint_dir, f'{model_name}.lock')
    try:
        with open(path) as f:
            owner = int(f.read().strip() or 0)
    except (OSError, ValueError):
        owner = 0
    if owner and owner != os.getpid() and pid_alive(owner):
        raise UserError(f'another training (pid {owner}) is writing {model_name} checkpoints to '
                        f'{checkpoint_dir}/ ({path}): wait for it, or pass another --checkpoint_dir')
    with open(path, 'w') as f:
        f.write(str(os.getpid()))
    try:
        yield
    finally:
        if os.path.exists(path):
            os.remove(path)


def to_evaluate(load_model_path, checkpoint_dir, model_name, select='best'):
    """--load_model_path, else this model's best (--select=best) or last checkpoint;
    never random weights."""
    if load_model_path:
        return load_model_path
    last, best = paths(checkpoint_dir, model_name)
    chosen = best if select == 'best' else last
    if os.path.isfile(chosen):
        print(f'no --load_model_path given: using {chosen} (--select={select})')
        return chosen
    raise UserError(f'no checkpoint to evaluate: pass --load_model_path=PATH '
                    f'(no {chosen} either; train first, or set --model or --select)')


def save_training(path, net, config, state, optimizer, scheduler, **extra):
    """net's weights with everything an exact resume needs (see the module docstring)."""
    rng = {'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        rng['cuda'] = torch.cuda.get_rng_state_all()
    fields = {name: getattr(state, name) for name in TRAINING_FIELDS}
    return net.save(path, config=config, extra=dict(
        fields, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), rng=rng,
        **extra))


def restore_training(checkpoint, optimizer, scheduler, optimizer_name):
    """Put the optimizer, schedule and RNG back as they were saved; return the training
    fields (epoch, images_done, best_val_acc, partial_epoch), or None when the checkpoint
    holds weights only or another optimizer's state (then training starts afresh)."""
    saved_opt = checkpoint.get('config', {}).get('optimizer')
    if 'optimizer' not in checkpoint or saved_opt != optimizer_name:
        return None
    fields = checked_fields(checkpoint)
    try:
        optimizer.load_state_dict(checkpoint['optimizer'])
    except ValueError:  # other parameter groups, e.g. --freeze changed
        return None
    if 'scheduler' in checkpoint:
        scheduler.load_state_dict(checkpoint['scheduler'])
    rng = checkpoint.get('rng', {})
    if 'torch' in rng:
        torch.set_rng_state(rng['torch'])
    if torch.cuda.is_available() and rng.get('cuda'):
        torch.cuda.set_rng_state_all(rng['cuda'])
    return dict(fields, partial_epoch=checkpoint.get('partial_epoch'))


def checked_fields(checkpoint):
    """The training fields, refused when a hand-made or damaged file holds odd values."""
    fields = {name: checkpoint[name] for name in TRAINING_FIELDS if name in checkpoint}
    for name, value in fields.items():
        kinds = (int, float) if name in ('best_val_acc', 'seconds') else (int,)
        if isinstance(value, bool) or not isinstance(value, kinds) or value < 0:
            raise CheckpointError(f'the checkpoint\'s {name!r} is {value!r}, not a number >= 0: '
                                  f'the file is damaged or hand-made; start from its weights '
                                  f'with --load_model_path instead of --resume')
    if not isinstance(checkpoint.get('optimizer'), dict):
        raise CheckpointError('the checkpoint\'s optimizer state is not a dict: the file is '
                              'damaged or hand-made; start from its weights with --load_model_path')
    return fields


def checked_temperature(value, path):
    """The checkpoint's temperature (1 when absent), refused when not a number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e3:
        raise CheckpointError(f'{path!r}: its temperature is {value!r}, not a number > 0: the '
                              f'file is damaged or hand-made')
    return float(value)


# Options that decide which images are validation images, or what the network sees:
# resuming with other values would train on validation images, or on other inputs.
SPLIT_AND_INPUT = ('train_data_root', 'seed', 'val_ratio', 'image_size', 'model', 'freeze')


def differences(saved, current):
    """[(option, saved value, current value)] for the options of SPLIT_AND_INPUT that
    differ; a data folder counts as the same when it is the same folder."""
    def same(key, a, b):
        if key == 'train_data_root' and isinstance(a, str) and isinstance(b, str):
            return os.path.realpath(a) == os.path.realpath(b)
        return a == b
    return [(key, saved[key], current[key]) for key in SPLIT_AND_INPUT
            if key in saved and key in current and not same(key, saved[key], current[key])]
