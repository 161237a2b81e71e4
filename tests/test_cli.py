"""Tests of the command line: options and their defaults, the commands end to end, errors users can fix."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastpix2pix.data.synthetic
from fastpix2pix.cli import main
from fastpix2pix.data import generate_synthetic_facades, read_image
from fastpix2pix.runs.options import PredictOptions, TestOptions, TrainOptions, build_parser, parse_options

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [
    "--netG", "resnet_6blocks", "--ngf", "4", "--ndf", "4", "--backend", "reference", "--device", "cpu",
    "--num_threads", "0", "--seed", "1",
]  # fmt: skip
TINY_TRAIN = [*TINY, "--load_size", "36", "--crop_size", "32", "--print_freq", "2", "--display_freq", "2"]

# The official pix2pix defaults (base options with the pix2pix model's overrides), by option name.
OFFICIAL_TRAIN_DEFAULTS = {
    "name": "experiment_name", "checkpoints_dir": "./checkpoints", "direction": "AtoB", "netG": "unet_256",
    "netD": "basic", "n_layers_D": 3, "ngf": 64, "ndf": 64, "norm": "batch", "init_type": "normal",
    "init_gain": 0.02, "no_dropout": False, "gan_mode": "vanilla", "lambda_L1": 100.0, "lr": 0.0002,
    "beta1": 0.5, "lr_policy": "linear", "lr_decay_iters": 50, "n_epochs": 100, "n_epochs_decay": 100,
    "epoch_count": 1, "batch_size": 1, "load_size": 286, "crop_size": 256, "preprocess": "resize_and_crop",
    "no_flip": False, "serial_batches": False, "max_dataset_size": math.inf, "input_nc": 3, "output_nc": 3,
    "num_threads": 4, "save_epoch_freq": 5, "save_latest_freq": 5000, "print_freq": 100, "display_freq": 400,
    "continue_train": False, "epoch": "latest", "phase": "train",
}  # fmt: skip
OFFICIAL_TEST_DEFAULTS = {"results_dir": "./results/", "phase": "test", "eval": False, "aspect_ratio": 1.0}


# --- options ----------------------------------------------------------------------------------------


def test_official_option_names_and_defaults() -> None:
    train = parse_options(TrainOptions, [])
    for name, value in OFFICIAL_TRAIN_DEFAULTS.items():
        assert getattr(train, name) == value, name
    test = parse_options(TestOptions, [])
    for name, value in OFFICIAL_TEST_DEFAULTS.items():
        assert getattr(test, name) == value, name
    assert test.num_test is None  # all test images (the official default is 50)
    for extra in ("device", "backend", "deterministic", "seed"):
        assert hasattr(train, extra) and hasattr(test, extra)


def test_every_option_has_help() -> None:
    for cls in (TrainOptions, TestOptions, PredictOptions):
        parser = build_parser(cls)
        for action in parser._actions:
            if action.dest != "help":
                assert action.help and len(action.help) > 10, f"{cls.__name__} --{action.dest}"


def test_parsing_types() -> None:
    opt = parse_options(
        TrainOptions, ["--lr", "0.001", "--no_flip", "--max_dataset_size", "7", "--epoch", "3", "--seed", "9"]
    )
    assert (opt.lr, opt.no_flip, opt.max_dataset_size, opt.epoch, opt.seed) == (0.001, True, 7, "3", 9)
    with pytest.raises(SystemExit):
        parse_options(TrainOptions, ["--netG", "unet_512"])


def test_python_dash_m_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fastpix2pix", "train", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--lambda_L1" in out and "--continue_train" in out and "weight of the L1 term" in out


def test_info_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info"]) == 0
    assert "fastpix2pix" in capsys.readouterr().out


# --- end to end -------------------------------------------------------------------------------------


def test_train_test_predict_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    assert (
        main(
            ["datasets", "synthetic", "--root", str(data), "--n_train", "4", "--n_test", "2", "--size", "32"]
        )
        == 0
    )
    run = [
        "--dataroot",
        str(data),
        "--direction",
        "BtoA",
        "--checkpoints_dir",
        str(tmp_path / "ck"),
        "--name",
        "e2e",
    ]
    assert main(["train", *run, *TINY_TRAIN, "--n_epochs", "1", "--n_epochs_decay", "1"]) == 0
    run_dir = tmp_path / "ck" / "e2e"
    for name in ("latest.pt", "latest_net_G.pth", "train_opt.txt", "loss_log.jsonl", "loss_curve.png"):
        assert (run_dir / name).is_file(), name
    assert "epoch002_fake_B.png" in (run_dir / "web" / "index.html").read_text()

    results = tmp_path / "results"
    assert (
        main(["test", *run, "--results_dir", str(results), "--backend", "reference", "--device", "cpu"]) == 0
    )
    folder = results / "e2e" / "test_latest"
    assert len(list((folder / "images").glob("*.png"))) == 6 and (folder / "index.html").is_file()
    assert "L1" in capsys.readouterr().out

    inputs = data / "test"
    out = tmp_path / "predicted"
    args = ["--name", "e2e", "--checkpoints_dir", str(tmp_path / "ck"), "--backend", "reference"]
    assert main(["predict", *args, "--input", str(inputs), "--output", str(out)]) == 0
    # The test files are A|B pairs (64x32): predict takes any image whole, at its own size.
    assert sorted(p.name for p in out.iterdir()) == ["0001.png", "0002.png"]
    assert read_image(out / "0001.png").shape == (32, 64, 3)


def test_continue_train_from_the_command_line(tmp_path: Path) -> None:
    data = generate_synthetic_facades(tmp_path / "data", n_train=2, n_test=1, size=32, seed=0)
    run = ["--dataroot", str(data), "--checkpoints_dir", str(tmp_path / "ck"), "--name", "r", *TINY_TRAIN]
    assert main(["train", *run, "--n_epochs", "1", "--n_epochs_decay", "0"]) == 0
    assert main(["train", *run, "--n_epochs", "2", "--n_epochs_decay", "0", "--continue_train"]) == 0
    state = torch.load(tmp_path / "ck" / "r" / "latest.pt", weights_only=True)
    assert (state["epoch"], state["iteration"]) == (3, 4)
    assert "resumed from" in (tmp_path / "ck" / "r" / "log.txt").read_text()


def test_train_without_dataroot_uses_the_synthetic_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = []

    def small_synthetic(root: Path) -> Path:  # the real default is 400 + 100 pairs of 256px
        made.append(Path(root))
        return generate_synthetic_facades(root, n_train=2, n_test=1, size=32)

    monkeypatch.setattr(fastpix2pix.data.synthetic, "ensure_synthetic_dataset", small_synthetic)
    monkeypatch.chdir(tmp_path)
    assert main(["train", *TINY_TRAIN, "--n_epochs", "1", "--n_epochs_decay", "0"]) == 0
    assert made == [Path("datasets") / "synthetic"]
    saved = torch.load(tmp_path / "checkpoints" / "experiment_name" / "latest.pt", weights_only=True)[
        "options"
    ]
    assert saved["direction"] == "BtoA" and saved["dataroot"] == str(Path("datasets") / "synthetic")


# --- errors -----------------------------------------------------------------------------------------


def run_failing(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 1
    return capsys.readouterr().err


def test_user_errors_are_one_line_messages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = run_failing(["test", "--name", "nothing", "--checkpoints_dir", str(tmp_path), *TINY], capsys)
    assert "error: checkpoint" in err and "latest.pt does not exist" in err and "Traceback" not in err
    err = run_failing(["train", "--dataroot", str(tmp_path / "missing"), *TINY_TRAIN], capsys)
    assert "--dataroot" in err and "does not exist" in err
    data = generate_synthetic_facades(tmp_path / "data", n_train=1, n_test=1, size=32)
    bad_size = ["train", "--dataroot", str(data), "--checkpoints_dir", str(tmp_path), *TINY_TRAIN]
    err = run_failing([*bad_size, "--netG", "unet_128", "--crop_size", "96", "--load_size", "110"], capsys)
    assert "not a multiple of 128" in err and "--crop_size 128" in err
    err = run_failing(
        ["predict", "--name", "x", "--checkpoints_dir", str(tmp_path), "--input", "nope.png"], capsys
    )
    assert "--input nope.png does not exist" in err


@pytest.mark.slow
def test_demo_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dirs = ["--checkpoints_dir", str(tmp_path / "ck"), "--results_dir", str(tmp_path / "res")]
    assert main(["demo", "--device", "cpu", "--epochs", "1", "--backend", "reference", *dirs,
                 "--datasets_dir", str(tmp_path / "datasets")]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "held-out L1" in out and (tmp_path / "res" / "demo" / "test_latest" / "index.html").is_file()


def test_eval_is_dispatched_to_the_evaluator(tmp_path, capsys) -> None:
    missing = tmp_path / "no_results_here"
    assert main(["eval", str(missing), "--no-parser"]) == 1
    assert str(missing) in capsys.readouterr().err
