"""The training loop: one step, one epoch, one evaluation pass, and fit() around them.

Like the book's train(): for each epoch, for each batch, forward, loss, backward,
step; then validate, report, adjust the learning rate and save a checkpoint.
"""
import contextlib
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from data.dataset import CLASSES
from engine.calibration import calibrate
from engine.feature_cache import use_cached_features
from engine.interpret import TopMistakes, epoch_mistakes, in_order_batches
from engine.report import epoch_record, report_epoch
from engine.schedules import progressive_size
from utils import checkpoint, distributed
from utils.errors import UserError
from utils.meters import ClassificationMeter
from utils.progress import Progress


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint (utils/checkpoint.py)."""
    epoch: int = 0  # epochs finished
    images_done: int = 0  # images of the running epoch already trained on (a resumed one)
    best_val_acc: float = 0.0
    seconds: float = 0.0  # wall time used by the run so far, resumes included
    lrs: list = None  # the learning rates of the last step (not saved: the schedule knows)
    partial: ClassificationMeter = None  # the running epoch's meter, when resumed mid-epoch
    history: list = field(default_factory=list)  # one record per epoch (engine/report.py)
    # validation [(logits, targets)] of the last and of the best epoch (not saved):
    # temperature scaling of the selected checkpoint needs no extra pass
    last_logits: list = None
    best_logits: list = None
    calibration: tuple = None  # (T, log loss before, after, cross-fitted): engine/calibration.py


class NonFiniteLoss(Exception):
    pass


class TrainingDiverged(UserError):
    pass


def train_step(model, optimizer, criterion, images, targets, placement):
    """One optimisation step; returns (scores, loss value). A NaN/inf loss (on any rank)
    raises NonFiniteLoss before it reaches the weights."""
    scores = placement.forward(model, images)
    loss = criterion(scores, targets.to(placement.device, non_blocking=True))
    value = loss.item()
    if not math.isfinite(value) or distributed.launched_by_torchrun():
        if distributed.any_rank(not math.isfinite(value), placement.device):
            raise NonFiniteLoss(value)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return scores, value


def train_one_epoch(run, model, state, stop=None):
    """One pass over run.train_loader with run.step, from state.images_done on. Returns
    the epoch's meter; with `stop` (a GracefulStop) it returns after the step during
    which a signal arrived, with state.images_done saying how far it got."""
    model.train()
    meter = state.partial or ClassificationMeter()
    bar = Progress(run.train_loader, f'epoch {state.epoch}')
    for images, targets, bad in until_workers_lost(bar, stop):
        run.skipped.add(bad)
        state.images_done += len(bad) + (0 if images is None else len(images))
        if images is not None and len(images) >= 2:  # BatchNorm cannot train on one image
            if run.vis is not None and meter.total == 0 and images.dim() == 4:
                show_batch(run, images, targets, state.epoch)
            if run.opt.progressive:
                images = shrunk(images, progressive_size(run.opt.image_size,
                                                         run.scheduler.progress()))
            try:
                scores, loss = run.step(model, run.optimizer, run.criterion, images, targets,
                                        run.placement)
            except NonFiniteLoss as exc:
                raise diverged(run, state, exc.args[0]) from None
            meter.add(scores, targets, loss)
            bar.note(loss=f'{meter.mean_loss:.4f}', acc=f'{meter.accuracy_counts:.1f}%')
            state.lrs = [group['lr'] for group in run.optimizer.param_groups]
            if run.scheduler.per_step:
                run.scheduler.step()
            if run.vis is not None and meter.loss.n % run.opt.print_freq == 0:
                run.vis.plot('train loss', meter.mean_loss)
        debug_hook(run.opt.debug_file)
        # a stop signal, or --time_budget's end (the rest is for the last validation and
        # checkpoint); one collective per step decides for every torchrun rank
        if distributed.any_rank((stop is not None and stop.requested) or run.budget.exhausted(),
                                run.placement.device):
            break
    return meter


def shrunk(images, size):
    """The batch resized to size x size (antialiased, as a photo taken smaller would be)."""
    if images.shape[-1] == size:
        return images
    return nn.functional.interpolate(images, size=(size, size), mode='bilinear',
                                     antialias=True, align_corners=False)


def until_workers_lost(batches, stop):
    """The loader's batches. After a stop signal, which usually kills the loader's
    workers too, their loss ends the epoch (the run then saves) instead of raising."""
    iterator = iter(batches)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except RuntimeError as exc:
            if stop is None or not stop.workers_lost(exc):
                raise
            return
        yield batch


def show_batch(run, images, targets, epoch):
    """The epoch's first batch in Visdom: do batches mix cats and dogs?"""
    net = run.model
    run.vis.img_grid('first training batch', images, [CLASSES[t] for t in targets.tolist()],
                     title=f'epoch {epoch}: first training batch',
                     mean=net.input_mean, std=net.input_std)


def diverged(run, state, loss):
    lrs = [group['lr'] for group in run.optimizer.param_groups]
    return TrainingDiverged(
        f'the loss became {loss} at epoch {state.epoch}, image {state.images_done} (lr {lrs}): '
        f'the run diverged. Lower --lr (try {run.opt.lr / 10:g}), or run `python main.py '
        f'doctor` with the same options. The last good checkpoint in '
        f'{run.opt.checkpoint_dir}/ is kept.')


def debug_hook(debug_file):
    """The book's ipdb hook: while the file exists, stop in the debugger. Only with a
    terminal (or a PYTHONBREAKPOINT the user chose): an unattended run is never held."""
    if debug_file and os.path.exists(debug_file):
        if sys.stdin.isatty() or os.environ.get('PYTHONBREAKPOINT'):
            breakpoint()  # remove the file, then `c` to carry on training


@torch.inference_mode()
def evaluate(model, loader, placement, skipped, desc='validation', mistakes=None, logits=None):
    """One pass without gradients: the meter of scores against labels. `mistakes` (a
    TopMistakes, engine/interpret.py) also keeps the worst misclassified images: the
    loader batches its in-order sampler, so each batch's dataset indices are known.
    `logits`, a list, receives each batch's (scores, targets)."""
    model.eval()
    meter = ClassificationMeter()
    criterion = nn.CrossEntropyLoss()
    batches = in_order_batches(loader) if mistakes is not None else None
    for images, targets, bad in Progress(loader, desc):
        indices = next(batches, None) if batches is not None else None
        skipped.add(bad)
        if images is None:
            continue
        scores = placement.forward(model, images)
        meter.add(scores, targets, criterion(scores.cpu(), targets).item())
        if logits is not None:
            logits.append((scores.float().cpu(), targets))
        if mistakes is not None:
            mistakes.add(indices, bad, scores, targets)
    return meter


def fit(run, stop):
    """Train run.model for run.opt.max_epoch epochs; return the final TrainState."""
    opt = run.opt
    state = resume(run)
    net = use_cached_features(run)  # run.model, or its head over cached features
    model = wrap_for_training(net, opt)
    last, best = checkpoint.paths(opt.checkpoint_dir, run.model.model_name)
    with lock_if_main(opt.checkpoint_dir, run.model.model_name):
        while more_epochs(run, state):
            if unfrozen_join(run, state):
                model = wrap_for_training(net, opt)  # DDP registers the parameters that train
            sampler = run.train_loader.sampler
            sampler.set_epoch(state.epoch)
            sampler.skip = state.images_done
            train_meter = train_one_epoch(run, model, state, stop)
            sampler.skip, state.partial = 0, None
            if stop.requested:
                save_and_exit(run, state, train_meter, last, stop)
            ending = time.monotonic()
            train_meter.all_reduce(run.placement.device)
            # --vis, not run.vis (rank 0's only): every rank takes part in gathering them
            mistakes = TopMistakes(run.val_data.samples) if run.opt.vis else None
            # the bare network: DDP's forward would sync buffers; ranks' shards differ in size
            state.last_logits = []
            try:
                val_meter = evaluate(net, run.val_loader, run.placement, run.skipped,
                                     mistakes=mistakes, logits=state.last_logits
                                     ).all_reduce(run.placement.device)
            except RuntimeError as exc:  # the stop signal killed the loader's workers too
                if not stop.workers_lost(exc):
                    raise
                save_and_exit(run, state, train_meter, last, stop)
            check_images_seen(train_meter, val_meter, run)
            end_of_epoch(run, state, train_meter, val_meter, last, best, mistakes)
            run.budget.measured_end(time.monotonic() - ending)
    if run.skipped.summary():
        warnings.warn(run.skipped.summary())
    if distributed.is_main():
        print(final_report(state, last, best, run.opt))
    if state.history:  # trained at least one epoch here: calibrate the selected checkpoint
        calibrate_selected(run, net, state, last, best)
    if run.vis is not None:
        run.vis.close()  # deliver the last plots before the process ends
    return state


def final_report(state, last, best, opt):
    records = state.history
    best_record = max(records, key=lambda r: r['val_acc_cm'], default=None)
    line = f'best validation accuracy {state.best_val_acc:.2f}%'
    if best_record is not None:
        line = (f'validation accuracy: last epoch {records[-1]["val_acc_cm"]:.2f}%, best '
                f'{best_record["val_acc_cm"]:.2f}% (epoch {best_record["epoch"]}; picked on the '
                f'same images, so optimistic)')
    line += f'; checkpoints: {last}, {best}; val and test use {last if opt.select == "last" else best}'
    if opt.time_budget:
        line += f'; {state.epoch} epochs in {state.seconds / 60:.1f} of the {opt.time_budget:g} minutes'
    return line


def calibrate_selected(run, net, state, last, best):
    """Temperature scaling for the checkpoint --select names, on its validation logits
    (kept from its epoch, or computed again with its weights after a resume)."""
    path = last if run.opt.select == 'last' else best
    logits = state.last_logits if run.opt.select == 'last' else state.best_logits
    if run.opt.select == 'best':
        run.model.load(path)  # the weights train leaves in memory are the selected ones
    if logits is None:
        logits = []
        evaluate(net, run.val_loader, run.placement, run.skipped, logits=logits)
    state.calibration = calibrate(run.model, path, logits)


def unfrozen_join(run, state):
    """--unfreeze with --head_epochs: the unfrozen blocks train from epoch head_epochs
    on, the head alone before; True when this epoch changes which parameters train."""
    model, on = run.model, state.epoch >= run.opt.head_epochs
    if not model.unfrozen or model.unfrozen_on == on:
        return False
    model.train_unfrozen(on)
    if on and distributed.is_main():
        print(f'epoch {state.epoch}: the unfrozen blocks join the head in training '
              f'(--unfreeze={run.opt.unfreeze}, lr {[g["lr"] for g in run.optimizer.param_groups]})')
    return True


def more_epochs(run, state):
    """--max_epoch epochs, or with --time_budget as many as the budget allows."""
    if run.opt.time_budget:
        return not run.budget.exhausted()
    return state.epoch < run.opt.max_epoch


def lock_if_main(checkpoint_dir, model_name):
    """Rank 0 alone writes checkpoints, so it alone holds the checkpoint dir's lock."""
    if distributed.is_main():
        return checkpoint.training_lock(checkpoint_dir, model_name)
    return contextlib.nullcontext()


def check_images_seen(train_meter, val_meter, run):
    """An epoch in which no image could be used trains or measures nothing: stop."""
    for meter, split in ((train_meter, 'training'), (val_meter, 'validation')):
        if meter.total == 0:
            raise UserError(f'no {split} image could be used in this epoch: every one was '
                            f'unreadable (see the warnings above) in {run.opt.train_data_root}')


def end_of_epoch(run, state, train_meter, val_meter, last, best, mistakes=None):
    """Report (with the most confident mistakes in Visdom), adjust the learning rate,
    remember the best, save."""
    lrs = state.lrs or [group['lr'] for group in run.optimizer.param_groups]
    state.history.append(epoch_record(state.epoch, lrs, train_meter, val_meter))
    if distributed.is_main():
        report_epoch(state.history, lrs, train_meter, val_meter, run.vis)
    if mistakes is not None:  # every rank: gathering them is a collective call
        epoch_mistakes(run, mistakes, val_meter, state.epoch)
    if not run.scheduler.per_step:  # every rank sees the same reduced loss: same decision
        previous, loss = run.scheduler.previous_loss, train_meter.mean_loss
        run.scheduler.step(loss)
        if run.scheduler.decayed and distributed.is_main():
            print(f'loss rose ({previous:.4f} -> {loss:.4f}): lr x {run.opt.lr_decay} '
                  f'-> {run.scheduler.get_last_lr()}')
    state.epoch, state.images_done = state.epoch + 1, 0  # an epoch cut by the budget ends too
    state.seconds = run.budget.elapsed()
    is_best = val_meter.accuracy_cm > state.best_val_acc
    if is_best:
        state.best_logits = state.last_logits
    state.best_val_acc = max(state.best_val_acc, val_meter.accuracy_cm)
    if distributed.is_main():
        for path in (last, best) if is_best else (last,):
            checkpoint.save_training(path, run.model, run.opt.to_dict(), state, run.optimizer,
                                     run.scheduler, val_acc=val_meter.accuracy_cm)


def resume(run):
    """A fresh TrainState, or the saved one when resuming a training checkpoint whose
    split and input options match these (see utils/checkpoint.py differences())."""
    saved = run.resume_from
    if not saved:
        return TrainState()
    changed = checkpoint.differences(saved.get('config', {}), run.opt.to_dict())
    if changed and run.opt.resume:
        raise UserError(
            f'--resume={run.opt.resume}: the checkpoint was trained with '
            + ', '.join(f'--{key}={old}' for key, old, _ in changed) + '; now '
            + ', '.join(f'--{key}={new}' for key, _, new in changed) + '. Resuming would mix '
            f'the validation split into training or change the input: pass the same values, '
            f'or start a new run from its weights with --load_model_path={run.resume_path}')
    fields = None if changed else checkpoint.restore_training(
        saved, run.optimizer, run.scheduler, run.opt.optimizer)
    if not fields:
        print(f'starting from the weights in {run.resume_path}'
              + (f' (a new run: {", ".join(key for key, _, _ in changed)} changed)' if changed else ''))
        return TrainState()
    partial = fields.pop('partial_epoch')
    state = TrainState(**fields, partial=partial and ClassificationMeter().load_state_dict(partial))
    run.budget.used_before = state.seconds  # --time_budget: the remaining budget carries on
    if distributed.is_main():
        print(f'resuming from {run.resume_path}: epoch {state.epoch}'
              + (f' after {state.images_done} images' if state.images_done else '')
              + f', lr {run.scheduler.get_last_lr()}')
        if state.epoch >= run.opt.max_epoch:
            print(f'the checkpoint has trained {state.epoch} epochs already: '
                  f'raise --max_epoch to train more')
    return state


def wrap_for_training(model, opt):
    """The module the steps run: its DistributedDataParallel wrapper under torchrun,
    compiled with --compile. Checkpoints and evaluation use the bare one."""
    if distributed.world_size() > 1:
        model = nn.parallel.DistributedDataParallel(model)
    if opt.compile:
        model = torch.compile(model)  # compiles on the first batch
    return model


def save_and_exit(run, state, train_meter, last, stop):
    """After SIGINT/SIGTERM: save the position inside the epoch, say how to resume."""
    if distributed.is_main():
        state.seconds = run.budget.elapsed()
        checkpoint.save_training(last, run.model, run.opt.to_dict(), state, run.optimizer,
                                 run.scheduler, partial_epoch=train_meter.state_dict())
        print(f'saved {last} at epoch {state.epoch}, image {state.images_done}; resume with:\n'
              f'    python main.py train --resume={last} {run.opt.overrides_line()}')
    if run.vis is not None:
        run.vis.close()
    raise SystemExit(stop.exit_code)
