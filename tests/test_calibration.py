"""Temperature scaling after training, stored with the weights and applied by every
later forward pass; --select=best|last."""
import os
import re

import pytest
import torch

import main
from engine import builder, calibration, onnx_engine
from models import build_model
from utils.checkpoint import CheckpointError, atomic_save, read_checkpoint


def test_fit_temperature_recovers_an_over_confident_scale():
    generator = torch.Generator().manual_seed(0)
    honest = torch.randn(4000, 2, generator=generator) * 2
    targets = torch.multinomial(honest.softmax(1), 1, generator=generator)[:, 0]
    over_confident = honest * 3
    t = calibration.fit_temperature(over_confident, targets)
    assert t == pytest.approx(3, rel=0.1)
    assert calibration.log_loss(over_confident, targets, t) < \
        calibration.log_loss(over_confident, targets) - 0.1
    assert calibration.cross_fitted_log_loss(over_confident, targets) == pytest.approx(
        calibration.log_loss(over_confident, targets, t), abs=0.01)


def printed_figures(out):
    match = re.search(r'T = ([\d.]+) fitted on the (\d+) validation images for (\S+): log loss '
                      r'([\d.]+) -> ([\d.]+)', out)
    assert match, out
    return float(match[1]), int(match[2]), match[3], float(match[4]), float(match[5])


@pytest.mark.parametrize('select', ['last', 'best'])
def test_train_calibrates_the_selected_checkpoint_and_val_applies_it(fast_options, capsys,
                                                                      select):
    options = dict(fast_options, max_epoch=3, select=select, bf16=False)
    state = main.train(**options)
    out = capsys.readouterr().out
    t, count, path, before, after = printed_figures(out)
    assert count == 24 and after <= before and t != 1.0
    assert os.path.basename(path) == f'SmallResNet_{select}.pth'
    assert read_checkpoint(path)['temperature'] == pytest.approx(t, abs=1e-3)
    assert re.search(r'validation accuracy: last epoch [\d.]+%, best [\d.]+% \(epoch \d', out)
    chosen = state.history[-1] if select == 'last' else max(state.history,
                                                             key=lambda r: r['val_acc_cm'])
    assert before == pytest.approx(chosen['val_log_loss'], abs=1e-4)
    meter = main.val(**options)  # the checkpoint --select names, with its temperature
    assert f'using {path} (--select={select})' in capsys.readouterr().out
    assert meter.log_loss == pytest.approx(after, abs=1e-4)
    # a new run from these weights trains on raw logits again
    run = builder.for_training(main.config.parse(dict(options, load_model_path=path),
                                                 verbose=False), vis=False)
    assert run.model.temperature == 1.0


def test_the_exported_network_carries_the_temperature(tmp_path):
    torch.manual_seed(0)
    model = build_model('MobileNetV2', pretrained=False).eval()
    model.temperature = 2.5
    images = torch.randn(3, 3, 32, 32)
    network = onnx_engine.OnnxNetwork.of(model, 32)
    with torch.no_grad():
        expected = model(images)
        model.temperature = 1.0
        raw = model(images)
    assert torch.allclose(expected, raw / 2.5)
    assert torch.allclose(network(images), expected, atol=1e-4)


def test_a_damaged_temperature_is_refused_in_one_line(tmp_path):
    model = build_model('SmallResNet')
    path = model.save(str(tmp_path / 'x.pth'))
    saved = read_checkpoint(path)
    saved['temperature'] = -1.0
    atomic_save(saved, path)
    with pytest.raises(CheckpointError, match="its temperature is -1.0, not a number > 0"):
        build_model('SmallResNet').load(path)
