"""The one building block of every network: convolution -> optional norm -> activation.

The official pix2pix code orders its layers activation -> conv -> norm. fastpix2pix regroups the same
sequence as conv -> norm -> *the activation the next layer starts with*, so that each group is one
fused op (:func:`fastpix2pix.ops.reference.conv_bn_act` or :func:`~fastpix2pix.ops.reference.conv_bias_act`).
The parameters live in ordinary ``nn.Conv2d`` / ``nn.ConvTranspose2d`` / ``nn.BatchNorm2d`` submodules,
so a state_dict is the same whichever backend computes the block. Norm ``syncbatch`` holds a
:class:`~fastpix2pix.ops.sync_bn.SyncBatchNorm2d` (a BatchNorm2d: same state_dict) and takes its training
statistics over the whole process group (:mod:`fastpix2pix.ops.sync_bn`).
"""

from __future__ import annotations

import warnings
from types import ModuleType
from typing import Any

import torch
from torch import nn

from fastpix2pix.ops.backend import default_backend, get_backend
from fastpix2pix.ops.reference import activation, convolution
from fastpix2pix.ops.running_stats import count_batch
from fastpix2pix.ops.sync_bn import SyncBatchNorm2d, reference_sync_batch_norm, sync_bn_act, sync_group

NORMS = ("batch", "syncbatch", "instance", "none")
_BATCH_NORMS = ("batch", "syncbatch")
# Also nn.SyncBatchNorm, so that a "batch" network converted by nn.SyncBatchNorm.convert_sync_batchnorm
# synchronises instead of silently normalising with local statistics.
_SYNC_BATCH_NORM_TYPES = (SyncBatchNorm2d, nn.SyncBatchNorm)

RELU = 0.0
LEAKY_RELU = 0.2
IDENTITY = 1.0

__all__ = ["IDENTITY", "LEAKY_RELU", "NORMS", "RELU", "ConvBlock", "Network", "check_norm", "conv_bias_for"]


def check_norm(norm: str) -> str:
    """Validate a norm name early, so a typo fails at construction rather than deep inside a layer."""
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {NORMS}")
    return norm


def conv_bias_for(norm: str) -> bool:
    """The official bias rule for convs followed by a norm layer (or by the ``none`` placeholder).

    BatchNorm's shift makes a conv bias redundant; the official code also leaves it out under
    ``none`` (its placeholder is not InstanceNorm), and keeps it only under InstanceNorm (affine=False).
    """
    return check_norm(norm) == "instance"


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


class ConvBlock(nn.Module):
    """Convolution (or transposed convolution) -> optional norm -> LeakyReLU(``negative_slope``).

    ``negative_slope`` 0.0 is ReLU, 0.2 LeakyReLU, 1.0 the identity. BatchNorm and norm-free blocks run
    on the selected backend; InstanceNorm blocks always run in plain PyTorch (there is no fused kernel
    for them, and pix2pix uses them only as an option).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        *,
        transposed: bool = False,
        output_padding: int = 0,
        norm: str = "none",
        bias: bool = False,
        negative_slope: float = IDENTITY,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        check_norm(norm)
        if norm in _BATCH_NORMS and bias:
            raise ValueError(
                "ConvBlock: a conv followed by BatchNorm has no bias (the norm's shift replaces it)"
            )
        if transposed:
            self.conv: nn.Conv2d | nn.ConvTranspose2d = nn.ConvTranspose2d(
                in_channels, out_channels, kernel_size, stride, padding, output_padding, bias=bias
            )
        else:
            if output_padding:
                raise ValueError("ConvBlock: output_padding only applies to a transposed convolution")
            self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=bias)
        self.norm: nn.BatchNorm2d | nn.InstanceNorm2d | None = _make_norm(norm, out_channels)
        self.norm_kind = norm
        self.negative_slope = float(negative_slope)
        self.transposed = transposed
        # Plain tuples, computed once: forward passes them straight to the op.
        self._stride = _pair(stride)
        self._padding = _pair(padding)
        self._output_padding = _pair(output_padding)
        self._is_batch_norm = norm == "batch"
        self._is_instance_norm = norm == "instance"
        self._backend_name = ""
        self._ops: ModuleType | None = None
        self.backend = default_backend() if backend is None else backend
        # A low-precision copy of conv.weight that an optimizer keeps (see _autocast_inputs); None: cast.
        self.compute_weight: torch.Tensor | None = None

    @property
    def backend(self) -> str:
        """Name of the backend computing this block ("fused" or "reference")."""
        return self._backend_name

    @backend.setter
    def backend(self, name: str) -> None:
        self._ops = get_backend(name)
        self._backend_name = name

    @property
    def ops(self) -> ModuleType:
        """The ops module of this block's backend (:mod:`fastpix2pix.ops.fused` or ``reference``), for the
        network around it to compute its joins with (the U-Net skip connections)."""
        assert self._ops is not None
        return self._ops

    def forward(self, x: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """The block on ``x``; ``groups`` > 1 splits the batch into that many equal consecutive parts that
        BatchNorm normalises as separate batches (one after the other, as separate calls would; the other
        layers treat every item alike anyway): two batches in one pass through the convolutions."""
        if isinstance(self.norm, _SYNC_BATCH_NORM_TYPES):
            return self._forward_sync_batch_norm(x, groups)
        if self._is_batch_norm:
            return self._forward_batch_norm(x, groups)
        if self._is_instance_norm:
            return activation(self.norm(self.conv(x)), self.negative_slope)
        x, weight = _autocast_inputs(x, self.conv.weight, self.compute_weight)
        conv = self.conv
        return self._ops.conv_bias_act(
            x,
            weight,
            conv.bias,
            stride=self._stride,
            padding=self._padding,
            output_padding=self._output_padding,
            transposed=self.transposed,
            negative_slope=self.negative_slope,
        )

    def _forward_batch_norm(self, x: torch.Tensor, groups: int = 1) -> torch.Tensor:
        bn = self.norm
        training = self.training
        if training and groups != 1 and bn.momentum is None:
            raise ValueError(
                "ConvBlock: groups > 1 needs a BatchNorm momentum (with momentum None each group would "
                "average with its own count)"
            )
        momentum = _step_momentum(bn, training, groups)
        x, weight = _autocast_inputs(x, self.conv.weight, self.compute_weight)
        return self._ops.conv_bn_act(
            x,
            weight,
            bn.weight,
            bn.bias,
            bn.running_mean,
            bn.running_var,
            stride=self._stride,
            padding=self._padding,
            output_padding=self._output_padding,
            transposed=self.transposed,
            training=training,
            momentum=momentum,
            eps=bn.eps,
            negative_slope=self.negative_slope,
            groups=groups,
        )

    def _forward_sync_batch_norm(self, x: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """conv (ATen) -> BatchNorm with the process group's statistics -> activation."""
        bn = self.norm
        group = sync_group(bn.process_group) if self.training else None
        if group is None:  # eval, or no other process: exactly the batch-norm block (one fused op)
            return self._forward_batch_norm(x, groups)
        if groups != 1:
            raise ValueError(
                "ConvBlock: groups > 1 is not supported with BatchNorm synchronised across processes"
            )
        conv = self.conv
        x, weight = _autocast_inputs(x, conv.weight, self.compute_weight)
        y = convolution(
            x, weight, conv.bias, self._stride, self._padding, self._output_padding, self.transposed
        )
        args = (y, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        stats = {
            "training": True,
            "momentum": _step_momentum(bn, True),
            "eps": bn.eps,
            "process_group": group,
        }
        if self._backend_name == "fused":
            return sync_bn_act(*args, **stats, negative_slope=self.negative_slope)
        return activation(reference_sync_batch_norm(*args, **stats), self.negative_slope)

    def extra_repr(self) -> str:
        return f"norm={self.norm_kind}, negative_slope={self.negative_slope}, backend={self.backend!r}"

    # A Python module object cannot be pickled or deep-copied; keep the name and look the module up again.
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_ops"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("compute_weight", None)  # pickled before the attribute existed
        try:
            self._ops = get_backend(self._backend_name)
        except RuntimeError:  # pickled with "fused", loaded where the extension is not built
            warnings.warn(
                f"ConvBlock: backend {self._backend_name!r} is not available here; using 'reference'",
                stacklevel=2,
            )
            self.backend = "reference"


def _autocast_inputs(
    x: torch.Tensor, weight: torch.Tensor, compute_weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The activation and conv weight in the autocast dtype when autocast is on for ``x``'s device.

    The fused ops have no autocast kernels, so without this they would run in float32 under autocast
    while the reference's ATen conv runs in bf16; casting here makes both backends compute the same
    thing. Only these two are cast: conv biases, BatchNorm parameters and running statistics stay float32
    (the kernels take them as float32), and the weight's gradient flows back through the cast as float32.

    ``compute_weight``, when given in the autocast dtype, is used instead of casting ``weight``: a copy that
    an optimizer rewrites after each step (:class:`fastpix2pix.training.master_weights.MasterWeightAdam`),
    which then receives the gradient, in that dtype, in place of ``weight``.
    """
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return x, weight
    dtype = torch.get_autocast_dtype(device_type)
    if compute_weight is not None and compute_weight.dtype == dtype:
        if compute_weight.requires_grad != weight.requires_grad:  # follow set_requires_grad(net, ...)
            compute_weight.requires_grad_(weight.requires_grad)
        return x.to(dtype), compute_weight
    return x.to(dtype), weight.to(dtype)


def _step_momentum(bn: nn.modules.batchnorm._BatchNorm, training: bool, batches: int = 1) -> float:
    """What ``nn.BatchNorm2d`` does around ``F.batch_norm``: count batches (``batches`` of them: a grouped
    block's groups), pick the momentum."""
    momentum = bn.momentum
    if training:
        if momentum is None:  # cumulative moving average, as nn.BatchNorm2d: the count is read now
            bn.num_batches_tracked.add_(1)
            momentum = 1.0 / float(bn.num_batches_tracked)
        else:
            for _ in range(batches):  # deferred in a fast-path iteration (ops.running_stats)
                count_batch(bn.num_batches_tracked)
    return 0.0 if momentum is None else momentum


def _make_norm(norm: str, channels: int) -> nn.BatchNorm2d | nn.InstanceNorm2d | None:
    """The official norm layers: BatchNorm with affine and running stats; InstanceNorm with neither."""
    if norm == "batch":
        return nn.BatchNorm2d(channels, affine=True, track_running_stats=True)
    if norm == "syncbatch":
        return SyncBatchNorm2d(channels, affine=True, track_running_stats=True)
    if norm == "instance":
        return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)
    return None


class Network(nn.Module):
    """Base of the generators and discriminators: switches the backend of all their blocks at once."""

    def set_backend(self, name: str) -> Network:
        """Compute every :class:`ConvBlock` with backend ``name``; parameters and state are untouched."""
        get_backend(name)  # fail before changing anything
        for module in self.modules():
            if isinstance(module, ConvBlock):
                module.backend = name
        return self

    @property
    def backend(self) -> str:
        """The blocks' backend name ("mixed" if they were set differently one by one)."""
        names = {m.backend for m in self.modules() if isinstance(m, ConvBlock)}
        return names.pop() if len(names) == 1 else "mixed"
