"""A trained generator from a run folder or an official ``.pth``, with the options it was trained with."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastpix2pix.models import load_official_checkpoint
from fastpix2pix.ops.backend import default_backend
from fastpix2pix.runs.checkpoint import checkpoint_path, load_checkpoint, plain_network_path
from fastpix2pix.runs.networks import build_generator
from fastpix2pix.runs.options import ArchitectureOptions, PredictOptions, default_of
from fastpix2pix.runtime import resolve_device

__all__ = ["load", "load_generator", "set_inference_mode"]

ARCHITECTURE_FIELDS = tuple(f.name for f in dataclasses.fields(ArchitectureOptions))
INHERITED_FIELDS = (*ARCHITECTURE_FIELDS, "direction", "crop_size", "preprocess")
"""Options that, left at their defaults, are taken from the checkpoint (what the model was trained with)."""

TEST_SEED = 0  # dropout is random at test time; a fixed default seed makes results reproducible


# --- loading ----------------------------------------------------------------------------------------


def inherit_options(opt: Any, saved: Mapping[str, Any]) -> Any:
    """``opt`` with each of :data:`INHERITED_FIELDS` left at its default replaced by the saved value."""
    cls = type(opt)
    names = {f.name for f in dataclasses.fields(cls)}
    changes = {
        name: saved[name]
        for name in INHERITED_FIELDS
        if name in names and name in saved and getattr(opt, name) == default_of(cls, name)
    }
    return dataclasses.replace(opt, **changes)


def load_generator(opt: Any, device: torch.device) -> tuple[nn.Module, Any, str]:
    """The generator for ``opt`` (Test/PredictOptions) on ``device``, the options completed from the
    checkpoint, and a description of where the weights came from.

    Sources, in order: ``--load_official FILE``; ``checkpoints_dir/name/<epoch>.pt`` (a full
    checkpoint, which also records the architecture); ``<epoch>_net_G.pth`` (bare, official keys).
    """
    backend = opt.backend or default_backend()
    if opt.load_official:
        path = Path(opt.load_official)
        if not path.is_file():
            raise FileNotFoundError(
                f"--load_official {path} does not exist (expected an official *_net_G.pth)"
            )
        G = build_generator(opt, backend, device)
        return load_official_checkpoint(path, G), opt, str(path)
    run_dir = Path(opt.checkpoints_dir) / opt.name
    full = checkpoint_path(run_dir, opt.epoch)
    plain = plain_network_path(run_dir, opt.epoch, "G")
    if full.exists() or not plain.exists():
        state = load_checkpoint(full)  # FileNotFoundError here names the file and what exists
        opt = inherit_options(opt, state["options"])
        G = build_generator(opt, backend, device)
        G.load_state_dict(state["G"])
        return G, opt, str(full)
    G = build_generator(opt, backend, device)
    return load_official_checkpoint(plain, G), opt, str(plain)


def set_inference_mode(G: nn.Module, eval_mode: bool) -> nn.Module:
    """``--eval``: running statistics, no dropout; default: the paper's train-mode protocol."""
    return G.eval() if eval_mode else G.train()


def load(
    source: str | os.PathLike[str],
    *,
    epoch: str | int = "latest",
    device: str = "auto",
    eval_mode: bool = False,
    **architecture: Any,
) -> nn.Module:
    """A trained generator, ready to run: from a run folder (``checkpoints_dir/name``, as ``train`` writes
    it) or an official ``*_net_G.pth`` file (pass its architecture options when they are not the defaults:
    ``netG="unet_128"``, ``ngf=32``, ...; a run folder's full checkpoint records them).

    The generator is in the paper's test protocol (train mode: batch statistics, dropout on) unless
    ``eval_mode`` (running statistics, no dropout), as ``fastpix2pix predict`` without and with ``--eval``.
    """
    path = Path(source)
    if path.is_dir():
        opt = PredictOptions(
            checkpoints_dir=str(path.parent), name=path.name, epoch=str(epoch), device=device, **architecture
        )
    elif path.is_file():
        opt = PredictOptions(load_official=str(path), device=device, **architecture)
    else:
        raise FileNotFoundError(f"{path} is neither a run folder nor a generator file (*_net_G.pth)")
    G, _, _ = load_generator(opt, resolve_device(device))
    return set_inference_mode(G, eval_mode)
