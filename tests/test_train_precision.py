"""``train --precision``: the rule, the trainer it chooses, and checkpoints that cross precisions.

The rule's CPU side is tested with the capability check patched both ways (``cpu_precision_rule`` tests see
the real rule); everything else runs with ``auto`` pinned to float32 (tests/conftest.py), so no asserted
value depends on the CPU. bf16 itself runs on every CPU (emulated where it is not native).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from tiny_run import tiny_options

from fastpix2pix import runtime
from fastpix2pix.cli import build_main_parser
from fastpix2pix.runs.checkpoint import checkpoint_path
from fastpix2pix.runs.options import TrainOptions
from fastpix2pix.training.fast_trainer import FastTrainer, run_training, use_fast_path
from fastpix2pix.training.precision import resolve_training_precision
from fastpix2pix.training.trainer import Trainer

CPU = torch.device("cpu")


@pytest.fixture
def one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


def patch_cpu(monkeypatch: pytest.MonkeyPatch, support: str | None, vendor: str) -> None:
    monkeypatch.setattr(runtime, "cpu_bf16_support", lambda: support)
    monkeypatch.setattr(runtime, "cpu_vendor", lambda: vendor)


@pytest.mark.cpu_precision_rule
@pytest.mark.parametrize(
    ("support", "vendor", "expected"),
    [("amx", "intel", "bf16"), ("avx512_bf16", "amd", "bf16"), ("avx512_bf16", "intel", "fp32"),
     (None, "amd", "fp32")],
)  # fmt: skip
def test_auto_follows_the_cpu_and_chooses_the_fast_path_with_bf16(
    monkeypatch: pytest.MonkeyPatch, one_process: None, support: str | None, vendor: str, expected: str
) -> None:
    patch_cpu(monkeypatch, support, vendor)
    chosen = resolve_training_precision("auto", CPU)
    assert chosen.name == expected and chosen.reason.startswith("auto: ")
    # --fast_path auto trains a CPU run on the fast path exactly when auto means bf16 there
    assert use_fast_path(TrainOptions(device="cpu")) is (expected == "bf16")
    assert not use_fast_path(TrainOptions(device="cpu", precision="fp32"))
    assert use_fast_path(TrainOptions(device="cpu", precision="bf16"))  # emulated where not native
    assert not use_fast_path(TrainOptions(device="cpu", precision="bf16", fast_path="off"))


def test_explicit_precisions_and_unknown_ones() -> None:
    assert resolve_training_precision("fp32", CPU).name == "fp32"
    assert resolve_training_precision("bf16", CPU).name == "bf16"
    assert resolve_training_precision("fp32", torch.device("cuda")).name == "fp32"
    assert resolve_training_precision("bf16", torch.device("cuda")).name == "bf16"
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        resolve_training_precision("fp16", CPU)
    parser = build_main_parser()
    assert parser.parse_args(["train"]).precision == "auto" == TrainOptions().precision
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--precision", "fp16"])


def test_auto_is_pinned_to_float32_in_the_tests(one_process: None) -> None:
    """The pin of tests/conftest.py holds (a CPU with AMX would otherwise train these tests in bf16)."""
    assert resolve_training_precision("auto", CPU).name == "fp32"
    assert not use_fast_path(TrainOptions(device="cpu"))


def test_the_plain_trainer_refuses_bf16_before_making_its_run_folder(
    tiny_data: Path, tmp_path: Path, one_process: None
) -> None:
    opt = tiny_options(tiny_data, tmp_path, precision="bf16", fast_path="off")
    with pytest.raises(ValueError, match="--precision bf16 trains on the fast path"):
        run_training(opt, progress_bar=False)
    with pytest.raises(ValueError, match="--precision bf16 trains on the fast path"):
        Trainer(opt, progress_bar=False)
    assert not (tmp_path / "tiny").exists()


def test_the_fast_trainer_takes_the_precision_and_says_it(tiny_data: Path, tmp_path: Path) -> None:
    for precision, bf16 in (("bf16", True), ("fp32", False), ("auto", False)):
        opt = tiny_options(tiny_data, tmp_path / precision, precision=precision, fast_path="on", max_iters=1)
        trainer = FastTrainer(opt, progress_bar=False)
        # bf16 as on CUDA, in channels_last; float32 keeps the CPU's NCHW
        assert (trainer.config.bf16, trainer.config.channels_last) == (bf16, bf16)
        assert trainer.precision.bf16 is bf16
        trainer.fit()
        log = (trainer.run_dir / "log.txt").read_text()
        expected = "bf16 (--precision bf16;" if bf16 else "fp32 (--precision fp32)"
        if precision == "auto":
            expected = "fp32 (auto: "
        assert f"fast path on (--fast_path on, cpu device), {expected}" in log


def test_plain_trainer_line_says_why_a_cpu_run_is_not_on_the_fast_path(
    tiny_data: Path, tmp_path: Path
) -> None:
    trainer = Trainer(tiny_options(tiny_data, tmp_path, fast_path="auto", max_iters=1), progress_bar=False)
    trainer.fit()
    assert "fast path off (cpu device, fp32 (auto: " in (trainer.run_dir / "log.txt").read_text()


def generator_weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["G"]


@pytest.mark.parametrize(("first", "then"), [("bf16", "fp32"), ("fp32", "bf16")])
def test_a_run_resumes_in_the_other_precision(tiny_data: Path, tmp_path: Path, first: str, then: str) -> None:
    """A checkpoint holds float32 master weights and Adam state whatever the run computed in: a bf16 run
    resumes in float32 and back, from the weights it saved, and goes on training."""
    opt = tiny_options(
        tiny_data, tmp_path, precision=first, fast_path="on", max_iters=2, save_latest_freq=2,
        save_epoch_freq=0,
    )  # fmt: skip
    FastTrainer(opt, progress_bar=False).fit()
    saved = generator_weights(checkpoint_path(tmp_path / "tiny", "latest"))
    assert all(t.dtype == torch.float32 for t in saved.values() if t.is_floating_point())
    resumed = FastTrainer(
        dataclasses.replace(opt, precision=then, continue_train=True, max_iters=4), progress_bar=False
    )
    assert resumed.precision.name == then and resumed.state.iteration == 2
    for name, value in resumed.nets.G.state_dict().items():
        assert torch.equal(value, saved[name]), name
    resumed.fit()
    assert resumed.state.iteration == 4
    after = generator_weights(checkpoint_path(tmp_path / "tiny", "latest"))
    assert any(not torch.equal(after[k], saved[k]) for k in saved if saved[k].is_floating_point())
    assert all(torch.isfinite(t).all() for t in after.values() if t.is_floating_point())
