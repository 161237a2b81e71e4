"""The order of samples in an epoch, a function of (seed, epoch) only, so that a resume reproduces it."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = [
    "SAMPLER_ORDER_STREAM",
    "SOURCE_ORDER_STREAM",
    "DistributedEpochSampler",
    "EpochSampler",
    "IntsLike",
    "checked_order",
    "default_epoch_order",
    "stream_seed",
]

# Two rules, one per kind of data source; each keeps the order's random stream apart from the augmentation
# draws of the same seed. Existing checkpoints resume along them: neither value may change.
# The plain trainer's sampler (EpochSampler): SeedSequence([seed, epoch, SAMPLER_ORDER_STREAM]), apart from
# the per-sample augmentation streams (seed, epoch, index).
SAMPLER_ORDER_STREAM = 0xFFFFFFFF
# The fast trainer's batch sources (device, streaming): stream_seed(seed, epoch, SOURCE_ORDER_STREAM), apart
# from their augmentation stream (2).
SOURCE_ORDER_STREAM = 1

IntsLike = torch.Tensor | Sequence[int] | np.ndarray


def stream_seed(seed: int, epoch: int, stream: int) -> int:
    """A 63-bit seed for one (seed, epoch, stream): independent streams via numpy's SeedSequence."""
    state = np.random.SeedSequence([seed, epoch, stream]).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


def default_epoch_order(size: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    """The sample order of ``epoch`` when the caller gives none: ``0..size-1`` without ``shuffle``, else a
    permutation that is a function of ``(seed, epoch)`` only (so a resumed run reproduces it)."""
    if not shuffle:
        return torch.arange(size)
    generator = torch.Generator().manual_seed(stream_seed(seed, epoch, SOURCE_ORDER_STREAM))
    return torch.randperm(size, generator=generator)


def checked_order(order: IntsLike, size: int) -> torch.Tensor:
    """``order`` as a CPU int64 tensor, after checking that it is a permutation of ``0..size-1``."""
    order_t = torch.as_tensor(order, dtype=torch.int64).cpu()
    if order_t.shape != (size,) or not torch.equal(order_t.sort().values, torch.arange(size)):
        raise ValueError(f"order must be a permutation of 0..{size - 1}, got {order_t.shape[0]} indices")
    return order_t


class EpochSampler(Sampler[int]):
    """Sample order that is a function of ``(seed, epoch)`` only, and can start part-way into an epoch.

    This is what makes a mid-epoch resume exact: the resumed run rebuilds the epoch's permutation and
    skips the samples the checkpoint had already trained on, without loading them.
    """

    def __init__(self, size: int, seed: int, shuffle: bool) -> None:
        self.size = size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch = epoch
        self.start = start

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        stream = np.random.SeedSequence([self.seed, epoch, SAMPLER_ORDER_STREAM]).generate_state(2, np.uint64)
        generator = torch.Generator().manual_seed(int(stream[0] >> np.uint64(1)))
        return torch.randperm(self.size, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.order(self.epoch)[self.start :])

    def __len__(self) -> int:
        return max(0, self.size - self.start)


class DistributedEpochSampler(EpochSampler):
    """This rank's share of :class:`EpochSampler`'s order: ``order[rank::world_size]``.

    Every rank computes the same permutation from ``(seed, epoch)`` (the ``set_epoch`` semantics of
    ``DistributedSampler``), padded by repeating its first samples to a multiple of ``world_size`` so that
    every rank runs the same number of iterations (a rank with one batch fewer would leave the others
    waiting in a collective). Rank r's k-th sample is the epoch's (k * world_size + r)-th: step t of
    world_size ranks with batch n covers the global batch t of one process with batch world_size * n.
    ``start`` counts this rank's samples already done in the epoch.
    """

    def __init__(self, size: int, seed: int, shuffle: bool, rank: int, world_size: int) -> None:
        super().__init__(size, seed, shuffle)
        self.rank = rank
        self.world_size = world_size

    @property
    def per_rank(self) -> int:
        return math.ceil(self.size / self.world_size)

    def shard(self, epoch: int) -> list[int]:
        order = self.order(epoch)
        padding = self.per_rank * self.world_size - len(order)
        padded = order + (order * math.ceil(padding / max(1, len(order))))[:padding]
        return padded[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.shard(self.epoch)[self.start :])

    def __len__(self) -> int:
        return max(0, self.per_rank - self.start)
