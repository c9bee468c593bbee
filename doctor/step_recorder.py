"""Two real training steps, recorded: run.step on copies of the model and optimizer, and
beside each a clean computation of the same loss on the same weights and batch.

What is recorded per step: the gradients optimizer.step() saw (an optimizer hook, so a
step that zeroes them afterwards is read right), the change the step made to the
weights, the gradients autograd gives for run.criterion, the change the optimizer makes
of those, and the mode (train/eval) each BatchNorm and Dropout layer ran in."""
import copy
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from doctor.common import BATCHNORMS, DROPOUTS, copy_training, trainable


@dataclass
class StepRecord:
    loss: float
    grads: dict  # name -> gradient optimizer.step() saw (None: none)
    optimizer_steps: int  # how often the step called optimizer.step()
    applied: dict  # name -> change the step made to the weights
    clean: dict  # name -> autograd gradient of run.criterion, same weights and batch
    expected: dict  # name -> change the optimizer makes of the clean gradient
    modes: dict  # BatchNorm/Dropout module name -> training flag its forward saw
    stats_moved: dict  # BatchNorm module name -> running statistics changed by the step


def expected_modes(model):
    """The mode each BatchNorm/Dropout layer must train in: training, except a backbone
    frozen by --freeze (BasicModule.train keeps it in eval mode) outside the head and
    the blocks --unfreeze trains."""
    training = None
    if getattr(model, 'frozen', False):
        parts = [model.head(), *(model.unfrozen if model.unfrozen_on else [])]
        training = {id(m) for part in parts for m in part.modules()}
    return {name: training is None or id(module) in training
            for name, module in model.named_modules() if isinstance(module, BATCHNORMS + DROPOUTS)}


@contextmanager
def watching(model, optimizer):
    """Record the mode of each BatchNorm/Dropout forward and what optimizer.step() sees."""
    seen = dict(modes={}, grads=None, steps=0)
    params = trainable(model)

    def mode_hook(name):
        def hook(module, inputs):
            seen['modes'].setdefault(name, module.training)
        return hook

    def before_step(opt, args, kwargs):
        seen['steps'] += 1
        if seen['grads'] is None:
            seen['grads'] = {n: None if p.grad is None else p.grad.detach().clone()
                             for n, p in params.items()}

    hooks = [m.register_forward_pre_hook(mode_hook(n)) for n, m in model.named_modules()
             if isinstance(m, BATCHNORMS + DROPOUTS)]
    hooks.append(optimizer.register_step_pre_hook(before_step))
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


def running_means(model):
    return {n: m.running_mean.clone() for n, m in model.named_modules()
            if isinstance(m, BATCHNORMS) and m.running_mean is not None}


def rng_state(device):
    cuda = torch.cuda.get_rng_state(device) if device.type == 'cuda' else None
    return torch.get_rng_state(), cuda


def set_rng_state(state, device):
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def clean_step(ctx, reference, images, targets, rng):
    """(gradients, weight change) of a textbook step on `reference` (model, optimizer):
    train mode, same random numbers, run.criterion, autograd, one optimizer.step()."""
    model, optimizer = reference
    model.train()
    params = trainable(model)
    devices = [ctx.device] if ctx.device.type == 'cuda' else []
    with torch.random.fork_rng(devices=devices):
        set_rng_state(rng, ctx.device)
        scores = ctx.run.placement.forward(model, images)
        loss = ctx.run.criterion(scores, targets.to(ctx.device))
    grads = (torch.autograd.grad(loss, list(params.values()), allow_unused=True)
             if torch.is_tensor(loss) and loss.requires_grad else [None] * len(params))
    before = {n: p.detach().clone() for n, p in params.items()}
    for p, g in zip(params.values(), grads):
        p.grad = g
    if any(g is not None for g in grads):
        optimizer.step()
    return (dict(zip(params, grads)),
            {n: p.detach() - before[n] for n, p in params.items()})


def recorded_step(ctx, model, optimizer, images, targets):
    reference = copy.deepcopy((model, optimizer))
    rng = rng_state(ctx.device)
    params = trainable(model)
    before = {n: p.detach().clone() for n, p in params.items()}
    stats = running_means(model)
    with watching(model, optimizer) as seen:
        loss = ctx.step(model, optimizer, ctx.run.criterion, images, targets)
    grads = seen['grads'] or {n: None if p.grad is None else p.grad.detach().clone()
                              for n, p in params.items()}
    clean, expected = clean_step(ctx, reference, images, targets, rng)
    return StepRecord(
        loss=loss, grads=grads, optimizer_steps=seen['steps'],
        applied={n: p.detach() - before[n] for n, p in params.items()},
        clean=clean, expected=expected, modes=seen['modes'],
        stats_moved={n: not torch.equal(v, dict(model.named_modules())[n].running_mean)
                     for n, v in stats.items()})


def two_steps(ctx, size=16):
    """Two recorded steps of run.step, on two batches, from the run's starting weights."""
    model, optimizer = copy_training(ctx.run.model, ctx.run.optimizer)
    model.train()  # as train_one_epoch does before its steps
    batches = (ctx.batches * 2)[:2]
    return [recorded_step(ctx, model, optimizer, x[:size], t[:size]) for x, t in batches]
