"""``fastpix2pix serve``: draw a label map or an outline in the browser and see the translation live.

    fastpix2pix serve --name facades                 # http://127.0.0.1:8000/
    fastpix2pix serve --load_official latest_net_G.pth --netG unet_256 --direction BtoA --dataroot D

The page (``fastpix2pix/web``: plain HTML, CSS and JavaScript, no external resource) draws on a canvas of
the model's input size and posts the canvas as a PNG after every finished stroke; the server answers
with the generator's output as a PNG. The API:

``POST /translate``
    body: the image (PNG; JPEG, WebP, BMP, TIFF and PPM are read too), any size; answer: the output PNG
    (same size), computed exactly as ``fastpix2pix predict`` computes it (same decoding, reflect padding
    to the generator's size multiple, engine, precision and protocol, the dropout seed reset for every
    request so the same input always gives the same output). Headers ``X-Model-Ms`` (time in the model) and
    ``X-Padded-Size``. Bad input gets a 4xx with ``{"error": "..."}``.
``GET /info``
    JSON: the model, protocol, device, drawing mode and palettes, limits, whether a sample exists.
``GET /sample.png``
    the input side of the first image of the dataset's test split, at the canvas size (404 if none).

Why the standard library's ``ThreadingHTTPServer``: the server has four routes, a single model behind
a lock, and no need for async I/O, routing, templates or sessions; a framework would add a dependency to
a package whose users only want to look at their model. Requests are parsed in their own threads (a slow
upload holds no other request up) and reach the model one at a time per device (:class:`Translator`).
It is meant for one person's use on their own machine: it binds to loopback by default, answers only to
``localhost`` Host names there (a DNS-rebinding page cannot reach it), and has no authentication.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from fastpix2pix.data import list_images, read_image, resize_image, split_ab, to_channels, to_tensor
from fastpix2pix.data.schemes import LABEL_MAP_COVERAGE, palette_coverage, resolve_scheme
from fastpix2pix.data.transforms import DIRECTIONS
from fastpix2pix.inference.loading import TEST_SEED, load_generator, set_inference_mode
from fastpix2pix.inference.run import build_engine
from fastpix2pix.inference.translate import translate
from fastpix2pix.models.size import size_rule
from fastpix2pix.ops.backend import default_backend
from fastpix2pix.runs.options import ArchitectureOptions, EngineOptions, RunOptions, option
from fastpix2pix.runs.visualize import tensor_to_image
from fastpix2pix.runtime import resolve_device, seed_everything

__all__ = [
    "DrawingMode",
    "RequestError",
    "ServeApp",
    "ServeOptions",
    "Translator",
    "choose_drawing_mode",
    "decode_image",
    "encode_png",
    "inspect_image",
    "label_schemes",
]

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "PPM")
"""What ``POST /translate`` decodes: the formats of ``predict``'s image files. Pillow can open many more
(some through external programs, such as EPS through Ghostscript): an upload never reaches those."""
SAMPLE_IMAGES = 4  # test images looked at to choose the drawing mode (the first one is the sample)
OUTLINE_LIGHT_SHARE = 0.5  # an outline input is mostly white paper ...
OUTLINE_GREY_SHARE = 0.95  # ... and nearly all grey (lines in black or grey)


WEB_ASSETS = {"/": "index.html", "/index.html": "index.html", "/app.js": "app.js", "/style.css": "style.css"}


def _read_asset(name: str) -> bytes:
    return resources.files("fastpix2pix.serve").joinpath("web", name).read_bytes()


# --- HTTP ------------------------------------------------------------------------------------------


@dataclass
class ServeOptions(EngineOptions, ArchitectureOptions, RunOptions):
    """``fastpix2pix serve``: a web page to draw an input and see the generator's translation live.

    Architecture options, direction and crop_size left at their defaults are taken from the checkpoint,
    as for ``predict``; with --load_official give them on the command line.
    """

    host: str = option(
        "127.0.0.1",
        "address to listen on; the default, loopback, lets only this machine in. Any other address lets "
        "everyone who can reach it use the model (there is no authentication)",
    )
    port: int = option(8000, "port to listen on (0: a free port; the URL is printed)")
    protocol: str = option(
        "paper",
        "paper: BatchNorm on the input's own statistics and dropout on, as `predict` (dropout seeded anew "
        "for every request: the same drawing gives the same output); eval: running statistics and no "
        "dropout, as `predict --eval`",
        ("paper", "eval"),
    )
    dataroot: str | None = option(
        None,
        "dataset whose test split gives the sample input and the drawing mode (default: the dataset the "
        "checkpoint was trained on, when it is at hand)",
    )
    phase: str = option("test", "split of dataroot the sample input comes from")
    direction: str = option(
        "AtoB", "which half of dataroot's A|B images is the input (default: the checkpoint's)", DIRECTIONS
    )
    crop_size: int = option(256, "side of the drawing canvas (default: the checkpoint's training size)")
    mode: str = option(
        "auto",
        "drawing mode: labels (colour-coded label maps: rectangle and brush in class colours), outline "
        "(pen and eraser on white) or auto (from --palette, else from the dataset's inputs)",
        ("auto", "labels", "outline"),
    )
    palette: str | None = option(
        None,
        'label colours: facades, synthetic or a JSON file {"classes": [...], "palette": [[r, g, b], '
        "...]} (as `eval --palette`); default: the one the dataset's inputs are drawn in",
    )
    max_bytes: int = option(32 * 1024 * 1024, "largest request body accepted, in bytes (else 413)")
    max_pixels: int = option(
        2048 * 2048,
        "largest image accepted, width x height, read from the image header before decoding (else 413)",
    )
    max_waiting: int = option(8, "requests that may wait for the model at once; more are answered 503")

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_pixels", "max_waiting"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"--port must be in 0..65535, got {self.port}")


# --- drawing mode and palette -------------------------------------------------------------------------


@dataclass(frozen=True)
class DrawingMode:
    """What the page draws with: ``labels`` (in ``palette``'s colours) or ``outline``, and why."""

    mode: str
    palette: str  # the scheme shown first; every scheme in ServeApp.schemes can be switched to
    reason: str


def label_schemes(custom: str | None) -> tuple[dict[str, Any], str | None]:
    """Label schemes by name (facades, synthetic, and the --palette file when given, read as ``eval
    --palette`` reads it) and the name of the --palette one."""
    schemes = {name: resolve_scheme(name) for name in ("facades", "synthetic")}
    if not custom:
        return schemes, None
    scheme = resolve_scheme(custom)
    schemes[scheme.name] = scheme
    return schemes, scheme.name


def looks_like_outlines(images: Sequence[np.ndarray]) -> bool:
    """Dark lines on white paper (edges2shoes, sketches): mostly light and almost all grey."""
    pixels = np.concatenate([image.reshape(-1, 3).astype(np.int16) for image in images])
    grey = (pixels.max(axis=1) - pixels.min(axis=1)) <= 24
    light = pixels.min(axis=1) >= 200
    return bool(grey.mean() >= OUTLINE_GREY_SHARE and light.mean() >= OUTLINE_LIGHT_SHARE)


def choose_drawing_mode(
    requested: str, palette: str | None, schemes: dict[str, Any], samples: Sequence[np.ndarray], name: str
) -> DrawingMode:
    """The page's initial mode and palette: what the options ask for, else what the dataset's inputs look
    like, else a guess from the experiment's name. The page can switch both whatever this says.

    ``palette`` is the name of the --palette scheme (a key of ``schemes``) or None.
    """
    if palette:
        return DrawingMode("outline" if requested == "outline" else "labels", palette, "--palette")
    if requested != "auto":
        return DrawingMode(requested, "facades", f"--mode {requested}")
    if samples:
        if looks_like_outlines(samples):
            return DrawingMode("outline", "facades", "the dataset's inputs are dark lines on white")
        coverage = {key: palette_coverage(samples, scheme.palette) for key, scheme in schemes.items()}
        best = max(coverage, key=coverage.__getitem__)
        if coverage[best] >= LABEL_MAP_COVERAGE:
            reason = f"{coverage[best]:.0%} of the dataset's input pixels are {best} label colours"
            return DrawingMode("labels", best, reason)
        reason = "the dataset's inputs are neither label maps nor outlines: uploading an image suits it best"
        return DrawingMode("labels", best, reason)
    if any(word in name.lower() for word in ("edges", "sketch", "outline")):
        return DrawingMode("outline", "facades", f"no dataset at hand; the name {name!r} suggests outlines")
    return DrawingMode("labels", "facades", "no dataset at hand: the facades label colours by default")


# --- the dataset's samples -----------------------------------------------------------------------------


def saved_training_options(run_dir: Path, checkpoint: Path | None) -> dict[str, Any]:
    """The options a run was trained with: ``train_opt.json`` beside the checkpoint, else the checkpoint's
    own record (memory-mapped, so its tensors are not read a second time); {} when neither has them."""
    record = run_dir / "train_opt.json"
    with contextlib.suppress(OSError, ValueError):
        return dict(json.loads(record.read_text()))
    if checkpoint is not None and checkpoint.suffix == ".pt":
        with contextlib.suppress(Exception):  # any unreadable checkpoint: simply no record
            state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
            return dict(state.get("options") or {})
    return {}


def sample_inputs(root: Path, phase: str, direction: str, count: int = SAMPLE_IMAGES) -> list[np.ndarray]:
    """The input halves (8-bit RGB) of the first ``count`` A|B images of ``root/phase``; [] when the
    folder is missing or does not hold A|B images."""
    try:
        paths = list_images(root / phase)[:count]
        inputs = []
        for path in paths:
            a, b = split_ab(read_image(path), path)
            half = to_channels(a if direction == "AtoB" else b, 3)
            inputs.append(half if half.dtype == np.uint8 else (half >> 8).astype(np.uint8))
        return inputs
    except (OSError, ValueError):
        return []


# --- images in and out ------------------------------------------------------------------------------


class RequestError(Exception):
    """A request the server refuses: HTTP ``status`` (4xx, or 503 when busy) and a message for the user."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def inspect_image(body: bytes, max_pixels: int) -> tuple[str, int, int]:
    """Format, width and height of an uploaded image from its header only, before anything is decoded:
    a small file can declare a huge image (a decompression bomb), so the size is checked first."""
    if not body:
        raise RequestError(400, "empty body: POST the image itself (a PNG) as the request body")
    try:
        with Image.open(io.BytesIO(body), formats=ACCEPTED_FORMATS) as im:
            format_name, (width, height) = str(im.format), im.size
    except Image.DecompressionBombError as error:  # above twice Pillow's own MAX_IMAGE_PIXELS
        raise RequestError(413, f"image too large: {error}") from None
    except Exception:  # Pillow raises many types for "not an image it knows"
        raise RequestError(
            400, f"not an image: expected a PNG (or {', '.join(ACCEPTED_FORMATS[1:])}), got {_describe(body)}"
        ) from None
    if width < 1 or height < 1:
        raise RequestError(400, f"the image is {width}x{height}: it has no pixels")
    if width * height > max_pixels:
        raise RequestError(
            413,
            f"image too large: {width}x{height} = {width * height} pixels, the limit is {max_pixels} "
            f"(--max_pixels)",
        )
    return format_name, width, height


def _describe(body: bytes) -> str:
    head = body[:16]
    return f"{len(body)} bytes starting {head!r}"


def decode_image(body: bytes) -> np.ndarray:
    """The uploaded image as ``predict`` reads it, ``(H, W, C)`` uint8/uint16: it goes through the very
    same ``read_image`` (from a temporary file), so 16-bit data, palettes and alpha are handled alike."""
    with tempfile.NamedTemporaryFile(prefix="fastpix2pix-serve-", suffix=".img") as file:
        file.write(body)
        file.flush()
        try:
            return read_image(file.name)
        except ValueError as error:  # ImageReadError: truncated or corrupt pixel data
            message = str(error).replace(f"image {file.name}", "the image")
            raise RequestError(400, message) from None


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of an ``(H, W, 1|3)`` uint8 array; the pixels equal what ``predict`` saves (its
    ``save_image``), compressed faster (the level changes the bytes, never the pixels)."""
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


# --- the model ----------------------------------------------------------------------------------------

_DEVICE_LOCKS: dict[str, threading.Lock] = {}
_DEVICE_LOCKS_GUARD = threading.Lock()


def device_lock(device: torch.device) -> threading.Lock:
    """One lock per device for the whole process: models on one device never run concurrently (they
    would only compete for its cores or memory, and slow each other down)."""
    with _DEVICE_LOCKS_GUARD:
        return _DEVICE_LOCKS.setdefault(str(device), threading.Lock())


class Translator:
    """The generator, loaded once and warmed up, behind its device's lock.

    Every call reseeds the random generators as ``predict`` does before its first image, so an input
    gives the same output as ``predict`` on it, every time (dropout is on under the paper's protocol).
    """

    def __init__(self, opt: ServeOptions) -> None:
        self.device = resolve_device(opt.device)
        G, self.opt, self.source = load_generator(opt, self.device)
        eval_mode = self.opt.protocol == "eval"
        set_inference_mode(G, eval_mode)
        self.seed = self.opt.seed if self.opt.seed is not None else TEST_SEED
        self.size_rule = size_rule(G)
        self.size_multiple = self.size_rule.multiple
        self.engine = build_engine(
            G, self.opt.engine, eval_mode=eval_mode, device=self.device, seed=self.seed,
            precision=self.opt.precision,
        )  # fmt: skip
        self._lock = device_lock(self.device)
        self._slots = threading.BoundedSemaphore(opt.max_waiting)  # waiting or running
        self.warm_up_seconds = self._warm_up()

    def padded_size(self, height: int, width: int) -> tuple[int, int]:
        """The size the generator sees for an input of this size (predict's rule, :mod:`models.size`),
        known before decoding so that the memory it will take can be checked."""
        return self.size_rule.padded(height, width)

    def _warm_up(self) -> float:
        """One call at the canvas size, so the first stroke does not pay for allocation, kernel selection
        or compilation."""
        started = time.perf_counter()
        self.translate(np.full((self.opt.crop_size, self.opt.crop_size, 3), 255, dtype=np.uint8))
        return time.perf_counter() - started

    def translate(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        """``(H, W, C)`` image -> ``(H, W, output_nc)`` uint8 output and the seconds spent in the model.

        Raises RequestError(503) when ``max_waiting`` requests are already waiting.
        """
        x = to_tensor(to_channels(image, self.opt.input_nc))
        if not self._slots.acquire(blocking=False):
            raise RequestError(503, "busy: too many requests are waiting for the model; try again")
        try:
            with self._lock:
                started = time.perf_counter()
                seed_everything(self.seed)
                fake = translate(self.engine, x.to(self.device), self.size_rule)
                output = tensor_to_image(fake)  # copies to the host: the time includes the device's work
                return output, time.perf_counter() - started
        finally:
            self._slots.release()


# --- the application (everything but HTTP) -----------------------------------------------------------


def _hex(colour: Sequence[int]) -> str:
    return "#" + "".join(f"{int(c):02x}" for c in colour)


def _palette_json(name: str, scheme: Any) -> dict[str, Any]:
    classes = [{"name": c, "color": _hex(rgb)} for c, rgb in zip(scheme.classes, scheme.palette, strict=True)]
    return {"name": name, "classes": classes}


class ServeApp:
    """The translator, the page's assets and the facts ``/info`` reports, prepared once at start."""

    def __init__(self, opt: ServeOptions, *, say: Callable[[str], None] = print) -> None:
        self.say = say
        self.translator = Translator(opt)
        self.opt = self.translator.opt  # completed from the checkpoint
        say(f"fastpix2pix serve: {self.translator.engine.describe()}")
        self.assets = {path: _read_asset(name) for path, name in WEB_ASSETS.items()}
        root, samples = self._dataset_samples()
        self.schemes, custom = label_schemes(self.opt.palette)
        self.drawing = choose_drawing_mode(self.opt.mode, custom, self.schemes, samples, self.opt.name)
        self.sample_png = encode_png(self._canvas_sized(samples[0])) if samples else None
        self.sample_source = f"{root}/{self.opt.phase}" if samples else None
        self.info = self._info()

    def _dataset_samples(self) -> tuple[Path | None, list[np.ndarray]]:
        opt = self.opt
        dataroot = opt.dataroot
        if dataroot is None and not opt.load_official:
            run_dir = Path(opt.checkpoints_dir) / opt.name
            dataroot = saved_training_options(run_dir, Path(self.translator.source)).get("dataroot")
        if not dataroot:
            return None, []
        root = Path(dataroot)
        return root, sample_inputs(root, opt.phase, opt.direction)

    def _canvas_sized(self, image: np.ndarray) -> np.ndarray:
        """The sample at the canvas size, resized as ``test`` resizes (bicubic) when it is not already."""
        size = self.opt.crop_size
        return image if image.shape[:2] == (size, size) else resize_image(image, (size, size))

    def _info(self) -> dict[str, Any]:
        opt, translator = self.opt, self.translator
        protocol = (
            "eval: running statistics, no dropout"
            if opt.protocol == "eval"
            else "paper: the input's own BatchNorm statistics, dropout on (seeded: same input, same output)"
        )
        return {
            "model": {
                "name": opt.name, "weights": translator.source, "netG": opt.netG, "ngf": opt.ngf,
                "input_nc": opt.input_nc, "output_nc": opt.output_nc, "direction": opt.direction,
                "epoch": opt.epoch, "backend": opt.backend or default_backend(), "engine": opt.engine,
                "precision": translator.engine.precision.name,
                "precision_reason": translator.engine.precision.reason,
            },
            "canvas": {"width": opt.crop_size, "height": opt.crop_size},
            "size_multiple": translator.size_multiple,
            "protocol": opt.protocol,
            "protocol_text": protocol,
            "device": str(translator.device),
            "seed": translator.seed,
            "warm_up_ms": round(translator.warm_up_seconds * 1000, 1),
            "mode": self.drawing.mode,
            "palette": self.drawing.palette,
            "mode_reason": self.drawing.reason,
            "palettes": [_palette_json(name, scheme) for name, scheme in self.schemes.items()],
            "sample": "/sample.png" if self.sample_png else None,
            "sample_source": self.sample_source,
            "limits": {"max_bytes": opt.max_bytes, "max_pixels": opt.max_pixels},
        }  # fmt: skip

    def translate_png(self, body: bytes) -> tuple[bytes, dict[str, str]]:
        """``POST /translate``: checked, decoded, translated, encoded; the headers to send with it."""
        _, width, height = inspect_image(body, self.opt.max_pixels)
        padded_h, padded_w = self.translator.padded_size(height, width)
        # A thin image is small but is padded on both sides (50000x1 -> 50176x256 for unet_256): the
        # generator's memory follows the padded size, so that is what must fit.
        limit = max(self.opt.max_pixels, self.translator.size_multiple**2)
        if padded_h * padded_w > limit:
            raise RequestError(
                413,
                f"image too large: {width}x{height} is padded to {padded_w}x{padded_h} for the generator, "
                f"more than the limit of {limit} pixels (--max_pixels)",
            )
        output, seconds = self.translator.translate(decode_image(body))
        headers = {
            "X-Model-Ms": f"{seconds * 1000:.1f}",
            "X-Input-Size": f"{width}x{height}",
            "X-Padded-Size": f"{padded_w}x{padded_h}",
        }
        return encode_png(output), headers
