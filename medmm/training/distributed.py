"""Process-group setup for one process, ``torchrun``, the ``deepspeed`` launcher, or Slurm.

On a machine without a GPU, DeepSpeed's CPU accelerator and the gloo backend are chosen before
DeepSpeed is imported. A single process without launcher variables becomes rank 0 of 1.
"""

from __future__ import annotations

import os
import socket


def free_port() -> int:
    """A free TCP port on loopback (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_environment() -> str:
    """Set DS_ACCELERATOR and launcher variables; returns the backend name (nccl or gloo)."""
    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # Slurm (srun) provides SLURM_* instead of RANK/WORLD_SIZE.
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "RANK" not in os.environ:
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
        os.environ["MEDMM_PORT_CHOSEN"] = "1"  # ours to replace if another process takes it first
    return "nccl" if cuda else "gloo"


def init_distributed() -> tuple[int, int, int]:
    """Initialise torch.distributed through DeepSpeed; returns (rank, world_size, local_rank)."""
    backend = prepare_environment()
    import deepspeed
    import torch
    import torch.distributed as dist

    for attempt in range(5):
        if dist.is_initialized():
            break
        try:
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
        except dist.DistNetworkError:
            # A single process picked a free port, but another process bound it before the store did: pick again.
            # (A launcher's MASTER_PORT is shared by every rank and is never changed here.)
            if os.environ.get("MEDMM_PORT_CHOSEN") != "1" or os.environ.get("WORLD_SIZE", "1") != "1" or attempt == 4:
                raise
            os.environ["MASTER_PORT"] = str(free_port())
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return dist.get_rank(), dist.get_world_size(), local_rank


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def is_main() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0
