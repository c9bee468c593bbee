"""The 50% doctor: healthy setups pass every check, the command's output and exit status,
ablation naming what keeps the loss from falling, and the collapse alarm. The catalogue
of injected faults and harmless variants is tests/test_doctor_catalogue.py."""
import os

import pytest
import torch
from torch import nn
from torchvision.models import resnet18

import config
import doctor
import main
import models.small_resnet
from doctor.training_checks import analyse_range
from engine.report import collapse_warning
from test_doctor_catalogue import make_run, step_with, with_head  # tests/ is on sys.path


def statuses(results):
    return {r.name: r.status for r in results}


def lines(results):
    return '\n'.join(r.line() for r in results)


# Healthy setups ---------------------------------------------------------------------

def test_healthy_from_scratch_passes_every_check_from_the_command_line(fast_options, capsys):
    main.run(['doctor'] + [f'--{k}={v}' for k, v in fast_options.items()])  # no SystemExit
    out = capsys.readouterr().out
    found = [line[:4] for line in out.splitlines() if line[:4] in ('PASS', 'WARN', 'FAIL')]
    assert found == ['PASS'] * len(doctor.CHECKS), out
    assert f'{len(doctor.CHECKS)} passed, 0 warnings, 0 failed' in out
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
    results = doctor.run_checks(make_run(fast_options, model='ResNet18', pretrained=True,
                                         batch_size=8))
    assert statuses(results) == {name: doctor.PASS for name in doctor.CHECKS}, lines(results)


def test_doctor_command_exits_1_when_a_check_fails(fast_options, capsys):
    with pytest.raises(SystemExit) as exit_:
        main.run(['doctor'] + [f'--{k}={v}' for k, v in fast_options.items()]
                 + ['--label_smoothing=0.9'])
    assert exit_.value.code == 1
    out = capsys.readouterr().out
    assert 'FAIL  loss' in out and 'fix: --label_smoothing=0.1' in out


def test_unknown_check_names_are_refused(fast_options):
    with pytest.raises(ValueError, match='unknown checks'):
        doctor.run_checks(make_run(fast_options), only=('shufling',))


# What train really uses --------------------------------------------------------------

def test_the_doctor_examines_the_objects_train_builds(fast_options):
    run = make_run(fast_options, optimizer='sgd', lr=0.05, weight_decay=1e-4,
                   label_smoothing=0.1)
    checks = ('shuffling', 'loss', 'overfit batch')
    results = {r.name: r for r in doctor.run_checks(run, only=checks)}
    assert 'EpochShuffleSampler' in results['shuffling'].evidence
    assert results['loss'].data['smoothing'] == 0.1
    assert 'as configured (weight decay 0.0001), lr 0.05' in results['overfit batch'].evidence


def test_overfit_runs_at_the_configured_lr_then_says_what_to_change(fast_options):
    results = doctor.run_checks(make_run(fast_options, lr=1e-7),
                                only=('loss', 'learning rate', 'overfit batch'))
    overfit = results[-1]
    assert overfit.status == doctor.FAIL, overfit.line()
    assert 'as configured (weight decay 0), lr 1e-07' in overfit.evidence
    assert 'at the suggested lr' in overfit.evidence
    assert overfit.fix == f'--lr={results[1].data["suggested"]:.2g}'


# Ablation: when the loss will not fall, name what keeps it up --------------------------

def dropout_head(run):
    return with_head(run, nn.Dropout(0.99), run.model.fc)


def clipping_step(run):
    run.step = step_with(clip=1e-6)
    return run


SGD = dict(optimizer='sgd', lr=0.01)


@pytest.mark.parametrize('options, inject, named', [
    (dict(SGD, weight_decay=30.0), None, 'weight decay 0'),
    (dict(), dropout_head, 'dropout off'),
    (dict(label_smoothing=0.95), None, 'a plain CrossEntropyLoss'),
    (SGD, clipping_step, 'engine.loop.train_step instead of run.step'),
], ids=['weight decay', 'dropout', 'label smoothing', 'step clipping to nothing'])
def test_ablation_names_what_keeps_the_loss_up(fast_options, options, inject, named):
    # the overfit check alone: the checks that name these faults directly do not run
    run = make_run(fast_options, **options)
    result = doctor.run_checks(inject(run) if inject else run, only=('overfit batch',))[0]
    assert result.status == doctor.FAIL, result.line()
    assert f'with {named} 8 images are learnt' in result.evidence, result.line()


def test_ablation_reinitialises_a_dead_model(fast_options, monkeypatch):
    monkeypatch.setattr(models.small_resnet, 'kaiming_init', zero_init)  # the model's own call
    results = doctor.run_checks(make_run(fast_options), only=('initialisation', 'learning rate'))
    assert results[0].status == results[1].status == doctor.FAIL, lines(results)
    assert 'never fell' in results[1].evidence
    assert 'with Kaiming initialisation' in results[1].evidence
    assert 'kaiming_init' in results[1].fix


def zero_init(module):
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.zeros_(m.weight)


# Plots -------------------------------------------------------------------------------

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
    run = make_run(fast_options)
    run.vis = RecordingVisdom()
    results = doctor.run_checks(run, only=('labels', 'learning rate'))
    assert [call[0] for call in run.vis.calls] == ['img_grid', 'line']
    assert set(run.vis.calls[0][2]) == {'cat', 'dog'}
    assert all("Visdom env 'doctor-test'" in r.evidence for r in results)


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

def record(loss, train_acc=80.0, val_predicted=(50, 50), val_truth=(50, 50), train_cm=None):
    """An epoch record as engine.report.epoch_record writes it (the fields the alarm reads)."""
    cats, dogs = val_truth
    dog_share = val_predicted[1] / sum(val_predicted)
    val_cm = [[round(cats * (1 - dog_share)), round(cats * dog_share)],
              [round(dogs * (1 - dog_share)), round(dogs * dog_share)]]
    return dict(loss=loss, train_acc_cm=train_acc, train_cm=train_cm or [[40, 10], [10, 40]],
                val_cm=val_cm)


@pytest.mark.parametrize('history, stuck', [
    ([record(0.5, val_predicted=(0, 100))], True),  # one predicted class, balanced labels
    ([record(0.5, val_predicted=(3, 97))], True),
    ([record(0.3, val_predicted=(0, 100), val_truth=(0, 100))], False),  # all dogs: right
    ([record(0.6932), record(0.6901)], True),  # at ln 2 for two epochs
    ([record(0.6932)], False),  # one epoch says nothing yet
    ([record(0.69), record(0.62)], False),  # falling
    ([record(0.75), record(0.74)], True),  # above ln 2 and not falling
    ([record(0.95), record(0.75)], False),  # above ln 2 but falling fast
    ([record(0.65, train_acc=51.0), record(0.64, train_acc=48.5)], True),  # accuracy at 50%
    ([record(0.65, train_acc=51.0), record(0.60, train_acc=56.0)], False),
    ([record(0.65, train_acc=51.0, train_cm=[[90, 0], [10, 0]]),  # unbalanced labels
      record(0.64, train_acc=50.0, train_cm=[[90, 0], [10, 0]])], False),
])
def test_collapse_warning_symptoms(history, stuck):
    assert (collapse_warning(history) is not None) == stuck, collapse_warning(history)


def test_collapse_warning_says_what_it_saw():
    above = collapse_warning([record(0.75), record(0.74)])
    assert 'not fallen below ln 2' in above and '0.7500, 0.7400' in above
    flat = collapse_warning([record(0.65, train_acc=51.0), record(0.64, train_acc=48.5)])
    assert 'within 3 points of 50%' in flat and 'python main.py doctor' in flat


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


def test_options_reach_the_doctor_through_config_parse(fast_options):
    opt = config.parse(dict(fast_options, weight_decay=0.25), verbose=False)
    run = doctor.examine(opt)
    assert {g['weight_decay'] for g in run.optimizer.param_groups} == {0.25}
