"""Dogs vs. Cats: train, validate and test a classifier.

    python main.py train [--option=value ...]
    python main.py val --load_model_path=checkpoints/ResNet34_best.pth
    python main.py test --load_model_path=checkpoints/ResNet34_best.pth
    python main.py doctor [--option=value ...]   # why is a run stuck at 50%?
    python main.py demo        # generated images, no download needed
    python main.py interpret   # worst validation mistakes + Grad-CAM: checkpoints/interpret/
    python main.py features --img=PATH [--layers=conv1,layer1] [--load_model_path=...]
    python main.py predict PHOTO|FOLDER|"GLOB" [...] [--result_file=x.csv] [--engine=onnx]
    python main.py export      # checkpoints/<model>.onnx, for ONNX Runtime
    python main.py replay --file=checkpoints/visdom_default_<time>.log   # recorded plots
    python main.py visdom_setup  # Visdom page assets from npm, for machines without CDN access
    python main.py help
"""
import csv
import os
import sys
import warnings

import fire
import torch

import config
from data.synthetic import make_labelled_images, make_test_images
from doctor import live_visualizer, run_doctor
from doctor.layers import describe_layers
from engine import builder, onnx_engine
from engine import interpret as top_losses
from engine import predict as after_training
from engine.loop import evaluate, fit
from utils import distributed
from utils.errors import UserError
from utils.interrupt import GracefulStop
from utils.progress import Progress


def train(**kwargs):
    """Train opt.model on opt.train_data_root; checkpoints go to opt.checkpoint_dir.

    Under torchrun every rank runs this; rank 0 alone prints, plots and saves."""
    opt = config.parse(kwargs)
    with GracefulStop() as stop:
        run = builder.for_training(opt)
        if distributed.is_main():
            print(f'{len(run.train_data)} training and {len(run.val_data)} validation images'
                  + (f' on {distributed.world_size()} processes' if distributed.world_size() > 1 else ''))
        return fit(run, stop)


def val(**kwargs):
    """Evaluate a checkpoint on the validation split: confusion matrix, accuracies, log loss."""
    opt = config.parse(kwargs)
    run = builder.for_evaluation(opt, 'val')
    meter = evaluate(onnx_engine.for_inference(run), run.val_loader, run.placement, run.skipped)
    meter.all_reduce(run.placement.device)
    if distributed.is_main():
        print(f'validation images: {meter.total}\n'
              f'confusion matrix (rows true cat/dog, columns predicted): {meter.cm.tolist()}\n'
              f'accuracy from the confusion matrix: {meter.accuracy_cm:.2f}%\n'
              f'accuracy from correct counts:       {meter.accuracy_counts:.2f}%\n'
              f'log loss: {meter.log_loss:.4f}')
    if run.skipped.summary():
        warnings.warn(run.skipped.summary())
    return meter


@torch.inference_mode()
def test(**kwargs):
    """Write opt.result_file: `id,label` per test image, label = probability of dog.
    Under torchrun each rank predicts its share and rank 0 writes the whole CSV."""
    opt = config.parse(kwargs)
    builder.check_output_file(opt.result_file)
    run = builder.for_evaluation(opt, 'test')
    run.model.eval()
    network = onnx_engine.for_inference(run)  # --engine: the model, or it in ONNX Runtime
    rows = []
    for images, ids, bad in Progress(run.val_loader, 'test'):
        run.skipped.add(bad)
        if images is None:
            continue
        probability_dog = torch.softmax(run.placement.forward(network, images), dim=1)[:, 1]
        rows += zip(ids.tolist(), probability_dog.cpu().tolist())
    rows = distributed.gather_to_main(rows)
    if not distributed.is_main():
        return None
    write_csv(opt.result_file, sorted((i, min(max(p, opt.clip), 1 - opt.clip)) for i, p in rows))
    print(f'wrote {len(rows)} predictions to {opt.result_file}')
    if run.skipped.summary():
        warnings.warn(run.skipped.summary() + ': they have no row in the CSV')
    return rows


def write_csv(path, rows):
    tmp = f'{path}.tmp'
    with open(tmp, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['id', 'label'])
        writer.writerows((image_id, f'{p:.6f}') for image_id, p in rows)
    os.replace(tmp, path)


def predict(*paths, **kwargs):
    """Print `path, P(dog), cat|dog` for each photo, folder or glob given, in that order.
    --result_file=x.csv writes them too (only when given: test's result.csv stays as is)."""
    to_csv = any(key.replace('-', '_') == 'result_file' for key in kwargs)
    opt = config.parse(kwargs, verbose=False)
    if to_csv:
        builder.check_output_file(opt.result_file)
    return after_training.predict(opt, paths, opt.result_file if to_csv else None)


def export(**kwargs):
    """Write <checkpoint_dir>/<model>.onnx from --load_model_path (or <model>_best.pth):
    batch size dynamic, input contract in the file's metadata."""
    return after_training.export(config.parse(kwargs, verbose=False))


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


def interpret(**kwargs):
    """The most confidently misclassified validation images (val's options) with Grad-CAM
    overlays: to Visdom when a server runs, always to <checkpoint_dir>/interpret/."""
    opt = config.parse(kwargs)
    return top_losses.interpret(builder.for_evaluation(opt, 'val'), live_visualizer(opt))


def doctor(**kwargs):
    """Why is a run stuck at 50%? Run the checklist on the objects train would build
    from the same options; exit status 1 when a check fails."""
    if run_doctor(config.parse(kwargs)):
        sys.exit(1)


def features(**kwargs):
    """Per-layer output shape and statistics of --img through the configured model
    (trained weights with --load_model_path)."""
    opt = config.parse(kwargs, verbose=False)
    if not opt.img:
        raise UserError('features needs an image: pass --img=PATH')
    where = builder.placement(opt)
    model = builder.network(opt, where, trained=bool(opt.load_model_path))
    print(describe_layers(model, opt.img, opt.layers, opt.image_size, where.device))


def replay(file, **kwargs):
    """Send plots recorded while no Visdom server ran to a running one."""
    from utils.visualize import replay as replay_log
    opt = config.parse(kwargs, verbose=False)
    count = replay_log(file, opt.vis_server, opt.vis_port)
    print(f'replayed {count} Visdom messages from {file} to {opt.vis_server}:{opt.vis_port}')


def visdom_setup(force=False):
    """Install the Visdom page's scripts and fonts from npm, so the server needs no CDN."""
    from utils.visdom_assets import install
    if not install(force=force):
        print('Visdom page assets already installed')


def help(markdown=False):
    """Print the commands and every option with its default (--markdown: the README table)."""
    if markdown:
        print('| option | default | meaning |\n|---|---|---|')
        for name, default, meaning in config.option_help():
            shown = 'GPU if present' if name == 'use_gpu' else f'`{default!r}`'
            print(f'| `--{name}` | {shown} | {meaning} |')
        return
    print(__doc__)
    print('options (--name=value; --max-epoch and --max_epoch are the same):')
    for name, default, meaning in config.option_help():
        print(f'    --{name:<18} {default!r:<22} {meaning}')


COMMANDS = {'train': train, 'val': val, 'test': test, 'demo': demo, 'doctor': doctor,
            'features': features, 'replay': replay, 'visdom_setup': visdom_setup,
            'predict': predict, 'export': export, 'interpret': interpret, 'help': help}


def check_no_stray_words(argv):
    """fire would run the whole command and only then fail on a stray word
    (`train --lr=0.1 foo`): refuse it before anything runs."""
    if not argv or argv[0] not in COMMANDS or argv[0] in ('replay', 'predict'):
        return  # unknown commands: fire's own message; these two take positional paths
    value_may_follow = False
    for arg in argv[1:]:
        if arg.startswith('-'):
            value_may_follow = '=' not in arg  # `--lr 0.1` is fire's other spelling
        elif value_may_follow:
            value_may_follow = False
        else:
            raise UserError(f'unexpected argument {arg!r} after `{argv[0]}`: options are written '
                            f'--name=value (`python main.py help` lists them)')


def run(argv=None):
    """Run a command; a UserError prints one clear line and exits with status 2."""
    warnings.formatwarning = lambda msg, category, *args, **kw: f'warning: {msg}\n'
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        check_no_stray_words(argv)
        fire.Fire(COMMANDS, command=argv, serialize=lambda result: None)
    except UserError as exc:
        print(f'error: {exc}', file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    run()
