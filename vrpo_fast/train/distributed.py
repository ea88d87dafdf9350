"""Process-group set-up: one CPU process (gloo), several under torchrun (gloo on CPU, nccl on
GPU), many nodes through torchrun's own flags (--nnodes, --node-rank, --rdzv-endpoint)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from vrpo_fast.errors import UserError


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """Join torchrun's process group if launched by it, else a one-process gloo group."""
    use_cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda and local_rank >= torch.cuda.device_count():
        raise UserError(
            f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} visible CUDA "
            f"device(s): launch at most that many processes per node (torchrun "
            f"--nproc-per-node), or hide the GPUs (CUDA_VISIBLE_DEVICES='') to train on CPU "
            f"processes")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend=backend, device_id=device if use_cuda else None)
        else:
            # A single process needs no rendezvous: an in-memory store is enough.
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0,
                                    world_size=1)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, device)


def all_reduce_(tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=op)
    return tensor


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s `obj` (picklable) on every rank."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()

