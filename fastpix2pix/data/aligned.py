"""Paired A|B images stored side by side in one file (the pix2pix "aligned" format)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from fastpix2pix.data.images import is_image_file, list_images, read_image, to_channels
from fastpix2pix.data.transforms import DataOptions, SeededDataset, apply


def split_problem(width: int) -> str | None:
    """Why a file ``width`` pixels wide cannot be split into A|B halves, or None if it can.

    As the official code, any even width splits at ``width / 2``; the halves need not be square (e.g.
    512x158 holds two 256x158 halves). An odd width would give halves of different widths, which the
    official code silently accepts (``int(w / 2)``) and then resizes apart: here it is an error.
    """
    if width < 2:
        return f"width {width} leaves nothing for the A and B halves"
    if width % 2:
        return f"width {width} is odd, so it cannot be split into equal A and B halves"
    return None


def split_ab(
    image: np.ndarray, path: str | os.PathLike[str], allow_nonsquare: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Split an ``(H, W, C)`` array at ``W / 2`` into its left and right halves (any even width).

    ``allow_nonsquare`` is accepted for compatibility and ignored: non-square halves are always allowed,
    as in the official code.

    Raises:
        ValueError: the width is odd (or below 2); the message names ``path``.
    """
    del allow_nonsquare
    width = image.shape[1]
    problem = split_problem(width)
    if problem is not None:
        raise ValueError(f"{path}: {problem} (an A|B file holds A on the left and B on the right)")
    half = width // 2
    return image[:, :half], image[:, half:]


def list_splits(root: str | os.PathLike[str]) -> dict[str, int]:
    """The splits of a dataset folder: its subfolders that hold images, with their image counts."""
    root = Path(root)
    if not root.is_dir():
        return {}
    splits = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        count = sum(is_image_file(name) for _, _, names in os.walk(folder) for name in names)
        if count:
            splits[folder.name] = count
    return splits


def split_folder(root: str | os.PathLike[str], phase: str) -> Path:
    """``root / phase``, or a FileNotFoundError that lists the splits ``root`` does have."""
    folder = Path(root) / phase
    if folder.is_dir():
        return folder
    splits = list_splits(root)
    if not splits:
        raise FileNotFoundError(
            f"image directory {folder} does not exist, nor any other split of {root}: expected subfolders "
            f"such as train/ and test/ holding A|B images"
        )
    listed = ", ".join(f"{name} ({count} images)" for name, count in splits.items())
    raise FileNotFoundError(
        f"image directory {folder} does not exist: {root} has no '{phase}' split; its splits: {listed}. "
        f"Choose one with --phase, e.g. --phase {next(iter(splits))}"
    )


class AlignedDataset(SeededDataset):
    """``dataroot/phase/*`` images, each A|B side by side; returns ``{"A", "B", "A_paths", "B_paths"}``.

    ``A`` is the generator's input: the left half for ``direction="AtoB"``, the right half for ``"BtoA"``
    (the official code swaps in the model instead; the tensors reaching the networks are the same).
    ``A`` has ``options.input_nc`` channels and ``B`` ``options.output_nc``. Both get one shared
    resize/crop/flip drawn from ``(options.seed, epoch, index)``. Halves need not be square: every
    preprocess mode treats them as the official code does (see :mod:`fastpix2pix.data.transforms`).
    ``allow_nonsquare`` is accepted for compatibility and ignored.
    """

    def __init__(
        self,
        dataroot: str | os.PathLike[str],
        phase: str = "train",
        options: DataOptions | None = None,
        *,
        allow_nonsquare: bool = True,
    ) -> None:
        super().__init__(options or DataOptions())
        del allow_nonsquare
        self.root = split_folder(dataroot, phase)
        self.paths = list_images(self.root, self.options.max_dataset_size)

    def __len__(self) -> int:
        return len(self.paths)

    def read_pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The un-augmented ``(A, B)`` arrays of sample ``index`` (direction and channels applied)."""
        path = self.paths[index]
        left, right = split_ab(read_image(path), path)
        a, b = (right, left) if self.options.direction == "BtoA" else (left, right)
        return to_channels(a, self.options.input_nc), to_channels(b, self.options.output_nc)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        a, b = self.read_pair(index)
        path = str(self.paths[index])
        params = self.params_for(index, (a.shape[1], a.shape[0]), path)
        return {"A": apply(a, params), "B": apply(b, params), "A_paths": path, "B_paths": path}
