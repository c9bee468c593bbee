"""torchrun with 2 CPU processes (gloo): same results as one process, one set of files."""
import ast
import csv
import os
import subprocess
import sys

import pytest
import torch

import main
from conftest import ROOT

TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']


def run(args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    result = subprocess.run(TORCHRUN + ['main.py', *args], cwd=ROOT, env=env, timeout=timeout,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_two_processes_train_and_test_like_one(fast_options, tmp_path):
    options = dict(fast_options, max_epoch=6, batch_size=4, lr=2e-3,
                   checkpoint_dir=str(tmp_path / 'ddp'), result_file=str(tmp_path / 'ddp.csv'))
    out = run(['train'] + [f'--{k}={v}' for k, v in options.items()])
    assert 'on 2 processes' in out
    epoch_lines = [line for line in out.splitlines() if line.startswith('epoch:')]
    assert len(epoch_lines) == 6  # printed once, by rank 0
    files = sorted(os.listdir(options['checkpoint_dir']))
    assert [f for f in files if f.endswith('.pth')] == ['SmallResNet_best.pth', 'SmallResNet_last.pth']
    checkpoint = torch.load(os.path.join(options['checkpoint_dir'], 'SmallResNet_last.pth'),
                            weights_only=True)
    assert checkpoint['epoch'] == 6
    # the reduced validation matrix counts each of the 24 validation images exactly once
    val_cm = ast.literal_eval(epoch_lines[-1].split('val_cm:')[1].split(', train_acc')[0])
    assert sum(map(sum, val_cm)) == 24

    single = main.train(**dict(options, checkpoint_dir=str(tmp_path / 'one')))
    ddp_best = checkpoint['best_val_acc']
    assert abs(ddp_best - single.best_val_acc) <= 25.0
    assert ddp_best >= 75.0

    run(['test'] + [f'--{k}={v}' for k, v in options.items()])
    with open(options['result_file']) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ['id', 'label']
    assert [int(r[0]) for r in rows[1:]] == list(range(1, 21))  # one ordered CSV, every image
