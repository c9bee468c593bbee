import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data.synthetic import make_labelled_images, make_test_images  # noqa: E402

from bench.shared import SHARED_DATA  # noqa: E402  (one definition, with the benches)


@pytest.fixture(scope='session')
def striped_data(tmp_path_factory):
    """A generated Kaggle-style set: train/ (40 cats, 40 dogs) and test1/ (20 images)."""
    root = tmp_path_factory.mktemp('striped')
    make_labelled_images(str(root / 'train'), n_per_class=40, size=48, seed=0)
    truth = make_test_images(str(root / 'test1'), n=20, size=48, seed=1)
    return {'train': str(root / 'train'), 'test': str(root / 'test1'), 'truth': truth}


@pytest.fixture
def fast_options(tmp_path, striped_data):
    """Options for a quick from-scratch run on the generated set (no Visdom)."""
    return dict(train_data_root=striped_data['train'], test_data_root=striped_data['test'],
                model='SmallResNet', image_size=32, batch_size=16, max_epoch=1, num_workers=0,
                vis=False, checkpoint_dir=str(tmp_path / 'checkpoints'),
                result_file=str(tmp_path / 'result.csv'), debug_file=str(tmp_path / 'no_debug'))


@pytest.fixture(scope='session')
def shared_train():
    """../shared/data/dogcat/train, or a clean skip when it is absent."""
    path = os.path.join(SHARED_DATA, 'train')
    if not os.path.isdir(path):
        pytest.skip(f'shared Kaggle images not found at {path}')
    return path
