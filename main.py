"""Dogs vs. Cats: train, validate and test a classifier.

    python main.py train [--option=value ...]
    python main.py val --load_model_path=checkpoints/ResNet34_best.pth
    python main.py test --load_model_path=checkpoints/ResNet34_best.pth
    python main.py doctor [--option=value ...]   # why is a run stuck at 50%?
    python main.py demo        # generated images, no download needed
    python main.py features --img=PATH [--layers=conv1,layer1] [--load_model_path=...]
    python main.py replay --file=checkpoints/visdom_default_<time>.log   # recorded plots
    python main.py visdom_setup  # Visdom page assets from npm, for machines without CDN access
    python main.py help
"""
import csv
import math
import os
import sys
import time
import warnings

import fire
import torch
from torch import nn
from tqdm import tqdm

from config import DefaultConfig, option_help
from data.dataset import CLASSES, DogCat, SkippedFiles, build_loader
from data.synthetic import make_labelled_images, make_test_images
from models import build_model
from utils.doctor import collapse_warning, run_doctor
from utils import distributed
from utils.device import check_bf16, check_compile, forward, to_device
from utils.errors import UserError
from utils.feature_cache import use_cached_features
from utils.interrupt import GracefulStop
from utils.layer_report import describe_layers
from utils.meters import ClassificationMeter


def make_visualizer(opt):
    """A Visualizer when --vis=True (recording to a file if no server runs), else None."""
    if not opt.vis:
        return None
    from utils.visualize import Visualizer
    record = os.path.join(opt.checkpoint_dir, f'visdom_{opt.env}_{time.strftime("%Y%m%d_%H%M%S")}.log')
    return Visualizer(env=opt.env, port=opt.vis_port, server=opt.vis_server, record_file=record)


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


def decay_lr_if_loss_rose(optimizer, loss, previous_loss, lr_decay):
    """The book's rule: when this epoch's mean loss is above the last one, multiply
    every group's lr by lr_decay. Editing param_groups in place keeps the optimizer's
    state (momentum, Adam moments). Returns True when it decayed."""
    if loss > previous_loss:
        for group in optimizer.param_groups:
            group['lr'] *= lr_decay
        return True
    return False


def current_lrs(optimizer):
    return [group['lr'] for group in optimizer.param_groups]


def cosine_lr_factor(step, total_steps, warmup_fraction=0.1):
    """Linear warm-up over the first steps, then half a cosine down to 0."""
    warmup = max(1, int(total_steps * warmup_fraction))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress))


def cosine_schedule(optimizer, epoch, steps_per_epoch, max_epoch):
    """--lr_schedule=cosine: each group's lr follows its initial lr times the factor
    of the global step, so a resumed run lands on the same values."""
    def set_lrs(step):
        factor = cosine_lr_factor(epoch * steps_per_epoch + step, max_epoch * steps_per_epoch)
        for group in optimizer.param_groups:
            group['lr'] = group['initial_lr'] * factor
    return set_lrs


class TrainingDiverged(UserError):
    pass


def train_one_epoch(model, loader, criterion, optimizer, opt, epoch, skipped, vis, stop=None,
                    meter=None, start_step=0, schedule=None):
    """One pass over the training loader. With `stop` (a GracefulStop) it returns early
    after the step during which a signal arrived; `meter` and `start_step` continue an
    interrupted epoch; `schedule(step)` sets the learning rates before each step."""
    model.train()
    meter = meter or ClassificationMeter()
    bar = tqdm(loader, desc=f'epoch {epoch}', leave=False, dynamic_ncols=True,
               disable=not sys.stderr.isatty() or not distributed.is_main())
    for step, (images, targets, bad) in enumerate(bar, start=start_step):
        skipped.add(bad)
        if schedule is not None:
            schedule(step)
        if images is not None and images.size(0) >= 2:  # BatchNorm cannot train on one image
            if vis is not None and step == 0 and images.dim() == 4:  # do batches mix cats and dogs?
                net = getattr(model, 'module', model)
                vis.img_grid('first training batch', images, [CLASSES[t] for t in targets.tolist()],
                             title=f'epoch {epoch}: first training batch',
                             mean=net.input_mean, std=net.input_std)
            targets = targets.to(opt.device, non_blocking=True)
            scores = forward(model, images, opt)
            loss = criterion(scores, targets)
            loss_value = loss.item()
            if not math.isfinite(loss_value) or distributed.launched_by_torchrun():
                check_finite(loss_value, epoch, step, optimizer, opt)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            meter.add(scores, targets, loss_value)
            bar.set_postfix(loss=f'{meter.mean_loss:.4f}', acc=f'{meter.accuracy_counts:.1f}%')
            if vis is not None and (step + 1) % opt.print_freq == 0:
                vis.plot('train loss', meter.mean_loss)
        if os.path.exists(opt.debug_file):
            breakpoint()  # the book's ipdb hook: remove the file to carry on training
        if stop is not None and distributed.any_rank(stop.requested, opt.device):
            stop.batches_done = step + 1
            break
    return meter


def check_finite(loss_value, epoch, step, optimizer, opt):
    """Stop on a NaN/inf loss (on any rank) before it reaches the weights."""
    if distributed.any_rank(not math.isfinite(loss_value), opt.device):
        raise TrainingDiverged(
            f'the loss became {loss_value} at epoch {epoch}, batch {step} (lr '
            f'{current_lrs(optimizer)}): the run diverged. Lower --lr (try {opt.lr / 10:g}), '
            f'or run `python main.py doctor` with the same options. The last good checkpoint '
            f'in {opt.checkpoint_dir}/ is kept.')


@torch.inference_mode()
def evaluate(model, loader, opt, skipped):
    """One pass without gradients: the meter of scores against labels."""
    model.eval()
    meter = ClassificationMeter()
    criterion = nn.CrossEntropyLoss()
    for images, targets, bad in loader:
        skipped.add(bad)
        if images is None:
            continue
        scores = forward(model, images, opt)
        meter.add(scores, targets, criterion(scores.cpu(), targets).item())
    return meter


def format_epoch(epoch, lrs, train_meter, val_meter):
    lr = ','.join(f'{lr:.3g}' for lr in lrs)
    return (f'epoch:{epoch}, lr:{lr}, loss:{train_meter.mean_loss:.4f}, '
            f'train_cm:{train_meter.cm.tolist()}, val_cm:{val_meter.cm.tolist()}, '
            f'train_acc(cm/count):{train_meter.accuracy_cm:.2f}/{train_meter.accuracy_counts:.2f}%, '
            f'val_acc(cm/count):{val_meter.accuracy_cm:.2f}/{val_meter.accuracy_counts:.2f}%, '
            f'val_logloss:{val_meter.log_loss:.4f}')


def load_datasets(opt, model):
    """Train and val splits, normalised with the model's own input constants."""
    common = dict(val_ratio=opt.val_ratio, seed=opt.seed, image_size=opt.image_size,
                  mean=model.input_mean, std=model.input_std, preload=opt.preload,
                  num_workers=opt.num_workers)
    train_data = DogCat(opt.train_data_root, mode='train', augment=opt.augment, **common)
    val_data = DogCat(opt.train_data_root, mode='val', **common)
    return train_data, val_data


def resume_path(opt):
    """--resume=last means this model's last checkpoint; --load_model_path works too."""
    if opt.resume == 'last':
        path = os.path.join(opt.checkpoint_dir, f'{opt.model}_last.pth')
        if not os.path.isfile(path):
            raise UserError(f'--resume=last: there is no {path} to resume from '
                            f'(check --checkpoint_dir and --model)')
        return path
    return opt.resume or opt.load_model_path


def restore_training_state(model, optimizer, opt):
    """Weights always; with a training checkpoint of the same optimizer also its state,
    the epoch (and position in an interrupted one), the decay rule's memory, the best
    accuracy and the RNG state, so the run continues as if never stopped."""
    state = {'epoch': 0, 'batches_done': 0, 'previous_loss': math.inf, 'best_val_acc': 0.0}
    path = resume_path(opt)
    if not path:
        return state, None
    checkpoint = model.load(path)
    saved_opt = checkpoint.get('config', {}).get('optimizer')
    if 'optimizer' not in checkpoint or saved_opt != opt.optimizer:
        print(f'starting from the weights in {path}')
        return state, None
    try:
        optimizer.load_state_dict(checkpoint['optimizer'])
    except ValueError:  # other parameter groups, e.g. --freeze changed
        print(f'starting from the weights in {path} (its optimizer has other parameter groups)')
        return state, None
    for key in state:
        state[key] = checkpoint.get(key, state[key])
    if 'rng' in checkpoint:
        torch.set_rng_state(checkpoint['rng']['torch'])
        if torch.cuda.is_available() and checkpoint['rng'].get('cuda'):
            torch.cuda.set_rng_state_all(checkpoint['rng']['cuda'])
    partial = checkpoint.get('partial_epoch')
    print(f'resuming from {path}: epoch {state["epoch"]}'
          + (f' after batch {state["batches_done"]}' if state['batches_done'] else '')
          + f', lr {current_lrs(optimizer)}')
    return state, partial and ClassificationMeter().load_state_dict(partial)


def training_checkpoint(state, optimizer, **extra):
    rng = {'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        rng['cuda'] = torch.cuda.get_rng_state_all()
    return dict(state, optimizer=optimizer.state_dict(), rng=rng, **extra)


def train(**kwargs):
    """Train opt.model on opt.train_data_root; checkpoints go to opt.checkpoint_dir.

    Under torchrun every rank runs this; rank 0 alone prints, plots and saves."""
    opt = parse_options(kwargs)
    with GracefulStop() as stop:
        return run_training(opt, stop)


def parse_options(kwargs):
    """Options for this process; under torchrun it joins the process group first."""
    opt = DefaultConfig()._parse(kwargs, verbose=distributed.rank_from_env() == 0)
    opt.device = distributed.setup(opt.use_gpu)
    if opt.bf16:
        check_bf16(opt.device)
    if opt.compile:
        check_compile(opt.device)
    return opt


def run_training(opt, stop):
    torch.manual_seed(opt.seed)
    main_rank = distributed.is_main()
    if main_rank:
        check_writable(opt.checkpoint_dir)
    model = to_device(build_model(opt.model, opt.pretrained, weights=opt.weights, freeze=opt.freeze), opt)
    train_data, val_data = load_datasets(opt, model)
    train_loader = build_loader(train_data, opt.batch_size, True, opt.num_workers, opt.use_gpu, opt.seed)
    val_loader = build_loader(val_data, opt.batch_size, False, opt.num_workers, opt.use_gpu)
    if main_rank:
        print(f'{len(train_data)} training and {len(val_data)} validation images'
              + (f' on {distributed.world_size()} processes' if distributed.world_size() > 1 else ''))

    criterion = nn.CrossEntropyLoss(label_smoothing=opt.label_smoothing)
    optimizer = model.get_optimizer(opt.lr, opt.weight_decay, opt.optimizer, opt.momentum,
                                    opt.backbone_lr, opt.classifier_lr)
    for group in optimizer.param_groups:
        group['initial_lr'] = group['lr']  # the cosine schedule scales from here
    state, partial_meter = restore_training_state(model, optimizer, opt)
    if state['epoch'] >= opt.max_epoch and main_rank:
        print(f'the checkpoint has trained {state["epoch"]} epochs already: '
              f'raise --max_epoch to train more')
    vis = make_visualizer(opt) if main_rank else None
    skipped = SkippedFiles()
    history = []  # one record per epoch, returned for scripts and tests
    last_path = os.path.join(opt.checkpoint_dir, f'{model.model_name}_last.pth')
    best_path = os.path.join(opt.checkpoint_dir, f'{model.model_name}_best.pth')
    model, train_loader, val_loader = use_cached_features(model, train_loader, val_loader, opt, skipped)
    net = model  # what is saved; `model` may become its DistributedDataParallel wrapper
    if distributed.world_size() > 1:
        model = nn.parallel.DistributedDataParallel(model)
    if opt.compile:
        model = torch.compile(model)  # compiles on the first batch; `net` stays eager for eval

    steps_per_epoch = len(train_loader)
    for epoch in range(state['epoch'], opt.max_epoch):
        schedule = (cosine_schedule(optimizer, epoch, steps_per_epoch, opt.max_epoch)
                    if opt.lr_schedule == 'cosine' else None)
        sampler = train_loader.sampler
        if hasattr(sampler, 'set_epoch'):
            sampler.set_epoch(epoch)
            sampler.skip = state['batches_done'] * opt.batch_size
        train_meter = train_one_epoch(model, train_loader, criterion, optimizer, opt, epoch,
                                      skipped, vis, stop=stop, meter=partial_meter,
                                      start_step=state['batches_done'], schedule=schedule)
        partial_meter = None
        if hasattr(sampler, 'skip'):
            sampler.skip = 0
        if stop.requested:
            state['batches_done'] = stop.batches_done
            save_and_exit(stop, net, optimizer, opt, state, train_meter, last_path, vis)
        train_meter.all_reduce(opt.device)
        # the bare network: DDP's forward would sync buffers, and ranks' shards differ in size
        val_meter = evaluate(net, val_loader, opt, skipped).all_reduce(opt.device)
        history.append(epoch_record(epoch, current_lrs(optimizer), train_meter, val_meter))
        if main_rank:
            report_epoch(epoch, optimizer, train_meter, val_meter, history, vis)

        # every rank sees the same reduced loss, so every rank takes the same decision
        loss = train_meter.mean_loss
        decayed = (opt.lr_schedule == 'loss' and
                   decay_lr_if_loss_rose(optimizer, loss, state['previous_loss'], opt.lr_decay))
        if decayed and main_rank:
            print(f'loss rose ({state["previous_loss"]:.4f} -> {loss:.4f}): lr x {opt.lr_decay} '
                  f'-> {current_lrs(optimizer)}')
        state.update(epoch=epoch + 1, batches_done=0, previous_loss=loss)
        is_best = val_meter.accuracy_cm > state['best_val_acc']
        state['best_val_acc'] = max(state['best_val_acc'], val_meter.accuracy_cm)
        if main_rank:
            checkpoint = training_checkpoint(state, optimizer, val_acc=val_meter.accuracy_cm)
            net.save(last_path, extra=checkpoint, config=opt.to_dict())
            if is_best:
                net.save(best_path, extra=checkpoint, config=opt.to_dict())
    if skipped.summary():
        warnings.warn(skipped.summary())
    if main_rank:
        print(f'best validation accuracy {state["best_val_acc"]:.2f}%; checkpoints: {last_path}, {best_path}')
    if vis is not None:
        vis.close()  # deliver the last plots before the process ends
    return dict(state, history=history)


def save_and_exit(stop, net, optimizer, opt, state, train_meter, last_path, vis):
    """After SIGINT/SIGTERM: save the position inside the epoch, say how to resume."""
    if distributed.is_main():
        net.save(last_path, config=opt.to_dict(), extra=training_checkpoint(
            state, optimizer, partial_epoch=train_meter.state_dict()))
        print(f'saved {last_path} at epoch {state["epoch"]}, batch {state["batches_done"]}; '
              f'resume with:\n    python main.py train --resume={last_path} '
              + ' '.join(f'--{k}={v}' for k, v in opt_overrides(opt).items()))
    if vis is not None:
        vis.close()
    raise SystemExit(stop.exit_code)


def report_epoch(epoch, optimizer, train_meter, val_meter, history, vis):
    """The epoch's line on stdout and in Visdom, and the stuck-at-50% alarm."""
    line = format_epoch(epoch, current_lrs(optimizer), train_meter, val_meter)
    print(line)
    if vis is not None:
        log_epoch_to_visdom(vis, line, current_lrs(optimizer), train_meter, val_meter)
    alarm = collapse_warning([record['loss'] for record in history], val_meter)
    if alarm:
        print(f'!!! {alarm}')
        warnings.warn(alarm)
        if vis is not None:
            vis.log(f'WARNING: {alarm}')


def opt_overrides(opt):
    """The options that differ from the defaults (for the printed resume command)."""
    return {k: v for k, v in opt.to_dict().items()
            if v != getattr(DefaultConfig, k) and k not in ('resume', 'load_model_path')}


def epoch_record(epoch, lrs, train_meter, val_meter):
    return dict(epoch=epoch, lrs=lrs, loss=train_meter.mean_loss, time=time.time(),
                train_acc_cm=train_meter.accuracy_cm, train_acc_count=train_meter.accuracy_counts,
                train_cm=train_meter.cm.tolist(),
                val_acc_cm=val_meter.accuracy_cm, val_acc_count=val_meter.accuracy_counts,
                val_log_loss=val_meter.log_loss, val_cm=val_meter.cm.tolist())


def log_epoch_to_visdom(vis, line, lrs, train_meter, val_meter):
    vis.plot_lines('accuracy', {'train (cm)': train_meter.accuracy_cm,
                                'train (count)': train_meter.accuracy_counts,
                                'val (cm)': val_meter.accuracy_cm,
                                'val (count)': val_meter.accuracy_counts})
    vis.plot('lr', lrs[0], ytype='log')
    vis.plot('val log loss', val_meter.log_loss)
    vis.confusion('val confusion matrix', val_meter.cm)
    vis.log(line)


def checkpoint_to_evaluate(opt):
    """--load_model_path, else this model's best checkpoint; never random weights."""
    if opt.load_model_path:
        return opt.load_model_path
    best = os.path.join(opt.checkpoint_dir, f'{opt.model}_best.pth')
    if os.path.isfile(best):
        print(f'no --load_model_path given: using {best}')
        return best
    raise UserError(f'no checkpoint to evaluate: pass --load_model_path=PATH '
                    f'(no {best} either; train first, or set --model)')


def load_trained_model(opt):
    model = build_model(opt.model, pretrained=False)
    model.load(checkpoint_to_evaluate(opt))
    return to_device(model, opt)


def val(**kwargs):
    """Evaluate a checkpoint on the validation split: confusion matrix, accuracies, log loss."""
    opt = parse_options(kwargs)
    model = load_trained_model(opt)
    _, val_data = load_datasets(opt, model)
    skipped = SkippedFiles()
    meter = evaluate(model, build_loader(val_data, opt.batch_size, False, opt.num_workers,
                                         opt.use_gpu), opt, skipped).all_reduce(opt.device)
    if distributed.is_main():
        print(f'validation images: {meter.total}\n'
              f'confusion matrix (rows true cat/dog, columns predicted): {meter.cm.tolist()}\n'
              f'accuracy from the confusion matrix: {meter.accuracy_cm:.2f}%\n'
              f'accuracy from correct counts:       {meter.accuracy_counts:.2f}%\n'
              f'log loss: {meter.log_loss:.4f}')
    if skipped.summary():
        warnings.warn(skipped.summary())
    return meter


@torch.inference_mode()
def test(**kwargs):
    """Write opt.result_file: `id,label` per test image, label = probability of dog.
    Under torchrun each rank predicts its share and rank 0 writes the whole CSV."""
    opt = parse_options(kwargs)
    model = load_trained_model(opt).eval()
    test_data = DogCat(opt.test_data_root, mode='test', image_size=opt.image_size,
                       mean=model.input_mean, std=model.input_std)
    loader = build_loader(test_data, opt.batch_size, False, opt.num_workers, opt.use_gpu)
    skipped = SkippedFiles()
    rows = []
    for images, ids, bad in tqdm(loader, desc='test', leave=False,
                                 disable=not sys.stderr.isatty() or not distributed.is_main()):
        skipped.add(bad)
        if images is None:
            continue
        probability_dog = torch.softmax(forward(model, images, opt), dim=1)[:, 1]
        rows += zip(ids.tolist(), probability_dog.cpu().tolist())
    rows = distributed.gather_to_main(rows)
    if not distributed.is_main():
        return None
    write_csv(opt.result_file, sorted(rows))
    print(f'wrote {len(rows)} predictions to {opt.result_file}')
    if skipped.summary():
        warnings.warn(skipped.summary() + ': they have no row in the CSV')
    return rows


def write_csv(path, rows):
    tmp = f'{path}.tmp'
    with open(tmp, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['id', 'label'])
        writer.writerows((image_id, f'{p:.6f}') for image_id, p in rows)
    os.replace(tmp, path)


def demo(**kwargs):
    """Generate a small two-class image set, train on it briefly and write result.csv."""
    root = kwargs.pop('data_root', 'demo_data')
    if not os.path.isdir(os.path.join(root, 'train')):
        print(f'generating demo images in {root}/ (horizontal stripes = "cat", vertical = "dog")')
        make_labelled_images(os.path.join(root, 'train'), n_per_class=300)
        make_test_images(os.path.join(root, 'test1'), n=100)
    options = dict(train_data_root=os.path.join(root, 'train'),
                   test_data_root=os.path.join(root, 'test1'),
                   model='SmallResNet', image_size=64, max_epoch=6, batch_size=32,
                   env='demo', checkpoint_dir=os.path.join(root, 'checkpoints'))
    options.update(kwargs)
    state = train(**options)
    options.pop('load_model_path', None)
    test(**options)
    return state


def help(markdown=False):
    """Print the commands and every option with its default (--markdown: the README table)."""
    if markdown:
        print('| option | default | meaning |\n|---|---|---|')
        for name, default, meaning in option_help():
            shown = 'GPU if present' if name == 'use_gpu' else f'`{default!r}`'
            print(f'| `--{name}` | {shown} | {meaning} |')
        return
    print(__doc__)
    print('options (--name=value; --max-epoch and --max_epoch are the same):')
    for name, default, meaning in option_help():
        print(f'    --{name:<18} {default!r:<22} {meaning}')


def features(**kwargs):
    """Per-layer output shape and statistics of --img through the configured model."""
    opt = DefaultConfig()._parse(kwargs, verbose=False)
    if not opt.img:
        raise UserError('features needs an image: pass --img=PATH')
    if opt.load_model_path:
        model = load_trained_model(opt)
    else:
        model = build_model(opt.model, opt.pretrained, weights=opt.weights).to(opt.device)
    print(describe_layers(model, opt.img, opt.layers, opt.image_size, opt.device))


def replay(file, **kwargs):
    """Send plots recorded while no Visdom server ran to a running one."""
    from utils.visualize import replay as replay_log
    opt = DefaultConfig()._parse(kwargs, verbose=False)
    count = replay_log(file, opt.vis_server, opt.vis_port)
    print(f'replayed {count} Visdom messages from {file} to {opt.vis_server}:{opt.vis_port}')


def visdom_setup(force=False):
    """Install the Visdom page's scripts and fonts from npm, so the server needs no CDN."""
    from utils.visdom_assets import install
    if not install(force=force):
        print('Visdom page assets already installed')


def doctor(**kwargs):
    """Why is a run stuck at 50%? Run the checklist on the options train would get;
    exit status 1 when a check fails."""
    opt = DefaultConfig()._parse(kwargs)
    if run_doctor(opt, load_datasets, train_one_epoch):
        sys.exit(1)


COMMANDS = {'doctor': doctor, 'train': train, 'val': val, 'test': test, 'demo': demo,
            'features': features, 'replay': replay, 'visdom_setup': visdom_setup,
            'help': help}


def run(argv=None):
    """Run a command; a UserError prints one clear line and exits with status 2."""
    warnings.formatwarning = lambda msg, category, *args, **kw: f'warning: {msg}\n'
    try:
        fire.Fire(COMMANDS, command=argv, serialize=lambda result: None)
    except UserError as exc:
        print(f'error: {exc}', file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    run()
