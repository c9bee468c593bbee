import csv
import io
import math
import os
import sys
import time

import pytest
import torch

import config
import main
from engine import builder
from engine.loop import fit, train_step
from engine.schedules import DecayWhenLossRises, TimeBudget
from utils.errors import UserError
from utils.interrupt import GracefulStop
from models import SmallResNet


def test_a_from_scratch_model_learns_the_generated_classes(fast_options):
    # without random crops: on 56 photos at 32 px they slow learning enough that the
    # best epoch's pick on 24 validation photos was a lucky one (14/20 on the test photos)
    result = main.train(**dict(fast_options, max_epoch=10, batch_size=8, lr=2e-3, augment=False))
    best = max(result.history, key=lambda r: r['val_acc_cm'])  # the _best checkpoint
    assert best['val_acc_cm'] >= 90.0 and result.best_val_acc == best['val_acc_cm']
    assert best['val_cm'][0][0] > 0 and best['val_cm'][1][1] > 0  # both classes predicted
    assert result.history[-1]['loss'] < result.history[0]['loss']
    for record in result.history:  # two ways of counting, same predictions
        assert record['train_acc_cm'] == pytest.approx(record['train_acc_count'])
        assert record['val_acc_cm'] == pytest.approx(record['val_acc_count'])
    assert os.path.isfile(os.path.join(fast_options['checkpoint_dir'], 'SmallResNet_last.pth'))
    assert os.path.isfile(os.path.join(fast_options['checkpoint_dir'], 'SmallResNet_best.pth'))

    # val and test on the best checkpoint (found without --load_model_path)
    meter = main.val(**fast_options)
    assert meter.accuracy_cm == pytest.approx(meter.accuracy_counts)
    assert meter.accuracy_cm >= 90.0 and meter.total == 24
    main.test(**fast_options)
    with open(fast_options['result_file']) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ['id', 'label']
    ids = [int(r[0]) for r in rows[1:]]
    assert ids == sorted(ids) == list(range(1, 21))
    probabilities = [float(r[1]) for r in rows[1:]]
    assert all(0.0 <= p <= 1.0 for p in probabilities)
    truth = fast_options_truth(fast_options)
    correct = sum((p > 0.5) == bool(truth[i]) for i, p in zip(ids, probabilities))
    assert correct >= 15  # the generator knows the test labels Kaggle hides


def test_bf16_autocast_learns_and_evaluates_like_fp32(fast_options):
    """--bf16 (autocast) trains to the same bar; evaluating the checkpoint in bf16 gives
    the fp32 predictions up to rounding."""
    result = main.train(**dict(fast_options, max_epoch=10, batch_size=8, lr=2e-3, bf16=True))
    assert max(r['val_acc_cm'] for r in result.history) >= 90.0
    assert result.history[-1]['loss'] < result.history[0]['loss']
    checkpoint = torch.load(os.path.join(fast_options['checkpoint_dir'], 'SmallResNet_last.pth'),
                            weights_only=True)
    assert all(v.dtype != torch.bfloat16 for v in checkpoint['state_dict'].values())  # fp32 weights
    fp32 = main.val(**dict(fast_options, bf16=False))
    bf16 = main.val(**dict(fast_options, bf16=True))
    assert bf16.total == fp32.total == 24
    assert abs(bf16.accuracy_cm - fp32.accuracy_cm) <= 100 / 24 + 1e-6  # one image at most
    assert bf16.log_loss == pytest.approx(fp32.log_loss, abs=0.05)


def test_compile_trains_and_saves_ordinary_checkpoints(fast_options):
    result = main.train(**dict(fast_options, compile=True, max_epoch=2, batch_size=8, lr=2e-3))
    assert result.history[-1]['loss'] < result.history[0]['loss']
    checkpoint = torch.load(os.path.join(fast_options['checkpoint_dir'], 'SmallResNet_last.pth'),
                            weights_only=True)
    assert checkpoint['state_dict'].keys() == SmallResNet().state_dict().keys()  # no _orig_mod.
    assert main.val(**fast_options).total == 24  # and the eager model reads them


def test_compile_without_a_cpu_compiler_says_what_to_install(fast_options, monkeypatch):
    import utils.device
    monkeypatch.setattr(utils.device.shutil, 'which', lambda name: None)
    with pytest.raises(UserError, match='apt-get install g\\+\\+'):
        main.train(**dict(fast_options, compile=True))


def fast_options_truth(options):
    from data.synthetic import make_test_images
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:  # same seed and size: same labels
        return make_test_images(tmp, 20, size=48, seed=1)


def lrs_of(optimizer):
    return [group['lr'] for group in optimizer.param_groups]


def test_lr_decays_only_when_the_loss_rises():
    model = SmallResNet()
    optimizer = model.get_optimizer(0.01, 0, 'adam')
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    optimizer.step()
    moments = optimizer.state_dict()['state'][0]['exp_avg'].clone()
    scheduler = DecayWhenLossRises(optimizer, 0.95)
    scheduler.step(0.6)
    scheduler.step(0.5)
    assert not scheduler.decayed and lrs_of(optimizer) == [0.01]
    scheduler.step(0.51)
    assert scheduler.decayed and lrs_of(optimizer) == [pytest.approx(0.0095)]
    assert torch.equal(optimizer.state_dict()['state'][0]['exp_avg'], moments)  # state kept
    restored = DecayWhenLossRises(model.get_optimizer(0.01, 0, 'adam'), 0.95)
    restored.load_state_dict(scheduler.state_dict())
    assert restored.previous_loss == 0.51  # the rule's memory travels in the checkpoint


def test_decay_scales_every_parameter_group():
    model = __import__('models').build_model('ResNet18', pretrained=False)
    optimizer = model.get_optimizer(0.001, 0, 'sgd')
    optimizer.param_groups[1]['lr'] = 0.01
    scheduler = DecayWhenLossRises(optimizer, 0.95)
    scheduler.step(0.5)
    scheduler.step(1.0)
    assert lrs_of(optimizer) == [pytest.approx(0.00095), pytest.approx(0.0095)]


def test_training_decays_lr_in_the_loop(fast_options):
    """The real loop with a step (the Run's seam) that reports scripted losses: the
    epoch loss rises at epoch 1 and falls at epoch 2."""
    run = builder.for_training(config.parse(dict(fast_options, max_epoch=3, lr=0.001),
                                            verbose=False))
    per_epoch = len(run.train_loader)
    losses = iter([0.6] * per_epoch + [0.7] * per_epoch + [0.65] * per_epoch)

    def scripted_step(*args):
        scores, _ = train_step(*args)
        return scores, next(losses)
    run.step = scripted_step
    with GracefulStop() as stop:
        state = fit(run, stop)
    lrs = [r['lrs'][0] for r in state.history]  # lr used during each epoch
    assert lrs == [pytest.approx(0.001), pytest.approx(0.001), pytest.approx(0.00095)]


def test_load_model_path_resumes_epochs_and_optimizer(fast_options):
    main.train(**dict(fast_options, max_epoch=1))
    last = os.path.join(fast_options['checkpoint_dir'], 'SmallResNet_last.pth')
    result = main.train(**dict(fast_options, max_epoch=2, load_model_path=last))
    assert [r['epoch'] for r in result.history] == [1]
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint['epoch'] == 2 and 'optimizer' in checkpoint


def test_missing_checkpoint_dir_is_created_and_unwritable_one_fails_fast(fast_options, tmp_path):
    builder.check_writable(str(tmp_path / 'a' / 'b'))
    assert (tmp_path / 'a' / 'b').is_dir()
    (tmp_path / 'file').write_text('')
    with pytest.raises(UserError, match='cannot write checkpoints to .*file/sub'):
        main.train(**dict(fast_options, checkpoint_dir=str(tmp_path / 'file' / 'sub')))


def test_last_batch_of_one_image_is_fine(fast_options):
    # 56 training images with batch 11: the last batch holds one image
    result = main.train(**dict(fast_options, batch_size=11, val_ratio=0.3))
    assert result.history[0]['val_cm']


class Stdin(io.StringIO):
    def __init__(self, terminal):
        super().__init__()
        self.terminal = terminal

    def isatty(self):
        return self.terminal


@pytest.mark.parametrize('terminal', [True, False])
def test_debug_file_drops_into_the_debugger_only_with_a_terminal(fast_options, monkeypatch,
                                                                  terminal):
    """The book's hook, at its default place <checkpoint_dir>/debug: a run without a
    terminal (cron, nohup, Slurm) is never held by it, nor stopped by bdb.BdbQuit."""
    calls = []
    monkeypatch.setattr(sys, 'breakpointhook', lambda *a, **k: calls.append(1))
    monkeypatch.delenv('PYTHONBREAKPOINT', raising=False)
    monkeypatch.setattr(sys, 'stdin', Stdin(terminal))
    options = {k: v for k, v in fast_options.items() if k != 'debug_file'}
    os.makedirs(options['checkpoint_dir'])
    open(os.path.join(options['checkpoint_dir'], 'debug'), 'w').close()
    state = main.train(**options)
    assert bool(calls) == terminal and state.epoch == 1


def test_test_without_any_checkpoint_refuses_random_weights(fast_options):
    with pytest.raises(UserError, match='no checkpoint to evaluate.*--load_model_path'):
        main.test(**fast_options)


def test_learns_on_real_kaggle_images(shared_train, tmp_path):
    """About 1,000 real photos at 64 px: the loss must fall clearly below ln 2."""
    subset = tmp_path / 'train'
    subset.mkdir()
    for name in ('cat', 'dog'):
        for i in range(500):
            os.symlink(os.path.join(shared_train, f'{name}.{i}.jpg'), subset / f'{name}.{i}.jpg')
    result = main.train(train_data_root=str(subset), model='SmallResNet', image_size=64,
                        batch_size=32, max_epoch=6, lr=2e-3, num_workers=2, vis=False,
                        checkpoint_dir=str(tmp_path / 'ckpt'), debug_file=str(tmp_path / 'x'))
    history = result.history
    assert min(r['loss'] for r in history) < math.log(2) - 0.05
    best = max(history, key=lambda r: r['val_acc_cm'])
    assert best['val_acc_cm'] > 60.0
    assert best['val_cm'][0][0] > 0 and best['val_cm'][1][1] > 0


def test_bf16_on_a_cpu_without_native_bf16_warns(fast_options, monkeypatch):
    monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported', lambda: False)
    monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda: False)
    with pytest.warns(UserWarning, match='no native bfloat16 support.*--bf16=auto'):
        assert config.parse(dict(fast_options, bf16=True)).bf16 is True
    assert config.parse(dict(fast_options, bf16='auto')).bf16 is False  # auto: off here


def test_bf16_auto_respects_an_isa_limit(fast_options, monkeypatch):
    monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported', lambda: True)
    assert config.parse(fast_options).bf16 is True  # auto: on where native
    monkeypatch.setenv('ONEDNN_MAX_CPU_ISA', 'AVX2')  # as on an AVX2 laptop
    assert config.parse(fast_options).bf16 is False


def test_time_budget_trains_by_the_clock_and_ends_in_time(fast_options):
    """--time_budget: as many epochs as fit, the LR warming up then falling towards 0 by
    the wall clock, the last validation and checkpoint inside the budget."""
    started = time.monotonic()
    state = main.train(**dict(fast_options, time_budget=0.25, max_epoch=1))  # 15 s
    took = time.monotonic() - started
    assert len(state.history) >= 2  # not bound by --max_epoch=1
    assert took < 15 + 10 and state.seconds <= 15 + 5
    lrs = [r['lrs'][0] for r in state.history]
    assert max(lrs) > 5 * lrs[-1]  # the cosine came down by the end
    checkpoint = torch.load(os.path.join(fast_options['checkpoint_dir'], 'SmallResNet_last.pth'),
                            weights_only=True)
    assert checkpoint['seconds'] == pytest.approx(state.seconds)


def test_progressive_resizing_grows_the_training_images_and_validates_at_full_size(fast_options):
    """--progressive: 2/3 of --image_size for the first half of the cosine schedule, 5/6
    until three quarters, the full size at the end; validation always at full size."""
    run = builder.for_training(config.parse(dict(fast_options, image_size=48, max_epoch=4,
                                                 lr_schedule='cosine', progressive=True),
                                            verbose=False))
    trained, validated = [], []
    run.model.register_forward_pre_hook(
        lambda model, args: (trained if model.training else validated).append(args[0].shape[-1]))
    with GracefulStop() as stop:
        fit(run, stop)
    assert trained[0] == 32 and 40 in trained and trained[-1] == 48
    assert trained == sorted(trained)
    assert set(validated) == {48}


def test_progressive_needs_a_schedule_with_an_end_and_a_network_on_images(fast_options):
    with pytest.raises(config.ConfigError, match='--lr_schedule=cosine or --time_budget'):
        config.parse(dict(fast_options, progressive=True), verbose=False)
    with pytest.raises(config.ConfigError, match='--freeze or --unfreeze'):
        config.parse(dict(fast_options, progressive=True, time_budget=1, freeze=True,
                          model='EfficientNetLite0'), verbose=False)


def test_a_resumed_budget_only_has_what_is_left():
    budget = TimeBudget(10, started=time.monotonic(), used=9 * 60)
    assert 0.9 < budget.progress() < 1.0 and not budget.exhausted()
    assert TimeBudget(10, started=time.monotonic(), used=10 * 60).exhausted()
    assert not TimeBudget(None, started=0).exhausted()  # no budget: a clock only


def test_clip_bounds_the_csv_probabilities(fast_options):
    main.train(**dict(fast_options, max_epoch=2, batch_size=8, lr=2e-3))

    def csv_rows(**extra):
        main.test(**dict(fast_options, **extra))
        with open(fast_options['result_file']) as f:
            return [(int(i), float(p)) for i, p in list(csv.reader(f))[1:]]
    plain, clipped = csv_rows(), csv_rows(clip=0.2)
    assert [i for i, _ in clipped] == [i for i, _ in plain]
    for (_, p), (_, q) in zip(plain, clipped):
        assert q == pytest.approx(min(max(p, 0.2), 0.8), abs=1e-6)
