"""The write-up's FeatureExtractor, on torchvision's FX feature extraction: the
output of named layers for one image, without a hand-written forward per model."""
import copy
import difflib
import os

import torch
from timm.layers import get_notrace_functions, get_notrace_modules
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from data.dataset import CLASSES, Skipped, default_transforms, load_or_skip
from utils.errors import UserError


def tracer_kwargs():
    # timm's TF "same" padding derives pad sizes from the input shape, which FX cannot
    # trace symbolically; timm registers those modules and functions as opaque leaves.
    return {'leaf_modules': list(get_notrace_modules()),
            'autowrap_functions': list(get_notrace_functions())}


def layer_root(model):
    """The wrapped network ('backbone.' for torchvision/timm models) and its prefix."""
    backbone = getattr(model, 'backbone', None)
    return (backbone, 'backbone.') if isinstance(backbone, nn.Module) else (model, '')


def default_layers(model):
    """The root's children, with each Sequential opened one level (ResNet's layer1.0,
    SqueezeNet's features.3, EfficientNet's blocks.2)."""
    root, _ = layer_root(model)
    names = []
    for name, child in root.named_children():
        if isinstance(child, nn.Sequential) and len(child) > 1:
            names += [f'{name}.{sub}' for sub, _ in child.named_children()]
        else:
            names.append(name)
    return names


def parse_layers(layers, model):
    """--layers as given by fire (a string, or a tuple when it held commas), checked."""
    if not layers:
        return default_layers(model)
    if isinstance(layers, str):
        layers = layers.split(',')
    names = [str(n).strip() for n in layers if str(n).strip()]
    root, _ = layer_root(model)
    valid = {name for name, _ in root.named_modules() if name}
    unknown = [n for n in names if n not in valid]
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(valid), n=3)
        hint = f' (did you mean {", ".join(close)}?)' if close else ''
        raise UserError(f'--layers: {model.model_name} has no layer {", ".join(unknown)}{hint}; '
                        f'valid names: {", ".join(default_layers(model))}, or any module path '
                        f'below them (e.g. {sorted(valid, key=len)[-1]})')
    return names


def load_image(path, model, image_size):
    if not os.path.isfile(path):
        raise UserError(f'--img={path!r}: no such file; pass the path of an image')
    img = load_or_skip(path)
    if isinstance(img, Skipped):
        raise UserError(f'--img={path!r} is not a readable image ({img.reason})')
    transform = default_transforms('val', image_size, model.input_mean, model.input_std)
    return transform(img).unsqueeze(0)


def stats_line(name, value):
    if not torch.is_tensor(value):
        return f'{name:<24} {type(value).__name__}'
    v = value.float()
    return (f'{name:<24} {str(tuple(v.shape)):<20} mean {v.mean():+.4f}  std {v.std():.4f}  '
            f'min {v.min():+.4f}  max {v.max():+.4f}')


@torch.inference_mode()
def describe_layers(model, img_path, layers, image_size, device):
    """Text report: per layer the output shape and mean/std/min/max, then the logits
    and class probabilities."""
    names = parse_layers(layers, model)
    model.eval()
    x = load_image(img_path, model, image_size).to(device)
    _, prefix = layer_root(model)
    # An in-place ReLU would overwrite the captured output of the layer before it.
    model = copy.deepcopy(model)
    for module in model.modules():
        if getattr(module, 'inplace', False):
            module.inplace = False
    extractor = create_feature_extractor(model, {prefix + n: n for n in names},
                                         tracer_kwargs=tracer_kwargs())
    outputs = extractor(x)
    logits = model(x)[0].float()
    probabilities = torch.softmax(logits, 0)
    lines = [f'{model.model_name} on {img_path} ({tuple(x.shape)}):']
    lines += [stats_line(name, outputs[name]) for name in names]
    lines.append(f'logits: {[round(v, 4) for v in logits.tolist()]}' if len(logits) <= 10 else
                 stats_line('logits', logits))
    if len(logits) == len(CLASSES):
        lines.append('probabilities: ' + ', '.join(f'{c} {p:.4f}' for c, p in zip(CLASSES, probabilities)))
    else:
        top = probabilities.topk(min(5, len(probabilities)))
        lines.append('top classes: ' + ', '.join(f'{i} ({p:.4f})' for p, i in zip(*top)))
    return '\n'.join(lines)
