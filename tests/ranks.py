"""Spawning ranks for the multi-process tests (shared by test_distributed.py and test_ddp_train.py).

Ranks are fresh processes (torch.multiprocessing "spawn") on 127.0.0.1 with gloo; every join is bounded,
so a hung rank fails the test instead of hanging CI, and the collectives have a timeout. A rank saves what
its scenario returned (or the error it raised) to a file that the test reads back.

Two ways for a rank to join its group: ``init="tcp"`` (the helper initialises the group before the
scenario) or ``init="env"`` (the helper sets torchrun's variables, RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT, and the code under test initialises the group itself, as under torchrun).
"""

from __future__ import annotations

import json
import os
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD_SIZE = 2
COLLECTIVE_TIMEOUT_S = 30  # gloo's timeout: a collective waiting for a silent peer fails after this
JOIN_TIMEOUT_S = 150  # every spawned rank must have exited by then (spawning + importing torch included)

__all__ = [
    "COLLECTIVE_TIMEOUT_S",
    "JOIN_TIMEOUT_S",
    "WORLD_SIZE",
    "RankOutcome",
    "free_port",
    "rank_results",
    "spawn",
]


@dataclass
class RankOutcome:
    exitcode: int | None
    result: dict[str, Any] | None  # what the scenario returned (exit code 0)
    error: dict[str, Any] | None  # the exception it raised: {"error", "traceback", "seconds", "waited_s"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_torchrun_environment(rank: int, world_size: int, port: int) -> None:
    """What torchrun sets for a worker on a single node (LOCAL_RANK = RANK)."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )


def _join_group(rank: int, world_size: int, port: int, init: str, pg_backend: str, timeout_s: float) -> None:
    if init == "env":
        set_torchrun_environment(rank, world_size, port)
        return
    dist.init_process_group(
        pg_backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )


def _run_rank(
    rank: int,
    world_size: int,
    port: int,
    out_dir: Path,
    init: str,
    pg_backend: str,
    collective_timeout_s: float,
    scenario: Callable[..., dict[str, Any]],
    kwargs: dict[str, Any],
) -> None:
    """A spawned rank: join the group, run the scenario, save what it returns (or the error it raised)."""
    torch.set_num_threads(1)  # the ranks share the machine's cores
    started = None
    try:
        _join_group(rank, world_size, port, init, pg_backend, collective_timeout_s)
        started = time.monotonic()
        result = scenario(rank, world_size, **kwargs)
        torch.save(result, out_dir / f"rank{rank}.pt")
        if dist.is_initialized():
            dist.destroy_process_group()
    except BaseException as error:
        report = {
            "error": f"{type(error).__name__}: {error}",
            "traceback": traceback.format_exc(),
            "seconds": None if started is None else time.monotonic() - started,
            "waited_s": getattr(error, "waited_s", None),
        }
        (out_dir / f"rank{rank}.json").write_text(json.dumps(report))
        os._exit(1)  # skip interpreter teardown: a broken process group can block in its destructor


def spawn(
    scenario: Callable[..., dict[str, Any]],
    out_dir: Path,
    *,
    world_size: int = WORLD_SIZE,
    init: str = "tcp",
    pg_backend: str = "gloo",
    collective_timeout_s: float = COLLECTIVE_TIMEOUT_S,
    join_timeout_s: float = JOIN_TIMEOUT_S,
    **kwargs: Any,
) -> list[RankOutcome]:
    """Run ``scenario(rank, world_size, **kwargs)`` in ``world_size`` fresh processes; kill any still
    running after ``join_timeout_s`` and fail."""
    out_dir.mkdir(parents=True, exist_ok=True)
    context = mp.get_context("spawn")
    port = free_port()
    common = (world_size, port, out_dir, init, pg_backend, collective_timeout_s, scenario, kwargs)
    processes = [
        context.Process(target=_run_rank, args=(rank, *common), daemon=True) for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    deadline = time.monotonic() + join_timeout_s
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, process in enumerate(processes) if process.is_alive()]
    for rank in hung:
        processes[rank].kill()
        processes[rank].join(10)
    if hung:
        pytest.fail(f"ranks {hung} were still running after {join_timeout_s} s (hung; killed)")
    return [_outcome(out_dir, rank, process.exitcode) for rank, process in enumerate(processes)]


def _outcome(out_dir: Path, rank: int, exitcode: int | None) -> RankOutcome:
    result_file, error_file = out_dir / f"rank{rank}.pt", out_dir / f"rank{rank}.json"
    result = torch.load(result_file) if result_file.exists() else None
    error = json.loads(error_file.read_text()) if error_file.exists() else None
    return RankOutcome(exitcode, result, error)


def rank_results(outcomes: list[RankOutcome]) -> list[dict[str, Any]]:
    """Every rank's result; fails with the ranks' tracebacks if any of them did not succeed."""
    failed = [(rank, o) for rank, o in enumerate(outcomes) if o.exitcode != 0 or o.result is None]
    if failed:
        details = "\n".join(
            f"rank {rank}: exit code {o.exitcode}\n{(o.error or {}).get('traceback', '(no traceback)')}"
            for rank, o in failed
        )
        pytest.fail(f"spawned ranks failed:\n{details}")
    return [o.result for o in outcomes]
