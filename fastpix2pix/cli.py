"""The ``fastpix2pix`` command: train, test, predict, eval, datasets, demo, info.

    fastpix2pix train   --dataroot datasets/facades --name facades --direction BtoA
    fastpix2pix test    --dataroot datasets/facades --name facades
    fastpix2pix predict --name facades --input labels.png --output photo.png
    fastpix2pix datasets download facades | combine --fold_A A --fold_B B --fold_AB AB | synthetic --root R
    fastpix2pix demo    (synthetic data, a short training run, test, and the results page)
    fastpix2pix eval    results/facades/test_latest --train-parser   (L1, PSNR, SSIM, FCN-score)
    fastpix2pix info    (build record and devices)
    fastpix2pix serve   --name facades   (draw a label map or an outline in the browser, see it translated)
    fastpix2pix export  --name facades --format onnx --protocol eval   (ONNX / torch.export for deployment)

Each command's options: ``fastpix2pix COMMAND --help``. Errors the user can fix (missing files, bad
data, a diverging run) print one message and exit with status 1; ``--debug`` (or FASTPIX2PIX_DEBUG=1)
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fastpix2pix.options import (
    HelpFormatter,
    PredictOptions,
    TestOptions,
    TrainOptions,
    build_parser,
    namespace_to_options,
)

__all__ = ["main"]

COMMANDS = ("train", "test", "predict", "eval", "export", "serve", "datasets", "demo", "info")
# Commands with a parser of their own: the rest of the command line goes to their `main(argv)`.
SELF_PARSING = {"info": "fastpix2pix.info", "eval": "fastpix2pix.evaluate", "export": "fastpix2pix.export"}
USER_ERRORS = (FileNotFoundError, FileExistsError, ValueError, FloatingPointError, ImportError)


def _train(args: argparse.Namespace) -> int:
    from fastpix2pix.fast_train import fast_train, use_fast_path
    from fastpix2pix.train import train

    opt = namespace_to_options(TrainOptions, args)
    trainer = fast_train(opt) if use_fast_path(opt) else train(opt)
    if trainer.is_main:  # under torchrun, one message, not one per process
        print(f"checkpoints in {trainer.run_dir}; training page {trainer.run_dir / 'web' / 'index.html'}")
    return 0


def _test(args: argparse.Namespace) -> int:
    from fastpix2pix.inference import run_test

    run_test(namespace_to_options(TestOptions, args))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from fastpix2pix.inference import predict

    predict(namespace_to_options(PredictOptions, args))
    return 0


def _datasets(args: argparse.Namespace) -> int:
    from fastpix2pix import data

    if args.action == "download":
        print(f"dataset {args.dataset_name} in {data.download_dataset(args.dataset_name, args.root)}")
    elif args.action == "combine":
        counts = data.combine_ab(
            args.fold_A, args.fold_B, args.fold_AB, use_ab_suffix=args.use_AB, max_images=args.num_imgs,
            resize_b=args.resize_B is not None, method=args.resize_B or "bicubic",
        )  # fmt: skip
        print(
            f"wrote {', '.join(f'{n} {phase}' for phase, n in counts.items())} A|B images to {args.fold_AB}"
        )
    else:
        root = data.generate_synthetic_facades(args.root, args.n_train, args.n_test, args.size, args.seed)
        print(f"synthetic dataset ({args.n_train} train, {args.n_test} test, {args.size}px) in {root}")
    return 0


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
    import copy

    import torch

    from fastpix2pix.inference import evaluate_l1, set_inference_mode, split_loader

    device = trainer.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        untrained = set_inference_mode(copy.deepcopy(trainer.nets.G), eval_mode=False)
        return evaluate_l1(untrained, split_loader(test_opt, untrained), device)


def _demo(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from fastpix2pix.data import ensure_synthetic_dataset
    from fastpix2pix.inference import run_test
    from fastpix2pix.train import Trainer, resolve_device

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


def _add_datasets_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("datasets", help="download, combine or generate datasets")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    download = actions.add_parser("download", help="download an official pix2pix dataset")
    download.add_argument("dataset_name", help="facades, maps, edges2shoes, edges2handbags, night2day, ...")
    download.add_argument("--root", default="datasets", help="the dataset goes to ROOT/NAME")
    combine = actions.add_parser("combine", help="pair A and B images (by file name) into A|B images")
    combine.add_argument(
        "--fold_A", required=True, help="folder with phase subfolders (train, test, ...) of A"
    )
    combine.add_argument("--fold_B", required=True, help="folder with the same subfolders of B")
    combine.add_argument("--fold_AB", required=True, help="output folder")
    combine.add_argument("--use_AB", action="store_true", help="pair x_A.ext with x_B.ext, writing x.ext")
    combine.add_argument("--num_imgs", type=float, default=float("inf"), help="at most this many per phase")
    combine.add_argument(
        "--resize_B",
        choices=("bicubic", "bilinear", "nearest"),
        help="resize each B image to its A image's size with this filter (nearest for label maps) instead of "
        "stopping at the first size mismatch",
    )
    synthetic = actions.add_parser("synthetic", help="generate the procedural facades-like dataset")
    synthetic.add_argument("--root", default="datasets/synthetic", help="output folder (train/ and test/)")
    synthetic.add_argument("--n_train", type=int, default=400, help="number of training pairs")
    synthetic.add_argument("--n_test", type=int, default=100, help="number of test pairs")
    synthetic.add_argument("--size", type=int, default=256, help="side of A and B in pixels")
    synthetic.add_argument("--seed", type=int, default=0, help="generator seed (same seed, same bytes)")
    parser.set_defaults(run=_datasets)


def _add_serve_parser(commands: argparse._SubParsersAction) -> None:
    from fastpix2pix.serve import ServeOptions, serve_command

    parser = commands.add_parser(
        "serve", help="draw an input in the browser and see the translation live",
        description=ServeOptions.__doc__, formatter_class=HelpFormatter,
    )  # fmt: skip
    build_parser(ServeOptions, parser).set_defaults(run=serve_command)


def _add_demo_parser(commands: argparse._SubParsersAction) -> None:
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
    parser.set_defaults(run=_demo)


def build_main_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastpix2pix", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    formatter = HelpFormatter
    runs: Sequence[tuple[str, type, Callable[[argparse.Namespace], int], str]] = (
        ("train", TrainOptions, _train, "train a pix2pix model"),
        ("test", TestOptions, _test, "run a trained model on a test split and write a results page"),
        ("predict", PredictOptions, _predict, "apply a trained generator to an image or a folder"),
    )
    for name, options, run, help_text in runs:
        sub = commands.add_parser(
            name, help=help_text, description=options.__doc__, formatter_class=formatter
        )
        build_parser(options, sub).set_defaults(run=run)
    _add_datasets_parser(commands)
    _add_serve_parser(commands)
    _add_demo_parser(commands)
    commands.add_parser("info", help="how fastpix2pix was built and which devices it sees", add_help=False)
    commands.add_parser("eval", help="L1/PSNR/SSIM and the facade FCN-score of test results", add_help=False)
    commands.add_parser("export", help="a trained generator as an ONNX or torch.export file", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SELF_PARSING:
        return importlib.import_module(SELF_PARSING[argv[0]]).main(argv[1:])
    args = build_main_parser().parse_args(argv)
    try:
        return args.run(args)
    except USER_ERRORS as error:
        if os.environ.get("FASTPIX2PIX_DEBUG") or getattr(args, "debug", False):
            raise
        print(f"fastpix2pix {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"fastpix2pix {args.command}: interrupted", file=sys.stderr)
        return 130
