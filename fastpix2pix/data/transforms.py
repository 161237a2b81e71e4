"""Preprocessing and augmentation with the official pix2pix semantics, as pure functions.

The augmentation is split in two so that another implementation (e.g. a GPU one working on a batch) can
be checked against this one on identical random draws:

* :func:`sample_params` turns an input size, the options and a random generator into an explicit
  :class:`AugmentParams` (resize target, crop box, flip);
* :func:`apply` performs exactly those operations on an image and returns a tensor in [-1, 1].

Semantics follow the official ``data/base_dataset.py``: bicubic resize with Pillow, one crop position and
one flip per sample (shared by A and B), ``scale_width`` never makes the height smaller than the crop,
``none`` rounds both sides to a multiple of 4. Where the official code silently pads (a crop larger than
the image) this module raises instead.

Randomness: the parameters of sample ``index`` in epoch ``epoch`` come from a numpy generator seeded with
``(seed, epoch, index)`` (:func:`params_rng`). They do not depend on worker processes, batch order or how
many samples were drawn before, so a training run resumed at epoch ``e`` sees exactly the data that the
uninterrupted run saw. Call ``dataset.set_epoch(e)`` before iterating each epoch (like
``DistributedSampler.set_epoch``); with ``persistent_workers=True`` the workers keep their own copy of
the dataset, so the epoch must then be set before the workers start (or workers not be persistent).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from fastpix2pix.data.images import max_value

PREPROCESS_MODES: tuple[str, ...] = ("resize_and_crop", "crop", "scale_width", "scale_width_and_crop", "none")
DIRECTIONS: tuple[str, ...] = ("AtoB", "BtoA")
NONE_MULTIPLE = 4  # ``--preprocess none`` rounds sizes to a multiple of this (official ``__make_power_2``)


@dataclass(frozen=True)
class DataOptions:
    """The official data options (same names and defaults) in one immutable object.

    ``serial_batches`` (no shuffling) is applied by whoever builds the DataLoader; ``seed`` is the base
    of the per-sample augmentation randomness (see the module docstring).
    """

    direction: str = "AtoB"
    preprocess: str = "resize_and_crop"
    load_size: int = 286
    crop_size: int = 256
    no_flip: bool = False
    input_nc: int = 3
    output_nc: int = 3
    max_dataset_size: float = math.inf
    serial_batches: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {self.direction!r}")
        if self.preprocess not in PREPROCESS_MODES:
            raise ValueError(f"preprocess must be one of {PREPROCESS_MODES}, got {self.preprocess!r}")
        for name in ("input_nc", "output_nc"):
            if getattr(self, name) not in (1, 3):
                raise ValueError(f"{name} must be 1 (grayscale) or 3 (RGB), got {getattr(self, name)!r}")
        for name in ("load_size", "crop_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.preprocess in ("resize_and_crop", "scale_width_and_crop") and self.load_size < self.crop_size:
            raise ValueError(
                f"crop_size {self.crop_size} is larger than load_size {self.load_size}: "
                f"preprocess {self.preprocess!r} crops the resized image, so load_size must be >= crop_size"
            )
        if not self.max_dataset_size >= 1:
            raise ValueError(f"max_dataset_size must be >= 1 (or inf), got {self.max_dataset_size!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")


@dataclass(frozen=True)
class AugmentParams:
    """Explicit per-sample augmentation, applied in this order: resize, crop, flip.

    Attributes:
        resize: ``(width, height)`` of a bicubic resize, or None to keep the size.
        crop: ``(left, top, width, height)`` box taken after the resize, or None for no crop.
        flip: mirror left-right after the crop.
    """

    resize: tuple[int, int] | None = None
    crop: tuple[int, int, int, int] | None = None
    flip: bool = False


def resized_size(size: tuple[int, int], options: DataOptions) -> tuple[int, int]:
    """``(width, height)`` after the resize step of ``options.preprocess`` for an input of ``size``."""
    w, h = size
    mode = options.preprocess
    if mode == "resize_and_crop":
        return options.load_size, options.load_size
    if mode in ("scale_width", "scale_width_and_crop"):
        if w == options.load_size and h >= options.crop_size:
            return w, h
        return options.load_size, int(max(options.load_size * h / w, options.crop_size))
    if mode == "none":
        # Python's round (half to even), as the official code, so sizes match it exactly.
        return int(round(w / NONE_MULTIPLE) * NONE_MULTIPLE), int(round(h / NONE_MULTIPLE) * NONE_MULTIPLE)
    return w, h  # "crop"


def output_size(size: tuple[int, int], options: DataOptions) -> tuple[int, int]:
    """``(width, height)`` of the tensors produced for an input of ``size`` (before any error check)."""
    if "crop" in options.preprocess:
        return options.crop_size, options.crop_size
    return resized_size(size, options)


def params_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for sample ``index`` of epoch ``epoch``: independent streams via SeedSequence."""
    return np.random.default_rng([seed, epoch, index])


def sample_params(
    size: tuple[int, int],
    options: DataOptions,
    rng: np.random.Generator,
    path: str | None = None,
) -> AugmentParams:
    """Draw the augmentation of one sample whose A (and B) side is ``size = (width, height)``.

    Three uniforms are always drawn (crop x, crop y, flip), whatever the mode, so that a sample's flip
    does not depend on the preprocess mode and a batched implementation can draw the same numbers.

    Raises:
        ValueError: the crop does not fit in the resized image (``path`` is named in the message).
    """
    u_x, u_y, u_flip = rng.random(3)
    new_w, new_h = resized_size(size, options)
    if min(new_w, new_h) < 1:
        raise ValueError(f"{_where(path)}image of size {size[0]}x{size[1]} (WxH) would be resized to nothing")
    resize = None if (new_w, new_h) == tuple(size) else (new_w, new_h)
    crop = None
    if "crop" in options.preprocess:
        c = options.crop_size
        if c > new_w or c > new_h:
            raise ValueError(
                f"{_where(path)}crop_size {c} is larger than the image after preprocess "
                f"{options.preprocess!r}: {new_w}x{new_h} (WxH, input {size[0]}x{size[1]}); "
                f"lower crop_size to at most {min(new_w, new_h)} or use a resizing preprocess"
            )
        if (new_w, new_h) != (c, c):
            crop = (int(u_x * (new_w - c + 1)), int(u_y * (new_h - c + 1)), c, c)
    flip = (not options.no_flip) and bool(u_flip > 0.5)
    return AugmentParams(resize=resize, crop=crop, flip=flip)


def _where(path: str | None) -> str:
    return f"{path}: " if path else ""


RESAMPLING = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


def resize_image(image: np.ndarray, size: tuple[int, int], method: str = "bicubic") -> np.ndarray:
    """Resize an ``(H, W, C)`` image to ``size = (width, height)`` with Pillow, keeping its dtype.

    8-bit images go through Pillow exactly as the official transform (same rounding); 16-bit ones are
    resized per channel in float32 (Pillow mode ``F``), then clipped and rounded back to uint16.
    ``method`` is one of :data:`RESAMPLING` (the augmentation always uses bicubic, as official).
    """
    resample = RESAMPLING[method]
    if image.dtype == np.uint8:
        pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        out = np.asarray(pil.resize(size, resample))
        return out[..., None] if out.ndim == 2 else out
    channels = [
        np.asarray(Image.fromarray(image[..., c].astype(np.float32)).resize(size, resample))
        for c in range(image.shape[-1])
    ]
    out = np.stack(channels, axis=-1)
    return np.clip(np.rint(out), 0, max_value(image)).astype(image.dtype)


def transform_array(image: np.ndarray, params: AugmentParams) -> np.ndarray:
    """The geometric part of :func:`apply`: resize, crop, flip on an ``(H, W, C)`` array."""
    if params.resize is not None:
        image = resize_image(image, params.resize)
    if params.crop is not None:
        x, y, w, h = params.crop
        if x < 0 or y < 0 or x + w > image.shape[1] or y + h > image.shape[0]:
            raise ValueError(
                f"crop box {params.crop} exceeds the image size {image.shape[1]}x{image.shape[0]}"
            )
        image = image[y : y + h, x : x + w]
    if params.flip:
        image = image[:, ::-1]
    return image


@functools.cache
def _normalize_table(scale: int) -> np.ndarray:
    """Every possible pixel value mapped to [-1, 1] with the float32 operations of torchvision's
    ``ToTensor`` + ``Normalize(0.5, 0.5)``: divide by the full scale, subtract 0.5, divide by 0.5."""
    table = torch.arange(scale + 1, dtype=torch.float32).div_(scale).sub_(0.5).div_(0.5).numpy()
    table.setflags(write=False)
    return table


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """``(H, W, C)`` uint8/uint16 array -> ``(C, H, W)`` float32 tensor in [-1, 1].

    A table lookup in numpy: same values as the torch ops, without torch's intra-op threads, which cost
    milliseconds per sample when the few cores are busy (measured: 0.2 ms -> 30 ms on 2 loaded cores).
    """
    return torch.from_numpy(_normalize_table(max_value(image))[image.transpose(2, 0, 1)])


def apply(image: np.ndarray, params: AugmentParams) -> torch.Tensor:
    """Apply ``params`` to an ``(H, W, C)`` uint8/uint16 image; returns ``(C, H', W')`` in [-1, 1]."""
    return to_tensor(transform_array(image, params))


def check_size_for_generator(height: int, width: int, divisor: int) -> None:
    """Raise ValueError if ``height x width`` cannot go through a generator needing multiples of ``divisor``.

    ``unet_256`` halves the image 8 times (divisor 256), ``unet_128`` 7 times (128). The message names the
    size and suggests the nearest valid crop sizes (with a load size in the official 286/256 ratio).
    """
    bad = [(name, v) for name, v in (("height", height), ("width", width)) if v < divisor or v % divisor]
    if not bad:
        return
    lines = []
    for name, value in bad:
        lower = max(divisor, value // divisor * divisor)
        candidates = sorted({lower, lower + divisor} if value > lower else {lower})
        lines.append(f"{name} {value} -> {' or '.join(str(c) for c in candidates)}")
    best = max(divisor, round(min(height, width) / divisor) * divisor)
    raise ValueError(
        f"image size {height}x{width} (HxW) is not a multiple of {divisor}, which the generator needs "
        f"({'; '.join(lines)}). Use e.g. --crop_size {best} --load_size {round(best * 286 / 256)} with a "
        f"cropping preprocess, or images whose sides are multiples of {divisor} with --preprocess none"
    )


class SeededDataset(Dataset):
    """Base of the datasets: options, epoch, and per-sample parameters from ``(seed, epoch, index)``."""

    def __init__(self, options: DataOptions) -> None:
        self.options = options
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of ``epoch`` (call before iterating each epoch)."""
        self.epoch = int(epoch)

    def params_for(self, index: int, size: tuple[int, int], path: str | None = None) -> AugmentParams:
        """The augmentation of sample ``index`` in the current epoch (deterministic)."""
        return sample_params(size, self.options, params_rng(self.options.seed, self.epoch, index), path)
