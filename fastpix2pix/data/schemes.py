"""Label schemes (class names, palette colours) and the one rule that tells whether images are label maps."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastpix2pix.data.images import read_image, to_channels
from fastpix2pix.data.labelmaps import (
    FACADES_CLASSES,
    FACADES_PALETTE,
    colour_residual,
    decode_labels,
    flat_pixel_mask,
)
from fastpix2pix.data.synthetic import SYNTHETIC_CLASSES, SYNTHETIC_PALETTE

__all__ = ["LABEL_MAP_COVERAGE", "LabelScheme", "label_map_coverage", "palette_coverage", "resolve_scheme"]


@dataclass(frozen=True)
class LabelScheme:
    """The classes of a colour-coded label map: names and one RGB colour per class."""

    name: str
    classes: tuple[str, ...]
    palette: np.ndarray

    def __post_init__(self) -> None:
        if self.palette.shape != (len(self.classes), 3):
            raise ValueError(f"palette {self.palette.shape} does not match {len(self.classes)} classes")


def resolve_scheme(name_or_path: str) -> LabelScheme:
    """``facades``, ``synthetic`` or a JSON file ``{"classes": [...], "palette": [[r, g, b], ...]}``."""
    if name_or_path == "facades":
        return LabelScheme("facades", FACADES_CLASSES, np.asarray(FACADES_PALETTE))
    if name_or_path == "synthetic":
        return LabelScheme("synthetic", SYNTHETIC_CLASSES, np.asarray(SYNTHETIC_PALETTE))
    path = Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"--palette {name_or_path}: not 'facades', 'synthetic' or a JSON file")
    spec = json.loads(path.read_text())
    palette = np.asarray(spec["palette"], dtype=np.uint8)
    classes = tuple(spec.get("classes") or (str(k) for k in range(len(palette))))
    return LabelScheme(path.stem, classes, palette)


# --- is the label side a colour-coded label map? ----------------------------------------------------

# A label map's flat regions (interiors, away from JPEG and resize blur at edges) hold palette colours:
# on the facades labels 99-100% of their flat pixels lie within this RGB distance of the nearest facades
# colour, on the facades photos 0%, on the synthetic labels read with the facades palette 44%.
LABEL_COLOUR_TOLERANCE = 12.0
LABEL_MAP_COVERAGE = 0.9  # the share of flat pixels that must be near a palette colour
_LABEL_SAMPLE = 16  # images looked at (spread over the folder): the answer is the same for all


def palette_coverage(images: Sequence[np.ndarray], palette: np.ndarray) -> float:
    """The share of the flat pixels of ``images`` (uint8 RGB) within :data:`LABEL_COLOUR_TOLERANCE` of a
    ``palette`` colour: close to 1 for colour-coded label maps of that palette, near 0 for photos and for
    other palettes. At least :data:`LABEL_MAP_COVERAGE` is "a label map in that palette" (eval, serve)."""
    near = flat = 0
    for image in images:
        mask = flat_pixel_mask(image)
        pixels = image[mask]
        residual = colour_residual(pixels, decode_labels(pixels[None], palette)[0], palette)
        near += int((residual <= LABEL_COLOUR_TOLERANCE).sum())
        flat += int(mask.sum())
    return near / flat if flat else 0.0


def label_map_coverage(paths: Sequence[Path], palette: np.ndarray) -> float:
    """:func:`palette_coverage` of (up to 16 of) the image files ``paths``, spread over the list; 0 for
    images of more than 8 bits (label maps are 8-bit)."""
    chosen = [paths[i] for i in np.linspace(0, len(paths) - 1, min(len(paths), _LABEL_SAMPLE)).astype(int)]
    images = [to_channels(read_image(path), 3) for path in chosen]
    if any(image.dtype != np.uint8 for image in images):
        return 0.0
    return palette_coverage(images, palette)
