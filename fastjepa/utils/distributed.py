"""Process-group set-up and differentiable collectives with the reference's names
(``src/utils/distributed.py``): ``init_distributed``, ``AllGather``, ``AllReduceSum``,
``AllReduce``. Every collective is the identity without a process group or with one process.

Deliberate differences from the reference:

* the backend is 'nccl' when CUDA is available and 'gloo' otherwise (the reference always
  asks for NCCL, which fails on a CPU-only machine and leaves it at one process);
* ``AllReduceSum`` sums a copy of its input (the reference all-reduces the input tensor in
  place when it is contiguous), and ``AllGather``'s backward sums a copy of the incoming
  gradient; the values returned are the same.

The trainer's own process-group handling (torchrun, SLURM, DDP / FSDP2) is in
``fastjepa/distributed.py``; this module, a shared utility, does not import it.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


def init_distributed(port: int = 40112, rank_and_world_size: tuple = (None, None)) -> tuple[int, int]:
    """``(world_size, rank)``, joining the default process group first if there is none.

    An initialized default group is reused as it is. Otherwise the rank and world size come from
    ``rank_and_world_size``, else from SLURM (SLURM_PROCID, SLURM_NTASKS, rendezvous at
    HOSTNAME; else localhost), on ``port``; without them, or when joining fails, (1, 0) with no
    group (logged at info level).
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()

    rank, world_size = rank_and_world_size
    os.environ["MASTER_ADDR"] = "localhost"
    if rank is None or world_size is None:
        try:
            world_size = int(os.environ["SLURM_NTASKS"])
            rank = int(os.environ["SLURM_PROCID"])
            os.environ["MASTER_ADDR"] = os.environ["HOSTNAME"]
        except Exception:
            logger.info("SLURM vars not set (distributed training not available)")
            return 1, 0

    try:
        os.environ["MASTER_PORT"] = str(port)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend, world_size=world_size, rank=rank)
    except Exception as e:
        logger.info(f"distributed training not available {e}")
        return 1, 0
    return world_size, rank


def _world_size() -> int:
    """The default group's size; 1 without one."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class AllGather(torch.autograd.Function):
    """Every rank's ``x`` concatenated along dim 0, in rank order. Backward: the gradient summed
    over the ranks, then this rank's rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world_size = _world_size()
        if world_size == 1:
            return x
        x = x.contiguous()
        outputs = [torch.zeros_like(x) for _ in range(world_size)]
        dist.all_gather(outputs, x)
        return torch.cat(outputs, 0)

    @staticmethod
    def backward(ctx, grads: torch.Tensor) -> torch.Tensor:
        world_size = _world_size()
        if world_size == 1:
            return grads
        rows = grads.shape[0] // world_size
        start = rows * dist.get_rank()
        grads = grads.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grads)
        return grads[start : start + rows]


class AllReduceSum(torch.autograd.Function):
    """``x`` summed over the ranks; the backward passes the gradient through unchanged."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        if _world_size() == 1:
            return x
        x = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grads: torch.Tensor) -> torch.Tensor:
        return grads


class AllReduce(torch.autograd.Function):
    """``x`` averaged over the ranks (each divided by the world size, then summed); the backward
    passes the gradient through unchanged."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world_size = _world_size()
        if world_size == 1:
            return x
        x = x.contiguous() / world_size
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grads: torch.Tensor) -> torch.Tensor:
        return grads
