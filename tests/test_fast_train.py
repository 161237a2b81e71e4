"""The fast trainer (fastpix2pix.training.fast_trainer) against the reference trainer, on CPU; GPU tests skip
here."""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from tiny_run import assert_same
from tiny_run import tiny_options as shared_tiny_options

import fastpix2pix.ops.selfcheck as selfcheck
import fastpix2pix.training.fast_trainer as fast_trainer_module
from fastpix2pix._extension import extension_available
from fastpix2pix.data.sources.plan import DEFAULT_DEVICE_SHARE
from fastpix2pix.data.sources.streaming import StreamingDataset
from fastpix2pix.runs.checkpoint import checkpoint_path, load_checkpoint
from fastpix2pix.runs.networks import Networks, build_networks
from fastpix2pix.runs.options import TrainOptions, parse_options
from fastpix2pix.runs.visualize import read_loss_log
from fastpix2pix.training.fast_step import (
    LOSS_BUFFER_ROWS,
    EagerGraphRuntime,
    FastPathConfig,
    FastStep,
    build_fast_optimizers,
)
from fastpix2pix.training.fast_trainer import FastTrainer, use_fast_path
from fastpix2pix.training.graph_check import GraphCheck
from fastpix2pix.training.optim import (
    build_optimizers,
    build_scheduler,
    linear_lr_factor,
    load_portable_optimizer_state,
    portable_optimizer_state,
    use_device_lr,
)
from fastpix2pix.training.step import LOSS_NAMES, Objective, Optimizers, train_step
from fastpix2pix.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
NO_CUDA = "CUDA is not available on this machine"
BACKENDS = ["reference"] + (["fused"] if extension_available() else [])


def tiny_options(dataroot: Path, checkpoints: Path, **changes: object) -> TrainOptions:
    """The shared tiny run in batches of 2 (an epoch of the 4 pairs is 2 iterations), no sample pages."""
    return shared_tiny_options(dataroot, checkpoints, **({"display_freq": 1000, "batch_size": 2} | changes))


def cpu_config(**changes: object) -> FastPathConfig:
    return FastPathConfig.for_device(CPU, **changes)


def max_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa if sa[k].is_floating_point())


# --- comparing two trained states, and sabotaging one --------------------------------------------------


class Trained(NamedTuple):
    nets: Networks
    optimizers: Optimizers


@dataclasses.dataclass(frozen=True)
class Bound:
    """An element is off when ``|got - expected| > atol + rtol * max|expected|`` (the max over its tensor).
    At most ``share`` of the elements of one kind in one network may be off (0: none)."""

    rtol: float
    atol: float = 0.0
    share: float = 0.0


def _compared_tensors(
    got: Trained, expected: Trained
) -> Iterator[tuple[str, str, torch.Tensor, torch.Tensor]]:
    """(kind, name, got, expected): weights, BN buffers (statistics, counters), Adam's two moments."""
    for key, a, b in zip("GD", got.nets, expected.nets, strict=True):
        parameters = {name for name, _ in a.named_parameters()}
        sb = b.state_dict()
        for name, value in a.state_dict().items():
            yield ("weights" if name in parameters else "buffers"), f"{key}.{name}", value, sb[name]
    for key, a, b in zip("GD", got.optimizers, expected.optimizers, strict=True):
        params_a = [p for group in a.param_groups for p in group["params"]]
        params_b = [p for group in b.param_groups for p in group["params"]]
        for i, (p, q) in enumerate(zip(params_a, params_b, strict=True)):
            for kind in ("exp_avg", "exp_avg_sq"):
                yield kind, f"{key}.param{i}", a.state[p][kind], b.state[q][kind]


def training_mismatches(got: Trained, expected: Trained, bounds: dict[str, Bound]) -> list[str]:
    """What of ``got`` is outside ``bounds`` around ``expected`` (integer buffers must be equal), one line
    per tensor (or per kind and network, for a bound with a ``share``), each starting with the kind."""
    found = []
    off: dict[tuple[str, str], list[int]] = {}  # (kind, network) -> [elements off, elements]
    for kind, name, a, b in _compared_tensors(got, expected):
        if not b.is_floating_point():
            if not torch.equal(a, b):
                found.append(f"{kind} {name}: {a.tolist()} != {b.tolist()}")
            continue
        bound = bounds[kind]
        difference = (a.double() - b.double()).abs()
        limit = bound.atol + bound.rtol * float(b.double().abs().max())
        beyond = int((difference > limit).sum())
        count = off.setdefault((kind, name[0]), [0, 0])
        count[0] += beyond
        count[1] += difference.numel()
        if beyond and not bound.share:
            found.append(f"{kind} {name}: largest difference {float(difference.max()):.3g} > {limit:.3g}")
    for (kind, net), (beyond, total) in off.items():
        if bounds[kind].share and beyond > bounds[kind].share * total:
            found.append(
                f"{kind} of {net}: {beyond / total:.1%} of the elements off > {bounds[kind].share:.0%}"
            )
    return found


SABOTAGES = ("wrong_beta2", "wrong_eps", "skipped_bn_statistics")
# The kind of tensor each sabotage shows in first. Wrong beta2 (0.99): exp_avg_sq = (1 - beta2) g^2 is 10x
# too large from the first step on (the weights hardly move: Adam's bias correction cancels beta2 in its
# first update). Wrong eps (1e-7 for 1e-8): small-gradient updates shrink. No BN statistics update: the
# running mean and variance keep their initial 0 and 1.
SHOWN_IN = {"wrong_beta2": "exp_avg_sq", "wrong_eps": "weights", "skipped_bn_statistics": "buffers"}


def sabotage(trained: Trained, how: str | None) -> None:
    """Break one thing in a training setup (the comparisons must then report a mismatch)."""
    groups = [group for optimizer in trained.optimizers for group in optimizer.param_groups]
    if how == "wrong_beta2":
        for group in groups:
            group["betas"] = (group["betas"][0], 0.99)
    elif how == "wrong_eps":
        for group in groups:
            group["eps"] = 1e-7
    elif how == "skipped_bn_statistics":
        for module in (m for net in trained.nets for m in net.modules()):
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: never updated
    elif how is not None:
        raise ValueError(how)


def check_against(got: Trained, expected: Trained, bounds: dict[str, Bound], sabotaged: str | None) -> None:
    mismatches = training_mismatches(got, expected, bounds)
    if sabotaged is None:
        assert mismatches == []
    else:  # the comparison catches the sabotage, in the tensors it shows in
        assert any(m.startswith(SHOWN_IN[sabotaged]) for m in mismatches), mismatches


# --- the fast step against train_step ----------------------------------------------------------------

# fp32, 3 iterations, the fast step (channels_last, fused Adam, device data) against train_step (NCHW,
# build_optimizers). Measured, as a fraction of each tensor's largest magnitude, worst tensor, tiny ResNet,
# both backends: NCHW bit-identical (0 everywhere); channels_last, where oneDNN's NHWC convolutions round
# differently, weights 1.0e-5 (a few ulp of a small BN bias; 1 ulp of a BN weight near 1 is 1.2e-7), BN
# statistics 1.1e-6, Adam moments 1.7e-5 (exp_avg) and 1.2e-5 (exp_avg_sq). The bounds are 4-6x those.
# One Adam step moves every weight by ~lr, ~1e-2 of a conv tensor's largest magnitude, so a wrong update
# lands far outside them (measured: wrong eps 8e-4 to 2.2e-3 in the weights, wrong beta2 9 in exp_avg_sq,
# skipped BN statistics 1.6 in the running variance). The previous bound, 2 lr per step on the weights,
# could not fail: even a wrong update moves a weight by at most ~lr per step.
FP32_BOUNDS = {
    "weights": Bound(5e-5),
    "buffers": Bound(5e-6),
    "exp_avg": Bound(1e-4),
    "exp_avg_sq": Bound(5e-5),
}


@pytest.mark.parametrize("sabotaged", [None, *SABOTAGES])
@pytest.mark.parametrize(("backend", "channels_last"), [(b, cl) for b in BACKENDS for cl in (True, False)])
def test_fast_trainer_iterations_equal_reference_train_step(
    tiny_data: Path, tmp_path: Path, backend: str, channels_last: bool, sabotaged: str | None
) -> None:
    """N iterations of the fast trainer's step (device data, fused Adam, no graph) equal train_step with
    the plain trainer's Adam on the same batches and the same dropout draws, to fp32 rounding; a sabotaged
    fast trainer does not.

    Dropout is live only with NCHW: bernoulli_ fills a channels_last tensor in memory order, so the same
    generator state gives the same mask *distribution* but a permuted mask; with channels_last the
    comparison runs without dropout."""
    opt = tiny_options(tiny_data, tmp_path, backend=backend, no_dropout=channels_last)
    config = cpu_config(loss_readback_every=8, channels_last=channels_last)
    fast = FastTrainer(opt, config, progress_bar=False)
    nets = Networks(copy.deepcopy(fast.nets.G), copy.deepcopy(fast.nets.D))
    nets = Networks(*(n.to(memory_format=torch.contiguous_format) for n in nets))
    plain = build_optimizers(nets, fast.opt)
    sabotage(Trained(fast.nets, fast.optimizers), sabotaged)
    step = fast._ensure_step()
    fast.data.start_epoch(1)
    for i in range(3):
        torch.manual_seed(100 + i)  # the same dropout masks in both
        step()
        batch = {"A": fast.data.A.contiguous().clone(), "B": fast.data.B.contiguous().clone()}
        torch.manual_seed(100 + i)
        train_step(nets, plain, batch, fast.objective)
    check_against(Trained(fast.nets, fast.optimizers), Trained(nets, plain), FP32_BOUNDS, sabotaged)
    losses = step.take_losses()
    assert losses.shape == (3, 4) and torch.isfinite(losses).all()


def test_losses_are_recorded_on_the_device_per_iteration(tiny_data: Path, tmp_path: Path) -> None:
    fast = FastTrainer(
        tiny_options(tiny_data, tmp_path), cpu_config(loss_readback_every=2), progress_bar=False
    )
    step = fast._ensure_step()
    step()
    step()
    with pytest.raises(RuntimeError, match="loss buffer is full"):
        step()
    rows = step.take_losses()
    assert rows.shape == (2, 4) and not torch.equal(rows[0], rows[1])
    assert step.pending == 0 and int(step.slot) == 0


# --- bf16 ---------------------------------------------------------------------------------------------


def small_nets(backend: str, seed: int = 0) -> Networks:
    opt = tiny_options(Path("."), Path("."), backend=backend, netG="unet_128", ngf=4, ndf=4, no_dropout=True)
    torch.manual_seed(seed)
    return build_networks(opt, backend, CPU)


@pytest.mark.skipif(not extension_available(), reason="the fused library is not built")
def test_autocast_fused_and_reference_agree_in_bf16() -> None:
    ref = small_nets("reference")
    fused = copy.deepcopy(ref)
    for net in fused:
        net.set_backend("fused")
    x = torch.randn(2, 3, 128, 128)
    outputs, grads = [], []
    for nets in (ref, fused):
        with torch.autocast("cpu", torch.bfloat16):
            y = nets.G(x)
        assert y.dtype == torch.bfloat16
        y.float().square().mean().backward()
        outputs.append(y.float())
        grads.append([p.grad for p in nets.G.parameters()])
    err = (outputs[0] - outputs[1]).norm() / outputs[0].norm()
    assert err < 2e-2
    for g_ref, g_fused in zip(*grads, strict=True):
        assert g_ref.dtype == torch.float32 and g_fused.dtype == torch.float32
    flat = [torch.cat([g.flatten() for g in gs]) for gs in grads]
    assert (flat[0] - flat[1]).norm() / flat[0].norm() < 5e-2
    for net in ref:  # BN parameters and running statistics stay float32
        assert all(t.dtype in (torch.float32, torch.int64) for t in net.state_dict().values())


class FixedBatch:
    """A batch source that always gives the same batch (made inside the graph, nothing to save)."""

    in_graph = True
    fixed_shape = True

    def __init__(self, A: torch.Tensor, B: torch.Tensor) -> None:
        self.A, self.B = A, B

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.A, self.B

    def generators(self) -> tuple[torch.Generator, ...]:
        return ()

    def state_dict(self) -> dict[str, object]:
        return {}

    def load_state_dict(self, state: object) -> None:
        pass


# bf16 against fp32, one step from the same weights on the same batch. Adam's first update is
# ~lr * sign(grad), and bf16 gradients differ from fp32 ones by ~30% in norm on this random batch (the L1
# term's sign flips wherever the bf16 output rounds across the target), so the weights compare by how
# many updates differ: measured 4.3% (G) and 3.1% (D) of the weights move by more than lr away from
# fp32's, both backends; a wrong or missing update moves nearly all. Per tensor, as a fraction of its
# largest magnitude: BN statistics 8e-3, Adam moments 0.44 (exp_avg) and 0.54 (exp_avg_sq). The bounds are
# 2-4x those. (The old bound, 2.5 lr on the weights after one step, held for any update.) A wrong eps (1e-7
# for 1e-8) hides in bf16's own gradient noise here: the fp32 test above is the one that catches it.
BF16_SABOTAGES = ("wrong_beta2", "skipped_bn_statistics")


def bf16_bounds(lr: float) -> dict[str, Bound]:
    return {
        "weights": Bound(0.0, atol=lr, share=0.1),
        "buffers": Bound(0.03),
        "exp_avg": Bound(1.0),
        "exp_avg_sq": Bound(1.5),
    }


@pytest.mark.parametrize("sabotaged", [None, *BF16_SABOTAGES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_step_runs_and_stays_close_to_fp32(backend: str, sabotaged: str | None) -> None:
    nets32 = small_nets(backend)
    nets16 = copy.deepcopy(nets32)
    opt = tiny_options(Path("."), Path("."))
    objective = Objective("vanilla", 100.0, backend)
    torch.manual_seed(1)
    source = FixedBatch(torch.rand(2, 3, 128, 128) * 2 - 1, torch.rand(2, 3, 128, 128) * 2 - 1)
    losses, trained = [], []
    for nets, bf16 in ((nets32, False), (nets16, True)):
        optimizers = build_fast_optimizers(nets, opt, cpu_config())
        trained.append(Trained(nets, optimizers))
        if bf16:
            sabotage(trained[-1], sabotaged)
        step = FastStep(nets, optimizers, objective, source, bf16=bf16, loss_rows=1)
        step()
        losses.append(step.take_losses()[0])
    assert torch.isfinite(losses[1]).all()
    assert torch.allclose(losses[0], losses[1], rtol=5e-2, atol=5e-2)
    assert all(p.dtype == torch.float32 for n in nets16 for p in n.parameters())
    check_against(trained[1], trained[0], bf16_bounds(opt.lr), sabotaged)


def test_fast_step_takes_a_batch_function() -> None:
    """A plain function that returns static buffers still works as the source (benchmarks use it)."""
    nets = small_nets("reference")
    batch = (torch.rand(1, 3, 128, 128) * 2 - 1, torch.rand(1, 3, 128, 128) * 2 - 1)
    step = FastStep(nets, build_fast_optimizers(nets, tiny_options(Path("."), Path(".")), cpu_config()),
                    Objective(backend="reference"), lambda: batch, bf16=False, loss_rows=1)  # fmt: skip
    step()
    assert step.take_losses().shape == (1, 4)


# --- lr schedule, checkpoints ----------------------------------------------------------------------------


def official_linear_lr(opt: TrainOptions, epoch: int) -> float:
    return opt.lr * (1.0 - max(0, epoch + opt.epoch_count - opt.n_epochs) / float(opt.n_epochs_decay + 1))


def test_lr_tensor_follows_the_official_linear_schedule() -> None:
    opt = tiny_options(Path("."), Path("."), n_epochs=3, n_epochs_decay=4, epoch_count=1)
    param = torch.nn.Parameter(torch.zeros(2))
    # fused Adam on CPU takes a tensor lr as the CUDA path does (foreach refuses one without capturable).
    optimizer = torch.optim.Adam([param], lr=opt.lr, betas=(opt.beta1, 0.999), fused=True)
    scheduler = build_scheduler(optimizer, opt)
    use_device_lr(optimizer)
    lr = optimizer.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor)
    for epoch in range(opt.n_epochs + opt.n_epochs_decay):
        assert optimizer.param_groups[0]["lr"] is lr  # filled in place: a graph keeps reading it
        assert float(lr) == pytest.approx(official_linear_lr(opt, epoch), rel=1e-6)
        assert float(lr) == pytest.approx(opt.lr * linear_lr_factor(epoch, opt), rel=1e-6)
        param.grad = torch.ones(2)
        optimizer.step()
        scheduler.step()


def test_portable_optimizer_state_round_trip() -> None:
    param = torch.nn.Parameter(torch.randn(3))
    fast = torch.optim.Adam([param], lr=2e-4, fused=True)
    use_device_lr(fast)
    param.grad = torch.randn(3)
    fast.step()
    portable = portable_optimizer_state(fast.state_dict())
    group = portable["param_groups"][0]
    assert isinstance(group["lr"], float) and group["fused"] is None and group["capturable"] is False
    plain_param = torch.nn.Parameter(param.detach().clone())
    plain = torch.optim.Adam([plain_param], lr=1.0)
    plain.load_state_dict(portable)
    assert plain.param_groups[0]["lr"] == pytest.approx(2e-4)
    other = torch.optim.Adam([torch.nn.Parameter(param.detach().clone())], lr=1.0, fused=True)
    use_device_lr(other)
    lr = other.param_groups[0]["lr"]
    load_portable_optimizer_state(other, plain.state_dict())
    assert other.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(2e-4)
    assert other.param_groups[0]["fused"] is True


def test_checkpoints_continue_across_trainers(tiny_data: Path, tmp_path: Path) -> None:
    """A fast run is continued by the plain trainer, and a plain run by the fast trainer."""
    opt = tiny_options(tiny_data, tmp_path, max_iters=1)
    FastTrainer(opt, cpu_config(), progress_bar=False).fit()
    plain = Trainer(dataclasses.replace(opt, max_iters=2, continue_train=True), progress_bar=False)
    assert plain.state.iteration == 1
    plain.fit()
    assert plain.state.iteration == 2
    fast = FastTrainer(dataclasses.replace(opt, max_iters=3, continue_train=True), cpu_config(),
                       progress_bar=False)  # fmt: skip
    assert fast.state.iteration == 2
    fast.fit()
    assert fast.state.iteration == 3
    assert isinstance(fast.optimizers.G, torch.optim.Adam) and fast.optimizers.G.param_groups[0]["fused"]


def test_plain_checkpoint_loads_moments_in_the_parameters_layout(tiny_data: Path, tmp_path: Path) -> None:
    """CUDA fused Adam needs params, grads and moments in one layout: a plain (NCHW) checkpoint's moments
    are converted to the fast trainer's channels_last weights when loaded."""
    opt = tiny_options(tiny_data, tmp_path, max_iters=1)
    Trainer(opt, progress_bar=False).fit()
    config = cpu_config(channels_last=True)  # the CUDA layout (the CPU default is NCHW)
    fast = FastTrainer(dataclasses.replace(opt, continue_train=True), config, progress_bar=False)
    converted = 0
    for optimizer in fast.optimizers:
        for param in (p for group in optimizer.param_groups for p in group["params"]):
            for key in ("exp_avg", "exp_avg_sq"):
                moment = optimizer.state[param][key]
                assert moment.stride() == param.stride(), key
                assert moment.dtype == param.dtype and moment.device == param.device
            converted += param.dim() == 4 and not param.is_contiguous()
    assert converted  # channels_last weights were there to convert to


def test_wrapped_last_batch_counts_real_samples(tiny_data: Path, tmp_path: Path) -> None:
    """4 images in batches of 3: the fast trainer's second batch repeats 2 images to keep its shape, yet
    both trainers count 4 images per epoch, and log at the same image counts."""
    opt = tiny_options(tiny_data, tmp_path, batch_size=3, print_freq=1, save_epoch_freq=0)
    plain = Trainer(dataclasses.replace(opt, name="plain"), progress_bar=False)
    plain.fit()
    fast = FastTrainer(dataclasses.replace(opt, name="fast"), cpu_config(loss_readback_every=1),
                       progress_bar=False)  # fmt: skip
    fast.fit()
    assert plain.state.images == fast.state.images == 8  # 2 epochs of 4 images
    assert plain.state.iteration == fast.state.iteration == 4
    records = [read_loss_log(t.run_dir / "loss_log.jsonl") for t in (plain, fast)]
    assert [r["images"] for r in records[0]] == [r["images"] for r in records[1]] == [3, 4, 7, 8]
    assert [r["epoch_iter"] for r in records[1]] == [3, 4, 3, 4]


@pytest.mark.parametrize("device_data", ["device", "stream"])
@pytest.mark.parametrize("stop_at", [3, 5])  # mid-epoch in the first and in the second epoch
def test_fast_path_resume_is_bit_exact(
    tiny_data: Path, tmp_path: Path, stop_at: int, device_data: str
) -> None:
    """The data source's position and augmentation generator are in the checkpoint: a mid-epoch resume
    continues the crops and flips instead of replaying the epoch's first ones."""
    total = 7

    def run(name: str, max_iters: int, resume: bool = False) -> FastTrainer:
        opt = tiny_options(tiny_data, tmp_path, name=name, batch_size=1, max_iters=max_iters,
                           continue_train=resume, device_data=device_data)  # fmt: skip
        trainer = FastTrainer(opt, cpu_config(), progress_bar=False)
        trainer.fit()
        return trainer

    straight = run("straight", total)
    run("resumed", stop_at)
    saved = load_checkpoint(checkpoint_path(tmp_path / "resumed", "latest"))
    assert 0 < saved["epoch_iter"] < 4 and saved["data_source"]["position"] == saved["epoch_iter"]
    resumed = run("resumed", total, resume=True)
    a, b = (load_checkpoint(checkpoint_path(t.run_dir, "latest")) for t in (straight, resumed))
    for key in ("G", "D", "optimizer_G", "optimizer_D", "epoch", "epoch_iter", "iteration", "data_source"):
        assert_same(a[key], b[key], key)
    assert_same(a["rng"]["torch"], b["rng"]["torch"], "rng")


def test_device_data_options_reach_the_planner(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:

    opt = parse_options(TrainOptions, ["--device_data", "stream", "--device_data_share", "0.25"])
    assert (opt.device_data, opt.device_data_share) == ("stream", 0.25)
    assert TrainOptions().device_data_share == DEFAULT_DEVICE_SHARE
    calls, plan = [], fast_trainer_module.plan_batch_source

    def recorded(*args: object, **kwargs: object) -> object:
        calls.append(kwargs)
        return plan(*args, **kwargs)

    monkeypatch.setattr(fast_trainer_module, "plan_batch_source", recorded)
    options = tiny_options(tiny_data, tmp_path, device_data="stream", device_data_share=0.25)
    trainer = FastTrainer(options, cpu_config(), progress_bar=False)
    assert calls[0]["policy"] == "stream" and calls[0]["max_share"] == 0.25
    assert isinstance(trainer.data, StreamingDataset)
    assert "data: 4 pairs streamed" in (trainer.run_dir / "log.txt").read_text()  # the planner's line


# --- the capture path, on the CPU (EagerGraphRuntime stands in for CUDA graphs) ---------------------------


def graphed_trainer(opt: TrainOptions, **changes: object) -> FastTrainer:
    """A FastTrainer whose step goes through FastStep.capture, with replays run eagerly on the CPU (what a
    correct CUDA graph computes): the capture's bookkeeping is then exactly testable. No graph check
    (it needs CUDA) unless ``verify_graph`` is passed."""
    changes = {"loss_readback_every": 8, "verify_graph": False} | changes
    trainer = FastTrainer(opt, cpu_config(**changes), progress_bar=False)
    trainer.config = dataclasses.replace(trainer.config, cuda_graph=True)
    trainer.graph_runtime = EagerGraphRuntime()
    return trainer


@pytest.mark.parametrize("loss_rows", [1, 2])
def test_capture_warm_up_stays_inside_a_small_loss_buffer(
    tiny_data: Path, tmp_path: Path, loss_rows: int
) -> None:
    """The 3 warm-up iterations used to write loss rows 0, 1, 2: past a 1- or 2-row buffer (an IndexError
    on the CPU, a device-side assert that kills the CUDA context on a GPU)."""
    trainer = graphed_trainer(tiny_options(tiny_data, tmp_path), loss_readback_every=loss_rows)
    step = trainer._ensure_step()
    assert step.graph is not None and step.pending == 0 and int(step.slot) == 0
    trainer.data.start_epoch(1)
    for _ in range(loss_rows):
        step()
    assert step.take_losses().shape == (loss_rows, 4)


def trained_state(trainer: FastTrainer, optimizers: bool = True) -> dict[str, object]:
    state = {
        "nets": [net.state_dict() for net in trainer.nets],
        "torch_rng": torch.get_rng_state(),
        "data": trainer.data.state_dict(),
    }
    if optimizers:
        state["optimizers"] = [portable_optimizer_state(o.state_dict()) for o in trainer.optimizers]
    return state


def run_iterations(trainer: FastTrainer, count: int) -> dict[str, object]:
    step = trainer._ensure_step()
    trainer.data.start_epoch(1, order=trainer.sampler.order(1))
    for _ in range(count):
        step()
    losses = step.take_losses()
    return trained_state(trainer) | {"losses": losses}


@pytest.mark.parametrize("device_data", ["device", "stream"])
def test_capture_leaves_no_trace(tiny_data: Path, tmp_path: Path, device_data: str) -> None:
    """Captured and replayed iterations equal eager ones bit for bit, dropout live: the capture's warm-up
    advanced the dropout generator (and the source's) and nothing undid it. With the streaming source
    the batch is made eagerly before each replay, into the buffers the graph reads."""
    opt = tiny_options(tiny_data, tmp_path, device_data=device_data, batch_size=3)
    eager = FastTrainer(dataclasses.replace(opt, name="eager"), cpu_config(loss_readback_every=8),
                        progress_bar=False)  # fmt: skip
    graphed = graphed_trainer(dataclasses.replace(opt, name="graphed"))
    before = trained_state(graphed, optimizers=False)  # dropout draws from the global CPU generator
    graphed._ensure_step()
    assert graphed.step is not None and graphed.step.graph is not None
    # (Adam's state now exists, as zeros: the graph holds its addresses; compared after the iterations.)
    assert_same(trained_state(graphed, optimizers=False), before, "capture")
    replayed = run_iterations(graphed, 3)
    torch.set_rng_state(before["torch_rng"])  # the two trainers share the global generator
    assert_same(replayed, run_iterations(eager, 3), "after 3 iterations")
    assert isinstance(graphed.data, StreamingDataset) == (device_data == "stream")


class CountingSource:
    """Wraps a batch source: counts next_batch calls; ``replace_buffers`` makes it allocate new A/B."""

    def __init__(self, source: object, replace_buffers: bool = False) -> None:
        self.source, self.calls, self.replace_buffers = source, 0, replace_buffers

    def __getattr__(self, name: str) -> object:
        return getattr(self.source, name)

    @property
    def A(self) -> torch.Tensor:
        return self.source.A

    @property
    def B(self) -> torch.Tensor:
        return self.source.B

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        A, B = self.source.next_batch()
        if self.replace_buffers:
            self.source.A, self.source.B = A.clone(), B.clone()
        return self.A, self.B


def test_eager_source_is_fetched_once_per_replay(tiny_data: Path, tmp_path: Path) -> None:
    trainer = graphed_trainer(tiny_options(tiny_data, tmp_path, device_data="stream"))
    trainer.data = CountingSource(trainer.data)
    step = trainer._ensure_step()
    trainer.data.start_epoch(1)
    trainer.data.calls = 0
    for _ in range(2):
        step()
    assert trainer.data.calls == 2


def test_eager_source_that_replaces_its_buffers_is_refused(tiny_data: Path, tmp_path: Path) -> None:
    trainer = graphed_trainer(tiny_options(tiny_data, tmp_path, device_data="stream"))
    step = trainer._ensure_step()
    trainer.data.start_epoch(1)
    step.source = CountingSource(trainer.data, replace_buffers=True)
    with pytest.raises(RuntimeError, match="replaced its A/B buffers"):
        step()


def test_batches_of_changing_shape_run_without_a_graph(tmp_path: Path) -> None:
    """--preprocess none on images of two sizes: the streaming source's batches change shape, so the
    step runs eagerly (and says so) instead of capturing."""
    from fastpix2pix.data import generate_synthetic_facades

    root = tmp_path / "mixed"
    for size, seed in ((32, 0), (64, 1)):
        part = generate_synthetic_facades(tmp_path / f"part{size}", n_train=1, n_test=1, size=size, seed=seed)
        for split in ("train", "test"):
            (root / split).mkdir(parents=True, exist_ok=True)
            for image in (part / split).iterdir():
                image.rename(root / split / f"{size}_{image.name}")
    opt = tiny_options(root, tmp_path, preprocess="none", batch_size=1, max_iters=2, save_epoch_freq=0)
    trainer = graphed_trainer(opt)
    assert not trainer.data.fixed_shape
    trainer.fit()
    assert trainer.step is not None and trainer.step.graph is None and trainer.state.iteration == 2
    log = (trainer.run_dir / "log.txt").read_text()
    assert "training without a CUDA graph" in log and "data:" in log


def test_the_training_page_shows_each_replay_after_the_graph_check(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the start-up graph check, the page shows the graph's own output: replays rewrite it in place
    (the stand-in replays the recorded ops, as a CUDA graph replays its kernels, without the step's Python).
    The check's eager iterations used to leave ``fake_B`` pointing at their own tensor: one frozen image."""
    monkeypatch.setattr(selfcheck, "_enabled", True)
    trainer = graphed_trainer(tiny_options(tiny_data, tmp_path), verify_graph=True)
    step = trainer._ensure_step()
    assert step.graph is not None  # the check passed
    trainer.data.start_epoch(1, order=trainer.sampler.order(1))
    shown = []
    for _ in range(3):
        step()
        shown.append(step.fake_B.clone())
    assert not torch.equal(shown[0], shown[1]) and not torch.equal(shown[1], shown[2])
    # The image is the replay's: an eager iteration from the same state (weights, data, dropout) draws it.
    weights, data, dropout = step._snapshot(), step.source.state_dict(), torch.get_rng_state()
    augmentation = [g.get_state() for g in step.source.generators()]
    step.iteration()
    eager = step._eager_fake_B.clone()
    step._restore(weights)
    step.source.load_state_dict(data)
    torch.set_rng_state(dropout)
    for generator, state in zip(step.source.generators(), augmentation, strict=True):
        generator.set_state(state)
    step()
    torch.testing.assert_close(step.fake_B, eager, rtol=0, atol=0)


def test_a_large_print_freq_keeps_the_loss_buffer_small(tiny_data: Path, tmp_path: Path) -> None:
    """``--print_freq 1000000000`` once sized the device loss buffer at one row per iteration of the
    logging period (16 GB). Rows now move to the loss window whenever the buffer fills: training is the
    same, and every epoch still logs its losses."""
    opt = tiny_options(tiny_data, tmp_path, max_iters=6)
    rare = FastTrainer(
        dataclasses.replace(opt, name="rare", print_freq=10**9), cpu_config(), progress_bar=False
    )
    assert rare.readback_every >= 10**8  # the logging period itself is kept
    rare.fit()
    assert rare.step is not None and rare.step.losses.shape[0] <= LOSS_BUFFER_ROWS
    frequent = FastTrainer(dataclasses.replace(opt, name="frequent"), cpu_config(), progress_bar=False)
    frequent.fit()
    for ours, theirs in zip(rare.nets, frequent.nets, strict=True):
        assert_same(ours.state_dict(), theirs.state_dict(), "weights")
    records = read_loss_log(rare.run_dir / "loss_log.jsonl")
    assert [r["epoch"] for r in records] == [1, 2]  # the epoch ends read the losses back
    assert all(math.isfinite(r[name]) for r in records for name in LOSS_NAMES)


def test_the_start_up_is_timed_apart_from_the_iterations(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The capture (its warm-up and cuDNN autotuning) and the checks once landed in the first logged
    ``time:``; they now have a line of their own, and the iteration times exclude them."""
    real_capture = FastStep.capture

    def slow_capture(step: FastStep, *args: object, **kwargs: object) -> None:
        time.sleep(1.0)  # a long autotuning
        real_capture(step, *args, **kwargs)

    monkeypatch.setattr(FastStep, "capture", slow_capture)
    trainer = graphed_trainer(tiny_options(tiny_data, tmp_path, max_iters=2), loss_readback_every=1)
    trainer.fit()
    startup = [line for line in (trainer.run_dir / "log.txt").read_text().splitlines() if "start-up" in line]
    assert len(startup) == 1 and "capture (warm-up, autotuning) 1." in startup[0], startup
    first = read_loss_log(trainer.run_dir / "loss_log.jsonl")[0]
    assert first["time_per_iter"] < 0.5, first


def test_graph_check_failure_trains_eagerly(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hook after capture: a failed check (here a stand-in for verify_captured_step, which needs
    CUDA) drops the graph, says why in one line, and training goes on eagerly."""
    checked = []

    def failing_check(step: FastStep) -> GraphCheck:
        checked.append(step)
        return GraphCheck(error=0.9, worst="G.stem.conv.weight", noise=0.0, tolerance=0.05)

    monkeypatch.setattr(fast_trainer_module, "verify_captured_step", failing_check)
    monkeypatch.setattr(selfcheck, "_enabled", True)
    trainer = graphed_trainer(tiny_options(tiny_data, tmp_path, max_iters=2), verify_graph=True)
    trainer.fit()
    assert len(checked) == 1 and checked[0] is trainer.step
    assert trainer.step.graph is None and trainer.state.iteration == 2
    lines = [line for line in (trainer.run_dir / "log.txt").read_text().splitlines() if "graph check" in line]
    assert len(lines) == 1
    assert "CUDA graph check failed (replay vs eager: G.stem.conv.weight" in lines[0]
    assert lines[0].endswith("; training eagerly")


def test_no_self_check_skips_the_graph_check(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def must_not_run(step: FastStep) -> None:
        raise AssertionError("the graph check ran despite --no_self_check")

    monkeypatch.setattr(fast_trainer_module, "verify_captured_step", must_not_run)
    monkeypatch.setattr(selfcheck, "_enabled", True)  # restored after the test: the trainer switches it off
    trainer = graphed_trainer(tiny_options(tiny_data, tmp_path, no_self_check=True), verify_graph=True)
    assert not trainer.config.verify_graph and not selfcheck.self_check_enabled()
    step = trainer._ensure_step()
    assert step.graph is not None


# --- GPU only ------------------------------------------------------------------------------------------


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)


def _cuda_trainer(tiny_data: Path, tmp_path: Path, graph: bool) -> FastTrainer:
    opt = tiny_options(tiny_data, tmp_path / str(graph), device="cuda", no_dropout=True, deterministic=False,
                       backend="fused" if extension_available() else "reference")  # fmt: skip
    config = FastPathConfig.for_device("cuda", cuda_graph=graph, bf16=False, loss_readback_every=8)
    return FastTrainer(opt, config, progress_bar=False)


@needs_cuda
def test_graph_replay_equals_eager_iterations(tiny_data: Path, tmp_path: Path) -> None:
    trainers = [_cuda_trainer(tiny_data, tmp_path, graph) for graph in (False, True)]
    trainers[1].nets.G.load_state_dict(trainers[0].nets.G.state_dict())
    trainers[1].nets.D.load_state_dict(trainers[0].nets.D.state_dict())
    losses = []
    for trainer in trainers:
        step = trainer._ensure_step()
        trainer.data.start_epoch(1)
        for _ in range(5):
            step()
        losses.append(step.take_losses().cpu())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-3, atol=1e-4)
    assert max_difference(trainers[0].nets.G, trainers[1].nets.G) < 1e-3
    assert max_difference(trainers[0].nets.D, trainers[1].nets.D) < 1e-3


@needs_cuda
def test_no_host_sync_inside_the_loop(tiny_data: Path, tmp_path: Path) -> None:
    trainer = _cuda_trainer(tiny_data, tmp_path, graph=True)
    step = trainer._ensure_step()
    trainer.data.start_epoch(1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            step()
        rows = step.take_losses()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(rows.cpu()).all()


def test_fast_path_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert not use_fast_path(TrainOptions(device="cpu"))  # auto: CUDA only
    assert use_fast_path(TrainOptions(device="cpu", fast_path="on"))
    assert not use_fast_path(TrainOptions(device="auto", fast_path="off"))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert not use_fast_path(TrainOptions(device="cpu"))
    with pytest.raises(ValueError, match="does not run under torchrun"):
        FastTrainer(TrainOptions(device="cpu", fast_path="on"))
