"""The fast trainer (fastpix2pix.fast_train) against the reference trainer, on CPU; GPU tests skip here."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from tiny_run import tiny_options as shared_tiny_options

from fastpix2pix.backend import extension_available
from fastpix2pix.fast_train import (
    FastPathConfig,
    FastStep,
    FastTrainer,
    build_fast_optimizers,
    load_portable_optimizer_state,
    portable_optimizer_state,
    use_device_lr,
    use_fast_path,
)
from fastpix2pix.options import TrainOptions
from fastpix2pix.train import (
    Networks,
    Objective,
    Trainer,
    build_networks,
    build_optimizers,
    build_scheduler,
    linear_lr_factor,
    train_step,
)

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


# --- the fast step against train_step ----------------------------------------------------------------


@pytest.mark.parametrize(("backend", "channels_last"), [(b, cl) for b in BACKENDS for cl in (True, False)])
def test_fast_trainer_iterations_equal_reference_train_step(
    tiny_data: Path, tmp_path: Path, backend: str, channels_last: bool
) -> None:
    """N iterations of the fast trainer's step (device data, foreach Adam, no graph) equal train_step with
    the plain trainer's Adam on the same batches and the same dropout draws.

    Dropout is live only with NCHW: bernoulli_ fills a channels_last tensor in memory order, so the same
    generator state gives the same mask *distribution* but a permuted mask; with channels_last the
    comparison runs without dropout."""
    opt = tiny_options(tiny_data, tmp_path, backend=backend, no_dropout=channels_last)
    config = cpu_config(loss_readback_every=8, channels_last=channels_last)
    fast = FastTrainer(opt, config, progress_bar=False)
    nets = Networks(copy.deepcopy(fast.nets.G), copy.deepcopy(fast.nets.D))
    nets = Networks(*(n.to(memory_format=torch.contiguous_format) for n in nets))
    plain = build_optimizers(nets, fast.opt)
    step = fast._ensure_step()
    fast.data.start_epoch(1)
    for i in range(3):
        torch.manual_seed(100 + i)  # the same dropout masks in both
        step()
        batch = {"A": fast.data.A.contiguous().clone(), "B": fast.data.B.contiguous().clone()}
        torch.manual_seed(100 + i)
        train_step(nets, plain, batch, fast.objective)
    # Same arithmetic up to the conv algorithm (NHWC vs NCHW in oneDNN) and foreach vs for-loop Adam:
    # fp32 rounding. Adam's first steps move a weight by ~lr * sign(grad), so a gradient element that is
    # rounding noise can flip an update: such weights may differ by up to 2 * lr per step (3 steps:
    # 1.2e-3). Everything else (and all BN statistics) agrees to fp32 rounding.
    bound = 1e-5 if not channels_last else 2 * opt.lr * 3
    assert max_difference(fast.nets.G, nets.G) <= bound
    assert max_difference(fast.nets.D, nets.D) <= bound
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_step_runs_and_stays_close_to_fp32(backend: str) -> None:
    nets32 = small_nets(backend)
    nets16 = copy.deepcopy(nets32)
    opt = tiny_options(Path("."), Path("."))
    objective = Objective("vanilla", 100.0, backend)
    torch.manual_seed(1)
    batch = (torch.rand(2, 3, 128, 128) * 2 - 1, torch.rand(2, 3, 128, 128) * 2 - 1)
    losses = []
    for nets, bf16 in ((nets32, False), (nets16, True)):
        step = FastStep(nets, build_fast_optimizers(nets, opt, cpu_config()), objective, lambda: batch,
                        bf16=bf16, loss_rows=1)  # fmt: skip
        step()
        losses.append(step.take_losses()[0])
    assert torch.isfinite(losses[1]).all()
    assert torch.allclose(losses[0], losses[1], rtol=5e-2, atol=5e-2)
    assert all(p.dtype == torch.float32 for n in nets16 for p in n.parameters())
    # One Adam step moves each weight by ~lr: bf16 changes its direction only where grads are tiny.
    assert max_difference(nets32.G, nets16.G) <= 2.5 * opt.lr


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
    assert isinstance(fast.optimizers.G, torch.optim.Adam) and fast.optimizers.G.param_groups[0]["foreach"]


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
