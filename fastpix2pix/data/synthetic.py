"""A procedural, deterministic facades-like paired dataset that ships with the code.

Each sample is a label map of a building front (12 colour-coded classes, like the CMP facades labels) and
a rendered "photo" of it: per-building colours and materials, per-class textures (glass with mullions and
reflections, shutters with slats, balcony railings, bricks or plaster), a lighting gradient, cast shadows
under cornices, sills and balconies, and sensor noise. The photo is a function of the label map plus a
per-building style, so labels -> photo is a genuine (multi-modal) translation task for a U-Net.

The files use the aligned format of the real facades: ``root/{train,test}/NNNN.png``, photo on the left
(A), label map on the right (B), so the task is ``direction="BtoA"``. Everything is numpy; a sample's
random stream is seeded by ``(seed, split, index)``, so the same seed gives the same bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fastpix2pix.data.labelmaps import FACADES_CLASSES, labels_to_rgb

SYNTHETIC_VERSION = 1  # bump when the generator's output changes, so cached datasets are regenerated
MARKER_NAME = "synthetic.json"
SPLITS = ("train", "test")

_WALLS = np.array(
    [
        [0.86, 0.79, 0.66],  # beige
        [0.80, 0.62, 0.42],  # ochre
        [0.82, 0.81, 0.78],  # light grey
        [0.66, 0.36, 0.28],  # brick red
        [0.91, 0.87, 0.74],  # cream
        [0.58, 0.57, 0.55],  # grey stone
        [0.80, 0.63, 0.55],  # salmon
        [0.70, 0.74, 0.66],  # pale green
    ],
    dtype=np.float32,
)
_BLINDS = np.array(
    [[0.24, 0.40, 0.26], [0.45, 0.30, 0.20], [0.62, 0.62, 0.60], [0.86, 0.86, 0.82], [0.25, 0.32, 0.45]],
    dtype=np.float32,
)
_DOORS = np.array(
    [[0.36, 0.23, 0.13], [0.22, 0.14, 0.09], [0.15, 0.30, 0.20], [0.45, 0.12, 0.10], [0.14, 0.18, 0.30]],
    dtype=np.float32,
)


@dataclass
class _Canvas:
    """A label map being painted, with each element's local coordinates for the renderer."""

    labels: np.ndarray  # (S, S) uint8 class ids
    u: np.ndarray  # (S, S) float32, 0..1 across the element that owns the pixel
    v: np.ndarray  # (S, S) float32, 0..1 down that element
    tone: np.ndarray  # (S, S) float32, one random number per element

    @property
    def size(self) -> int:
        return self.labels.shape[0]

    def box(self, cls: int, x0: float, y0: float, x1: float, y1: float, tone: float) -> None:
        """Paint class ``cls`` on the box given in fractions of the image size (later boxes win)."""
        s = self.size
        c0, c1 = max(0, round(x0 * s)), min(s, round(x1 * s))
        r0, r1 = max(0, round(y0 * s)), min(s, round(y1 * s))
        if c1 <= c0 or r1 <= r0:
            return
        self.labels[r0:r1, c0:c1] = cls
        self.u[r0:r1, c0:c1] = (np.arange(c1 - c0, dtype=np.float32) + 0.5) / (c1 - c0)
        self.v[r0:r1, c0:c1] = ((np.arange(r1 - r0, dtype=np.float32) + 0.5) / (r1 - r0))[:, None]
        self.tone[r0:r1, c0:c1] = tone


def _layout(rng: np.random.Generator, size: int) -> _Canvas:
    """Draw a building front. All geometry is in fractions of the size, so a seed gives the same
    building at any resolution."""
    canvas = _Canvas(
        labels=np.zeros((size, size), np.uint8),
        u=np.zeros((size, size), np.float32),
        v=np.zeros((size, size), np.float32),
        tone=np.zeros((size, size), np.float32),
    )
    box = canvas.box
    top = rng.uniform(0.0, 0.12)
    left = rng.uniform(0.02, 0.12) if rng.random() < 0.35 else 0.0
    right = 1.0 - (rng.uniform(0.02, 0.12) if rng.random() < 0.35 else 0.0)
    box(FACADE, left, top, right, 1.0, 0.0)

    roof = rng.uniform(0.015, 0.035) if rng.random() < 0.75 else 0.0
    ground = rng.uniform(0.17, 0.26)
    ground_top = 1.0 - ground
    upper_top = top + roof + rng.uniform(0.01, 0.03)
    n_floors = int(rng.integers(2, 6))
    floor_h = (ground_top - upper_top) / n_floors
    n_cols = int(rng.integers(3, 7))
    bay = (right - left) / n_cols

    style = {
        "sill": rng.random() < 0.7,
        "blinds": rng.random() < 0.35,
        "molding": rng.random() < 0.4,
        "deco": rng.random() < 0.3,
        "pillars": rng.random() < 0.3,
        "floor_cornices": rng.random() < 0.45,
        "shop": rng.random() < 0.55,
        "continuous_balcony": rng.random() < 0.4,
    }
    balcony_floors = {f for f in range(n_floors) if rng.random() < 0.3}
    win_w = bay * rng.uniform(0.38, 0.6) * (0.75 if style["blinds"] else 1.0)
    win_h = floor_h * rng.uniform(0.45, 0.66)
    win_off = floor_h * rng.uniform(0.14, 0.26)
    margin = rng.uniform(0.006, 0.012)

    if style["pillars"]:
        pw = bay * rng.uniform(0.06, 0.11)
        for k in range(n_cols + 1):
            x = left + k * bay
            box(PILLAR, x - pw / 2, upper_top, x + pw / 2, ground_top, rng.random())
    for f in range(n_floors):
        y_floor = upper_top + f * floor_h
        if style["floor_cornices"] and f > 0:
            box(CORNICE, left, y_floor - 0.006, right, y_floor + 0.008, rng.random())
        attic = f == 0 and n_floors > 2 and rng.random() < 0.3
        h = win_h * (0.7 if attic else 1.0)
        for c in range(n_cols):
            if rng.random() < 0.04:
                continue  # a blind wall where a window could be: real facades are not perfect grids
            cx = left + (c + 0.5) * bay + rng.uniform(-0.03, 0.03) * bay
            y0 = y_floor + win_off + rng.uniform(-0.01, 0.01) * floor_h
            _window(canvas, rng, style, cx, y0, win_w, h, margin, balcony=f in balcony_floors)
        if f in balcony_floors and style["continuous_balcony"]:
            y1 = y_floor + win_off + h
            box(BALCONY, left + 0.01, y1 - h * 0.35, right - 0.01, y1 + 0.01, rng.random())

    _ground_floor(canvas, rng, style, left, right, ground_top, n_cols, bay, win_w, margin)
    if roof:
        box(CORNICE, left, top, right, top + roof, rng.random())
    return canvas


def _window(
    canvas: _Canvas,
    rng: np.random.Generator,
    style: dict[str, bool],
    cx: float,
    y0: float,
    w: float,
    h: float,
    margin: float,
    balcony: bool,
) -> None:
    """One window with its optional molding, pediment, shutters, sill and balcony."""
    box = canvas.box
    x0, x1, y1 = cx - w / 2, cx + w / 2, y0 + h
    if style["molding"]:
        box(MOLDING, x0 - margin, y0 - margin, x1 + margin, y1 + margin, rng.random())
    if style["deco"]:
        box(DECO, x0 - 2 * margin, y0 - margin - h * 0.12, x1 + 2 * margin, y0 - margin, rng.random())
    box(WINDOW, x0, y0, x1, y1, rng.random())
    if style["blinds"]:
        box(BLIND, x0 - w * 0.48, y0, x0, y1, rng.random())
        box(BLIND, x1, y0, x1 + w * 0.48, y1, rng.random())
    if style["sill"]:
        box(SILL, x0 - margin, y1, x1 + margin, y1 + h * 0.06, rng.random())
    if balcony and not style["continuous_balcony"]:
        box(BALCONY, x0 - 2 * margin, y1 - h * 0.35, x1 + 2 * margin, y1 + h * 0.05, rng.random())


def _ground_floor(
    canvas: _Canvas,
    rng: np.random.Generator,
    style: dict[str, bool],
    left: float,
    right: float,
    ground_top: float,
    n_cols: int,
    bay: float,
    win_w: float,
    margin: float,
) -> None:
    """Shops and a door, or windows and a door, on the ground floor."""
    box = canvas.box
    ground = 1.0 - ground_top
    door_col = int(rng.integers(0, n_cols))
    if rng.random() < 0.5:
        box(CORNICE, left, ground_top - 0.004, right, ground_top + 0.012, rng.random())
    shop_top = ground_top + ground * rng.uniform(0.12, 0.22)
    c = 0
    while c < n_cols:
        x_bay = left + c * bay
        if c == door_col:
            dw = bay * rng.uniform(0.45, 0.7)
            cx = x_bay + bay / 2
            box(DOOR, cx - dw / 2, 1.0 - ground * rng.uniform(0.62, 0.8), cx + dw / 2, 1.0, rng.random())
            c += 1
        elif style["shop"]:
            span = 1
            while c + span < n_cols and c + span != door_col and rng.random() < 0.4:
                span += 1
            inset = bay * rng.uniform(0.06, 0.12)
            box(SHOP, x_bay + inset, shop_top, x_bay + span * bay - inset, 1.0 - ground * 0.06, rng.random())
            c += span
        else:
            cx = x_bay + bay / 2 + rng.uniform(-0.02, 0.02) * bay
            _window(canvas, rng, style, cx, shop_top, win_w, ground * 0.5, margin, balcony=False)
            c += 1


def _smooth_noise(rng: np.random.Generator, size: int, cells_y: int, cells_x: int) -> np.ndarray:
    """Value noise in [-1, 1]: a random grid, smoothstep-interpolated to ``(size, size)``."""
    grid = rng.random((cells_y + 1, cells_x + 1), dtype=np.float32) * 2 - 1

    def axis(cells: int) -> tuple[np.ndarray, np.ndarray]:
        t = (np.arange(size, dtype=np.float32) + 0.5) * (cells / size)
        i = np.minimum(t.astype(np.int64), cells - 1)
        f = t - i
        return i, f * f * (3 - 2 * f)

    iy, fy = axis(cells_y)
    ix, fx = axis(cells_x)
    rows = grid[iy] * (1 - fy)[:, None] + grid[iy + 1] * fy[:, None]
    return rows[:, ix] * (1 - fx) + rows[:, ix + 1] * fx


def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``mask`` moved down by ``dy >= 0`` and right by ``dx`` (either sign), zero-filled."""
    out = np.zeros_like(mask)
    h, w = mask.shape
    if dy >= h or abs(dx) >= w:
        return out
    src = mask[: h - dy, max(0, -dx) : w - max(0, dx)]
    out[dy:, max(0, dx) : w - max(0, -dx)] = src
    return out


def _class_colours(rng: np.random.Generator) -> np.ndarray:
    """Per-building base colour of each class, ``(12, 3)`` float32 in [0, 1]."""
    jitter = rng.uniform(-0.04, 0.04, 3).astype(np.float32)
    wall = np.clip(_WALLS[rng.integers(len(_WALLS))] + jitter, 0, 1)
    stone = (
        np.clip(wall * rng.uniform(1.06, 1.22), 0, 1)
        if rng.random() < 0.6
        else np.float32([0.86, 0.84, 0.78])
    )
    colours = np.empty((12, 3), np.float32)
    colours[BACKGROUND] = 0  # the sky is drawn as a gradient
    colours[FACADE] = wall
    colours[WINDOW] = np.float32([0.12, 0.14, 0.19]) * rng.uniform(0.8, 1.4)
    colours[DOOR] = _DOORS[rng.integers(len(_DOORS))] * rng.uniform(0.8, 1.2)
    colours[CORNICE] = stone
    colours[SILL] = stone
    colours[BALCONY] = np.float32([0.11, 0.11, 0.12]) * rng.uniform(0.8, 1.6)
    colours[BLIND] = _BLINDS[rng.integers(len(_BLINDS))]
    colours[DECO] = stone * 0.95
    colours[MOLDING] = stone * 0.9
    colours[PILLAR] = np.clip(stone * 1.03, 0, 1)
    colours[SHOP] = np.float32([0.07, 0.08, 0.10])
    return colours


def _mask(labels: np.ndarray, *classes: int) -> np.ndarray:
    return np.isin(labels, classes)


def _paint_sky_and_walls(img: np.ndarray, canvas: _Canvas, rng: np.random.Generator) -> None:
    """Sky gradient (clear or overcast); walls with plaster blotches and weathering streaks, or bricks."""
    s, lab = canvas.size, canvas.labels
    y = ((np.arange(s, dtype=np.float32) + 0.5) / s)[:, None]
    sky_top, sky_bottom = (
        (np.float32([0.42, 0.60, 0.88]), np.float32([0.78, 0.85, 0.93]))
        if rng.random() < 0.6
        else (np.float32([0.70, 0.72, 0.76]), np.float32([0.86, 0.87, 0.88]))
    )
    bg = _mask(lab, BACKGROUND)
    img[bg] = (sky_top * (1 - y) + sky_bottom * y)[np.nonzero(bg)[0]]

    wall = _mask(lab, FACADE)
    texture = 1 + 0.07 * _smooth_noise(rng, s, 6, 6) + 0.05 * _smooth_noise(rng, s, 3, 40)
    if rng.random() < 0.3:
        course = max(2, s // 64)  # brick height in pixels; bricks are two courses long, offset every row
        rows = np.arange(s)[:, None]
        shifted = np.arange(s)[None, :] + (rows // course % 2) * course
        brick_tone = rng.uniform(0.9, 1.1, (s // course + 1, s // (2 * course) + 2)).astype(np.float32)
        mortar = (rows % course == 0) | (shifted % (2 * course) == 0)
        texture = texture * np.where(
            mortar, np.float32(1.25), brick_tone[rows // course, shifted // (2 * course)]
        )
    img[wall] *= texture[wall][:, None]


def _paint_openings(img: np.ndarray, canvas: _Canvas, rng: np.random.Generator, colours: np.ndarray) -> None:
    """Glass with reflections, mullions, curtains; lit shops; panelled doors; slatted shutters; railings."""
    lab, u, v, tone = canvas.labels, canvas.u, canvas.v, canvas.tone
    frame = np.float32([0.92, 0.91, 0.88]) if rng.random() < 0.6 else np.float32([0.33, 0.24, 0.17])
    glass = _mask(lab, WINDOW)
    light = (1 + 1.2 * (1 - v) ** 2 * rng.uniform(0.3, 1.0)) * (0.8 + 0.5 * tone)
    light *= 1 - 0.5 * np.clip(1 - v / 0.12, 0, 1)  # the lintel's shadow in the recess
    img[glass] *= light[glass][:, None]
    curtain = glass & (tone > 0.75) & (np.abs(u - 0.5) > 0.25)
    img[curtain] = img[curtain] * 0.3 + np.float32([0.80, 0.76, 0.66]) * 0.7
    mullions = (np.abs(u - 0.5) < 0.05) | (np.abs(v - 0.34) < 0.04) | (u < 0.06) | (u > 0.94) | (v > 0.95)
    img[glass & mullions] = frame

    shop = _mask(lab, SHOP)
    lit = np.clip(_smooth_noise(rng, canvas.size, 8, 8), 0, 1) * 0.55 + 0.2 * tone
    img[shop] += lit[shop][:, None] * np.float32([0.95, 0.85, 0.6])
    img[shop & ((u < 0.03) | (u > 0.97) | (v < 0.05))] = frame * 0.6

    door = _mask(lab, DOOR)
    panels = np.where((np.abs(u - 0.5) < 0.03) | (u < 0.08) | (u > 0.92) | (v < 0.05), 0.6, 1.0)
    img[door] *= panels[door][:, None]
    blind = _mask(lab, BLIND)
    img[blind] *= np.where((v * 14) % 1 < 0.4, 0.72, 1.05)[blind][:, None]
    see_through = _mask(lab, BALCONY) & ((u * 18) % 1 > 0.35) & (v > 0.15) & (v < 0.9)
    img[see_through] = img[see_through] * 0.4 + colours[FACADE] * 0.35


def _light(img: np.ndarray, canvas: _Canvas, rng: np.random.Generator) -> None:
    """Stone lit from above, shadows cast below overhangs (slanted by the sun), a global falloff."""
    s, lab, v = canvas.size, canvas.labels, canvas.v
    stone = _mask(lab, CORNICE, SILL, MOLDING, DECO, PILLAR)
    img[stone] *= (1.12 - 0.3 * v)[stone][:, None]

    overhang = _mask(lab, CORNICE, SILL, BALCONY, DECO)
    depth = max(2, round(s * rng.uniform(0.012, 0.025)))
    slope = rng.uniform(-0.6, 0.6)
    shade = np.zeros((s, s), np.float32)
    for k in range(1, depth + 1):
        np.maximum(shade, _shift(overhang, k, round(k * slope)) * np.float32(1 - (k - 1) / depth), out=shade)
    shade[overhang | _mask(lab, BACKGROUND)] = 0
    img *= (1 - 0.45 * shade)[..., None]

    coords = (np.arange(s, dtype=np.float32) + 0.5) / s - 0.5
    a, b = rng.uniform(-0.2, 0.2, 2)
    img *= (1 + a * coords[None, :] + b * coords[:, None])[..., None].astype(np.float32)


def _render(rng: np.random.Generator, canvas: _Canvas) -> np.ndarray:
    """The "photo" of a label map: ``(S, S, 3)`` uint8."""
    colours = _class_colours(rng)
    img = colours[canvas.labels]
    _paint_sky_and_walls(img, canvas, rng)
    _paint_openings(img, canvas, rng, colours)
    _light(img, canvas, rng)
    sigma = rng.uniform(0.008, 0.025)  # sensor noise
    img += rng.standard_normal((canvas.size, canvas.size, 1), dtype=np.float32) * np.float32(sigma)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def _sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split), index])


def synthetic_pair(seed: int, split: str, index: int, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """``(photo, labels)`` of one sample: ``(S, S, 3)`` uint8 photo and ``(S, S)`` uint8 class ids."""
    rng = _sample_rng(seed, split, index)
    canvas = _layout(rng, size)
    return _render(rng, canvas), canvas.labels


def _file_name(index: int, count: int) -> str:
    return f"{index + 1:0{max(4, len(str(count)))}d}.png"


def _parameters(n_train: int, n_test: int, size: int, seed: int) -> dict[str, object]:
    return {
        "generator": "fastpix2pix.data.synthetic",
        "version": SYNTHETIC_VERSION,
        "n_train": n_train,
        "n_test": n_test,
        "size": size,
        "seed": seed,
    }


def _read_marker(root: Path) -> dict[str, object] | None:
    try:
        return json.loads((root / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


def generate_synthetic_facades(
    root: str | os.PathLike[str],
    n_train: int = 400,
    n_test: int = 100,
    size: int = 256,
    seed: int = 0,
) -> Path:
    """Write ``root/train/*.png`` and ``root/test/*.png`` (A = photo | B = labels) and a marker file.

    The splits are built in a temporary folder inside ``root`` and moved into place at the end, so an
    interrupted run leaves no half-written split behind. Existing splits are replaced only when the
    marker shows they were generated here; anything else is refused rather than overwritten.
    """
    if size < 16 or size % 4:
        raise ValueError(f"size must be a multiple of 4 and at least 16, got {size}")
    if n_train < 0 or n_test < 0:
        raise ValueError(f"n_train and n_test must be >= 0, got {n_train} and {n_test}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    ours = _read_marker(root) is not None
    existing = [root / split for split in SPLITS if (root / split).exists()]
    if existing and not ours:
        raise ValueError(
            f"{root} already holds {', '.join(p.name for p in existing)}/ without a {MARKER_NAME} marker: "
            f"refusing to overwrite data that was not generated by fastpix2pix; choose another root"
        )
    counts = {"train": n_train, "test": n_test}
    with tempfile.TemporaryDirectory(prefix=".synthetic-", dir=root) as tmp:
        for split in SPLITS:
            out = Path(tmp) / split
            out.mkdir()
            for index in range(counts[split]):
                photo, labels = synthetic_pair(seed, split, index, size)
                pair = np.concatenate([photo, labels_to_rgb(labels, SYNTHETIC_PALETTE)], axis=1)
                Image.fromarray(pair).save(out / _file_name(index, counts[split]), compress_level=1)
        for split in SPLITS:
            if (root / split).exists():
                shutil.rmtree(root / split)
            (Path(tmp) / split).rename(root / split)
    (root / MARKER_NAME).write_text(json.dumps(_parameters(n_train, n_test, size, seed), indent=2) + "\n")
    return root


def ensure_synthetic_dataset(
    root: str | os.PathLike[str],
    n_train: int = 400,
    n_test: int = 100,
    size: int = 256,
    seed: int = 0,
) -> Path:
    """Generate the dataset at ``root`` unless its marker records these exact parameters and it is whole."""
    root = Path(root)
    counts = {"train": n_train, "test": n_test}
    if _read_marker(root) == _parameters(n_train, n_test, size, seed) and all(
        (root / split).is_dir() and len(list((root / split).glob("*.png"))) == counts[split]
        for split in SPLITS
    ):
        return root
    return generate_synthetic_facades(root, n_train, n_test, size, seed)


DEFAULT_SYNTHETIC_ROOT = Path("datasets") / "synthetic"
SYNTHETIC_DIRECTION = "BtoA"  # its files are photo | labels, and the task is labels -> photo


def resolve_data_source(
    dataroot: str | None, direction: str, say: Callable[[str], None] | None = None
) -> tuple[Path, str]:
    """The dataset folder and direction. With no dataroot: the synthetic dataset (generated on first
    use), whose task is labels (B) -> photo (A), so a direction left at AtoB becomes BtoA."""
    if dataroot is None:
        if say is not None:
            say(f"no --dataroot: using the synthetic dataset in {DEFAULT_SYNTHETIC_ROOT} (labels -> photo)")
        return Path(ensure_synthetic_dataset(DEFAULT_SYNTHETIC_ROOT)), SYNTHETIC_DIRECTION
    root = Path(dataroot)
    if not root.is_dir():
        raise FileNotFoundError(
            f"--dataroot {root} does not exist or is not a folder (expected a folder with train/ and test/ "
            f"subfolders of A|B images; `fastpix2pix datasets download facades` fetches one)"
        )
    return root, direction


# The classes of the real facades (CMP), so that the same evaluator reads both.
SYNTHETIC_CLASSES: tuple[str, ...] = FACADES_CLASSES
"""Class names; the index of a name is its class id and its row in :data:`SYNTHETIC_PALETTE`."""

# A 12-step "jet" colormap (as the CMP facades labels): adjacent colours differ by >= 90 in some channel,
# so a label survives mild compression and is decoded by the nearest palette colour.
SYNTHETIC_PALETTE: np.ndarray = np.array(
    [
        [0, 0, 128],
        [0, 0, 220],
        [0, 58, 255],
        [0, 151, 255],
        [0, 243, 255],
        [81, 255, 174],
        [174, 255, 81],
        [255, 243, 0],
        [255, 151, 0],
        [255, 58, 0],
        [220, 0, 0],
        [128, 0, 0],
    ],
    dtype=np.uint8,
)
SYNTHETIC_PALETTE.setflags(write=False)

(BACKGROUND, FACADE, WINDOW, DOOR, CORNICE, SILL, BALCONY, BLIND, DECO, MOLDING, PILLAR, SHOP) = range(12)
