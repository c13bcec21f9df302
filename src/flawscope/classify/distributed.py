"""The process group of a ``torchrun`` launch (one process otherwise), for the classifier.

Plain ``torch.distributed``: gloo on CPU, NCCL on GPU. :class:`ProcessGroup` offers the three
collectives the training needs (barrier, sum of a few numbers, gather of uneven row blocks);
with one process they are no-ops. Lightning Fabric was considered and not adopted: it would
replace the set-up and the barrier / all-reduce calls (about 25 lines) but not the uneven
gather (Fabric's ``all_gather`` needs equal shapes), the per-process batch slicing or the loss
scaling, and it would add a dependency with its own launcher and seeding conventions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from flawscope.device import resolve_device


@dataclass
class ProcessGroup:
    """This process's rank among ``world`` processes, and the device it trains on."""

    rank: int = 0
    world: int = 1
    owns_group: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        """True for rank 0, the process that writes files."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over the processes."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.cpu().tolist()

    def gather_rows(self, local: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Concatenate every process's rows (process r holds ``counts[r]`` rows)."""
        if self.world == 1:
            return local
        longest = max(counts)
        pad = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=self.device)
        pad[: len(local)] = local.to(self.device)
        parts = [torch.empty_like(pad) for _ in range(self.world)]
        torch.distributed.all_gather(parts, pad)
        return torch.cat([p[:c] for p, c in zip(parts, counts)]).cpu()

    def close(self) -> None:
        """Destroy the process group if :func:`setup_distributed` created it."""
        if self.owns_group:
            torch.distributed.destroy_process_group()


def launch_world_size() -> int:
    """Processes of this ``torchrun`` launch (``WORLD_SIZE``); 1 without torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup_distributed(device_name: str) -> ProcessGroup:
    """Join the ``torchrun`` process group (``WORLD_SIZE`` > 1), else a one-process group."""
    if launch_world_size() <= 1:
        return ProcessGroup(device=resolve_device(device_name))
    import torch.distributed as dist

    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        owns = True
    return ProcessGroup(dist.get_rank(), dist.get_world_size(), owns, device)
