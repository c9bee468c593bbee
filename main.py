# coding: utf8
"""Dogs vs. Cats: train, validate and test a classifier.

    python main.py train [--option=value ...]
    python main.py val --load_model_path=checkpoints/ResNet34_best.pth
    python main.py test --load_model_path=checkpoints/ResNet34_best.pth
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
from models.basic_module import atomic_save
from utils.errors import UserError
from utils.feature_cache import use_cached_features
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


def train_one_epoch(model, loader, criterion, optimizer, opt, epoch, skipped, vis):
    model.train()
    meter = ClassificationMeter()
    bar = tqdm(loader, desc=f'epoch {epoch}', leave=False, dynamic_ncols=True,
               disable=not sys.stderr.isatty())
    for step, (images, targets, bad) in enumerate(bar):
        skipped.add(bad)
        if images is None or images.size(0) < 2:  # BatchNorm cannot train on one image
            continue
        if vis is not None and step == 0 and images.dim() == 4:  # do batches mix cats and dogs?
            vis.img_grid('first training batch', images, [CLASSES[t] for t in targets.tolist()],
                         title=f'epoch {epoch}: first training batch',
                         mean=model.input_mean, std=model.input_std)
        images = images.to(opt.device, non_blocking=True)
        targets = targets.to(opt.device, non_blocking=True)
        scores = model(images)
        loss = criterion(scores, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        meter.add(scores, targets, loss.item())
        bar.set_postfix(loss=f'{meter.mean_loss:.4f}', acc=f'{meter.accuracy_counts:.1f}%')
        if vis is not None and (step + 1) % opt.print_freq == 0:
            vis.plot('train loss', meter.mean_loss)
        if os.path.exists(opt.debug_file):
            breakpoint()  # the book's ipdb hook: remove the file to carry on training
    return meter


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
        scores = model(images.to(opt.device))
        meter.add(scores, targets, criterion(scores.cpu().float(), targets).item())
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
    norm = dict(mean=model.input_mean, std=model.input_std)
    train_data = DogCat(opt.train_data_root, mode='train', val_ratio=opt.val_ratio,
                        seed=opt.seed, image_size=opt.image_size, augment=opt.augment, **norm)
    val_data = DogCat(opt.train_data_root, mode='val', val_ratio=opt.val_ratio,
                      seed=opt.seed, image_size=opt.image_size, **norm)
    return train_data, val_data


def restore_training_state(model, optimizer, opt):
    """--load_model_path: weights always; optimizer state, epoch and the decay rule's
    memory too when the file is a training checkpoint of the same optimizer."""
    state = {'epoch': 0, 'previous_loss': math.inf, 'best_val_acc': 0.0}
    if not opt.load_model_path:
        return state
    checkpoint = model.load(opt.load_model_path)
    saved_opt = checkpoint.get('config', {}).get('optimizer')
    if 'optimizer' in checkpoint and saved_opt == opt.optimizer:
        optimizer.load_state_dict(checkpoint['optimizer'])
        for key in state:
            state[key] = checkpoint.get(key, state[key])
        print(f'resuming from {opt.load_model_path}: epoch {state["epoch"]}, lr {current_lrs(optimizer)}')
    else:
        print(f'starting from the weights in {opt.load_model_path}')
    return state


def train(**kwargs):
    """Train opt.model on opt.train_data_root; checkpoints go to opt.checkpoint_dir."""
    opt = DefaultConfig()._parse(kwargs)
    torch.manual_seed(opt.seed)
    check_writable(opt.checkpoint_dir)
    model = build_model(opt.model, opt.pretrained, weights=opt.weights, freeze=opt.freeze).to(opt.device)
    train_data, val_data = load_datasets(opt, model)
    train_loader = build_loader(train_data, opt.batch_size, True, opt.num_workers, opt.use_gpu, opt.seed)
    val_loader = build_loader(val_data, opt.batch_size, False, opt.num_workers, opt.use_gpu)
    print(f'{len(train_data)} training and {len(val_data)} validation images')

    criterion = nn.CrossEntropyLoss()
    optimizer = model.get_optimizer(opt.lr, opt.weight_decay, opt.optimizer, opt.momentum,
                                    opt.backbone_lr, opt.classifier_lr)
    state = restore_training_state(model, optimizer, opt)
    if state['epoch'] >= opt.max_epoch:
        print(f'the checkpoint has trained {state["epoch"]} epochs already: '
              f'raise --max_epoch to train more')
    vis = make_visualizer(opt)
    skipped = SkippedFiles()
    history = []  # one record per epoch, returned for scripts and tests
    last_path = os.path.join(opt.checkpoint_dir, f'{model.model_name}_last.pth')
    best_path = os.path.join(opt.checkpoint_dir, f'{model.model_name}_best.pth')
    model, train_loader, val_loader = use_cached_features(model, train_loader, val_loader, opt, skipped)

    for epoch in range(state['epoch'], opt.max_epoch):
        train_meter = train_one_epoch(model, train_loader, criterion, optimizer, opt, epoch,
                                      skipped, vis)
        val_meter = evaluate(model, val_loader, opt, skipped)
        line = format_epoch(epoch, current_lrs(optimizer), train_meter, val_meter)
        print(line)
        if vis is not None:
            log_epoch_to_visdom(vis, line, current_lrs(optimizer), train_meter, val_meter)

        loss = train_meter.mean_loss
        history.append(epoch_record(epoch, current_lrs(optimizer), train_meter, val_meter))
        if decay_lr_if_loss_rose(optimizer, loss, state['previous_loss'], opt.lr_decay):
            print(f'loss rose ({state["previous_loss"]:.4f} -> {loss:.4f}): lr x {opt.lr_decay} '
                  f'-> {current_lrs(optimizer)}')
        state.update(epoch=epoch + 1, previous_loss=loss)
        is_best = val_meter.accuracy_cm > state['best_val_acc']
        state['best_val_acc'] = max(state['best_val_acc'], val_meter.accuracy_cm)
        extra = dict(state, optimizer=optimizer.state_dict(), val_acc=val_meter.accuracy_cm)
        model.save(last_path, extra=extra, config=opt.to_dict())
        if is_best:
            model.save(best_path, extra=extra, config=opt.to_dict())
    if skipped.summary():
        warnings.warn(skipped.summary())
    print(f'best validation accuracy {state["best_val_acc"]:.2f}%; checkpoints: {last_path}, {best_path}')
    if vis is not None:
        vis.close()  # deliver the last plots before the process ends
    return dict(state, history=history)


def epoch_record(epoch, lrs, train_meter, val_meter):
    return dict(epoch=epoch, lrs=lrs, loss=train_meter.mean_loss,
                train_acc_cm=train_meter.accuracy_cm, train_acc_count=train_meter.accuracy_counts,
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
    return model.to(opt.device)


def val(**kwargs):
    """Evaluate a checkpoint on the validation split: confusion matrix, accuracies, log loss."""
    opt = DefaultConfig()._parse(kwargs)
    model = load_trained_model(opt)
    _, val_data = load_datasets(opt, model)
    skipped = SkippedFiles()
    meter = evaluate(model, build_loader(val_data, opt.batch_size, False, opt.num_workers,
                                         opt.use_gpu), opt, skipped)
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
    """Write opt.result_file: `id,label` per test image, label = probability of dog."""
    opt = DefaultConfig()._parse(kwargs)
    model = load_trained_model(opt).eval()
    test_data = DogCat(opt.test_data_root, mode='test', image_size=opt.image_size,
                       mean=model.input_mean, std=model.input_std)
    loader = build_loader(test_data, opt.batch_size, False, opt.num_workers, opt.use_gpu)
    skipped = SkippedFiles()
    rows = []
    for images, ids, bad in tqdm(loader, desc='test', leave=False, disable=not sys.stderr.isatty()):
        skipped.add(bad)
        if images is None:
            continue
        probability_dog = torch.softmax(model(images.to(opt.device)).float(), dim=1)[:, 1]
        rows += zip(ids.tolist(), probability_dog.cpu().tolist())
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


def help():
    """Print the commands and every option with its default."""
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


COMMANDS = {'train': train, 'val': val, 'test': test, 'demo': demo, 'features': features,
            'replay': replay, 'visdom_setup': visdom_setup, 'help': help}


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
