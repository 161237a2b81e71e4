"""What a run folder holds: the options of each command, checkpoints, logs and pages.

``checkpoints_dir/name/`` gets ``train_opt.txt``, ``latest.pt`` and ``epoch_N.pt`` (full checkpoints: weights,
optimizers, schedulers, data position, generators), ``*_net_G.pth``/``*_net_D.pth`` (official keys), the
loss log and the training page.
"""

from fastpix2pix.runs.checkpoint import checkpoint_path, list_checkpoints, load_checkpoint
from fastpix2pix.runs.networks import Networks, build_generator, build_networks
from fastpix2pix.runs.options import (
    ArchitectureOptions,
    PredictOptions,
    RunOptions,
    TestOptions,
    TrainOptions,
    parse_options,
)

__all__ = [
    "ArchitectureOptions",
    "Networks",
    "PredictOptions",
    "RunOptions",
    "TestOptions",
    "TrainOptions",
    "build_generator",
    "build_networks",
    "checkpoint_path",
    "list_checkpoints",
    "load_checkpoint",
    "parse_options",
]
