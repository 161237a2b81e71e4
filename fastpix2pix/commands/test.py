"""``fastpix2pix test``."""

from __future__ import annotations

import argparse

from fastpix2pix.inference.run import run_test
from fastpix2pix.runs.options import (
    TestOptions,
    add_options_command,
    namespace_to_options,
)


def run(args: argparse.Namespace) -> int:
    run_test(namespace_to_options(TestOptions, args))
    return 0


def add_parser(commands: argparse._SubParsersAction) -> None:
    add_options_command(
        commands, "test", TestOptions, run, "run a trained model on a test split and write a results page"
    )
