"""The data check: every training file's header read before the first iteration, all problems at once.

A dataset as users have it (thousands of files from several sources) may hold a few files that would
stop a run hours in, or train on something else than intended: an unreadable or truncated file, an odd
width, an image too small for the crop, a pixel format with no grayscale or RGB reading.
:func:`check_dataset` reads every file's header, not its pixels (about 50 us per file; threads keep a
slow disk busy), and returns a :class:`DataReport`: :meth:`DataReport.error` lists every problem, one
line per file, and :meth:`DataReport.summary_lines` says what is accepted but worth knowing (grayscale,
RGBA, palette or 16-bit files converted as the official code reads them; non-square halves).

Truncation is detected where the header and the file size show it: JPEG without its end-of-image marker
at the end and PNG without its IEND chunk (both then confirmed by decoding the file, since valid files may
carry trailing data), WebP shorter than its RIFF size, and BMP/PPM/TIFF whose pixel data would lie past
the end of the file. What a header cannot show (corrupt data inside a file) surfaces when the sample is
loaded during training: :func:`loading_error` turns that error, also when a DataLoader worker process
raised it, into one line naming the file (:class:`DataLoadError`).
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from fastpix2pix.data.aligned import split_problem
from fastpix2pix.data.images import (
    DECODE_ERRORS,
    ImageReadError,
    is_16bit_rgb,
    read_image,
    tile_rawmode,
)
from fastpix2pix.data.transforms import DataOptions, check_size_for_generator, output_size, resized_size
from fastpix2pix.runtime import usable_cpu_count

__all__ = [
    "DataCheckError",
    "DataLoadError",
    "DataReport",
    "FileCheck",
    "PixelFormat",
    "check_dataset",
    "check_file",
    "loading_error",
]

_TAIL_BYTES = 64  # read from a file's end: an end marker may be followed by a little padding
_FILES_PER_TASK = 256  # header reads per thread task (one future per file costs as much as the read)


@dataclass(frozen=True)
class PixelFormat:
    """How a file's pixels are stored, and what :func:`read_image` makes of them.

    Attributes:
        name: e.g. "RGB", "grayscale", "RGBA", "palette", "16-bit grayscale".
        channels: 1 or 3: what the file reads as (the official ``Image.convert("RGB")`` for colour).
        bits: 8 or 16 (16-bit files keep 16 bits; the official code clips them to 8).
        note: what the conversion loses or changes, e.g. "alpha dropped".
    """

    name: str
    channels: int
    bits: int = 8
    note: str = ""

    def conversion(self, channels: int) -> str | None:
        """What reading this file with ``channels`` channels (1 or 3) converts, or None for nothing."""
        plain = self.name.removeprefix("16-bit ")
        if plain in ("RGB", "grayscale") and self.channels == channels:
            return None
        note = f" ({self.note})" if self.note else ""
        return f"{self.name} -> {'RGB' if channels == 3 else 'grayscale'}{note}"


# Pillow modes :func:`read_image` reads as the official ``convert("RGB")`` does (then grayscale for
# --input_nc/--output_nc 1). Other modes are decoded once by the check to learn whether they can be read.
_FORMATS: dict[str, PixelFormat] = {
    "RGB": PixelFormat("RGB", 3),
    "RGBX": PixelFormat("RGB", 3),
    "RGBA": PixelFormat("RGBA", 3, note="alpha dropped"),
    "RGBa": PixelFormat("RGBA", 3, note="alpha dropped"),
    "L": PixelFormat("grayscale", 1),
    "LA": PixelFormat("grayscale+alpha", 1, note="alpha dropped"),
    "La": PixelFormat("grayscale+alpha", 1, note="alpha dropped"),
    "1": PixelFormat("1-bit", 1, note="0/1 -> 0/255"),
    "P": PixelFormat("palette", 3),
    "PA": PixelFormat("palette+alpha", 3, note="alpha dropped"),
    "CMYK": PixelFormat("CMYK", 3),
    "YCbCr": PixelFormat("YCbCr", 3),
    "LAB": PixelFormat("LAB", 3),
    "HSV": PixelFormat("HSV", 3),
    **{mode: PixelFormat("16-bit grayscale", 1, 16) for mode in ("I;16", "I;16B", "I;16L", "I;16N")},
}
_NO_READING = {"F": "32-bit floating point"}


class DataCheckError(ValueError):
    """The data check found problems; the message lists them, one line per file."""


class DataLoadError(ValueError):
    """A training sample could not be loaded; ``details`` holds the DataLoader worker's traceback."""

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message)
        self.details = details


@dataclass(frozen=True)
class FileCheck:
    """What the check learnt about one file: its size and pixel format, or why it cannot be used."""

    path: Path
    size: tuple[int, int] | None = None  # (width, height) of the whole A|B file
    pixel_format: PixelFormat | None = None
    problem: str | None = None


# --- one file ---------------------------------------------------------------------------------------


def _raw_bits(rawmode: str) -> int | None:
    """Bits per pixel of an uncompressed Pillow raw mode, or None when unsure (the check then skips)."""
    base, _, suffix = rawmode.partition(";")
    if base == "1":
        return 1
    if not base.isalpha():
        return None
    if not suffix:
        return 8 * len(base)
    if suffix in ("16B", "16L", "16N") or (base == "I" and suffix == "16"):
        return 16 * len(base)
    return None


def _pixel_data_end(im: Image.Image) -> int | None:
    """The byte where the file's pixel data ends according to its header, or None if not known."""
    tags = getattr(im, "tag_v2", None)
    if tags is not None:  # TIFF: strip (273/279) or tile (324/325) offsets and byte counts
        offsets, counts = tags.get(273) or tags.get(324), tags.get(279) or tags.get(325)
        if offsets and counts and len(offsets) == len(counts):
            return max(int(o) + int(c) for o, c in zip(offsets, counts, strict=True))
    ends = []
    for tile in im.tile:
        if tile.codec_name != "raw":
            return None
        rawmode = tile_rawmode(tile.args)
        stride = tile.args[1] if isinstance(tile.args, tuple) and len(tile.args) > 1 else 0
        x0, y0, x1, y1 = tile.extents
        if not stride:
            bits = _raw_bits(rawmode or "")
            if bits is None:
                return None
            stride = math.ceil((x1 - x0) * bits / 8)
        ends.append(tile.offset + abs(stride) * (y1 - y0))
    return max(ends) if ends else None


def _riff_truncation(head: bytes, file_size: int) -> str | None:
    """Why a RIFF file (WebP) is cut short: bytes 4..8 hold the size of the rest of the file."""
    if len(head) < 12 or head[:4] != b"RIFF":
        return None
    declared = int.from_bytes(head[4:8], "little") + 8
    return f"truncated: {file_size} bytes, its RIFF header says {declared}" if file_size < declared else None


def _truncation(im: Image.Image, ends: tuple[bytes, bytes], file_size: int) -> tuple[str | None, bool]:
    """``(why the file looks cut short, whether that is certain)``; ``(None, True)`` if it does not.
    ``ends``: the file's first 12 and last 64 bytes.

    JPEG and PNG files whose end marker is missing are only suspects: valid files may carry trailing
    data (camera trailers, motion photos), so the caller decodes them to decide.
    """
    if im.format in ("JPEG", "MPO"):
        found = b"\xff\xd9" in ends[1]
        return (None if found else "no JPEG end-of-image marker at the end"), found
    if im.format == "PNG":
        found = b"IEND" in ends[1]
        return (None if found else "no PNG IEND chunk at the end"), found
    if im.format == "WEBP":
        return _riff_truncation(ends[0], file_size), True
    end = _pixel_data_end(im)
    if end is not None and end > file_size:
        return f"truncated: its header puts pixel data up to byte {end}, the file has {file_size} bytes", True
    return None, True


def _decode_problem(path: Path, prefix: str) -> str | None:
    """Decode the whole file (strictly, as training will); why it fails, or None."""
    try:
        read_image(path)
    except ImageReadError as err:
        cause = err.__cause__
        detail = f"{type(cause).__name__}: {cause}" if cause is not None else str(err).split(": ", 1)[-1]
        return f"{prefix}: {detail}"
    return None


def _pixel_format(im: Image.Image) -> PixelFormat | None:
    """The file's :class:`PixelFormat` from its header, or None when only decoding can tell."""
    mode = im.mode
    if is_16bit_rgb(im):
        return PixelFormat(f"16-bit {mode}", 3, 16, "alpha dropped" if mode == "RGBA" else "")
    if mode == "I" and im.format == "PNG":  # older Pillow versions read 16-bit grayscale PNG as "I"
        return _FORMATS["I;16"]
    return _FORMATS.get(mode)


def _decoded_format(path: Path, mode: str) -> PixelFormat:
    image = read_image(path)
    return PixelFormat(f"{mode} mode", image.shape[-1], 16 if image.itemsize == 2 else 8)


def check_file(path: str | os.PathLike[str]) -> FileCheck:
    """Read one file's header (decoding it only when the header leaves a doubt, see the module doc)."""
    path = Path(path)
    ends, file_size = (b"", b""), 0
    try:
        with path.open("rb") as file:  # one open for the size, both ends and the header
            file_size = os.fstat(file.fileno()).st_size
            head = file.read(12)
            file.seek(max(0, file_size - _TAIL_BYTES))
            ends = (head, file.read())
            file.seek(0)
            with Image.open(file) as im:
                size, mode, pixel_format = im.size, im.mode, _pixel_format(im)
                truncated, certain = _truncation(im, ends, file_size)
    except FileNotFoundError:
        return FileCheck(path, problem="unreadable: the file does not exist (a broken link?)")
    except PermissionError:
        return FileCheck(path, problem="unreadable: permission denied")
    except Image.UnidentifiedImageError:
        return FileCheck(path, problem="unreadable: not an image file Pillow can read")
    except DECODE_ERRORS as err:  # Pillow decodes WebP when opening it: a cut one fails here
        problem = _riff_truncation(ends[0], file_size) or f"unreadable header: {type(err).__name__}: {err}"
        return FileCheck(path, problem=problem)
    if truncated is not None:
        problem = truncated if certain else _decode_problem(path, f"truncated or corrupt ({truncated})")
        if problem is not None:
            return FileCheck(path, size, problem=problem)
    if mode in _NO_READING:
        return FileCheck(
            path, size,
            problem=f"wrong channel format: pixel mode {mode} ({_NO_READING[mode]}) has no grayscale or RGB "
            f"reading for --input_nc/--output_nc (convert it to 8- or 16-bit images)",
        )  # fmt: skip
    if pixel_format is None:  # an unusual mode: decoding tells whether (and as what) it can be read
        try:
            pixel_format = _decoded_format(path, mode)
        except (ImageReadError, ValueError) as err:
            return FileCheck(path, size, problem=f"wrong channel format: pixel mode {mode}: {err}")
    return FileCheck(path, size, pixel_format)


def _check_files(paths: Sequence[Path], workers: int) -> list[FileCheck]:
    chunks = [paths[i : i + _FILES_PER_TASK] for i in range(0, len(paths), _FILES_PER_TASK)]
    if workers <= 1 or len(chunks) <= 1:
        return [check_file(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(workers, len(chunks))) as pool:
        return [
            result for chunk in pool.map(lambda c: [check_file(p) for p in c], chunks) for result in chunk
        ]


# --- the whole dataset ------------------------------------------------------------------------------


def _size_text(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


@dataclass
class DataReport:
    """The result of :func:`check_dataset`.

    Attributes:
        folder: the checked folder (for messages).
        options: the data options the files were checked against.
        files: how many files were checked.
        problems: ``(path, why)`` for every file that cannot be used, sorted by path.
        setting_problems: problems of the options with these files (not of one file), one line each.
        formats: pixel formats of the usable files, with their counts.
        output_sizes: ``(width, height)`` of the tensors after preprocessing, with their counts.
        nonsquare: files whose A and B halves are not square; ``nonsquare_example`` names one.
    """

    folder: str
    options: DataOptions
    files: int = 0
    problems: list[tuple[Path, str]] = field(default_factory=list)
    setting_problems: list[str] = field(default_factory=list)
    formats: Counter[PixelFormat] = field(default_factory=Counter)
    output_sizes: Counter[tuple[int, int]] = field(default_factory=Counter)
    nonsquare: int = 0
    nonsquare_example: tuple[Path, tuple[int, int]] | None = None

    def error(self) -> DataCheckError | None:
        """Every problem in one error (one line per file), or None when the data can be trained on."""
        if not self.problems and not self.setting_problems:
            return None
        lines = []
        if self.problems:
            lines.append(
                f"{self.folder}: {len(self.problems)} of {self.files} files cannot be used for training:"
            )
            lines += [f"  {path}: {why}" for path, why in self.problems]
        lines += [f"{self.folder}: {line}" for line in self.setting_problems]
        if self.problems:
            lines.append("nothing was trained or written: fix or remove these files, then run again")
        return DataCheckError("\n".join(lines))

    def conversions(self) -> Counter[str]:
        """How many files each conversion applies to (``"grayscale -> RGB": 12``), as the official
        code converts them; a file converted differently for A and B counts once per conversion."""
        opts = self.options
        counts: Counter[str] = Counter()
        for pixel_format, count in self.formats.items():
            if opts.input_nc == opts.output_nc:
                sides = {pixel_format.conversion(opts.input_nc)}
            else:
                sides = {
                    f"{text} for {side}" if (text := pixel_format.conversion(nc)) else None
                    for side, nc in (("A", opts.input_nc), ("B", opts.output_nc))
                }
            for text in sides - {None}:
                counts[text] += count
        return counts

    def converted_files(self) -> int:
        """How many files are converted for at least one side (see :meth:`conversions`)."""
        opts = self.options
        return sum(
            count
            for pixel_format, count in self.formats.items()
            if pixel_format.conversion(opts.input_nc) or pixel_format.conversion(opts.output_nc)
        )

    def summary_lines(self) -> list[str]:
        """What was accepted but is worth knowing, one line per topic: the files converted (and 16-bit
        ones), the non-square halves."""
        lines = []
        parts = []
        conversions = self.conversions()
        if conversions:
            ordered = sorted(conversions.items(), key=lambda item: (-item[1], item[0]))
            parts.append(
                f"{self.converted_files()} of {self.files} files converted as the official code reads them: "
                + ", ".join(f"{count} {text}" for text, count in ordered)
            )
        wide = sum(count for pixel_format, count in self.formats.items() if pixel_format.bits == 16)
        if wide:
            parts.append(
                f"{wide} of {self.files} files are 16-bit and keep their 16 bits (scaled to [-1, 1] as 8-bit "
                f"files are; the official code clips them to 8 bits)"
            )
        if parts:
            lines.append(f"image formats: {'; '.join(parts)}")
        if self.nonsquare_example is not None:
            path, (width, height) = self.nonsquare_example
            lines.append(
                f"A|B files: the halves are not square in {self.nonsquare} of {self.files} files (e.g. "
                f"{path}: {width}x{height}, halves {width // 2}x{height}); {self._nonsquare_handling()}"
            )
        return lines

    def _nonsquare_handling(self) -> str:
        opts = self.options
        how = {
            "resize_and_crop": f"resize_and_crop squashes them to {opts.load_size}x{opts.load_size}",
            "crop": "crop takes square crops from them",
            "scale_width": f"scale_width scales them to width {opts.load_size}, keeping the aspect ratio",
            "scale_width_and_crop": f"scale_width_and_crop scales them to width {opts.load_size}, keeping "
            f"the aspect ratio, then crops",
            "none": "preprocess none keeps them, sides rounded to multiples of 4",
        }[opts.preprocess]
        return f"{how}, as the official code does"

    def output_size_text(self) -> str:
        """The image size after preprocessing: ``256x256``, or the range when sizes vary."""
        if not self.output_sizes:
            return "no images"
        if len(self.output_sizes) == 1:
            return _size_text(next(iter(self.output_sizes)))
        sizes = sorted(self.output_sizes, key=lambda s: (s[0] * s[1], s))
        return f"{len(sizes)} sizes from {_size_text(sizes[0])} to {_size_text(sizes[-1])}"


def _geometry_problem(size: tuple[int, int], options: DataOptions) -> str | None:
    """Why a file of ``size`` cannot be split and preprocessed, or None."""
    width, height = size
    problem = split_problem(width)
    if problem is not None:
        return problem
    half = (width // 2, height)
    new_w, new_h = resized_size(half, options)
    mode = options.preprocess
    if min(new_w, new_h) < 1:
        return f"too small: each half is {width // 2}x{height} (WxH), nothing after preprocess {mode!r}"
    crop = options.crop_size
    if "crop" in mode and (crop > new_w or crop > new_h):
        return (
            f"too small for --crop_size {crop}: each half is {width // 2}x{height} (WxH), {new_w}x{new_h} "
            f"after preprocess {mode!r}"
        )
    return None


def _generator_problems(
    report: DataReport, examples: dict[tuple[int, int], Path], multiple: int, batch_size: int
) -> list[str]:
    """Problems of the options with the preprocessed sizes: the generator's multiple, batching."""
    if not report.output_sizes:
        return []
    mode = report.options.preprocess
    if len(report.output_sizes) == 1:
        width, height = next(iter(report.output_sizes))
        try:
            check_size_for_generator(height, width, multiple)
        except ValueError as err:
            return [str(err)]
        return []
    lines = []
    for size, count in sorted(report.output_sizes.items()):
        if size[0] % multiple or size[1] % multiple or min(size) < multiple:
            lines.append(
                f"{count} files are {_size_text(size)} (WxH) after preprocess {mode!r} (e.g. "
                f"{examples[size]}): the generator needs multiples of {multiple}; use a cropping preprocess "
                f"(resize_and_crop, crop) or resize these images"
            )
    if batch_size > 1:
        lines.append(
            f"preprocess {mode!r} leaves {len(report.output_sizes)} image sizes "
            f"({report.output_size_text()}), which cannot be stacked into batches of {batch_size}: use "
            f"--batch_size 1 or a preprocess that gives one size (resize_and_crop, crop, "
            f"scale_width_and_crop)"
        )
    return lines


def _header_threads(workers: int | None) -> int:
    """Threads for the header reads: a few per usable CPU, since they mostly wait on the disk."""
    return workers if workers is not None else min(16, 4 * usable_cpu_count())


def check_dataset(
    paths: Sequence[str | os.PathLike[str]],
    options: DataOptions,
    *,
    folder: str | os.PathLike[str] | None = None,
    size_multiple: int = 1,
    batch_size: int = 1,
    workers: int | None = None,
) -> DataReport:
    """Check every A|B file of a dataset against ``options`` from its header (see the module doc).

    Args:
        paths: the files (e.g. ``AlignedDataset.paths``).
        options: the data options: preprocess, sizes, channels.
        folder: named in messages (default: the first file's folder).
        size_multiple: what the generator needs the preprocessed sides to be multiples of.
        batch_size: images of different sizes after preprocessing cannot share a batch.
        workers: threads reading headers (default: a few per usable core).

    Returns:
        The :class:`DataReport`; ``report.error()`` is None when every file can be trained on.
    """
    paths = [Path(p) for p in paths]
    where = str(folder if folder is not None else (paths[0].parent if paths else "."))
    report = DataReport(where, options, files=len(paths))
    examples: dict[tuple[int, int], Path] = {}
    for result in _check_files(paths, _header_threads(workers)):
        problem = result.problem
        if problem is None and result.size is not None:
            problem = _geometry_problem(result.size, options)
        if problem is not None:
            report.problems.append((result.path, problem))
            continue
        assert result.size is not None and result.pixel_format is not None
        width, height = result.size
        report.formats[result.pixel_format] += 1
        size = output_size((width // 2, height), options)
        report.output_sizes[size] += 1
        examples.setdefault(size, result.path)
        if width != 2 * height:
            report.nonsquare += 1
            report.nonsquare_example = report.nonsquare_example or (result.path, result.size)
    report.problems.sort(key=lambda item: str(item[0]))
    report.setting_problems = _generator_problems(report, examples, size_multiple, batch_size)
    return report


# --- errors while training --------------------------------------------------------------------------

# How torch's ExceptionWrapper re-raises a worker's exception: the message is the worker's traceback.
_WORKER_ERROR = re.compile(r"^Caught (?P<type>\w+) in DataLoader worker process \d+\.\nOriginal Traceback")


def _worker_message(text: str, type_name: str) -> str:
    """The worker exception's own message: the traceback's last ``[module.]Type: message`` part."""
    lines = text.rstrip().splitlines()
    pattern = re.compile(rf"^(?:[\w.]+\.)?{re.escape(type_name)}: ?")
    for start in range(len(lines) - 1, -1, -1):
        if pattern.match(lines[start]):
            return " ".join([pattern.sub("", lines[start], count=1), *lines[start + 1 :]]).strip()
    return lines[-1].strip() if lines else type_name


def loading_error(error: BaseException) -> DataLoadError | None:
    """``error`` as one line naming the file if it came from loading a training sample, else None.

    Recognised: :class:`ImageReadError` (a file that cannot be decoded) raised in this process, and any
    exception a DataLoader worker process raised (torch re-raises it here with the worker's traceback as
    its message; :attr:`DataLoadError.details` keeps that traceback).
    """
    text = str(error)
    match = _WORKER_ERROR.match(text)
    if match is not None:
        return DataLoadError(_worker_message(text, match["type"]), details=text)
    if isinstance(error, ImageReadError):
        return DataLoadError(text)
    return None
