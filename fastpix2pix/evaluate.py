"""``fastpix2pix eval``: how good a results folder is, as numbers.

A results folder is what ``fastpix2pix test`` writes: ``<stem>_real_A.png``, ``<stem>_fake_B.png`` and
``<stem>_real_B.png`` per test image. For a labels -> photo task (facades with ``--direction BtoA``)
real_A is the colour-coded label map, fake_B the generated photo and real_B the real photo. Reported:

* the FCN-score analogue (pix2pix Table 1): the project's facade parser (:mod:`fastpix2pix.parser_net`)
  parses fake_B; its class maps are scored against real_A decoded with the palette (per-pixel accuracy,
  mean per-class accuracy, mean class IoU, see :mod:`fastpix2pix.metrics`). The same parser on real_B
  gives the ceiling ("ground truth" row of the paper's table).
* L1, PSNR and SSIM of fake_B against real_B (images in [0, 1]; L1 as a fraction of full scale).

Any dataset whose label side is colour-coded works, given its palette (``--palette facades``,
``synthetic`` or a JSON file of ``{"classes": [...], "palette": [[r, g, b], ...]}``) and a parser trained
on its train split (``--parser-data``). Other datasets (photo -> map, edges -> photo, ...) get L1, PSNR and
SSIM, and the report says why there is no FCN-score: the label side is not a colour-coded map of the
palette (:func:`label_map_coverage`), no parser is cached (``--train-parser`` trains one), no data to train
it on, or ``--no-parser``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastpix2pix.data.images import read_image, to_channels
from fastpix2pix.labelmaps import (
    FACADES_CLASSES,
    FACADES_PALETTE,
    colour_residual,
    decode_labels,
    flat_pixel_mask,
)
from fastpix2pix.metrics import confusion_matrix, l1_error, psnr, segmentation_scores, ssim
from fastpix2pix.parser_net import (
    PARSER_CONFIGS,
    FacadeParser,
    ParserConfig,
    load_or_train_parser,
    load_parser_data,
    predict_labels,
)

__all__ = [
    "LabelScheme",
    "ResultImages",
    "evaluate_parser",
    "evaluate_results",
    "find_result_images",
    "format_report",
    "label_map_coverage",
    "main",
    "resolve_scheme",
]

VISUALS = ("real_A", "fake_B", "real_B")
_RESULT_NAME = re.compile(r"^(?P<stem>.+)_(?P<visual>real_A|fake_B|real_B)\.png$")


@dataclass(frozen=True)
class LabelScheme:
    """The classes of a colour-coded label map: names and one RGB colour per class."""

    name: str
    classes: tuple[str, ...]
    palette: np.ndarray

    def __post_init__(self) -> None:
        if self.palette.shape != (len(self.classes), 3):
            raise ValueError(f"palette {self.palette.shape} does not match {len(self.classes)} classes")


def resolve_scheme(name_or_path: str) -> LabelScheme:
    """``facades``, ``synthetic`` or a JSON file ``{"classes": [...], "palette": [[r, g, b], ...]}``."""
    if name_or_path == "facades":
        return LabelScheme("facades", FACADES_CLASSES, np.asarray(FACADES_PALETTE))
    if name_or_path == "synthetic":
        from fastpix2pix.data.synthetic import SYNTHETIC_CLASSES, SYNTHETIC_PALETTE

        return LabelScheme("synthetic", SYNTHETIC_CLASSES, np.asarray(SYNTHETIC_PALETTE))
    path = Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"--palette {name_or_path}: not 'facades', 'synthetic' or a JSON file")
    spec = json.loads(path.read_text())
    palette = np.asarray(spec["palette"], dtype=np.uint8)
    classes = tuple(spec.get("classes") or (str(k) for k in range(len(palette))))
    return LabelScheme(path.stem, classes, palette)


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


# --- is the label side a colour-coded label map? ----------------------------------------------------

# A label map's flat regions (interiors, away from JPEG and resize blur at edges) hold palette colours:
# on the facades labels 99-100% of their flat pixels lie within this RGB distance of the nearest facades
# colour, on the facades photos 0%, on the synthetic labels read with the facades palette 44%.
LABEL_COLOUR_TOLERANCE = 12.0
LABEL_MAP_COVERAGE = 0.9  # the share of flat pixels that must be near a palette colour
_LABEL_SAMPLE = 16  # images looked at (spread over the folder): the answer is the same for all


def label_map_coverage(paths: Sequence[Path], palette: np.ndarray) -> float:
    """The share of the flat pixels of (up to 16 of) ``paths`` within :data:`LABEL_COLOUR_TOLERANCE` of a
    ``palette`` colour: close to 1 for colour-coded label maps of that palette, near 0 for photos."""
    chosen = [paths[i] for i in np.linspace(0, len(paths) - 1, min(len(paths), _LABEL_SAMPLE)).astype(int)]
    near = flat = 0
    for path in chosen:
        image = to_channels(read_image(path), 3)
        if image.dtype != np.uint8:
            return 0.0
        mask = flat_pixel_mask(image)
        residual = colour_residual(image[mask], decode_labels(image[mask][None], palette)[0], palette)
        near += int((residual <= LABEL_COLOUR_TOLERANCE).sum())
        flat += int(mask.sum())
    return near / flat if flat else 0.0


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


# --- command line -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastpix2pix eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("results", nargs="?", help="results folder of `fastpix2pix test` (or a parent of it)")
    parser.add_argument(
        "--checkpoint",
        help="generate the results first with this checkpoint (latest.pt, epoch_N.pt, <epoch>_net_G.pth, "
        "or an official *_net_G.pth); needs --dataroot",
    )
    parser.add_argument("--dataroot", help="dataset of the generation (its --phase split is translated)")
    parser.add_argument(
        "--phase",
        default="test",
        help="the split that --checkpoint translates and --train-parser alone scores (test, val, ...)",
    )
    parser.add_argument(
        "--results_dir", "--results-dir", default="./results/", help="where --checkpoint writes its results"
    )
    parser.add_argument("--palette", default="facades", help="facades, synthetic, or a JSON palette file")
    parser.add_argument(
        "--label-image", "--label_image", default="real_A", choices=VISUALS, help="the result holding labels"
    )
    parser.add_argument(
        "--parser-data",
        "--parser_data",
        help="dataset whose train split trains the parser (default: --dataroot, else the shared facades "
        "for --palette facades)",
    )
    parser.add_argument(
        "--parser-config",
        "--parser_config",
        default="auto",
        choices=("auto", *PARSER_CONFIGS),
        help="parser training configuration (auto: cuda on a GPU, else cpu)",
    )
    parser.add_argument(
        "--parser-seed", "--parser_seed", type=int, default=0, help="seed of the parser's training"
    )
    parser.add_argument(
        "--train-parser", "--train_parser", action="store_true", help="train and cache the parser if absent"
    )
    parser.add_argument(
        "--no-parser", "--no_parser", action="store_true", help="image metrics only (no FCN-score)"
    )
    parser.add_argument(
        "--cache-dir", "--cache_dir", help="parser cache (default $FASTPIX2PIX_CACHE or ~/.cache/fastpix2pix)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--output", help="JSON report path (default: <results folder>/eval.json)")
    return parser


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here")
    return device


def _parser_data(args: argparse.Namespace, scheme: LabelScheme) -> Path:
    if args.parser_data:
        return Path(args.parser_data)
    if args.dataroot:
        return Path(args.dataroot)
    if scheme.name == "facades":
        from fastpix2pix.data import shared_facades_root

        root = shared_facades_root()
        if root is not None:
            return root
    raise FileNotFoundError(
        "no data to train the facade parser on: pass --parser-data DATASET (a train split of photo | "
        "label map pairs in the --palette colours) or --dataroot"
    )


def _parser_config(args: argparse.Namespace, device: torch.device) -> ParserConfig:
    name = (
        args.parser_config if args.parser_config != "auto" else ("cuda" if device.type == "cuda" else "cpu")
    )
    return dataclasses.replace(PARSER_CONFIGS[name], seed=args.parser_seed)


def checkpoint_test_options(
    checkpoint: str, dataroot: str, results_dir: str, device: str, phase: str = "test"
) -> Any:
    """TestOptions that make ``fastpix2pix test`` run ``checkpoint`` on ``dataroot``'s ``phase`` split.

    Files named as a run's (``<checkpoints_dir>/<name>/latest.pt``, ``epoch_N.pt``,
    ``latest_net_G.pth``, ``N_net_G.pth``, which is also how the official pretrained models are laid out)
    are loaded from their run folder as ``fastpix2pix test`` would; any other file as an official
    generator (``--load_official``).
    """
    from fastpix2pix.options import TestOptions

    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint {path} does not exist")
    run = {"checkpoints_dir": str(path.parent.parent), "name": path.parent.name}
    common = {"dataroot": dataroot, "results_dir": results_dir, "device": device, "phase": phase}
    if path.name == "latest.pt":
        return TestOptions(**run, **common, epoch="latest")
    if match := re.fullmatch(r"epoch_(\d+)\.pt", path.name):
        return TestOptions(**run, **common, epoch=match[1])
    if match := re.fullmatch(r"(latest|\d+)_net_G\.pth", path.name):  # also the official pretrained layout
        return TestOptions(**run, **common, epoch=match[1])
    return TestOptions(**common, name=path.stem, load_official=str(path))


def _generate(args: argparse.Namespace, say: Callable[[str], None]) -> Path:
    from fastpix2pix.inference import run_test

    if not args.dataroot:
        raise ValueError("--checkpoint needs --dataroot (the dataset whose --phase split it translates)")
    options = checkpoint_test_options(
        args.checkpoint, args.dataroot, args.results_dir, args.device, args.phase
    )
    result = run_test(options, say=say)
    return result.folder


def _why_no_fcn(args: argparse.Namespace, scheme: LabelScheme, images: ResultImages | None) -> str | None:
    """Why the FCN-score cannot be computed before looking for a parser, or None."""
    if args.no_parser:
        return "--no-parser"
    if images is None:
        return None
    coverage = label_map_coverage(images.paths[args.label_image], scheme.palette)
    if coverage >= LABEL_MAP_COVERAGE:
        return None
    return (
        f"{args.label_image} is not a colour-coded label map in the '{scheme.name}' palette (only "
        f"{coverage:.0%} of its flat pixels have palette colours, {LABEL_MAP_COVERAGE:.0%} needed); the "
        f"FCN-score parses generated photos into such maps (--palette names another label scheme)"
    )


def _load_parser(
    args: argparse.Namespace, scheme: LabelScheme, config: ParserConfig, device: torch.device,
    say: Callable[[str], None],
) -> tuple[FacadeParser, Path, dict[str, Any]]:  # fmt: skip
    """The cached (or, with --train-parser, newly trained) parser, the data it was trained on, its record.

    Raises:
        FileNotFoundError: no data to train it on, or not cached and --train-parser not given.
    """
    data = _parser_data(args, scheme)
    say(f"facade parser: {config}")
    started = time.perf_counter()
    parser, path, info = load_or_train_parser(
        data, scheme.palette, config, device=device, directory=args.cache_dir, train=args.train_parser,
        log=say,
    )  # fmt: skip
    say(f"facade parser {path} ready in {time.perf_counter() - started:.0f} s")
    return parser, data, {"path": str(path), "config": dataclasses.asdict(config), **_short(info)}


def run(args: argparse.Namespace, say: Callable[[str], None] = print) -> dict[str, Any]:
    """The ``eval`` command on parsed arguments; returns the report (also written as JSON).

    L1, PSNR and SSIM are always reported for a results folder; the FCN-score when the label side is a
    colour-coded map in the palette and a parser is available (else ``fcn_score_skipped`` says why).
    """
    scheme = resolve_scheme(args.palette)
    device = _device(args.device)
    results = _generate(args, say) if args.checkpoint else (Path(args.results) if args.results else None)
    if results is None and not args.train_parser:
        raise ValueError(
            "nothing to evaluate: pass a results folder, --checkpoint with --dataroot, or --train-parser"
        )
    images = find_result_images(results) if results is not None else None
    report: dict[str, Any] = {}
    parser = None
    config = _parser_config(args, device)
    skipped = _why_no_fcn(args, scheme, images)
    if skipped is None:
        try:
            parser, data, report["parser"] = _load_parser(args, scheme, config, device, say)
        except FileNotFoundError as error:
            if images is None:  # only the parser was asked for: nothing else to report
                raise
            skipped = str(error)
        else:
            if images is None:
                report["parser_on_real_test"] = evaluate_parser(
                    parser, data, scheme, config.size, phase=args.phase
                )
    if results is not None:
        report.update(evaluate_results(results, scheme, parser, config.size, label_visual=args.label_image))
        if skipped is not None:
            report["fcn_score_skipped"] = skipped
    output = (
        Path(args.output) if args.output else (Path(report["results"]) / "eval.json" if results else None)
    )
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=2) + "\n")
        report["output"] = str(output)
    say(format_report(report))
    if output is not None:
        say(f"report written to {output}")
    return report


def _short(info: dict[str, Any]) -> dict[str, Any]:
    """The training record without the bulky parts (palette, per-epoch losses)."""
    return {k: v for k, v in info.items() if k not in ("palette", "epoch_losses", "config")}


def main(argv: Sequence[str] | None = None) -> int:
    """``fastpix2pix eval``; returns the exit status (1 with a message for errors the user can fix)."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        run(args)
    except (FileNotFoundError, ValueError) as error:
        print(f"fastpix2pix eval: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
