from .alexnet import AlexNet
from .basic_module import BasicModule
from .resnet18 import ResNet18
from .resnet34 import ResNet34
from .small_resnet import SmallResNet
from .squeezenet import SqueezeNet

from utils.errors import UserError

FROM_SCRATCH = {'ResNet34': ResNet34, 'AlexNet': AlexNet, 'SmallResNet': SmallResNet}
PRETRAINED = {'SqueezeNet': SqueezeNet, 'ResNet18': ResNet18}


def build_model(name, pretrained=True, num_classes=2):
    """The model class called `name`; `pretrained` applies to the ImageNet models."""
    if name in FROM_SCRATCH:
        return FROM_SCRATCH[name](num_classes=num_classes)
    if name in PRETRAINED:
        return PRETRAINED[name](num_classes=num_classes, pretrained=pretrained)
    raise UserError(f'unknown model {name!r}; choose one of {", ".join({**FROM_SCRATCH, **PRETRAINED})}')
