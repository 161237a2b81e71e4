"""Synchronised BatchNorm for data-parallel training: statistics over the whole process group.

With ``DistributedDataParallel`` each process sees only its share of the batch. Plain BatchNorm then
normalises with *local* statistics, so W processes with batch n each do not train the network that one
process with batch W*n would. Synchronised BatchNorm takes the statistics over all the processes'
values, which makes the two equal (outputs, gradients and running statistics).

Two implementations with the same semantics:

- :func:`sync_bn_act`: the fused path. BatchNorm + activation on the fused per-device ops; one
  ``all_gather`` of (mean, var, count) in the forward, one ``all_reduce`` of the two per-channel
  gradient sums in the backward.
- :func:`reference_sync_batch_norm`: plain PyTorch, differentiated by autograd through differentiable
  collectives. It is the independent check of the fused path and the ``backend="reference"`` path.

Both fall back to plain (local) batch norm when there is nothing to synchronise with: no initialised
process group, or a group of one process. :class:`SyncBatchNorm2d` is the module that holds the
parameters (same state_dict as ``nn.BatchNorm2d``).

The gradient algebra. Let L_r be the loss that process r differentiates and L = (1/W) * sum_r L_r the
loss that DDP trains (it averages the parameter gradients). The normalised output of every process depends
on every process's input through the shared statistics, so the correct input gradient on process r is
d(sum_s L_s)/dy_r: the local upstream gradients of all processes meet in the statistics' gradient. That is
what the ``all_reduce`` of the per-channel sums (sum dz, sum dz*xhat) gives the backward formula.
Everything upstream (the convolution's weight gradient) then holds process r's part of d(sum_s L_s)/dw,
and DDP's average of those parts is (1/W) * d(sum_s L_s)/dw = dL/dw. The BatchNorm weight and bias enter
the output elementwise, so d(sum_s L_s)/dgamma is the sum over processes of each one's *local* sum
(dz * xhat); returning the local sums lets DDP's average produce dL/dgamma. Returning the global sums
instead would be counted W times (DDP sums the ranks' grads before dividing by W).

The second half of the module is the runtime of data-parallel training under ``torchrun``:
:func:`init_distributed` reads torchrun's environment and joins the process group, :class:`DistContext`
is what the trainer knows about it (rank, world size, device) plus the few collectives it needs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn

from fastpix2pix.ops.running_stats import update_running_stats

__all__ = ["SyncBatchNorm2d", "combine_batch_stats", "reference_sync_batch_norm", "sync_bn_act", "sync_group"]

ProcessGroup = Any  # torch.distributed.ProcessGroup when torch is built with distributed support


def sync_group(process_group: ProcessGroup | None = None) -> ProcessGroup | None:
    """The group to synchronise over (``process_group``, or the default one), or None when there is
    nothing to synchronise with: no initialised process group, or a group of one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = dist.group.WORLD if process_group is None else process_group
    return group if dist.get_world_size(group) > 1 else None


def combine_batch_stats(
    means: torch.Tensor, variances: torch.Tensor, counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of the union of W batches, from each batch's own.

    ``means``, ``variances``: (W, C); ``counts``: (W,), values per channel in each batch (0 allowed).
    This is Chan, Golub & LeVeque's parallel formula (M2 = M2_a + M2_b + delta^2 * n_a * n_b / n) for W
    parts at once: M2 = sum_r n_r * var_r + sum_r n_r * (mean_r - mean)^2. It works with deviations from
    the means rather than sums of squares, so it does not cancel catastrophically, and weights every part
    by its count, so unequal batches (a last smaller one, an empty one) combine exactly.
    Returns (mean, var, total count); call it in float64 where the counts may exceed 2**24.
    """
    present = (counts > 0).unsqueeze(1)
    # An empty part carries no information; zero it so that a garbage (even NaN) mean cannot leak in.
    means = torch.where(present, means, torch.zeros_like(means))
    variances = torch.where(present, variances, torch.zeros_like(variances))
    total = counts.sum()
    weights = (counts / total).unsqueeze(1)
    mean = (weights * means).sum(0)
    var = (weights * (variances + (means - mean).square())).sum(0)
    return mean, var, total


# --- the fused path --------------------------------------------------------------------------------------


def sync_bn_act(
    y: torch.Tensor,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    *,
    training: bool,
    momentum: float,
    eps: float,
    negative_slope: float,
    process_group: ProcessGroup | None = None,
) -> torch.Tensor:
    """BatchNorm2d over the whole process group -> LeakyReLU(``negative_slope``), on the fused ops.

    ``y`` is the (N, C, H, W) input of the norm (a convolution's output); N may differ between processes,
    and may be 0. Training: the statistics of all processes' values normalise, and the running statistics
    (when given) are updated in place with them as ``nn.SyncBatchNorm`` does (unbiased variance over the
    global count). Eval: the running statistics normalise and nothing is communicated. Without a group to
    synchronise with (see :func:`sync_group`) this is plain batch norm. The statistics cost one host sync
    per call (the global count is a Python int for the ops).
    """
    lib = _fused_ops()
    group = sync_group(process_group) if training else None
    if training:
        mean, var, count = _batch_stats(lib, y, group)
        if running_mean is not None and running_var is not None:
            update_running_stats(running_mean, running_var, mean, var, count, momentum)
    else:
        mean, var, count = _eval_stats(y, running_mean, running_var)
    return _BnAct.apply(y, bn_weight, bn_bias, mean, var, count, training, eps, negative_slope, group)


def _fused_ops() -> Any:
    """``torch.ops.fastpix2pix``, its Python registrations loaded (ImportError with a hint when not built)."""
    from fastpix2pix.ops import fused  # noqa: F401  (registers the fake kernels; raises when the library is missing)

    return torch.ops.fastpix2pix


def _stats_dtype(y: torch.Tensor) -> torch.dtype:
    return torch.float64 if y.dtype == torch.float64 else torch.float32


def _values_per_channel(y: torch.Tensor) -> int:
    return y.numel() // y.shape[1] if y.shape[1] else 0


def _local_stats(lib: Any, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """This process's per-channel (mean, biased var, count)."""
    count = _values_per_channel(y)
    if count > 1:
        mean, var = lib.bn_stats(y)
        return mean, var, count
    # bn_stats refuses 0 or 1 values per channel (no variance to estimate from them), but across processes
    # they still count: a rank with an empty last batch contributes nothing, one value contributes itself.
    per_channel = y.transpose(0, 1).reshape(y.shape[1], -1).to(_stats_dtype(y))
    mean = per_channel.sum(1)  # the value itself, or 0 when empty
    return mean, torch.zeros_like(mean), count


def _batch_stats(
    lib: Any, y: torch.Tensor, group: ProcessGroup | None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel (mean, biased var, count) of the values of every process in ``group`` (or local).

    Constants for autograd: their gradient is part of the backward formula of :class:`_BnAct`.
    """
    mean, var, count = _local_stats(lib, y.detach())
    if group is not None:
        mean, var, count = _gather_and_combine(mean, var, count, group)
    if count <= 1:  # every process sees the same global count, so all raise together: no hang
        raise ValueError(
            f"sync_bn_act: expected more than 1 value per channel when training, got {count} in all "
            f"(local input size {tuple(y.shape)})"
        )
    return mean, var, count


def _gather_and_combine(
    mean: torch.Tensor, var: torch.Tensor, count: int, group: ProcessGroup
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One all_gather of every process's (mean, var, count) row, combined with Chan's formula.

    All-gather rather than all-reduce: the counts may differ, so the means cannot simply be averaged.
    float64 keeps the counts exact and makes the combination's own rounding negligible; the row has only
    2C + 1 values.
    """
    channels = mean.numel()
    row = torch.cat([mean.double(), var.double(), mean.new_full((1,), count, dtype=torch.float64)])
    rows = [torch.empty_like(row) for _ in range(dist.get_world_size(group))]
    dist.all_gather(rows, row, group=group)
    table = torch.stack(rows)
    global_mean, global_var, total = combine_batch_stats(
        table[:, :channels], table[:, channels : 2 * channels], table[:, 2 * channels]
    )
    return global_mean.to(mean.dtype), global_var.to(var.dtype), int(total.item())


def _eval_stats(
    y: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    if running_mean is None or running_var is None:
        raise ValueError("sync_bn_act: eval mode (training=False) needs running_mean and running_var")
    dtype = _stats_dtype(y)
    return running_mean.to(dtype), running_var.to(dtype), _values_per_channel(y)


def _all_reduce_sums(
    sum_dz: torch.Tensor, sum_dz_xhat: torch.Tensor, group: ProcessGroup
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both per-channel sums over the group in one collective (one latency instead of two)."""
    both = torch.cat([sum_dz, sum_dz_xhat])
    dist.all_reduce(both, op=dist.ReduceOp.SUM, group=group)
    return both[: sum_dz.numel()], both[sum_dz.numel() :]


class _BnAct(torch.autograd.Function):
    """act(BatchNorm(y)) with given statistics; the backward treats them as those of the whole group.

    Inputs: y, weight, bias (differentiable), mean, var (the statistics: global in training, running in
    eval; treated as functions of y in training through the backward formula, not through autograd),
    count (their global values per channel) and constants. Group None: nothing to synchronise.
    """

    @staticmethod
    def forward(
        ctx: Any,
        y: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        mean: torch.Tensor,
        var: torch.Tensor,
        count: int,
        training: bool,
        eps: float,
        negative_slope: float,
        group: ProcessGroup | None,
    ) -> torch.Tensor:
        ctx.save_for_backward(y, weight, bias, mean, var)
        ctx.count, ctx.training, ctx.eps, ctx.negative_slope, ctx.group = (
            count,
            training,
            eps,
            negative_slope,
            group,
        )
        if y.numel() == 0:  # an empty local batch: nothing to compute (the kernels want values)
            return torch.empty_like(y)
        return torch.ops.fastpix2pix.bn_act_forward(y, mean, var, weight, bias, eps, negative_slope)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        y, weight, bias, mean, var = ctx.saved_tensors
        need_y, need_weight, need_bias = ctx.needs_input_grad[:3]
        sum_dz, sum_dz_xhat = _local_grad_sums(ctx, grad_out, y, weight, bias, mean, var)
        grad_y = (
            _grad_input(ctx, grad_out, y, weight, bias, mean, var, sum_dz, sum_dz_xhat) if need_y else None
        )
        # LOCAL sums: DDP averages them across processes into dL/dgamma (see the module docstring).
        grad_weight = sum_dz_xhat.to(weight.dtype) if need_weight else None
        grad_bias = sum_dz.to(bias.dtype) if need_bias else None
        return grad_y, grad_weight, grad_bias, *([None] * 7)


def _local_grad_sums(
    ctx: Any,
    grad_out: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's (sum dz, sum dz*xhat), dz = grad_out * act'(z); zeros where nobody reads them."""
    need_y, need_weight, need_bias = ctx.needs_input_grad[:3]
    if y.numel() == 0 or not (need_weight or need_bias or (need_y and ctx.training)):
        return torch.zeros_like(mean), torch.zeros_like(mean)
    return torch.ops.fastpix2pix.bn_act_backward_reduce(
        grad_out,
        y,
        mean,
        var,
        weight,
        bias,
        ctx.eps,
        ctx.negative_slope,
    )


def _grad_input(
    ctx: Any,
    grad_out: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    sum_dz: torch.Tensor,
    sum_dz_xhat: torch.Tensor,
) -> torch.Tensor:
    """grad_y = gamma * invstd * (dz - sum_dz / count - xhat * sum_dz_xhat / count) with the group's sums.

    In training the statistics depend on every process's y: the mean's and the variance's gradients are
    the terms with the sums, and with the sums over the group this is d(sum_s L_s)/dy_r. A process with an
    empty batch still joins the collective (with zeros), or the others would wait for it forever.
    """
    if ctx.training and ctx.group is not None:
        sum_dz, sum_dz_xhat = _all_reduce_sums(sum_dz, sum_dz_xhat, ctx.group)
    if y.numel() == 0:
        return torch.empty_like(y)
    return torch.ops.fastpix2pix.bn_act_backward_apply(
        grad_out,
        y,
        mean,
        var,
        weight,
        bias,
        sum_dz,
        sum_dz_xhat,
        ctx.count,
        ctx.eps,
        ctx.negative_slope,
        ctx.training,
    )


# --- the reference path ----------------------------------------------------------------------------------


def reference_sync_batch_norm(
    y: torch.Tensor,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    *,
    training: bool,
    momentum: float,
    eps: float,
    process_group: ProcessGroup | None = None,
) -> torch.Tensor:
    """BatchNorm over the whole process group in plain PyTorch, the semantics of :func:`sync_bn_act`
    without the activation.

    Autograd differentiates it end to end: the collectives are differentiable (the gradient of a sum
    all-reduce is the sum all-reduce of the gradients), so no backward formula is written by hand.
    Two-pass statistics (mean, then the centred squares) in float32 or wider. Without a group to
    synchronise with, or in eval, this is ``F.batch_norm``.
    """
    group = sync_group(process_group) if training else None
    if group is None:
        return F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    shape = (1, -1, *([1] * (y.dim() - 2)))
    dims = [0, *range(2, y.dim())]
    x = y.to(torch.promote_types(y.dtype, torch.float32))
    # The sums in float64 so that the count is exact; the count rides along (a constant: no gradient).
    local_count = x.new_full((1,), _values_per_channel(y), dtype=torch.float64)
    totals = _all_reduce_sum(torch.cat([x.sum(dims).double(), local_count]), group)
    count = totals[-1]
    mean = (totals[:-1] / count).to(x.dtype)
    centred = x - mean.view(shape)
    var = (_all_reduce_sum(centred.square().sum(dims).double(), group) / count).to(x.dtype)
    total = int(count.item())
    if total <= 1:
        raise ValueError(f"reference_sync_batch_norm: expected more than 1 value per channel, got {total}")
    out = centred * torch.rsqrt(var + eps).view(shape)
    if bn_weight is not None:
        out = out * bn_weight.view(shape)
    if bn_bias is not None:
        out = out + bn_bias.view(shape)
    if running_mean is not None and running_var is not None:
        with torch.no_grad():  # nn.SyncBatchNorm's update: the global unbiased variance
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
            running_var.lerp_((var * (total / (total - 1))).to(running_var.dtype), momentum)
    return out.to(y.dtype)


def _all_reduce_sum(tensor: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """A differentiable sum all-reduce (torch's functional collective; its backward all-reduces too).

    ``torch.distributed.nn.functional.all_reduce`` computes the same but is deprecated in favour of this.
    """
    return funcol.all_reduce(tensor, "sum", group)


# --- the module ------------------------------------------------------------------------------------------


class SyncBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training statistics are taken over ``process_group`` (default: all).

    Same parameters, buffers and state_dict keys as ``nn.BatchNorm2d``, so checkpoints interchange, and
    it *is* a BatchNorm2d for code that looks for one (weight init, weight-decay exclusion). Why not
    ``nn.SyncBatchNorm``: that refuses CPU tensors, and DDP refuses a CPU module holding one, while this
    works on every device (CPU training with gloo included). :class:`~fastpix2pix.models.layers.ConvBlock`
    reads its parameters and computes it on its own backend; called directly, it runs
    :func:`reference_sync_batch_norm`.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: ProcessGroup | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as nn.BatchNorm2d
                momentum = 1.0 / float(self.num_batches_tracked)
        use_running = not self.training or self.track_running_stats
        return reference_sync_batch_norm(
            input,
            self.weight,
            self.bias,
            self.running_mean if use_running else None,
            self.running_var if use_running else None,
            training=self.training or self.running_mean is None,
            momentum=momentum,
            eps=self.eps,
            process_group=self.process_group,
        )
