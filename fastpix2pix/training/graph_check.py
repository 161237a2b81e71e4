"""The CUDA-graph check: a replay of the fast trainer's captured iteration against eager iterations."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fastpix2pix.ops.selfcheck import relative_error
from fastpix2pix.training.fast_step import FastStep, default_generator

__all__ = ["GRAPH_TOLERANCE", "GraphCheck", "verify_captured_step"]

# A replay's update (weights, BatchNorm statistics, Adam moments) may differ from an eager iteration's by
# this fraction of the update itself, on top of 4x the eager-vs-eager spread measured in the same check
# (cuDNN may pick non-deterministic algorithms). A replay that reads a stale batch, skips a kernel or uses
# another learning rate differs by the order of the update (fraction ~1).
GRAPH_TOLERANCE = 0.05


# --- the CUDA graph check ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GraphCheck:
    """A replay compared with an eager iteration: the worst difference, as a fraction of the update."""

    error: float
    worst: str
    noise: float  # the same measure between two eager iterations
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.error <= self.tolerance

    def describe(self) -> str:
        return (
            f"replay vs eager: {self.worst} differs by {self.error:.3g} of its update "
            f"(eager vs eager {self.noise:.3g}, tolerance {self.tolerance:.3g})"
        )


def verify_captured_step(step: FastStep) -> GraphCheck:
    """Compare one replay of ``step``'s graph with eager iterations from the same state (see module doc).

    Runs two eager iterations and one replay, each from the saved state, then restores the state: the run
    trains exactly as without the check. Costs three iterations' time and one copy of the training state.
    """
    if step.graph is None:
        raise ValueError("verify_captured_step: the step has no captured graph")
    start = _TrainingState.save(step)
    try:
        eager = [start.run_from(step, step.iteration) for _ in range(2)]
        replay = start.run_from(step, step.graph.replay)
    finally:
        start.restore(step)
    noise, _ = _worst_difference(eager[0], eager[1], start.tensors)
    error, worst = _worst_difference(replay, eager[0], start.tensors)
    return GraphCheck(error, worst, noise, tolerance=GRAPH_TOLERANCE + 4 * noise)


@dataclass
class _TrainingState:
    """What an iteration changes: the training state tensors and every random generator it draws from."""

    tensors: dict[str, torch.Tensor]
    rng: torch.Tensor
    generators: list[torch.Tensor]
    data: Mapping[str, Any]

    @classmethod
    def save(cls, step: FastStep) -> _TrainingState:
        return cls(
            tensors=step._snapshot(),
            rng=_dropout_generator(step).get_state(),
            generators=[g.get_state() for g in step.source.generators()],
            data=step.source.state_dict(),
        )

    def restore(self, step: FastStep) -> None:
        step._restore(self.tensors)
        _dropout_generator(step).set_state(self.rng)
        for generator, state in zip(step.source.generators(), self.generators, strict=True):
            generator.set_state(state)
        step.source.load_state_dict(self.data)
        step.reset_losses()

    def run_from(self, step: FastStep, run: Callable[[], None]) -> dict[str, torch.Tensor]:
        """Restore, run one iteration, and return the state tensors and the losses it produced."""
        self.restore(step)
        step.prepare_batch()
        run()
        if step.device.type == "cuda":
            torch.cuda.synchronize(step.device)
        after = step._snapshot()
        after["losses"] = step.losses[:1].clone()
        return after


def _dropout_generator(step: FastStep) -> torch.Generator:
    return default_generator(step.device)


def _worst_difference(
    got: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], before: Mapping[str, torch.Tensor]
) -> tuple[float, str]:
    """The largest ``||got - expected|| / ||expected - before||`` over the state tensors (losses: relative
    to their value), with the tensor's name."""
    worst, name = 0.0, "nothing"
    for key, value in expected.items():
        if not value.is_floating_point():
            if not torch.equal(got[key], value):
                return math.inf, key
            continue
        reference_change = value - before[key] if key in before else value
        error = (
            relative_error(got[key], value)
            if key == "losses"
            else _update_error(got[key], value, reference_change)
        )
        if not error <= worst:  # NaN wins
            worst, name = error, key
    return worst, name


def _update_error(got: torch.Tensor, expected: torch.Tensor, change: torch.Tensor) -> float:
    diff = float((got.double() - expected.double()).norm())
    scale = float(change.double().norm())
    if scale == 0:
        return 0.0 if diff == 0 else math.inf
    return diff / scale
