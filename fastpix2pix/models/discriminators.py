"""The pix2pix discriminators: PatchGAN (``basic`` = 70x70, ``n_layers``) and PixelGAN (``pixel``).

Both output logits (no sigmoid), as the official code does with its ``vanilla`` / ``lsgan`` losses.
"""

from __future__ import annotations

import torch
from torch import nn

from fastpix2pix.models.layers import IDENTITY, LEAKY_RELU, ConvBlock, Network, check_norm, conv_bias_for

__all__ = ["NLayerDiscriminator", "PixelDiscriminator", "patch_receptive_field", "run_blocks"]


def patch_receptive_field(n_layers: int) -> int:
    """Input extent one output logit sees: 16, 34, 70, 142, 286 for n_layers 1..5 (kernel 4 everywhere).

    Walking back from the output: two stride-1 convs, then ``n_layers`` stride-2 convs.
    """
    field = 1
    for stride in [1, 1] + [2] * n_layers:
        field = field * stride + (4 - stride)
    return field


class NLayerDiscriminator(Network):
    """PatchGAN: ``n_layers`` stride-2 4x4 convs, one stride-1 conv, a 1-channel stride-1 output conv.

    Channels ndf * min(2**n, 8). The first conv has a bias and no norm; the output conv has a bias.
    """

    def __init__(
        self,
        input_nc: int,
        ndf: int = 64,
        n_layers: int = 3,
        norm: str = "batch",
        *,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"NLayerDiscriminator: n_layers must be >= 1, got {n_layers}")
        check_norm(norm)
        self.n_layers = n_layers
        bias = conv_bias_for(norm)
        widths = [ndf * min(2**n, 8) for n in range(n_layers + 1)]
        layers = [ConvBlock(input_nc, ndf, 4, 2, 1, bias=True, negative_slope=LEAKY_RELU, backend=backend)]
        for n in range(1, n_layers + 1):
            stride = 2 if n < n_layers else 1
            layers.append(
                ConvBlock(
                    widths[n - 1],
                    widths[n],
                    4,
                    stride,
                    1,
                    norm=norm,
                    bias=bias,
                    negative_slope=LEAKY_RELU,
                    backend=backend,
                )
            )
        layers.append(ConvBlock(widths[-1], 1, 4, 1, 1, bias=True, negative_slope=IDENTITY, backend=backend))
        self.layers = nn.Sequential(*layers)

    @property
    def receptive_field(self) -> int:
        return patch_receptive_field(self.n_layers)

    def forward(self, x: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """Logits of ``x``; ``groups``: see :func:`run_blocks`."""
        return run_blocks(self.layers, x, groups)


class PixelDiscriminator(Network):
    """PixelGAN (1x1 patches): 1x1 convs ndf -> LReLU -> 2*ndf -> norm -> LReLU -> 1.

    As in the official code, the last two convs have a bias only under InstanceNorm.
    """

    def __init__(
        self, input_nc: int, ndf: int = 64, norm: str = "batch", *, backend: str | None = None
    ) -> None:
        super().__init__()
        bias = conv_bias_for(norm)
        self.layers = nn.Sequential(
            ConvBlock(input_nc, ndf, 1, bias=True, negative_slope=LEAKY_RELU, backend=backend),
            ConvBlock(ndf, 2 * ndf, 1, norm=norm, bias=bias, negative_slope=LEAKY_RELU, backend=backend),
            ConvBlock(2 * ndf, 1, 1, bias=bias, negative_slope=IDENTITY, backend=backend),
        )

    def forward(self, x: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """Logits of ``x``; ``groups``: see :func:`run_blocks`."""
        return run_blocks(self.layers, x, groups)


def run_blocks(blocks: nn.Sequential, x: torch.Tensor, groups: int) -> torch.Tensor:
    """The blocks in order. ``groups`` > 1: the batch holds that many equal parts that BatchNorm normalises as
    separate batches (:meth:`ConvBlock.forward`), e.g. the fake and the real pairs of the D step: the same
    logits and statistics updates as one call per part, with one pass through the convolutions."""
    for block in blocks:
        x = block(x, groups)
    return x
