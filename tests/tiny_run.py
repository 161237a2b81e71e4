"""The tiny training configuration that the trainer tests share: seconds per run on one CPU thread."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from fastpix2pix.options import TrainOptions


def tiny_options(dataroot: Path, checkpoints: Path, **changes: object) -> TrainOptions:
    """A 32x32 resnet_6blocks/ngf 4 run over the 4-pair ``tiny_data`` fixture, deterministic on the CPU."""
    opt = TrainOptions(
        dataroot=str(dataroot), direction="BtoA", name="tiny", checkpoints_dir=str(checkpoints),
        netG="resnet_6blocks", ngf=4, ndf=4, load_size=36, crop_size=32, n_epochs=1, n_epochs_decay=1,
        num_threads=0, backend="reference", device="cpu", seed=3, deterministic=True, print_freq=1,
        display_freq=2, save_latest_freq=10_000, save_epoch_freq=1,
    )  # fmt: skip
    return dataclasses.replace(opt, **changes)
