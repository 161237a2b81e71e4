"""``fastpix2pix train``."""

from __future__ import annotations

import argparse

from fastpix2pix.runs.options import TrainOptions, add_options_command, namespace_to_options
from fastpix2pix.training.fast_trainer import run_training


def run(args: argparse.Namespace) -> int:
    opt = namespace_to_options(TrainOptions, args)
    trainer = run_training(opt)
    if trainer.is_main:  # under torchrun, one message, not one per process
        print(f"checkpoints in {trainer.run_dir}; training page {trainer.run_dir / 'web' / 'index.html'}")
    return 0


def add_parser(commands: argparse._SubParsersAction) -> None:
    add_options_command(commands, "train", TrainOptions, run, "train a pix2pix model")
