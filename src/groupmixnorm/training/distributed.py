"""Multi-process training: one process per worker under ``torchrun``, each on a slice of every batch.

Every process draws the same global batches (same seed), keeps its own slice of each (every
``world_size``-th sample, so every group reaches every process), and trains a copy of the model wrapped in
``DistributedDataParallel``; GroupMixNorm layers become :class:`~groupmixnorm.nn.SyncGroupMixNorm`, so
group statistics are those of the whole batch. Evaluation runs on every process (the copies are
identical), and only rank 0 writes results.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor, nn

from groupmixnorm.nn import convert_sync_groupmixnorm

if TYPE_CHECKING:
    from groupmixnorm.methods import Method


@dataclass(frozen=True)
class Workers:
    """Where this process stands: its rank among ``world_size`` processes (``1`` when not distributed)."""

    rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this process reports and writes results."""
        return self.rank == 0

    def shard(self, index: Tensor) -> Tensor:
        """This process's slice of a global batch of sample indices."""
        return index[self.rank :: self.world_size] if self.distributed else index

    def sum_over_processes(self, values: dict[str, float], device: torch.device) -> dict[str, float]:
        """Each number summed over all processes (as is for one), so that every process logs the same
        epoch means: those of the whole batches, not of its own slices."""
        if not self.distributed or not values:
            return values
        total = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
        dist.all_reduce(total)
        return dict(zip(values, total.tolist()))


#: Whether :func:`workers_from_environment` joined the process group (and :func:`leave_process_group` should leave it).
_joined = False


def workers_from_environment(device: torch.device) -> Workers:
    """The process group ``torchrun`` describes in the environment (``WORLD_SIZE``, ``RANK``,
    ``MASTER_ADDR``...), joined if not yet (gloo on the CPU, nccl on CUDA); one worker without it."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 and not (dist.is_available() and dist.is_initialized()):
        return Workers()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    if not dist.is_initialized():
        global _joined
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        _joined = True
    return Workers(dist.get_rank(), dist.get_world_size())


def leave_process_group() -> None:
    """After a run that succeeded on every process: wait for the others, then leave the process group that
    :func:`workers_from_environment` joined (a group joined by the caller is the caller's to leave). A
    process that exits with the group still up may abort while gloo's threads are torn down."""
    global _joined
    if _joined and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    _joined = False


def check_method(method: Method, workers: Workers) -> None:
    """Refuse, with the reason, a method that multi-process training does not support
    (:attr:`Method.supports_distributed <groupmixnorm.methods.Method.supports_distributed>`)."""
    if workers.distributed and not method.supports_distributed:
        from groupmixnorm.methods import METHODS

        supported = [name for name, cls in METHODS.items() if cls.supports_distributed]
        raise ValueError(
            f"multi-process training supports {', '.join(supported)}; {method.name} keeps training state "
            "outside the model (or is not trained with torch), which the processes would not share"
        )


def wrap_model(model: nn.Module, workers: Workers) -> nn.Module:
    """The model to train: as is for one worker; else with synchronized GroupMixNorm layers, in DDP."""
    if not workers.distributed:
        return model
    return nn.parallel.DistributedDataParallel(convert_sync_groupmixnorm(model))
