"""All options of the project, in one place.

Every attribute of DefaultConfig is an option: `python main.py train --lr=1e-3`
overrides `lr`. The comment after each one is its help text (`python main.py help`).
A recipe (`--recipe=cpu`) is a named set of defaults; options given explicitly win.
Every command reads its options through parse().
"""
import difflib
import inspect
import os
import re
import warnings

import torch

from utils import distributed
from utils.device import check_compile, keep_freed_memory, resolve_bf16
from utils.errors import UserError
from utils.visdom_server import DEFAULT_ENV, DEFAULT_PORT, DEFAULT_SERVER, check_server_url


class ConfigError(UserError):
    """A bad command-line option."""


# Measured presets (bench/time_to_accuracy.py, bench/RESULTS.md).
RECIPES = {
    # the book's defaults: ResNet34 from scratch at 224 px, Adam 1e-3, loss-triggered decay
    'book': dict(),
    # small residual net, images decoded once to RAM, AdamW + warm-up/cosine, the first
    # three quarters of the schedule on smaller images (progressive resizing)
    'cpu': dict(model='SmallResNet', image_size=96, preload=True, num_workers=0,
                batch_size=64, optimizer='adamw', lr=2e-3, weight_decay=0.05,
                label_smoothing=0.1, lr_schedule='cosine', max_epoch=26, progressive=True),
    # ImageNet-pretrained EfficientNetLite1 and Lite2 side by side at 260 px, frozen: the
    # features of each photo and of its mirror image computed once, a linear head on a
    # fixed cosine schedule, the last epoch evaluated (with its temperature) and
    # mirror-image TTA (bench/finetune_table.py, rows E-K)
    'pretrained': dict(model='EfficientNetLite1And2', image_size=260, freeze=True, augment='flip',
                       batch_size=64, lr=1e-3, lr_schedule='cosine', max_epoch=10,
                       select='last', tta='flip'),
}


class DefaultConfig:
    recipe = 'book'  # preset of the options below: book, cpu or pretrained (options given explicitly win)
    env = DEFAULT_ENV  # Visdom environment (one tab per experiment)
    vis = True  # plot to Visdom; False turns it off
    vis_server = DEFAULT_SERVER  # Visdom server address
    vis_port = DEFAULT_PORT  # Visdom server port
    model = 'ResNet34'  # model class in models/ (from scratch: ResNet34, SmallResNet, AlexNet; pretrained: SqueezeNet, ResNet18, ResNet34Pretrained, MobileNetV2, EfficientNetLite0/1/2, EfficientNetLite1And2: Lite1 and Lite2 side by side)
    pretrained = True  # ImageNet weights for the pretrained models; False trains them from scratch (Kaiming init)
    weights = None  # local ImageNet state dict (.pth) for a pretrained model, instead of the download (offline machines, mirrors)
    freeze = False  # train only the classifier of a pretrained model; its backbone stays fixed
    unfreeze = 0  # with a pretrained model: also train its last N blocks (the rest stays fixed; their input is cached when the images are not randomly transformed), or all layers; implies --freeze for the rest
    head_epochs = 1  # with --unfreeze: the first N epochs train the classifier alone, then the unfrozen blocks join (fastai's fine_tune)
    init = 'kaiming'  # initialisation of the layers trained from scratch: kaiming (He et al.), or pytorch (each layer's default, the write-up's stuck-at-50% baseline)

    train_data_root = './data/train'  # Kaggle train/ folder (cat.N.jpg, dog.N.jpg) or cat/ and dog/ subfolders
    test_data_root = './data/test1'  # Kaggle test1/ folder (N.jpg)
    load_model_path = None  # checkpoint to start from (train), or to evaluate (val, test)
    resume = None  # continue a run exactly: a checkpoint path, or last (<checkpoint_dir>/<model>_last.pth)
    checkpoint_dir = 'checkpoints'  # where train writes <model>_last.pth and <model>_best.pth
    select = 'best'  # the checkpoint val, test, predict, export and interpret use without --load_model_path, and train calibrates: best (highest validation accuracy, the book's rule; optimistic) or last (the end of the schedule; its validation figure is unbiased)

    image_size = 224  # side of the square image the model sees, in pixels
    augment = True  # random crops and flips on training images (True), flips only (flip), or none (False); with flip or False, --freeze and --unfreeze cache the frozen part's output (both mirror images with flip)
    val_ratio = 0.3  # share of each class held out for validation
    seed = 100  # seeds the train/val split and the weight initialisation
    preload = False  # decode every image once into RAM (uint8: 9/8 of image_size for random crops, else the centre crop); epochs then skip JPEG decoding

    batch_size = 32  # images per batch
    use_gpu = torch.cuda.is_available()  # train on the GPU (default: when one is present)
    num_workers = 2  # data-loading processes (with --preload on a 2-4 core CPU, 0 is fastest)
    channels_last = True  # channels-last memory format: faster convolutions, same results
    compile = False  # torch.compile the model for training: fused kernels after a one-off compilation (on a CPU it needs a C++ compiler)
    bf16 = 'auto'  # bfloat16 autocast: auto (on where the hardware has it: CPUs with AMX/AVX512-BF16, Ampere+ GPUs; 2-4x faster there), True or False; numbers differ slightly from fp32
    tta = 'none'  # test-time augmentation in val, test and predict: none, or flip (the mean of each image's and its mirror image's probabilities)
    engine = 'auto'  # network runner for val, test, predict and the feature cache: torch, onnx (ONNX Runtime on the CPU) or auto (ONNX Runtime when installed and >= 1.3x faster than torch for this model and size on 1,000+ images, measured once into <checkpoint_dir>/engine_choice.json); training is always torch
    print_freq = 20  # log the running loss every N batches

    debug_file = None  # while this file exists, drop into the debugger (with a terminal only); default <checkpoint_dir>/debug
    result_file = 'result.csv'  # where test writes id,label (label = probability of dog)
    clip = 0.0  # test's CSV: probabilities clipped to [clip, 1 - clip]; Kaggle's log loss punishes a confident mistake without bound (0.005 is a usual value)
    img = None  # image for the features command
    layers = None  # features: comma-separated layer names to show (default: the top-level ones)

    max_epoch = 10  # number of training epochs
    time_budget = None  # minutes for the whole train command (set-up, decoding, validation, checkpoints included): the LR follows warm-up + cosine over the wall clock, and as many epochs run as fit; replaces --max_epoch and --lr_schedule
    optimizer = 'adam'  # adam, sgd, or adamw (AdamW without weight decay on biases and norms)
    lr = 0.001  # initial learning rate
    backbone_lr = None  # learning rate of a pretrained model's backbone (default: --lr)
    classifier_lr = None  # learning rate of a pretrained model's classifier (default: --lr)
    momentum = 0.9  # SGD momentum (sgd only)
    lr_decay = 0.95  # when an epoch's loss rises, lr = lr * lr_decay
    lr_schedule = 'loss'  # loss: the book's rule above; cosine: warm-up over 10% of the steps, then cosine to 0
    progressive = False  # progressive resizing: train on images shrunk to 2/3 of image_size for the first half of the schedule, 5/6 until three quarters, then full size (those epochs run 1.4-1.6x faster; validation is always at image_size); needs --lr_schedule=cosine or --time_budget, and a network trained on images (not --freeze/--unfreeze)
    label_smoothing = 0.0  # CrossEntropyLoss label smoothing (0.1 in the CPU recipe)
    weight_decay = 0e-5  # L2 penalty

    def _parse(self, kwargs, verbose=True):
        """Apply the recipe, then the command-line overrides, checking names, types and
        values; print the result."""
        kwargs = {raw_key.replace('-', '_'): value for raw_key, value in kwargs.items()}
        for key in kwargs:
            if key.startswith('_') or not hasattr(DefaultConfig, key):
                raise ConfigError(unknown_option_message(key))
        recipe = coerce('recipe', kwargs.get('recipe', self.recipe), 'book')
        if recipe not in RECIPES:
            raise ConfigError(f"--recipe must be one of {', '.join(RECIPES)}, not {recipe!r}")
        for key, value in {**RECIPES[recipe], **kwargs}.items():
            setattr(self, key, coerce(key, value, getattr(DefaultConfig, key)))
        check_values(self)
        self.vis_server = check_server_url(self.vis_server)
        if self.debug_file is None:
            self.debug_file = os.path.join(self.checkpoint_dir, 'debug')
        if self.use_gpu and not torch.cuda.is_available():
            warnings.warn('--use_gpu=True but no GPU is available: running on the CPU')
            self.use_gpu = False
        if verbose:
            print('user config:')
            for key, value in self.to_dict().items():
                print(f'    {key} = {value!r}')
        return self

    def to_dict(self):
        return {key: getattr(self, key) for key in option_names()}

    def overrides_line(self):
        """The options that differ from the recipe's defaults, as a command line (for
        the printed resume command)."""
        defaults = DefaultConfig()._parse({'recipe': self.recipe}, verbose=False).to_dict()
        return ' '.join(f'--{key}={value}' for key, value in self.to_dict().items()
                        if value != defaults[key] and key not in ('resume', 'load_model_path'))

    @property
    def device(self):
        """The GPU when use_gpu, else the CPU; torchrun ranks set their own."""
        return getattr(self, '_device', None) or torch.device('cuda' if self.use_gpu else 'cpu')

    @device.setter
    def device(self, device):
        self._device = device


# Allowed values, checked after every parse: (option, test, what the value must be).
CHOICES = {'recipe': tuple(RECIPES), 'optimizer': ('adam', 'sgd', 'adamw'),
           'lr_schedule': ('loss', 'cosine'), 'init': ('kaiming', 'pytorch'),
           'engine': ('torch', 'onnx', 'auto'), 'tta': ('none', 'flip'),
           'augment': (True, False, 'flip'), 'select': ('best', 'last')}
RANGES = [
    ('lr', lambda v: v > 0, 'a learning rate > 0 (e.g. 1e-3)'),
    ('backbone_lr', lambda v: v is None or v >= 0, 'a learning rate >= 0 (e.g. 1e-4)'),
    ('classifier_lr', lambda v: v is None or v >= 0, 'a learning rate >= 0 (e.g. 1e-4)'),
    ('weight_decay', lambda v: v >= 0, '>= 0 (e.g. 5e-4; 0 turns it off)'),
    ('momentum', lambda v: 0 <= v < 1, 'at least 0 and below 1 (e.g. 0.9)'),
    ('lr_decay', lambda v: 0 < v <= 1, 'above 0 and at most 1 (the book uses 0.95; 1 never decays)'),
    ('label_smoothing', lambda v: 0 <= v < 1, 'at least 0 and below 1 (0.1 is usual)'),
    ('val_ratio', lambda v: 0 < v < 1, 'between 0 and 1 (e.g. 0.3)'),
    ('clip', lambda v: 0 <= v < 0.5, 'at least 0 and below 0.5 (e.g. 0.005)'),
    ('seed', lambda v: 0 <= v < 2 ** 32, 'between 0 and 2**32 - 1'),
    ('num_workers', lambda v: v >= 0, 'at least 0 (0 loads images in the main process)'),
    ('image_size', lambda v: v >= 16, 'at least 16 pixels (224 for the ImageNet models)'),
    ('batch_size', lambda v: v >= 2, 'at least 2 (BatchNorm cannot train on one image)'),
    ('max_epoch', lambda v: v >= 1, 'at least 1'),
    ('unfreeze', lambda v: v == 'all' or v >= 0, 'a number of blocks >= 0, or all'),
    ('head_epochs', lambda v: v >= 0, 'at least 0'),
    ('time_budget', lambda v: v is None or v > 0, 'minutes > 0 (e.g. 20)'),
    ('print_freq', lambda v: v >= 1, 'at least 1'),
]
# Options whose default is None, and the type a given value must have.
NONE_DEFAULT_TYPES = {'weights': str, 'load_model_path': str, 'resume': str, 'img': str,
                      'layers': str, 'debug_file': str, 'backbone_lr': float,
                      'classifier_lr': float, 'time_budget': float}


# Options that take one word besides values of their default's type.
WORD_OR_VALUE = {'bf16': 'auto', 'augment': 'flip', 'unfreeze': 'all'}


def check_values(opt):
    for key, choices in CHOICES.items():
        if getattr(opt, key) not in choices:
            raise ConfigError(f'--{key} must be one of {", ".join(choices)}, '
                              f'not {getattr(opt, key)!r}')
    for key, valid, what in RANGES:
        if not valid(getattr(opt, key)):
            raise ConfigError(f'--{key} must be {what}, not {getattr(opt, key)!r}')
    if opt.progressive and opt.lr_schedule != 'cosine' and not opt.time_budget:
        raise ConfigError('--progressive grows the image size along the schedule: it needs '
                          '--lr_schedule=cosine or --time_budget=MINUTES (the book\'s '
                          'loss-triggered schedule has no end to grow towards); or turn it '
                          'off with --progressive=False')
    if opt.progressive and (opt.freeze or opt.unfreeze):
        raise ConfigError('--progressive resizes the images a network trains on: with '
                          '--freeze or --unfreeze the head trains on cached features. '
                          'Add --progressive=False')


def parse(kwargs, verbose=True):
    """The options of every command: recipe, overrides, checks. It also sets up the
    process: malloc keeps freed memory (utils/device.py), and under torchrun the process
    joins its group and gets its device."""
    opt = DefaultConfig()._parse(kwargs, verbose=verbose and distributed.rank_from_env() == 0)
    keep_freed_memory()
    opt.device = distributed.setup(opt.use_gpu)
    opt.bf16 = resolve_bf16(opt.bf16, opt.device)
    if opt.compile:
        check_compile(opt.device)
    return opt


def option_names():
    return [k for k, v in vars(DefaultConfig).items()
            if not k.startswith('_') and not callable(v) and not isinstance(v, property)]


def unknown_option_message(key):
    close = difflib.get_close_matches(key, option_names(), n=1, cutoff=0.5)
    hint = f'; did you mean {close[0]}?' if close else '; `python main.py help` lists the options'
    return f'unknown option {key}{hint}'


def coerce(key, value, default):
    """Convert a value given on the command line to the type of the option's default."""
    if value is None:
        return value
    if key in WORD_OR_VALUE and str(value).lower() == WORD_OR_VALUE[key]:
        return WORD_OR_VALUE[key]
    if default is None:
        return coerce_optional(key, value)
    kind = bool if key == 'bf16' else type(default)  # bf16: auto, or a bool
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ('true', '1', 'yes'):
            return True
        if str(value).lower() in ('false', '0', 'no'):
            return False
    elif kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    if key in WORD_OR_VALUE:
        raise ConfigError(f'--{key} must be {WORD_OR_VALUE[key]} or a {kind.__name__} '
                          f'(default {default!r}), not {value!r}')
    raise ConfigError(f'option {key} expects {kind.__name__} (default {default!r}), got {value!r}')


def coerce_optional(key, value):
    """An option off by default (None): a path, a name or a number, never a bare flag."""
    kind = NONE_DEFAULT_TYPES[key]
    if value is True or value is False:  # `--resume` alone: fire passes True
        raise ConfigError(f'--{key} needs a value: --{key}=' + ('PATH' if kind is str else '1e-4'))
    if kind is str and key == 'layers' and isinstance(value, (tuple, list)):
        return ','.join(str(v) for v in value)  # fire splits a,b into a tuple
    if kind is float and isinstance(value, (int, float)):
        return float(value)
    if kind is str and isinstance(value, str):
        return value
    if kind is str and key == 'layers':  # --layers=5: fire passes an int
        return str(value)
    if kind is float and key == 'time_budget':
        raise ConfigError(f'--time_budget must be minutes > 0 (e.g. 20), not {value!r}')
    if kind is float:  # the per-group learning rates
        raise ConfigError(f'--{key} must be a learning rate >= 0 (e.g. 1e-4), not {value!r}')
    raise ConfigError(f'option {key} expects {kind.__name__}, got {value!r}')


def option_help():
    """(name, default, meaning) for every option, read from the comments above."""
    rows = []
    for line in inspect.getsource(DefaultConfig).splitlines():
        match = re.match(r'\s{4}(\w+) = (.+?)\s+# (.+)$', line)
        if match and match.group(1) in option_names():
            name = match.group(1)
            rows.append((name, getattr(DefaultConfig, name), match.group(3)))
    return rows

