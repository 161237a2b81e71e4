"""One pix2pix iteration with the official semantics: the objective, the networks' steps and losses."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fastpix2pix.ops.backend import get_backend
from fastpix2pix.runs.networks import Networks

__all__ = [
    "LOSS_NAMES",
    "NonFiniteLossError",
    "Objective",
    "Optimizers",
    "set_requires_grad",
    "train_step",
    "unwrap",
]

LOSS_NAMES = ("G_GAN", "G_L1", "D_real", "D_fake")
"""The losses :func:`train_step` returns, named as in the official code (G_L1 includes lambda_L1)."""


class NonFiniteLossError(FloatingPointError):
    """A loss (or a weight) became NaN or infinite; the run stopped without saving that state."""


class Optimizers(NamedTuple):
    G: torch.optim.Optimizer
    D: torch.optim.Optimizer


@dataclass(frozen=True)
class Objective:
    """The pix2pix loss: ``gan_mode`` GAN loss plus ``lambda_L1`` x L1, computed by ``backend``'s ops."""

    gan_mode: str = "vanilla"
    lambda_L1: float = 100.0
    backend: str | None = None

    @property
    def ops(self) -> ModuleType:
        return get_backend(self.backend)


# --- one iteration ----------------------------------------------------------------------------------


def set_requires_grad(net: nn.Module, flag: bool) -> None:
    for parameter in net.parameters():
        parameter.requires_grad_(flag)


def unwrap(net: nn.Module) -> nn.Module:
    """The network inside a DistributedDataParallel wrapper (``net`` itself when not wrapped)."""
    return net.module if isinstance(net, DistributedDataParallel) else net


def train_step(
    nets: Networks,
    optimizers: Optimizers,
    batch: Mapping[str, torch.Tensor],
    objective: Objective,
    visuals: dict[str, torch.Tensor] | None = None,
    *,
    pairs_as_one_batch: bool = False,
) -> dict[str, torch.Tensor]:
    """One official pix2pix iteration on ``batch["A"]`` -> ``batch["B"]`` (tensors already on the device).

    1. fake_B = G(A), once.
    2. D step: D(A, fake_B.detach()) and D(A, B) as two separate forwards (two BatchNorm batches);
       loss_D = 0.5 * (GAN(fake, 0) + GAN(real, 1)); Adam(D).
    3. D frozen; G step through the updated D: GAN(D(A, fake_B), 1) + lambda_L1 * |fake_B - B|; Adam(G).

    ``pairs_as_one_batch``: the D step's two forwards as one, on the fake and the real pairs concatenated
    along the batch, which D's BatchNorm layers normalise as the two batches they are (``groups=2``: the
    same statistics, and the same running-statistic updates in the same order) and one op takes both losses
    of; the same function with half the D launches and no summing of two weight gradients (the fast path).

    Returns the detached losses :data:`LOSS_NAMES` as 0-dim tensors on the device (no host sync).
    If ``visuals`` is given, ``visuals["fake_B"]`` receives the detached generator output.
    """
    G, D = nets
    ops = objective.ops
    real_A, real_B = batch["A"], batch["B"]
    fake_B = G(real_A)
    # The fake pairs in the generator's dtype (bf16 under autocast): with a float32 real_A the concatenation
    # would be promoted to float32, which D's first convolution casts straight back (the same values).
    real_A_like_fake = real_A.to(fake_B.dtype)

    set_requires_grad(D, True)
    optimizers.D.zero_grad(set_to_none=True)
    fake_AB = torch.cat((real_A_like_fake, fake_B.detach()), 1)
    if pairs_as_one_batch:
        # The real pairs in the fake ones' dtype too: D's first convolution would cast them to it.
        pairs = torch.cat((fake_AB, torch.cat((real_A, real_B), 1).to(fake_AB.dtype)), 0)
        losses_D = ops.gan_losses(D(pairs, groups=2), (False, True), objective.gan_mode)
        loss_D_fake, loss_D_real = losses_D.unbind()
        (losses_D.sum() * 0.5).backward()  # the same sum as (fake + real) * 0.5: two terms, one rounding
    else:
        loss_D_fake = ops.gan_loss(D(fake_AB), False, objective.gan_mode)
        loss_D_real = ops.gan_loss(D(torch.cat((real_A, real_B), 1)), True, objective.gan_mode)
        ((loss_D_fake + loss_D_real) * 0.5).backward()
    optimizers.D.step()

    # Frozen so that the G loss's backward pass through D computes no D weight gradients. Under DDP the
    # forward goes through the bare D (unwrap): the G step needs only the gradient with respect to fake_B,
    # and DDP has no part in it. Through the wrapper it works only thanks to the freeze (no D parameter's
    # hook fires, so DDP's reducer starts no reduction; an unfrozen D would have its G-step gradients
    # all-reduced for nothing), and every forward pays DDP's bookkeeping; find_unused_parameters=True, the
    # usual advice, adds a traversal of the autograd graph after each of the 3 D forwards per iteration.
    # The bare D: no D communication in the G step, D's weights untouched and equal on all ranks.
    set_requires_grad(D, False)
    optimizers.G.zero_grad(set_to_none=True)
    D_frozen = unwrap(D)
    loss_G_GAN = ops.gan_loss(D_frozen(torch.cat((real_A_like_fake, fake_B), 1)), True, objective.gan_mode)
    loss_G_L1 = ops.l1_loss(fake_B, real_B, objective.lambda_L1)
    (loss_G_GAN + loss_G_L1).backward()
    optimizers.G.step()
    set_requires_grad(D, True)

    if visuals is not None:
        visuals["fake_B"] = fake_B.detach()
    return {
        "G_GAN": loss_G_GAN.detach(),
        "G_L1": loss_G_L1.detach(),
        "D_real": loss_D_real.detach(),
        "D_fake": loss_D_fake.detach(),
    }
