from .alexnet import AlexNet
from .basic_module import BasicModule, pytorch_default_init
from .efficientnet_lite import (EfficientNetLite0, EfficientNetLite1, EfficientNetLite1And2,
                               EfficientNetLite2)
from .mobilenet_v2 import MobileNetV2
from .resnet18 import ResNet18
from .resnet34 import ResNet34
from .resnet34_pretrained import ResNet34Pretrained
from .small_resnet import SmallResNet
from .squeezenet import SqueezeNet

from utils.errors import UserError

FROM_SCRATCH = {'ResNet34': ResNet34, 'AlexNet': AlexNet, 'SmallResNet': SmallResNet}
PRETRAINED = {'SqueezeNet': SqueezeNet, 'ResNet18': ResNet18,
              'ResNet34Pretrained': ResNet34Pretrained, 'MobileNetV2': MobileNetV2,
              'EfficientNetLite0': EfficientNetLite0, 'EfficientNetLite1': EfficientNetLite1,
              'EfficientNetLite2': EfficientNetLite2, 'EfficientNetLite1And2': EfficientNetLite1And2}


def build_model(name, pretrained=True, num_classes=2, weights=None, freeze=False, init='kaiming',
                unfreeze=0):
    """The model class called `name`. `pretrained` and `weights` (a local ImageNet state
    dict) apply to the ImageNet models; `freeze` trains only their classifier, and with
    `unfreeze` (N or 'all') the last N blocks or every layer too; `init`
    ('kaiming' or 'pytorch') initialises a model trained from scratch."""
    if name in FROM_SCRATCH:
        if weights:
            raise UserError(f'--weights is for the pretrained models ({", ".join(PRETRAINED)}); '
                            f'{name} trains from scratch: drop --weights')
        model = FROM_SCRATCH[name](num_classes=num_classes)
    elif name in PRETRAINED:
        model = PRETRAINED[name](num_classes=num_classes, pretrained=pretrained, weights=weights)
    else:
        raise UserError(f'unknown model {name!r}; choose one of {", ".join({**FROM_SCRATCH, **PRETRAINED})}')
    if init == 'pytorch':
        if name in PRETRAINED and pretrained:
            raise UserError('--init=pytorch is for models trained from scratch: add '
                            '--pretrained=False, or drop --init')
        pytorch_default_init(model)
    return model.freeze_backbone(unfreeze) if freeze or unfreeze != 0 else model
