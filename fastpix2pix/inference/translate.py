"""One image of any size through a generator: padded to the sizes it takes, output cropped back."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastpix2pix.data.images import to_channels
from fastpix2pix.data.transforms import to_tensor
from fastpix2pix.models.size import SizeRule, input_channels, size_rule
from fastpix2pix.runs.visualize import tensor_to_image

__all__ = ["pad_for", "pad_to_multiple", "predict_image", "translate", "translate_image"]


def _reflect_pad(x: torch.Tensor, bottom: int, right: int) -> torch.Tensor:
    """Reflect-pad bottom/right; a pad wider than the image takes several reflections."""
    if x.shape[-2] < 2 or x.shape[-1] < 2:  # a 1-pixel side cannot be reflected
        return F.pad(x, (0, right, 0, bottom), mode="replicate")
    while bottom > 0 or right > 0:
        step_bottom, step_right = min(bottom, x.shape[-2] - 1), min(right, x.shape[-1] - 1)
        x = F.pad(x, (0, step_right, 0, step_bottom), mode="reflect")
        bottom, right = bottom - step_bottom, right - step_right
    return x


def pad_to_multiple(
    x: torch.Tensor, multiple: int, min_size: int = 0
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Reflect-pad an ``(N, C, H, W)`` batch so H and W are multiples of ``multiple``; also the original size.

    Sides smaller than ``multiple`` (or ``min_size``) are padded up to it (the U-Net needs at least one
    pixel at its innermost level, a ResNet two).
    """
    return pad_for(x, SizeRule(multiple, max(multiple, min_size)))


def pad_for(x: torch.Tensor, rule: SizeRule) -> tuple[torch.Tensor, tuple[int, int]]:
    """Reflect-pad an ``(N, C, H, W)`` batch to the sizes a generator with ``rule`` takes
    (:func:`fastpix2pix.models.size.size_rule`); also the original ``(H, W)``, to crop the output back."""
    height, width = x.shape[-2:]
    target_h, target_w = rule.padded(height, width)
    return _reflect_pad(x, target_h - height, target_w - width), (height, width)


def translate(
    G: nn.Module | Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, rule: SizeRule | None = None
):
    """``G`` on an ``(N, C, H, W)`` batch (or one ``(C, H, W)`` image) of any size: padded to the sizes G
    takes, the output cropped back. ``G``: the network, or an engine (``build_engine``, ``load_engine``:
    it knows its size rule); ``rule``: G's size rule, for any other function. The rule ``fastpix2pix
    predict`` and ``serve`` apply, so all three give the same output."""
    if rule is None:
        own = None if isinstance(G, nn.Module) else getattr(G, "size_rule", None)
        rule = own if isinstance(own, SizeRule) else size_rule(G)
    single = x.dim() == 3
    padded, (height, width) = pad_for(x.unsqueeze(0) if single else x, rule)
    with torch.no_grad():
        out = G(padded)[..., :height, :width]
    return out[0] if single else out


def predict_image(G: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """``G`` on one ``(C, H, W)`` tensor of any size: padded to what G needs, output cropped back."""
    return translate(G, image)


def translate_image(G: nn.Module | Any, image: np.ndarray) -> np.ndarray:
    """An ``(H, W, C)`` uint8 (or uint16) image of any size through ``G``, as ``fastpix2pix predict``
    translates a file: converted to G's input channels, padded, the output cropped back, as uint8.
    ``G``: the network (run as it is), or an engine (``load_engine``, ``build_engine``: the
    commands' engines, in their precision)."""
    if isinstance(G, nn.Module):
        device, channels = next(G.parameters()).device, input_channels(G)
    else:
        device, channels = G.device, G.input_nc
    x = to_tensor(to_channels(image, channels)).to(device)
    return tensor_to_image(translate(G, x))
