"""The public fused ops: the kernels where the start-up check passed on the device, else the reference ops."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from fastpix2pix.ops import kernels, reference
from fastpix2pix.ops.running_stats import update_running_stats
from fastpix2pix.ops.selfcheck import adam_kernel_usable, fused_kernels_usable

__all__ = [
    "adam_kernel_runs",
    "adam_master_step_",
    "conv_bias_act",
    "conv_bn_act",
    "gan_loss",
    "gan_losses",
    "l1_loss",
    "relu_cat",
    "update_running_stats",
]


F = TypeVar("F", bound=Callable[..., torch.Tensor])


@torch.compiler.assume_constant_result
def _usable(device: torch.device) -> bool:
    # A constant for torch.compile: the verdict is a per-device fact, fixed for the process.
    return fused_kernels_usable(device)


def _self_checked(fallback: Callable[..., torch.Tensor]) -> Callable[[F], F]:
    """Run ``fallback`` (the reference op) instead on a device where the kernel check failed
    (:mod:`fastpix2pix.ops.selfcheck`, which also runs that check the first time a device is used)."""

    def decorate(fused: F) -> F:
        @functools.wraps(fused)
        def call(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            if _usable(x.device):
                return fused(x, *args, **kwargs)
            return fallback(x, *args, **kwargs)

        return call  # type: ignore[return-value]

    return decorate


conv_bn_act = _self_checked(reference.conv_bn_act)(kernels.conv_bn_act)
conv_bias_act = _self_checked(reference.conv_bias_act)(kernels.conv_bias_act)
gan_loss = _self_checked(reference.gan_loss)(kernels.gan_loss)
gan_losses = _self_checked(reference.gan_losses)(kernels.gan_losses)
l1_loss = _self_checked(reference.l1_loss)(kernels.l1_loss)
relu_cat = _self_checked(reference.relu_cat)(kernels.relu_cat)


def adam_kernel_runs(device: torch.device) -> bool:
    """Whether :func:`adam_master_step_` runs its kernel on ``device``: the device's kernel check and the
    optimizer kernel's own (:func:`fastpix2pix.ops.selfcheck.adam_kernel_usable`) passed."""
    return _usable(device) and adam_kernel_usable(device)


def adam_master_step_(params: Sequence[torch.Tensor], *args: Sequence[torch.Tensor], **hyper: Any) -> None:
    """The kernel where :func:`adam_kernel_runs`; the reference elsewhere."""
    if adam_kernel_runs(params[0].device if params else torch.device("cpu")):
        kernels.adam_master_step_(params, *args, **hyper)
    else:
        reference.adam_master_step_(params, *args, **hyper)
