"""Paired A|B images stored side by side in one file (the pix2pix "aligned" format)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from fastpix2pix.data.images import list_images, read_image, to_channels
from fastpix2pix.data.transforms import DataOptions, SeededDataset, apply


def split_ab(
    image: np.ndarray, path: str | os.PathLike[str], allow_nonsquare: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Split an ``(H, 2W, C)`` array into its left and right halves.

    The halves must be square (width = 2 x height) as in every official dataset, which catches a folder
    of unpaired images early; ``allow_nonsquare`` only requires an even width.
    """
    h, w = image.shape[:2]
    if allow_nonsquare:
        if w % 2:
            raise ValueError(f"{path}: width {w} is odd, so it cannot be split into equal A and B halves")
    elif w != 2 * h:
        raise ValueError(
            f"{path}: size {w}x{h} (WxH) is not an A|B pair: the width must be twice the height "
            f"(e.g. 512x256), with A on the left and B on the right"
        )
    half = w // 2
    return image[:, :half], image[:, half:]


class AlignedDataset(SeededDataset):
    """``dataroot/phase/*`` images, each A|B side by side; returns ``{"A", "B", "A_paths", "B_paths"}``.

    ``A`` is the generator's input: the left half for ``direction="AtoB"``, the right half for ``"BtoA"``
    (the official code swaps in the model instead; the tensors reaching the networks are the same).
    ``A`` has ``options.input_nc`` channels and ``B`` ``options.output_nc``. Both get one shared
    resize/crop/flip drawn from ``(options.seed, epoch, index)``.
    """

    def __init__(
        self,
        dataroot: str | os.PathLike[str],
        phase: str = "train",
        options: DataOptions | None = None,
        *,
        allow_nonsquare: bool = False,
    ) -> None:
        super().__init__(options or DataOptions())
        self.root = Path(dataroot) / phase
        self.allow_nonsquare = allow_nonsquare
        self.paths = list_images(self.root, self.options.max_dataset_size)

    def __len__(self) -> int:
        return len(self.paths)

    def read_pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The un-augmented ``(A, B)`` arrays of sample ``index`` (direction and channels applied)."""
        path = self.paths[index]
        left, right = split_ab(read_image(path), path, self.allow_nonsquare)
        a, b = (right, left) if self.options.direction == "BtoA" else (left, right)
        return to_channels(a, self.options.input_nc), to_channels(b, self.options.output_nc)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        a, b = self.read_pair(index)
        path = str(self.paths[index])
        params = self.params_for(index, (a.shape[1], a.shape[0]), path)
        return {"A": apply(a, params), "B": apply(b, params), "A_paths": path, "B_paths": path}
