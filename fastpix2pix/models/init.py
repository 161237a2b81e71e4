"""Weight initialisation as in the official pix2pix code.

Convolution weights: N(0, gain) (``normal``, the paper's choice), Xavier-normal(gain), Kaiming-normal
(fan_in, gain ignored, as official) or orthogonal(gain); conv biases 0. BatchNorm: weight N(1, gain),
bias 0. Modules are visited in ``net.apply`` order (children first), which for fastpix2pix's flat
networks is the official order, so the same seed draws the same weights as the official code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn
from torch.nn import init

INIT_TYPES = ("normal", "xavier", "kaiming", "orthogonal")

__all__ = ["INIT_TYPES", "init_weights"]

ModuleT = TypeVar("ModuleT", bound=nn.Module)

_WEIGHTED = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


def _weight_initialiser(init_type: str, gain: float) -> Callable[[torch.Tensor], object]:
    if init_type == "normal":
        return lambda w: init.normal_(w, 0.0, gain)
    if init_type == "xavier":
        return lambda w: init.xavier_normal_(w, gain=gain)
    if init_type == "kaiming":
        return lambda w: init.kaiming_normal_(w, a=0, mode="fan_in")
    if init_type == "orthogonal":
        return lambda w: init.orthogonal_(w, gain=gain)
    raise ValueError(f"unknown init_type {init_type!r}; choose one of {INIT_TYPES}")


def init_weights(net: ModuleT, init_type: str = "normal", init_gain: float = 0.02) -> ModuleT:
    """Initialise ``net`` in place (and return it); see the module docstring for the rules."""
    init_weight = _weight_initialiser(init_type, init_gain)

    @torch.no_grad()
    def visit(module: nn.Module) -> None:
        if isinstance(module, _WEIGHTED):
            init_weight(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d) and module.weight is not None:
            init.normal_(module.weight, 1.0, init_gain)
            init.zeros_(module.bias)

    net.apply(visit)
    return net
