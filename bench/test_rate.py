"""`python main.py test` on a Kaggle-sized test folder: 12,500 photos, the whole command.

    .venv/bin/python bench/test_rate.py [--images=12500] [--model=EfficientNetLite0] [--size=224]

The shared set holds 1,000 test photos, so the folder is made of links to shared
training photos named 1.jpg ... N.jpg (test reads any N.jpg the same way). The
network is the ImageNet backbone with a fresh 2-class head, saved as the checkpoint
test loads; --engine=auto picks torch or ONNX Runtime as it would for a user.
Prints the wall time, img/s and the CPU time's kernel (sys) share.
"""
import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import main  # noqa: E402
from bench.phases import Timer  # noqa: E402
from bench.shared import SHARED_TRAIN  # noqa: E402
from models import build_model  # noqa: E402


def link_test_folder(folder, count):
    os.makedirs(folder)
    names = sorted(os.listdir(SHARED_TRAIN))[:count]
    for i, name in enumerate(names, start=1):
        os.symlink(os.path.join(SHARED_TRAIN, name), os.path.join(folder, f'{i}.jpg'))
    return folder


def main_cli():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--images', type=int, default=12500)
    parser.add_argument('--model', default='EfficientNetLite0')
    parser.add_argument('--size', type=int, default=224)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = link_test_folder(os.path.join(tmp, 'test1'), args.images)
        torch.manual_seed(0)
        path = build_model(args.model).save(os.path.join(tmp, f'{args.model}_best.pth'))
        with Timer() as timer:
            rows = main.test(model=args.model, image_size=args.size, load_model_path=path,
                             test_data_root=folder, checkpoint_dir=tmp,
                             result_file=os.path.join(tmp, 'result.csv'))
    isa = os.environ.get('ONEDNN_MAX_CPU_ISA', 'native')
    print(f'test, {args.model} {args.size} px, {len(rows)} photos, ISA {isa}: '
          f'{timer.seconds / 60:.1f} min, {len(rows) / timer.seconds:.1f} img/s, '
          f'sys {100 * timer.sys_share:.0f}% of CPU time')


if __name__ == '__main__':
    main_cli()
