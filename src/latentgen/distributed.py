"""Data-parallel generation under torchrun: which share of a run this process makes.

torchrun (PyTorch's own launcher) starts one process per device and tells each its RANK,
WORLD_SIZE and LOCAL_RANK. Job i of a run belongs to rank i mod WORLD_SIZE, so the split needs no
talk between ranks and does not depend on timing; because every image's noise comes from its own
seed on the CPU, the run's files are the ones a single process writes, whatever the number of ranks.
"""

import os
from datetime import timedelta
from dataclasses import dataclass
from typing import Sequence, TypeVar

import torch

T = TypeVar("T")


@dataclass(frozen=True)
class Rank:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, items: Sequence[T]) -> list[T]:
        """Every `world`-th item, starting at `rank`."""
        return list(items[self.rank :: self.world])

    def device(self, name: str) -> str:
        """`auto` under torchrun: this process's own GPU (cuda:LOCAL_RANK), else the CPU."""
        if name != "auto" or self.world == 1:
            return name
        return f"cuda:{self.local}" if torch.cuda.is_available() else "cpu"


def current() -> Rank:
    """The rank torchrun gave this process, from its environment."""
    return Rank(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))


def start(rank: Rank) -> None:
    """Join the job's process group (gloo: it also runs on CPUs), for `wait_for_all`."""
    if rank.world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", timeout=timedelta(minutes=10))


def wait_for_all(rank: Rank) -> None:
    """Return once every rank got here (so that rank 0 may gather what all of them wrote)."""
    if rank.world > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()


def finish(rank: Rank) -> None:
    if rank.world > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
