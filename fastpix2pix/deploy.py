"""Run a generator exported by ``fastpix2pix export`` on images, without the training code.

For ``.onnx`` files this module needs only numpy, Pillow and onnxruntime: it imports nothing else, so
it also works as a standalone script copied next to the model (``python deploy.py MODEL INPUT OUTPUT``).
``.pt2`` (torch.export) files need torch, imported only when one is loaded. (``import fastpix2pix.deploy``
itself loads the package, whose ``__init__`` imports torch.)

The pre/post-processing is the one recorded in the file's metadata and used by ``fastpix2pix predict``:

1. the image as RGB (or grayscale for a 1-channel model; Pillow's ``convert``), 8 or 16 bits;
2. scaled to [-1, 1]: ``x / max * 2 - 1`` computed as ``(x / max - 0.5) / 0.5`` in float32;
3. reflect-padded at the bottom and right to a multiple of ``size_multiple`` (at least ``min_size``);
4. the network; the output cropped back to the input size;
5. clamped to [-1, 1], ``(y + 1) / 2 * 255``, rounded to uint8.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "OnnxRunner",
    "Runner",
    "TorchExportRunner",
    "load",
    "main",
    "pad_to_multiple",
    "postprocess",
    "preprocess",
    "read_metadata",
    "translate",
    "translate_file",
]

METADATA_KEY = "fastpix2pix"
METADATA_FILE = "fastpix2pix.json"


class Runner:
    """An exported generator: ``run`` maps an ``(N, C, H, W)`` float32 batch in [-1, 1] to its output."""

    metadata: dict[str, Any]

    def run(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @property
    def input_channels(self) -> int:
        return int(self.metadata["input"]["channels"])

    @property
    def size_multiple(self) -> int:
        return int(self.metadata["input"]["size_multiple"])

    @property
    def min_size(self) -> int:
        return int(self.metadata["input"].get("min_size", self.size_multiple))


class OnnxRunner(Runner):
    """An ``.onnx`` file in an ONNX Runtime session (CPU unless ``providers`` says otherwise)."""

    def __init__(
        self,
        path: str | os.PathLike[str] | bytes,
        *,
        threads: int | None = None,
        providers: Sequence[str] = ("CPUExecutionProvider",),
    ) -> None:
        try:
            import onnxruntime as ort
        except ImportError as error:
            raise ImportError(
                f"running an .onnx file needs onnxruntime ({error}): pip install onnxruntime"
            ) from error
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        source = path if isinstance(path, bytes) else os.fspath(path)
        self.session = ort.InferenceSession(source, options, providers=list(providers))
        meta = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        self.metadata = json.loads(meta) if meta else {}
        self.input_name = self.session.get_inputs()[0].name

    def run(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        return self.session.run(None, {self.input_name: batch})[0]


class TorchExportRunner(Runner):
    """A ``.pt2`` file (``torch.export``), run by torch on the CPU."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        import torch

        extra = {METADATA_FILE: ""}
        self._torch = torch
        self.module = torch.export.load(os.fspath(path), extra_files=extra).module()
        self.metadata = json.loads(extra[METADATA_FILE]) if extra[METADATA_FILE] else {}

    def run(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.no_grad():
            return self.module(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))).numpy()


def load(path: str | os.PathLike[str], *, threads: int | None = None) -> Runner:
    """The runner for an exported file, by its suffix (``.onnx`` or ``.pt2``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exported model {path} does not exist")
    if path.suffix == ".onnx":
        return OnnxRunner(path, threads=threads)
    if path.suffix == ".pt2":
        return TorchExportRunner(path)
    raise ValueError(f"{path}: unknown model file type {path.suffix!r} (expected .onnx or .pt2)")


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The fastpix2pix metadata of an exported file, read without running anything."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnx

        model = onnx.load(os.fspath(path), load_external_data=False)
        values = {entry.key: entry.value for entry in model.metadata_props}
        return json.loads(values[METADATA_KEY]) if METADATA_KEY in values else {}
    return load(path).metadata


# --- pre- and post-processing -------------------------------------------------------------------------


def read_image(path: str | os.PathLike[str], channels: int) -> np.ndarray:
    """An image file as ``(H, W, channels)`` uint8 (uint16 for 16-bit grayscale files)."""
    from PIL import Image

    with Image.open(path) as image:
        if channels == 1 and image.mode in ("I;16", "I;16B", "I;16L"):
            return np.asarray(image, dtype=np.uint16)[..., None]
        converted = image.convert("L" if channels == 1 else "RGB")
        array = np.asarray(converted)
    return array[..., None] if array.ndim == 2 else array


def preprocess(image: np.ndarray) -> np.ndarray:
    """``(H, W, C)`` uint8/uint16 -> ``(C, H, W)`` float32 in [-1, 1] (the float32 ops of fastpix2pix's
    ``to_tensor``: divide by full scale, subtract 0.5, divide by 0.5)."""
    full = np.float32(65535 if image.dtype == np.uint16 else 255)
    scaled = (image.astype(np.float32) / full - np.float32(0.5)) / np.float32(0.5)
    return np.ascontiguousarray(scaled.transpose(2, 0, 1))


def _reflect_pad(batch: np.ndarray, bottom: int, right: int) -> np.ndarray:
    """Reflect-pad bottom/right as ``fastpix2pix.inference.pad_to_multiple`` does: repeated reflections
    when the pad is wider than the image, edge replication when a side is one pixel."""
    if batch.shape[-2] < 2 or batch.shape[-1] < 2:
        return np.pad(batch, ((0, 0), (0, 0), (0, bottom), (0, right)), mode="edge")
    while bottom > 0 or right > 0:
        step_bottom, step_right = min(bottom, batch.shape[-2] - 1), min(right, batch.shape[-1] - 1)
        batch = np.pad(batch, ((0, 0), (0, 0), (0, step_bottom), (0, step_right)), mode="reflect")
        bottom, right = bottom - step_bottom, right - step_right
    return batch


def pad_to_multiple(
    batch: np.ndarray, multiple: int, min_size: int = 0
) -> tuple[np.ndarray, tuple[int, int]]:
    """An ``(N, C, H, W)`` batch padded to sides that are multiples of ``multiple`` (and >= ``min_size``),
    and its original ``(H, W)``."""
    height, width = batch.shape[-2:]
    floor = max(multiple, min_size)
    target_h = max(floor, -(-height // multiple) * multiple)
    target_w = max(floor, -(-width // multiple) * multiple)
    return _reflect_pad(batch, target_h - height, target_w - width), (height, width)


def postprocess(output: np.ndarray) -> np.ndarray:
    """``(C, H, W)`` float in [-1, 1] -> ``(H, W, C)`` uint8, as fastpix2pix's ``tensor_to_image``."""
    array = np.clip(output.astype(np.float32), -1.0, 1.0)
    return ((np.transpose(array, (1, 2, 0)) + 1.0) / 2.0 * 255.0).round().astype(np.uint8)


def translate(runner: Runner, image: np.ndarray) -> np.ndarray:
    """One ``(H, W, C)`` image through an exported generator: the ``(H, W, C_out)`` uint8 output."""
    batch, (height, width) = pad_to_multiple(preprocess(image)[None], runner.size_multiple, runner.min_size)
    return postprocess(runner.run(batch)[0, :, :height, :width])


def translate_file(
    model: str | os.PathLike[str] | Runner, source: str | os.PathLike[str], target: str | os.PathLike[str]
) -> Path:
    """Read ``source``, translate it with ``model`` (a path or a :class:`Runner`), write ``target``."""
    from PIL import Image

    runner = model if isinstance(model, Runner) else load(model)
    output = translate(runner, read_image(source, runner.input_channels))
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(output[..., 0] if output.shape[-1] == 1 else output).save(target)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastpix2pix.deploy",
        description="Translate images with a generator exported by `fastpix2pix export`.",
    )
    parser.add_argument("model", help="an exported .onnx (or .pt2) file")
    parser.add_argument("inputs", nargs="+", help="input image files")
    parser.add_argument("--output", "-o", required=True, help="output file (one input) or folder")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    args = parser.parse_args(argv)
    runner = load(args.model, threads=args.threads)
    many = len(args.inputs) > 1 or Path(args.output).is_dir()
    for source in args.inputs:
        target = Path(args.output) / f"{Path(source).stem}.png" if many else Path(args.output)
        print(translate_file(runner, source, target))
    return 0


if __name__ == "__main__":
    sys.exit(main())
