"""The images a generator takes, in one place: its input channels, the multiple its levels need and the
smallest side.

Every caller that runs a generator on an image of any size (``predict``, ``serve``, the Python API, the
exported file's metadata) pads the image to :meth:`SizeRule.padded` and crops the output back.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from fastpix2pix.models.generators import ResnetGenerator

__all__ = ["SizeRule", "input_channels", "min_size", "size_multiple", "size_rule"]


def size_multiple(G: nn.Module) -> int:
    """What G needs its sides to be multiples of: 2**downsamplings (1 for a network without the attribute)."""
    return int(getattr(G, "size_multiple", 1))


def min_size(G: nn.Module) -> int:
    """The smallest side G takes: one multiple for a U-Net (1x1 innermost), two for a ResNet (its 3x3
    reflection pads need at least 2x2 at the bottleneck)."""
    multiple = size_multiple(G)
    return 2 * multiple if isinstance(G, ResnetGenerator) else multiple


@dataclass(frozen=True)
class SizeRule:
    """What a generator needs of an image's sides: multiples of ``multiple``, at least ``min_size``."""

    multiple: int
    min_size: int

    def padded(self, height: int, width: int) -> tuple[int, int]:
        """The ``(H, W)`` the generator sees for an input of ``height x width``: each side rounded up to
        the multiple, and to at least the smallest side."""
        return self._side(height), self._side(width)

    def _side(self, side: int) -> int:
        return max(self.multiple, self.min_size, -(-side // self.multiple) * self.multiple)


def size_rule(G: nn.Module) -> SizeRule:
    """G's :class:`SizeRule`."""
    return SizeRule(size_multiple(G), min_size(G))


def input_channels(G: nn.Module) -> int:
    """The channels G's input has: those of its first convolution."""
    first = next(m for m in G.modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d))
    return int(first.in_channels)
