"""Where a run continues from, and what to say when it cannot go on.

``--continue_train`` reads ``--epoch``'s checkpoint; a worker that torchrun restarted (``--max-restarts``)
reads the run's ``latest.pt`` (:func:`run_restart_count`). Under DDP every rank reads the checkpoint itself
and the ranks check that they read the same one (:func:`agree_on_resume_state`). When another process of
the run is lost, :func:`lost_peer_error` says so in one line, with the last checkpoint and how to resume
(:func:`resume_hint`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastpix2pix.runs.checkpoint import checkpoint_path, load_checkpoint, plain_network_path
from fastpix2pix.runs.options import TrainOptions
from fastpix2pix.training.distributed import (
    DistContext,
    PeerLostError,
    describe_peer_failure,
    max_restarts,
    restart_count,
)

__all__ = [
    "SavedCheckpoint",
    "agree_on_resume_state",
    "lost_peer_error",
    "read_resume_state",
    "resume_hint",
    "run_restart_count",
]


@dataclass(frozen=True)
class SavedCheckpoint:
    """A checkpoint this run wrote or resumed from: where, and the position it holds."""

    path: Path
    epoch: int
    iteration: int

    def describe(self) -> str:
        return f"{self.path} (epoch {self.epoch}, iteration {self.iteration})"


def run_restart_count(group: DistContext | None) -> int:
    """torchrun's restart count, the highest of the ranks' (an agent that restarts its workers after
    another node's failure hands them 0: torchrun counts per agent). A collective under DDP."""
    count = restart_count()
    return count if group is None else max(group.gather_objects(count))


def read_resume_state(opt: TrainOptions, run_dir: Path) -> dict[str, Any] | None:
    """The checkpoint ``--continue_train --epoch`` names (``{"plain": True}`` for network files only), or
    None without ``--continue_train``."""
    if not opt.continue_train:
        return None
    path = checkpoint_path(run_dir, opt.epoch)
    if not path.exists() and plain_network_path(run_dir, opt.epoch, "G").exists():
        return {"plain": True}
    # Every rank reads the same file, onto the CPU: the RNG states must be CPU tensors, and
    # load_state_dict copies weights and optimizer states onto each rank's own device.
    return load_checkpoint(path, map_location="cpu")


def agree_on_resume_state(
    group: DistContext, run_dir: Path, resumed: dict[str, Any] | None, error: Exception | None
) -> None:
    """Every rank's view of the checkpoint it read (a collective): all fail together if one could not
    read it, or if they read different ones (a --checkpoints_dir that is not shared between machines).
    A rank whose own read failed (``error``) takes part and returns: its caller raises that error."""
    if error is not None:
        view: tuple[Any, ...] = ("error", f"{type(error).__name__}: {error}")
    elif resumed is None:
        view = ("none",)
    elif resumed.get("plain"):
        view = ("plain",)
    else:
        view = ("checkpoint", resumed["epoch"], resumed["epoch_iter"], resumed["iteration"])
    views = group.gather_objects(view)
    if error is not None:
        return
    failed = [(rank, v[1]) for rank, v in enumerate(views) if v[0] == "error"]
    if failed:
        rank, message = failed[0]
        raise ValueError(f"rank {rank} could not read the checkpoint to continue from: {message}")
    if len(set(views)) > 1:
        seen = ", ".join(f"rank {rank}: {_describe_view(v)}" for rank, v in enumerate(views))
        raise ValueError(
            f"the processes read different checkpoints in {run_dir} ({seen}): every process must "
            f"see the same --checkpoints_dir (on several machines, a shared folder)"
        )


def _describe_view(view: tuple[Any, ...]) -> str:
    if view[0] == "checkpoint":
        return f"epoch {view[1]}, {view[2]} images into it, iteration {view[3]}"
    return {"none": "none (starts anew)", "plain": "network files only"}.get(view[0], str(view))


def resume_hint(
    run_dir: Path, saved: SavedCheckpoint | None, under_way: SavedCheckpoint | None, restart: int
) -> str:
    """The last checkpoint, and how to resume from it. A save interrupted by the failure (``under_way``)
    may have been completed by rank 0 (its files are written before the ranks agree that they are)."""
    latest = checkpoint_path(run_dir, "latest")
    if saved is None and under_way is None and not latest.is_file():
        return f"No checkpoint saved yet in {run_dir}: a restart or rerun starts over"
    if saved is None and under_way is None:
        text = f"Last checkpoint: {latest} (written before this start)"
    elif saved is None:
        assert under_way is not None
        text = f"Last checkpoint: {under_way.describe()} if rank 0 finished writing it, else none yet"
    else:
        text = f"Last checkpoint: {saved.describe()}"
        if under_way is not None:
            text += f", or {under_way.describe()} if rank 0 finished writing it"
    left = max_restarts() - restart
    how = "rerun the same command with --continue_train"
    if left > 0:
        how = (
            f"torchrun restarts the workers ({left} of --max-restarts {max_restarts()} left; "
            f"counted per machine) and they resume from it; else {how}"
        )
    return f"{text}; to resume: {how}"


def lost_peer_error(group: DistContext, error: BaseException, where: str, hint: str) -> PeerLostError | None:
    """A collective's failure caused by another process (dead, gone or hung) as one line: who I am, who is
    gone, ``where`` training stopped and ``hint`` (:func:`resume_hint`); None for any other error."""
    if not isinstance(error, Exception):
        return None
    what = describe_peer_failure(group, error)
    if what is None:
        return None
    me = group.peers[group.rank].describe() if len(group.peers) > group.rank else f"rank {group.rank}"
    return PeerLostError(
        f"{me} of {group.world_size}: {what}; training stopped {where}. {hint}. (--debug shows the traceback)"
    )
