"""Command-line options of ``train``, ``test`` and ``predict``, as dataclasses.

Every option is declared once, as a dataclass field whose metadata holds its help text (and choices);
:func:`build_parser` turns the fields into argparse arguments and :func:`parse_options` back into the
dataclass. Names and defaults are those of the official pix2pix code for ``--model pix2pix`` (which
overrides the base defaults: ``--netG unet_256 --norm batch --gan_mode vanilla --lambda_L1 100``);
fastpix2pix adds ``--device``, ``--backend``, ``--deterministic``, ``--seed``, ``--max_iters``,
``--load_official``, ``--debug``, and for training ``--fast_path``, ``--device_data``,
``--device_data_share``, ``--no_self_check`` and ``--dist_timeout``.

Frequencies (``--print_freq``, ``--display_freq``, ``--save_latest_freq``) count training images, as the
official ``total_iters`` does; an event fires whenever the count crosses a multiple of the frequency.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fastpix2pix.data.sources.plan import DEFAULT_DEVICE_SHARE, SOURCE_POLICIES
from fastpix2pix.data.transforms import DIRECTIONS, PREPROCESS_MODES
from fastpix2pix.models import DISCRIMINATORS, GENERATORS, INIT_TYPES, NORMS
from fastpix2pix.ops.backend import BACKENDS
from fastpix2pix.ops.reference import GAN_MODES

__all__ = [
    "ArchitectureOptions",
    "DataLoadingOptions",
    "EngineOptions",
    "HelpFormatter",
    "PredictOptions",
    "RunOptions",
    "TestOptions",
    "TrainOptions",
    "add_options_command",
    "build_parser",
    "format_options",
    "options_from_dict",
    "options_to_dict",
    "parse_options",
    "save_options",
]

LR_POLICIES = ("linear", "step", "plateau", "cosine")
ENGINES = ("torch", "onnxruntime")  # test/predict --engine (fastpix2pix.inference.engines)
PRECISIONS = ("auto", "fp32", "bf16")  # --precision: train (training.precision), test/predict/serve (engines)
COMMAND_LINE_PRECISION = "auto"  # the commands' default --precision (the dataclasses' is fp32)
PRECISION_HELP = (
    "what the torch engine computes in: fp32; bf16 (on the CPU: bfloat16 convolutions on oneDNN, float32 "
    "statistics; emulated, and slower, on a CPU without bf16 instructions); auto = bf16 on a CPU where it "
    "is faster than float32 (AMX; AVX512-BF16 on AMD), fp32 elsewhere (the GPU, the onnxruntime engine), "
    "decided at start and printed. The command line's default is auto; the Python API's (these options' "
    "own) fp32"
)


def option(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field carrying its command-line help (the one place an option is described)."""
    return field(default=default, metadata={"help": help, "choices": choices})


def dataset_size(text: str) -> float:
    """``--max_dataset_size``: a positive integer or ``inf``."""
    value = float(text)
    if value != math.inf and (value < 1 or value != int(value)):
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'inf', got {text!r}")
    return value if value == math.inf else int(value)


# --- option groups (a command's options are the union of its groups) ------------------------------


@dataclass
class RunOptions:
    """Where a run lives and what it runs on."""

    name: str = option(
        "experiment_name", "name of the experiment: it names the folders of its checkpoints and results"
    )
    checkpoints_dir: str = option(
        "./checkpoints", "checkpoints, logs and the training web page go to checkpoints_dir/name"
    )
    epoch: str = option("latest", "which checkpoint to load: 'latest' or an epoch number N (epoch_N.pt)")
    device: str = option("auto", "auto (CUDA when available, else CPU), cpu, cuda or cuda:N")
    backend: str | None = option(
        None,
        "ops that compute the networks: fused (compiled kernels; the default where built) or reference",
        BACKENDS,
    )
    seed: int | None = option(
        None,
        "seed of every random generator (torch, CUDA, numpy, random, data order, augmentation); "
        "default: drawn at random and recorded in the options",
    )
    deterministic: bool = option(
        False,
        "deterministic algorithms (torch.use_deterministic_algorithms, no cuDNN autotuning) and "
        "single-process data loading. Training on CUDA refuses it with the resnet_* generators: their "
        "reflection padding has no deterministic CUDA backward (use a unet_* generator or the CPU)",
    )
    load_official: str | None = option(
        None,
        "initialise the generator from an official pix2pix *_net_G.pth file (keys converted); "
        "test/predict: use that file instead of a checkpoint",
    )
    debug: bool = option(
        False,
        "show errors with their full traceback (also a data-loading worker's) instead of one line",
    )


@dataclass
class ArchitectureOptions:
    """The networks (test and predict take them from the checkpoint when it records them)."""

    input_nc: int = option(3, "number of input image channels: 3 for RGB, 1 for grayscale")
    output_nc: int = option(3, "number of output image channels: 3 for RGB, 1 for grayscale")
    ngf: int = option(64, "number of generator filters in the last conv layer")
    ndf: int = option(64, "number of discriminator filters in the first conv layer")
    netG: str = option("unet_256", "generator architecture", GENERATORS)
    netD: str = option(
        "basic",
        "discriminator architecture: basic = 70x70 PatchGAN, n_layers = PatchGAN with --n_layers_D, "
        "pixel = 1x1 PixelGAN",
        DISCRIMINATORS,
    )
    n_layers_D: int = option(
        3, "number of stride-2 layers of the discriminator, used only with --netD n_layers"
    )
    norm: str = option("batch", "normalisation layers", NORMS)
    init_type: str = option("normal", "weight initialisation", INIT_TYPES)
    init_gain: float = option(0.02, "scale of the normal, xavier and orthogonal initialisations")
    no_dropout: bool = option(False, "no dropout in the generator")


@dataclass
class DataLoadingOptions:
    """Where the images come from and how they are prepared."""

    dataroot: str | None = option(
        None,
        "dataset folder with train/test subfolders of A|B images side by side; default: the synthetic "
        "dataset in ./datasets/synthetic (generated on first use; its task is labels -> photo, BtoA)",
    )
    phase: str = option("train", "subfolder of dataroot to read (train, val, test, ...)")
    direction: str = option("AtoB", "AtoB: left half is the input; BtoA: right half is the input", DIRECTIONS)
    preprocess: str = option(
        "resize_and_crop", "scaling and cropping of images at load time", PREPROCESS_MODES
    )
    load_size: int = option(286, "scale images to this size")
    crop_size: int = option(256, "then crop to this size")
    no_flip: bool = option(False, "no random horizontal flip for data augmentation")
    serial_batches: bool = option(False, "take images in order instead of shuffling")
    max_dataset_size: float = option(math.inf, "use at most this many images of the folder (sorted by path)")
    batch_size: int = option(1, "input batch size")
    num_threads: int = option(
        4,
        "number of data loading worker processes (0: load in the main process); training uses at most "
        "the usable CPU count (divided among the processes of a machine under torchrun)",
    )


@dataclass
class TrainOptions(DataLoadingOptions, ArchitectureOptions, RunOptions):
    """``fastpix2pix train``."""

    gan_mode: str = option(
        "vanilla", "GAN objective: vanilla (cross-entropy, the paper) or lsgan (least squares)", GAN_MODES
    )
    lambda_L1: float = option(100.0, "weight of the L1 term in the generator loss")
    lr: float = option(0.0002, "initial learning rate of both Adam optimizers")
    beta1: float = option(0.5, "Adam beta1 (beta2 is 0.999)")
    lr_policy: str = option(
        "linear",
        "learning rate schedule: linear (constant for n_epochs, then linear decay over n_epochs_decay), "
        "step, plateau or cosine",
        LR_POLICIES,
    )
    lr_decay_iters: int = option(
        50, "with --lr_policy step: multiply the learning rate by 0.1 every lr_decay_iters epochs"
    )
    n_epochs: int = option(100, "number of epochs at the initial learning rate")
    n_epochs_decay: int = option(100, "number of epochs to decay the learning rate linearly toward zero")
    epoch_count: int = option(
        1, "the starting epoch number (a full checkpoint's own epoch wins with --continue_train)"
    )
    continue_train: bool = option(
        False,
        "resume from the checkpoint chosen by --epoch (weights, optimizers, schedulers, RNG, data position)",
    )
    print_freq: int = option(100, "log the losses every print_freq training images")
    display_freq: int = option(400, "save sample images to the web page every display_freq training images")
    save_latest_freq: int = option(5000, "save latest.pt every save_latest_freq training images")
    save_epoch_freq: int = option(
        5, "save epoch_N.pt (and latest.pt) at the end of every save_epoch_freq epochs"
    )
    max_iters: int | None = option(
        None, "stop (saving latest.pt) after this many iterations in total; for tests and benchmarks"
    )
    fast_path: str = option(
        "auto",
        "the fast single-device path (bf16, channels_last, fused Adam, data on the device; on CUDA the "
        "whole iteration in one CUDA graph): auto = on for one CUDA process and for one CPU process "
        "training in bf16 (see --precision), off elsewhere and under torchrun",
        choices=("auto", "on", "off"),
    )
    precision: str = option(
        "auto",
        "what the fast path trains in: bf16 (convolutions and activations in bfloat16; weights, BatchNorm "
        "statistics, Adam state and losses in float32) or fp32; auto = bf16 on a GPU with native bf16 and on "
        "a CPU that computes bf16 faster than float32 (AMX, or AVX512-BF16 on AMD), where --fast_path auto "
        "then trains on the fast path; fp32 elsewhere (the plain trainer computes float32)",
        PRECISIONS,
    )
    device_data: str = option(
        "auto",
        "where the fast path keeps the training set: device = decoded once into device memory (fastest); "
        "stream = decoded by --num_threads worker processes and copied to the device batch by batch; "
        "auto = device when its decoded size is at most --device_data_share of the free device memory and "
        "all images have one size after preprocessing, else stream (the choice is printed)",
        choices=SOURCE_POLICIES,
    )
    device_data_share: float = option(
        DEFAULT_DEVICE_SHARE,
        "with --device_data auto: the largest share of the free device memory the decoded training set "
        "may take on the device",
    )
    no_self_check: bool = option(
        False,
        "skip the start-up checks of the fused kernels and of the captured CUDA graph (see README)",
    )
    dist_timeout: int = option(
        1800,
        "under torchrun: seconds a collective waits for the other processes before failing (a rank that "
        "died or hangs stops the others after this)",
    )


@dataclass
class EngineOptions:
    """What computes a trained generator (test, predict, serve): the engine and its precision."""

    engine: str = option(
        "torch",
        "what computes the generator: torch (the fastest native path for the protocol) or onnxruntime (the "
        "generator exported to ONNX; needs the [export] extra); both compute the same function",
        ENGINES,
    )
    precision: str = option("fp32", PRECISION_HELP, PRECISIONS)


@dataclass
class TestOptions(EngineOptions, DataLoadingOptions, ArchitectureOptions, RunOptions):
    """``fastpix2pix test``: the test split through a trained generator, saved as images and a web page.

    Architecture options, direction, crop_size and preprocess left at their defaults are taken from the
    checkpoint (what the model was trained with).
    """

    __test__ = False  # not a pytest test class, whatever its name

    phase: str = option("test", "subfolder of dataroot to read (train, val, test, ...)")
    results_dir: str = option("./results/", "results go to results_dir/name/<phase>_<epoch>")
    num_test: int | None = option(None, "how many test images to run (default: all)")
    eval: bool = option(
        False,
        "use BatchNorm running statistics and no dropout (default: the paper's protocol, batch statistics "
        "and dropout on)",
    )
    aspect_ratio: float = option(1.0, "width/height ratio of the saved result images")
    num_threads: int = option(0, "number of data loading worker processes (0: load in the main process)")


@dataclass
class PredictOptions(EngineOptions, ArchitectureOptions, RunOptions):
    """``fastpix2pix predict``: a generator applied to one image or a folder, at any resolution."""

    input: str = option("", "an image file or a folder of images (the generator's input side only)")
    output: str | None = option(
        None, "output image file (for one input) or folder; default: results_dir/name/predict"
    )
    results_dir: str = option("./results/", "default output goes to results_dir/name/predict")
    eval: bool = option(
        False, "use BatchNorm running statistics and no dropout (default: batch statistics and dropout on)"
    )
    batch_size: int = option(
        1, "with --eval: images of the same size translated together (the paper protocol: one at a time)"
    )


Options = TypeVar("Options", TrainOptions, TestOptions, PredictOptions)


# --- argparse ---------------------------------------------------------------------------------------


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _argument_type(hint: Any) -> Any:
    """The argparse converter of a field type (``X | None`` converts as ``X``)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args else hint
    if base is float:
        return float
    if base is int:
        return int
    return str


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default, except for flags and options whose help says what None means."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser(
    cls: type[Options], parser: argparse.ArgumentParser | None = None
) -> argparse.ArgumentParser:
    """Add one ``--name`` argument per field of ``cls`` (booleans are flags) to ``parser``."""
    parser = parser or argparse.ArgumentParser(formatter_class=HelpFormatter)
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        help_text = f.metadata.get("help", "")
        if hints[f.name] is bool:
            assert f.default is False, f"flag --{f.name} must default to False"
            action = "store_false" if f.default else "store_true"
            parser.add_argument(f"--{f.name}", action=action, default=f.default, help=help_text)
            continue
        converter = dataset_size if f.name == "max_dataset_size" else _argument_type(hints[f.name])
        parser.add_argument(
            f"--{f.name}",
            type=converter,
            default=f.default,
            choices=f.metadata.get("choices"),
            help=help_text,
        )
    return parser


def add_options_command(
    commands: argparse._SubParsersAction,
    name: str,
    cls: type,
    run: Callable[[argparse.Namespace], int],
    help_text: str,
) -> argparse.ArgumentParser:
    """The subcommand ``name`` of the main parser, with ``cls``'s options; parsing it sets ``args.run``.
    A command that runs an engine defaults to ``--precision auto`` (the Python API's default is fp32)."""
    parser = commands.add_parser(name, help=help_text, description=cls.__doc__, formatter_class=HelpFormatter)
    build_parser(cls, parser).set_defaults(run=run)
    if issubclass(cls, EngineOptions):
        parser.set_defaults(precision=COMMAND_LINE_PRECISION)
    return parser


def parse_options(cls: type[Options], argv: list[str] | None = None) -> Options:
    """Parse ``argv`` into an instance of ``cls``."""
    return namespace_to_options(cls, build_parser(cls).parse_args(argv))


def namespace_to_options(cls: type[Options], namespace: argparse.Namespace) -> Options:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(namespace).items() if k in names})


# --- saving and restoring ---------------------------------------------------------------------------


def options_to_dict(options: Any) -> dict[str, Any]:
    """Plain data (str, int, float, bool, None) for checkpoints and JSON."""
    return dataclasses.asdict(options)


def options_from_dict(cls: type[Options], values: dict[str, Any]) -> Options:
    """``cls`` from a saved dict; keys that ``cls`` does not have are ignored (other commands, versions)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


def default_of(cls: type, name: str) -> Any:
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def format_options(options: Any) -> str:
    """One line per option, marking those that differ from their default (like the official opt.txt)."""
    lines = ["----------------- Options ---------------"]
    for f in sorted(dataclasses.fields(options), key=lambda f: f.name):
        value = getattr(options, f.name)
        note = f"\t[default: {f.default}]" if value != f.default else ""
        lines.append(f"{f.name:>25}: {value!s:<30}{note}")
    lines.append("----------------- End -------------------")
    return "\n".join(lines)


def save_options(options: Any, folder: str | os.PathLike[str], phase: str) -> Path:
    """Write ``folder/<phase>_opt.txt`` (readable) and ``<phase>_opt.json`` (machine-readable)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text_path = folder / f"{phase}_opt.txt"
    text_path.write_text(format_options(options) + "\n")
    (folder / f"{phase}_opt.json").write_text(
        json.dumps(options_to_dict(options), indent=2, default=str) + "\n"
    )
    return text_path
