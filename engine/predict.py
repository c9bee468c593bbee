"""After training: `predict` any photos, `export` the network to ONNX.

predict reads images as training does (data.dataset's load_or_skip: only the decoders
in IMAGE_FORMATS, one reason per file it cannot read) and transforms them as `test`
does, so its probabilities are test's. The network runs per --engine
(engine/onnx_engine.py); a .onnx file runs in ONNX Runtime without building the torch
model, its input contract read from the file's metadata.
"""
import csv
import glob
import os
import re

import torch
from torch.utils import data

from data.dataset import (CLASSES, IMAGE_EXTENSIONS, Skipped, SkippedFiles,
                          collate_skipping_bad, default_transforms, load_or_skip)
from engine import builder, onnx_engine
from engine.tta import with_tta
from utils import checkpoint
from utils.errors import UserError
from utils.progress import Progress

USAGE = 'python main.py predict PHOTO|FOLDER|"GLOB" [...] [--load_model_path=...]'


def natural_key(path):
    """cat.2.jpg before cat.10.jpg."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r'(\d+)', path)]


def folder_images(folder):
    """(image files under folder, recursively, in natural order; Skipped records of the
    other files), hidden files and folders left out."""
    images, others = [], []
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith('.')]
        for name in names:
            if name.startswith('.'):
                continue
            path = os.path.join(root, name)
            if name.lower().endswith(IMAGE_EXTENSIONS):
                images.append(path)
            else:
                others.append(Skipped(path, 'not an image file name (.jpg, .png, ...)'))
    return sorted(images, key=natural_key), others


def list_images(paths):
    """The files that `paths` (files, folders, globs) name, in the order given, each once;
    and the Skipped records of the non-image files found in folders. A missing path, a
    glob matching nothing or a folder without images is an error."""
    if not paths:
        raise UserError(f'predict needs at least one photo, folder or glob: {USAGE}')
    files, others = [], []
    for raw in paths:
        path = str(raw)  # fire turns a name like 12 into an int
        if os.path.isfile(path):
            files.append(path)
        elif os.path.isdir(path):
            found, ignored = folder_images(path)
            if not found:
                raise UserError(f'no images in folder {path!r} (predict reads files ending in '
                                f'{" ".join(IMAGE_EXTENSIONS)})')
            files += found
            others += ignored
        elif any(c in path for c in '*?['):
            matches = sorted(glob.glob(path, recursive=True), key=natural_key)
            if not matches:
                raise UserError(f'{path!r} matches no file')
            for match in matches:
                found, ignored = folder_images(match) if os.path.isdir(match) else ([match], [])
                files += found
                others += ignored
        else:
            hint = '' if isinstance(raw, str) else ' (read as a number: write it as ./NAME)'
            raise UserError(f'{path!r}: no such file or folder{hint}')
    return list(dict.fromkeys(files)), others


class Photos(data.Dataset):
    """The listed files, in order, served as DogCat serves test images: (tensor, index),
    or Skipped with the reason."""

    def __init__(self, files, transforms):
        self.files, self.transforms = files, transforms

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        img = load_or_skip(self.files[index])
        return img if isinstance(img, Skipped) else (self.transforms(img), index)


def is_onnx(path):
    return bool(path) and str(path).lower().endswith('.onnx')


def predictor(opt, count):
    """(network, placement, image size, mean, std): an exported .onnx file as it is, or
    the checkpoint's model on the engine --engine picks for `count` images."""
    where = builder.placement(opt)
    if is_onnx(opt.load_model_path):
        if opt.engine == 'torch':
            raise UserError(f'{opt.load_model_path} is an ONNX model: it runs with --engine=onnx '
                            f'(or auto); --engine=torch needs a .pth checkpoint')
        if not os.path.isfile(opt.load_model_path):
            raise UserError(f'{opt.load_model_path!r}: no such file')
        network = onnx_engine.OnnxNetwork(opt.load_model_path)
        print(f'{opt.load_model_path}: {network.model_name} on {network.image_size} px images, '
              f'in ONNX Runtime')
        return (with_tta(network, opt.tta), where, network.image_size, network.input_mean,
                network.input_std)
    model = builder.network(opt, where, trained=True).eval()
    network = with_tta(onnx_engine.choose(opt, model, where, count), opt.tta)
    return network, where, opt.image_size, model.input_mean, model.input_std


@torch.inference_mode()
def predict(opt, paths, csv_path=None):
    """Print `path<TAB>P(dog)<TAB>cat|dog` per readable image, in the order given; write
    them to csv_path when given. Returns [(path, P(dog))]."""
    files, others = list_images(paths)
    network, where, size, mean, std = predictor(opt, len(files))
    loader = data.DataLoader(Photos(files, default_transforms('test', size, mean, std)),
                             batch_size=opt.batch_size, num_workers=opt.num_workers,
                             collate_fn=collate_skipping_bad)
    skipped = SkippedFiles()
    skipped.add(others)
    rows = []
    for images, indices, bad in Progress(loader, 'predict'):
        skipped.add(bad)
        if images is not None:
            dog = torch.softmax(where.forward(network, images), dim=1)[:, 1]
            rows += [(files[i], p) for i, p in zip(indices.tolist(), dog.cpu().tolist())]
    if not rows:
        raise UserError(f'none of the {len(files)} file(s) could be read as an image '
                        f'(reasons in the warnings above)')
    for path, p in rows:
        print(f'{path}\t{p:.6f}\t{CLASSES[int(p > 0.5)]}')
    if csv_path:
        write_predictions(csv_path, rows)
        print(f'wrote {len(rows)} predictions to {csv_path}')
    if skipped.summary():
        print(f'{skipped.summary()}: they have no line above')
    return rows


def write_predictions(path, rows):
    tmp = f'{path}.tmp'
    with open(tmp, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['path', 'p_dog', 'class'])
        writer.writerows((file, f'{p:.6f}', CLASSES[int(p > 0.5)]) for file, p in rows)
    os.replace(tmp, path)


def export(opt, path=None):
    """Write the trained network (--load_model_path, else the --select checkpoint) to
    <checkpoint_dir>/<model>.onnx; returns the path."""
    opt.load_model_path = checkpoint.to_evaluate(opt.load_model_path, opt.checkpoint_dir,
                                                 opt.model, opt.select)
    model = builder.network(opt, builder.placement(opt), trained=True)
    path = path or os.path.join(opt.checkpoint_dir, f'{model.model_name}.onnx')
    onnx_engine.export_file(model, opt.image_size, path, source=opt.load_model_path)
    print(f'wrote {path}: {model.model_name}, input {onnx_engine.INPUT!r} float32 '
          f'[batch, 3, {opt.image_size}, {opt.image_size}] (RGB, scaled to [0, 1], then '
          f'(x - {list(model.input_mean)}) / {list(model.input_std)}); outputs '
          f'{"logits [batch, 2], features" if model.head() is not None else "logits [batch, 2]"}')
    return path
