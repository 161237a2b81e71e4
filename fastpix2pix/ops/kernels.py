"""The fused ops: typed wrappers, fake (meta) kernels and autograd for ``torch.ops.fastpix2pix``.

The schemas and their documentation are in ``csrc/fastpix2pix.cpp``; the kernels in ``csrc/cpu`` and
``csrc/cuda``. The public functions here have the signatures of :mod:`fastpix2pix.ops.reference` and compute
the same results. Importing this module needs the compiled library (see :mod:`fastpix2pix.ops.backend`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastpix2pix._extension import REBUILD_HINT, extension_available
from fastpix2pix.ops.reference import GAN_MODES, check_batch_groups, check_gan_losses_args
from fastpix2pix.ops.running_stats import update_running_stats

__all__ = [
    "adam_master_step_",
    "conv_bias_act",
    "conv_bn_act",
    "gan_loss",
    "gan_losses",
    "l1_loss",
    "relu_cat",
]

if not extension_available():
    raise ImportError(f"fastpix2pix.ops needs the compiled library fastpix2pix._C: {REBUILD_HINT}")

_lib = torch.ops.fastpix2pix


# --- the ops, called directly (no self-check: fastpix2pix.ops.fused gates them) ----------------------


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
    """Convolution (no bias) -> BatchNorm2d -> activation: :func:`fastpix2pix.ops.reference.conv_bn_act`."""
    if x.dim() == 4:  # else the op names the problem
        check_batch_groups(x.shape[0], groups, "conv_bn_act")
    if training:
        _check_values_per_channel(x, weight, stride, padding, output_padding, transposed, groups)
    out, _, mean, var = _lib.conv_bn_act(
        x,
        weight,
        bn_weight,
        bn_bias,
        running_mean,
        running_var,
        list(stride),
        list(padding),
        list(output_padding),
        transposed,
        training,
        eps,
        negative_slope,
        groups,
    )
    # An empty batch has no statistics (bn_stats returns NaN): like nn.BatchNorm2d, leave the running ones.
    if training and running_mean is not None and running_var is not None and out.numel() > 0:
        _update_running_stats_by_group(running_mean, running_var, mean, var, out, momentum, groups)
    return out


def _update_running_stats_by_group(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    out: torch.Tensor,
    momentum: float,
    groups: int,
) -> None:
    """The groups' updates one after the other, as separate batches would make them."""
    channels = out.shape[1]
    count = out.numel() // (channels * groups)
    if groups == 1:
        update_running_stats(running_mean, running_var, mean, var, count, momentum)
        return
    for group_mean, group_var in zip(mean.split(channels), var.split(channels), strict=True):
        update_running_stats(running_mean, running_var, group_mean, group_var, count, momentum)


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
    """Convolution, optional bias -> activation: :func:`fastpix2pix.ops.reference.conv_bias_act`."""
    return _lib.conv_bias_act(
        x, weight, bias, list(stride), list(padding), list(output_padding), transposed, negative_slope
    )


def relu_cat(skip: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``cat([relu(skip), x], 1)`` in one pass: :func:`fastpix2pix.ops.reference.relu_cat`. Inputs of two
    dtypes are promoted first, as ``torch.cat`` promotes them."""
    if skip.dtype != x.dtype:
        dtype = torch.promote_types(skip.dtype, x.dtype)
        skip, x = skip.to(dtype), x.to(dtype)
    return _lib.relu_cat(skip, x)


def gan_loss(logits: torch.Tensor, target_is_real: bool, mode: str = "vanilla") -> torch.Tensor:
    """Mean GAN loss of a patch map; its gradient is computed in the same pass as the value."""
    if mode not in GAN_MODES:
        raise ValueError(f"gan_loss: mode must be one of {GAN_MODES}, got {mode!r}")
    loss, _ = _lib.gan_loss(logits, target_is_real, mode, _wants_grad(logits))
    return loss


def gan_losses(logits: torch.Tensor, targets_are_real: Sequence[bool], mode: str = "vanilla") -> torch.Tensor:
    """The GAN losses of the batch's equal parts against their targets in one op (values and gradient in the
    same pass): :func:`fastpix2pix.ops.reference.gan_losses`."""
    check_gan_losses_args(logits, targets_are_real, mode)
    losses, _ = _lib.gan_losses(logits, [bool(t) for t in targets_are_real], mode, _wants_grad(logits))
    return losses


def l1_loss(pred: torch.Tensor, target: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """``weight * mean|pred - target|``; its gradient is computed in the same pass as the value."""
    loss, _ = _lib.l1_loss(pred, target, weight, _wants_grad(pred, target))
    return loss


def adam_master_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    copies: Sequence[torch.Tensor],
    steps: Sequence[torch.Tensor],
    *,
    lr: torch.Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
) -> None:
    """Adam on float32 master weights from low-precision gradients, writing the low-precision copies (CPU
    and CUDA; ``lr`` a one-element float32 tensor on the params' device):
    :func:`fastpix2pix.ops.reference.adam_master_step_`."""
    _lib.adam_master_step_(
        list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(copies), list(steps),
        lr, beta1, beta2, weight_decay, eps,
    )  # fmt: skip


def _check_values_per_channel(
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    output_padding: Sequence[int],
    transposed: bool,
    groups: int = 1,
) -> None:
    """nn.BatchNorm2d's error for a training batch (per group) with one value per channel, raised before
    the op.

    The op checks this too, but on the first GPU run (H200, torch 2.11) that error, raised by the CUDA
    statistics kernel under the convolution, crashed the process instead of reaching Python (cause not found
    yet; see benchmarks/cuda_error_paths.py). A user's batch-1 1x1 input must get the message, not a crash.
    """
    if x.dim() != 4 or weight.dim() != 4:
        return  # the op's own checks name the problem
    spatial = 1
    for axis in (0, 1):
        size, kernel = x.shape[2 + axis], weight.shape[2 + axis]
        if transposed:
            spatial *= (size - 1) * stride[axis] - 2 * padding[axis] + kernel + output_padding[axis]
        else:
            spatial *= (size + 2 * padding[axis] - kernel) // stride[axis] + 1
    if x.shape[0] // groups * spatial == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size "
            f"{torch.Size([1, weight.shape[1] if transposed else weight.shape[0], 1, 1])}"
        )


def _wants_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


# --- fake kernels: shapes, dtypes and layouts only, for torch.compile and FakeTensor ----------------


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _channel_stats(x: torch.Tensor, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    channels = x.shape[1] * groups
    dtype = _stats_dtype(x)
    return x.new_empty(channels, dtype=dtype), x.new_empty(channels, dtype=dtype)


def _conv_fake(
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    output_padding: Sequence[int],
    transposed: bool,
) -> torch.Tensor:
    # ATen's own convolution meta kernel decides the shape and the memory format, as the real op does.
    return torch.ops.aten.convolution(x, weight, None, stride, padding, [1, 1], transposed, output_padding, 1)


def _conv_backward_fake(grad_y, x, weight, stride, padding, output_padding, transposed, need_x, need_weight):
    # ATen's convolution_backward meta kernel decides the layouts, as the real op's call does (they are not
    # empty_like's: an NCHW input with channels_last weights gets a channels_last grad_x, for one).
    if not (need_x or need_weight):
        return None, None
    mask = [need_x, need_weight, False]
    grad_x, grad_weight, _ = torch.ops.aten.convolution_backward(
        grad_y, x, weight, None, stride, padding, [1, 1], transposed, output_padding, 1, mask
    )
    return grad_x, grad_weight


@torch.library.register_fake("fastpix2pix::bn_stats")
def _bn_stats_fake(x, groups=1):
    return _channel_stats(x, groups)


@torch.library.register_fake("fastpix2pix::bn_act_forward")
def _bn_act_forward_fake(x, mean, var, weight, bias, eps, negative_slope, groups=1):
    return torch.empty_like(x)


@torch.library.register_fake("fastpix2pix::bn_act_backward_reduce")
def _bn_act_backward_reduce_fake(grad_out, x, mean, var, weight, bias, eps, negative_slope, groups=1):
    return _channel_stats(x, groups)


@torch.library.register_fake("fastpix2pix::bn_act_backward_apply")
def _bn_act_backward_apply_fake(
    grad_out, x, mean, var, weight, bias, sum_dz, sum_dz_xhat, count, eps, negative_slope, training, groups=1
):
    return torch.empty_like(x)


@torch.library.register_fake("fastpix2pix::bias_act_forward")
def _bias_act_forward_fake(x, bias, negative_slope):
    return torch.empty_like(x)


@torch.library.register_fake("fastpix2pix::bias_act_backward")
def _bias_act_backward_fake(grad_out, out, negative_slope, need_bias_grad):
    grad_bias = out.new_empty(out.shape[1], dtype=_stats_dtype(out)) if need_bias_grad else None
    return torch.empty_like(out), grad_bias


def _layout_of(t: torch.Tensor) -> torch.memory_format:
    # checks.h's layout_of: channels_last only for a tensor that is channels_last but not NCHW-contiguous.
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _with_channels(t: torch.Tensor, channels: int, layout: torch.memory_format) -> torch.Tensor:
    shape = (t.shape[0], channels, t.shape[2], t.shape[3])
    return torch.empty(shape, dtype=t.dtype, device=t.device, memory_format=layout)


@torch.library.register_fake("fastpix2pix::relu_cat")
def _relu_cat_fake(skip, x):
    return _with_channels(x, skip.shape[1] + x.shape[1], _layout_of(x))


@torch.library.register_fake("fastpix2pix::relu_cat_backward")
def _relu_cat_backward_fake(grad_out, skip):
    layout = _layout_of(grad_out)
    return (
        _with_channels(grad_out, skip.shape[1], layout),
        _with_channels(grad_out, grad_out.shape[1] - skip.shape[1], layout),
    )


@torch.library.register_fake("fastpix2pix::gan_loss")
def _gan_loss_fake(logits, target_is_real, mode, compute_grad):
    grad = torch.empty_like(logits) if compute_grad else None
    return logits.new_empty((), dtype=_stats_dtype(logits)), grad


@torch.library.register_fake("fastpix2pix::gan_losses")
def _gan_losses_fake(logits, targets_are_real, mode, compute_grad):
    grad = None
    if compute_grad:  # as the kernels: empty_like's strides, unless a group would not be one memory block
        grad = torch.empty_like(logits)
        if len(targets_are_real) > 1 and not _batch_outermost(grad):
            grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    return logits.new_empty(len(targets_are_real), dtype=_stats_dtype(logits)), grad


def _batch_outermost(t: torch.Tensor) -> bool:
    # checks.h's batch_outermost, for a dense tensor.
    return t.dim() == 0 or t.shape[0] <= 1 or t.stride(0) * t.shape[0] == t.numel()


@torch.library.register_fake("fastpix2pix::l1_loss")
def _l1_loss_fake(pred, target, weight, compute_grad):
    grad = torch.empty_like(pred) if compute_grad else None
    return pred.new_empty((), dtype=_stats_dtype(pred)), grad


@torch.library.register_fake("fastpix2pix::adam_master_step_")
def _adam_master_step_fake(params, grads, exp_avgs, exp_avg_sqs, copies, steps, lr, beta1, beta2, wd, eps):
    return None  # in place only


@torch.library.register_fake("fastpix2pix::conv_bn_act")
def _conv_bn_act_fake(
    x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, output_padding, transposed,
    training, eps, negative_slope, groups=1,
):  # fmt: skip
    conv_out = _conv_fake(x, weight, stride, padding, output_padding, transposed)
    # Eval normalises with the running statistics: C values whatever the groups.
    return (torch.empty_like(conv_out), conv_out, *_channel_stats(conv_out, groups if training else 1))


@torch.library.register_fake("fastpix2pix::conv_bn_act_backward")
def _conv_bn_act_backward_fake(
    grad_out, x, weight, conv_out, bn_weight, bn_bias, mean, var, stride, padding, output_padding, transposed,
    training, eps, negative_slope, output_mask, groups=1,
):  # fmt: skip
    grad_y = torch.empty_like(conv_out)  # bn_act_backward_apply's output
    conv_args = (stride, padding, output_padding, transposed)
    return (
        *_conv_backward_fake(grad_y, x, weight, *conv_args, output_mask[0], output_mask[1]),
        torch.empty_like(bn_weight) if output_mask[2] else None,
        torch.empty_like(bn_bias) if output_mask[3] else None,
    )


@torch.library.register_fake("fastpix2pix::conv_bias_act")
def _conv_bias_act_fake(x, weight, bias, stride, padding, output_padding, transposed, negative_slope):
    return torch.empty_like(_conv_fake(x, weight, stride, padding, output_padding, transposed))


@torch.library.register_fake("fastpix2pix::conv_bias_act_backward")
def _conv_bias_act_backward_fake(
    grad_out, x, weight, out, stride, padding, output_padding, transposed, negative_slope, output_mask
):
    # As conv_bias_act_backward: grad_out passes through when there is no activation nor bias grad.
    grad_y = torch.empty_like(out) if negative_slope != 1.0 or output_mask[2] else grad_out
    conv_args = (stride, padding, output_padding, transposed)
    return (
        *_conv_backward_fake(grad_y, x, weight, *conv_args, output_mask[0], output_mask[1]),
        out.new_empty(out.shape[1], dtype=_stats_dtype(out)) if output_mask[2] else None,
    )


# --- autograd: each forward op's backward is another op (or, for the losses, a saved gradient) ----


def _conv_bn_act_setup(ctx, inputs, output) -> None:
    (
        x,
        weight,
        bn_weight,
        bn_bias,
        _,
        _,
        stride,
        padding,
        output_padding,
        transposed,
        training,
        eps,
        slope,
        groups,
    ) = inputs  # the schema's defaults filled in: always all 14
    _, conv_out, mean, var = output
    ctx.mark_non_differentiable(conv_out, mean, var)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the outputs nothing differentiates
    ctx.save_for_backward(x, weight, conv_out, bn_weight, bn_bias, mean, var)
    ctx.conv_args = (stride, padding, output_padding, transposed)
    ctx.bn_args = (training, eps, slope)
    ctx.groups = groups


def _conv_bn_act_backward(ctx, grad_out, _grad_conv_out, _grad_mean, _grad_var):
    if grad_out is None:  # the block's output reached no loss
        return (None,) * 14
    x, weight, conv_out, bn_weight, bn_bias, mean, var = ctx.saved_tensors
    needs = ctx.needs_input_grad
    output_mask = [needs[0], needs[1], bn_weight is not None and needs[2], bn_bias is not None and needs[3]]
    grad_x, grad_weight, grad_bn_weight, grad_bn_bias = _lib.conv_bn_act_backward(
        grad_out,
        x,
        weight,
        conv_out,
        bn_weight,
        bn_bias,
        mean,
        var,
        *ctx.conv_args,
        *ctx.bn_args,
        output_mask,
        ctx.groups,
    )
    return (grad_x, grad_weight, grad_bn_weight, grad_bn_bias, *([None] * 10))


def _conv_bias_act_setup(ctx, inputs, output) -> None:
    x, weight, bias, stride, padding, output_padding, transposed, slope = inputs
    ctx.save_for_backward(x, weight, output)
    ctx.set_materialize_grads(False)
    ctx.has_bias = bias is not None
    ctx.conv_args = (stride, padding, output_padding, transposed)
    ctx.slope = slope


def _conv_bias_act_backward(ctx, grad_out):
    if grad_out is None:
        return (None,) * 8
    x, weight, out = ctx.saved_tensors
    needs = ctx.needs_input_grad
    output_mask = [needs[0], needs[1], ctx.has_bias and needs[2]]
    grad_x, grad_weight, grad_bias = _lib.conv_bias_act_backward(
        grad_out, x, weight, out, *ctx.conv_args, ctx.slope, output_mask
    )
    return (grad_x, grad_weight, grad_bias, *([None] * 5))


def _relu_cat_setup(ctx, inputs, output) -> None:
    skip, _ = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(skip)


def _relu_cat_backward(ctx, grad_out):
    if grad_out is None:
        return None, None
    (skip,) = ctx.saved_tensors
    grad_skip, grad_x = _lib.relu_cat_backward(grad_out, skip)
    needs = ctx.needs_input_grad
    return (grad_skip if needs[0] else None), (grad_x if needs[1] else None)


def _loss_setup(ctx, inputs, output) -> None:
    _, grad = output
    ctx.mark_non_differentiable(grad)
    ctx.set_materialize_grads(False)  # the saved gradient's own gradient is never needed: no zero-fill
    ctx.save_for_backward(grad)


def _saved_grad(ctx) -> torch.Tensor:
    (grad,) = ctx.saved_tensors
    if grad is None:
        raise RuntimeError(
            "fastpix2pix loss: backward called but the forward computed no gradient "
            "(compute_grad=False); call the op with compute_grad=True to differentiate it"
        )
    return grad


def _scaled_saved_grad(ctx, grad_loss: torch.Tensor) -> torch.Tensor:
    grad = _saved_grad(ctx)
    # grad_loss is 0-dim: it does not promote grad's dtype (a bf16 gradient stays bf16), and the multiply
    # reads it in its own dtype, so no cast kernel runs first.
    return grad * grad_loss


def _gan_loss_backward(ctx, grad_loss, _grad_grad):
    if grad_loss is None:
        return None, None, None, None
    return _scaled_saved_grad(ctx, grad_loss), None, None, None


def _gan_losses_setup(ctx, inputs, output) -> None:
    _loss_setup(ctx, inputs, output)
    ctx.groups = len(inputs[1])


def _gan_losses_backward(ctx, grad_losses, _grad_grad):
    if grad_losses is None:
        return None, None, None, None
    grad = _saved_grad(ctx)
    groups = ctx.groups
    # Each group's gradient scaled by its loss's: the batch viewed as [groups, items per group, ...] (a view
    # for any strides), the scales broadcast over it. The scales are cast, not the map (bf16 stays bf16).
    scale = grad_losses.to(grad.dtype).view(groups, *([1] * grad.dim()))
    grad_logits = (grad.unflatten(0, (groups, grad.shape[0] // groups)) * scale).flatten(0, 1)
    return grad_logits, None, None, None


def _l1_loss_backward(ctx, grad_loss, _grad_grad):
    if grad_loss is None:
        return None, None, None, None
    grad_pred = _scaled_saved_grad(ctx, grad_loss)
    grad_target = -grad_pred if ctx.needs_input_grad[1] else None
    return grad_pred, grad_target, None, None


torch.library.register_autograd(
    "fastpix2pix::conv_bn_act", _conv_bn_act_backward, setup_context=_conv_bn_act_setup
)
torch.library.register_autograd(
    "fastpix2pix::conv_bias_act", _conv_bias_act_backward, setup_context=_conv_bias_act_setup
)
torch.library.register_autograd("fastpix2pix::relu_cat", _relu_cat_backward, setup_context=_relu_cat_setup)
torch.library.register_autograd("fastpix2pix::gan_loss", _gan_loss_backward, setup_context=_loss_setup)
torch.library.register_autograd(
    "fastpix2pix::gan_losses", _gan_losses_backward, setup_context=_gan_losses_setup
)
torch.library.register_autograd("fastpix2pix::l1_loss", _l1_loss_backward, setup_context=_loss_setup)
