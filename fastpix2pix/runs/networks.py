"""The generator and discriminator that a run's options describe, built as the official code builds them."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from fastpix2pix.models import define_D, define_G
from fastpix2pix.runs.options import (
    ArchitectureOptions,
)

__all__ = ["Networks", "build_generator", "build_networks"]


class Networks(NamedTuple):
    G: nn.Module
    D: nn.Module


def build_generator(opt: ArchitectureOptions, backend: str, device: torch.device) -> nn.Module:
    """G from the options, initialised (drawing from the global torch generator), on ``device``."""
    G = define_G(
        opt.netG, opt.input_nc, opt.output_nc, opt.ngf, opt.norm, not opt.no_dropout, opt.init_type,
        opt.init_gain, backend=backend,
    )  # fmt: skip
    return G.to(device)


def build_networks(opt: ArchitectureOptions, backend: str, device: torch.device) -> Networks:
    """G, then D (D sees the pair: input_nc + output_nc channels), as the official code creates them."""
    G = build_generator(opt, backend, device)
    D = define_D(
        opt.netD, opt.input_nc + opt.output_nc, opt.ndf, opt.n_layers_D, opt.norm, opt.init_type,
        opt.init_gain, backend=backend,
    )  # fmt: skip
    return Networks(G, D.to(device))
