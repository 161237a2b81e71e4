"""Writing A|B pair files of chosen sizes and bit depths for the data tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from fastpix2pix.data.images import encode_png16


def write_pair(path: Path, size: tuple[int, int], seed: int = 0, bits: int = 8) -> None:
    """An A|B file whose halves are ``size = (width, height)``, 8-bit RGB or 16-bit RGB PNG."""
    width, height = size
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    if bits == 16:
        halves = rng.integers(0, 65536, (2, height, width, 3), dtype=np.uint16)
        path.write_bytes(encode_png16(np.concatenate(list(halves), axis=1)))
        return
    halves = rng.integers(0, 256, (2, height, width, 3), dtype=np.uint8)
    Image.fromarray(np.concatenate(list(halves), axis=1)).save(path)
