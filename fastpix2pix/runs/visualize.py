"""What a run shows: progress bar, loss log (JSONL), loss-curve PNG, sample images, HTML pages, TensorBoard.

Everything here works on host data (floats, uint8 arrays) handed over by the trainer at its logging
points, so that nothing in this module forces a device synchronisation by itself.
"""

from __future__ import annotations

import html
import json
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from fastpix2pix.data.images import save_image

__all__ = [
    "HtmlPage",
    "LossLog",
    "ProgressBar",
    "RunLog",
    "TensorBoard",
    "TrainingWebPage",
    "plot_loss_curve",
    "read_loss_log",
    "tensor_to_image",
]

VISUAL_LABELS = ("real_A", "fake_B", "real_B")


def tensor_to_image(image: torch.Tensor) -> np.ndarray:
    """A ``(C, H, W)`` tensor in [-1, 1] -> ``(H, W, C)`` uint8 (C = 1 or 3), like the official tensor2im."""
    array = image.detach().float().cpu().clamp(-1.0, 1.0).numpy()
    array = (np.transpose(array, (1, 2, 0)) + 1.0) / 2.0 * 255.0
    return array.round().astype(np.uint8)


def resize_for_aspect_ratio(image: np.ndarray, aspect_ratio: float) -> np.ndarray:
    """Stretch an image to width/height ``aspect_ratio`` times its own (bicubic), as the official test."""
    if aspect_ratio == 1.0:
        return image
    h, w = image.shape[:2]
    size = (int(w * aspect_ratio), h) if aspect_ratio > 1.0 else (w, int(h / aspect_ratio))
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    out = np.asarray(pil.resize(size, Image.Resampling.BICUBIC))
    return out[..., None] if out.ndim == 2 else out


# --- text logs --------------------------------------------------------------------------------------


class RunLog:
    """Messages for the user: printed (above the progress bar) and appended to ``log.txt``."""

    def __init__(self, path: str | os.PathLike[str] | None, stream: TextIO | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.stream = stream or sys.stdout
        self._said: set[str] = set()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, message: str) -> None:
        tqdm.write(message, file=self.stream)
        if self.path is not None:
            with self.path.open("a") as file:
                file.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {message}\n")

    def once(self, message: str) -> None:
        """Say ``message`` only the first time (e.g. an optional feature being off)."""
        if message not in self._said:
            self._said.add(message)
            self(message)


class LossLog:
    """``loss_log.jsonl``: one JSON record per logging point; appended to, so a resumed run continues it."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: Mapping[str, Any]) -> None:
        with self.path.open("a") as file:
            file.write(json.dumps(dict(record)) + "\n")

    def truncate_after(self, iteration: int) -> None:
        """Drop records past ``iteration``: a resumed run repeats them (they came after its checkpoint)."""
        if not self.path.exists():
            return
        kept = [r for r in read_loss_log(self.path) if r.get("iter", 0) <= iteration]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def read_loss_log(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss_curve(
    records: Sequence[Mapping[str, Any]], loss_names: Sequence[str], path: str | os.PathLike[str]
) -> Path | None:
    """Draw each loss against the iteration (and the learning rate on a second axis) into a PNG.

    Uses the Agg canvas directly, so the global matplotlib backend of the caller is left alone.
    """
    if not records:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    steps = [r["iter"] for r in records]
    for name in loss_names:
        axes.plot(steps, [r.get(name, float("nan")) for r in records], label=name, linewidth=1.0)
    axes.set_xlabel("iteration")
    axes.set_ylabel("loss")
    axes.set_yscale("symlog", linthresh=1.0)  # the L1 term (x100) and the GAN terms differ by 10-100x
    axes.grid(True, alpha=0.3)
    lr_axes = axes.twinx()
    lr_axes.plot(
        steps, [r.get("lr", float("nan")) for r in records], color="gray", linestyle="--", label="lr"
    )
    lr_axes.set_ylabel("learning rate")
    lines = axes.get_legend_handles_labels()
    lr_lines = lr_axes.get_legend_handles_labels()
    axes.legend(lines[0] + lr_lines[0], lines[1] + lr_lines[1], loc="upper right", fontsize="small")
    figure.suptitle(f"losses up to epoch {records[-1].get('epoch')}")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path)
    return path


class ProgressBar:
    """A tqdm bar over iterations; the loss values are refreshed at logging points only (no syncs)."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True) -> None:
        self._bar = tqdm(
            total=total,
            initial=initial,
            unit="it",
            dynamic_ncols=True,
            disable=not enabled,
            leave=True,
            file=sys.stderr,
        )

    def update(self, iterations: int = 1) -> None:
        self._bar.update(iterations)

    def set_losses(self, epoch: int, losses: Mapping[str, float]) -> None:
        self._bar.set_description(f"epoch {epoch}")
        self._bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items()}, refresh=False)

    def close(self) -> None:
        self._bar.close()


class TensorBoard:
    """Scalars and images to TensorBoard when it is installed; otherwise every call does nothing."""

    def __init__(self, log_dir: str | os.PathLike[str], say: RunLog | None = None) -> None:
        self._writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            if say is not None:
                say.once("TensorBoard is not installed (pip install tensorboard): skipping TensorBoard logs")
            return
        self._writer = SummaryWriter(log_dir=str(log_dir))

    @property
    def enabled(self) -> bool:
        return self._writer is not None

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        if self._writer is not None:
            for name, value in values.items():
                self._writer.add_scalar(name, value, step)

    def images(self, images: Mapping[str, np.ndarray], step: int) -> None:
        if self._writer is not None:
            for name, image in images.items():
                self._writer.add_image(name, image, step, dataformats="HWC")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


# --- HTML -------------------------------------------------------------------------------------------


class HtmlPage:
    """A page of titled rows of captioned images, like the official ``util/html.py`` (own markup)."""

    def __init__(self, title: str, refresh_seconds: int = 0) -> None:
        self.title = title
        self.refresh_seconds = refresh_seconds
        self._body: list[str] = []

    def header(self, text: str) -> None:
        self._body.append(f"<h3>{html.escape(text)}</h3>")

    def paragraph(self, text: str) -> None:
        self._body.append(f"<p>{html.escape(text)}</p>")

    def images(self, entries: Iterable[tuple[str, str]], width: int = 256) -> None:
        """One table row: ``(relative image path, caption)`` per cell."""
        cells = []
        for link, caption in entries:
            href = html.escape(link, quote=True)
            cells.append(
                f'<td style="text-align:center;vertical-align:top"><a href="{href}">'
                f'<img src="{href}" style="width:{width}px"></a><br>{html.escape(caption)}</td>'
            )
        self._body.append(f'<table border="0"><tr>{"".join(cells)}</tr></table>')

    def render(self) -> str:
        refresh = (
            f'<meta http-equiv="refresh" content="{self.refresh_seconds}">'
            if self.refresh_seconds > 0
            else ""
        )
        return (
            '<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
            f"{refresh}<title>{html.escape(self.title)}</title></head>\n<body>\n"
            f"<h1>{html.escape(self.title)}</h1>\n" + "\n".join(self._body) + "\n</body></html>\n"
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(path.name + ".tmp")
        temp.write_text(self.render())
        os.replace(temp, path)  # a browser refreshing the page never reads half of it
        return path


class TrainingWebPage:
    """``checkpoints_dir/name/web``: sample images per epoch and ``index.html`` (newest epoch first)."""

    def __init__(
        self, web_dir: str | os.PathLike[str], name: str, labels: Sequence[str] = VISUAL_LABELS
    ) -> None:
        self.web_dir = Path(web_dir)
        self.image_dir = self.web_dir / "images"
        self.image_dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.labels = tuple(labels)

    def image_name(self, epoch: int, label: str) -> str:
        return f"epoch{epoch:03d}_{label}.png"

    def add(self, epoch: int, images: Mapping[str, np.ndarray]) -> None:
        """Save this epoch's samples (overwriting earlier ones of the same epoch) and rewrite the page."""
        for label, image in images.items():
            save_image(self.image_dir / self.image_name(epoch, label), image)
        self.write_index()

    def epochs(self) -> list[int]:
        found = set()
        for path in self.image_dir.glob("epoch*_*.png"):
            digits = path.name[len("epoch") :].split("_", 1)[0]
            if digits.isdigit():
                found.add(int(digits))
        return sorted(found, reverse=True)

    def write_index(self) -> Path:
        page = HtmlPage(f"Experiment name = {self.name}", refresh_seconds=60)
        for epoch in self.epochs():
            page.header(f"epoch [{epoch}]")
            entries = [
                (f"images/{self.image_name(epoch, label)}", label)
                for label in self.labels
                if (self.image_dir / self.image_name(epoch, label)).exists()
            ]
            page.images(entries)
        return page.save(self.web_dir / "index.html")
