"""How tensors compute: on which device, in which memory format, at which precision."""
import os
import platform
import shutil
import warnings

import torch
from torch import nn

from utils.errors import UserError


def to_device(x, opt):
    """A model or a batch of images onto opt.device, channels-last when --channels_last:
    convolutions run 1.1-1.2x faster that way (bench/run.py), with the same results."""
    if opt.channels_last and (isinstance(x, nn.Module) or x.dim() == 4):
        return x.to(opt.device, memory_format=torch.channels_last, non_blocking=True)
    return x.to(opt.device, non_blocking=True)


def autocast(opt):
    """Forward passes in bfloat16 when --bf16 (weights, optimizer and loss stay fp32).
    On CPUs with AMX or AVX512-BF16, and on GPUs since Ampere, convolutions then run
    2-4x faster (bench/run.py); the numbers differ from fp32 in the third digit."""
    return torch.autocast(opt.device.type, dtype=torch.bfloat16, enabled=opt.bf16)


def forward(model, images, opt):
    """model(images) on opt.device, under --bf16's autocast; the scores come back fp32."""
    with autocast(opt):
        return model(to_device(images, opt)).float()


def check_bf16(device):
    """Warn when --bf16 would be emulated, i.e. slower than fp32, on this device."""
    if device.type == 'cuda':
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    else:  # AMX or AVX512-BF16 (x86); Arm CPUs with BF16 report through oneDNN
        native = (torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
                  or (platform.machine() in ('aarch64', 'arm64')
                      and torch.ops.mkldnn._is_mkldnn_bf16_supported()))
    if not native:
        warnings.warn(f'--bf16: this {device.type.upper()} has no native bfloat16 support, so '
                      f'it would run slower than fp32; drop --bf16')


def check_compile(device):
    """--compile on a CPU builds C++ kernels: fail now, not at the first batch, without
    a compiler."""
    compilers = [os.environ.get('CXX'), 'g++', 'c++', 'clang++']
    if device.type == 'cpu' and not any(c and shutil.which(c) for c in compilers):
        raise UserError('--compile on a CPU needs a C++ compiler (g++ or clang++) and none was '
                        'found: install one (Debian/Ubuntu: apt-get install g++) or drop --compile')
