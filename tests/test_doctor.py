"""The 50% doctor: each cause of the write-up, injected through the code train runs, is
caught by its check and by no unrelated one; healthy setups pass everything."""
import os
import random

import pytest
import torch
from torch import nn
from torchvision import transforms as T
from torchvision.models import resnet18

import main
from engine import builder
from engine.report import collapse_warning
from doctor.training_checks import analyse_range
import models.small_resnet
import config
from data.dataset import build_loader
from models import SmallResNet
import doctor
from utils.meters import ClassificationMeter

CHEAP = ('shuffling', 'gradient flow', 'normalisation', 'labels', 'logits', 'initialisation')


def make_setup(options, **overrides):
    """The run train would build from these options, as the doctor examines it."""
    return doctor.examine(config.parse(dict(options, **overrides), verbose=False))


def with_model(setup, model):
    """The run with another model and, as train would build it, its optimizer."""
    setup.model = model
    setup.optimizer = builder.optimizer(setup.opt, model)
    return setup


def statuses(results):
    return {r.name: r.status for r in results}


def assert_caught(results, check, status=doctor.FAIL):
    """`check` has `status`; every other check ran without FAILing."""
    found = statuses(results)
    assert found[check] == status, [r.line() for r in results]
    others = {name: s for name, s in found.items() if name != check and s == doctor.FAIL}
    assert not others, [r.line() for r in results if r.name in others]


# Healthy setups ---------------------------------------------------------------------

def test_healthy_from_scratch_passes_every_check_from_the_command_line(fast_options, capsys):
    options = dict(fast_options, checkpoint_dir=fast_options['checkpoint_dir'])
    main.run(['doctor'] + [f'--{k}={v}' for k, v in options.items()])  # no SystemExit: no FAIL
    out = capsys.readouterr().out
    lines = [l for l in out.splitlines() if l[:4] in ('PASS', 'WARN', 'FAIL')]
    assert [l[:4] for l in lines] == ['PASS'] * 8, out
    assert '8 passed, 0 warnings, 0 failed' in out
    folder = os.path.join(fast_options['checkpoint_dir'], 'doctor')
    for png in ('labelled_samples.png', 'lr_range_test.png'):  # named in the report, and there
        assert os.path.join(folder, png) in out
        assert os.path.getsize(os.path.join(folder, png)) > 1000


def test_healthy_pretrained_model_passes_every_check(fast_options, tmp_path, monkeypatch):
    # "ImageNet weights" saved locally under torchvision's file name: the weights API
    # finds them in the hub cache and never goes online
    checkpoints = tmp_path / 'torch_home' / 'hub' / 'checkpoints'
    checkpoints.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(resnet18(weights=None).state_dict(), checkpoints / 'resnet18-f37072fd.pth')
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    setup = make_setup(fast_options, model='ResNet18', pretrained=True, batch_size=8)
    results = doctor.run_checks(setup)
    assert statuses(results) == {name: doctor.PASS for name in doctor.CHECKS}, \
        [r.line() for r in results]


# One fault at a time ----------------------------------------------------------------

def test_unshuffled_sorted_loader_fails_shuffling(fast_options):
    setup = make_setup(fast_options)
    setup.train_loader = build_loader(setup.train_data, 16, False, 0)  # files in name order
    results = doctor.run_checks(setup, only=CHEAP)
    assert_caught(results, 'shuffling')
    assert results[0].data['single'] >= 2


def test_frozen_parameter_fails_gradient_flow(fast_options):
    setup = make_setup(fast_options)
    model = setup.model
    model.fc.weight.requires_grad_(False)
    results = doctor.run_checks(with_model(setup, model), only=CHEAP)
    assert_caught(results, 'gradient flow')
    assert results[1].data['frozen'] == ['fc.weight']


def test_parameter_missing_from_the_optimizer_fails_gradient_flow(fast_options):
    setup = make_setup(fast_options)
    setup.optimizer = torch.optim.Adam(
        [p for n, p in setup.model.named_parameters() if not n.startswith('fc.')], lr=1e-3)
    results = doctor.run_checks(setup, only=CHEAP)
    assert_caught(results, 'gradient flow')
    assert results[1].data['missing'] == ['fc.weight', 'fc.bias']


def test_step_without_backward_fails_gradient_flow(fast_options):
    setup = make_setup(fast_options)

    def step_forgetting_backward(model, optimizer, criterion, images, targets, placement):
        scores = placement.forward(model, images)
        loss = criterion(scores, targets)
        optimizer.zero_grad()
        optimizer.step()
        return scores, loss.item()

    setup.step = step_forgetting_backward
    result = doctor.run_checks(setup, only=['gradient flow'])[0]
    assert result.status == doctor.FAIL and 'loss.backward()' in result.fix


class DetachedSmallResNet(SmallResNet):
    def forward(self, x):
        features = self.avgpool(self.layers(self.stem(x))).flatten(1)
        return self.fc(features.detach())  # the bug: nothing below fc ever learns


def test_detached_graph_fails_gradient_flow(fast_options):
    setup = make_setup(fast_options)
    results = doctor.run_checks(with_model(setup, DetachedSmallResNet()), only=CHEAP)
    assert_caught(results, 'gradient flow')
    cut_off = results[1].data['cut_off']
    assert 'stem.0.weight' in cut_off and 'fc.weight' not in cut_off


def test_raw_0_255_input_fails_normalisation(fast_options):
    setup = make_setup(fast_options)
    setup.train_data.transforms = T.Compose([T.Resize(32), T.CenterCrop(32), T.PILToTensor(),
                                             T.Lambda(lambda x: x.float())])
    results = doctor.run_checks(setup, only=CHEAP)
    assert_caught(results, 'normalisation')
    assert results[2].data['max'] > 200


def test_unnormalised_unit_range_input_warns(fast_options):
    setup = make_setup(fast_options)
    setup.train_data.transforms = T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor()])
    results = doctor.run_checks(setup, only=CHEAP)
    assert_caught(results, 'normalisation', doctor.WARN)


@pytest.mark.parametrize('corrupt', ['flipped', 'shuffled'])
def test_wrong_labels_fail_labels(fast_options, corrupt):
    setup = make_setup(fast_options)
    samples = setup.train_data.samples
    if corrupt == 'flipped':
        setup.train_data.samples = [(path, 1 - label) for path, label in samples]
    else:
        labels = [label for _, label in samples]
        random.Random(0).shuffle(labels)
        setup.train_data.samples = [(path, label) for (path, _), label in zip(samples, labels)]
    results = doctor.run_checks(setup, only=CHEAP)
    assert_caught(results, 'labels')
    assert results[3].data['wrong'] >= (56 if corrupt == 'flipped' else 10)


def test_train_val_overlap_fails_labels(fast_options):
    setup = make_setup(fast_options)
    setup.val_data.samples = setup.val_data.samples + setup.train_data.samples[:5]
    result = doctor.run_checks(setup, only=['labels'])[0]
    assert result.status == doctor.FAIL and result.data['overlap'] == 5


@pytest.mark.parametrize('activation', [nn.ReLU(), nn.Softmax(dim=1), nn.Sigmoid()])
def test_activation_after_the_logits_fails_logits(fast_options, activation):
    setup = make_setup(fast_options)
    model = setup.model
    model.fc = nn.Sequential(model.fc, activation)
    results = doctor.run_checks(with_model(setup, model), only=CHEAP)
    found = statuses(results)
    assert found['logits'] == doctor.FAIL
    assert type(activation).__name__ in results[4].evidence
    for name in ('shuffling', 'normalisation', 'labels', 'initialisation'):
        assert found[name] != doctor.FAIL, [r.line() for r in results]


class SoftmaxSmallResNet(SmallResNet):
    def forward(self, x):
        return torch.softmax(super().forward(x), dim=1)  # functional: no module to spot


def test_functional_softmax_after_the_logits_fails_logits(fast_options):
    setup = make_setup(fast_options)
    result = doctor.run_checks(with_model(setup, SoftmaxSmallResNet()), only=['logits'])[0]
    assert result.status == doctor.FAIL and 'softmax of' in result.evidence


def zero_init(module):
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.zeros_(m.weight)


def positive_init(module):
    """The write-up's culprit: weights all positive, some above 1."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.uniform_(m.weight, 0, 1.5)


@pytest.mark.parametrize('init', [zero_init, positive_init])
def test_bad_initialisation_fails_initialisation(fast_options, monkeypatch, init):
    monkeypatch.setattr(models.small_resnet, 'kaiming_init', init)  # the model's own init call
    setup = make_setup(fast_options)
    results = doctor.run_checks(setup, only=CHEAP)
    found = statuses(results)
    assert found['initialisation'] == doctor.FAIL, [r.line() for r in results]
    assert 'stem.0.weight is all ' + ('zero' if init is zero_init else 'positive') \
        in results[5].evidence
    for name in ('shuffling', 'normalisation', 'labels'):
        assert found[name] != doctor.FAIL, [r.line() for r in results]


def test_absurd_lr_fails_learning_rate(fast_options):
    setup = make_setup(fast_options, lr=10.0)
    results = doctor.run_checks(setup, only=CHEAP + ('learning rate',))
    assert_caught(results, 'learning rate')
    result = results[-1]
    assert result.data['band'][1] < 1 and result.data['suggested'] < 0.1
    assert 'the quick test favours' in result.evidence  # Adam against SGD with momentum
    assert result.fix.startswith('--lr=')


def test_doctor_command_exits_1_when_a_check_fails(fast_options, monkeypatch):
    monkeypatch.setattr(main, 'run_doctor', lambda *args: True)
    with pytest.raises(SystemExit) as exit_:
        main.run(['doctor'] + [f'--{k}={v}' for k, v in fast_options.items()])
    assert exit_.value.code == 1


class RecordingVisdom:
    """Stands in for a Visualizer talking to a live server."""
    env = 'doctor-test'

    def __init__(self):
        self.calls = []
        self.vis = self

    def img_grid(self, name, images, captions, **kwargs):
        self.calls.append(('img_grid', len(images), captions))

    def line(self, X, Y, **kwargs):
        self.calls.append(('line', len(X)))


def test_grid_and_lr_plot_go_to_visdom_when_it_runs(fast_options):
    setup = make_setup(fast_options)
    setup.vis = RecordingVisdom()
    results = doctor.run_checks(setup, only=('labels', 'learning rate'))
    kinds = [call[0] for call in setup.vis.calls]
    assert kinds == ['img_grid', 'line']
    assert set(setup.vis.calls[0][2]) == {'cat', 'dog'}
    assert "Visdom env 'doctor-test'" in results[0].evidence
    assert "Visdom env 'doctor-test'" in results[1].evidence


def test_lr_range_analysis_on_a_known_curve():
    lrs = [10 ** (-5 + i / 4) for i in range(20)]
    # flat, falling from 1e-4 (index 4) to its lowest at index 11, then rising
    falling = [0.69] * 4 + [0.69 - 0.05 * i for i in range(1, 9)]
    suggested, band = analyse_range(lrs, falling + [0.3 + 0.1 * i for i in range(8)])
    assert suggested == pytest.approx(lrs[11] / 10)
    assert band == pytest.approx((lrs[4] / 10, 3 * lrs[11]))
    # back above the start right after the minimum: the band stops at the minimum
    _, band = analyse_range(lrs, falling + [0.7] * 8)
    assert band[1] == pytest.approx(lrs[11])
    assert analyse_range(lrs, [0.69] * 20) == (None, None)


# The collapse alarm -----------------------------------------------------------------

def meter_from(predictions, labels):
    meter = ClassificationMeter()
    scores = nn.functional.one_hot(torch.tensor(predictions), 2).float()
    meter.add(scores, torch.tensor(labels))
    return meter.cm


def test_collapse_warning_symptoms():
    balanced = [0, 1] * 50
    assert collapse_warning([0.5], meter_from([1] * 100, balanced)) is not None
    assert collapse_warning([0.5], meter_from([1] * 97 + [0] * 3, balanced)) is not None
    assert collapse_warning([0.6932, 0.6901], meter_from(balanced, balanced)) is not None
    assert collapse_warning([0.6932], meter_from(balanced, balanced)) is None  # one epoch
    assert collapse_warning([0.69, 0.62], meter_from(balanced, balanced)) is None
    # one predicted class is right when the labels are all one class
    assert collapse_warning([0.3], meter_from([1] * 100, [1] * 100)) is None


def test_collapsed_training_run_raises_the_alarm(fast_options, monkeypatch, capsys):
    # zero weights: every input gives the same logits, only the bias learns
    monkeypatch.setattr(models.small_resnet, 'kaiming_init', zero_init)
    with pytest.warns(UserWarning, match='stuck at 50%'):
        main.train(**dict(fast_options, max_epoch=2))
    out = capsys.readouterr().out
    assert '!!! the run looks stuck at 50%' in out and 'python main.py doctor' in out
    assert 'of the validation predictions are' in out and 'ln 2' in out


def test_healthy_training_run_raises_no_alarm(fast_options, recwarn, capsys):
    main.train(**dict(fast_options, max_epoch=2))
    assert not [w for w in recwarn if 'stuck at 50%' in str(w.message)]
    assert '!!!' not in capsys.readouterr().out
