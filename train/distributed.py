"""Training across processes: `torchrun --nproc_per_node N adapters train ...` or `accelerate launch`.

The launcher sets RANK, LOCAL_RANK and WORLD_SIZE; transformers' Trainer then runs DDP itself (gloo on CPUs, NCCL on
GPUs), each process on its own device with its share of the data. Rank 0 alone takes the output folder's lock,
prints, saves, measures fidelity, writes lineage and registers; the others follow its decisions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    """Where this process stands among the processes of one run."""

    rank: int
    """This process's rank among all processes, 0 to world_size - 1."""
    local_rank: int
    """Its rank on this machine: the index of the GPU it trains on."""
    world_size: int
    """How many processes train together."""

    @property
    def main(self) -> bool:
        """Whether this process is rank 0, the one that writes and speaks."""
        return self.rank == 0

    @classmethod
    def start(cls) -> Ranks:
        """Read the launcher's environment and, with several processes, join them (the Trainer reuses the group)."""
        ranks = cls(rank(), local_rank(), world_size())
        if ranks.world_size > 1 and not dist.is_initialized():
            if torch.cuda.is_available():
                torch.cuda.set_device(ranks.local_rank)
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return ranks

    def share(self, value: Any) -> Any:
        """Rank 0's VALUE, on every rank (a picklable object)."""
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def any(self, flag: bool) -> bool:
        """Whether FLAG is true on any rank: a decision every rank must take together."""
        if self.world_size == 1:
            return flag
        device = torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")
        value = torch.tensor(int(flag), device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())


def rank() -> int:
    """This process's rank under a launcher (0 when run directly)."""
    return int(os.environ.get("RANK", 0))


def local_rank() -> int:
    """This process's rank on its machine under a launcher (0 when run directly): the GPU it trains on."""
    return int(os.environ.get("LOCAL_RANK", 0))


def world_size() -> int:
    """How many processes the launcher started for this run (1 when run directly)."""
    return int(os.environ.get("WORLD_SIZE", 1))
