"""Fixtures shared by the test modules."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from pair_files import write_pair
from tiny_run import train_tiny

from fastpix2pix import runtime
from fastpix2pix.data.synthetic import generate_synthetic_facades


@pytest.fixture(autouse=True)
def float32_auto_on_every_cpu(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--precision auto`` is float32 in every test, so that no value a test asserts depends on which CPU
    runs it (auto would be bf16 on a CPU with AMX). A test of the rule itself is marked
    ``@pytest.mark.cpu_precision_rule`` and sees the real one (or patches it as it needs)."""
    if request.node.get_closest_marker("cpu_precision_rule") is None:
        monkeypatch.setattr(runtime, "bf16_faster_than_fp32", lambda support, vendor: False)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module of tiny tensors: they gain nothing from threads, and on a busy shared
    CPU OpenMP's spin-waiting makes a 2-thread step many times slower than a 1-thread one."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 train and 2 test pairs of 32x32 synthetic facades (photo | labels; the task is BtoA)."""
    return generate_synthetic_facades(
        tmp_path_factory.mktemp("synthetic32"), n_train=4, n_test=2, size=32, seed=0
    )


@pytest.fixture(scope="module")
def mixed_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Halves of 32x32, 40x40 and 32x48 (WxH): square ones of two sizes, and one of another aspect."""
    root = tmp_path_factory.mktemp("mixed")
    for k, size in enumerate([(32, 32), (40, 40), (32, 48)]):
        write_pair(root / "train" / f"{k}.png", size, seed=k)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(dataset root with 3 test pairs, checkpoints_dir of a 1-epoch tiny ResNet run named "tiny")."""
    root = tmp_path_factory.mktemp("run")
    data = generate_synthetic_facades(root / "data", n_train=3, n_test=3, size=32, seed=0)
    train_tiny(data, root / "checkpoints")
    return data, root / "checkpoints"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that skips without CUDA as ``cuda``, so that ``pytest -m cuda`` (the GPU check)
    selects all of them, whichever way a module spells its skip."""
    for item in items:
        if any("CUDA" in str(mark.kwargs.get("reason", "")) for mark in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.cuda)
