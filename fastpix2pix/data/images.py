"""Finding, reading and writing image files, with errors that name the file.

Images are handled as numpy arrays of shape ``(H, W, C)`` with ``C`` 1 (grayscale) or 3 (RGB) and dtype
``uint8`` or ``uint16``; the dtype carries the real bit depth, so 16-bit PNG/TIFF data (depth maps,
scientific images) keeps its full range instead of being clipped at 255 as ``Image.convert("RGB")``
does in the official code.
"""

from __future__ import annotations

import math
import os
import struct
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

IMG_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".tif", ".tiff", ".webp")
"""Extensions (compared case-insensitively) of the files that count as images."""

# ``ImageFile.LOAD_TRUNCATED_IMAGES`` is process-global; some libraries set it to True, which makes Pillow
# fill a truncated JPEG with grey instead of failing. Reading is strict regardless (see ``_load_strict``).
_TRUNCATION_LOCK = threading.Lock()

# Pillow errors that mean "this file is not a readable image" (UnidentifiedImageError is an OSError).
DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    TypeError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
)


class ImageReadError(ValueError):
    """An image file exists but cannot be decoded (corrupt, truncated, unsupported format)."""


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` has one of :data:`IMG_EXTENSIONS` (case-insensitive)."""
    return Path(path).suffix.lower() in IMG_EXTENSIONS


def list_images(directory: str | os.PathLike[str], max_dataset_size: float = math.inf) -> list[Path]:
    """Image files under ``directory`` (recursively, as the official ``make_dataset``), sorted by path.

    Sorting happens before truncation to ``max_dataset_size`` so that the kept subset is deterministic
    (the official code truncates in ``os.walk`` order, which depends on the file system).
    """
    directory = Path(directory)
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "does not exist"
        raise FileNotFoundError(f"image directory {directory} {what}")
    paths = sorted(
        (Path(root) / name for root, _, names in os.walk(directory) for name in names if is_image_file(name)),
        key=str,
    )
    if not paths:
        raise FileNotFoundError(
            f"no image files in {directory} (looked recursively for {', '.join(IMG_EXTENSIONS)}, any case)"
        )
    if max_dataset_size < len(paths):
        paths = paths[: int(max_dataset_size)]
    return paths


def _load_strict(im: Image.Image) -> None:
    """``im.load()`` that always fails on truncated data, whatever ``LOAD_TRUNCATED_IMAGES`` says."""
    if not ImageFile.LOAD_TRUNCATED_IMAGES:
        im.load()
        return
    with _TRUNCATION_LOCK:
        saved = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            im.load()
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _low_byte_rawmode(rawmode: str) -> str | None:
    """The Pillow raw mode that unpacks the *low* bytes of 16-bit samples described by ``rawmode``.

    Pillow has no 16-bit-per-channel colour mode: it decodes 16-bit RGB(A) PNG/TIFF keeping only the
    high byte of each sample (``RGB;16B`` for big-endian data). Decoding a second time with the opposite
    endianness unpacker yields the low bytes, and ``high * 256 + low`` is the exact 16-bit value, with
    the decompression and PNG un-filtering still done by Pillow's C code.
    """
    base, sep, kind = rawmode.partition(";16")
    if base not in ("RGB", "RGBA") or not sep or kind not in ("B", "L", "N"):
        return None  # e.g. 16-bit gray+alpha ("LA;16B"): Pillow has no low-byte unpacker, keep 8 bits
    if kind == "N":
        kind = "L" if sys.byteorder == "little" else "B"
    return f"{base};16{'L' if kind == 'B' else 'B'}"


def tile_rawmode(args: object) -> str | None:
    """The raw mode in a tile's decoder arguments (PNG: the string itself; TIFF: the tuple's first item)."""
    rawmode = args[0] if isinstance(args, tuple) and args else args
    return rawmode if isinstance(rawmode, str) else None


def is_16bit_rgb(im: Image.Image) -> bool:
    """Whether an opened (not decoded) RGB(A) file stores 16 bits per channel, which :func:`read_image`
    keeps (16-bit PNG and TIFF): from the header alone."""
    if im.mode not in ("RGB", "RGBA"):
        return False
    rawmodes = {tile_rawmode(tile.args) for tile in im.tile}
    return len(rawmodes) == 1 and _low_byte_rawmode(rawmodes.pop() or "") is not None


def header_bytes_per_channel(im: Image.Image) -> int:
    """The bytes per channel :func:`read_image` decodes an opened file to, from its header alone: 2 for
    16-bit gray and 16-bit RGB(A) PNG/TIFF, else 1."""
    return 2 if im.mode.startswith("I;16") or im.mode == "I" or is_16bit_rgb(im) else 1


def _with_rawmode(args: object, rawmode: str) -> object:
    return (rawmode, *args[1:]) if isinstance(args, tuple) else rawmode


def _read_rgb16(path: Path, high: Image.Image) -> np.ndarray | None:
    """Full-precision ``(H, W, 3)`` uint16 array of a 16-bit RGB(A) file, or None if not one."""
    rawmodes = {tile_rawmode(tile.args) for tile in high.tile}
    low_rawmode = _low_byte_rawmode(rawmodes.pop() or "") if len(rawmodes) == 1 else None
    if low_rawmode is None:
        return None
    with Image.open(path) as low:
        low.tile = [tile._replace(args=_with_rawmode(tile.args, low_rawmode)) for tile in low.tile]
        _load_strict(low)
        lo = np.asarray(low)
    _load_strict(high)
    hi = np.asarray(high)
    return (hi[..., :3].astype(np.uint16) << 8) | lo[..., :3].astype(np.uint16)


def _decode(path: Path, im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode in ("RGB", "RGBA"):
        rgb16 = _read_rgb16(path, im)
        if rgb16 is not None:
            return rgb16
    _load_strict(im)
    if mode.startswith("I;16"):
        return np.asarray(im).astype(np.uint16)[..., None]
    if mode == "I":  # 32-bit integer: what older Pillow versions return for 16-bit grayscale PNGs
        arr = np.asarray(im)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise ImageReadError(f"cannot read image {path}: 32-bit integer pixel values outside 0..65535")
        return arr.astype(np.uint16)[..., None]
    if mode == "F":
        raise ImageReadError(f"cannot read image {path}: floating-point images are not supported")
    if mode in ("1", "L", "LA", "La"):
        return np.asarray(im.convert("L"))[..., None]
    return np.asarray(im.convert("RGB"))


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode an image file into an ``(H, W, C)`` uint8/uint16 array, C = 1 (grayscale) or 3.

    Palette, RGBA, CMYK... become RGB (alpha dropped, as ``convert("RGB")``); 16-bit grayscale and
    16-bit RGB(A) PNG/TIFF keep 16 bits. EXIF orientation is ignored, as in the official code.

    Raises:
        FileNotFoundError: the file does not exist.
        ImageReadError: (a ``ValueError``) the file is corrupt, truncated or not a supported image.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist")
    try:
        with Image.open(path) as im:
            return _decode(path, im)
    except ImageReadError:
        raise
    except DECODE_ERRORS as err:
        raise ImageReadError(f"cannot read image {path}: {type(err).__name__}: {err}") from err


def max_value(image: np.ndarray) -> int:
    """The value of full intensity for the image's bit depth (255 or 65535)."""
    if image.dtype == np.uint8:
        return 255
    if image.dtype == np.uint16:
        return 65535
    raise TypeError(f"expected a uint8 or uint16 image, got {image.dtype}")


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """Convert an ``(H, W, C)`` image to 1 (grayscale) or 3 (RGB) channels.

    RGB -> gray uses Pillow's fixed-point ITU-R 601-2 luma (``convert("L")``) so that 8-bit results match
    the official transform bit for bit; the same formula is exact-rounded for 16-bit data.
    """
    have = image.shape[-1]
    if channels == have:
        return image
    if channels == 3 and have == 1:
        return np.repeat(image, 3, axis=-1)
    if channels == 1 and have == 3:
        rgb = image.astype(np.int64)
        luma = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16
        return luma.astype(image.dtype)[..., None]
    raise ValueError(f"cannot convert a {have}-channel image to {channels} channels (expected 1 or 3)")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png16(image: np.ndarray, compress_level: int = 6) -> bytes:
    """PNG bytes of an ``(H, W, C)`` uint16 image, C in (1, 3): Pillow cannot write 16-bit RGB."""
    if image.dtype != np.uint16 or image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"expected an (H, W, 1|3) uint16 array, got {image.shape} {image.dtype}")
    h, w, c = image.shape
    rows = image.astype(">u2").reshape(h, w * c).view(np.uint8)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1)  # filter type 0 on every row
    header = struct.pack(">IIBBBBB", w, h, 16, 0 if c == 1 else 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(raw.tobytes(), compress_level))
        + _png_chunk(b"IEND", b"")
    )


def save_image(path: str | os.PathLike[str], image: np.ndarray, quality: int = 95) -> None:
    """Write an ``(H, W, C)`` uint8/uint16 image; the format follows the extension.

    16-bit images are written only as PNG (full precision). ``quality`` applies to JPEG/WebP.
    """
    path = Path(path)
    if image.dtype == np.uint16:
        if path.suffix.lower() != ".png":
            raise ValueError(f"cannot write 16-bit image {path}: only .png keeps 16 bits")
        path.write_bytes(encode_png16(image))
        return
    if image.dtype != np.uint8:
        raise TypeError(f"cannot write image {path}: expected uint8 or uint16, got {image.dtype}")
    array = image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image
    extra = {"quality": quality} if path.suffix.lower() in (".jpg", ".jpeg", ".webp") else {}
    Image.fromarray(array).save(path, **extra)


def image_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """``(width, height)`` read from the header only (cheap: the pixels are not decoded)."""
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise FileNotFoundError(f"image file {path} does not exist") from None
    except DECODE_ERRORS as err:
        raise ImageReadError(f"cannot read image {path}: {type(err).__name__}: {err}") from err
