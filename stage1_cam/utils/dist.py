"""Distributed helpers: launcher-agnostic (torchrun sets RANK/LOCAL_RANK/WORLD_SIZE; SLURM's srun too)."""

from __future__ import annotations

import gc
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

_logger = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistInfo:
    """Initialise the process group when launched with several processes; single process otherwise."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", "1")) or 1)
    if world <= 1:
        return DistInfo()
    rank = int(env.get("RANK", env.get("SLURM_PROCID", "0")))
    local = int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", "0")))
    if not torch_dist.is_initialized():
        import_before_process_group()
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
        torch_dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistInfo(rank=rank, local_rank=local, world_size=world)


def import_before_process_group() -> None:
    """Import what DistributedDataParallel imports lazily, before the process group exists.

    DDP's constructor imports ``torch._dynamo`` on first use; imported after ``init_process_group`` it (through
    ``torch.distributed._shard``, torch 2.14) keeps a reference to the default group that ``destroy_process_group``
    cannot drop. The group is then never destroyed, its gloo worker threads are never joined, and one of them can
    still be releasing the last collective's tensors (a Python object, so it takes the GIL) while the interpreter
    finalizes: ``terminate called without an active exception``, SIGABRT, after a good run. Imported first, the
    group is freed by ``destroy_process_group`` and its destructor joins the threads (see shutdown_distributed).
    """
    import torch._dynamo  # noqa: F401


def shutdown_distributed(ok: bool) -> None:
    """Tear the process group down so that every rank exits 0 after a good run; nothing without a group.

    The order matters: after a good run (``ok``) a barrier first, so that no rank destroys its group while another
    one still talks to it (rank 0 writes the final checkpoint after the last collective); then a garbage
    collection, which frees the DDP wrappers and other holders of the group left in reference cycles; then
    ``destroy_process_group``, which drops the last reference: the group's destructor waits for its pending work
    and joins its worker threads while Python is still alive. After a failure there is no barrier (the other ranks
    may never reach it): the group is destroyed and the launcher reports the failed rank.
    """
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return
    try:
        if ok:
            torch_dist.barrier()
    finally:
        gc.collect()
        torch_dist.destroy_process_group()
        _logger.debug("process group destroyed")


def device_for(info: DistInfo) -> torch.device:
    return torch.device(f"cuda:{info.local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated on ``device`` (CUDA), else the process's peak RSS, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
