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
import functools
import os
import sys
from collections.abc import Sequence
from types import ModuleType

from fastpix2pix.commands import datasets, demo, export, info, predict, serve, test, train
from fastpix2pix.commands import eval as eval_command
from fastpix2pix.ops.selfcheck import DeviceLostError
from fastpix2pix.training.distributed import PeerLostError

__all__ = ["main"]

COMMANDS = ("train", "test", "predict", "eval", "export", "serve", "datasets", "demo", "info")
# Commands parsed here: each module adds its subparser, whose defaults carry its `run(args)`.
PARSED_HERE: tuple[ModuleType, ...] = (train, test, predict, datasets, serve, demo)
# Commands with a parser of their own: the rest of the command line goes to their `main(argv)`.
SELF_PARSING: dict[str, tuple[ModuleType, str]] = {
    "info": (info, "how fastpix2pix was built and which devices it sees"),
    "eval": (eval_command, "L1/PSNR/SSIM and the facade FCN-score of test results"),
    "export": (export, "a trained generator as an ONNX or torch.export file"),
}
# Errors that end a command with one line (``--debug`` shows the traceback): a user's mistake, or a state
# the process cannot go on from (a device lost to a failed kernel; under torchrun, another process of the
# run lost: the line names it and the checkpoint to resume from, and the exit status 1 lets torchrun restart
# the workers) where a traceback would only bury it.
USER_ERRORS = (
    FileNotFoundError,
    FileExistsError,
    ValueError,
    FloatingPointError,
    ImportError,
    DeviceLostError,
    PeerLostError,
)


def build_main_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastpix2pix", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in PARSED_HERE:
        module.add_parser(commands)
    for name, (_, help_text) in SELF_PARSING.items():
        commands.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SELF_PARSING:
        command, debug = argv[0], "--debug" in argv
        run = functools.partial(SELF_PARSING[command][0].main, argv[1:])
    else:
        args = build_main_parser().parse_args(argv)
        command, debug = args.command, bool(getattr(args, "debug", False))
        run = functools.partial(args.run, args)
    try:
        return run()
    except USER_ERRORS as error:
        if os.environ.get("FASTPIX2PIX_DEBUG") or debug:
            raise
        print(f"fastpix2pix {command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"fastpix2pix {command}: interrupted", file=sys.stderr)
        return 130
