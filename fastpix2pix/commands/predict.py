"""``fastpix2pix predict``."""

from __future__ import annotations

import argparse

from fastpix2pix.inference.run import predict
from fastpix2pix.runs.options import (
    PredictOptions,
    add_options_command,
    namespace_to_options,
)


def run(args: argparse.Namespace) -> int:
    predict(namespace_to_options(PredictOptions, args))
    return 0


def add_parser(commands: argparse._SubParsersAction) -> None:
    add_options_command(
        commands, "predict", PredictOptions, run, "apply a trained generator to an image or a folder"
    )
