"""Data parallelism under torchrun: which share of a run or of a training batch this process takes.

torchrun (PyTorch's own launcher) starts one process per device and tells each its RANK,
WORLD_SIZE and LOCAL_RANK. Generation: job i of a run belongs to rank i mod WORLD_SIZE, so the
split needs no talk between ranks and does not depend on timing; because every image's noise comes
from its own seed on the CPU, the run's files are the ones a single process writes, whatever the
number of ranks. Training: every rank draws the same global batch from the same seeded generators
and trains on its contiguous slice under DistributedDataParallel, which averages the gradients;
so the global batch, the data order and the noise do not depend on the number of ranks, and a run
resumed with another number of ranks continues as the uninterrupted one would.
"""

import os
from datetime import timedelta
from dataclasses import dataclass
from typing import Sequence, TypeVar

import torch

from .errors import LatentgenError

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

    def part(self, batch: int) -> slice:
        """This rank's contiguous slice of a global training batch (equal shares)."""
        if batch % self.world:
            raise LatentgenError(f"the batch ({batch}, global) must divide by the {self.world} ranks")
        size = batch // self.world
        return slice(self.rank * size, (self.rank + 1) * size)


def current() -> Rank:
    """The rank torchrun gave this process, from its environment."""
    return Rank(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))


def start(rank: Rank, device: str = "cpu") -> None:
    """Join the job's process group: NCCL when this rank trains on a GPU, else gloo (it also runs on CPUs)."""
    if rank.world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend, timeout=timedelta(minutes=10))


def data_parallel(module: torch.nn.Module, rank: Rank) -> torch.nn.Module:
    """`module` under DistributedDataParallel (gradients averaged over the ranks), or itself alone."""
    if rank.world == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    device = next(module.parameters()).device
    return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)


def mean_over_ranks(rank: Rank, values: dict[str, float]) -> dict[str, float]:
    """The ranks' mean of each logged number (of the global batch, as one process logs it)."""
    if rank.world == 1:
        return values
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    torch.distributed.all_reduce(tensor)
    return {k: float(v) / rank.world for k, v in zip(keys, tensor)}


def rank0_says(rank: Rank, flag: bool) -> bool:
    """Rank 0's `flag` on every rank, so that all stop at the same step (a wall-time limit)."""
    if rank.world == 1:
        return flag
    tensor = torch.tensor([int(flag)])
    torch.distributed.broadcast(tensor, 0)
    return bool(tensor.item())


def wait_for_all(rank: Rank) -> None:
    """Return once every rank got here (so that rank 0 may gather what all of them wrote)."""
    if rank.world > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()


def finish(rank: Rank) -> None:
    if rank.world > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
