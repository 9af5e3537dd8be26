"""Process-group set-up for single-process and ``torchrun`` (DistributedDataParallel) training.

Under ``torchrun`` the environment holds ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the
rendezvous address (``MASTER_ADDR``/``MASTER_PORT``). :func:`setup_distributed` reads them and
joins the process group with NCCL when CUDA is available (one GPU per local rank) and gloo on
CPU. Without them it returns a plain single-process :class:`DistInfo` and initialises nothing.
Every helper here is a no-op in a single process, so the same code runs in both settings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as tdist

__all__ = [
    "DistInfo",
    "all_gather_object",
    "barrier",
    "broadcast_object",
    "cleanup",
    "default_device",
    "is_distributed",
    "rank0_print",
    "setup_distributed",
]


def default_device() -> torch.device:
    """``cuda`` when available, else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``, its ``local_rank`` and ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=default_device)
    is_main: bool = True

    @classmethod
    def single(cls, device: str | torch.device | None = None) -> DistInfo:
        """A single process on ``device`` (default: CUDA if available, else CPU)."""
        return cls(device=torch.device(device) if device is not None else default_device())


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def is_distributed() -> bool:
    """True when a process group is initialised."""
    return tdist.is_available() and tdist.is_initialized()


def setup_distributed(
    device: str | torch.device | None = None,
    backend: str | None = None,
    timeout_s: float = 1800.0,
) -> DistInfo:
    """Join the ``torchrun`` process group if there is one, else describe a single process.

    Args:
        device: force ``"cpu"`` or ``"cuda"``; default: CUDA when available.
        backend: force ``"gloo"`` or ``"nccl"``; default: NCCL on CUDA, gloo on CPU.
        timeout_s: collective timeout.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world_size}")
    kind = torch.device(device).type if device is not None else default_device().type
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    if world_size == 1 and not is_distributed():
        return DistInfo.single(device if device is not None else kind)

    if kind == "cuda":
        n = torch.cuda.device_count()
        if local_rank >= n:
            raise ValueError(
                f"LOCAL_RANK={local_rank} but only {n} CUDA device(s); use one process per GPU "
                "or CUDA_VISIBLE_DEVICES='' to train on CPU with gloo"
            )
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    backend = backend or ("nccl" if kind == "cuda" else "gloo")
    if not is_distributed():
        kwargs: dict[str, Any] = {"device_id": dev} if backend == "nccl" else {}
        tdist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
            **kwargs,
        )
    rank, world_size = tdist.get_rank(), tdist.get_world_size()
    return DistInfo(rank, world_size, local_rank, dev, rank == 0)


def data_parallel(module: torch.nn.Module, dist: DistInfo) -> torch.nn.Module:
    """``module`` in ``DistributedDataParallel`` over ``dist.world_size > 1`` processes (its
    construction broadcasts rank 0's weights; one device per process on CUDA), else itself."""
    if dist.world_size == 1:
        return module
    ids = [dist.device.index] if dist.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)


def cleanup() -> None:
    """Leave the process group (no-op when none is initialised)."""
    if is_distributed():
        tdist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        if tdist.get_backend() == "nccl":
            tdist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            tdist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (pickled; small objects only)."""
    if not is_distributed():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` in a single process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def rank0_print(*args: Any, **kwargs: Any) -> None:
    """``print`` on rank 0 only (always flushed)."""
    if not is_distributed() or tdist.get_rank() == 0:
        print(*args, **kwargs, flush=True)
