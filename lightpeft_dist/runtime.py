"""Process-group awareness for every stage.

Stages are written once and run single-process or under a launcher (deepspeed, torchrun, Slurm, Ray). This module is
the only place that asks torch.distributed anything; with no process group every call is a cheap no-op, so the
single-process path carries no distributed code of its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Runtime:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum across ranks in place (on the collective's device) and return it."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_gather_object(self, obj: object) -> list[object]:
        if not self.distributed:
            return [obj]
        out: list[object] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def current() -> Runtime:
    """The runtime as set up by the launcher's environment (RANK/WORLD_SIZE/LOCAL_RANK), or single-process."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:  # no process group: this process is the whole job, whatever RANK a launcher exported
        rank, world = 0, 1
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return Runtime(rank=rank, world_size=world, local_rank=local_rank, device=device)
