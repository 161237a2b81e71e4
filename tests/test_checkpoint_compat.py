"""A checkpoint written by an earlier version loads and resumes bit for bit (tests/data/checkpoint_0.1)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from tiny_run import assert_same, tiny_options

from fastpix2pix.data.synthetic import generate_synthetic_facades
from fastpix2pix.runs.checkpoint import checkpoint_path, load_checkpoint
from fastpix2pix.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

LEGACY = Path(__file__).parent / "data" / "checkpoint_0.1"


def test_a_checkpoint_from_before_the_layers_resumes_bit_exactly(tmp_path: Path) -> None:
    data = generate_synthetic_facades(tmp_path / "data", n_train=4, n_test=2, size=32, seed=0)
    run_dir = tmp_path / "checkpoints" / "tiny"
    run_dir.mkdir(parents=True)
    shutil.copy(LEGACY / "latest.pt", run_dir / "latest.pt")
    opt = tiny_options(data, tmp_path / "checkpoints", ngf=2, ndf=2, max_iters=7, continue_train=True)
    trainer = Trainer(opt, progress_bar=False)
    assert trainer.state.iteration == 3  # where the old run stopped
    trainer.fit()
    trainer.close()
    resumed = load_checkpoint(checkpoint_path(run_dir, "latest"))
    expected = torch.load(LEGACY / "expected_iteration_7.pt", weights_only=True)
    assert len(expected) == 9  # networks, optimizers, schedulers and the position
    for key in expected:
        assert_same(resumed[key], expected[key], key)
