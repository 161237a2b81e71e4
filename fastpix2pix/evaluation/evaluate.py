"""``fastpix2pix eval``: how good a results folder is, as numbers.

A results folder is what ``fastpix2pix test`` writes: ``<stem>_real_A.png``, ``<stem>_fake_B.png`` and
``<stem>_real_B.png`` per test image. For a labels -> photo task (facades with ``--direction BtoA``)
real_A is the colour-coded label map, fake_B the generated photo and real_B the real photo. Reported:

* the FCN-score analogue (pix2pix Table 1): the project's facade parser
  (:mod:`fastpix2pix.evaluation.parser_net`) parses fake_B; its class maps are scored against real_A decoded
  with the palette (per-pixel accuracy, mean per-class accuracy, mean class IoU, see
  :mod:`fastpix2pix.evaluation.metrics`). The same parser on real_B gives the ceiling ("ground truth" row of
  the paper's table).
* L1, PSNR and SSIM of fake_B against real_B (images in [0, 1]; L1 as a fraction of full scale).

Any dataset whose label side is colour-coded works, given its palette (``--palette facades``,
``synthetic`` or a JSON file of ``{"classes": [...], "palette": [[r, g, b], ...]}``) and a parser trained
on its train split (``--parser-data``). Other datasets (photo -> map, edges -> photo, ...) get L1, PSNR and
SSIM, and the report says why there is no FCN-score: the label side is not a colour-coded map of the
palette (:func:`label_map_coverage`), no parser is cached (``--train-parser`` trains one), no data to train
it on, or ``--no-parser``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastpix2pix.data.images import read_image, to_channels
from fastpix2pix.data.labelmaps import (
    decode_labels,
)
from fastpix2pix.data.schemes import LabelScheme
from fastpix2pix.evaluation.metrics import confusion_matrix, l1_error, psnr, segmentation_scores, ssim
from fastpix2pix.evaluation.parser_net import (
    FacadeParser,
    load_parser_data,
    predict_labels,
)

__all__ = ["ResultImages", "evaluate_parser", "evaluate_results", "find_result_images", "format_report"]

VISUALS = ("real_A", "fake_B", "real_B")
_RESULT_NAME = re.compile(r"^(?P<stem>.+)_(?P<visual>real_A|fake_B|real_B)\.png$")


# --- results folders --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResultImages:
    """The image files of one results folder, by visual name, in matching (sorted) order."""

    folder: Path
    stems: list[str]
    paths: dict[str, list[Path]]


def _image_folders(root: Path) -> list[Path]:
    return sorted({p.parent for p in root.rglob("*_fake_B.png")})


def find_result_images(results: str | Path) -> ResultImages:
    """The results of ``fastpix2pix test`` under ``results``: the folder holding ``*_fake_B.png`` itself
    or a parent with exactly one such folder (``results_dir/name/test_latest/images``)."""
    root = Path(results)
    if not root.is_dir():
        raise FileNotFoundError(f"results folder {root} does not exist")
    folders = _image_folders(root)
    if not folders:
        raise FileNotFoundError(f"no *_fake_B.png under {root}: is it a `fastpix2pix test` results folder?")
    if len(folders) > 1:
        listed = ", ".join(str(f) for f in folders[:5])
        raise ValueError(f"{root} holds several results folders ({listed}...); pass one of them")
    folder = folders[0]
    found: dict[str, dict[str, Path]] = {}
    for path in folder.iterdir():
        match = _RESULT_NAME.match(path.name)
        if match:
            found.setdefault(match["stem"], {})[match["visual"]] = path
    stems = sorted(stem for stem, visuals in found.items() if len(visuals) == len(VISUALS))
    incomplete = sorted(set(found) - set(stems))
    if incomplete:
        raise ValueError(
            f"{folder}: {len(incomplete)} result(s) lack one of {VISUALS}, e.g. {incomplete[0]!r}"
        )
    return ResultImages(folder, stems, {v: [found[s][v] for s in stems] for v in VISUALS})


def _read_rgb(paths: Sequence[Path]) -> np.ndarray:
    images = [to_channels(read_image(p), 3) for p in paths]
    if any(image.dtype != np.uint8 for image in images):
        raise ValueError("eval expects 8-bit result images")
    shapes = {image.shape for image in images}
    if len(shapes) > 1:
        raise ValueError(f"result images differ in size: {sorted(shapes)[:3]}")
    return np.stack(images)


def _to_unit(images: np.ndarray) -> torch.Tensor:
    # float32 is exact enough (SSIM within 1e-7 of float64) and several times faster on CPUs.
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0)


# --- scores -----------------------------------------------------------------------------------------


_METRIC_CHUNK = 16  # images per batch: SSIM holds 15 filtered planes per image


def image_metrics(fake: np.ndarray, real: np.ndarray, stems: Sequence[str]) -> dict[str, Any]:
    """Mean L1 / PSNR / SSIM of ``fake`` vs ``real`` (uint8 ``(N, H, W, 3)``) in [0, 1], and per image."""
    metrics = {"l1": l1_error, "psnr": psnr, "ssim": ssim}
    values: dict[str, list[torch.Tensor]] = {name: [] for name in metrics}
    for start in range(0, len(fake), _METRIC_CHUNK):
        fake_t = _to_unit(fake[start : start + _METRIC_CHUNK])
        real_t = _to_unit(real[start : start + _METRIC_CHUNK])
        for name, metric in metrics.items():
            values[name].append(metric(fake_t, real_t, 1.0).double())
    per_metric = {name: torch.cat(chunks) for name, chunks in values.items()}
    summary: dict[str, Any] = {name: _finite_or_none(v.mean()) for name, v in per_metric.items()}
    summary["units"] = (
        "images in [0, 1]: L1 = mean |fake_B - real_B| (x2 in [-1, 1]), PSNR in dB (null if infinite: "
        "identical images), SSIM mean of per-image SSIM"
    )
    summary["per_image"] = {
        stem: {name: _finite_or_none(v[i]) for name, v in per_metric.items()} for i, stem in enumerate(stems)
    }
    return summary


def _finite_or_none(value: torch.Tensor) -> float | None:
    """JSON has no infinity or NaN: PSNR of identical images is +inf, reported as null."""
    number = float(value)
    return number if np.isfinite(number) else None


def parser_scores(
    parser: FacadeParser, photos: np.ndarray | torch.Tensor, truth: torch.Tensor, size: int, num_classes: int
) -> dict[str, Any]:
    """FCN-score of ``parser`` on ``photos`` against ``truth`` class maps (one confusion matrix)."""
    prediction = predict_labels(parser, photos, size).cpu()
    return segmentation_scores(confusion_matrix(truth.cpu(), prediction, num_classes))


def evaluate_results(
    results: str | Path,
    scheme: LabelScheme,
    parser: FacadeParser | None,
    parser_size: int,
    *,
    label_visual: str = "real_A",
) -> dict[str, Any]:
    """Scores of one results folder (see the module docstring); ``parser`` None skips the FCN-score."""
    images = find_result_images(results)
    fake, real = _read_rgb(images.paths["fake_B"]), _read_rgb(images.paths["real_B"])
    report: dict[str, Any] = {
        "results": str(images.folder),
        "images": len(images.stems),
        "image_metrics": image_metrics(fake, real, images.stems),
    }
    if parser is not None:
        truth = torch.from_numpy(decode_labels(_read_rgb(images.paths[label_visual]), scheme.palette))
        k = len(scheme.classes)
        report["fcn_score"] = {
            "generated": parser_scores(parser, fake, truth, parser_size, k).as_dict(scheme.classes),
            "real": parser_scores(parser, real, truth, parser_size, k).as_dict(scheme.classes),
            "labels_from": label_visual,
            "palette": scheme.name,
        }
    return report


def evaluate_parser(
    parser: FacadeParser, dataroot: str | Path, scheme: LabelScheme, parser_size: int, *, phase: str = "test"
) -> dict[str, Any]:
    """The parser on the real photos of ``dataroot/phase`` (full size) against their decoded labels."""
    photos, truth = load_parser_data(Path(dataroot) / phase, scheme.palette, size=None)
    scores = parser_scores(parser, photos, truth, parser_size, len(scheme.classes))
    return {
        "dataroot": str(dataroot),
        "phase": phase,
        "images": int(photos.shape[0]),
        **scores.as_dict(scheme.classes),
    }


# --- printing ---------------------------------------------------------------------------------------


def _row(label: str, scores: dict[str, Any]) -> str:
    return (
        f"{label:<28}{scores['pixel_accuracy']:>15.3f}{scores['mean_class_accuracy']:>15.3f}"
        f"{scores['mean_iou']:>11.3f}"
    )


def format_report(report: dict[str, Any]) -> str:
    """A short table for the terminal."""
    lines = []
    header = f"{'FCN-score (parser)':<28}{'per-pixel acc':>15}{'per-class acc':>15}{'class IoU':>11}"
    if "results" in report:
        lines.append(f"results: {report['results']} ({report['images']} images)")
    fcn = report.get("fcn_score")
    parser_test = report.get("parser_on_real_test")
    if fcn or parser_test:
        lines.append(header)
    if fcn:
        lines.append(_row("generated photos (fake_B)", fcn["generated"]))
        lines.append(_row("real photos (real_B)", fcn["real"]))
    if parser_test:
        lines.append(_row(f"real {parser_test['phase']} photos ({parser_test['images']})", parser_test))
    metrics = report.get("image_metrics")
    if metrics:
        psnr_text = "inf" if metrics["psnr"] is None else f"{metrics['psnr']:.2f}"
        lines.append(
            f"fake_B vs real_B: L1 {metrics['l1']:.4f} (fraction of full scale)  "
            f"PSNR {psnr_text} dB  SSIM {metrics['ssim']:.4f}"
        )
    if report.get("fcn_score_skipped"):
        lines.append(f"no FCN-score: {report['fcn_score_skipped']}")
    return "\n".join(lines)
