import urllib.error

import pytest
import torch

from models import FROM_SCRATCH, PRETRAINED, ResNet34, SmallResNet, build_model
from utils.checkpoint import CheckpointError
from utils.errors import UserError

ALL_MODELS = sorted({**FROM_SCRATCH, **PRETRAINED})


@pytest.mark.parametrize('name', ALL_MODELS)
@pytest.mark.parametrize('size', [64, 100, 112])  # 100: odd sides inside the network
def test_every_model_gives_raw_logits_at_any_size(name, size):
    torch.manual_seed(0)
    model = build_model(name, pretrained=False).eval()
    called = []
    for module in model.modules():
        if not list(module.children()):
            module.register_forward_hook(lambda m, i, o: called.append(type(m).__name__))
    with torch.no_grad():
        out = model(torch.randn(3, 3, size, size))
    assert out.shape == (3, 2)
    # no activation after the last layer: CrossEntropyLoss wants raw logits
    while called[-1] in ('AdaptiveAvgPool2d', 'Flatten', 'Dropout', 'Identity'):
        called.pop()
    assert called[-1] in ('Linear', 'Conv2d'), called[-3:]


def test_kaiming_initialisation_of_from_scratch_models():
    model = ResNet34()
    conv = model.pre[0]
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    assert conv.weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.1)
    bn = model.pre[1]
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    assert model.fc.weight.std().item() == pytest.approx(0.01, rel=0.2)


def test_save_load_round_trip(tmp_path):
    model = SmallResNet()
    path = model.save(checkpoint_dir=str(tmp_path), extra={'epoch': 3}, config={'lr': 0.1})
    assert path.startswith(str(tmp_path / 'SmallResNet_')) and path.endswith('.pth')
    other = SmallResNet()
    checkpoint = other.load(path)
    assert checkpoint['epoch'] == 3 and checkpoint['config'] == {'lr': 0.1}
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    # a bare state dict works too
    torch.save(model.state_dict(), tmp_path / 'bare.pth')
    assert SmallResNet().load(str(tmp_path / 'bare.pth')) == {}
    assert not list(tmp_path.glob('.*tmp'))  # atomic write left no temporary file


def test_load_errors_name_the_problem(tmp_path):
    path = SmallResNet().save(str(tmp_path / 'small.pth'))
    with pytest.raises(CheckpointError, match='holds a SmallResNet.*--model=SmallResNet'):
        ResNet34().load(path)
    state = SmallResNet().state_dict()
    state['extra.weight'] = torch.zeros(1)
    del state['fc.bias']
    state['fc.weight'] = torch.zeros(5, 256)
    torch.save(state, tmp_path / 'odd.pth')
    with pytest.raises(CheckpointError, match=r'missing keys: fc.bias.*unexpected keys: extra.weight'
                                              r'.*fc.weight \(5, 256\) vs \(2, 256\)'):
        SmallResNet().load(str(tmp_path / 'odd.pth'))
    (tmp_path / 'garbage.pth').write_bytes(b'\x00not a checkpoint')
    with pytest.raises(CheckpointError, match='garbage.pth.*not a readable checkpoint'):
        SmallResNet().load(str(tmp_path / 'garbage.pth'))
    with pytest.raises(CheckpointError, match='missing.pth.*does not exist'):
        SmallResNet().load(str(tmp_path / 'missing.pth'))


def test_optimizer_factory_and_groups():
    model = build_model('ResNet18', pretrained=False)
    groups = model.parameter_groups()
    assert [g['name'] for g in groups] == ['backbone', 'classifier']
    assert groups[1]['params'] == list(model.backbone.fc.parameters())
    sgd = model.get_optimizer(0.01, 1e-4, 'sgd', momentum=0.8)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults['momentum'] == 0.8
    assert sum(len(g['params']) for g in sgd.param_groups) == len(list(model.parameters()))
    adam = SmallResNet().get_optimizer(0.001, 0, 'adam')
    assert isinstance(adam, torch.optim.Adam) and adam.param_groups[0]['lr'] == 0.001


def test_offline_pretrained_download_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError('no network')
    monkeypatch.setattr(torch.hub, 'download_url_to_file', offline)
    with pytest.raises(UserError, match=rf'resnet18-f37072fd.pth.*{tmp_path}/hub/checkpoints'
                                        rf'/resnet18-f37072fd.pth.*--pretrained=False'):
        build_model('ResNet18', pretrained=True)


def test_unknown_model_lists_choices():
    with pytest.raises(UserError, match='unknown model .ResNet50.*SmallResNet'):
        build_model('ResNet50')
