"""--unfreeze=N|all with --head_epochs: partial fine-tuning, with the frozen part's output
cached at the first unfrozen block (and for mirror images with --augment=flip)."""
import os

import pytest
import torch

import config
import engine.loop
import main
from data.dataset import SkippedFiles, build_loader
from engine import builder
from engine.feature_cache import compute_features
from models import build_model
from utils.errors import UserError


@pytest.mark.parametrize('name', ['MobileNetV2', 'ResNet18', 'EfficientNetLite0'])
def test_stages_compose_to_the_forward_pass(name):
    torch.manual_seed(0)
    model = build_model(name, pretrained=False).eval()
    x = torch.randn(2, 3, 64, 64)
    _, blocks, _ = model.stages()
    with torch.no_grad():
        expected = model(x)
        for index in (0, len(blocks) // 2, len(blocks) - 1, len(blocks)):
            got = model.forward_from(index, model.forward_to(index, x))
            assert torch.allclose(got, expected, atol=1e-5), index


def test_unfreeze_trains_the_last_blocks_and_the_head_and_nothing_else():
    model = build_model('MobileNetV2', pretrained=False, unfreeze=2)
    blocks = model.stages()[1]
    unfrozen = {id(p) for m in (*blocks[-2:], model.head()) for p in m.parameters()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == unfrozen
    groups = model.parameter_groups(backbone_lr=1e-4, classifier_lr=1e-2)
    assert [(g['name'], g['lr']) for g in groups] == [('backbone', 1e-4), ('classifier', 1e-2)]
    model.train()
    assert blocks[-1].training and model.head().training and not blocks[-3].training
    model.train_unfrozen(False)  # the head's epochs: the blocks wait, still in the optimizer
    assert {id(p) for p in model.parameters() if p.requires_grad} == \
           {id(p) for p in model.head().parameters()}
    assert not blocks[-1].training
    assert sum(len(g['params']) for g in model.parameter_groups()) == len(unfrozen)
    everything = build_model('MobileNetV2', pretrained=False, unfreeze='all')
    assert all(p.requires_grad for p in everything.parameters())


@pytest.mark.parametrize('options, message', [
    (dict(unfreeze='some'), "--unfreeze must be all or a int (default 0), not 'some'"),
    (dict(unfreeze=-1), '--unfreeze must be a number of blocks >= 0, or all, not -1'),
    (dict(augment='mirror'), "--augment must be flip or a bool (default True), not 'mirror'"),
    (dict(select='worst'), "--select must be one of best, last, not 'worst'"),
    (dict(head_epochs=-2), '--head_epochs must be at least 0'),
])
def test_bad_values_name_the_valid_ones(options, message):
    with pytest.raises(config.ConfigError, match=message.replace('(', r'\(').replace(')', r'\)')):
        config.parse(options, verbose=False)


def test_unfreeze_beyond_the_model_or_without_blocks_is_one_line():
    with pytest.raises(UserError, match='--unfreeze=99: MobileNetV2 has 18 blocks; pass 1 to 18, or all'):
        build_model('MobileNetV2', pretrained=False, unfreeze=99)
    with pytest.raises(UserError, match='--unfreeze=N is not available for SqueezeNet: use --unfreeze=all'):
        build_model('SqueezeNet', pretrained=False, unfreeze=1)
    with pytest.raises(UserError, match='SmallResNet trains from scratch'):
        build_model('SmallResNet', unfreeze=1)


def test_partial_fine_tune_on_cached_activations_equals_the_plain_run(fast_options, capsys,
                                                                      monkeypatch):
    """The cache changes the cost, not the result: the same blocks and head, the same
    weights after two epochs (one of the head alone), as training on the images."""
    options = dict(fast_options, model='MobileNetV2', pretrained=False, unfreeze=2,
                   augment=False, max_epoch=2, batch_size=8, bf16=False, head_epochs=1)
    cached_dir = os.path.join(fast_options['checkpoint_dir'], 'cached')
    main.train(**dict(options, checkpoint_dir=cached_dir))
    out = capsys.readouterr().out
    assert 'feature cache: the input of block 16 for 56 training and 24 validation' in out
    assert 'epoch 1: the unfrozen blocks join the head in training' in out
    monkeypatch.setattr(engine.loop, 'use_cached_features', lambda run: run.model)
    plain_dir = os.path.join(fast_options['checkpoint_dir'], 'plain')
    main.train(**dict(options, checkpoint_dir=plain_dir))
    cached = torch.load(os.path.join(cached_dir, 'MobileNetV2_last.pth'), weights_only=True)
    plain = torch.load(os.path.join(plain_dir, 'MobileNetV2_last.pth'), weights_only=True)
    torch.manual_seed(100)  # the run's seed: its initial weights
    initial = build_model('MobileNetV2', pretrained=False).state_dict()
    moved = set()
    for key, value in plain['state_dict'].items():
        assert torch.allclose(cached['state_dict'][key].float(), value.float(), atol=1e-5), key
        if not torch.equal(initial[key], value) and 'num_batches' not in key:
            moved.add(key.split('.')[2])
    assert moved == {'17', '18', '1'}  # features.17, features.18, classifier.1


def test_head_epochs_keep_the_blocks_fixed(fast_options):
    options = dict(fast_options, model='MobileNetV2', pretrained=False, unfreeze=1,
                   augment=False, max_epoch=1, batch_size=8, head_epochs=1)
    main.train(**options)
    saved = torch.load(os.path.join(options['checkpoint_dir'], 'MobileNetV2_last.pth'),
                       weights_only=True)['state_dict']
    torch.manual_seed(100)  # the run's seed: its initial weights
    initial = build_model('MobileNetV2', pretrained=False).state_dict()
    assert torch.equal(saved['backbone.features.18.0.weight'],
                       initial['backbone.features.18.0.weight'])
    assert not torch.equal(saved['backbone.classifier.1.weight'],
                           initial['backbone.classifier.1.weight'])


def test_mirrored_cache_holds_each_image_and_its_mirror_image(fast_options, capsys):
    opt = config.parse(dict(fast_options, model='MobileNetV2', pretrained=False, unfreeze=3,
                            augment='flip', bf16=False), verbose=False)
    run = builder.for_training(opt, vis=False)
    loader = build_loader(run.val_data, 8, False, 0, False)
    cache = compute_features(run.model, loader, run.placement, SkippedFiles(), index=15,
                             mirrored=True)
    image = run.val_data[3][0][None]
    with torch.no_grad():
        plain = run.model.eval().forward_to(15, image)
        mirror = run.model.forward_to(15, image.flip(-1))
    assert cache.features.shape[:2] == (24, 2)
    assert torch.allclose(cache.features[3, 0], plain[0], atol=1e-5)
    assert torch.allclose(cache.features[3, 1], mirror[0], atol=1e-5)
    draws = {cache[3][0].sum().item() for _ in range(20)}
    assert len(draws) == 2  # a random one of the two on each visit
    result = main.train(**dict(fast_options, model='MobileNetV2', pretrained=False, unfreeze=3,
                               augment='flip', max_epoch=1, batch_size=8))
    assert 'for 56 training (and their mirror images) and 24 validation' in capsys.readouterr().out
    assert result.epoch == 1


def test_unfreeze_all_trains_on_the_images(fast_options, capsys):
    main.train(**dict(fast_options, model='MobileNetV2', pretrained=False, unfreeze='all',
                      augment=False, max_epoch=1, batch_size=8))
    assert 'feature cache off: --unfreeze=all trains every layer' in capsys.readouterr().out
