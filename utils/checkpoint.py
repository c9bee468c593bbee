"""The checkpoint format, in one place.

A checkpoint is a dict written by torch.save:
    model_name, state_dict, config         every checkpoint (BasicModule.save)
    epoch, images_done, best_val_acc       where training stands (images_done: of an
                                           interrupted epoch, 0 after a whole one)
    optimizer, scheduler, rng              what an exact resume needs
    partial_epoch                          the interrupted epoch's meter
    val_acc                                this epoch's validation accuracy
train writes <checkpoint_dir>/<model>_last.pth every epoch and _best.pth when the
validation accuracy improves; val and test read _best.pth unless told otherwise.
"""
import os
import pickle

import torch

from utils.errors import UserError

TRAINING_FIELDS = ('epoch', 'images_done', 'best_val_acc')


class CheckpointError(UserError):
    pass


def atomic_save(obj, path):
    """torch.save through a temporary file and a rename: a crash never leaves half a file."""
    folder = os.path.dirname(path) or '.'
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f'.{os.path.basename(path)}.{os.getpid()}.tmp')
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def read_checkpoint(path):
    """torch.load with weights_only=True (a .pth is a pickle: never run code from one)."""
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint {path!r} does not exist; check --load_model_path '
                              f'(train writes checkpoints/<model>_last.pth and _best.pth)')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        lines = [l.strip() for l in str(exc).splitlines() if l.strip()] or [type(exc).__name__]
        # torch's weights_only refusal is long: keep its one informative line
        first_line = next((l for l in lines if 'Unsupported global' in l), lines[0])
        raise CheckpointError(f'{path!r} is not a readable checkpoint (truncated, corrupt, or '
                              f'not made by torch.save of tensors): {first_line}') from None


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


def to_evaluate(load_model_path, checkpoint_dir, model_name):
    """--load_model_path, else this model's best checkpoint; never random weights."""
    if load_model_path:
        return load_model_path
    _, best = paths(checkpoint_dir, model_name)
    if os.path.isfile(best):
        print(f'no --load_model_path given: using {best}')
        return best
    raise UserError(f'no checkpoint to evaluate: pass --load_model_path=PATH '
                    f'(no {best} either; train first, or set --model)')


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
    fields = {name: checkpoint[name] for name in TRAINING_FIELDS if name in checkpoint}
    return dict(fields, partial_epoch=checkpoint.get('partial_epoch'))
