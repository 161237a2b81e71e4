"""The official pix2pix networks' module structure, re-created: the baseline the benchmarks time and the
independent reference the tests compare fastpix2pix's networks with.

The nested containers of junyanz/pytorch-CycleGAN-and-pix2pix ``models/networks.py`` (key names, order,
in-place activations) and its ``init_weights`` (normal(0, 0.02) convolutions, normal(1, 0.02) BatchNorm
weights), written from the facts in docs: pix2pix-reference.md. Nothing here imports fastpix2pix.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["RESNET_BLOCKS", "UNET_DOWNS", "official_D", "official_G", "official_init"]


def _official_norm(norm: str) -> Callable[[int], nn.Module]:
    if norm in ("batch", "syncbatch"):  # in a single process, synchronised BatchNorm is BatchNorm
        return lambda c: nn.BatchNorm2d(c, affine=True, track_running_stats=True)
    if norm == "instance":
        return lambda c: nn.InstanceNorm2d(c, affine=False, track_running_stats=False)
    return lambda c: nn.Identity()


class _OfficialUnetLevel(nn.Module):
    def __init__(self, outer: int, inner: int, norm: str, *, input_nc: int | None = None,
                 sub: nn.Module | None = None, outermost: bool = False, innermost: bool = False,
                 dropout: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.outermost = outermost
        make_norm, bias = _official_norm(norm), norm == "instance"
        down = nn.Conv2d(input_nc or outer, inner, 4, 2, 1, bias=bias)
        if outermost:
            layers = [down, sub, nn.ReLU(True), nn.ConvTranspose2d(2 * inner, outer, 4, 2, 1), nn.Tanh()]
        elif innermost:
            up = nn.ConvTranspose2d(inner, outer, 4, 2, 1, bias=bias)
            layers = [nn.LeakyReLU(0.2, True), down, nn.ReLU(True), up, make_norm(outer)]
        else:
            up = nn.ConvTranspose2d(2 * inner, outer, 4, 2, 1, bias=bias)
            layers = [
                nn.LeakyReLU(0.2, True),
                down,
                make_norm(inner),
                sub,
                nn.ReLU(True),
                up,
                make_norm(outer),
            ]
            layers += [nn.Dropout(0.5)] if dropout else []
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) if self.outermost else torch.cat([x, self.model(x)], 1)


class _OfficialUnet(nn.Module):
    def __init__(
        self, input_nc: int, output_nc: int, num_downs: int, ngf: int, norm: str, dropout: bool
    ) -> None:
        super().__init__()
        level = _OfficialUnetLevel(8 * ngf, 8 * ngf, norm, innermost=True)
        for _ in range(num_downs - 5):
            level = _OfficialUnetLevel(8 * ngf, 8 * ngf, norm, sub=level, dropout=dropout)
        for outer in (4 * ngf, 2 * ngf, ngf):
            level = _OfficialUnetLevel(outer, 2 * outer, norm, sub=level)
        self.model = _OfficialUnetLevel(output_nc, ngf, norm, input_nc=input_nc, sub=level, outermost=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class _OfficialSequential(nn.Module):
    """An official network that is one Sequential, held as ``model`` (most) or ``net`` (PixelGAN)."""

    def __init__(self, attr: str, layers: list[nn.Module]) -> None:
        super().__init__()
        self.attr = attr
        setattr(self, attr, nn.Sequential(*layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.attr)(x)


class _OfficialResnetBlock(nn.Module):
    def __init__(self, dim: int, norm: str, dropout: bool) -> None:
        super().__init__()
        make_norm, bias = _official_norm(norm), norm == "instance"
        layers = [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=bias), make_norm(dim), nn.ReLU(True)]
        layers += [nn.Dropout(0.5)] if dropout else []
        layers += [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=bias), make_norm(dim)]
        self.conv_block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


def _official_resnet(
    input_nc: int, output_nc: int, ngf: int, norm: str, dropout: bool, n_blocks: int
) -> nn.Module:
    make_norm, bias = _official_norm(norm), norm == "instance"
    layers = [nn.ReflectionPad2d(3), nn.Conv2d(input_nc, ngf, 7, bias=bias), make_norm(ngf), nn.ReLU(True)]
    for mult in (1, 2):
        layers += [
            nn.Conv2d(ngf * mult, 2 * ngf * mult, 3, 2, 1, bias=bias),
            make_norm(2 * ngf * mult),
            nn.ReLU(True),
        ]
    layers += [_OfficialResnetBlock(4 * ngf, norm, dropout) for _ in range(n_blocks)]
    for mult in (4, 2):
        up = nn.ConvTranspose2d(ngf * mult, ngf * mult // 2, 3, 2, 1, output_padding=1, bias=bias)
        layers += [up, make_norm(ngf * mult // 2), nn.ReLU(True)]
    layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, output_nc, 7), nn.Tanh()]
    return _OfficialSequential("model", layers)


def _official_nlayer(input_nc: int, ndf: int, n_layers: int, norm: str) -> nn.Module:
    make_norm, bias = _official_norm(norm), norm == "instance"
    layers = [nn.Conv2d(input_nc, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
    width = ndf
    for n in range(1, n_layers + 1):
        new_width = ndf * min(2**n, 8)
        conv = nn.Conv2d(width, new_width, 4, 2 if n < n_layers else 1, 1, bias=bias)
        layers += [conv, make_norm(new_width), nn.LeakyReLU(0.2, True)]
        width = new_width
    layers.append(nn.Conv2d(width, 1, 4, 1, 1))
    return _OfficialSequential("model", layers)


def _official_pixel(input_nc: int, ndf: int, norm: str) -> nn.Module:
    make_norm, bias = _official_norm(norm), norm == "instance"
    layers = [nn.Conv2d(input_nc, ndf, 1), nn.LeakyReLU(0.2, True), nn.Conv2d(ndf, 2 * ndf, 1, bias=bias)]
    layers += [make_norm(2 * ndf), nn.LeakyReLU(0.2, True), nn.Conv2d(2 * ndf, 1, 1, bias=bias)]
    return _OfficialSequential("net", layers)


def official_init(net: nn.Module, gain: float = 0.02) -> nn.Module:
    """The official init_func: dispatch on class names, visited in ``apply`` order."""

    def visit(m: nn.Module) -> None:
        name = type(m).__name__
        if hasattr(m, "weight") and ("Conv" in name or "Linear" in name):
            nn.init.normal_(m.weight.data, 0.0, gain)
            if m.bias is not None:
                nn.init.constant_(m.bias.data, 0.0)
        elif "BatchNorm2d" in name:
            nn.init.normal_(m.weight.data, 1.0, gain)
            nn.init.constant_(m.bias.data, 0.0)

    net.apply(visit)
    return net


UNET_DOWNS = {"unet_256": 8, "unet_128": 7}
RESNET_BLOCKS = {"resnet_9blocks": 9, "resnet_6blocks": 6}


def official_G(
    name: str, ngf: int, norm: str, dropout: bool, input_nc: int = 3, output_nc: int = 3
) -> nn.Module:
    if name in UNET_DOWNS:
        return _OfficialUnet(input_nc, output_nc, UNET_DOWNS[name], ngf, norm, dropout)
    return _official_resnet(input_nc, output_nc, ngf, norm, dropout, RESNET_BLOCKS[name])


def official_D(name: str, ndf: int, norm: str, n_layers: int = 3, input_nc: int = 6) -> nn.Module:
    if name == "pixel":
        return _official_pixel(input_nc, ndf, norm)
    return _official_nlayer(input_nc, ndf, 3 if name == "basic" else n_layers, norm)


# --- helpers --------------------------------------------------------------------------------------------
