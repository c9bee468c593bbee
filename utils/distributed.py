"""torchrun support: one process per device with PyTorch's own distributed engine.

`torchrun --nproc_per_node=N main.py train ...` sets WORLD_SIZE, RANK and LOCAL_RANK;
a plain `python main.py` is a world of one and every helper here is then a no-op.
"""
import atexit
import os

import torch
import torch.distributed as dist


def launched_by_torchrun():
    return int(os.environ.get('WORLD_SIZE', '1')) > 1


def setup(use_gpu):
    """Join the process group (nccl on GPUs, gloo on CPUs); return this rank's device."""
    if not launched_by_torchrun():
        return torch.device('cuda' if use_gpu else 'cpu')
    backend = 'nccl' if use_gpu else 'gloo'
    if not dist.is_initialized():
        dist.init_process_group(backend)
        atexit.register(cleanup)
    if backend == 'nccl':
        local_rank = int(os.environ['LOCAL_RANK'])
        torch.cuda.set_device(local_rank)
        return torch.device('cuda', local_rank)
    return torch.device('cpu')


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def is_main():
    """Only rank 0 writes checkpoints, logs, plots and the CSV."""
    return rank() == 0


def all_reduce_sum(values, device):
    """Sum a list of numbers over all ranks (identity in a single process)."""
    if not dist.is_initialized():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def any_rank(flag, device):
    """True on every rank when `flag` is true on any: keeps collective calls in step."""
    return all_reduce_sum([float(flag)], device)[0] > 0


def gather_to_main(items):
    """Concatenate every rank's list on rank 0 (other ranks get None)."""
    if not dist.is_initialized():
        return list(items)
    gathered = [None] * world_size() if is_main() else None
    dist.gather_object(list(items), gathered, dst=0)
    return [item for part in gathered for item in part] if is_main() else None


def rank_from_env():
    """This process's rank before the process group exists (0 without torchrun)."""
    return int(os.environ.get('RANK', '0'))
