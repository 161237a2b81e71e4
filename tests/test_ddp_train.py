"""The trainer under DistributedDataParallel (torchrun), on CPU with gloo: 2 spawned ranks on 127.0.0.1.

One spawn runs every multi-process scenario in sequence, each a whole ``Trainer`` that joins the group from
torchrun's environment variables and leaves it at the end (a fresh port each): the equivalence run, a
straight run, the same run stopped and resumed, and a run with a NaN on one rank. The tests below assert
on what the ranks returned. The networks are tiny (unet_128 with ngf 4, a 2-layer PatchGAN with ndf 4) on
8 synthetic 128x128 pairs, so that the spawn dominates the cost.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from ranks import JOIN_TIMEOUT_S, free_port, rank_results, spawn

from fastpix2pix.data import generate_synthetic_facades
from fastpix2pix.data.aligned import AlignedDataset
from fastpix2pix.data.order import DistributedEpochSampler, EpochSampler
from fastpix2pix.models import NORMS
from fastpix2pix.runs.checkpoint import checkpoint_path, load_checkpoint
from fastpix2pix.runs.options import TrainOptions, parse_options
from fastpix2pix.training.distributed import _distributed_device, init_distributed, torchrun_environment
from fastpix2pix.training.step import NonFiniteLossError
from fastpix2pix.training.trainer import Trainer

SPAWN_TIMEOUT_S = 2 * JOIN_TIMEOUT_S  # five trainers in a row on a shared 2-core machine
pytestmark = [pytest.mark.timeout(SPAWN_TIMEOUT_S + 120), pytest.mark.usefixtures("one_thread")]

N_TRAIN = 8  # a multiple of the global batch: no padding, so 2 x 2 and 1 x 4 see the same batches
SIZE = 128
EQUIVALENCE_ITERS = 3  # into the second epoch: a new order, and the learning rate halved by the schedule
RESUME_AT, RESUME_TOTAL = 1, 4  # mid-epoch; then across the epoch boundary to the end of training
# Weights after 3 Adam steps in float32 through two networks, the sums of the batch statistics and of the
# gradients taken in another order: a few ulps of the gradients, scaled by at most lr per step.
WEIGHT_TOL = {"rtol": 1e-4, "atol": 2e-5}
LOSS_TOL = {"rtol": 1e-4, "atol": 1e-5}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic_facades(tmp_path_factory.mktemp("ddp_data"), N_TRAIN, 1, SIZE, seed=0)


def ddp_options(dataroot: Path, checkpoints: Path, name: str, **changes: Any) -> TrainOptions:
    opt = TrainOptions(
        dataroot=str(dataroot), direction="BtoA", name=name, checkpoints_dir=str(checkpoints),
        netG="unet_128", ngf=4, ndf=4, netD="n_layers", n_layers_D=2, norm="syncbatch", no_dropout=True,
        load_size=SIZE, crop_size=SIZE, batch_size=2, n_epochs=1, n_epochs_decay=1, num_threads=0,
        backend="reference", device="cpu", seed=3, deterministic=True, print_freq=4, display_freq=8,
        save_latest_freq=10_000, save_epoch_freq=1, dist_timeout=30,
    )  # fmt: skip
    return dataclasses.replace(opt, **changes)


def _fit(opt: TrainOptions, port: int) -> Trainer:
    os.environ["MASTER_PORT"] = str(port)  # a fresh group per trainer: each one destroys its own
    trainer = Trainer(opt, progress_bar=False)
    trainer.fit()
    return trainer


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {f"{key}.{name}": t.detach().clone() for key, net in zip("GD", trainer.nets, strict=True)
            for name, t in net.state_dict().items()}  # fmt: skip


# --- the ranks' scenario ------------------------------------------------------------------------------------


def _record_writes(folder: Path, writes: list[str]) -> None:
    """Record every file or folder this process creates, writes, renames or removes under ``folder``
    (Python's audit events see builtins.open, os.open, tempfile and torch.save's file alike)."""
    root = os.path.abspath(folder)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & write_flags)
        elif event in ("os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir"):
            path, writing = args[0], True
        else:
            return
        if not (writing and isinstance(path, str | bytes | os.PathLike)):
            return
        if os.path.abspath(os.fsdecode(path)).startswith(root):
            writes.append(f"{event} {os.fsdecode(path)}")

    sys.addaudithook(hook)


def _poison_inputs() -> None:
    """This rank's inputs become NaN (the other ranks' stay finite)."""
    original: Callable[..., dict[str, Any]] = AlignedDataset.__getitem__

    def poisoned(self: AlignedDataset, index: int) -> dict[str, Any]:
        item = original(self, index)
        item["A"] = torch.full_like(item["A"], float("nan"))
        return item

    AlignedDataset.__getitem__ = poisoned  # type: ignore[method-assign]


def _trainer_scenarios(rank: int, world_size: int, root: Path, checkpoints: Path, ports: list[int]) -> dict:
    writes: list[str] = []
    if rank > 0:
        _record_writes(checkpoints, writes)
    result: dict[str, Any] = {}
    options = lambda name, **changes: ddp_options(root, checkpoints, name, **changes)  # noqa: E731

    equivalence = _fit(options("equivalence", max_iters=EQUIVALENCE_ITERS), ports[0])
    result["equivalence"] = _weights(equivalence)
    result["lr"] = [o.param_groups[0]["lr"] for o in equivalence.optimizers]
    result["group_left"] = not dist.is_initialized()

    with_dropout = {"no_dropout": False, "max_iters": RESUME_TOTAL}
    result["straight"] = _weights(_fit(options("straight", **with_dropout), ports[1]))
    _fit(options("resumed", **with_dropout | {"max_iters": RESUME_AT}), ports[2])
    result["resumed"] = _weights(_fit(options("resumed", **with_dropout, continue_train=True), ports[3]))

    if rank == 1:
        _poison_inputs()
    try:
        _fit(options("nan", max_iters=EQUIVALENCE_ITERS), ports[4])
        result["nan_error"] = None
    except NonFiniteLossError as error:
        result["nan_error"] = str(error)
    result["group_left_after_error"] = not dist.is_initialized()
    result["writes"] = writes
    return result


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ddp_ranks")


@pytest.fixture(scope="module")
def checkpoints(out_dir: Path) -> Path:
    """The ranks' checkpoints_dir (one run folder per scenario)."""
    return out_dir / "checkpoints"


@pytest.fixture(scope="module")
def ranks(data: Path, out_dir: Path, checkpoints: Path) -> list[dict[str, Any]]:
    ports = [free_port() for _ in range(5)]
    outcomes = spawn(
        _trainer_scenarios,
        out_dir,
        init="env",
        join_timeout_s=SPAWN_TIMEOUT_S,
        root=data,
        checkpoints=checkpoints,
        ports=ports,
    )
    return rank_results(outcomes)


# --- (a) 2 processes x batch 2 = 1 process x batch 4 --------------------------------------------------------


@pytest.mark.slow
def test_ddp_trainer_matches_one_process_with_the_global_batch(
    ranks: list[dict[str, Any]], checkpoints: Path, data: Path, tmp_path: Path
) -> None:
    """syncbatch + DDP, 2 ranks x batch 2, 3 iterations (into epoch 2): the weights, logged losses and
    learning rates of one process with batch 4 (to float32 tolerance: sums in another order)."""
    single = Trainer(ddp_options(data, tmp_path, "single", batch_size=4, max_iters=EQUIVALENCE_ITERS),
                     progress_bar=False)  # fmt: skip
    single.fit()
    truth = _weights(single)
    assert ranks[0]["equivalence"].keys() == truth.keys()
    for key, value in ranks[0]["equivalence"].items():
        torch.testing.assert_close(value, truth[key], **WEIGHT_TOL, msg=key)
    assert ranks[0]["lr"] == [o.param_groups[0]["lr"] for o in single.optimizers] == [1e-4, 1e-4]
    # rank 0 logs the mean over the ranks: the loss of the global batch
    logged = [json.loads(line) for line in (checkpoints / "equivalence" / "loss_log.jsonl").open()]
    expected = [json.loads(line) for line in (tmp_path / "single" / "loss_log.jsonl").open()]
    assert [r["iter"] for r in logged] == [r["iter"] for r in expected] == [1, 2, 3]
    for ours, theirs in zip(logged, expected, strict=True):
        assert ours["images"] == theirs["images"]
        for name in ("G_GAN", "G_L1", "D_real", "D_fake"):
            assert math.isclose(ours[name], theirs[name], rel_tol=LOSS_TOL["rtol"], abs_tol=LOSS_TOL["atol"])


@pytest.mark.slow
def test_ranks_hold_identical_weights(ranks: list[dict[str, Any]]) -> None:
    """D (stepped through DDP, then frozen and called bare for the G step) and G are bit-identical on both
    ranks, and so are the synchronised BatchNorm statistics."""
    for run in ("equivalence", "straight", "resumed"):
        for key, value in ranks[0][run].items():
            assert torch.equal(value, ranks[1][run][key]), f"{run}: {key} differs between the ranks"


# --- (c) save and resume ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_under_ddp_is_bit_identical(ranks: list[dict[str, Any]], checkpoints: Path) -> None:
    """1 iteration, save, resume (another process group), 3 more = 4 straight, bit for bit, with dropout
    on: every rank restores its own generators, the sampler its position in the epoch's shard, and on CPU
    every reduction (gloo's sum of 2 values, the float64 statistics) is computed in the same order."""
    for rank, result in enumerate(ranks):
        for key, value in result["straight"].items():
            assert torch.equal(value, result["resumed"][key]), f"rank {rank}: {key}"
    state = load_checkpoint(checkpoint_path(checkpoints / "resumed", "latest"))
    assert state["iteration"] == RESUME_TOTAL and len(state["rng_ranks"]) == 2
    # the ranks' dropout streams differ (each rank draws its own masks)
    assert not torch.equal(state["rng_ranks"][0]["torch"], state["rng_ranks"][1]["torch"])


@pytest.mark.slow
def test_only_rank_zero_writes(ranks: list[dict[str, Any]], checkpoints: Path) -> None:
    assert ranks[1]["writes"] == []
    for name in ("equivalence", "straight", "resumed"):
        run = checkpoints / name
        for file in ("latest.pt", "latest_net_G.pth", "loss_log.jsonl", "log.txt", "train_opt.json"):
            assert (run / file).is_file(), f"{name}/{file}"
    assert "2 processes x batch 2 = global batch 4" in (checkpoints / "straight" / "log.txt").read_text()


# --- (d) a NaN on one rank -------------------------------------------------------------------------------


@pytest.mark.slow
def test_nan_on_one_rank_stops_every_rank(ranks: list[dict[str, Any]], checkpoints: Path) -> None:
    """Rank 1's inputs are NaN: both ranks raise the same NonFiniteLossError at the first logging point
    (naming rank 1), nothing is saved, and both leave the process group."""
    errors = [r["nan_error"] for r in ranks]
    assert errors[0] is not None and errors[0] == errors[1]
    assert "iteration 1" in errors[0] and "rank(s) [" in errors[0] and "1]" in errors[0], errors[0]
    assert not (checkpoints / "nan" / "latest.pt").exists()
    assert all(r["group_left"] and r["group_left_after_error"] for r in ranks)


# --- single process: the sampler, the environment, the options ----------------------------------------------


@pytest.mark.parametrize("size", [8, 7, 3, 1])
def test_distributed_sampler_shards_the_epoch(size: int) -> None:
    """Strided shares of the (seed, epoch) order, padded to equal lengths, together covering the epoch."""
    world = 3
    samplers = [
        DistributedEpochSampler(size, seed=5, shuffle=True, rank=r, world_size=world) for r in range(3)
    ]
    order = EpochSampler(size, seed=5, shuffle=True).order(2)
    for sampler in samplers:
        sampler.set_epoch(2)
    shards = [list(s) for s in samplers]
    assert {len(s) for s in shards} == {math.ceil(size / world)} == {len(s) for s in samplers}
    interleaved = [shards[r][k] for k in range(len(shards[0])) for r in range(world)]
    assert interleaved[:size] == order and set(interleaved[size:]) <= set(order)
    samplers[1].set_epoch(2, start=1)
    assert list(samplers[1]) == shards[1][1:] and len(samplers[1]) == len(shards[1]) - 1
    samplers[1].set_epoch(3)
    other_epoch = DistributedEpochSampler(size, seed=5, shuffle=True, rank=1, world_size=world)
    other_epoch.set_epoch(3)
    assert list(other_epoch) == list(samplers[1])  # a function of (seed, epoch) only


def test_no_torchrun_environment_is_a_plain_run(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert torchrun_environment() is None and init_distributed("cpu", 10) is None
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert torchrun_environment() == (0, 1, 0)
    assert init_distributed("cpu", 10) is None and not dist.is_initialized()  # a world of one


def test_one_device_per_process() -> None:
    """auto: CUDA device LOCAL_RANK where there is CUDA, else the CPU (what torchrun runs on here)."""
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert _distributed_device("auto", 0) == expected
    assert _distributed_device("cpu", 1) == torch.device("cpu")


def test_syncbatch_and_dist_timeout_are_options() -> None:
    opt = parse_options(TrainOptions, ["--norm", "syncbatch", "--dist_timeout", "60"])
    assert opt.norm == "syncbatch" and opt.dist_timeout == 60
    assert set(NORMS) >= {"batch", "syncbatch"}
