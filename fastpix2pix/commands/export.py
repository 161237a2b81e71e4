"""``fastpix2pix export``: its options and main."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastpix2pix.data.transforms import DIRECTIONS
from fastpix2pix.inference.deploy_net import PROTOCOLS
from fastpix2pix.inference.export import FORMATS, SUFFIXES, ExportResult, export_generator
from fastpix2pix.inference.loading import load_generator
from fastpix2pix.runs.options import ArchitectureOptions, HelpFormatter, RunOptions, build_parser, option

__all__ = ["ExportOptions", "main"]


# --- command line -----------------------------------------------------------------------------------


@dataclass
class ExportOptions(ArchitectureOptions, RunOptions):
    """``fastpix2pix export``: a trained generator (checkpoint or official *_net_G.pth) as an ONNX or
    torch.export file, checked against PyTorch before it is written.

    Architecture options left at their defaults are taken from a full checkpoint; an official
    *_net_G.pth records none, so give them (--netG, --ngf, --norm, --input_nc, --output_nc).
    """

    format: str = option("onnx", "file format: onnx (ONNX Runtime etc.) or torch-export (.pt2)", FORMATS)
    direction: str = option(
        "AtoB", "recorded in the metadata: which half of a paired A|B image is the input", DIRECTIONS
    )
    protocol: str = option(
        "eval",
        "eval: BatchNorm running statistics, folded into the convs (any batch size); paper: statistics of "
        "the test batch as in the paper and `fastpix2pix test` (batch 1: instance normalisation with "
        "BatchNorm's affine parameters)",
        PROTOCOLS,
    )
    dropout: bool = option(
        False, "keep the generator's dropout (stochastic outputs, as the official test); default: off"
    )
    output: str | None = option(
        None,
        "output file; default: beside the weights, <epoch>_net_G_<protocol>[_dropout].onnx|.pt2",
    )
    batch_size: int = option(1, "batch of the example input (eval exports take any batch anyway)")
    size: int | None = option(
        None, "side of the square example input (default: the smallest the generator takes)"
    )
    no_verify: bool = option(False, "skip the check of the written file against PyTorch")


def default_output(opt: ExportOptions) -> Path:
    suffix = f"_{opt.protocol}{'_dropout' if opt.dropout else ''}{SUFFIXES[opt.format]}"
    if opt.load_official:
        source = Path(opt.load_official)
        return source.with_name(source.stem + suffix)
    return Path(opt.checkpoints_dir) / opt.name / f"{opt.epoch}_net_G{suffix}"


def load_for_export(opt: ExportOptions) -> tuple[nn.Module, ExportOptions, str]:
    """The generator to export (on the CPU), the completed options, and where its weights came from.

    A file that is not a generator checkpoint is a ValueError that says so.
    """
    try:
        return load_generator(dataclasses.replace(opt, backend="reference"), torch.device("cpu"))
    except ValueError as error:
        source = opt.load_official or str(Path(opt.checkpoints_dir) / opt.name)
        raise ValueError(
            f"{source} is not a {opt.netG} generator checkpoint with these options ({error})"
        ) from error
    except Exception as error:  # a file torch.load cannot read at all
        if not opt.load_official:
            raise
        raise ValueError(
            f"{opt.load_official} is not a generator checkpoint: torch.load cannot read it "
            f"({type(error).__name__})"
        ) from error


def run_export(opt: ExportOptions, *, say: Callable[[str], Any] = print) -> ExportResult:
    """``fastpix2pix export``: load, export, verify, write; returns where and what."""
    G, opt, source = load_for_export(opt)
    path = Path(opt.output) if opt.output else default_output(opt)
    extra = {
        "source": source,
        "netG": opt.netG,
        "norm": opt.norm,
        "ngf": opt.ngf,
        "direction": opt.direction,
    }
    result = export_generator(
        G, path, fmt=opt.format, protocol=opt.protocol, dropout=opt.dropout, batch_size=opt.batch_size,
        height=opt.size, width=opt.size, extra_metadata=extra, verify=not opt.no_verify,
        dropout_seed=opt.seed,
    )  # fmt: skip
    check = (
        f"matches PyTorch within {result.max_abs_diff:.2g}"
        if result.max_abs_diff is not None
        else "not checked against PyTorch"
    )
    say(
        f"exported {source} ({opt.netG}, protocol {opt.protocol}, {result.metadata['dropout_note']}) "
        f"to {path} ({path.stat().st_size / 1e6:.1f} MB); {check}"
    )
    return result


def build_export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastpix2pix export", description=ExportOptions.__doc__, formatter_class=HelpFormatter
    )
    return build_parser(ExportOptions, parser)  # type: ignore[type-var]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fastpix2pix export`` (parses its own options)."""
    args = build_export_parser().parse_args(argv)
    names = {f.name for f in dataclasses.fields(ExportOptions)}
    opt = ExportOptions(**{k: v for k, v in vars(args).items() if k in names})
    try:
        run_export(opt)
    except (FileNotFoundError, ValueError, TypeError, ImportError) as error:
        if os.environ.get("FASTPIX2PIX_DEBUG") or getattr(opt, "debug", False):
            raise
        print(f"fastpix2pix export: error: {error}", file=sys.stderr)
        return 1
    return 0
