"""Data-parallel training across processes: the process group from torchrun's environment.

``torchrun --nproc_per_node=N -m structsparse run RECIPE --out DIR`` starts N processes
with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set;
:func:`init_from_env` joins them (gloo on CPU, nccl on CUDA). The trainer asks
:func:`world_size` and :func:`rank`, which are 1 and 0 when no process group is
initialised, so the same code runs in one process unchanged.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["env_world_size", "env_is_main", "init_from_env", "world_size", "rank", "is_main", "barrier", "all_reduce_sum",
           "local_batch_size", "same_on_all"]


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset): how many processes this run has."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def env_is_main() -> bool:
    """Whether this process is rank 0 by the environment (``RANK`` unset or 0), before any process group."""
    return os.environ.get("RANK", "0") == "0"


def init_from_env(device: str = "cpu") -> torch.device:
    """Join the process group described by the environment (gloo for ``cpu``, nccl for ``cuda``);
    returns this process's device (``cuda:LOCAL_RANK`` for CUDA)."""
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
        dist.init_process_group("nccl", init_method="env://")
        return dev
    dist.init_process_group("gloo", init_method="env://")
    return torch.device(device)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Whether this process writes files and logs (rank 0, or the only process)."""
    return rank() == 0


def barrier() -> None:
    """Wait for every process (nothing to do in one process)."""
    if world_size() > 1:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all processes, in place (unchanged in one process); returns ``t``."""
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def local_batch_size(batch_size: int, world: int) -> int:
    """Each process's share of a global batch; the global batch must divide evenly."""
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} (the global batch) is not divisible by the {world} processes; "
                         f"choose a multiple of {world}")
    return batch_size // world


def same_on_all(values: list[int], device: torch.device | str = "cpu") -> bool:
    """Whether every process holds the same integers ``values`` (True in one process)."""
    if world_size() == 1:
        return True
    t = torch.tensor([*values, *(-v for v in values)], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)   # max(v) == -max(-v) == min(v) on every process
    n = len(values)
    return bool((t[:n] == -t[n:]).all())
