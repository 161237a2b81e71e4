"""``fastpix2pix eval``: its options and main (translate the test split first when given a run)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from fastpix2pix.data import shared_facades_root
from fastpix2pix.data.schemes import LABEL_MAP_COVERAGE, LabelScheme, label_map_coverage, resolve_scheme
from fastpix2pix.evaluation.evaluate import (
    VISUALS,
    ResultImages,
    evaluate_parser,
    evaluate_results,
    find_result_images,
    format_report,
)
from fastpix2pix.evaluation.parser_net import (
    PARSER_CONFIGS,
    FacadeParser,
    ParserConfig,
    load_or_train_parser,
)
from fastpix2pix.inference.run import run_test
from fastpix2pix.runs.checkpoint import saved_file_label
from fastpix2pix.runs.options import TestOptions
from fastpix2pix.runtime import resolve_device

__all__ = ["main"]


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


def _parser_data(args: argparse.Namespace, scheme: LabelScheme) -> Path:
    if args.parser_data:
        return Path(args.parser_data)
    if args.dataroot:
        return Path(args.dataroot)
    if scheme.name == "facades":
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
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint {path} does not exist")
    run = {"checkpoints_dir": str(path.parent.parent), "name": path.parent.name}
    common = {"dataroot": dataroot, "results_dir": results_dir, "device": device, "phase": phase}
    saved = saved_file_label(path.name)
    if saved is not None and saved[1] in ("checkpoint", "G"):
        return TestOptions(**run, **common, epoch=saved[0])
    return TestOptions(**common, name=path.stem, load_official=str(path))


def _generate(args: argparse.Namespace, say: Callable[[str], None]) -> Path:
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
    device = resolve_device(args.device)
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
