"""Importing (and exporting) checkpoints of the official pix2pix code.

The official networks nest ``nn.Sequential`` containers (the U-Net recursively), so their keys look like
``model.model.1.model.3.model.1.weight``; fastpix2pix's flat networks name the same tensors
``encoder.2.conv.weight``. Each architecture here is described once, as a list of blocks pairing the
official conv / norm module paths with a fastpix2pix block path; conversion in either direction is a
lookup in that list, and anything not in it is reported rather than silently dropped.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from fastpix2pix.models.discriminators import NLayerDiscriminator, PixelDiscriminator
from fastpix2pix.models.generators import ResnetGenerator, UnetGenerator

__all__ = ["convert_official_state_dict", "convert_to_official_state_dict", "load_official_checkpoint"]

CONV_PARAMS = frozenset({"weight", "bias"})
NORM_PARAMS = frozenset({"weight", "bias", "running_mean", "running_var", "num_batches_tracked"})
_LEGACY_INSTANCE_NORM_PARAMS = frozenset({"running_mean", "running_var", "num_batches_tracked"})
_UNET_DOWNS = {"unet_256": 8, "unet_128": 7}
_RESNET_BLOCKS = {"resnet_9blocks": 9, "resnet_6blocks": 6}
_SHOWN_KEYS = 8


@dataclass(frozen=True)
class _Block:
    """One conv (and its norm, if any) in both naming schemes."""

    official_conv: str
    official_norm: str | None
    ours: str


def _unet_layout(num_downs: int) -> list[_Block]:
    """Official U-Net, one nested Sequential per level: level 0 is [conv, inner, ReLU, convT, Tanh],
    middle levels [LReLU, conv, norm, inner, ReLU, convT, norm(, Dropout)], the innermost level
    [LReLU, conv, ReLU, convT, norm]."""
    blocks = []
    path = "model"
    for level in range(num_downs):
        seq = f"{path}.model"
        decoder = f"decoder.{num_downs - 1 - level}"
        if level == 0:
            blocks += [_Block(f"{seq}.0", None, "encoder.0"), _Block(f"{seq}.3", None, "output")]
            path = f"{seq}.1"
        elif level == num_downs - 1:
            blocks += [_Block(f"{seq}.1", None, f"encoder.{level}"), _Block(f"{seq}.3", f"{seq}.4", decoder)]
        else:
            blocks += [
                _Block(f"{seq}.1", f"{seq}.2", f"encoder.{level}"),
                _Block(f"{seq}.5", f"{seq}.6", decoder),
            ]
            path = f"{seq}.3"
    return blocks


def _resnet_layout(n_blocks: int, dropout: bool) -> list[_Block]:
    """Official ResNet: one Sequential [pad, conv, norm, ReLU, 2 x (conv, norm, ReLU), blocks...,
    2 x (convT, norm, ReLU), pad, conv, Tanh]; a block's Dropout shifts its second conv by one index."""
    blocks = [_Block("model.1", "model.2", "stem"), _Block("model.4", "model.5", "down.0")]
    blocks.append(_Block("model.7", "model.8", "down.1"))
    second = 6 if dropout else 5
    for i in range(n_blocks):
        body = f"model.{10 + i}.conv_block"
        blocks.append(_Block(f"{body}.1", f"{body}.2", f"blocks.{i}.conv1"))
        blocks.append(_Block(f"{body}.{second}", f"{body}.{second + 1}", f"blocks.{i}.conv2"))
    up = 10 + n_blocks
    blocks += [
        _Block(f"model.{up}", f"model.{up + 1}", "up.0"),
        _Block(f"model.{up + 3}", f"model.{up + 4}", "up.1"),
    ]
    blocks.append(_Block(f"model.{up + 7}", None, "output"))
    return blocks


def _nlayer_layout(n_layers: int) -> list[_Block]:
    """Official PatchGAN: [conv, LReLU, n_layers x (conv, norm, LReLU), conv]."""
    blocks = [_Block("model.0", None, "layers.0")]
    blocks += [_Block(f"model.{3 * n - 1}", f"model.{3 * n}", f"layers.{n}") for n in range(1, n_layers + 1)]
    blocks.append(_Block(f"model.{3 * n_layers + 2}", None, f"layers.{n_layers + 1}"))
    return blocks


def _pixel_layout() -> list[_Block]:
    """Official PixelGAN: ``net`` = [conv, LReLU, conv, norm, LReLU, conv]."""
    return [
        _Block("net.0", None, "layers.0"),
        _Block("net.2", "net.3", "layers.1"),
        _Block("net.5", None, "layers.2"),
    ]


def _resnet_has_dropout_layout(official: Mapping[str, torch.Tensor]) -> bool:
    """Whether a ResNet checkpoint was saved with Dropout in its blocks (the second conv is then index 6)."""
    return "model.10.conv_block.5.weight" not in official


def _layout_for_name(name: str, n_layers_D: int, official: Mapping[str, torch.Tensor]) -> list[_Block]:
    if name in _UNET_DOWNS:
        return _unet_layout(_UNET_DOWNS[name])
    if name in _RESNET_BLOCKS:
        return _resnet_layout(_RESNET_BLOCKS[name], _resnet_has_dropout_layout(official))
    if name == "basic":
        return _nlayer_layout(3)
    if name == "n_layers":
        return _nlayer_layout(n_layers_D)
    if name == "pixel":
        return _pixel_layout()
    names = (*_UNET_DOWNS, *_RESNET_BLOCKS, "basic", "n_layers", "pixel")
    raise ValueError(f"unknown network name {name!r}; choose one of {names}")


def _layout_for_net(net: nn.Module, official: Mapping[str, torch.Tensor]) -> list[_Block]:
    if isinstance(net, UnetGenerator):
        return _unet_layout(net.num_downs)
    if isinstance(net, ResnetGenerator):
        return _resnet_layout(net.n_blocks, _resnet_has_dropout_layout(official))
    if isinstance(net, NLayerDiscriminator):
        return _nlayer_layout(net.n_layers)
    if isinstance(net, PixelDiscriminator):
        return _pixel_layout()
    raise TypeError(f"no official checkpoint layout for {type(net).__name__}")


def _strip_wrapper_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` prefix that ``nn.DataParallel`` / DDP add to every key."""
    if state_dict and all(key.startswith("module.") for key in state_dict):
        return {key.removeprefix("module."): value for key, value in state_dict.items()}
    return dict(state_dict)


def _module_map(layout: list[_Block], to_ours: bool) -> dict[str, tuple[str, frozenset[str]]]:
    """Source module path -> (target module path, the parameter names it may hold)."""
    pairs: list[tuple[str, str, frozenset[str]]] = []
    for block in layout:
        pairs.append((block.official_conv, f"{block.ours}.conv", CONV_PARAMS))
        if block.official_norm is not None:
            pairs.append((block.official_norm, f"{block.ours}.norm", NORM_PARAMS))
    if to_ours:
        return {official: (ours, params) for official, ours, params in pairs}
    return {ours: (official, params) for official, ours, params in pairs}


def _show(keys: list[str]) -> str:
    more = f" (+{len(keys) - _SHOWN_KEYS} more)" if len(keys) > _SHOWN_KEYS else ""
    return ", ".join(keys[:_SHOWN_KEYS]) + more


def _rename(
    state_dict: Mapping[str, torch.Tensor], layout: list[_Block], to_ours: bool, what: str
) -> dict[str, torch.Tensor]:
    """Rename every key through the layout; unknown keys and convs without a weight are errors."""
    modules = _module_map(layout, to_ours)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    unexpected = []
    for key, value in state_dict.items():
        module, _, param = key.rpartition(".")
        if module not in modules or param not in modules[module][1]:
            unexpected.append(key)
        else:
            grouped.setdefault(module, {})[param] = value
    if unexpected:
        raise ValueError(f"{what}: keys that are not part of this architecture: {_show(unexpected)}")
    missing = [
        f"{module}.weight"
        for module, (_, allowed) in modules.items()
        if allowed is CONV_PARAMS and "weight" not in grouped.get(module, {})
    ]
    if missing:
        raise ValueError(f"{what}: missing keys (is it the right architecture?): {_show(missing)}")
    renamed = {}
    for module, params in grouped.items():
        target, allowed = modules[module]
        renamed.update({f"{target}.{param}": value for param, value in _clean_norm(params, allowed).items()})
    return renamed


def _clean_norm(params: dict[str, torch.Tensor], allowed: frozenset[str]) -> dict[str, torch.Tensor]:
    """Tidy one norm layer's tensors: drop the running stats that InstanceNorm saved before PyTorch 0.4
    (it has no weight; the official code drops them too), and give BatchNorm layers saved before
    PyTorch 0.4.1 their missing ``num_batches_tracked`` counter."""
    if allowed is not NORM_PARAMS:
        return params
    if "weight" not in params and set(params) <= _LEGACY_INSTANCE_NORM_PARAMS:
        return {}
    if "weight" in params and "running_mean" in params and "num_batches_tracked" not in params:
        return {**params, "num_batches_tracked": torch.tensor(0, dtype=torch.long)}
    return params


def convert_official_state_dict(
    state_dict: Mapping[str, torch.Tensor], name: str, *, n_layers_D: int = 3
) -> dict[str, torch.Tensor]:
    """An official ``netG`` / ``netD`` state_dict renamed for the fastpix2pix network of the same name.

    ``name`` is the official ``--netG`` / ``--netD`` value; ``n_layers_D`` is used for ``n_layers``.
    A ``module.`` (DataParallel) prefix is stripped. Raises ValueError on keys this architecture does
    not have and on convolutions the checkpoint lacks.
    """
    official = _strip_wrapper_prefix(state_dict)
    return _rename(
        official, _layout_for_name(name, n_layers_D, official), True, f"official {name} checkpoint"
    )


def convert_to_official_state_dict(
    state_dict: Mapping[str, torch.Tensor], name: str, *, n_layers_D: int = 3, use_dropout: bool = False
) -> dict[str, torch.Tensor]:
    """The inverse: a fastpix2pix state_dict with official key names, loadable by the official code.

    ``use_dropout`` matters only for the ResNet generators, whose official keys depend on it.
    """
    if name in _RESNET_BLOCKS:
        layout = _resnet_layout(_RESNET_BLOCKS[name], use_dropout)
    else:
        layout = _layout_for_name(name, n_layers_D, {})
    return _rename(_strip_wrapper_prefix(state_dict), layout, False, f"fastpix2pix {name} state_dict")


def load_official_checkpoint(path: str | os.PathLike[str], net: nn.Module) -> nn.Module:
    """Load an official ``*_net_G.pth`` / ``*_net_D.pth`` file into a fastpix2pix network (in place).

    The file is read with ``weights_only=True``. Keys and shapes are checked against ``net`` before
    anything is loaded, so a mismatch (another norm, ngf, depth) leaves ``net`` untouched.
    """
    official = _strip_wrapper_prefix(torch.load(path, map_location="cpu", weights_only=True))
    converted = _rename(official, _layout_for_net(net, official), True, f"checkpoint {os.fspath(path)!r}")
    _check_matches(net, converted, os.fspath(path))
    net.load_state_dict(converted)
    return net


def _check_matches(net: nn.Module, converted: Mapping[str, torch.Tensor], source: str) -> None:
    expected = net.state_dict()
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    wrong_shape = [
        f"{k} {tuple(converted[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in converted and converted[k].shape != v.shape
    ]
    problems = [
        f"{label}: {_show(keys)}"
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape (file vs net)", wrong_shape),
        )
        if keys
    ]
    if problems:
        raise ValueError(
            f"{source} does not fit {type(net).__name__} ({'; '.join(problems)}); "
            "was it trained with other --norm, --ngf/--ndf, --input_nc/--output_nc or depth options?"
        )
