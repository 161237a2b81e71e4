"""``fastpix2pix demo``: a short training on the shipped synthetic dataset, then test and a page."""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastpix2pix.data import ensure_synthetic_dataset
from fastpix2pix.inference.loading import set_inference_mode
from fastpix2pix.inference.run import evaluate_l1, run_test, split_loader
from fastpix2pix.runs.options import (
    TestOptions,
    TrainOptions,
)
from fastpix2pix.runtime import resolve_device
from fastpix2pix.training.trainer import Trainer


@dataclass(frozen=True)
class DemoConfig:
    """A training configuration that learns the synthetic task visibly in a few minutes."""

    size: int
    n_train: int
    n_test: int
    netG: str
    ngf: int
    ndf: int
    load_size: int
    n_epochs: int
    n_epochs_decay: int


DEMO_CONFIGS = {
    # Measured on 2 CPU cores shared with other jobs (OMP_NUM_THREADS=1): 800 iterations, 4.3 min of
    # training, 4.7 min in all; held-out L1 0.48 -> 0.32, windows and balconies in place.
    "cpu": DemoConfig(size=128, n_train=100, n_test=20, netG="unet_128", ngf=16, ndf=16, load_size=143,
                      n_epochs=4, n_epochs_decay=4),
    # The paper's facades configuration (unet_256, 286 -> 256 crops, batch 1), more epochs.
    "cuda": DemoConfig(size=256, n_train=400, n_test=100, netG="unet_256", ngf=64, ndf=64, load_size=286,
                       n_epochs=15, n_epochs_decay=15),
}  # fmt: skip


def _demo_options(
    args: argparse.Namespace, config: DemoConfig, root: str, cuda: bool
) -> tuple[TrainOptions, TestOptions]:
    """The demo's train and test options (``--epochs`` splits into constant and decaying halves)."""
    n_epochs, n_decay = config.n_epochs, config.n_epochs_decay
    if args.epochs is not None:
        n_epochs, n_decay = (args.epochs + 1) // 2, args.epochs // 2
    shared = {
        "dataroot": root, "direction": "BtoA", "name": args.name, "device": args.device,
        "checkpoints_dir": args.checkpoints_dir, "backend": args.backend, "seed": args.seed,
        "netG": config.netG, "ngf": config.ngf, "ndf": config.ndf, "crop_size": config.size,
    }  # fmt: skip
    train_opt = TrainOptions(
        **shared, load_size=config.load_size, n_epochs=n_epochs, n_epochs_decay=n_decay,
        print_freq=config.n_train, display_freq=config.n_train, save_epoch_freq=n_epochs + n_decay,
        num_threads=4 if cuda else 0,
    )  # fmt: skip
    return train_opt, TestOptions(**shared, results_dir=args.results_dir)


def _untrained_l1(trainer: Any, test_opt: TestOptions) -> float:
    """Held-out L1 of the generator before training, on a copy and with the RNG state put back, so
    that measuring it changes nothing in the training run."""
    device = trainer.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        untrained = set_inference_mode(copy.deepcopy(trainer.nets.G), eval_mode=False)
        return evaluate_l1(untrained, split_loader(test_opt, untrained), device)


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    config = DEMO_CONFIGS["cuda" if device.type == "cuda" else "cpu"]
    root = Path(args.datasets_dir) / f"synthetic_{config.size}"
    print(
        f"synthetic dataset: {config.n_train} train / {config.n_test} test pairs of {config.size}px in {root}"
    )
    ensure_synthetic_dataset(root, config.n_train, config.n_test, config.size, seed=0)
    train_opt, test_opt = _demo_options(args, config, str(root), device.type == "cuda")
    trainer = Trainer(train_opt)
    before = _untrained_l1(trainer, test_opt)
    print(f"held-out L1 before training: {before:.4f} (images in [-1, 1])")
    started = time.perf_counter()
    trainer.fit()
    minutes = (time.perf_counter() - started) / 60
    result = run_test(test_opt)
    epochs = train_opt.n_epochs + train_opt.n_epochs_decay
    print(
        f"\ndemo: {config.netG} (ngf {config.ngf}) on {device}, {epochs} epochs x {config.n_train} images "
        f"in {minutes:.1f} min\n"
        f"  held-out L1: {before:.4f} before training -> {result.l1:.4f} after\n"
        f"  results page:  {result.index_html}\n"
        f"  training page: {trainer.run_dir / 'web' / 'index.html'}"
    )
    return 0


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "demo", help="synthetic data -> short training -> test -> results page (minutes on a CPU)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--name", default="demo", help="experiment name")
    parser.add_argument("--checkpoints_dir", default="./checkpoints", help="checkpoints go here")
    parser.add_argument("--results_dir", default="./results/", help="test results go here")
    parser.add_argument("--datasets_dir", default="./datasets", help="the demo's synthetic data goes here")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: per device)")
    parser.add_argument("--seed", type=int, default=0, help="seed of everything")
    parser.add_argument("--backend", default=None, help="fused or reference (default: fused where built)")
    parser.set_defaults(run=run)
