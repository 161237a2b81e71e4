"""BatchNorm running statistics: ``nn.BatchNorm2d``'s update, applied at once or deferred and batched.

A fused block returns its batch statistics and the running ones are updated here, as ``nn.BatchNorm2d``
does inside ``F.batch_norm``: ``running = lerp(running, batch, momentum)`` with the unbiased batch
variance, and the layer's batch counter ``num_batches_tracked`` incremented. Done per layer that is three
tiny kernels (the variance's scale, the two lerps in one foreach call, the counter): 66 launches for the 22
BatchNorm layer passes of one unet_256 + PatchGAN iteration, each moving a few kilobytes.

Inside :func:`deferred_running_stats` the updates wait and are applied together, one foreach call per kind
(three kernels for all waiting layers). The arithmetic is the same ops on the same values, so the result
is bit for bit the immediate update's. Two updates of one layer never share a call (on a GPU the two writes
would race): a layer updated again (D runs three times per iteration; a grouped block updates once per
group) waits in the next *round*, and the rounds are applied in order, which keeps each layer's updates in
order. Nothing in a training forward reads the running statistics, so the delay is invisible to it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

__all__ = ["count_batch", "deferred_running_stats", "immediate_running_stats", "update_running_stats"]


@dataclass
class _Round:
    """Updates applied together, each tensor written at most once: per layer its running statistics, batch
    mean and momentum, with the batch variance and its unbiasing factor; the counters to increment; the ids of
    every tensor they write."""

    layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]] = field(default_factory=list)
    variances: list[torch.Tensor] = field(default_factory=list)
    factors: list[float] = field(default_factory=list)
    counters: list[torch.Tensor] = field(default_factory=list)
    written: set[int] = field(default_factory=set)

    def touches(self, *tensors: torch.Tensor) -> bool:
        return any(id(t) in self.written for t in tensors)

    def apply(self) -> None:
        with torch.no_grad():
            # Out of place: the batch variances are the ops' outputs, which autograd saved for the backward.
            unbiased = torch._foreach_mul(self.variances, self.factors) if self.variances else []
            by_momentum: dict[float, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
            for (running_mean, running_var, batch_mean, momentum), batch_var in zip(
                self.layers, unbiased, strict=True
            ):
                running, batch = by_momentum.setdefault(momentum, ([], []))
                running += [running_mean, running_var]
                batch += [batch_mean.to(running_mean.dtype), batch_var.to(running_var.dtype)]
            for momentum, (running, batch) in by_momentum.items():
                torch._foreach_lerp_(running, batch, momentum)
            if self.counters:
                torch._foreach_add_(self.counters, 1)
        self.layers.clear()
        self.variances.clear()
        self.factors.clear()
        self.counters.clear()
        self.written.clear()


@dataclass
class _Waiting:
    """The updates not yet applied, in rounds applied one after the other."""

    rounds: list[_Round] = field(default_factory=list)

    def round_for(self, *tensors: torch.Tensor) -> _Round:
        """The round after the last one that writes any of ``tensors`` (a new one if there is none)."""
        index = 0
        for i, waiting in enumerate(self.rounds):
            if waiting.touches(*tensors):
                index = i + 1
        if index == len(self.rounds):
            self.rounds.append(_Round())
        return self.rounds[index]

    def apply(self) -> None:
        for waiting in self.rounds:
            waiting.apply()
        self.rounds.clear()


# The updates waiting in the open deferred_running_stats(), or None. A plain module global (not a thread
# local or a ContextVar): torch.compile traces reads of it, and training runs a network in one thread.
_waiting: _Waiting | None = None


@contextlib.contextmanager
def deferred_running_stats() -> Iterator[None]:
    """Hold the running-statistic updates and batch counts of the fused blocks until the block ends, then
    apply them in three foreach kernels per round (a layer updated again waits in the next round). Nested
    uses join the outer one. An error inside still applies the updates of the layers that ran, as the
    immediate updates would have."""
    global _waiting
    if _waiting is not None:
        yield
        return
    _waiting = waiting = _Waiting()
    try:
        yield
    finally:
        _waiting = None
        waiting.apply()


@contextlib.contextmanager
def immediate_running_stats() -> Iterator[None]:
    """Suspend an open :func:`deferred_running_stats` for code that reads the running statistics right after
    updating them (the kernel check, which may first run inside a training iteration); what waits stays
    waiting."""
    global _waiting
    suspended, _waiting = _waiting, None
    try:
        yield
    finally:
        _waiting = suspended


def update_running_stats(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    batch_mean: torch.Tensor,
    batch_var: torch.Tensor,
    count: int,
    momentum: float,
) -> None:
    """The running-statistics update of ``nn.BatchNorm2d`` (unbiased variance over ``count`` values per
    channel), in place; deferred inside :func:`deferred_running_stats`."""
    if count <= 1:
        raise ValueError(f"update_running_stats: need more than 1 value per channel, got {count}")
    factor = count / (count - 1)
    waiting = _waiting
    if waiting is None:
        with torch.no_grad():
            unbiased_var = batch_var * factor
            # Both in one foreach call (one kernel on CUDA, not two); the same lerp as Tensor.lerp_.
            torch._foreach_lerp_(
                [running_mean, running_var],
                [batch_mean.to(running_mean.dtype), unbiased_var.to(running_var.dtype)],
                momentum,
            )
        return
    later = waiting.round_for(running_mean, running_var)
    later.layers.append((running_mean, running_var, batch_mean, momentum))
    later.variances.append(batch_var)
    later.factors.append(factor)
    later.written.update((id(running_mean), id(running_var)))


def count_batch(num_batches_tracked: torch.Tensor) -> None:
    """``num_batches_tracked += 1``; deferred inside :func:`deferred_running_stats`."""
    waiting = _waiting
    if waiting is None:
        num_batches_tracked.add_(1)  # an integer buffer: autograd never sees it
        return
    later = waiting.round_for(num_batches_tracked)
    later.counters.append(num_batches_tracked)
    later.written.add(id(num_batches_tracked))
