"""Single images (no B) for inference: a folder of images or one file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from fastpix2pix.data.images import list_images, read_image, to_channels
from fastpix2pix.data.transforms import DataOptions, SeededDataset, apply

INFERENCE_OPTIONS = DataOptions(preprocess="none", no_flip=True)
"""What prediction usually wants: full image (sides rounded to a multiple of 4), no flip."""


class SingleImageDataset(SeededDataset):
    """Images from ``path`` (a folder, searched recursively, or a single file); returns ``{"A", "A_paths"}``.

    ``A`` has ``options.input_nc`` channels and the same preprocessing as training data; the default
    options are :data:`INFERENCE_OPTIONS`.
    """

    def __init__(self, path: str | os.PathLike[str], options: DataOptions | None = None) -> None:
        super().__init__(options or INFERENCE_OPTIONS)
        path = Path(path)
        if path.is_file():  # any extension: Pillow decides whether it can read it
            self.paths = [path]
        else:
            self.paths = list_images(path, self.options.max_dataset_size)

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int) -> np.ndarray:
        """The un-augmented array of sample ``index`` with ``options.input_nc`` channels."""
        return to_channels(read_image(self.paths[index]), self.options.input_nc)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        a = self.read(index)
        path = str(self.paths[index])
        params = self.params_for(index, (a.shape[1], a.shape[0]), path)
        return {"A": apply(a, params), "A_paths": path}
