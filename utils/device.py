"""How tensors compute: on which device, in which memory format, at which precision."""
import ctypes
import ctypes.util
import os
import platform
import shutil
import warnings

import torch
from torch import nn

from utils.errors import UserError


class Placement:
    """Where and how a run computes: the device, the memory format (channels-last
    convolutions run 1.1-1.2x faster, bench/run.py, with the same results) and the
    precision (bfloat16 autocast: weights, optimizer and loss stay fp32; on CPUs with
    AMX or AVX512-BF16 and on GPUs since Ampere convolutions run 2-4x faster, and the
    numbers differ from fp32 in the third digit)."""

    def __init__(self, device, channels_last=True, bf16=False):
        self.device, self.channels_last, self.bf16 = torch.device(device), channels_last, bf16

    def place(self, x):
        """A model or a tensor onto the device, channels-last for models and image batches."""
        if self.channels_last and (isinstance(x, nn.Module) or x.dim() == 4):
            return x.to(self.device, memory_format=torch.channels_last, non_blocking=True)
        return x.to(self.device, non_blocking=True)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def forward(self, model, images):
        """model(images) on the device, under the autocast; the scores come back fp32."""
        with self.autocast():
            return model(self.place(images)).float()


def keep_freed_memory():
    """Tell glibc's malloc to keep freed memory for reuse. By default it hands every
    block above 32 MB (a batch of activations at 224 px is 50 MB) to mmap and back to
    the kernel when freed, so each operation page-faults its output in afresh: that
    cost 20-45% of the CPU time in kernel mode and halved inference speed on a 2-core
    AVX2 machine (bench/RESULTS.md). The price: the process keeps its peak memory.
    No-op where the C library has no mallopt (macOS, Windows, musl)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c'))
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    m_mmap_max, m_trim_threshold = -4, -1  # from glibc's malloc.h
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 1 << 30))


def bf16_native(device):
    """True when bfloat16 runs in hardware here: GPUs since Ampere; CPUs with AMX or
    AVX512-BF16 (x86), unless ONEDNN_MAX_CPU_ISA keeps oneDNN below them, or Arm
    CPUs with BF16. Elsewhere bf16 is emulated and slower than fp32."""
    if device.type == 'cuda':
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if platform.machine() in ('aarch64', 'arm64'):
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    isa = os.environ.get('ONEDNN_MAX_CPU_ISA', 'ALL').upper()
    if isa != 'ALL' and 'BF16' not in isa and 'AMX' not in isa:
        return False
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


def resolve_bf16(bf16, device):
    """--bf16=auto: on where native; an explicit --bf16=True on emulating hardware warns."""
    if bf16 == 'auto':
        return bf16_native(device)
    if bf16 and not bf16_native(device):
        warnings.warn(f'--bf16: this {device.type.upper()} has no native bfloat16 support, so '
                      f'it runs slower than fp32; use --bf16=auto or --bf16=False')
    return bf16


def check_compile(device):
    """--compile on a CPU builds C++ kernels: fail now, not at the first batch, without
    a compiler."""
    compilers = [os.environ.get('CXX'), 'g++', 'c++', 'clang++']
    if device.type == 'cpu' and not any(c and shutil.which(c) for c in compilers):
        raise UserError('--compile on a CPU needs a C++ compiler (g++ or clang++) and none was '
                        'found: install one (Debian/Ubuntu: apt-get install g++) or drop --compile')
