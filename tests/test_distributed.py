"""Tests of synchronised BatchNorm (:mod:`fastpix2pix.ops.sync_bn`) and ``norm="syncbatch"``.

The central claim: W processes with batch n each, synchronised BatchNorm and DDP, train exactly the network
that one process with batch W*n trains through plain BatchNorm (outputs, gradients, running statistics,
weights after optimizer steps). The multi-process tests run on CPU with gloo: ranks are spawned with
torch.multiprocessing on 127.0.0.1, every join is bounded (a hung rank fails the test, it does not hang CI)
and the collectives have a timeout. Spawning costs seconds (each rank imports torch), so one spawn per
backend runs all the equivalence scenarios and the tests below assert on its results.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from ranks import JOIN_TIMEOUT_S, WORLD_SIZE, RankOutcome, free_port, rank_results, spawn
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fastpix2pix._extension import extension_available
from fastpix2pix.models import ConvBlock, UnetGenerator, define_D, define_G, init_weights
from fastpix2pix.models.layers import LEAKY_RELU
from fastpix2pix.ops.reference import activation
from fastpix2pix.ops.sync_bn import (
    SyncBatchNorm2d,
    combine_batch_stats,
    reference_sync_batch_norm,
    sync_bn_act,
    sync_group,
)

FAILED_RANK_EXIT_CODE = 3
HUNG_RANK_TIMEOUT_S = 4  # the collective timeout in the hung-rank test
HUNG_RANK_SLEEP_S = HUNG_RANK_TIMEOUT_S + 8  # well past it; then the hung rank exits by itself

# The tests that spawn ranks are marked slow (`make test-fast` skips them; `make test` and CI run them).
# The backstop above the bounded joins (needs pytest-timeout; without it the joins still bound the tests).
pytestmark = pytest.mark.timeout(2 * JOIN_TIMEOUT_S)


def _fused_kernels_on(device: str) -> bool:
    """Whether the fused per-device kernels are registered for ``device`` (not only the schemas)."""
    if not extension_available():
        return False
    try:
        torch.ops.fastpix2pix.bn_stats(torch.ones(2, 1, 1, 1, device=device))
        torch.ops.fastpix2pix.bias_act_forward(torch.ones(2, 1, 1, 1, device=device), None, 1.0)
    except NotImplementedError:
        return False
    return True


FUSED_ON_CPU = _fused_kernels_on("cpu")
BACKENDS = [
    pytest.param(
        "fused",
        marks=pytest.mark.skipif(not FUSED_ON_CPU, reason="the fused CPU kernels are not built (yet)"),
    ),
    "reference",
]


def _local_slice(sizes: tuple[int, ...], rank: int) -> slice:
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


# --- the block-level scenario: one ConvBlock, one forward and backward ------------------------------------

BLOCK_BATCH = 4  # the global batch; the processes split it along N
BLOCK_SIZE = 8  # its height and width
BLOCK_SPLITS = {"equal": (2, 2), "unequal": (3, 1), "empty_rank": (4, 0)}


def _make_block(norm: str, backend: str) -> ConvBlock:
    """A conv3x3 -> norm -> LeakyReLU block with every parameter and running statistic random (seeded)."""
    block = ConvBlock(3, 4, 3, 1, 1, norm=norm, negative_slope=LEAKY_RELU, backend=backend)
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for tensor in [*block.parameters(), block.norm.running_mean]:
            tensor.copy_(torch.randn(tensor.shape, generator=generator))
        block.norm.running_var.copy_(torch.rand(4, generator=generator) + 0.5)
    return block


def _block_data(size: int = BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """The global input and a fixed random weighting of the output that defines the loss."""
    generator = torch.Generator().manual_seed(12)
    x = torch.randn(BLOCK_BATCH, 3, size, size, generator=generator) * 2 + 0.5
    weights = torch.randn(BLOCK_BATCH, 4, size, size, generator=generator)
    return x, weights


def _block_step(
    block: nn.Module, x: torch.Tensor, weights: torch.Tensor, loss_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One training forward and backward of loss_scale * sum(out * weights); returns (out, x.grad)."""
    x = x.clone().requires_grad_()
    out = block(x)
    (loss_scale * (out * weights).sum()).backward()
    return out.detach(), x.grad


def _block_record(block: ConvBlock, out: torch.Tensor, x_grad: torch.Tensor) -> dict[str, torch.Tensor]:
    grads = {f"grad/{name}": p.grad.clone() for name, p in block.named_parameters()}
    state = {f"state/{name}": t.clone() for name, t in block.state_dict().items()}
    return {"out": out, "x_grad": x_grad, **grads, **state}


class _UnfusedBlock(nn.Module):
    """A ConvBlock's submodules called one by one: SyncBatchNorm2d.forward on its own."""

    def __init__(self, block: ConvBlock) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return activation(self.block.norm(self.block.conv(x)), self.block.negative_slope)


def _block_rank(
    rank: int,
    world_size: int,
    norm: str,
    backend: str,
    sizes: tuple[int, ...],
    *,
    unfused: bool = False,
    size: int = BLOCK_SIZE,
) -> dict:
    """This rank's share of the batch through a DDP-wrapped block.

    The loss is normalised by the *global* batch size and multiplied by W: the mean over ranks of these
    losses (what DDP's averaged gradients differentiate) is then the single process's loss, whatever the
    split.
    """
    block = _make_block(norm, backend)
    x, weights = _block_data(size)
    local = _local_slice(sizes, rank)
    ddp = DistributedDataParallel(_UnfusedBlock(block) if unfused else block)
    out, x_grad = _block_step(ddp, x[local], weights[local], world_size / sum(sizes))
    return _block_record(block, out, x_grad)


def _converted_block_rank(rank: int, world_size: int, backend: str) -> dict:
    """A "batch" block converted with nn.SyncBatchNorm.convert_sync_batchnorm must synchronise too.

    DDP refuses CPU modules holding an nn.SyncBatchNorm, so the parameter grads are averaged by hand here.
    """
    block = nn.SyncBatchNorm.convert_sync_batchnorm(_make_block("batch", backend))
    assert isinstance(block.norm, nn.SyncBatchNorm)
    x, weights = _block_data()
    local = _local_slice(BLOCK_SPLITS["equal"], rank)
    out, x_grad = _block_step(block, x[local], weights[local], world_size / BLOCK_BATCH)
    for p in block.parameters():
        dist.all_reduce(p.grad)
        p.grad /= world_size
    return _block_record(block, out, x_grad)


def _block_single_process(size: int = BLOCK_SIZE) -> dict[str, torch.Tensor]:
    """The ground truth: one process, the whole batch, plain BatchNorm on the reference ops."""
    block = _make_block("batch", "reference")
    x, weights = _block_data(size)
    out, x_grad = _block_step(block, x, weights, 1 / BLOCK_BATCH)
    return _block_record(block, out, x_grad)


# --- the model-level scenario: a small G + D trained for a few steps with DDP ---------------------------

MODEL_STEPS = 3
MODEL_BATCH = 4  # global
MODEL_SIZE = 32  # the U-Net below needs a multiple of 2**5
LEARNING_RATE = 0.01


class _GanPair(nn.Module):
    """A 5-level U-Net G (unet_128 with 2 fewer levels; ngf 8) and an n_layers D (ndf 8, 2 layers) on
    (A, G(A)): BatchNorm in both, on levels down to 2x2 (few values per channel: a sharp test)."""

    def __init__(self, norm: str, backend: str) -> None:
        super().__init__()
        torch.manual_seed(21)  # the same initial weights for every norm (SyncBatchNorm2d is a BatchNorm2d)
        self.G = init_weights(UnetGenerator(3, 3, num_downs=5, ngf=8, norm=norm, backend=backend))
        self.D = define_D("n_layers", 6, ndf=8, n_layers_D=2, norm=norm, backend=backend)

    def forward(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fake = self.G(a)
        return fake, self.D(torch.cat([a, fake], 1))


def _model_data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(22)
    shape = (MODEL_STEPS, MODEL_BATCH, 3, MODEL_SIZE, MODEL_SIZE)
    return torch.randn(shape, generator=generator), torch.rand(shape, generator=generator) * 2 - 1


def _train(model: nn.Module, params: nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SGD steps on a simple pix2pix-like loss, L1(G(A), B) + mean(D(A, G(A))^2); returns the losses.

    The losses are means over the local batch: with equal local batches, their average over ranks is the
    single process's loss.
    """
    optimizer = torch.optim.SGD(params.parameters(), lr=LEARNING_RATE, momentum=0.9)
    losses = []
    for step in range(MODEL_STEPS):
        optimizer.zero_grad()
        fake, logits = model(a[step])
        loss = F.l1_loss(fake, b[step]) + logits.square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def _model_rank(rank: int, world_size: int, backend: str) -> dict[str, torch.Tensor]:
    pair = _GanPair("syncbatch", backend)
    a, b = _model_data()
    local = _local_slice((MODEL_BATCH // world_size,) * world_size, rank)
    losses = _train(DistributedDataParallel(pair), pair, a[:, local], b[:, local])
    return {"losses": losses, **{f"state/{k}": v.clone() for k, v in pair.state_dict().items()}}


def _model_single_process() -> dict[str, torch.Tensor]:
    pair = _GanPair("batch", "reference")
    a, b = _model_data()
    losses = _train(pair, pair, a, b)
    return {"losses": losses, **{f"state/{k}": v.clone() for k, v in pair.state_dict().items()}}


# --- the one spawn per backend that runs all the equivalence scenarios ---------------------------------


def _equivalence_scenarios(rank: int, world_size: int, backend: str) -> dict[str, Any]:
    results: dict[str, Any] = {
        f"sync/{split}": _block_rank(rank, world_size, "syncbatch", backend, sizes)
        for split, sizes in BLOCK_SPLITS.items()
    }
    results["local"] = _block_rank(rank, world_size, "batch", backend, BLOCK_SPLITS["equal"])
    results["module"] = _block_rank(rank, world_size, "syncbatch", backend, (3, 1), unfused=True)
    # 1x1 images: rank 1 holds a single value per channel (the fused bn_stats refuses those on its own).
    results["one_value"] = _block_rank(rank, world_size, "syncbatch", backend, (3, 1), size=1)
    results["converted"] = _converted_block_rank(rank, world_size, backend)
    results["model"] = _model_rank(rank, world_size, backend)
    return results


@pytest.fixture(scope="module", params=BACKENDS)
def spawned(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Every rank's results of :func:`_equivalence_scenarios` for one backend (two ranks, gloo)."""
    backend = request.param
    out_dir = tmp_path_factory.mktemp(f"equivalence_{backend}")
    return rank_results(spawn(_equivalence_scenarios, out_dir, backend=backend))


@pytest.fixture(scope="module")
def block_truth() -> dict[str, torch.Tensor]:
    return _block_single_process()


BLOCK_TOL = {"rtol": 1e-5, "atol": 1e-5}  # float32; the statistics are summed in another order
MODEL_TOL = {"rtol": 1e-4, "atol": 2e-5}  # float32 after 3 SGD steps through 2 networks


def _assert_block_matches(ranks: list[dict], truth: dict[str, torch.Tensor], what: str) -> None:
    """Concatenated outputs and input grads / W, and on every rank the averaged parameter grads and the
    running statistics, equal the single process's."""
    torch.testing.assert_close(torch.cat([r["out"] for r in ranks]), truth["out"], **BLOCK_TOL, msg=what)
    # The input grad on rank r is d(sum_s L_s)/dx_r (the statistics join every rank's loss): W times the
    # gradient of the mean loss that the single process differentiates.
    x_grad = torch.cat([r["x_grad"] for r in ranks]) / len(ranks)
    torch.testing.assert_close(x_grad, truth["x_grad"], **BLOCK_TOL, msg=what)
    for rank, result in enumerate(ranks):
        for key, expected in truth.items():
            if key.startswith(("grad/", "state/")):
                torch.testing.assert_close(
                    result[key], expected, **BLOCK_TOL, msg=f"{what}, rank {rank}, {key}"
                )


# --- (a) synchronised BatchNorm = one process with the whole batch ---------------------------------------


@pytest.mark.slow
def test_sync_block_matches_single_process(spawned: list[dict], block_truth: dict) -> None:
    """2 ranks x batch 2 through DDP: outputs, grads and running stats of one process with batch 4."""
    _assert_block_matches([r["sync/equal"] for r in spawned], block_truth, "syncbatch, batches (2, 2)")


@pytest.mark.slow
def test_model_steps_match_single_process(spawned: list[dict]) -> None:
    """G + D with syncbatch, 3 DDP SGD steps on 2 ranks x batch 2: the weights, running statistics and
    losses of one process with batch 4 and plain BatchNorm."""
    truth = _model_single_process()
    losses = torch.stack([r["model"]["losses"] for r in spawned]).mean(0)
    torch.testing.assert_close(losses, truth["losses"], **MODEL_TOL)
    for rank, result in enumerate(spawned):
        state = {k: v for k, v in result["model"].items() if k.startswith("state/")}
        assert state.keys() == {k for k in truth if k.startswith("state/")}
        for key, value in state.items():
            torch.testing.assert_close(value, truth[key], **MODEL_TOL, msg=f"rank {rank}, {key}")


@pytest.mark.slow
def test_sync_batch_norm_module_on_its_own(spawned: list[dict], block_truth: dict) -> None:
    """SyncBatchNorm2d called directly (not through its ConvBlock) synchronises too (batches (3, 1))."""
    _assert_block_matches([r["module"] for r in spawned], block_truth, "SyncBatchNorm2d.forward")


@pytest.mark.slow
def test_converted_nn_sync_batch_norm_synchronises(spawned: list[dict], block_truth: dict) -> None:
    """A "batch" ConvBlock converted by nn.SyncBatchNorm.convert_sync_batchnorm is synchronised too."""
    _assert_block_matches([r["converted"] for r in spawned], block_truth, "converted nn.SyncBatchNorm")


# --- (b) plain BatchNorm: the statistics stay local --------------------------------------------------------


@pytest.mark.slow
def test_batch_norm_statistics_are_local(spawned: list[dict], block_truth: dict) -> None:
    """Without syncbatch, each rank normalises with its own statistics: they differ between the ranks
    and from the global ones, and so do the outputs."""
    ranks = [r["local"] for r in spawned]
    key = "state/norm.running_mean"
    assert not torch.allclose(ranks[0][key], ranks[1][key])
    for result in ranks:
        assert not torch.allclose(result[key], block_truth[key])
    assert not torch.allclose(torch.cat([r["out"] for r in ranks]), block_truth["out"])


# --- (c) unequal local batches --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("split", ["unequal", "empty_rank"])
def test_unequal_local_batches_combine(spawned: list[dict], block_truth: dict, split: str) -> None:
    """Batches (3, 1) and (4, 0) combine to exactly the global statistics (Chan's parallel formula)."""
    sizes = BLOCK_SPLITS[split]
    _assert_block_matches([r[f"sync/{split}"] for r in spawned], block_truth, f"batches {sizes}")


@pytest.mark.slow
def test_rank_with_one_value_per_channel(spawned: list[dict]) -> None:
    """Batches (3, 1) of 1x1 images: 3 values and 1 value per channel combine to the global 4."""
    _assert_block_matches([r["one_value"] for r in spawned], _block_single_process(1), "1x1, batches (3, 1)")


def test_combine_batch_stats_matches_concatenation() -> None:
    """Parts of sizes 5, 0, 1, 12 (the empty one carrying garbage) give the statistics of their union."""
    generator = torch.Generator().manual_seed(3)
    sizes = (5, 0, 1, 12)
    parts = [torch.randn(n, 3, generator=generator, dtype=torch.float64) * 3 + 7 for n in sizes]
    means = torch.stack([p.mean(0) if len(p) else torch.full((3,), float("nan")) for p in parts])
    variances = torch.stack([p.var(0, unbiased=False) if len(p) else torch.zeros(3) for p in parts])
    mean, var, count = combine_batch_stats(
        means, variances.double(), torch.tensor(sizes, dtype=torch.float64)
    )
    union = torch.cat(parts)
    torch.testing.assert_close(mean, union.mean(0))
    torch.testing.assert_close(var, union.var(0, unbiased=False))
    assert count.item() == sum(sizes)


# --- (d) a rank that dies ---------------------------------------------------------------------------------


class _CollectiveFailed(RuntimeError):
    """The survivor's error, and how long it waited in the collective before getting it."""

    def __init__(self, error: Exception, waited_s: float) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.waited_s = waited_s


def _failing_rank_scenario(rank: int, world_size: int, backend: str, fate: str) -> dict[str, Any]:
    """Both ranks run the forward (its all_gather completes); then rank 1 dies (``fate`` "dies") or stops
    answering (``"hangs"``: it sleeps past the collective timeout), while rank 0 enters the backward's
    all_reduce, which waits for rank 1."""
    block = _make_block("syncbatch", backend)
    x, weights = _block_data()
    local = _local_slice(BLOCK_SPLITS["equal"], rank)
    out = block(x[local])
    if rank == 1:
        if fate == "hangs":
            time.sleep(HUNG_RANK_SLEEP_S)
        os._exit(FAILED_RANK_EXIT_CODE)
    waiting_since = time.monotonic()
    try:
        (out * weights[local]).sum().backward()
    except Exception as error:
        raise _CollectiveFailed(error, time.monotonic() - waiting_since) from error
    return {}


def _assert_survivor_failed(outcomes: list[RankOutcome], timeout_s: float) -> dict[str, Any]:
    survivor, failed = outcomes
    assert failed.exitcode == FAILED_RANK_EXIT_CODE, failed
    assert survivor.exitcode == 1, f"the survivor should fail, got exit code {survivor.exitcode}"
    error = survivor.error
    assert error is not None and error["waited_s"] is not None, error
    # A clear error from the collective, within the timeout (the slack is for a loaded machine).
    assert "_CollectiveFailed: " in error["error"], error["traceback"]
    assert error["waited_s"] < timeout_s + 5, error
    return error


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_dead_rank_fails_the_survivor(backend: str, tmp_path: Path) -> None:
    """gloo sees the dead peer's connection reset: the survivor fails at once, not at the timeout."""
    error = _assert_survivor_failed(spawn(_failing_rank_scenario, tmp_path, backend=backend, fate="dies"), 0)
    assert re.search(r"(?i)connection (reset|closed)", error["error"]), error["error"]


@pytest.mark.slow
def test_hung_rank_fails_the_survivor_at_the_timeout(tmp_path: Path) -> None:
    """A peer that is alive but silent: only the collective timeout (init_process_group's) ends the wait.
    The collective code is gloo's whichever backend computes the norm, so one backend suffices."""
    outcomes = spawn(
        _failing_rank_scenario,
        tmp_path,
        collective_timeout_s=HUNG_RANK_TIMEOUT_S,
        backend="reference",
        fate="hangs",
    )
    error = _assert_survivor_failed(outcomes, HUNG_RANK_TIMEOUT_S)
    assert error["waited_s"] > HUNG_RANK_TIMEOUT_S / 2, error
    assert re.search(r"(?i)time(d)? ?out", error["error"]), error["error"]


# --- single process: the fallback to plain batch norm -----------------------------------------------------


@pytest.fixture
def group_of_one() -> Any:
    """An initialised gloo group of one process (this one), destroyed afterwards."""
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{free_port()}",
        rank=0,
        world_size=1,
        timeout=timedelta(seconds=30),
    )
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def _sync_bn(
    backend: str, y: torch.Tensor, bn: nn.BatchNorm2d, slope: float, group: Any = None
) -> torch.Tensor:
    args = (y, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    stats = {"training": bn.training, "momentum": 0.1, "eps": bn.eps, "process_group": group}
    if backend == "fused":
        return sync_bn_act(*args, **stats, negative_slope=slope)
    return activation(reference_sync_batch_norm(*args, **stats), slope)


def _copy_of(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    copy = nn.BatchNorm2d(bn.num_features)
    copy.load_state_dict(bn.state_dict())
    return copy


def _assert_fallback_is_batch_norm(backend: str, group: Any) -> None:
    for training in (True, False):
        bn = nn.BatchNorm2d(5).train(training)
        generator = torch.Generator().manual_seed(4)
        with torch.no_grad():
            for tensor in (bn.weight, bn.bias, bn.running_mean):
                tensor.copy_(torch.randn(5, generator=generator))
        ours = _copy_of(bn).train(training)
        y = torch.randn(3, 5, 4, 6, generator=generator)
        upstream = torch.randn(3, 5, 4, 6, generator=generator)
        y_ref, y_ours = y.clone().requires_grad_(), y.clone().requires_grad_()
        (activation(bn(y_ref), LEAKY_RELU) * upstream).sum().backward()
        (_sync_bn(backend, y_ours, ours, LEAKY_RELU, group) * upstream).sum().backward()
        torch.testing.assert_close(y_ours.grad, y_ref.grad, msg=f"training={training}")
        torch.testing.assert_close(ours.weight.grad, bn.weight.grad)
        torch.testing.assert_close(ours.bias.grad, bn.bias.grad)
        torch.testing.assert_close(ours.running_mean, bn.running_mean)
        torch.testing.assert_close(ours.running_var, bn.running_var)


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_process_group_is_plain_batch_norm(backend: str) -> None:
    assert not dist.is_initialized() and sync_group() is None
    _assert_fallback_is_batch_norm(backend, None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_of_one_is_plain_batch_norm(backend: str, group_of_one: Any) -> None:
    assert sync_group() is None and sync_group(group_of_one) is None
    _assert_fallback_is_batch_norm(backend, group_of_one)


# --- the models with norm "syncbatch" -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["unet_128", "resnet_6blocks", "basic", "pixel"])
def test_syncbatch_checkpoints_interchange_with_batch(kind: str) -> None:
    """Same seed, same weights (init sees a BatchNorm2d); state_dicts load into each other strictly."""
    nets = {}
    for norm in ("batch", "syncbatch"):
        torch.manual_seed(5)
        if kind in ("basic", "pixel"):
            nets[norm] = define_D(kind, ndf=8, norm=norm, backend="reference")
        else:
            nets[norm] = define_G(kind, ngf=8, norm=norm, backend="reference")
    batch, sync = nets["batch"], nets["syncbatch"]
    assert any(isinstance(m, SyncBatchNorm2d) for m in sync.modules())
    torch.testing.assert_close(sync.state_dict(), batch.state_dict(), rtol=0, atol=0)
    sync.load_state_dict(batch.state_dict(), strict=True)
    batch.load_state_dict(sync.state_dict(), strict=True)


def test_syncbatch_block_has_no_conv_bias() -> None:
    with pytest.raises(ValueError, match="no bias"):
        ConvBlock(3, 4, 3, norm="syncbatch", bias=True, backend="reference")
    assert ConvBlock(3, 4, 3, norm="syncbatch", backend="reference").conv.bias is None


# --- CUDA: against torch's own nn.SyncBatchNorm -------------------------------------------------------------


def _run_norm(
    name: str, bn: nn.Module, forward: Callable[..., torch.Tensor], y: torch.Tensor, upstream: torch.Tensor
) -> dict[str, torch.Tensor]:
    y = y.clone().requires_grad_()
    out = forward(bn, y)
    (out * upstream).sum().backward()
    values = {
        "out": out.detach(),
        "y_grad": y.grad,
        "weight_grad": bn.weight.grad,
        "bias_grad": bn.bias.grad,
        "running_mean": bn.running_mean,
        "running_var": bn.running_var,
    }
    return {f"{name}/{key}": value.cpu() for key, value in values.items()}


def _torch_sync_bn_scenario(rank: int, world_size: int, fused: bool) -> dict[str, torch.Tensor]:
    """nn.SyncBatchNorm and ours on the same CUDA batch share: outputs, local grads, running stats."""
    device = torch.device("cuda", rank if torch.cuda.device_count() >= world_size else 0)
    torch.cuda.set_device(device)
    generator = torch.Generator().manual_seed(31)
    shape = (2 * world_size, 6, 5, 7)
    local = _local_slice((2,) * world_size, rank)
    y = torch.randn(shape, generator=generator)[local].to(device)
    upstream = torch.randn(shape, generator=generator)[local].to(device)
    theirs = nn.SyncBatchNorm(6).to(device)
    with torch.no_grad():
        theirs.weight.copy_(torch.randn(6, generator=generator))
        theirs.bias.copy_(torch.randn(6, generator=generator))
    initial = {key: value.clone() for key, value in theirs.state_dict().items()}
    record = _run_norm("torch", theirs, lambda bn, y: bn(y), y, upstream)
    for backend in ["reference", *(["fused"] if fused else [])]:
        ours = SyncBatchNorm2d(6).to(device)
        ours.load_state_dict(initial)
        record |= _run_norm(backend, ours, lambda bn, y, b=backend: _sync_bn(b, y, bn, 1.0), y, upstream)
    return record


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU to run nn.SyncBatchNorm")
def test_matches_torch_sync_batch_norm_on_cuda(tmp_path: Path) -> None:
    pg_backend = "nccl" if torch.cuda.device_count() >= WORLD_SIZE else "gloo"  # gloo: two ranks, one GPU
    ranks = rank_results(
        spawn(_torch_sync_bn_scenario, tmp_path, pg_backend=pg_backend, fused=_fused_kernels_on("cuda"))
    )
    for rank, record in enumerate(ranks):
        for key, value in record.items():
            name, quantity = key.split("/")
            if name != "torch":
                torch.testing.assert_close(value, record[f"torch/{quantity}"], msg=f"rank {rank}: {key}")
