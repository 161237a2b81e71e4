"""What the ``serve`` tests share: a tiny untrained model with its dataset, and a server on 127.0.0.1."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path

from fastpix2pix.data import generate_synthetic_facades
from fastpix2pix.runs.options import TrainOptions
from fastpix2pix.serve.app import ServeApp, ServeOptions
from fastpix2pix.serve.http import ServeHTTPServer, make_server, run_in_thread
from fastpix2pix.training.trainer import Trainer

NAME = "tiny_serve"
SIZE = 128  # the smallest size unet_128 takes without padding


def save_tiny_model(root: Path, netG: str = "unet_128") -> tuple[Path, Path]:
    """A ``netG`` (unet_128 by default) at ngf 8 (seed 1, not trained: its output still depends on the
    input) saved as a full checkpoint of a run on 2+2 synthetic 128 px pairs. Returns (checkpoints_dir,
    dataroot)."""
    data = generate_synthetic_facades(root / "data", n_train=2, n_test=2, size=SIZE, seed=0)
    opt = TrainOptions(
        dataroot=str(data), direction="BtoA", name=NAME, checkpoints_dir=str(root / "checkpoints"),
        netG=netG, ngf=8, ndf=8, load_size=SIZE, crop_size=SIZE, n_epochs=1, n_epochs_decay=0,
        num_threads=0, device="cpu", seed=1, print_freq=100, display_freq=100,
    )  # fmt: skip
    trainer = Trainer(opt, progress_bar=False)
    trainer.save(("latest",))
    trainer.close()
    return root / "checkpoints", data


def serve_options(checkpoints: Path, **changes: object) -> ServeOptions:
    opt = ServeOptions(name=NAME, checkpoints_dir=str(checkpoints), device="cpu", host="127.0.0.1", port=0)
    return dataclasses.replace(opt, **changes)


@contextlib.contextmanager
def running_server(opt: ServeOptions) -> Iterator[tuple[ServeApp, ServeHTTPServer]]:
    """A real server on 127.0.0.1 (a free port) in a background thread, shut down on exit."""
    app = ServeApp(opt, say=lambda message: None)
    server = make_server(app, opt.host, opt.port)
    thread = run_in_thread(server)
    try:
        yield app, server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
