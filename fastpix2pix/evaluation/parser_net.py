"""The facade parser: a small U-Net that segments photos into label-map classes, for the FCN-score.

pix2pix measures labels -> photo quality with an "FCN-score": a segmentation network trained on real
photos parses the generated ones, and its agreement with the input label maps is scored. The paper used
a pretrained FCN-8s on Cityscapes; no pretrained weights can be downloaded here, so fastpix2pix trains
its own parser on the dataset's train split (photo -> decoded label map) and caches it.

Everything is a function of a :class:`ParserConfig` (architecture, resolution, schedule, augmentation,
seed) and of the training data, so a cached parser is found again by a hash of both:
``<cache dir>/facade_parser_<hash>.pt``, the cache dir being ``$FASTPIX2PIX_CACHE`` or
``~/.cache/fastpix2pix``. Training runs on CUDA when available; all augmentation is batched torch code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastpix2pix.data.images import list_images, read_image, to_channels
from fastpix2pix.data.labelmaps import decode_labels
from fastpix2pix.runtime import atomic_write, resolve_device

__all__ = [
    "PARSER_CONFIGS",
    "PARSER_FORMAT",
    "FacadeParser",
    "ParserConfig",
    "cache_dir",
    "load_or_train_parser",
    "load_parser_data",
    "parser_cache_path",
    "photos_to_tensor",
    "predict_labels",
    "train_parser",
]

PARSER_FORMAT = 1
"""Bump when training or the architecture changes meaning: it is part of the cache hash."""

CACHE_ENV = "FASTPIX2PIX_CACHE"


@dataclass(frozen=True)
class ParserConfig:
    """How the parser is built and trained (every field enters the cache hash).

    ``size``: photos and labels are resized to ``size x size`` (the parser's working resolution;
    predictions are upsampled back to the input size). Training samples are ``crop x crop`` windows
    after a random zoom in ``1..max_zoom`` and a random flip; ``crop = size`` keeps the whole image at
    zoom 1 (the parser is applied to whole images at test time). ``width``: channels of the first level,
    doubled at each of ``depth`` levels. ``class_balance``: cross-entropy class weights
    ``frequency ** -class_balance`` (0: unweighted), normalised to mean 1 over the present classes.
    """

    size: int = 128
    crop: int = 128
    width: int = 16
    depth: int = 4
    epochs: int = 30
    batch_size: int = 8
    lr: float = 3e-3
    weight_decay: float = 1e-4
    max_zoom: float = 1.2
    colour_jitter: float = 0.2
    class_balance: float = 0.5
    max_images: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        multiple = 2**self.depth
        for name in ("size", "crop"):
            value = getattr(self, name)
            if value < multiple or value % multiple:
                raise ValueError(f"{name} must be a positive multiple of 2**depth = {multiple}, got {value}")
        if self.crop > self.size:
            raise ValueError(f"crop {self.crop} is larger than size {self.size}")
        if self.max_zoom < 1.0:
            raise ValueError(f"max_zoom must be >= 1, got {self.max_zoom}")


PARSER_CONFIGS: dict[str, ParserConfig] = {
    # What a CPU trains in about half an hour: 128 px (half the facades resolution), 1.6M parameters.
    # Real facades test photos: per-pixel accuracy 0.61, mean class accuracy 0.49, mean IoU 0.32. Training
    # on crops (96 of 128 px) instead of whole images gave 0.58 / 0.46 / 0.29: the absolute position
    # (sky on top, shops at the bottom) matters.
    "cpu": ParserConfig(),
    # Full resolution for a GPU session (not measured yet): 256 px, twice as wide, one more level (25.9M).
    "cuda": ParserConfig(size=256, crop=256, width=32, depth=5, epochs=100, batch_size=16),
}


# --- network ----------------------------------------------------------------------------------------


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class FacadeParser(nn.Module):
    """U-Net: ``depth`` max-pool levels of two 3x3 conv-BN-ReLU; each decoder level projects the coarser
    features to its own width (1x1 conv, cheap at low resolution), upsamples them bilinearly, concatenates
    the skip and applies one 3x3 conv-BN-ReLU; a 1x1 conv gives the class logits.

    Input: ``(N, 3, H, W)`` photos in [-1, 1], H and W multiples of 2**depth. Output: ``(N, K, H, W)``.
    """

    def __init__(self, num_classes: int, width: int = 16, depth: int = 4) -> None:
        super().__init__()
        channels = [width * 2**level for level in range(depth + 1)]
        self.size_multiple = 2**depth
        self.encoder = nn.ModuleList(
            nn.Sequential(_conv_bn_relu(3 if level == 0 else channels[level - 1], c), _conv_bn_relu(c, c))
            for level, c in enumerate(channels)
        )
        self.project = nn.ModuleList(
            nn.Conv2d(channels[level + 1], c, 1) for level, c in enumerate(channels[:-1])
        )
        self.decoder = nn.ModuleList(_conv_bn_relu(2 * c, c) for c in channels[:-1])
        self.head = nn.Conv2d(channels[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for level, block in enumerate(self.encoder):
            x = block(F.max_pool2d(x, 2) if level else x)
            skips.append(x)
        for level in reversed(range(len(self.decoder))):
            up = F.interpolate(self.project[level](x), scale_factor=2, mode="bilinear", align_corners=False)
            x = self.decoder[level](torch.cat([up, skips[level]], dim=1))
        return self.head(x)


# --- data -------------------------------------------------------------------------------------------


def photos_to_tensor(photos: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``(N, H, W, 3)`` uint8 photos -> ``(N, 3, H, W)`` float in [-1, 1] (tensors pass through)."""
    if isinstance(photos, torch.Tensor) and photos.is_floating_point():
        return photos
    tensor = torch.as_tensor(np.asarray(photos)) if not isinstance(photos, torch.Tensor) else photos
    return tensor.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def resize_photos(photos: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bilinear resize of ``(N, 3, H, W)`` to ``size x size`` (a no-op at that size)."""
    if photos.shape[-2:] == (size, size):
        return photos
    return F.interpolate(photos, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def resize_labels(labels: torch.Tensor, size: int, num_classes: int) -> torch.Tensor:
    """``(N, H, W)`` class maps -> ``size x size`` by area-weighted majority (keeps thin classes fairer
    than nearest-neighbour picking)."""
    if labels.shape[-2:] == (size, size):
        return labels
    out = []
    for chunk in labels.split(32):
        onehot = F.one_hot(chunk, num_classes).permute(0, 3, 1, 2).float()
        out.append(F.interpolate(onehot, size=(size, size), mode="area").argmax(1))
    return torch.cat(out)


def _split_pair(image: np.ndarray, label_side: str) -> tuple[np.ndarray, np.ndarray]:
    half = image.shape[1] // 2
    left, right = image[:, :half], image[:, half:]
    return (left, right) if label_side == "B" else (right, left)


def load_parser_data(
    root: str | os.PathLike[str],
    palette: np.ndarray,
    size: int | None,
    *,
    label_side: str = "B",
    max_images: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Photos ``(N, 3, size, size)`` in [-1, 1] and decoded labels ``(N, size, size)`` from a folder of
    A|B files (``label_side`` holds the colour-coded label map: B = right half, as in facades).
    ``size`` None keeps the files' size (all must then be equal)."""
    if label_side not in ("A", "B"):
        raise ValueError(f"label_side must be 'A' or 'B', got {label_side!r}")
    paths = list_images(root, math.inf if max_images is None else max_images)
    photos, labels = [], []
    for path in paths:
        photo, label = _split_pair(to_channels(read_image(path), 3), label_side)
        if photo.dtype != np.uint8:
            raise ValueError(f"{path}: the parser expects 8-bit images, got {photo.dtype}")
        tensor = photos_to_tensor(np.ascontiguousarray(photo)[None])
        photos.append(tensor if size is None else resize_photos(tensor, size))
        labels.append(torch.from_numpy(decode_labels(label, palette)))
    label_maps = torch.stack(labels)
    if size is not None:
        label_maps = resize_labels(label_maps, size, len(palette))
    return torch.cat(photos), label_maps


# --- augmentation -----------------------------------------------------------------------------------


def _random_crops(
    photos: torch.Tensor, labels: torch.Tensor, config: ParserConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zoom in by a random factor, take a random ``crop``-sized window, flip half of the samples.

    One affine grid per sample, sampled bilinearly for photos and nearest for labels, so the pair
    stays aligned; everything runs on the data's device.
    """
    n, device = photos.shape[0], photos.device
    draws = torch.rand(n, 4, generator=generator, device=device)
    zoom = 1.0 + draws[:, 0] * (config.max_zoom - 1.0)
    extent = config.crop / config.size / zoom  # half-width of the window in normalised coordinates
    centre_x = (draws[:, 1] * 2 - 1) * (1 - extent)
    centre_y = (draws[:, 2] * 2 - 1) * (1 - extent)
    flip = torch.where(draws[:, 3] < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0] = extent * flip
    theta[:, 0, 2] = centre_x
    theta[:, 1, 1] = extent
    theta[:, 1, 2] = centre_y
    grid = F.affine_grid(theta, [n, 3, config.crop, config.crop], align_corners=False)
    photo_crops = F.grid_sample(photos, grid, mode="bilinear", padding_mode="border", align_corners=False)
    label_crops = F.grid_sample(
        labels.unsqueeze(1).float(), grid, mode="nearest", padding_mode="border", align_corners=False
    )
    return photo_crops, label_crops.squeeze(1).long()


def _jitter_colours(photos: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Random brightness, contrast and saturation (each a factor in 1 +- strength) per sample."""
    if strength <= 0:
        return photos
    n = photos.shape[0]
    factors = 1 + (torch.rand(n, 3, 1, 1, 1, generator=generator, device=photos.device) * 2 - 1) * strength
    x = (photos + 1) / 2
    x = x * factors[:, 0]
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * factors[:, 1] + mean
    grey = x.mean(dim=1, keepdim=True)
    x = (x - grey) * factors[:, 2] + grey
    return x.clamp(0, 1) * 2 - 1


# --- training ---------------------------------------------------------------------------------------


def _class_weights(labels: torch.Tensor, num_classes: int, exponent: float) -> torch.Tensor:
    counts = torch.bincount(labels.reshape(-1), minlength=num_classes).double()
    weights = torch.zeros(num_classes, dtype=torch.float64)
    present = counts > 0
    weights[present] = (counts[present] / counts.sum()) ** -exponent
    weights[present] /= weights[present].mean()
    return weights.float()


def train_parser(
    dataroot: str | os.PathLike[str],
    palette: np.ndarray,
    config: ParserConfig = PARSER_CONFIGS["cpu"],
    *,
    phase: str = "train",
    label_side: str = "B",
    device: torch.device | str | None = None,
    log: Callable[[str], None] | None = None,
    data: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> FacadeParser:
    """Train a parser on ``dataroot/phase`` (photo -> decoded label map); reproducible from ``config.seed``.

    ``data`` may pass pre-loaded ``(photos, labels)`` from :func:`load_parser_data` (at
    ``config.size``). The global RNG state is left untouched. Returns the model in eval mode, on
    ``device``, with ``model.training_info`` (seconds, per-epoch losses).
    """
    device = torch.device(device) if device is not None else resolve_device("auto")
    started = time.perf_counter()
    if data is None:
        data = load_parser_data(
            Path(dataroot) / phase, palette, config.size, label_side=label_side, max_images=config.max_images
        )
    photos, labels = (t.to(device) for t in data)
    loaded = time.perf_counter()
    num_classes = len(palette)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        model = FacadeParser(num_classes, config.width, config.depth).to(device)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    weights = _class_weights(labels.cpu(), num_classes, config.class_balance).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(photos.shape[0] / config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch, pct_start=0.15
    )
    losses = []
    model.train()
    for epoch in range(config.epochs):
        order = torch.randperm(photos.shape[0], generator=generator, device=device)
        total = torch.zeros((), device=device)
        for batch in order.split(config.batch_size):
            if batch.numel() < 2:  # BatchNorm needs two samples
                continue
            x, y = _random_crops(photos[batch], labels[batch], config, generator)
            x = _jitter_colours(x, config.colour_jitter, generator)
            loss = F.cross_entropy(model(x), y, weight=weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.detach() * batch.numel()
        losses.append(float(total) / photos.shape[0])
        if log is not None:
            seconds = time.perf_counter() - loaded
            log(f"parser epoch {epoch + 1}/{config.epochs}: loss {losses[-1]:.4f} ({seconds:.0f} s)")
    model.eval()
    model.training_info = {
        "load_seconds": loaded - started,
        "train_seconds": time.perf_counter() - loaded,
        "device": str(device),
        "images": int(photos.shape[0]),
        "epoch_losses": losses,
        "torch_threads": torch.get_num_threads(),
    }
    return model


@torch.no_grad()
def predict_labels(
    model: FacadeParser, photos: np.ndarray | torch.Tensor, size: int, *, batch_size: int = 16
) -> torch.Tensor:
    """Class maps ``(N, H, W)`` (on the model's device) for ``(N, H, W, 3)`` uint8 or ``(N, 3, H, W)``
    [-1, 1] photos: resized to the parser's ``size``, parsed, logits upsampled back to ``H x W``."""
    device = next(model.parameters()).device
    x = photos_to_tensor(photos)
    height, width = x.shape[-2:]
    was_training = model.training
    model.eval()
    out = []
    for chunk in x.split(batch_size):
        logits = model(resize_photos(chunk.to(device), size))
        logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
        out.append(logits.argmax(1))
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, height, width, dtype=torch.long, device=device)


# --- cache ------------------------------------------------------------------------------------------


def cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """``override``, else ``$FASTPIX2PIX_CACHE``, else ``~/.cache/fastpix2pix``."""
    if override is not None:
        return Path(override)
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fastpix2pix")


def data_fingerprint(root: str | os.PathLike[str], max_images: int | None = None) -> str:
    """Hash of the training files' names and sizes (cheap; catches a different or changed dataset)."""
    paths = list_images(root, math.inf if max_images is None else max_images)
    digest = hashlib.sha256()
    for path in paths:
        digest.update(f"{path.relative_to(root)}:{path.stat().st_size}\n".encode())
    return digest.hexdigest()


def _cache_key(
    config: ParserConfig, palette: np.ndarray, fingerprint: str, label_side: str
) -> dict[str, Any]:
    return {
        "format": PARSER_FORMAT,
        "config": dataclasses.asdict(config),
        "palette": np.asarray(palette).astype(int).tolist(),
        "data": fingerprint,
        "label_side": label_side,
    }


def parser_cache_path(key: dict[str, Any], directory: str | os.PathLike[str] | None = None) -> Path:
    """``<cache dir>/facade_parser_<first 16 hex digits of sha256(key)>.pt``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir(directory) / f"facade_parser_{digest}.pt"


def load_or_train_parser(
    dataroot: str | os.PathLike[str],
    palette: np.ndarray,
    config: ParserConfig = PARSER_CONFIGS["cpu"],
    *,
    phase: str = "train",
    label_side: str = "B",
    device: torch.device | str | None = None,
    directory: str | os.PathLike[str] | None = None,
    train: bool = True,
    log: Callable[[str], None] | None = None,
) -> tuple[FacadeParser, Path, dict[str, Any]]:
    """The cached parser for this config and data, trained (and cached) first if absent and ``train``.

    Returns ``(model in eval mode on device, cache file, metadata)``. Raises FileNotFoundError when the
    parser is not cached and ``train`` is False.
    """
    device = torch.device(device) if device is not None else resolve_device("auto")
    root = Path(dataroot) / phase
    key = _cache_key(config, palette, data_fingerprint(root, config.max_images), label_side)
    path = parser_cache_path(key, directory)
    if path.exists():
        payload = torch.load(path, map_location=device, weights_only=True)
        model = FacadeParser(len(palette), config.width, config.depth).to(device)
        model.load_state_dict(payload["state_dict"])
        return model.eval(), path, payload["info"]
    if not train:
        raise FileNotFoundError(
            f"no cached facade parser {path} for this configuration and data; train it with "
            f"`fastpix2pix eval --train-parser --parser-data {dataroot}` (or pass train=True)"
        )
    model = train_parser(
        dataroot, palette, config, phase=phase, label_side=label_side, device=device, log=log
    )
    info = {**key, **model.training_info}
    payload = {"state_dict": model.state_dict(), "info": info}
    atomic_write(path, lambda file: torch.save(payload, file))
    return model, path, info
