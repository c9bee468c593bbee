"""predict, export and the ONNX Runtime engine (engine/predict.py, engine/onnx_engine.py).

One small SmallResNet is trained on the generated stripes for the whole module; torch
runs in fp32 wherever outputs are compared (ONNX Runtime computes in fp32, and
--bf16=auto would turn bfloat16 on for torch on AMX/AVX512-BF16 CPUs).
"""
import csv
import os
import shutil

import numpy as np
import pytest
import torch

import config
import main
from config import ConfigError
from models import SmallResNet
from data.dataset import DogCat, SkippedFiles, build_loader
from engine import builder, onnx_engine
from engine.feature_cache import compute_features

pytest.importorskip('onnxruntime')
pytest.importorskip('onnxscript')


@pytest.fixture(scope='module')
def trained(tmp_path_factory, striped_data):
    """The options of a SmallResNet trained to >= 90% on the generated set (as
    tests/conftest.py fast_options, with a checkpoint dir shared by this module)."""
    tmp = tmp_path_factory.mktemp('predict')
    options = dict(train_data_root=striped_data['train'], test_data_root=striped_data['test'],
                   model='SmallResNet', image_size=32, batch_size=8, max_epoch=10, lr=2e-3,
                   num_workers=0, vis=False, bf16=False, checkpoint_dir=str(tmp / 'checkpoints'),
                   result_file=str(tmp / 'result.csv'), debug_file=str(tmp / 'no_debug'))
    result = main.train(**options)
    assert result.best_val_acc >= 90.0
    return dict(options, max_epoch=1)


def without_csv(options, **changes):
    """predict writes a CSV only when --result_file is given."""
    return {**{k: v for k, v in options.items() if k != 'result_file'}, **changes}


def trained_model(options):
    opt = main.config.parse(options, verbose=False)
    return builder.network(opt, builder.placement(opt), trained=True).eval()


def ids_and_probabilities(rows):
    return {int(os.path.basename(path).split('.')[0]): p for path, p in rows}


def test_predict_gives_tests_probabilities_and_the_generators_labels(trained, striped_data,
                                                                     tmp_path, capsys):
    tested = dict(main.test(**dict(trained, engine='torch')))
    out = str(tmp_path / 'predictions.csv')
    with open(trained['result_file']) as f:
        test_csv = f.read()
    capsys.readouterr()
    rows = main.predict(striped_data['test'], **without_csv(trained, engine='torch'))
    printed = capsys.readouterr().out
    with open(trained['result_file']) as f:
        assert f.read() == test_csv  # without --result_file, predict writes no CSV
    assert main.predict(striped_data['test'], **dict(trained, engine='torch', result_file=out)) \
        == rows
    predicted = ids_and_probabilities(rows)
    assert sorted(predicted) == sorted(tested) == list(range(1, 21))
    assert all(abs(predicted[i] - tested[i]) <= 1e-6 for i in tested)
    truth = striped_data['truth']
    assert sum((p > 0.5) == bool(truth[i]) for i, p in predicted.items()) >= 15
    # one line per image, in folder order (1.jpg, 2.jpg, ..., 10.jpg: natural order)
    lines = [line.split('\t') for line in printed.splitlines() if '\t' in line]
    assert [os.path.basename(line[0]) for line in lines] == [f'{i}.jpg' for i in range(1, 21)]
    assert all(line[2] == ('dog' if float(line[1]) > 0.5 else 'cat') for line in lines)
    with open(out) as f:
        written = list(csv.reader(f))
    assert written[0] == ['path', 'p_dog', 'class'] and len(written) == 21


def test_predict_keeps_the_order_given_and_skips_bad_files_with_a_reason(trained, striped_data,
                                                                         tmp_path):
    folder = tmp_path / 'mixed'
    folder.mkdir()
    for i in (2, 10):
        shutil.copy(os.path.join(striped_data['test'], f'{i}.jpg'), folder)
    (folder / 'notes.txt').write_text('not a photo')
    (folder / 'evil.jpg').write_bytes(b'%!PS-Adobe-3.0\n')  # PostScript: never decoded
    first = os.path.join(striped_data['test'], '12.jpg')
    with pytest.warns(UserWarning) as warned:
        rows = main.predict(first, str(folder), os.path.join(striped_data['test'], '1*.jpg'),
                            **without_csv(trained, engine='torch'))
    names = [os.path.relpath(path, str(tmp_path)) if path.startswith(str(tmp_path))
             else os.path.basename(path) for path, _ in rows]
    assert names == ['12.jpg', 'mixed/2.jpg', 'mixed/10.jpg', '1.jpg', '10.jpg', '11.jpg',
                     '13.jpg', '14.jpg', '15.jpg', '16.jpg', '17.jpg', '18.jpg', '19.jpg']
    reasons = ' '.join(str(w.message) for w in warned)
    assert 'notes.txt (not an image file name' in reasons and 'evil.jpg (' in reasons


def test_export_runs_in_onnxruntime_like_torch_for_any_batch_size(trained, striped_data,
                                                                  monkeypatch):
    import onnxruntime
    path = main.export(**trained)
    assert path == os.path.join(trained['checkpoint_dir'], 'SmallResNet.onnx')
    session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
    meta = session.get_modelmeta().custom_metadata_map
    assert meta['model'] == 'SmallResNet' and meta['image_size'] == '32'
    assert meta['input_mean'] == '[0.485, 0.456, 0.406]' and 'RGB' in meta['input_format']
    assert session.get_inputs()[0].shape == ['batch', 3, 32, 32]

    model = trained_model(trained)
    images = DogCat(striped_data['test'], mode='test', image_size=32, mean=model.input_mean,
                    std=model.input_std)
    batch = torch.stack([images[i][0] for i in range(len(images))])
    with torch.inference_mode():
        expected = torch.softmax(model(batch), 1).numpy()
    for start, size in ((0, 1), (1, 3), (0, 20)):  # the batch size is dynamic
        logits = session.run(None, {'images': batch[start:start + size].numpy()})[0]
        got = torch.softmax(torch.from_numpy(logits), 1).numpy()
        assert np.abs(got - expected[start:start + size]).max() < 1e-4

    # predict from the .onnx file alone: no torch model is built
    torch_rows = main.predict(striped_data['test'], **without_csv(trained, engine='torch'))
    monkeypatch.setattr(builder, 'network', lambda *a, **k: pytest.fail('built a torch model'))
    onnx_rows = main.predict(striped_data['test'], load_model_path=path, num_workers=0)
    assert [p for p, _ in onnx_rows] == [p for p, _ in torch_rows]
    assert max(abs(a - b) for (_, a), (_, b) in zip(onnx_rows, torch_rows)) < 1e-4


def test_onnx_engine_val_and_test_equal_torch(trained):
    torch_val = main.val(**dict(trained, engine='torch'))
    onnx_val = main.val(**dict(trained, engine='onnx'))
    assert onnx_val.cm.tolist() == torch_val.cm.tolist() and onnx_val.total == 24
    assert onnx_val.log_loss == pytest.approx(torch_val.log_loss, abs=1e-4)
    torch_test = dict(main.test(**dict(trained, engine='torch')))
    onnx_test = dict(main.test(**dict(trained, engine='onnx')))
    assert onnx_test.keys() == torch_test.keys()
    assert max(abs(onnx_test[i] - torch_test[i]) for i in torch_test) < 1e-4


def test_auto_engine_takes_onnxruntime_only_when_faster_and_remembers(trained, tmp_path,
                                                                     monkeypatch, capsys):
    model = trained_model(trained)
    opt = main.config.parse(dict(trained, checkpoint_dir=str(tmp_path)), verbose=False)
    where = builder.placement(opt)
    # few images: torch, without exporting
    monkeypatch.setattr(onnx_engine, 'export_bytes', lambda *a, **k: pytest.fail('exported'))
    assert onnx_engine.choose(opt, model, where, images=999) is model
    monkeypatch.undo()
    exported = object()  # stands in for the OnnxNetwork: the export has its own test
    monkeypatch.setattr(onnx_engine.OnnxNetwork, 'of', classmethod(lambda *a, **k: exported))
    for rates, engine in (((100.0, 129.0), 'torch'), ((100.0, 130.0), 'onnx')):
        monkeypatch.setattr(onnx_engine, 'measure', lambda *a, **k: rates)
        network = onnx_engine.choose(opt, model, where, images=1000)
        assert network is (model if engine == 'torch' else exported)
        assert f'engine: {engine} (ONNX Runtime {rates[1]} img/s, torch {rates[0]} img/s for ' \
               f'SmallResNet at 32 px' in capsys.readouterr().out
        # remembered in the checkpoint dir: no second measurement
        monkeypatch.setattr(onnx_engine, 'measure', lambda *a, **k: pytest.fail('measured'))
        assert onnx_engine.choose(opt, model, where, images=1000) is network
        assert f'engine: {engine} (' in capsys.readouterr().out
        os.remove(os.path.join(str(tmp_path), onnx_engine.CHOICE_FILE))


def test_frozen_backbone_features_through_onnxruntime_equal_torchs(trained, capsys,
                                                                   monkeypatch):
    options = dict(trained, model='MobileNetV2', pretrained=False, freeze=True, augment=False)
    opt = main.config.parse(options, verbose=False)
    torch.manual_seed(0)
    run = builder.for_training(opt, vis=False)
    loader = build_loader(run.val_data, 8, False, 0, False)
    network = onnx_engine.OnnxNetwork.of(run.model, opt.image_size)
    expected = compute_features(run.model, loader, run.placement, SkippedFiles()).features
    got = compute_features(run.model, loader, run.placement, SkippedFiles(),
                           network=network).features
    assert got.shape == expected.shape == (24, 1280)
    assert (got - expected).abs().max() < 1e-4 * max(1.0, expected.abs().max().item())
    # train's feature cache asks the engine (the same seeded model: reuse its export)
    asked = []
    monkeypatch.setattr(onnx_engine.OnnxNetwork, 'of',
                        classmethod(lambda cls, model, size: asked.append(size) or network))
    with pytest.warns(UserWarning, match='stuck at 50%'):  # one epoch of a random backbone
        main.train(**dict(options, engine='onnx'))
    assert asked == [32]
    assert "feature cache: the head's input for 56 training" in capsys.readouterr().out


OPTIONS = ['--checkpoint_dir={checkpoints}', '--image_size=32', '--num_workers=0']


@pytest.mark.parametrize('argv,message', [
    (['predict', '--model=SmallResNet'], 'predict needs at least one photo, folder or glob'),
    (['predict', 'missing.jpg', '--model=SmallResNet'], "'missing.jpg': no such file or folder"),
    (['predict', '{empty}', '--model=SmallResNet'], 'no images in folder'),
    (['predict', '{photo}', '--load_model_path={not_onnx}'], 'is not an ONNX model'),
    (['predict', '{photo}', '--model=ResNet34', '--load_model_path={checkpoint}'],
     'holds a SmallResNet, not a ResNet34: pass --model=SmallResNet'),
    (['predict', '{hostile}', '--model=SmallResNet'],
     'none of the 1 file(s) could be read as an image'),
    (['test', 'stray', '--model=SmallResNet'], "unexpected argument 'stray'"),
])
def test_bad_input_is_a_one_line_error(trained, striped_data, tmp_path, capsys, argv, message):
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'empty' / 'readme.txt').write_text('no photos here')
    (tmp_path / 'model.onnx').write_text('not a model')
    (tmp_path / 'cat.jpg').write_bytes(b'%!PS-Adobe-3.0\n')  # PostScript named .jpg
    names = dict(empty=tmp_path / 'empty', not_onnx=tmp_path / 'model.onnx',
                 photo=os.path.join(striped_data['test'], '1.jpg'), hostile=tmp_path / 'cat.jpg',
                 checkpoints=trained['checkpoint_dir'],
                 checkpoint=os.path.join(trained['checkpoint_dir'], 'SmallResNet_best.pth'))
    with pytest.raises(SystemExit) as stopped:
        main.run([a.format(**names) for a in argv + OPTIONS])
    assert stopped.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith('error:')]
    assert len(errors) == 1 and message in errors[0], errors


def test_flip_tta_is_mirror_invariant_and_evaluates_like_plain(fast_options):
    """--tta=flip averages an image's and its mirror image's probabilities: a mirrored
    photo gets the same answer, and on the generated stripes (mirror-symmetric classes)
    val stays as good as without it."""
    from engine.tta import FlipAverage
    main.train(**dict(fast_options, max_epoch=4, batch_size=8, lr=2e-3, bf16=False))
    model = SmallResNet()
    model.load(os.path.join(fast_options['checkpoint_dir'], 'SmallResNet_best.pth'))
    network = FlipAverage(model.eval())
    images = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(network(images), network(images.flip(-1)), atol=1e-5)
        assert torch.allclose(network(images).exp().sum(1), torch.ones(4), atol=1e-5)
    plain = main.val(**dict(fast_options, bf16=False))
    flipped = main.val(**dict(fast_options, bf16=False, tta='flip'))
    assert flipped.total == plain.total and flipped.accuracy_cm >= plain.accuracy_cm - 100 / 24
    with pytest.raises(ConfigError, match="--tta must be one of none, flip, not 'five'"):
        config.parse(dict(fast_options, tta='five'), verbose=False)
