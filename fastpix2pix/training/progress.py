"""Where training is and what it measured: the position, and the losses kept on the device until logged."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from fastpix2pix.training.distributed import DistContext
from fastpix2pix.training.step import LOSS_NAMES, NonFiniteLossError

# --- the loss window: losses kept on the device until a logging point -------------------------------


class LossWindow:
    """The per-iteration loss tensors since the last read-back, and where each was computed."""

    def __init__(self) -> None:
        self._losses: list[torch.Tensor] = []
        self._where: list[tuple[int, int]] = []
        self.data_time = 0.0
        self.started = time.perf_counter()

    def __len__(self) -> int:
        return len(self._losses)

    def add(self, losses: Mapping[str, torch.Tensor], epoch: int, iteration: int) -> None:
        self._losses.append(torch.stack([losses[name] for name in LOSS_NAMES]))
        self._where.append((epoch, iteration))

    def read(self, group: DistContext | None = None) -> tuple[np.ndarray, float, float]:
        """``(losses [n, len(LOSS_NAMES)], seconds per iteration, data seconds per iteration)``; resets.

        With a ``group``, the losses are the means over its ranks (every rank must call this at the same
        point: the windows have the same length, the ranks step in lockstep). Raises NonFiniteLossError
        naming the first non-finite loss, its epoch and iteration (and the ranks that saw one), on every
        rank alike.
        """
        n = len(self._losses)
        bad_ranks: list[int] = []
        if not n:
            values = np.zeros((0, len(LOSS_NAMES)))
        elif group is None:
            values = torch.stack(self._losses).float().cpu().numpy()
        else:
            values, bad_ranks = _reduce_losses(torch.stack(self._losses).float(), group)
        elapsed = time.perf_counter() - self.started
        bad = np.argwhere(~np.isfinite(values))
        if len(bad):
            row, column = bad[0]
            epoch, iteration = self._where[row]
            where = f" (non-finite on rank(s) {bad_ranks})" if group is not None else ""
            raise NonFiniteLossError(
                f"loss {LOSS_NAMES[column]} is {values[row, column]} at epoch {epoch}, iteration "
                f"{iteration}{where}: training stopped; the last good checkpoint is kept (try a lower --lr)"
            )
        per_iter = elapsed / n if n else 0.0
        data_per_iter = self.data_time / n if n else 0.0
        self._losses, self._where, self.data_time = [], [], 0.0
        self.started = time.perf_counter()
        return values, per_iter, data_per_iter


def _reduce_losses(losses: torch.Tensor, group: DistContext) -> tuple[np.ndarray, list[int]]:
    """The ranks' mean losses [n, len(LOSS_NAMES)] and the ranks whose own losses were not all finite.

    One all_reduce per logging point, of the window and one flag per rank: no collective per iteration.
    A NaN on any rank makes the mean NaN, so every rank raises together and none is left waiting.
    """
    flags = torch.zeros(group.world_size, device=losses.device)
    flags[group.rank] = (~torch.isfinite(losses)).any().float()
    summed = group.all_reduce(torch.cat([losses.flatten(), flags])).cpu()
    n = losses.numel()
    values = (summed[:n].view(losses.shape) / group.world_size).numpy()
    return values, torch.nonzero(summed[n:]).flatten().tolist()


def crossed(before: int, after: int, every: int) -> bool:
    """Whether a counter going from ``before`` to ``after`` passed a multiple of ``every``."""
    return every > 0 and after // every > before // every


# --- the trainer ------------------------------------------------------------------------------------


@dataclass
class Progress:
    """Where training is: what a checkpoint records to resume from."""

    epoch: int = 1  # the epoch in progress (or about to start)
    epoch_iter: int = 0  # images of ``epoch`` already trained on
    iteration: int = 0  # optimizer steps in total
    images: int = 0  # images trained on in total (the official ``total_iters``)
    epoch_loss_sums: dict[str, float] | None = None  # per-epoch sums (for the plateau policy)
    epoch_loss_count: int = 0
