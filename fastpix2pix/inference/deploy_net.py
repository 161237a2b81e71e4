"""The generator as it runs when deployed: BatchNorm folded into the convolutions under ``--eval``."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from fastpix2pix.models.generators import ResnetGenerator, UnetGenerator
from fastpix2pix.models.layers import ConvBlock
from fastpix2pix.ops.reference import activation

__all__ = ["PROTOCOLS", "DeployBlock", "check_protocol", "deploy_network", "fold_batch_norm"]
PROTOCOLS = ("eval", "paper")

PROTOCOL_TEXT = {
    "eval": "BatchNorm uses its running statistics (folded into the conv weights); any batch size",
    "paper": "BatchNorm uses the statistics of the test batch (the paper's test protocol); batch 1, where "
    "it is instance normalisation with BatchNorm's affine parameters",
}


# --- the network that is exported ---------------------------------------------------------------------


class DeployBlock(nn.Module):
    """conv (with bias) -> optional instance norm (with optional affine) -> activation, in plain ops.

    What a :class:`ConvBlock` becomes in an exported network: under ``eval`` a BatchNorm is folded into
    the conv (no norm here), under ``paper`` it becomes ``instance_norm`` with its weight and bias
    (``from_batch_norm``: the batch statistics of a batch of one).
    """

    def __init__(
        self,
        conv: nn.Conv2d | nn.ConvTranspose2d,
        negative_slope: float,
        *,
        instance_norm: bool = False,
        norm_weight: torch.Tensor | None = None,
        norm_bias: torch.Tensor | None = None,
        eps: float = 1e-5,
        from_batch_norm: bool = False,
    ) -> None:
        super().__init__()
        self.conv = conv
        self.negative_slope = float(negative_slope)
        self.instance_norm = instance_norm
        self.from_batch_norm = from_batch_norm
        self.eps = float(eps)
        self.norm_weight = None if norm_weight is None else nn.Parameter(norm_weight, requires_grad=False)
        self.norm_bias = None if norm_bias is None else nn.Parameter(norm_bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.instance_norm:
            y = F.instance_norm(y, weight=self.norm_weight, bias=self.norm_bias, eps=self.eps)
        return activation(y, self.negative_slope)

    def extra_repr(self) -> str:
        return f"instance_norm={self.instance_norm}, negative_slope={self.negative_slope}"


def fold_batch_norm(
    conv: nn.Conv2d | nn.ConvTranspose2d, bn: nn.BatchNorm2d
) -> nn.Conv2d | nn.ConvTranspose2d:
    """A copy of ``conv`` computing ``bn(conv(x))`` with ``bn``'s running statistics, as one conv with bias.

    BatchNorm in eval is ``y * s + (beta - mean * s)`` with ``s = gamma / sqrt(var + eps)`` per output
    channel; the scale goes into the weight's output-channel axis (dim 0 of a Conv2d weight, dim 1 of a
    ConvTranspose2d weight) and the shift into the bias. Computed in float64 so the only rounding is the
    final cast to the conv's dtype.
    """
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("fold_batch_norm: the BatchNorm has no running statistics to fold")
    dtype = conv.weight.dtype
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(bn.running_var).double()
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(bn.running_mean).double()
    scale = gamma / torch.sqrt(bn.running_var.double() + bn.eps)
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(scale)
    shape = (1, -1, 1, 1) if isinstance(conv, nn.ConvTranspose2d) else (-1, 1, 1, 1)
    folded = copy.deepcopy(conv)
    folded.weight = nn.Parameter((conv.weight.detach().double() * scale.view(shape)).to(dtype))
    folded.bias = nn.Parameter((beta + (bias - bn.running_mean.double()) * scale).to(dtype))
    return folded.requires_grad_(False)


def _deploy_block(block: ConvBlock, protocol: str) -> DeployBlock:
    conv = copy.deepcopy(block.conv).requires_grad_(False)
    norm = block.norm
    if isinstance(norm, nn.BatchNorm2d):
        if protocol == "eval":
            return DeployBlock(fold_batch_norm(conv, norm), block.negative_slope)
        weight = None if norm.weight is None else norm.weight.detach().clone()
        bias = None if norm.bias is None else norm.bias.detach().clone()
        return DeployBlock(
            conv, block.negative_slope, instance_norm=True, norm_weight=weight, norm_bias=bias, eps=norm.eps,
            from_batch_norm=True,
        )  # fmt: skip
    if isinstance(norm, nn.InstanceNorm2d):  # the official InstanceNorm: no affine, no running statistics
        return DeployBlock(conv, block.negative_slope, instance_norm=True, eps=norm.eps)
    return DeployBlock(conv, block.negative_slope)


def check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {PROTOCOLS}")


def deploy_network(G: nn.Module, protocol: str = "eval", dropout: bool = False) -> nn.Module:
    """A copy of generator ``G`` in plain PyTorch ops (same device and dtype), in eval mode, computing
    ``protocol``.

    ``eval``: G.eval()'s function, BatchNorm folded. ``paper``: G.train()'s function at batch 1 (batch
    statistics), without touching any running statistics. ``dropout`` keeps the generator's dropout
    layers (if it has them) active; otherwise there is no dropout. G itself is not changed.
    """
    check_protocol(protocol)
    if not isinstance(G, UnetGenerator | ResnetGenerator):
        raise TypeError(f"deploy_network needs a fastpix2pix generator, got {type(G).__name__}")
    net = copy.deepcopy(G).eval()
    blocks = [(name, m) for name, m in net.named_modules() if isinstance(m, ConvBlock)]
    for name, block in blocks:
        parent_name, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent_name), child, _deploy_block(block, protocol))
    # Dropout follows keep_dropout_in_eval in an eval-mode generator (see generators._dropout_active).
    net.use_dropout = bool(G.use_dropout and dropout)
    net.keep_dropout_in_eval = True
    net.fastpix2pix_protocol = protocol
    return net.requires_grad_(False)


def has_batch_norm(G: nn.Module) -> bool:
    return any(isinstance(m, nn.BatchNorm2d) for m in G.modules())


def check_export_batch(G: nn.Module, protocol: str, batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    if protocol == "paper" and batch_size != 1 and has_batch_norm(G):
        raise ValueError(
            f"--protocol paper exports batch 1 only (got batch {batch_size}): with BatchNorm, the paper's "
            "protocol normalises with the whole test batch's statistics, which is instance normalisation "
            "only at batch 1; use --protocol eval for batched inference"
        )
