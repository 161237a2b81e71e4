"""The tiny training configuration that the trainer tests share: seconds per run on one CPU thread."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from fastpix2pix.runs.options import TrainOptions
from fastpix2pix.training.trainer import Trainer


def tiny_options(dataroot: Path, checkpoints: Path, **changes: object) -> TrainOptions:
    """A 32x32 resnet_6blocks/ngf 4 run over the 4-pair ``tiny_data`` fixture, deterministic on the CPU."""
    opt = TrainOptions(
        dataroot=str(dataroot), direction="BtoA", name="tiny", checkpoints_dir=str(checkpoints),
        netG="resnet_6blocks", ngf=4, ndf=4, load_size=36, crop_size=32, n_epochs=1, n_epochs_decay=1,
        num_threads=0, backend="reference", device="cpu", seed=3, deterministic=True, print_freq=1,
        display_freq=2, save_latest_freq=10_000, save_epoch_freq=1,
    )  # fmt: skip
    return dataclasses.replace(opt, **changes)


def train_tiny(data: Path, checkpoints: Path, **changes: object) -> Path:
    """A 1-epoch resnet_6blocks/ngf 4 run named "tiny" over ``data``, on the reference ops; its run folder."""
    opt = TrainOptions(
        dataroot=str(data), direction="BtoA", name="tiny", checkpoints_dir=str(checkpoints),
        netG="resnet_6blocks", ngf=4, ndf=4, load_size=36, crop_size=32, n_epochs=1, n_epochs_decay=0,
        num_threads=0, backend="reference", device="cpu", seed=5, print_freq=100, display_freq=100,
    )  # fmt: skip
    trainer = Trainer(dataclasses.replace(opt, **changes), progress_bar=False)
    trainer.fit()
    return trainer.run_dir


def assert_same(a: object, b: object, where: str) -> None:
    """Recursive bit-for-bit equality of saved states."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"
