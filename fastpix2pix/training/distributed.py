"""The runtime of data-parallel training under ``torchrun``: the process group, rank and device."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from fastpix2pix.runtime import resolve_device

__all__ = ["DistContext", "init_distributed", "torchrun_environment"]


# --- data-parallel runtime (torchrun) ---------------------------------------------------------------------

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistContext:
    """This process's place in a data-parallel run. ``owns_group``: this code created the default process
    group (and destroys it in :meth:`close`); a group the caller initialised is used and left alone."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, tensor: torch.Tensor, op: Any = None) -> torch.Tensor:
        """In place, on the group's device (NCCL reduces device tensors only); returns ``tensor``."""
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op is None else op)
        return tensor

    def agree(self, ok: bool) -> bool:
        """A barrier that carries a verdict: True only if every rank passed ``ok=True``.

        Used around rank 0's checkpoint writes: a rank 0 that failed to write tells the others, which then
        fail too instead of waiting at a plain barrier until the timeout.
        """
        flag = torch.tensor([1.0 if ok else 0.0], device=self.device)
        return bool(self.all_reduce(flag, dist.ReduceOp.MIN).item() == 1.0)

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        holder = [value]
        dist.broadcast_object_list(holder, src=0, device=self._object_device())
        return holder[0]

    def gather_objects(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank."""
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. generates a dataset), then the others (which then find it)."""
        if not self.is_main:
            self._barrier()
        yield
        if self.is_main:
            self._barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    def _barrier(self) -> None:
        # With NCCL, a barrier needs to know the device, or it guesses one from the rank.
        dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def _object_device(self) -> torch.device | None:
        return self.device if dist.get_backend() == "nccl" else None


def torchrun_environment() -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` from torchrun's environment variables, or None when not set."""
    if not all(name in os.environ for name in TORCHRUN_VARIABLES):
        return None
    return tuple(int(os.environ[name]) for name in TORCHRUN_VARIABLES)  # type: ignore[return-value]


def _distributed_device(requested: str, local_rank: int) -> torch.device:
    """One device per process: CUDA device LOCAL_RANK (whatever index ``--device`` names), else the CPU."""
    kind = torch.device(requested).type if requested != "auto" else None
    if kind is not None and kind != "cuda":
        return torch.device(kind)
    # The choice and the "no CUDA here" error of a single process; the index is LOCAL_RANK's.
    kind = resolve_device("auto" if kind is None else "cuda").type
    if kind != "cuda":
        return torch.device(kind)
    if local_rank >= torch.cuda.device_count():
        raise ValueError(
            f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s) visible: start at "
            f"most that many processes per node (torchrun --nproc_per_node)"
        )
    return torch.device("cuda", local_rank)


def init_distributed(requested_device: str, timeout_s: float) -> DistContext | None:
    """Join the data-parallel run this process belongs to; None when it runs alone.

    Under torchrun (RANK, WORLD_SIZE and LOCAL_RANK set) this initialises the default process group from
    the environment (MASTER_ADDR/MASTER_PORT, set by torchrun's rendezvous): NCCL on CUDA, after
    ``torch.cuda.set_device(LOCAL_RANK)`` so that NCCL and every ``cuda`` tensor land on this process's
    GPU, gloo on the CPU. ``timeout_s`` bounds every collective: a rank that died or hangs makes the
    others fail after it rather than wait forever. A default group that is already initialised (by the
    caller) is used as it is. A world of one process is a plain run.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        owns_group = False
    else:
        environment = torchrun_environment()
        if environment is None or environment[1] <= 1:
            return None
        rank, world_size, local_rank = environment
        owns_group = True
    device = _distributed_device(requested_device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if owns_group:
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            init_method="env://",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
    elif world_size <= 1:
        return None
    return DistContext(rank, world_size, local_rank, device, owns_group)
