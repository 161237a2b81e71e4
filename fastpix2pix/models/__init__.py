"""The pix2pix networks, built by name as the official ``define_G`` / ``define_D`` do.

Every network is a flat list of :class:`ConvBlock` (conv -> norm -> activation) computing the official
function with the official parameter shapes; ``backend`` picks the ops that compute the blocks
("fused" or "reference", default: fused when the compiled extension is loaded). ``set_backend`` on a
network switches all its blocks; state_dicts are the same either way. Official checkpoints load with
:func:`load_official_checkpoint`.
"""

from __future__ import annotations

from fastpix2pix.models.convert import (
    convert_official_state_dict,
    convert_to_official_state_dict,
    load_official_checkpoint,
)
from fastpix2pix.models.discriminators import NLayerDiscriminator, PixelDiscriminator, patch_receptive_field
from fastpix2pix.models.generators import ResnetBlock, ResnetGenerator, UnetGenerator
from fastpix2pix.models.init import INIT_TYPES, init_weights
from fastpix2pix.models.layers import NORMS, ConvBlock, Network
from fastpix2pix.models.size import SizeRule, min_size, size_multiple, size_rule
from fastpix2pix.ops.backend import default_backend

GENERATORS = ("unet_256", "unet_128", "resnet_9blocks", "resnet_6blocks")
DISCRIMINATORS = ("basic", "n_layers", "pixel")

__all__ = [
    "DISCRIMINATORS",
    "GENERATORS",
    "INIT_TYPES",
    "NORMS",
    "ConvBlock",
    "NLayerDiscriminator",
    "Network",
    "PixelDiscriminator",
    "ResnetBlock",
    "ResnetGenerator",
    "SizeRule",
    "UnetGenerator",
    "convert_official_state_dict",
    "convert_to_official_state_dict",
    "define_D",
    "define_G",
    "init_weights",
    "load_official_checkpoint",
    "min_size",
    "patch_receptive_field",
    "size_multiple",
    "size_rule",
]


def _check_choice(kind: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {kind} {value!r}; choose one of {choices}")


def define_G(
    netG: str,
    input_nc: int = 3,
    output_nc: int = 3,
    ngf: int = 64,
    norm: str = "batch",
    use_dropout: bool = True,
    init_type: str = "normal",
    init_gain: float = 0.02,
    backend: str | None = None,
) -> Network:
    """A generator by its official name (``--netG``), initialised; see :data:`GENERATORS`."""
    _check_choice("generator", netG, GENERATORS)
    _check_choice("norm", norm, NORMS)
    _check_choice("init_type", init_type, INIT_TYPES)
    backend = default_backend() if backend is None else backend
    if netG.startswith("unet_"):
        num_downs = {"unet_256": 8, "unet_128": 7}[netG]
        net: Network = UnetGenerator(input_nc, output_nc, num_downs, ngf, norm, use_dropout, backend=backend)
    else:
        n_blocks = {"resnet_9blocks": 9, "resnet_6blocks": 6}[netG]
        net = ResnetGenerator(input_nc, output_nc, ngf, norm, use_dropout, n_blocks, backend=backend)
    return init_weights(net, init_type, init_gain)


def define_D(
    netD: str,
    input_nc: int = 6,
    ndf: int = 64,
    n_layers_D: int = 3,
    norm: str = "batch",
    init_type: str = "normal",
    init_gain: float = 0.02,
    backend: str | None = None,
) -> Network:
    """A discriminator by its official name (``--netD``), initialised; see :data:`DISCRIMINATORS`.

    ``input_nc`` is input_nc + output_nc of the generator: pix2pix's D sees the pair (A, B).
    """
    _check_choice("discriminator", netD, DISCRIMINATORS)
    _check_choice("norm", norm, NORMS)
    _check_choice("init_type", init_type, INIT_TYPES)
    backend = default_backend() if backend is None else backend
    if netD == "pixel":
        net: Network = PixelDiscriminator(input_nc, ndf, norm, backend=backend)
    else:
        n_layers = 3 if netD == "basic" else n_layers_D
        net = NLayerDiscriminator(input_nc, ndf, n_layers, norm, backend=backend)
    return init_weights(net, init_type, init_gain)
