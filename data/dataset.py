"""The Kaggle Dogs vs. Cats images as a PyTorch Dataset.

Two layouts are understood for labelled data:
    root/cat.0.jpg, root/dog.0.jpg, ...   (Kaggle's train/, label from the file name)
    root/cat/*.jpg, root/dog/*.jpg         (one folder per class, label from the folder)
and for test data the Kaggle test1/ folder: root/1.jpg, root/2.jpg, ...
"""
import functools
import itertools
import os
import re
import signal
import warnings
from collections import defaultdict, namedtuple
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import torch
from PIL import Image
from torch.utils import data
from torchvision import transforms as T

from data.preload import decode_in_processes
from utils import distributed
from utils.progress import Progress
from utils.errors import UserError

CLASSES = ('cat', 'dog')  # label 0 = cat, 1 = dog
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff')
# The only decoders PIL may use, whatever a file's name says: a PostScript file named
# cat.1.jpg must not reach Ghostscript, nor a DDS one a decoder that raises
# NotImplementedError.
IMAGE_FORMATS = ('JPEG', 'PNG', 'BMP', 'GIF', 'WEBP', 'TIFF')
INT64_MAX = 2 ** 63 - 1  # test ids end up in a torch int64 tensor
LABELLED_NAME = re.compile(r'^(cat|dog)\.\d+\.[A-Za-z]+$', re.IGNORECASE)
TEST_NAME = re.compile(r'^(\d+)\.[A-Za-z]+$')

GET_DATA_HINT = ('Download the Kaggle "Dogs vs. Cats" data '
                 '(https://www.kaggle.com/c/dogs-vs-cats/data), unzip train.zip and test1.zip '
                 'into ./data/ (or pass --train_data_root / --test_data_root), '
                 'or try `python main.py demo` on generated images.')

# A sample that could not be decoded: the collate function drops it and reports it.
Skipped = namedtuple('Skipped', 'path reason')


class DataError(UserError):
    pass


def visible_files(root):
    """Names in root, without hidden files such as .DS_Store."""
    if not os.path.isdir(root):
        raise DataError(f'data folder {root!r} does not exist. {GET_DATA_HINT}')
    names = sorted(n for n in os.listdir(root) if not n.startswith('.'))
    if not names:
        raise DataError(f'data folder {root!r} is empty. {GET_DATA_HINT}')
    return names


def list_labelled_images(root):
    """[(path, label)] for the Kaggle train layout or the cat/ dog/ folder layout."""
    names = visible_files(root)
    if any(os.path.isdir(os.path.join(root, c)) for c in CLASSES):
        return list_class_folders(root, names)
    bad = [n for n in names if not LABELLED_NAME.match(n)]
    if bad:
        raise DataError(
            f'{len(bad)} file(s) in {root!r} are not named like cat.N.jpg / dog.N.jpg '
            f'(and there are no cat/ and dog/ subfolders): {", ".join(bad[:5])}'
            f'{" ..." if len(bad) > 5 else ""}. Rename or remove them, or sort the images '
            f'into {root}/cat/ and {root}/dog/.')
    return [(os.path.join(root, n), CLASSES.index(n.split('.')[0].lower())) for n in names]


def list_class_folders(root, names):
    """[(path, label)] from root/cat/ and root/dog/, with one warning listing what else
    is there: a bird/ folder or a cat/persian/ subfolder is not silently left out."""
    samples, ignored = [], []  # ignored: (name, why), folder names ending in /
    for n in names:
        if not os.path.isdir(os.path.join(root, n)):
            ignored.append((n, 'not in cat/ or dog/'))
        elif n not in CLASSES:
            ignored.append((f'{n}/', 'not cat/ or dog/'))
    for label, name in enumerate(CLASSES):
        folder = os.path.join(root, name)
        if not os.path.isdir(folder):
            continue
        for f in visible_files(folder):
            path = os.path.join(folder, f)
            if os.path.isdir(path):
                ignored.append((f'{name}/{f}/', f'a folder inside {name}/: not searched'))
            elif not f.lower().endswith(IMAGE_EXTENSIONS):
                ignored.append((f'{name}/{f}', 'not an image file name'))
            else:
                samples.append((path, label))
    if ignored:
        folders = sum(n.endswith('/') for n, _ in ignored)
        listed = ', '.join(f'{n} ({why})' for n, why in ignored[:8])
        listed += ' ...' if len(ignored) > 8 else ''
        warnings.warn(f'ignored {len(ignored)} entries in {root} ({folders} folder(s), '
                      f'{len(ignored) - folders} file(s)): {listed}. '
                      f'Only image files ({" ".join(IMAGE_EXTENSIONS)}) directly in cat/ and '
                      f'dog/ are read.')
    return samples


def list_test_images(root):
    """[(path, id)] for the Kaggle test1 layout, sorted by the numeric id."""
    names = visible_files(root)
    bad = [n for n in names if not TEST_NAME.match(n)]
    if bad:
        raise DataError(f'{len(bad)} file(s) in {root!r} are not named like N.jpg '
                        f'(N = the Kaggle image id): {", ".join(bad[:5])}'
                        f'{" ..." if len(bad) > 5 else ""}. Rename or remove them.')
    by_id = defaultdict(list)
    for n in names:
        by_id[int(TEST_NAME.match(n).group(1))].append(n)
    too_big = sorted(n for image_id, group in by_id.items() if image_id > INT64_MAX for n in group)
    if too_big:
        raise DataError(f'{", ".join(too_big[:5])} in {root!r}: the id does not fit in a 64-bit '
                        f'integer (at most {INT64_MAX}). Rename the file(s).')
    clashes = [group for group in by_id.values() if len(group) > 1]
    if clashes:
        raise DataError(f'{len(clashes)} id(s) in {root!r} belong to more than one file: '
                        f'{"; ".join(", ".join(group) for group in clashes[:5])}'
                        f'{" ..." if len(clashes) > 5 else ""}. result.csv needs one row per id: '
                        f'rename or remove the extra files.')
    return [(os.path.join(root, group[0]), image_id) for image_id, group in sorted(by_id.items())]


def split_train_val(samples, val_ratio, seed):
    """Seeded, stratified split: each class is shuffled and `val_ratio` of it held out.

    The same seed gives the same split on every run and every process.
    """
    rng = np.random.RandomState(seed)
    train, val = [], []
    for label in range(len(CLASSES)):
        members = sorted(s for s in samples if s[1] == label)
        members = [members[i] for i in rng.permutation(len(members))]
        n_val = int(round(len(members) * val_ratio))
        val += members[:n_val]
        train += members[n_val:]
    return train, val


def normalization(mean, std):
    """The model's own input constants (model.input_mean/input_std); with None the
    pixels stay in [0, 1]."""
    return [] if mean is None else [T.Normalize(mean=mean, std=std)]


def default_transforms(mode, image_size, mean=None, std=None, augment=True):
    """Resize and normalise with the model's own constants; for training, random crops
    and flips (augment=True), flips only ('flip') or neither (False)."""
    if mode == 'train' and augment is True:
        steps = [T.Resize(image_size), T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()]
    else:
        steps = [T.Resize(image_size), T.CenterCrop(image_size)]
        if mode == 'train' and augment == 'flip':
            steps.append(T.RandomHorizontalFlip())
    return T.Compose(steps + [T.ToTensor()] + normalization(mean, std))


def random_crops(mode, augment):
    return mode == 'train' and augment is True


def preloaded_transforms(mode, image_size, mean=None, std=None, augment=True):
    """For images already decoded to uint8 tensors (preload_sizes): random crop and flip
    on the small uint8 tensor (cheap), then float and normalise."""
    steps = [T.RandomCrop(image_size), T.RandomHorizontalFlip()] if random_crops(mode, augment) else []
    if mode == 'train' and augment == 'flip':
        steps.append(T.RandomHorizontalFlip())
    return T.Compose(steps + [T.ConvertImageDtype(torch.float32)] + normalization(mean, std))


def preload_sizes(mode, image_size, augment=True):
    """(resize to, crop to) for --preload: each image is resized to 9/8 of image_size;
    random crops need that whole square, everything else is stored as the centre crop
    it is served as (the same pixels in 21% less memory to fault in)."""
    margin = (image_size * 9 + 7) // 8
    return margin, margin if random_crops(mode, augment) else image_size


def decode_pixels(path, resize_to, crop_to):
    """uint8 HWC numpy array of the image resized to resize_to and centre-cropped to
    crop_to, or Skipped."""
    img = load_or_skip(path)
    if isinstance(img, Skipped):
        return img
    return np.asarray(T.functional.center_crop(T.functional.resize(img, resize_to), crop_to))


def decode_small(path, resize_to, crop_to):
    """decode_pixels as a uint8 CHW tensor, or Skipped."""
    pixels = decode_pixels(path, resize_to, crop_to)
    if isinstance(pixels, Skipped):
        return pixels
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def load_or_skip(path):
    """load_rgb, or a Skipped record saying why not. Any error counts: a damaged file
    can make a decoder raise anything (NotImplementedError, struct.error, ...) and one
    file must not stop a run. Running out of memory is no file's fault: that propagates."""
    try:
        return load_rgb(path)
    except MemoryError:
        raise
    except Exception as exc:
        return Skipped(path, f'{type(exc).__name__}: {exc}')


def load_rgb(path):
    """Open any image PIL reads (grayscale, RGBA, palette, CMYK, 16-bit, float, ...) as
    RGB, with only the decoders in IMAGE_FORMATS."""
    with Image.open(path, formats=IMAGE_FORMATS) as img:
        if img.mode == 'P':  # palette images may carry transparency: go through RGBA
            img = img.convert('RGBA')
        elif img.mode.startswith('I') or img.mode == 'F':
            img = to_8bit_grey(img)
        return img.convert('RGB')


def to_8bit_grey(img):
    """A 16-bit, 32-bit integer or float grey image as mode L, scaled by its range:
    PIL's own convert clips the values to 0..255, so 16-bit images came out white and
    float ones in [0, 1] black."""
    values = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if img.mode.startswith('I;16'):
        scaled = values / 257  # 65535 -> 255
    elif img.mode == 'F' and values.min() >= 0 and values.max() <= 1:
        scaled = values * 255
    else:
        # 32-bit integers and floats beyond [0, 1] have no agreed white level (a 32-bit
        # TIFF often holds 12- or 16-bit data): stretch the image's own min..max
        low, high = values.min(), values.max()
        scaled = (values - low) * (255 / (high - low) if high > low else 0)
    return Image.fromarray(np.round(scaled).astype(np.uint8))


class DogCat(data.Dataset):
    def __init__(self, root, transforms=None, mode='train', val_ratio=0.3, seed=100,
                 image_size=224, mean=None, std=None, augment=True,
                 preload=False, num_workers=0):
        if mode not in ('train', 'val', 'test'):
            raise ValueError(f"mode must be 'train', 'val' or 'test', not {mode!r}")
        self.mode = mode
        if mode == 'test':
            self.samples = list_test_images(root)
        else:
            samples = list_labelled_images(root)
            found = {label for _, label in samples}
            if found != {0, 1}:
                only = CLASSES[found.pop()] if found else 'no'
                raise DataError(f'{root!r} holds {only} images only: training needs both '
                                f'cats and dogs. {GET_DATA_HINT}')
            train, val = split_train_val(samples, val_ratio, seed)
            self.samples = train if mode == 'train' else val
        self.cache = None
        if preload:
            self.preload_sizes = preload_sizes(mode, image_size, augment)
            self.cache = self.decode_all(num_workers)
            transforms = transforms or preloaded_transforms(mode, image_size, mean, std, augment)
        self.transforms = transforms or default_transforms(mode, image_size, mean, std, augment)

    def decode_all(self, num_workers):
        """Decode every image once, in parallel: later epochs only crop and flip. Nothing
        else runs meanwhile, so it uses every core of this rank even with --num_workers=0
        (the fastest setting for the epochs of a preloaded set on a small CPU)."""
        paths = [path for path, _ in self.samples]
        resize_to, crop_to = self.preload_sizes
        ranks_here = int(os.environ.get('LOCAL_WORLD_SIZE', 1))
        processes = max(num_workers, len(os.sched_getaffinity(0)) // ranks_here)
        if processes > 1:
            try:
                images, outcomes = decode_in_processes(
                    functools.partial(decode_pixels, resize_to=resize_to, crop_to=crop_to),
                    paths, crop_to, processes)
            except BrokenProcessPool as exc:
                raise DataError('decoding the images for --preload stopped: a decoding process '
                                'died (killed by a signal, or out of memory). Run again with '
                                '--num_workers=0 and without --preload (--preload=False): '
                                'images are then decoded as batches need them, in this '
                                'process.') from exc
            return [image if outcome is None else outcome
                    for image, outcome in zip(images, outcomes)]
        return [decode_small(path, resize_to, crop_to)
                for path in Progress(paths, 'decoding (--preload)', unit='images')]

    def __getitem__(self, index):
        """(image tensor, label) in train/val mode, (image tensor, id) in test mode."""
        path, target = self.samples[index]
        if self.cache is not None:
            image = self.cache[index]
            return image if isinstance(image, Skipped) else (self.transforms(image), target)
        img = load_or_skip(path)
        return img if isinstance(img, Skipped) else (self.transforms(img), target)

    def __len__(self):
        return len(self.samples)

    @property
    def labels(self):
        return [target for _, target in self.samples]


def collate_skipping_bad(batch):
    """Stack the good samples; return (images, targets, skipped) where skipped lists
    the files that could not be decoded. images is None when the whole batch is bad."""
    skipped = [s for s in batch if isinstance(s, Skipped)]
    good = [s for s in batch if not isinstance(s, Skipped)]
    if not good:
        return None, None, skipped
    images = torch.stack([img for img, _ in good])
    targets = torch.tensor([t for _, t in good])
    return images, targets, skipped


class EpochShuffleSampler(data.DistributedSampler):
    """A fresh seeded permutation each epoch (call set_epoch), split across torchrun
    ranks; `skip` leaves out the samples an interrupted epoch already trained on."""

    def __init__(self, dataset, seed):
        super().__init__(dataset, num_replicas=distributed.world_size(),
                         rank=distributed.rank(), shuffle=True, seed=seed)
        self.skip = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self):
        return super().__len__() - self.skip


class ShardSampler(data.Sampler):
    """Every index exactly once over all ranks, in order, without padding: the
    validation counts summed over ranks then cover each image once."""

    def __init__(self, dataset):
        self.indices = range(distributed.rank(), len(dataset), distributed.world_size())

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def ignore_sigint_in_worker(worker_id):
    """Ctrl-C reaches the whole process group: workers keep serving batches while the
    main process finishes its step and saves a checkpoint. SIGTERM keeps its default:
    the workers die, and the main process (utils/interrupt.py) saves all the same."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def build_loader(dataset, batch_size, shuffle, num_workers, use_gpu=False, seed=0):
    """A DataLoader over this rank's share: shuffled per epoch for training
    (loader.sampler.set_epoch(epoch)), in order for evaluation."""
    sampler = EpochShuffleSampler(dataset, seed) if shuffle else ShardSampler(dataset)
    return data.DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                           num_workers=num_workers, collate_fn=collate_skipping_bad,
                           pin_memory=use_gpu, persistent_workers=num_workers > 0,
                           worker_init_fn=ignore_sigint_in_worker)


class SkippedFiles:
    """Warns once per undecodable file and counts them for the end-of-run summary."""

    def __init__(self):
        self.seen = {}

    def add(self, skipped):
        for path, reason in skipped:
            if path not in self.seen:
                self.seen[path] = reason
                warnings.warn(f'skipping unreadable image {path} ({reason})')

    def summary(self):
        if self.seen:
            return f'{len(self.seen)} unreadable image(s) were skipped: {", ".join(list(self.seen)[:5])}'
        return ''
