"""The CPU training defaults (chosen by ``benchmarks/bench_train.py``): same function, portable checkpoints.

The plain trainer's Adam is the fused implementation on CPU; the fast path's CPU configuration is fused
Adam in NCHW. What is asserted here is the function (the same updates as torch's default Adam, to float32
rounding) and the checkpoint format (the default flags recorded, the fused implementation kept on load);
the speed is claimed only from the benchmark's JSON.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from tiny_run import tiny_options

from fastpix2pix.runs.networks import build_networks
from fastpix2pix.runs.options import TrainOptions
from fastpix2pix.training.fast_step import FastPathConfig, build_fast_optimizers
from fastpix2pix.training.optim import build_optimizers
from fastpix2pix.training.step import Objective, Optimizers, train_step
from fastpix2pix.training.trainer import Trainer

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")


def small_nets(seed: int = 0):
    opt = TrainOptions(netG="unet_128", ngf=4, ndf=4)
    torch.manual_seed(seed)
    return opt, build_networks(opt, "reference", CPU)


def test_plain_trainer_uses_fused_adam_on_cpu() -> None:
    opt, nets = small_nets()
    for optimizer in build_optimizers(nets, opt):
        group = optimizer.param_groups[0]
        assert group["fused"] is True and not group["foreach"] and not group["capturable"]
        assert group["lr"] == opt.lr and group["betas"] == (opt.beta1, 0.999)


def test_fused_adam_trains_like_torch_default_adam() -> None:
    """Three train_steps with the CPU default and with torch's default Adam (for-loop on CPU), same batches
    and dropout masks: the same weights, moments and BatchNorm statistics to float32 rounding.

    The bounds are those of the fast-trainer comparison (tests/test_fast_train.py, FP32_BOUNDS), as a
    fraction of each tensor's largest magnitude. Measured here: weights 1.1e-5 (one weight of the innermost
    up-convolution, whose first step, ~lr * grad / (|grad| + eps), rounds differently when |grad| is near
    eps). One Adam step moves a weight by ~lr (2e-4, ~3e-3 of a conv tensor's largest magnitude), so a
    wrong update (betas, eps, bias correction) lands far outside them."""
    opt, nets = small_nets()
    twin = copy.deepcopy(nets)
    fused = build_optimizers(nets, opt)
    default = Optimizers(
        *(torch.optim.Adam(n.parameters(), lr=opt.lr, betas=(opt.beta1, 0.999)) for n in twin)
    )
    assert default.G.param_groups[0]["fused"] is None and not default.G.param_groups[0]["foreach"]
    objective = Objective(backend="reference")
    gen = torch.Generator().manual_seed(1)
    for i in range(3):
        batch = {k: torch.rand(2, 3, 128, 128, generator=gen) * 2 - 1 for k in "AB"}
        torch.manual_seed(10 + i)
        train_step(nets, fused, batch, objective)
        torch.manual_seed(10 + i)
        train_step(twin, default, batch, objective)
    for ours, theirs in zip(nets, twin, strict=True):
        expected = theirs.state_dict()
        for name, tensor in ours.state_dict().items():
            bound = 5e-5 if name.endswith(("weight", "bias")) else 5e-6  # buffers: BN statistics
            assert_close_to(tensor, expected[name], bound, name)
    for ours, theirs in zip(fused, default, strict=True):
        for p, q in zip(ours.param_groups[0]["params"], theirs.param_groups[0]["params"], strict=True):
            assert_close_to(ours.state[p]["exp_avg"], theirs.state[q]["exp_avg"], 1e-4, "exp_avg")
            assert_close_to(ours.state[p]["exp_avg_sq"], theirs.state[q]["exp_avg_sq"], 5e-5, "exp_avg_sq")
            assert float(ours.state[p]["step"]) == float(theirs.state[q]["step"]) == 3.0


def assert_close_to(got: torch.Tensor, expected: torch.Tensor, bound: float, name: str) -> None:
    """|got - expected| <= bound x the largest |expected| (exact for integer tensors)."""
    if not expected.is_floating_point():
        assert torch.equal(got, expected), name
        return
    scale = float(expected.abs().max()) or 1.0
    difference = float((got - expected).abs().max())
    assert difference <= bound * scale, f"{name}: {difference / scale:.2e} of its largest magnitude"


def test_checkpoint_records_default_flags_and_loading_keeps_fused() -> None:
    opt, nets = small_nets()
    optimizer = build_optimizers(nets, opt).G
    for p in nets.G.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    saved = optimizer.state_dict()
    # What the plain trainer always wrote: torch's default flags, the step counter a CPU float tensor.
    assert saved["param_groups"][0]["fused"] is None and not saved["param_groups"][0]["foreach"]
    assert optimizer.param_groups[0]["fused"] is True  # the optimizer itself is untouched
    plain = torch.optim.Adam(nets.G.parameters(), lr=1.0)
    plain.load_state_dict(saved)  # loads into torch's default Adam
    assert plain.param_groups[0]["lr"] == opt.lr
    fresh = build_optimizers(nets, opt).G
    fresh.load_state_dict(plain.state_dict())  # a checkpoint with the default flags
    group = fresh.param_groups[0]
    assert group["fused"] is True and group["foreach"] is None and group["capturable"] is False
    fresh.step()


def test_resumed_plain_trainer_keeps_fused_adam(tiny_data: Path, tmp_path: Path) -> None:
    opt = tiny_options(tiny_data, tmp_path, max_iters=1)
    Trainer(opt, progress_bar=False).fit()
    resumed = Trainer(dataclasses.replace(opt, max_iters=2, continue_train=True), progress_bar=False)
    assert resumed.state.iteration == 1
    assert all(o.param_groups[0]["fused"] is True for o in resumed.optimizers)
    resumed.fit()
    assert resumed.state.iteration == 2


def test_fast_path_cpu_defaults() -> None:
    config = FastPathConfig.for_device("cpu")
    assert (config.bf16, config.cuda_graph, config.fused_adam, config.channels_last) == (
        False,
        False,
        True,
        False,
    )
    opt, nets = small_nets()
    for optimizer in build_fast_optimizers(nets, opt, config):
        assert optimizer.param_groups[0]["fused"] is True and not optimizer.param_groups[0]["capturable"]
