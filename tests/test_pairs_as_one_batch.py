"""The discriminator's fake and real pairs as one batch (``train_step(pairs_as_one_batch=True)``, the fast
path's default): grouped BatchNorm ops (``groups``: per-part statistics), the two-target GAN loss
(``gan_losses``), a discriminator run on a grouped batch, and the D step built on them. Each against the
independent reference: the same parts run as separate batches through plain PyTorch."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from fastpix2pix._extension import extension_available

if not extension_available():
    pytest.skip("the compiled operator library fastpix2pix._C is not built", allow_module_level=True)

from test_cuda_ops import EPS, fused_bn_ops
from test_ops import DEVICES

from fastpix2pix.models.discriminators import NLayerDiscriminator, PixelDiscriminator
from fastpix2pix.models.layers import ConvBlock
from fastpix2pix.ops import kernels, reference
from fastpix2pix.ops.running_stats import deferred_running_stats
from fastpix2pix.runs.networks import Networks, build_networks
from fastpix2pix.runs.options import TrainOptions
from fastpix2pix.training.optim import build_optimizers
from fastpix2pix.training.step import Objective, train_step

pytestmark = pytest.mark.usefixtures("one_thread")

lib = torch.ops.fastpix2pix
LAYOUTS = [torch.contiguous_format, torch.channels_last]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# Tolerances against the float64 reference, relative to the largest value: about two roundings of the results
# in the dtype (measured over 5 seeds: 6e-16, 3e-7 and 3.5e-3, the last one bf16 rounding of out and grad_x).
TOLERANCE = {torch.float64: 1e-13, torch.float32: 1e-6, torch.bfloat16: 8e-3}


def bn_op_results(x, grad, weight, bias, slope, groups) -> dict[str, torch.Tensor]:
    """The four BatchNorm ops in training, grouped (test_cuda_ops.fused_bn_ops, on torch.ops)."""
    return fused_bn_ops(lib, x, grad, weight, bias, slope, groups)


def separate_batches(x, grad, weight, bias, slope, groups) -> dict[str, torch.Tensor]:
    """The same results from each part as its own batch: F.batch_norm in float64, autograd's gradients."""
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("mean", "var", "out", "sum_dz", "sum_dz_xhat")}
    grad_x = []
    for x_part, grad_part in zip(x.double().chunk(groups), grad.double().chunk(groups), strict=True):
        x_part = x_part.detach().requires_grad_()
        w, b = (t.detach().double().requires_grad_() for t in (weight, bias))
        out = reference.activation(F.batch_norm(x_part, None, None, w, b, True, 0.0, EPS), slope)
        out.backward(grad_part)
        var, mean = torch.var_mean(x_part.detach(), dim=(0, 2, 3), correction=0)
        for key, value in (
            ("mean", mean),
            ("var", var),
            ("out", out),
            ("sum_dz", b.grad),
            ("sum_dz_xhat", w.grad),
        ):
            parts[key].append(value.detach())
        grad_x.append(x_part.grad)
    return {key: torch.cat(values) for key, values in parts.items()} | {"grad_x": torch.cat(grad_x)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
# 1x1 maps with 4 values per channel and group: with 2, BatchNorm's input gradient is ~0 (two values
# normalise to -1 and 1 whatever they are) and a float32 result is its rounding noise times 1/spread.
@pytest.mark.parametrize(("shape", "groups"), [((4, 8, 5, 7), 2), ((6, 3, 4, 4), 3), ((8, 16, 1, 1), 2)])
def test_grouped_bn_ops_equal_separate_batches(device, layout, dtype, shape, groups):
    x = (torch.randn(shape, device=device) * 3 + 1).to(dtype).contiguous(memory_format=layout)
    # Each part with its own mean and spread: shared statistics would be visibly wrong.
    x = x + torch.arange(groups, device=device).repeat_interleave(shape[0] // groups).view(-1, 1, 1, 1).to(
        dtype
    )
    grad = torch.randn(shape, device=device).to(dtype).contiguous(memory_format=layout)
    weight, bias = torch.rand(shape[1], device=device) + 0.5, torch.randn(shape[1], device=device)
    if dtype == torch.float64:
        weight, bias = weight.double(), bias.double()
    results = bn_op_results(x, grad, weight, bias, 0.2, groups)
    expected = separate_batches(x, grad, weight, bias, 0.2, groups)
    assert results["out"].stride() == results["grad_x"].stride() == x.stride()
    for key, value in expected.items():
        tolerance = TOLERANCE[dtype] * max(1.0, value.abs().max().item())
        torch.testing.assert_close(results[key].double(), value, rtol=0, atol=tolerance, msg=key)


@pytest.mark.parametrize("device", DEVICES)
def test_one_group_is_the_ungrouped_op_bit_for_bit(device):
    x = torch.randn(4, 8, 6, 6, device=device).contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(x)
    weight, bias = torch.rand(8, device=device) + 0.5, torch.randn(8, device=device)
    mean, var = lib.bn_stats(x, 1)  # groups given, against the schema's default (fused_bn_ops omits a 1)
    ungrouped = bn_op_results(x, grad, weight, bias, 0.0, 1)
    assert torch.equal(ungrouped["mean"], mean) and torch.equal(ungrouped["var"], var)
    assert torch.equal(ungrouped["out"], lib.bn_act_forward(x, mean, var, weight, bias, EPS, 0.0, 1))
    sums = lib.bn_act_backward_reduce(grad, x, mean, var, weight, bias, EPS, 0.0, 1)
    assert torch.equal(ungrouped["sum_dz"], sums[0]) and torch.equal(ungrouped["sum_dz_xhat"], sums[1])
    count = x.numel() // x.shape[1]
    grad_x = lib.bn_act_backward_apply(grad, x, mean, var, weight, bias, *sums, count, EPS, 0.0, True, 1)
    assert torch.equal(ungrouped["grad_x"], grad_x)


@pytest.mark.parametrize("device", DEVICES)
def test_each_group_is_computed_as_its_own_batch_bit_for_bit(device):
    """A group's results are exactly those of the op on that group alone (the same walk over the same
    values): grouping changes which values are reduced together, nothing else."""
    x = torch.randn(4, 8, 6, 6, device=device)
    grad = torch.randn_like(x)
    weight, bias = torch.rand(8, device=device) + 0.5, torch.randn(8, device=device)
    grouped = bn_op_results(x, grad, weight, bias, 0.2, 2)
    alone = [bn_op_results(x[i : i + 2], grad[i : i + 2], weight, bias, 0.2, 1) for i in (0, 2)]
    for key, value in grouped.items():
        assert torch.equal(value, torch.cat([part[key] for part in alone])), key


def conv_inputs(dtype=torch.float64, batch=4):
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 9, 8, dtype=dtype)
    x[batch // 2 :] += 2  # the parts differ in mean
    weight = torch.randn(5, 3, 4, 4, dtype=dtype) * 0.3
    bn_weight, bn_bias = torch.rand(5, dtype=dtype) + 0.5, torch.randn(5, dtype=dtype)
    return x, weight, bn_weight, bn_bias


@pytest.mark.parametrize("fn", ["kernels", "reference"])
def test_grouped_conv_bn_act_is_two_batches_with_running_stats_in_order(fn):
    """Output, input/weight/affine gradients and the running statistics (each part's update in turn,
    momentum 0.1) equal two separate nn.BatchNorm2d-semantics calls in float64."""
    op = kernels.conv_bn_act if fn == "kernels" else reference.conv_bn_act
    x, weight, bn_weight, bn_bias = conv_inputs()
    kwargs = {"stride": (2, 2), "padding": (1, 1), "negative_slope": 0.2, "momentum": 0.1}
    leaves = [t.clone().requires_grad_() for t in (x, weight, bn_weight, bn_bias)]
    running = [torch.randn(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64) + 0.5]
    initial = [t.clone() for t in running]
    expected_leaves = [t.clone().requires_grad_() for t in (x, weight, bn_weight, bn_bias)]
    expected_running = [t.clone() for t in running]
    out = op(*leaves, *running, groups=2, **kwargs)
    grad = torch.randn_like(out)
    out.backward(grad)

    parts = []
    for part in expected_leaves[0].chunk(2):  # one after the other, as the official D step runs them
        parts.append(reference.conv_bn_act(part, *expected_leaves[1:], *expected_running, **kwargs))
    torch.cat(parts).backward(grad)
    assert not any(torch.equal(a, b) for a, b in zip(running, initial, strict=True))  # both were updated
    torch.testing.assert_close(out, torch.cat(parts), rtol=0, atol=1e-12)
    for got, want in zip(running, expected_running, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    for got, want in zip(leaves, expected_leaves, strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=0, atol=1e-10)


def test_grouped_conv_bn_act_gradcheck():
    x, weight, bn_weight, bn_bias = (t.requires_grad_() for t in conv_inputs(batch=4))
    torch.autograd.gradcheck(
        lambda *t: kernels.conv_bn_act(*t, None, None, padding=(1, 1), negative_slope=0.2, groups=2),
        (x, weight, bn_weight, bn_bias),
    )


def test_grouped_eval_normalises_every_part_with_the_running_statistics():
    x, weight, bn_weight, bn_bias = conv_inputs()
    running = [torch.randn(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64) + 0.5]
    kwargs = {"padding": (1, 1), "training": False}
    grouped = kernels.conv_bn_act(x, weight, bn_weight, bn_bias, *running, groups=2, **kwargs)
    torch.testing.assert_close(
        grouped, reference.conv_bn_act(x, weight, bn_weight, bn_bias, *running, **kwargs), rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("op", ["kernels", "reference"])
@pytest.mark.parametrize("groups", [0, 3])
def test_a_batch_that_does_not_split_is_refused_before_work(op, groups):
    fn = kernels.conv_bn_act if op == "kernels" else reference.conv_bn_act
    x, weight, bn_weight, bn_bias = conv_inputs()
    with pytest.raises(ValueError, match=f"a batch of 4 does not split into groups={groups} equal parts"):
        fn(x, weight, bn_weight, bn_bias, None, None, groups=groups)


def test_the_ops_name_bad_groups_and_statistics():
    x = torch.randn(4, 3, 5, 5)
    with pytest.raises(RuntimeError, match="does not split into groups=3 equal parts"):
        lib.bn_stats(x, 3)
    with pytest.raises(RuntimeError, match="groups must be >= 1"):
        lib.bn_stats(x, 0)
    mean, var = lib.bn_stats(x)  # 3 values where groups=2 needs 6
    with pytest.raises(RuntimeError, match=r"mean must have shape \(6\)"):
        lib.bn_act_forward(x, mean, var, None, None, EPS, 0.2, 2)
    with pytest.raises(RuntimeError, match=r"more than 1 value per channel .* split into 2 groups"):
        lib.bn_stats(torch.randn(2, 3, 1, 1), 2)


# --- the two-target GAN loss ------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["vanilla", "lsgan"])
@pytest.mark.parametrize("targets", [(False, True), (True,), (True, False, False)], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "channels_last"])
def test_gan_losses_are_each_parts_gan_loss(device, mode, targets, layout):
    logits = (torch.randn(6, 1, 7, 7, device=device) * 4).contiguous(memory_format=layout).requires_grad_()
    losses = kernels.gan_losses(logits, targets, mode)
    weights = torch.randn(len(targets), device=device)
    (losses * weights).sum().backward()
    expected_logits = logits.detach().double().requires_grad_()
    expected = torch.stack(
        [
            reference.gan_loss(part, real, mode)
            for part, real in zip(expected_logits.chunk(len(targets)), targets, strict=True)
        ]
    )
    (expected * weights.double()).sum().backward()
    torch.testing.assert_close(losses.double(), expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(logits.grad.double(), expected_logits.grad, rtol=1e-5, atol=1e-9)
    assert logits.grad.stride() == logits.stride()


def test_gan_losses_bf16_map_keeps_its_dtype_and_matches():
    logits = (torch.randn(4, 1, 6, 6) * 3).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    logits.requires_grad_()
    losses = kernels.gan_losses(logits, (False, True))
    assert losses.dtype == torch.float32
    (losses.sum() * 0.5).backward()
    assert logits.grad.dtype == torch.bfloat16
    expected_logits = logits.detach().float().requires_grad_()
    (reference.gan_losses(expected_logits, (False, True)).sum() * 0.5).backward()
    torch.testing.assert_close(
        losses, reference.gan_losses(logits.detach(), (False, True)), rtol=1e-6, atol=1e-6
    )
    torch.testing.assert_close(logits.grad.float(), expected_logits.grad, rtol=1e-2, atol=1e-5)


@pytest.mark.parametrize("mode", ["vanilla", "lsgan"])
def test_gan_losses_gradcheck(mode):
    logits = torch.randn(4, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda z: kernels.gan_losses(z, (False, True, True, False), mode), (logits,)
    )


@pytest.mark.parametrize("op", ["kernels", "reference"])
def test_gan_losses_bad_targets(op):
    fn = kernels.gan_losses if op == "kernels" else reference.gan_losses
    logits = torch.randn(4, 1, 3, 3)
    with pytest.raises(ValueError, match="at least one part"):
        fn(logits, ())
    with pytest.raises(ValueError, match="a batch of 4 does not split into groups=3"):
        fn(logits, (True, False, True))
    with pytest.raises(RuntimeError, match="does not split into groups=3"):
        lib.gan_losses(logits, [True, False, True], "vanilla", False)


# --- a discriminator on a grouped batch --------------------------------------------------------------------


def discriminator_runs(D, x, groups):
    """D on x with ``groups`` (as the fast path runs it: running statistics deferred), or (groups=None) on
    each half alone: logits, parameter gradients, buffers."""
    D = copy.deepcopy(D)
    with deferred_running_stats():
        logits = torch.cat([D(part) for part in x.chunk(2)]) if groups is None else D(x, groups=groups)
        logits.backward(torch.linspace(-1, 1, logits.numel(), dtype=x.dtype).view_as(logits))
    grads = {name: p.grad for name, p in D.named_parameters()}
    return logits, grads, {name: b.clone() for name, b in D.named_buffers()}


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("make_D", [NLayerDiscriminator, PixelDiscriminator], ids=["patchgan", "pixelgan"])
@pytest.mark.parametrize("norm", ["batch", "instance", "none"])
def test_a_discriminator_on_a_grouped_batch_is_two_separate_calls(backend, make_D, norm):
    torch.manual_seed(0)
    D = make_D(6, 8, norm=norm, backend=backend).double()
    x = torch.randn(2, 6, 34, 34, dtype=torch.float64)
    x[1] = x[1] * 2 + 1  # a real pair unlike the fake one: shared statistics would show
    logits, grads, buffers = discriminator_runs(D, x, 2)
    want_logits, want_grads, want_buffers = discriminator_runs(D, x, None)
    torch.testing.assert_close(logits, want_logits, rtol=0, atol=1e-10)
    for name in want_grads:
        torch.testing.assert_close(grads[name], want_grads[name], rtol=0, atol=1e-9, msg=name)
    for name in want_buffers:  # running statistics in order, batch counters +2
        torch.testing.assert_close(buffers[name], want_buffers[name], rtol=0, atol=1e-12, msg=name)
    if norm == "batch":
        assert all(int(b) == 2 for name, b in buffers.items() if name.endswith("num_batches_tracked"))


def test_grouped_batch_norm_without_momentum_is_refused():
    block = ConvBlock(3, 4, 3, padding=1, norm="batch", negative_slope=0.2)
    block.norm.momentum = None  # a cumulative average: each part would count differently
    with pytest.raises(ValueError, match="groups > 1 needs a BatchNorm momentum"):
        block(torch.randn(4, 3, 5, 5), groups=2)


# --- the D step on one batch -------------------------------------------------------------------------------


def one_step(pairs_as_one_batch: bool, backend: str, dtype: torch.dtype, norm: str = "batch"):
    torch.manual_seed(0)
    opt = TrainOptions(netG="unet_128", ngf=8, ndf=8, norm=norm, device="cpu")
    nets = Networks(*(net.to(dtype) for net in build_networks(opt, backend, torch.device("cpu"))))
    optimizers = build_optimizers(nets, opt)
    batch = {
        "A": torch.rand(2, 3, 128, 128, dtype=dtype) * 2 - 1,
        "B": torch.rand(2, 3, 128, 128, dtype=dtype),
    }
    torch.manual_seed(1)  # dropout
    with deferred_running_stats():
        losses = train_step(
            nets, optimizers, batch, Objective(backend=backend), pairs_as_one_batch=pairs_as_one_batch
        )
    state = {
        f"{key}.{name}": t
        for key, net in zip("GD", nets, strict=True)
        for name, t in net.state_dict().items()
    }
    return losses, state


@pytest.mark.parametrize(
    ("backend", "dtype", "tolerance"),
    # Measured: 3e-15, 4e-15 and 4e-6 (float32: the batch-2 convolutions round differently). A wrong D step
    # moves weights by about the learning rate (2e-4: Adam's first step is ~lr * sign(grad)).
    [("reference", torch.float64, 1e-12), ("fused", torch.float64, 1e-12), ("fused", torch.float32, 2e-5)],
)
def test_the_d_step_on_one_batch_trains_as_the_official_two(backend, dtype, tolerance):
    """One whole iteration (G forward, D step, G step through the updated D): losses, every weight after both
    Adam steps and every BatchNorm buffer equal the official two-forward D step's."""
    losses, state = one_step(True, backend, dtype)
    want_losses, want_state = one_step(False, backend, dtype)
    for name, value in want_losses.items():
        torch.testing.assert_close(losses[name], value, rtol=0, atol=tolerance, msg=name)
    for name, value in want_state.items():
        if value.is_floating_point():
            torch.testing.assert_close(state[name], value, rtol=0, atol=tolerance, msg=name)
        else:
            assert torch.equal(state[name], value), name
