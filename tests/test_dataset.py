import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from models.basic_module import IMAGENET_MEAN, IMAGENET_STD
from data.dataset import (DataError, DogCat, SkippedFiles, build_loader, list_labelled_images,
                          split_train_val)
from data.synthetic import make_labelled_images, make_test_images


def labelled_paths(dataset):
    return {os.path.basename(path) for path, _ in dataset.samples}


def test_split_is_seeded_disjoint_and_stratified(striped_data):
    train = DogCat(striped_data['train'], mode='train', val_ratio=0.25, seed=7)
    val = DogCat(striped_data['train'], mode='val', val_ratio=0.25, seed=7)
    again = DogCat(striped_data['train'], mode='val', val_ratio=0.25, seed=7)
    other_seed = DogCat(striped_data['train'], mode='val', val_ratio=0.25, seed=8)
    assert labelled_paths(val) == labelled_paths(again)
    assert labelled_paths(val) != labelled_paths(other_seed)
    assert not labelled_paths(train) & labelled_paths(val)
    assert len(train) + len(val) == 80
    assert sorted(val.labels).count(0) == sorted(val.labels).count(1) == 10
    # a random permutation, not the book's sorted slice of the first names
    assert labelled_paths(val) != {f'{c}.{i}.jpg' for c in ('cat', 'dog') for i in range(10)}


def test_split_keeps_both_classes_when_unbalanced():
    samples = [(f'cat.{i}.jpg', 0) for i in range(30)] + [(f'dog.{i}.jpg', 1) for i in range(5)]
    train, val = split_train_val(samples, 0.3, seed=100)
    assert {label for _, label in val} == {0, 1} == {label for _, label in train}


def test_labels_from_file_names_and_from_folders(tmp_path):
    make_labelled_images(str(tmp_path / 'kaggle'), 3, size=16)
    make_labelled_images(str(tmp_path / 'folders'), 3, size=16, layout='folders')
    for root in ('kaggle', 'folders'):
        samples = list_labelled_images(str(tmp_path / root))
        assert len(samples) == 6
        for path, label in samples:
            assert label == (1 if 'dog' in path else 0)


def test_test_mode_returns_ids_sorted_numerically(tmp_path):
    make_test_images(str(tmp_path), 12, size=16)
    dataset = DogCat(str(tmp_path), mode='test', image_size=16)
    assert [image_id for _, image_id in dataset.samples] == list(range(1, 13))
    image, image_id = dataset[0]
    assert image_id == 1 and image.shape == (3, 16, 16)


@pytest.mark.parametrize('mode', ['L', 'RGBA', 'P', 'CMYK', 'I;16', '1'])
def test_every_image_mode_becomes_rgb(tmp_path, mode):
    make_labelled_images(str(tmp_path), 2, size=16)
    rgb = Image.open(tmp_path / 'cat.0.jpg')
    odd = rgb.convert('L').convert(mode) if mode in ('I;16', '1') else rgb.convert(mode)
    fmt = 'JPEG' if mode in ('L', 'CMYK') else 'PNG'
    odd.save(tmp_path / 'cat.0.jpg', format=fmt)
    dataset = DogCat(str(tmp_path), mode='train', val_ratio=0.5, image_size=16)
    for index in range(len(dataset)):
        image, _ = dataset[index]
        assert image.shape == (3, 16, 16)


def test_unreadable_files_are_skipped_with_one_warning_each(tmp_path):
    make_labelled_images(str(tmp_path), 6, size=16)
    (tmp_path / 'cat.0.jpg').write_bytes(b'')  # zero bytes
    (tmp_path / 'dog.0.jpg').write_text('not an image')
    data = (tmp_path / 'cat.1.jpg').read_bytes()
    (tmp_path / 'cat.1.jpg').write_bytes(data[:len(data) // 2])  # truncated
    dataset = DogCat(str(tmp_path), mode='train', val_ratio=0.01, image_size=16)
    loader = build_loader(dataset, batch_size=4, shuffle=False, num_workers=0)
    skipped = SkippedFiles()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        seen = 0
        for _ in range(2):  # two epochs: still one warning per file
            for images, targets, bad in loader:
                skipped.add(bad)
                seen += 0 if images is None else len(images)
    bad_names = {'cat.0.jpg', 'dog.0.jpg', 'cat.1.jpg'}
    assert seen == 2 * (len(dataset) - 3)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 3
    assert {m.split('skipping unreadable image ')[1].split(' ')[0].rsplit('/', 1)[1] for m in messages} == bad_names
    assert skipped.summary().startswith('3 unreadable image(s) were skipped')


def test_missing_or_empty_folder_explains_how_to_get_data(tmp_path):
    with pytest.raises(DataError, match=f'{tmp_path / "nope"}.*does not exist.*kaggle'):
        DogCat(str(tmp_path / 'nope'))
    (tmp_path / 'empty').mkdir()
    with pytest.raises(DataError, match='is empty'):
        DogCat(str(tmp_path / 'empty'))


def test_misnamed_files_are_listed(tmp_path):
    make_labelled_images(str(tmp_path), 2, size=16)
    for name in ('bird.1.jpg', 'cat.jpg', 'dog.x.jpg'):
        (tmp_path / name).write_bytes(b'x')
    with pytest.raises(DataError, match=r'3 file\(s\).*named like cat.N.jpg.*bird.1.jpg, cat.jpg, dog.x.jpg'):
        DogCat(str(tmp_path))


def test_one_class_only_is_an_error(tmp_path):
    make_labelled_images(str(tmp_path), 3, size=16)
    for name in os.listdir(tmp_path):
        if name.startswith('dog'):
            os.remove(tmp_path / name)
    with pytest.raises(DataError, match='cat images only'):
        DogCat(str(tmp_path))


def test_train_transforms_normalise_with_imagenet_statistics(striped_data):
    dataset = DogCat(striped_data['train'], mode='val', image_size=32,
                     mean=IMAGENET_MEAN, std=IMAGENET_STD)
    batch = torch.stack([dataset[i][0] for i in range(len(dataset))])
    assert batch.min() < -0.5 and batch.max() > 0.5  # not raw 0-255, not plain [0, 1]
    assert abs(float(batch.mean())) < 1.0 and np.isfinite(batch.numpy()).all()


def test_folder_layout_warns_once_about_what_it_leaves_out(tmp_path):
    make_labelled_images(str(tmp_path), 2, size=16, layout='folders')
    (tmp_path / 'bird').mkdir()
    (tmp_path / 'bird' / '0.jpg').write_bytes((tmp_path / 'cat' / '0.jpg').read_bytes())
    (tmp_path / 'cat' / 'persian').mkdir()
    (tmp_path / 'cat' / 'persian' / '0.jpg').write_bytes((tmp_path / 'cat' / '0.jpg').read_bytes())
    (tmp_path / 'notes.txt').write_text('where the photos came from')
    (tmp_path / 'dog' / 'Thumbs.db').write_bytes(b'\0')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        samples = list_labelled_images(str(tmp_path))
    assert len(samples) == 4 and all(p.endswith('.jpg') and 'persian' not in p for p, _ in samples)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert message.startswith(f'ignored 4 entries in {tmp_path} (2 folder(s), 2 file(s)): ')
    for entry in ('bird/ (not cat/ or dog/)', 'notes.txt (not in cat/ or dog/)',
                  'cat/persian/ (a folder inside cat/: not searched)',
                  'dog/Thumbs.db (not an image file name)'):
        assert entry in message


def test_a_clean_folder_layout_warns_nothing(tmp_path):
    make_labelled_images(str(tmp_path), 2, size=16, layout='folders')
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert len(list_labelled_images(str(tmp_path))) == 4


def test_test_images_sharing_an_id_are_an_error_naming_them(tmp_path):
    make_test_images(str(tmp_path), 3, size=16)
    (tmp_path / '01.jpg').write_bytes((tmp_path / '1.jpg').read_bytes())
    (tmp_path / '1.png').write_bytes((tmp_path / '1.jpg').read_bytes())
    with pytest.raises(DataError, match=r'1 id\(s\) .* more than one file: 01.jpg, 1.jpg, 1.png\. '
                                        r'result.csv needs one row per id'):
        DogCat(str(tmp_path), mode='test', image_size=16)


def test_a_test_id_too_big_for_int64_is_an_error_naming_the_file(tmp_path):
    make_test_images(str(tmp_path), 2, size=16)
    (tmp_path / '99999999999999999999.jpg').write_bytes((tmp_path / '1.jpg').read_bytes())
    with pytest.raises(DataError, match='99999999999999999999.jpg in .*does not fit in a 64-bit'):
        DogCat(str(tmp_path), mode='test', image_size=16)
    # the largest id that fits still loads, and still fits a batch's id tensor
    os.rename(tmp_path / '99999999999999999999.jpg', tmp_path / f'{2 ** 63 - 1}.jpg')
    dataset = DogCat(str(tmp_path), mode='test', image_size=16)
    ids = [batch[1] for batch in build_loader(dataset, batch_size=4, shuffle=False, num_workers=0)]
    assert ids[0].tolist() == [1, 2, 2 ** 63 - 1]
