"""The runtime of data-parallel training under ``torchrun``: the process group, rank and device, the
restart count, and what a collective's failure says about the other processes.

torchrun restarts the workers of a failed run (``--max-restarts``); :func:`restart_count` says whether this
is such a restart (the trainer then resumes from the run's latest checkpoint), and
:func:`describe_peer_failure` turns the error of a collective whose peer died or hung into one line naming
the peer (:class:`PeerLostError`).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from fastpix2pix.runtime import resolve_device

__all__ = [
    "DistContext",
    "PeerInfo",
    "PeerLostError",
    "describe_peer_failure",
    "init_distributed",
    "max_restarts",
    "restart_count",
    "torchrun_environment",
]


# --- data-parallel runtime (torchrun) ---------------------------------------------------------------------

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
RESTART_VARIABLE = "TORCHELASTIC_RESTART_COUNT"
# The key of the agent's store under which rank 0 publishes its own store for this start (see _start_store).
_STORE_KEY = "fastpix2pix/process_group_store"
_TOKEN_KEY = "fastpix2pix/token"


class PeerLostError(RuntimeError):
    """A collective failed because another process of the run died, left or stopped answering."""


@dataclass(frozen=True)
class PeerInfo:
    """One process of the run, as it described itself when the group formed."""

    rank: int
    host: str
    pid: int
    addresses: tuple[str, ...] = ()

    def describe(self) -> str:
        return f"rank {self.rank} (host {self.host}, pid {self.pid})"


@dataclass(frozen=True)
class DistContext:
    """This process's place in a data-parallel run. ``owns_group``: this code created the default process
    group (and destroys it in :meth:`close`); a group the caller initialised is used and left alone."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool
    peers: tuple[PeerInfo, ...] = ()  # every rank's host and pid, in rank order
    timeout_s: float | None = None  # what bounds every collective (--dist_timeout)

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


def restart_count() -> int:
    """torchrun's ``TORCHELASTIC_RESTART_COUNT``: how often this process's agent restarted its workers (0 on
    the first start and outside torchrun). Counted per agent: an agent that restarts its workers because
    another node's failed (a membership change) hands them 0, so a run takes the highest of its ranks'."""
    try:
        return max(0, int(os.environ.get(RESTART_VARIABLE, "0")))
    except ValueError:
        return 0


def max_restarts() -> int:
    """torchrun's ``--max-restarts`` (``TORCHELASTIC_MAX_RESTARTS``; 0 outside torchrun)."""
    try:
        return max(0, int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")))
    except ValueError:
        return 0


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
    GPU, gloo on the CPU; under torchrun's agent store, through a store of this start's own (see
    :func:`_start_store`: a restarted group must not meet the keys of the failed one). ``timeout_s`` bounds
    every collective: a rank that died or hangs makes the others fail after it rather than wait forever
    (:func:`describe_peer_failure` says which). A default group that is already initialised (by the caller)
    is used as it is. A world of one process is a plain run. The ranks tell each other their host and pid
    (:attr:`DistContext.peers`).
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
        _init_group(device, rank, world_size, timeout_s)
    elif world_size <= 1:
        return None
    try:
        peers = _describe_peers(rank, world_size)
    except BaseException:
        if owns_group:
            dist.destroy_process_group()
        raise
    return DistContext(rank, world_size, local_rank, device, owns_group, peers, timeout_s)


def _init_group(device: torch.device, rank: int, world_size: int, timeout_s: float) -> None:
    """The default process group, through this start's own store under torchrun's agent store."""
    timeout = timedelta(seconds=timeout_s)
    try:
        store = _start_store(rank, timeout_s)
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            init_method=None if store is not None else "env://",
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=timeout,
            device_id=device if device.type == "cuda" else None,
        )
    except (dist.DistError, TimeoutError) as error:
        raise PeerLostError(
            f"rank {rank} of {world_size}: the processes did not all join the run within --dist_timeout "
            f"{timeout_s:g} s ({_first_line(error)}); is every process started (torchrun --nnodes)?"
        ) from error


def _start_store(rank: int, timeout_s: float) -> dist.Store | None:
    """The store this start of the workers forms its process group through; None: torchrun's own (env://).

    torchrun's c10d rendezvous hands the workers a store that its agent hosts and keeps across restarts
    (``TORCHELASTIC_USE_AGENT_STORE=True``; MASTER_ADDR:MASTER_PORT). Workers restarted after a failure that
    form their group there find the keys of the dead group (gloo's peer addresses, NCCL's id): seen with
    torch 2.14 and gloo, the restarted group then waits in its connect far past the timeout. So rank 0 of
    every start hosts a fresh store of its own (on a free port of its machine, MASTER_ADDR) and publishes
    its port and a random token in the agent's store; the other ranks connect to the published port and
    check the token. An entry left by an earlier start names a port whose process is gone (the agents stop
    all workers before they restart any): it refuses the connection or shows another token, and the rank
    reads the entry again until this start's appears.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        return None
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    timeout = timedelta(seconds=timeout_s)
    agent_store = dist.TCPStore(host, port, None, False, timeout)
    if rank == 0:
        own = dist.TCPStore(host, 0, None, True, timeout, wait_for_workers=False)
        token = secrets.token_hex(16)
        own.set(_TOKEN_KEY, token)
        agent_store.set(_STORE_KEY, f"{own.port} {token}")
        return own
    deadline = time.monotonic() + timeout_s
    while True:
        own_port, token = agent_store.get(_STORE_KEY).decode().split()
        own = _connect_if_current(host, int(own_port), token, timeout)
        if own is not None:
            return own
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank 0 published no store for this start at {host}:{port} in time")
        time.sleep(0.1)


def _connect_if_current(host: str, port: int, token: str, timeout: timedelta) -> dist.Store | None:
    """A client of the store at ``host:port`` if it is up and holds ``token``; None for a stale entry."""
    try:  # a quiet probe first: a TCPStore client logs every failed connection attempt at length
        socket.create_connection((host, port), timeout=2).close()
    except OSError:
        return None
    try:  # a short timeout: whatever else listens there must not hold this rank for long
        store = dist.TCPStore(host, port, None, False, timedelta(seconds=5))
        if not (store.check([_TOKEN_KEY]) and store.get(_TOKEN_KEY).decode() == token):
            return None
    except (RuntimeError, TimeoutError):
        return None
    store.set_timeout(timeout)
    return store


def _describe_peers(rank: int, world_size: int) -> tuple[PeerInfo, ...]:
    """Every rank's host, pid and addresses (one collective when the group forms), to name a lost peer."""
    host = socket.gethostname()
    addresses: tuple[str, ...] = ()
    with contextlib.suppress(OSError):
        addresses = tuple(socket.gethostbyname_ex(host)[2])
    values: list[Any] = [None] * world_size
    dist.all_gather_object(values, PeerInfo(rank, host, os.getpid(), addresses))
    return tuple(values)


# --- a lost peer ------------------------------------------------------------------------------------------

_CLOSED = re.compile(r"connection (closed|reset) by peer|broken pipe|connection refused|aborted", re.I)
_TIMED_OUT = re.compile(r"timed? ?out|timeout", re.I)
_COLLECTIVE = re.compile(r"gloo|nccl|c10d|ProcessGroup", re.I)
_PEER_ADDRESS = re.compile(r"\[([0-9A-Fa-f:.]+)\]:(\d+)")
_SOURCE_PREFIX = re.compile(r"^\[[^\]]*\.(cpp|cc|h):\d+\]\s*")


def describe_peer_failure(group: DistContext, error: BaseException) -> str | None:
    """What the failure of a collective says about the other processes, in a few words; None when
    ``error`` (or what caused it) is no collective's failure: a closed connection names the peer
    (certain with 2 processes, else from its address where only one rank has it) and a timeout says no
    peer answered within the timeout."""
    for cause in _causes(error):
        text = str(cause)
        if not (isinstance(cause, dist.DistError) or _COLLECTIVE.search(text)):
            continue
        reason = _first_line(cause)
        if _CLOSED.search(text):
            return f"{_lost_peer(group, text)} is gone ({reason})"
        if _TIMED_OUT.search(text):
            waited = f" within --dist_timeout {group.timeout_s:g} s" if group.timeout_s else ""
            return f"{_lost_peer(group, text)} did not answer{waited}: it hangs or died ({reason})"
    return None


def _causes(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _first_line(error: BaseException) -> str:
    """The message's first line without the C++ source location, cut after its first sentence."""
    lines = str(error).strip().splitlines()
    text = _SOURCE_PREFIX.sub("", lines[0] if lines else type(error).__name__)
    text = text.split(". This is typically caused", 1)[0]
    return text[:200].rstrip(".")


def _lost_peer(group: DistContext, text: str) -> str:
    others = [peer for peer in group.peers if peer.rank != group.rank]
    if group.world_size == 2:
        return others[0].describe() if others else f"rank {1 - group.rank}"
    match = _PEER_ADDRESS.search(text)
    if match is None:
        return "another process"
    address = match.group(1)
    candidates = [peer for peer in others if address in peer.addresses]
    if len(candidates) == 1:
        return candidates[0].describe()
    if candidates:
        return f"one of ranks {[p.rank for p in candidates]} (host {candidates[0].host}, at {address})"
    return f"the process at {address}"
