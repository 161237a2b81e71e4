"""Plain-PyTorch versions of every fastpix2pix op.

This module is the specification: the fused ops in :mod:`fastpix2pix.ops` compute the same functions
(same signatures, same results within floating-point tolerance). Tests compare against it, benchmarks
use it as the eager and ``torch.compile`` baseline, and models fall back to it when the compiled
extension is missing or ``backend="reference"`` is chosen.

Activations are described by one number, ``negative_slope``: LeakyReLU with that slope, so ``0.0`` is
ReLU and ``1.0`` is the identity.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

GAN_MODES = ("vanilla", "lsgan")


def activation(x: torch.Tensor, negative_slope: float) -> torch.Tensor:
    """LeakyReLU with ``negative_slope`` (0.0 is ReLU, 1.0 the identity)."""
    if negative_slope == 1.0:
        return x
    if negative_slope == 0.0:
        return F.relu(x)
    return F.leaky_relu(x, negative_slope)


def convolution(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    output_padding: Sequence[int],
    transposed: bool,
) -> torch.Tensor:
    """A 2-D convolution, or a transposed convolution when ``transposed``. A float32 bias with bf16 (or
    fp16) activations, as ConvBlock passes them under autocast, is cast as autocast would cast it."""
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    if transposed:
        return F.conv_transpose2d(x, weight, bias, stride, padding, output_padding)
    return F.conv2d(x, weight, bias, stride, padding)


def conv_bn_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    *,
    stride: Sequence[int] = (1, 1),
    padding: Sequence[int] = (0, 0),
    output_padding: Sequence[int] = (0, 0),
    transposed: bool = False,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    negative_slope: float = 0.0,
    groups: int = 1,
) -> torch.Tensor:
    """Convolution (no bias) -> BatchNorm2d -> activation.

    In training the batch statistics normalise and the running statistics (when given) are updated in
    place exactly as ``nn.BatchNorm2d`` does; in eval the running statistics normalise.

    ``groups`` splits the batch into that many equal consecutive parts, normalised in training as separate
    batches would be, one after the other (each updates the running statistics in turn): the
    discriminator's fake and real pairs as one batch. In eval the running statistics normalise every part.
    """
    check_batch_groups(x.shape[0] if x.dim() else 0, groups, "conv_bn_act")
    y = convolution(x, weight, None, stride, padding, output_padding, transposed)
    if training and groups > 1:
        parts = [
            F.batch_norm(part, running_mean, running_var, bn_weight, bn_bias, True, momentum, eps)
            for part in y.chunk(groups)
        ]
        return activation(torch.cat(parts), negative_slope)
    y = F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    return activation(y, negative_slope)


def check_batch_groups(batch: int, groups: int, op: str) -> None:
    """A batch of ``batch`` items splits into ``groups`` equal consecutive parts (``groups`` >= 1)."""
    if groups < 1 or batch % groups:
        raise ValueError(f"{op}: a batch of {batch} does not split into groups={groups} equal parts")


def conv_bias_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    stride: Sequence[int] = (1, 1),
    padding: Sequence[int] = (0, 0),
    output_padding: Sequence[int] = (0, 0),
    transposed: bool = False,
    negative_slope: float = 1.0,
) -> torch.Tensor:
    """Convolution with an optional bias -> activation (the norm-free layers)."""
    y = convolution(x, weight, bias, stride, padding, output_padding, transposed)
    return activation(y, negative_slope)


def relu_cat(skip: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The U-Net skip connection: ``cat([relu(skip), x], 1)``. The official up level applies ReLU to this
    concatenation; ``x`` (the level below's output) has its ReLU already, folded into its block."""
    return torch.cat([F.relu(skip), x], 1)


def gan_loss(logits: torch.Tensor, target_is_real: bool, mode: str = "vanilla") -> torch.Tensor:
    """Mean GAN loss of a patch map against an all-real (1) or all-fake (0) target, in float32 or wider."""
    if mode not in GAN_MODES:
        raise ValueError(f"gan_loss: mode must be one of {GAN_MODES}, got {mode!r}")
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    target = torch.full_like(logits, 1.0 if target_is_real else 0.0)
    if mode == "vanilla":
        return F.binary_cross_entropy_with_logits(logits, target)
    return F.mse_loss(logits, target)


def gan_losses(logits: torch.Tensor, targets_are_real: Sequence[bool], mode: str = "vanilla") -> torch.Tensor:
    """The :func:`gan_loss` of each of ``len(targets_are_real)`` equal consecutive parts of the batch, part g
    against target ``targets_are_real[g]``: a 1-D tensor of the parts' losses (the discriminator's fake and
    real maps, computed as one batch)."""
    check_gan_losses_args(logits, targets_are_real, mode)
    parts = logits.chunk(len(targets_are_real)) if logits.shape[0] else [logits] * len(targets_are_real)
    return torch.stack(
        [gan_loss(part, real, mode) for part, real in zip(parts, targets_are_real, strict=True)]
    )


def check_gan_losses_args(logits: torch.Tensor, targets_are_real: Sequence[bool], mode: str) -> None:
    """:func:`gan_losses`'s arguments: a known mode, at least one target, a batch that splits into as many."""
    if mode not in GAN_MODES:
        raise ValueError(f"gan_losses: mode must be one of {GAN_MODES}, got {mode!r}")
    if not targets_are_real:
        raise ValueError("gan_losses: targets_are_real must name the target of at least one part")
    check_batch_groups(logits.shape[0] if logits.dim() else 0, len(targets_are_real), "gan_losses")


def l1_loss(pred: torch.Tensor, target: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """``weight * mean|pred - target|``, in float32 or wider."""
    acc = torch.promote_types(pred.dtype, torch.float32)
    return weight * F.l1_loss(pred.to(acc), target.to(acc))


def adam_master_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    copies: Sequence[torch.Tensor],
    steps: Sequence[torch.Tensor],
    *,
    lr: torch.Tensor | float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
) -> None:
    """``torch.optim.Adam``'s step (amsgrad off, not maximizing) on float32 master weights ``params`` from
    gradients in a lower precision, in place; then each copy becomes its weight rounded to the copies'
    dtype (the weight the next forward computes with). ``steps`` are the per-weight step counts (float32
    one-element tensors, as Adam keeps them), incremented first; ``lr`` a number or a one-element tensor."""
    with torch.no_grad():
        for param, grad, exp_avg, exp_avg_sq, copy, step in zip(
            params, grads, exp_avgs, exp_avg_sqs, copies, steps, strict=True
        ):
            step.add_(1)
            # Bias corrections from the step tensor, not its value: no host read, so the update can be
            # captured in a graph and replayed (as torch.optim.Adam's capturable mode does).
            count = step.to(param.device, param.dtype)
            step_size = lr / (1 - torch.pow(beta1, count))
            bias2_sqrt = (1 - torch.pow(beta2, count)).sqrt()
            grad32 = grad.to(param.dtype)
            if weight_decay:
                grad32 = grad32 + weight_decay * param
            exp_avg.lerp_(grad32, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad32, grad32, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / bias2_sqrt).add_(eps)
            param.sub_(exp_avg / denom * step_size)
            copy.copy_(param)
