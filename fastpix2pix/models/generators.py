"""The pix2pix generators: U-Net (``unet_256``, ``unet_128``) and ResNet (``resnet_9blocks``/``_6blocks``).

Both compute exactly the official functions (junyanz/pytorch-CycleGAN-and-pix2pix, ``models/networks.py``)
with the same parameter shapes, but as flat lists of :class:`~fastpix2pix.models.layers.ConvBlock`
rather than the official recursion, with each activation fused into the block before it:

- U-Net encoder level k: conv -> norm -> LeakyReLU(0.2). Its output feeds the next level *and* is the
  skip; the official code applies that LeakyReLU in place on the skip tensor too, and the decoder's
  ReLU(LeakyReLU(x)) = ReLU(x), so the skip is read back with a ReLU when it is concatenated.
- U-Net decoder level: convT -> norm -> ReLU (the ReLU the official next level starts with), then
  dropout where the official code has it; ReLU and dropout commute (dropout scales by 0 or 2).
- The innermost encoder conv is followed by ReLU (the official innermost up path starts with it).
"""

from __future__ import annotations

import itertools
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from fastpix2pix.models.layers import (
    IDENTITY,
    LEAKY_RELU,
    RELU,
    ConvBlock,
    Network,
    check_norm,
    conv_bias_for,
)
from fastpix2pix.ops import reference

__all__ = ["ResnetBlock", "ResnetGenerator", "UnetGenerator", "nearest_valid_sizes"]

DROPOUT_P = 0.5
_HALVE = {"kernel_size": 4, "stride": 2, "padding": 1}  # every U-Net conv halves (or convT doubles) H, W
MIN_UNET_DOWNS = 5  # the official construction always has these 5 levels (4 widening ones + innermost)


def nearest_valid_sizes(size: int, multiple: int) -> list[int]:
    """The multiples of ``multiple`` just below and above ``size`` (positive ones only)."""
    below = size // multiple * multiple
    return [s for s in (below, below + multiple) if s > 0]


def check_spatial_size(x: torch.Tensor, multiple: int, who: str) -> None:
    """Raise a ValueError naming the bad size and the nearest good ones, instead of a shape crash later."""
    height, width = x.shape[-2], x.shape[-1]
    if height % multiple == 0 and width % multiple == 0:
        return
    hint = ", ".join(
        f"{name} {' or '.join(map(str, nearest_valid_sizes(value, multiple)))}"
        for name, value in (("height", height), ("width", width))
        if value % multiple
    )
    raise ValueError(
        f"{who} needs height and width divisible by {multiple}, got {height}x{width}; "
        f"nearest valid sizes: {hint} (resize, crop or pad the input)"
    )


def _dropout_active(net: nn.Module, use_dropout: bool, keep_in_eval: bool) -> bool:
    return use_dropout and (net.training or keep_in_eval)


class UnetGenerator(Network):
    """U-Net with ``num_downs`` stride-2 levels; the official ``unet_256`` has 8, ``unet_128`` 7.

    Channels per encoder level: ngf * min(2**k, 8). Dropout(0.5) sits on the decoder levels that the
    official code gives it (those of the ``num_downs - 5`` middle 8*ngf levels: 4x4, 8x8 and 16x16
    for unet_256). Dropout follows ``self.training``, or stays on in eval if ``keep_dropout_in_eval``.
    """

    def __init__(
        self,
        input_nc: int,
        output_nc: int,
        num_downs: int,
        ngf: int = 64,
        norm: str = "batch",
        use_dropout: bool = False,
        *,
        keep_dropout_in_eval: bool = False,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if num_downs < MIN_UNET_DOWNS:
            raise ValueError(f"UnetGenerator: num_downs must be at least {MIN_UNET_DOWNS}, got {num_downs}")
        check_norm(norm)
        self.num_downs = num_downs
        self.use_dropout = use_dropout
        self.keep_dropout_in_eval = keep_dropout_in_eval
        self.size_multiple = 2**num_downs
        widths = [ngf * min(2**level, 8) for level in range(num_downs)]
        self.encoder = nn.ModuleList(self._encoder(input_nc, widths, norm, backend))
        self.decoder = nn.ModuleList(self._decoder(widths, norm, backend))
        # Decoder index j (0 = innermost) carries dropout for the official middle levels 1..num_downs-5.
        self.decoder_dropout = tuple(1 <= j <= num_downs - MIN_UNET_DOWNS for j in range(num_downs - 1))
        self.output = ConvBlock(
            2 * widths[0],
            output_nc,
            **_HALVE,
            transposed=True,
            bias=True,
            negative_slope=IDENTITY,
            backend=backend,
        )
        self._name = f"UnetGenerator(num_downs={num_downs})"

    @staticmethod
    def _encoder(input_nc: int, widths: list[int], norm: str, backend: str | None) -> list[ConvBlock]:
        """Level 0 and the innermost level have no norm; the innermost one feeds the ReLU of the up path."""
        bias = conv_bias_for(norm)
        last = len(widths) - 1
        blocks = []
        for level, (in_ch, out_ch) in enumerate(zip([input_nc, *widths[:-1]], widths, strict=True)):
            block_norm = "none" if level in (0, last) else norm
            slope = RELU if level == last else LEAKY_RELU
            blocks.append(
                ConvBlock(
                    in_ch, out_ch, **_HALVE, norm=block_norm, bias=bias, negative_slope=slope, backend=backend
                )
            )
        return blocks

    @staticmethod
    def _decoder(widths: list[int], norm: str, backend: str | None) -> list[ConvBlock]:
        """From the innermost level out; every level but the innermost reads [skip, up] (twice the width)."""
        up = {"transposed": True, "norm": norm, "bias": conv_bias_for(norm), "negative_slope": RELU}
        last = len(widths) - 1
        blocks = []
        for level in range(last, 0, -1):
            in_ch = widths[level] if level == last else 2 * widths[level]
            blocks.append(ConvBlock(in_ch, widths[level - 1], **_HALVE, **up, backend=backend))
        return blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_spatial_size(x, self.size_multiple, self._name)
        skips = []
        h = x
        for block in self.encoder:
            h = block(h)
            skips.append(h)
        skips.pop()  # the innermost output has no skip connection
        dropout = _dropout_active(self, self.use_dropout, self.keep_dropout_in_eval)
        for block, has_dropout in zip(self.decoder, self.decoder_dropout, strict=True):
            h = block(h)
            if dropout and has_dropout:
                h = F.dropout(h, DROPOUT_P, training=True)
            h = _join_ops(block).relu_cat(skips.pop(), h)  # cat([relu(skip), h]): official order, skip first
        return torch.tanh(self.output(h))


def _join_ops(block: nn.Module) -> ModuleType:
    """The ops a U-Net level joins its skip connection with: its block's backend for a :class:`ConvBlock`;
    the plain-PyTorch ops where a deployed network replaced the blocks (what export and the engines trace)."""
    return block.ops if isinstance(block, ConvBlock) else reference


def _reflect(x: torch.Tensor, pad: int) -> torch.Tensor:
    return F.pad(x, (pad, pad, pad, pad), mode="reflect")


class ResnetBlock(nn.Module):
    """x + [pad, conv3x3, norm, ReLU, (dropout), pad, conv3x3, norm](x), reflection pads; nothing after."""

    def __init__(self, dim: int, norm: str, backend: str | None = None) -> None:
        super().__init__()
        bias = conv_bias_for(norm)
        self.conv1 = ConvBlock(dim, dim, 3, norm=norm, bias=bias, negative_slope=RELU, backend=backend)
        self.conv2 = ConvBlock(dim, dim, 3, norm=norm, bias=bias, negative_slope=IDENTITY, backend=backend)

    def forward(self, x: torch.Tensor, dropout: bool = False) -> torch.Tensor:
        h = self.conv1(_reflect(x, 1))
        if dropout:
            h = F.dropout(h, DROPOUT_P, training=True)
        return x + self.conv2(_reflect(h, 1))


class ResnetGenerator(Network):
    """Johnson-style ResNet generator: 7x7 stem, 2 stride-2 downs, ``n_blocks`` residual blocks, 2 ups.

    H and W must be divisible by 4 so that the output has the input's size.
    """

    N_DOWNSAMPLING = 2

    def __init__(
        self,
        input_nc: int,
        output_nc: int,
        ngf: int = 64,
        norm: str = "batch",
        use_dropout: bool = False,
        n_blocks: int = 6,
        *,
        keep_dropout_in_eval: bool = False,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if n_blocks < 0:
            raise ValueError(f"ResnetGenerator: n_blocks must be >= 0, got {n_blocks}")
        bias = conv_bias_for(norm)
        self.n_blocks = n_blocks
        self.use_dropout = use_dropout
        self.keep_dropout_in_eval = keep_dropout_in_eval
        self.size_multiple = 2**self.N_DOWNSAMPLING
        relu_block = {"norm": norm, "bias": bias, "negative_slope": RELU, "backend": backend}
        self.stem = ConvBlock(input_nc, ngf, 7, **relu_block)
        widths = [ngf * 2**i for i in range(self.N_DOWNSAMPLING + 1)]
        self.down = nn.ModuleList(
            ConvBlock(c_in, c_out, 3, 2, 1, **relu_block) for c_in, c_out in itertools.pairwise(widths)
        )
        self.blocks = nn.ModuleList(ResnetBlock(widths[-1], norm, backend) for _ in range(n_blocks))
        self.up = nn.ModuleList(
            ConvBlock(c_in, c_out, 3, 2, 1, transposed=True, output_padding=1, **relu_block)
            for c_in, c_out in itertools.pairwise(widths[::-1])
        )
        self.output = ConvBlock(ngf, output_nc, 7, bias=True, negative_slope=IDENTITY, backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_spatial_size(x, self.size_multiple, "ResnetGenerator")
        h = self.stem(_reflect(x, 3))
        for block in self.down:
            h = block(h)
        dropout = _dropout_active(self, self.use_dropout, self.keep_dropout_in_eval)
        for block in self.blocks:
            h = block(h, dropout)
        for block in self.up:
            h = block(h)
        return torch.tanh(self.output(_reflect(h, 3)))
