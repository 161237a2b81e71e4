"""``fastpix2pix serve``: draw a label map or an outline in the browser and see the translation live.

    fastpix2pix serve --name facades                 # http://127.0.0.1:8000/
    fastpix2pix serve --load_official latest_net_G.pth --netG unet_256 --direction BtoA --dataroot D

The page (``fastpix2pix/web``: plain HTML, CSS and JavaScript, no external resource) draws on a canvas of
the model's input size and posts the canvas as a PNG after every finished stroke; the server answers
with the generator's output as a PNG. The API:

``POST /translate``
    body: the image (PNG; JPEG, WebP, BMP, TIFF and PPM are read too), any size; answer: the output PNG
    (same size), computed exactly as ``fastpix2pix predict`` computes it (same decoding, reflect padding
    to the generator's size multiple, engine and protocol, the dropout seed reset for every request so
    the same input always gives the same output). Headers ``X-Model-Ms`` (time in the model) and
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

import argparse
import contextlib
import errno
import io
import ipaddress
import json
import math
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import torch
from PIL import Image

from fastpix2pix.data.transforms import DIRECTIONS
from fastpix2pix.options import ENGINES, ArchitectureOptions, RunOptions, option

__all__ = [
    "DrawingMode",
    "RequestError",
    "ServeApp",
    "ServeHTTPServer",
    "ServeOptions",
    "Translator",
    "choose_drawing_mode",
    "decode_image",
    "encode_png",
    "exposure_warning",
    "inspect_image",
    "is_loopback",
    "label_schemes",
    "make_server",
    "run_in_thread",
    "serve",
    "serve_command",
]

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "PPM")
"""What ``POST /translate`` decodes: the formats of ``predict``'s image files. Pillow can open many more
(some through external programs, such as EPS through Ghostscript): an upload never reaches those."""

WEB_ASSETS = {"/": "index.html", "/index.html": "index.html", "/app.js": "app.js", "/style.css": "style.css"}
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript", ".css": "text/css"}
# The page may load only from this server: no CDN, font or analytics request can leave the machine.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; connect-src 'self'; object-src 'none'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
SAMPLE_IMAGES = 4  # test images looked at to choose the drawing mode (the first one is the sample)
OUTLINE_LIGHT_SHARE = 0.5  # an outline input is mostly white paper ...
OUTLINE_GREY_SHARE = 0.95  # ... and nearly all grey (lines in black or grey)
LABEL_COLOUR_TOLERANCE = 12.0  # as evaluate.LABEL_COLOUR_TOLERANCE: JPEG keeps flat label colours this close
LABEL_MAP_COVERAGE = 0.9  # share of flat pixels near a palette colour for "a label map in that palette"


@dataclass
class ServeOptions(ArchitectureOptions, RunOptions):
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
    engine: str = option("torch", "what computes the generator, as `predict --engine`", ENGINES)
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
    from fastpix2pix.evaluate import resolve_scheme

    schemes = {name: resolve_scheme(name) for name in ("facades", "synthetic")}
    if not custom:
        return schemes, None
    scheme = resolve_scheme(custom)
    schemes[scheme.name] = scheme
    return schemes, scheme.name


def palette_coverage(images: Sequence[np.ndarray], palette: np.ndarray) -> float:
    """Share of the flat pixels of ``images`` (uint8 RGB) within a small distance of a ``palette`` colour:
    near 1 for label maps drawn in that palette, low for photos and for other palettes."""
    from fastpix2pix.labelmaps import colour_residual, decode_labels, flat_pixel_mask

    near = flat = 0
    for image in images:
        mask = flat_pixel_mask(image)
        if not mask.any():
            continue
        pixels = image[mask]
        residual = colour_residual(pixels, decode_labels(pixels[None], palette)[0], palette)
        near += int((residual <= LABEL_COLOUR_TOLERANCE).sum())
        flat += int(mask.sum())
    return near / flat if flat else 0.0


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
    from fastpix2pix.data import list_images, read_image, split_ab, to_channels

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
    from fastpix2pix.data import read_image

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
        from fastpix2pix.inference import TEST_SEED, build_engine, load_generator, set_inference_mode
        from fastpix2pix.train import resolve_device

        self.device = resolve_device(opt.device)
        G, self.opt, self.source = load_generator(opt, self.device)
        eval_mode = self.opt.protocol == "eval"
        set_inference_mode(G, eval_mode)
        self.seed = self.opt.seed if self.opt.seed is not None else TEST_SEED
        self.size_multiple = int(getattr(G, "size_multiple", 1))
        self.engine = build_engine(
            G, self.opt.engine, eval_mode=eval_mode, device=self.device, seed=self.seed
        )
        self._lock = device_lock(self.device)
        self._slots = threading.BoundedSemaphore(opt.max_waiting)  # waiting or running
        self.warm_up_seconds = self._warm_up()

    def padded_size(self, height: int, width: int) -> tuple[int, int]:
        """The size the generator sees for an input of this size (``inference.pad_to_multiple``'s rule),
        known before decoding so that the memory it will take can be checked."""
        m = self.size_multiple
        return max(m, math.ceil(height / m) * m), max(m, math.ceil(width / m) * m)

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
        from fastpix2pix.data import to_channels, to_tensor
        from fastpix2pix.inference import pad_to_multiple
        from fastpix2pix.train import seed_everything
        from fastpix2pix.visualize import tensor_to_image

        x = to_tensor(to_channels(image, self.opt.input_nc))
        if not self._slots.acquire(blocking=False):
            raise RequestError(503, "busy: too many requests are waiting for the model; try again")
        try:
            with self._lock:
                started = time.perf_counter()
                seed_everything(self.seed)
                padded, (height, width) = pad_to_multiple(x.unsqueeze(0).to(self.device), self.size_multiple)
                with torch.no_grad():
                    fake = self.engine(padded)[0, :, :height, :width]
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
        from fastpix2pix.data import resize_image

        size = self.opt.crop_size
        return image if image.shape[:2] == (size, size) else resize_image(image, (size, size))

    def _info(self) -> dict[str, Any]:
        from fastpix2pix.backend import default_backend

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


def _read_asset(name: str) -> bytes:
    return resources.files("fastpix2pix").joinpath("web", name).read_bytes()


# --- HTTP ------------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_name(header: str) -> str:
    """``Host`` header -> the name without port (``[::1]:8000`` -> ``::1``)."""
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class _Handler(BaseHTTPRequestHandler):
    server: ServeHTTPServer
    protocol_version = "HTTP/1.1"  # keep-alive: the page posts after every stroke
    server_version = "fastpix2pix"
    timeout = 60  # seconds a client may stall while sending: a stalled upload frees its thread

    # -- routing --
    def do_GET(self) -> None:
        if not self._host_allowed():
            return
        app, path = self.server.app, urlsplit(self.path).path
        if path in WEB_ASSETS:
            content_type = CONTENT_TYPES[Path(WEB_ASSETS[path]).suffix]
            self._send(
                200, app.assets[path], content_type, {"Content-Security-Policy": CONTENT_SECURITY_POLICY}
            )
        elif path == "/info":
            self._send_json(200, app.info)
        elif path == "/sample.png" and app.sample_png is not None:
            self._send(200, app.sample_png, "image/png")
        elif path == "/translate":
            self._send_error(405, "POST the image to /translate", {"Allow": "POST"})
        else:
            self._send_error(404, f"no such page: {path}")

    def do_POST(self) -> None:
        if not self._host_allowed():
            return
        path = urlsplit(self.path).path
        if path != "/translate":
            known = path in WEB_ASSETS or path in ("/info", "/sample.png")
            self._send_error(405 if known else 404, f"POST goes to /translate, not {path}")
            self.close_connection = True  # the body was not read
            return
        started = time.perf_counter()
        try:
            png, headers = self.server.app.translate_png(self._read_body())
        except RequestError as error:
            self._send_error(error.status, error.message)
            return
        except Exception:  # a fault of the server, not of the input: logged with its traceback
            self.server.app.say(f"error in POST /translate:\n{traceback.format_exc()}")
            self._send_error(500, "internal error while translating (see the server's log)")
            return
        headers["X-Total-Ms"] = f"{(time.perf_counter() - started) * 1000:.1f}"
        self._send(200, png, "image/png", headers)

    def _method_not_allowed(self) -> None:
        self._send_error(405, f"{self.command} is not used here: GET the page, POST to /translate")
        self.close_connection = True

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = _method_not_allowed

    # -- request parts --
    def _host_allowed(self) -> bool:
        """On loopback, only loopback Host names: a page elsewhere whose name an attacker re-points to
        127.0.0.1 (DNS rebinding) is refused."""
        if not is_loopback(self.server.app.opt.host):
            return True
        name = _host_name(self.headers.get("Host", ""))
        if name in LOOPBACK_NAMES or is_loopback(name):
            return True
        self._send_error(403, f"Host {name!r} refused: this server answers to localhost / 127.0.0.1 only")
        self.close_connection = True
        return False

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise RequestError(411, "chunked uploads are not accepted: send a Content-Length")
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            self.close_connection = True
            raise RequestError(411, "Content-Length required")
        try:
            length = int(length_text)
        except ValueError:
            self.close_connection = True
            raise RequestError(400, f"bad Content-Length {length_text!r}") from None
        limit = self.server.app.opt.max_bytes
        if length < 0 or length > limit:
            self.close_connection = True  # the body is left unread: this connection cannot be reused
            raise RequestError(413, f"body too large: {length} bytes, the limit is {limit} (--max_bytes)")
        body = self.rfile.read(length)
        if len(body) != length:
            self.close_connection = True
            raise RequestError(400, f"incomplete body: {len(body)} of {length} bytes arrived")
        return body

    # -- responses --
    def _send(
        self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json", headers)

    def _send_error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        extra = dict(headers or {})
        if status == 503:
            extra["Retry-After"] = "1"
        self._send_json(status, {"error": message, "status": status}, extra)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        self.server.app.say(f"{self.command} {self.path} {code}")

    def log_message(self, format: str, *args: Any) -> None:  # http.server's own notes (bad requests)
        self.server.app.say(format % args)


class ServeHTTPServer(ThreadingHTTPServer):
    """A thread per connection; the model behind :class:`Translator`'s lock."""

    daemon_threads = True  # a client holding a keep-alive connection open does not block shutdown

    def __init__(self, address: tuple[str, int], app: ServeApp) -> None:
        self.app = app
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1" if host == "0.0.0.0" else "::1"
        return f"http://[{host}]:{port}/" if ":" in str(host) else f"http://{host}:{port}/"


def exposure_warning(host: str, device: str) -> str | None:
    """What to tell the user when the server can be reached from other machines (None on loopback)."""
    if is_loopback(host):
        return None
    return (
        f"warning: listening on {host}: anyone who can reach this address can use the model (and this "
        f"machine's {device}); there is no authentication. --host 127.0.0.1 keeps it on this machine"
    )


def make_server(app: ServeApp, host: str, port: int) -> ServeHTTPServer:
    """The listening server (not yet serving); a port in use is a clear error, not a traceback."""
    try:
        return ServeHTTPServer((host, port), app)
    except OSError as error:
        hint = "; --port 0 picks a free port" if error.errno == errno.EADDRINUSE else ""
        raise ValueError(f"cannot listen on {host}:{port}: {error.strerror or error}{hint}") from None


def serve(opt: ServeOptions, *, say: Callable[[str], None] = print) -> None:
    """Load the model, listen, print the URL, and serve until interrupted."""
    # Pillow's own limit, lowered to ours: whatever decodes an image in this process refuses a bomb
    # even where the header check would not run (twice the limit raises, as Pillow does by default).
    Image.MAX_IMAGE_PIXELS = opt.max_pixels
    app = ServeApp(opt, say=say)
    server = make_server(app, opt.host, opt.port)
    info = app.info
    say(
        f"fastpix2pix serve: {info['model']['weights']} on {info['device']} ({opt.protocol} protocol), "
        f"warmed up in {info['warm_up_ms']:.0f} ms; drawing mode {info['mode']} ({info['mode_reason']})"
    )
    warning = exposure_warning(opt.host, info["device"])
    if warning:
        print(warning, file=sys.stderr, flush=True)
    say(f"open {server.url} (Ctrl+C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def serve_command(args: argparse.Namespace) -> int:
    """``fastpix2pix serve`` from the command line."""
    from fastpix2pix.options import namespace_to_options

    serve(namespace_to_options(ServeOptions, args), say=lambda message: print(message, flush=True))
    return 0


def run_in_thread(server: ServeHTTPServer) -> threading.Thread:
    """Serve in a background thread (tests, notebooks); stop with ``server.shutdown()``."""
    thread = threading.Thread(target=server.serve_forever, name="fastpix2pix-serve", daemon=True)
    thread.start()
    return thread
