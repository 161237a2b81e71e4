"""Build an aligned A|B dataset from two folders of separate images (the official ``combine_A_and_B``).

``folder_a/<phase>/x.ext`` and ``folder_b/<phase>/x.ext2`` are paired by file stem and written side by
side to ``out_dir/<phase>/x.ext``. Unlike the official script, unmatched files and size mismatches are
reported instead of being skipped silently or crashing inside ``np.concatenate``.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fastpix2pix.data.images import is_image_file, read_image, save_image, to_channels
from fastpix2pix.data.transforms import RESAMPLING, resize_image

_MAX_LISTED = 10  # unmatched names shown in an error message


def _images_by_key(directory: Path, suffix: str) -> dict[str, Path]:
    """Images directly in ``directory`` by stem (minus ``suffix``, e.g. ``_A``); stems must be unique."""
    if not directory.is_dir():
        raise FileNotFoundError(f"folder {directory} does not exist")
    found: dict[str, Path] = {}
    for path in sorted(directory.iterdir()):
        if not (path.is_file() and is_image_file(path)):
            continue
        stem = path.stem
        if suffix:
            if not stem.endswith(suffix):
                continue
            stem = stem[: -len(suffix)]
        if stem in found:
            raise ValueError(
                f"{directory}: {found[stem].name} and {path.name} have the same name; cannot pair them"
            )
        found[stem] = path
    return found


def _listing(names: list[str], folder: Path) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    more = f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
    return f"{len(names)} in {folder} only ({shown}{more})"


def _match(dir_a: Path, dir_b: Path, use_ab_suffix: bool, strict: bool) -> list[tuple[str, Path, Path]]:
    """``(key, path_a, path_b)`` for every stem present in both folders, sorted by key."""
    a = _images_by_key(dir_a, "_A" if use_ab_suffix else "")
    b = _images_by_key(dir_b, "_B" if use_ab_suffix else "")
    only_a, only_b = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
    if only_a or only_b:
        parts = [_listing(only_a, dir_a)] if only_a else []
        parts += [_listing(only_b, dir_b)] if only_b else []
        message = f"unmatched images: {'; '.join(parts)}"
        if strict:
            raise ValueError(
                f"{message}. Every A image needs a B image with the same name (strict=False skips them)"
            )
        warnings.warn(f"skipping {message}", stacklevel=3)
    return [(key, a[key], b[key]) for key in sorted(a.keys() & b.keys())]


def _to_common_format(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Same channel count (RGB if either is) and bit depth (16 if either is) for both halves."""
    channels = max(a.shape[-1], b.shape[-1])
    a, b = to_channels(a, channels), to_channels(b, channels)
    if a.dtype != b.dtype:  # one is 8-bit, the other 16-bit: 255 * 257 = 65535
        a, b = (x.astype(np.uint16) * np.uint16(257) if x.dtype == np.uint8 else x for x in (a, b))
    return a, b


def combine_pair(path_a: Path, path_b: Path, resize_b: bool = False, method: str = "bicubic") -> np.ndarray:
    """The A|B array of one pair; B is resized to A's size only when ``resize_b`` is set."""
    a, b = _to_common_format(read_image(path_a), read_image(path_b))
    if a.shape[:2] != b.shape[:2]:
        if not resize_b:
            raise ValueError(
                f"size mismatch: {path_a} is {a.shape[1]}x{a.shape[0]} but {path_b} is "
                f"{b.shape[1]}x{b.shape[0]} (WxH); pass resize_b=True (`fastpix2pix datasets combine "
                f"--resize_B bicubic`, or nearest for label maps) to resize B to A's size"
            )
        b = resize_image(b, (a.shape[1], a.shape[0]), method)
    return np.concatenate([a, b], axis=1)


def combine_ab(
    folder_a: str | os.PathLike[str],
    folder_b: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    phases: list[str] | None = None,
    use_ab_suffix: bool = False,
    resize_b: bool = False,
    method: str = "bicubic",
    max_images: float = math.inf,
    ext: str | None = None,
    strict: bool = True,
    progress: bool = True,
) -> dict[str, int]:
    """Pair ``folder_a/<phase>/*`` with ``folder_b/<phase>/*`` by stem and write A|B images.

    Args:
        phases: subfolders to combine; default: every subfolder of ``folder_a`` (e.g. train, val, test).
        use_ab_suffix: pair ``x_A.ext`` with ``x_B.ext`` and write ``x.ext`` (official ``--use_AB``).
        resize_b: resize B to A's size (with ``method``, e.g. "nearest" for label maps) instead of failing.
        max_images: at most this many pairs per phase (official ``--num_imgs``), first by name.
        ext: output extension such as ".png"; default A's own (".png" for 16-bit images).
        strict: unmatched files raise ValueError listing them; False skips them with a warning.

    Returns:
        The number of images written per phase.
    """
    folder_a, folder_b, out_dir = Path(folder_a), Path(folder_b), Path(out_dir)
    if method not in RESAMPLING:
        raise ValueError(f"method must be one of {tuple(RESAMPLING)}, got {method!r}")
    if ext and not ext.startswith("."):
        ext = f".{ext}"
    if phases is None:
        if not folder_a.is_dir():
            raise FileNotFoundError(f"folder {folder_a} does not exist")
        phases = sorted(p.name for p in folder_a.iterdir() if p.is_dir())
        if not phases:
            raise FileNotFoundError(
                f"{folder_a} has no phase subfolders: expected {folder_a}/train, {folder_a}/test, ... "
                f"with matching subfolders in {folder_b}"
            )
    written: dict[str, int] = {}
    for phase in phases:
        pairs = _match(folder_a / phase, folder_b / phase, use_ab_suffix, strict)
        pairs = pairs[: int(min(max_images, len(pairs)))]
        (out_dir / phase).mkdir(parents=True, exist_ok=True)
        for key, path_a, path_b in tqdm(pairs, desc=f"combine {phase}", disable=not progress):
            ab = combine_pair(path_a, path_b, resize_b, method)
            suffix = ext or (".png" if ab.dtype == np.uint16 else path_a.suffix)
            save_image(out_dir / phase / f"{key}{suffix}", ab)
        written[phase] = len(pairs)
    return written
