"""``fastpix2pix serve``: its options and main."""

from __future__ import annotations

import argparse

from fastpix2pix.runs.options import add_options_command, namespace_to_options
from fastpix2pix.serve.app import ServeOptions
from fastpix2pix.serve.http import serve


def run(args: argparse.Namespace) -> int:
    """``fastpix2pix serve`` from the command line."""
    serve(namespace_to_options(ServeOptions, args), say=lambda message: print(message, flush=True))
    return 0


def add_parser(commands: argparse._SubParsersAction) -> None:
    help_text = "draw an input in the browser and see the translation live"
    add_options_command(commands, "serve", ServeOptions, run, help_text)
