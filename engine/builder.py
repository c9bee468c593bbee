"""One builder: parsed options in, everything a command needs out.

train, val, test, doctor, features and the benches all build through these functions,
so what the doctor examines is what train would use (same loader, sampler, model,
placement, optimizer, schedule, loss and step).
"""
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from data.dataset import DataError, DogCat, SkippedFiles, build_loader
from engine.loop import train_step
from engine.schedules import TimeBudget, make_scheduler
from models import build_model
from utils import checkpoint, distributed
from utils.device import Placement
from utils.errors import UserError


@dataclass
class Run:
    """What a command works with. Each field is a seam: a test or the doctor may
    replace one (a faulty loader, another step) and train runs with it."""
    opt: object
    placement: Placement
    model: nn.Module  # the network (a BasicModule) on its device; what checkpoints hold
    train_data: DogCat = None
    val_data: DogCat = None
    train_loader: object = None
    val_loader: object = None
    criterion: nn.Module = None
    optimizer: object = None
    scheduler: object = None
    step: Callable = train_step  # step(model, optimizer, criterion, images, targets, placement)
    vis: object = None  # a Visualizer, or None with --vis=False
    resume_path: str = None  # the checkpoint the weights came from, and its contents
    resume_from: dict = None
    budget: TimeBudget = None  # the run's clock, and with --time_budget its deadline
    skipped: SkippedFiles = field(default_factory=SkippedFiles)


def placement(opt):
    return Placement(opt.device, channels_last=opt.channels_last, bf16=opt.bf16)


def network(opt, where, trained=False):
    """opt.model on its device: for training as configured (ImageNet weights, --freeze,
    --init), for evaluation with the weights of the checkpoint to evaluate."""
    if not trained:
        model = build_model(opt.model, opt.pretrained, weights=opt.weights, freeze=opt.freeze,
                            init=opt.init, unfreeze=opt.unfreeze)
        return where.place(model)
    model = build_model(opt.model, pretrained=False)
    path = checkpoint.to_evaluate(opt.load_model_path, opt.checkpoint_dir, opt.model, opt.select)
    trained_size = model.load(path).get('config', {}).get('image_size')
    if trained_size and trained_size != opt.image_size:
        warnings.warn(f'{path} was trained on {trained_size} px images; evaluating it at '
                      f'--image_size={opt.image_size} gives poor results: pass '
                      f'--image_size={trained_size}')
    return where.place(model)


def datasets(opt, model, modes=('train', 'val')):
    """The requested splits, normalised with the model's own input constants."""
    common = dict(image_size=opt.image_size, mean=model.input_mean, std=model.input_std)
    if modes == ('test',):
        return DogCat(opt.test_data_root, mode='test', **common)
    common.update(val_ratio=opt.val_ratio, seed=opt.seed, preload=opt.preload,
                  num_workers=opt.num_workers)
    return tuple(DogCat(opt.train_data_root, mode=mode, augment=opt.augment, **common)
                 for mode in modes)


def loader(opt, dataset, shuffle):
    return build_loader(dataset, opt.batch_size, shuffle, opt.num_workers, opt.use_gpu, opt.seed)


def optimizer(opt, model):
    return model.get_optimizer(opt.lr, opt.weight_decay, opt.optimizer, opt.momentum,
                               opt.backbone_lr, opt.classifier_lr)


def criterion(opt):
    return nn.CrossEntropyLoss(label_smoothing=opt.label_smoothing)


def visualizer(opt):
    """A Visualizer when --vis=True (recording to a file if no server runs), else None;
    only torchrun's rank 0 plots."""
    if not opt.vis or not distributed.is_main():
        return None
    from utils.visualize import Visualizer
    record = os.path.join(opt.checkpoint_dir, f'visdom_{opt.env}_{time.strftime("%Y%m%d_%H%M%S")}.log')
    return Visualizer(env=opt.env, port=opt.vis_port, server=opt.vis_server, record_file=record)


def for_training(opt, vis=True):
    """Everything train needs, with the weights of --resume or --load_model_path."""
    budget = TimeBudget(opt.time_budget, started=time.monotonic())  # decoding counts
    torch.manual_seed(opt.seed)
    if distributed.is_main():
        check_writable(opt.checkpoint_dir)
    where = placement(opt)
    model = network(opt, where)
    train_data, val_data = datasets(opt, model)
    check_split(opt, train_data, val_data)
    run = Run(opt, where, model, train_data, val_data, loader(opt, train_data, True),
              loader(opt, val_data, False), criterion(opt), optimizer(opt, model))
    run.budget = budget
    run.scheduler = make_scheduler(opt.lr_schedule, run.optimizer, opt.lr_decay,
                                   opt.max_epoch * len(run.train_loader),
                                   budget if opt.time_budget else None)
    run.resume_path = checkpoint.to_resume(opt.resume, opt.load_model_path, opt.checkpoint_dir,
                                           opt.model)
    if run.resume_path:
        run.resume_from = model.load(run.resume_path)
        model.temperature = 1.0  # training sees raw logits; a new temperature is fitted after
    run.vis = visualizer(opt) if vis else None
    return run


def for_evaluation(opt, mode='val'):
    """The trained model of --load_model_path (or <model>_best.pth) and the loader of
    the validation split (mode='val') or of the test folder (mode='test')."""
    where = placement(opt)
    model = network(opt, where, trained=True)
    if mode == 'test':
        data = datasets(opt, model, ('test',))
        return Run(opt, where, model, val_data=data, val_loader=loader(opt, data, False))
    (val_data,) = datasets(opt, model, ('val',))
    return Run(opt, where, model, val_data=val_data, val_loader=loader(opt, val_data, False))


def check_split(opt, train_data, val_data):
    """Both splits need images, or the run would train or measure nothing."""
    total = len(train_data) + len(val_data)
    if not len(train_data):
        raise DataError(f'--val_ratio={opt.val_ratio} leaves no training images out of the '
                        f'{total} in {opt.train_data_root}: lower --val_ratio (0.3 is usual)')
    if not len(val_data):
        raise DataError(f'--val_ratio={opt.val_ratio} leaves no validation images out of the '
                        f'{total} in {opt.train_data_root}: raise --val_ratio, or add images '
                        f'(each class needs at least {math.ceil(0.5 / opt.val_ratio)})')


def check_output_file(path, option='--result_file'):
    """Fail before predicting, not after the whole pass, when the file cannot be written."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UserError(f'{option}={path!r} is a folder: pass a file name, e.g. '
                        f'{os.path.join(path, "result.csv")}')
    if not os.path.isdir(folder):
        raise UserError(f'{option}={path!r}: the folder {folder} does not exist; create it or '
                        f'pass another path')
    if not os.access(folder, os.W_OK):
        raise UserError(f'{option}={path!r}: the folder {folder} is not writable')


def check_writable(folder):
    """Fail now, not after the first epoch, when checkpoints cannot be written."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f'.write_test_{os.getpid()}')
        with open(probe, 'w'):
            pass
        os.remove(probe)
    except OSError as exc:
        raise UserError(f'cannot write checkpoints to {folder!r} ({exc.strerror}); '
                        f'pass a writable --checkpoint_dir') from None
