"""Training checkpoints: one file holding everything needed to continue a run exactly.

A checkpoint (``latest.pt``, ``epoch_N.pt``) is a dict of plain data and tensors, loadable with
``torch.load(weights_only=True)``: both networks, both optimizers and schedulers, the position in the
data (epoch, images done in it, iterations in total), every random generator's state, the options, the
package version and the backend. Every file is written atomically (temp file in the same folder, fsync,
``os.replace``, fsync of the folder), so a crash or a full disk never leaves a half-written checkpoint
under the final name.

Beside them, ``<label>_net_G.pth`` / ``<label>_net_D.pth`` hold the bare networks with the official
key names, loadable by the official pix2pix code and by ``--load_official``.

A save writes a *set* of files (:func:`save_checkpoint_set`): every label's network files first, then the
full checkpoints, ``latest.pt`` last. ``latest.pt`` is the commit point: a process killed during a save
leaves ``latest.pt`` at the previous save, and at most the network files (or ``epoch_N.pt``) of the
interrupted one newer than it. The full checkpoint is the reference: ``--continue_train`` rewrites the
network files of the label it resumes from out of it, and training redoes the interrupted save. A kill
inside a write leaves a temporary ``.<name>.<random>.tmp`` (as large as the file: ~0.7 GB for unet_256);
:func:`remove_stale_temporaries` deletes those of a run folder when a trainer starts there.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fastpix2pix.models import convert_to_official_state_dict
from fastpix2pix.runtime import ATOMIC_TEMP_SUFFIX, atomic_write

__all__ = [
    "FORMAT_VERSION",
    "capture_rng_state",
    "checkpoint_path",
    "export_official_networks",
    "list_checkpoints",
    "load_checkpoint",
    "plain_network_path",
    "remove_stale_temporaries",
    "restore_rng_state",
    "save_checkpoint",
    "save_checkpoint_set",
    "saved_file_label",
    "stale_temporaries",
]

FORMAT_VERSION = 1
REQUIRED_KEYS = (
    "format",
    "G",
    "D",
    "optimizer_G",
    "optimizer_D",
    "scheduler_G",
    "scheduler_D",
    "epoch",
    "epoch_iter",
    "iteration",
    "rng",
    "options",
)


# --- file names -------------------------------------------------------------------------------------


def checkpoint_path(folder: str | os.PathLike[str], epoch: str | int) -> Path:
    """``folder/latest.pt`` for ``epoch="latest"``, else ``folder/epoch_<N>.pt``."""
    label = str(epoch)
    if label == "latest":
        return Path(folder) / "latest.pt"
    if not label.isdigit():
        raise ValueError(f"--epoch must be 'latest' or an epoch number, got {label!r}")
    return Path(folder) / f"epoch_{int(label)}.pt"


def plain_network_path(folder: str | os.PathLike[str], epoch: str | int, net: str) -> Path:
    """The official file name of one bare network: ``latest_net_G.pth``, ``5_net_D.pth``."""
    return Path(folder) / f"{epoch}_net_{net}.pth"


# The files a training save writes in a run folder: latest.pt, epoch_N.pt, <label>_net_G/D.pth.
_SAVED_NAME = r"(?:latest|epoch_(?P<epoch>\d+))\.pt|(?P<label>latest|\d+)_net_(?P<net>[GD])\.pth"


def saved_file_label(name: str) -> tuple[str, str] | None:
    """``(epoch label, what)`` of a file name a training save writes, ``what`` being ``"checkpoint"`` (a full
    one), ``"G"`` or ``"D"``: ``epoch_5.pt`` -> ``("5", "checkpoint")``, ``latest_net_G.pth`` ->
    ``("latest", "G")`` (the official pretrained models' layout too); None for any other name."""
    match = re.fullmatch(_SAVED_NAME, name)
    if match is None:
        return None
    if match["net"]:
        return match["label"], match["net"]
    return match["epoch"] or "latest", "checkpoint"


def list_checkpoints(folder: str | os.PathLike[str]) -> list[str]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.suffix in (".pt", ".pth"))


# --- atomic writing ---------------------------------------------------------------------------------


# mkstemp's random part: 8 of tempfile._RandomNameSequence's "abcdefghijklmnopqrstuvwxyz0123456789_".
_STALE_TEMPORARY = re.compile(rf"\.(?:{_SAVED_NAME})\.[a-z0-9_]{{8}}{re.escape(ATOMIC_TEMP_SUFFIX)}")


def stale_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """The temporaries that :func:`atomic_write` left in ``folder`` for the files of a training save
    (``latest.pt``, ``epoch_N.pt``, ``<label>_net_G/D.pth``); no other file, whatever its name."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _STALE_TEMPORARY.fullmatch(p.name) and p.is_file())


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> tuple[list[Path], int]:
    """Delete :func:`stale_temporaries` of ``folder``; returns them and the bytes freed.

    Only safe when no save is running into ``folder``: a trainer calls it as it starts (one trainer per
    run folder), before its first save.
    """
    removed, freed = [], 0
    for path in stale_temporaries(folder):
        with contextlib.suppress(FileNotFoundError):
            size = path.stat().st_size
            path.unlink()
            removed.append(path)
            freed += size
    return removed, freed


def _torch_save(obj: Any, path: Path) -> Path:
    # Looked up at call time (not bound at import) so tests can simulate a crash inside torch.save.
    return atomic_write(path, lambda file: torch.save(obj, file))


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write a full checkpoint atomically; ``state`` must have :data:`REQUIRED_KEYS`."""
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise ValueError(f"save_checkpoint: state lacks {missing}")
    return _torch_save(dict(state), Path(path))


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and check a full checkpoint written by :func:`save_checkpoint`.

    Raises:
        FileNotFoundError: no file at ``path`` (the message lists the checkpoints that do exist).
        ValueError: the file is truncated, corrupt or not a fastpix2pix training checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        available = list_checkpoints(path.parent)
        listing = ", ".join(available) if available else "none"
        raise FileNotFoundError(
            f"checkpoint {path} does not exist (expected a fastpix2pix training checkpoint; "
            f"files in {path.parent}: {listing})"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # zip/pickle errors of many kinds: all mean "not a readable checkpoint"
        reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
        raise ValueError(
            f"checkpoint {path} is corrupt or not a checkpoint ({type(error).__name__}: {reason}); "
            f"expected a fastpix2pix training checkpoint written by `fastpix2pix train`"
        ) from error
    if not isinstance(state, dict) or "format" not in state:
        raise ValueError(
            f"checkpoint {path} is not a fastpix2pix training checkpoint (no 'format' key); for a bare "
            f"network state_dict such as an official *_net_G.pth use --load_official"
        )
    if state["format"] != FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {path} has format {state['format']!r}; this version reads {FORMAT_VERSION}"
        )
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise ValueError(f"checkpoint {path} is incomplete: missing {missing}")
    return state


# --- random generators ------------------------------------------------------------------------------


def _numpy_state() -> dict[str, Any]:
    algorithm, keys, pos, has_gauss, cached = np.random.get_state()
    # Stored as a tensor and plain numbers so that the checkpoint loads with weights_only=True.
    return {
        "algorithm": algorithm,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def _set_numpy_state(state: Mapping[str, Any]) -> None:
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state(
        (state["algorithm"], keys, state["pos"], state["has_gauss"], state["cached_gaussian"])
    )


def capture_rng_state(loader_generator: torch.Generator | None = None) -> dict[str, Any]:
    """Every random generator a training run draws from."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
    }
    if loader_generator is not None:
        state["loader"] = loader_generator.get_state()
    return state


def restore_rng_state(state: Mapping[str, Any], loader_generator: torch.Generator | None = None) -> None:
    """The inverse of :func:`capture_rng_state`; CUDA states are restored when CUDA is in use here."""
    torch.set_rng_state(state["torch"])
    _set_numpy_state(state["numpy"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if state.get("cuda") is not None and torch.cuda.is_available():
        cuda_states = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda_states)
    if loader_generator is not None and state.get("loader") is not None:
        loader_generator.set_state(state["loader"])


# --- bare networks ----------------------------------------------------------------------------------


def export_official_networks(
    folder: str | os.PathLike[str],
    label: str | int,
    networks: Mapping[str, tuple[nn.Module, str]],
    *,
    n_layers_D: int = 3,
    use_dropout: bool = False,
) -> list[Path]:
    """Write ``<label>_net_<key>.pth`` for each ``key -> (network, official name)`` with official keys."""
    written = []
    for key, (net, official_name) in networks.items():
        state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
        official = convert_to_official_state_dict(
            state, official_name, n_layers_D=n_layers_D, use_dropout=use_dropout
        )
        written.append(_torch_save(official, plain_network_path(folder, label, key)))
    return written


def save_checkpoint_set(
    folder: str | os.PathLike[str],
    labels: Iterable[str | int],
    state: Mapping[str, Any],
    networks: Mapping[str, tuple[nn.Module, str]],
    *,
    n_layers_D: int = 3,
    use_dropout: bool = False,
) -> None:
    """One save: for each label, the network files (:func:`export_official_networks`) and the full
    checkpoint ``state``, in the order that keeps the set consistent across a kill (see the module
    docstring): all network files, then the full checkpoints, ``latest.pt`` last."""
    ordered = sorted(labels, key=lambda label: str(label) == "latest")  # stable: "latest" goes last
    for label in ordered:
        export_official_networks(folder, label, networks, n_layers_D=n_layers_D, use_dropout=use_dropout)
    for label in ordered:
        save_checkpoint(state, checkpoint_path(folder, label))
