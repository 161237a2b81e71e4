"""A training run killed with SIGKILL mid-epoch, then resumed with --continue_train, ends bit-identical to an
uninterrupted run: the plain trainer and the fast path (on the CPU), through the command line.

The killed run is a real ``python -m fastpix2pix train`` process. The test watches its ``latest.pt``; when
a checkpoint at a mid-epoch position appears it stops the process (SIGSTOP, so that it cannot write another
one while the checkpoint is read), checks the position and kills it with SIGKILL. The uninterrupted and the
resumed runs then go through the same command line in this process (one torch thread, as the killed one).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_run import assert_same, tiny_options

from fastpix2pix import cli
from fastpix2pix.data.synthetic import generate_synthetic_facades
from fastpix2pix.runs.checkpoint import checkpoint_path, load_checkpoint, stale_temporaries
from fastpix2pix.runs.options import TrainOptions

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals"),
]

N_TRAIN = 5  # in batches of 2: the last batch of an epoch has 1 image (plain) or is topped up (fast path)
KILL_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def five_pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic_facades(tmp_path_factory.mktemp("five"), n_train=N_TRAIN, n_test=1, size=32)


def run_options(data: Path, checkpoints: Path, fast_path: str) -> TrainOptions:
    """4 epochs of 3 iterations, a latest.pt every 3 images (most of them mid-epoch); float32 whatever the
    CPU (the killed run is a subprocess, which the tests' float32 pin of ``--precision auto`` misses)."""
    return tiny_options(
        data, checkpoints, fast_path=fast_path, precision="fp32", batch_size=2, n_epochs=2, n_epochs_decay=2,
        print_freq=1000,
        display_freq=1000, save_latest_freq=3, save_epoch_freq=0,
    )  # fmt: skip


def train_argv(opt: TrainOptions) -> list[str]:
    """``train`` and the options of ``opt`` that differ from the defaults, as command-line arguments."""
    argv = ["train"]
    for field in dataclasses.fields(TrainOptions):
        value = getattr(opt, field.name)
        if value == field.default:
            continue
        argv += [f"--{field.name}"] if value is True else [f"--{field.name}", str(value)]
    return argv


def kill_mid_epoch(argv: list[str], run_dir: Path) -> dict:
    """Run the command in a subprocess and SIGKILL it once its latest.pt is at a mid-epoch position;
    returns that checkpoint."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = (run_dir.parent / "killed_run.out").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "fastpix2pix", *argv], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    latest, seen = checkpoint_path(run_dir, "latest"), None
    deadline = time.monotonic() + KILL_TIMEOUT_S
    try:
        while process.poll() is None and time.monotonic() < deadline:
            stamp = latest.stat().st_mtime_ns if latest.exists() else None
            if stamp is None or stamp == seen:
                time.sleep(0.005)
                continue
            process.send_signal(signal.SIGSTOP)  # no further save while the checkpoint is read
            seen = latest.stat().st_mtime_ns
            state = load_checkpoint(latest)
            if 0 < state["epoch_iter"] < N_TRAIN:
                process.send_signal(signal.SIGKILL)
                process.wait()
                return state
            process.send_signal(signal.SIGCONT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
    output = (run_dir.parent / "killed_run.out").read_text()[-2000:]
    pytest.fail(f"no mid-epoch checkpoint caught before the run ended (exit {process.returncode}):\n{output}")


@pytest.mark.parametrize("fast_path", ["off", "on"])
def test_killed_and_resumed_run_equals_uninterrupted_run(
    five_pairs: Path, tmp_path: Path, fast_path: str
) -> None:
    killed = run_options(five_pairs, tmp_path / "killed", fast_path)
    at_kill = kill_mid_epoch(train_argv(killed), tmp_path / "killed" / killed.name)
    assert 0 < at_kill["iteration"] < 12 and 0 < at_kill["epoch_iter"] < N_TRAIN
    if fast_path == "on":
        assert at_kill["data_source"]["position"] >= at_kill["epoch_iter"]

    assert cli.main(train_argv(run_options(five_pairs, tmp_path / "straight", fast_path))) == 0
    assert cli.main([*train_argv(killed), "--continue_train"]) == 0

    run_dir = tmp_path / "killed" / killed.name
    assert stale_temporaries(run_dir) == []  # a kill inside a write leaves one: the resumed run removed it
    straight = load_checkpoint(checkpoint_path(tmp_path / "straight" / killed.name, "latest"))
    resumed = load_checkpoint(checkpoint_path(run_dir, "latest"))
    assert resumed["iteration"] == straight["iteration"] == 12
    keys = ["G", "D", "optimizer_G", "optimizer_D", "scheduler_G", "scheduler_D", "epoch", "epoch_iter",
            "images", "iteration"]  # fmt: skip
    for key in keys + (["data_source"] if fast_path == "on" else []):
        assert_same(resumed[key], straight[key], key)
    # Every generator but the DataLoader's, which only seeds worker processes (none here; the augmentation
    # is drawn from (seed, epoch, index)) and is drawn from once per epoch iterator: once more after a resume.
    for name in resumed["rng"].keys() - {"loader"}:
        assert_same(resumed["rng"][name], straight["rng"][name], f"rng.{name}")
