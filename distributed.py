"""Data-parallel training over the processes torchrun starts; without torchrun, one process as before.

    torchrun --standalone --nproc_per_node 4 unlearn.py --forget-class 3        # 4 GPUs of one machine
    torchrun --standalone --nproc_per_node 2 train.py --device cpu ...          # 2 CPU processes (gloo)
    torchrun --nnodes 2 --node_rank R --rdzv-backend c10d --rdzv-endpoint HOST:29500 --nproc_per_node 8 ...

Every process loads the whole dataset and runs the whole script. At each training step every process
draws and augments the same global batch (--batch-size, as in one process, with the same seeded
generator) and takes its share by index; DistributedDataParallel averages the gradients over the
processes, so a step is one process's step over the global batch, and the learning rate stays as it is.
BatchNorm in train mode uses each process's share (PyTorch's default: SyncBatchNorm needs CUDA and a
collective per layer and step); with frozen BatchNorm (PruneLoRA's and LoRA's default) a step equals
one process's up to float rounding. Evaluation runs in every process (identical models, identical
results, no collective); only rank 0 prints and writes files.
"""
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def start(device):
    """Join torchrun's process group where torchrun started this process; returns the device to use
    (cuda:LOCAL_RANK on GPUs). Ranks above 0 print nothing on stdout."""
    if "RANK" not in os.environ or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if not is_main():
        sys.stdout = open(os.devnull, "w")
    return device


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def planned_world_size():
    """The processes torchrun started, read before start() joins them (for checks before any work)."""
    return int(os.environ.get("WORLD_SIZE", 1))


def planned_main():
    """Whether this process will be rank 0 (the one that prints), read before start() joins them."""
    return os.environ.get("RANK", "0") == "0"


def is_main():
    return rank() == 0


def share(batch):
    """This process's part of a global batch: every world_size-th item, from its rank on."""
    return batch[rank()::world_size()]


def wrap(model):
    """The model in DistributedDataParallel where there are several processes, else itself."""
    if world_size() == 1:
        return model
    on_gpu = next(model.parameters()).device.type == "cuda"
    return DistributedDataParallel(model, device_ids=[torch.cuda.current_device()] if on_gpu else None)


def all_finite(loss):
    """Whether the loss is finite in every process: all stop together on a NaN, none waits forever."""
    if world_size() == 1:
        return bool(torch.isfinite(loss))
    flag = torch.isfinite(loss.detach()).float().reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def total(*numbers):
    """Sums over the processes of these local numbers (counts, loss sums), as floats."""
    if world_size() == 1:
        return numbers
    values = torch.tensor(numbers, dtype=torch.float64,
                          device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(values)
    return tuple(values.tolist())
