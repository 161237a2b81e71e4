"""What one fast-path iteration dispatches (``benchmarks/count_ops.py``'s count, on a small network): no
zero-filled gradients, and the D input built in the generator's dtype."""

from __future__ import annotations

import pytest
import torch

from benchmarks.count_ops import TopLevelOps
from fastpix2pix._extension import extension_available
from fastpix2pix.runs.networks import build_networks
from fastpix2pix.runs.options import TrainOptions
from fastpix2pix.training.fast_step import FastPathConfig, FastStep, build_fast_optimizers
from fastpix2pix.training.step import Objective

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not extension_available(), reason="compiled extension not built"),
]


def counted_iteration(pairs_as_one_batch: bool = False) -> TopLevelOps:
    opt = TrainOptions(netG="unet_128", ngf=8, ndf=8, device="cpu")
    config = FastPathConfig.for_device("cpu", bf16=True, channels_last=True)
    torch.manual_seed(0)
    nets = build_networks(opt, "fused", torch.device("cpu"))
    for net in nets:
        net.to(memory_format=torch.channels_last)
    A, B = (torch.randn(1, 3, 128, 128).contiguous(memory_format=torch.channels_last) for _ in "AB")
    step = FastStep(
        nets, build_fast_optimizers(nets, opt, config), Objective(backend="fused"), lambda: (A, B),
        bf16=True, loss_rows=4, pairs_as_one_batch=pairs_as_one_batch,
    )  # fmt: skip
    step()  # Adam's lazy state
    counter = TopLevelOps()
    with counter:
        step()
    return counter


def test_no_zero_filled_gradients_in_an_iteration() -> None:
    """The fused ops' autograd materialised a zero gradient for every output nothing differentiates (the
    conv output, mean and variance of each block, the losses' saved gradient): 70 fills per unet_256
    iteration, each a kernel on a GPU."""
    kinds = counted_iteration().kinds
    assert kinds["zero-fill"] == 0, kinds
    assert kinds["fused block"] > 0  # the count saw the fused ops


def test_the_discriminator_sees_the_fake_pairs_in_the_generators_dtype() -> None:
    """A float32 real_A concatenated with the bf16 fake_B was promoted to float32 (autocast widens cat's
    inputs; D's first convolution casts it straight back, and its gradient is float32): the fake pairs are
    now built in bf16. Only the real pair (real_A, real_B), both float32 images, is a float32 cat."""
    cats = counted_iteration().cat_dtypes
    assert sum(out == torch.float32 for _, out in cats) == 1, cats
    assert sum(out == torch.bfloat16 for _, out in cats) >= 2, cats


def test_running_statistics_and_skip_joins_take_few_ops() -> None:
    """BatchNorm running statistics: 3 tiny ops per layer and pass (66 per unet_256 iteration) became one
    foreach call per kind and flush: 3 flushes here (D's second and third passes each flush what waits, the
    iteration's end the rest). Skip joins: relu + cat forward and threshold_backward backward became one
    relu_cat each way, one per decoder level (6 for unet_128)."""
    names = counted_iteration().names
    assert names["aten::_foreach_lerp_.Scalar"] == 3, names
    assert names["aten::_foreach_mul.ScalarList"] == 3, names
    assert names["aten::lerp_.Scalar"] == 0 and names["aten::add_.Tensor"] <= 1, names  # (Adam's step count)
    assert names["fastpix2pix::relu_cat"] == names["fastpix2pix::relu_cat_backward"] == 6, names
    assert names["aten::relu"] == 0 and names["aten::threshold_backward"] == 0, names


def test_bf16_loss_and_bias_gradients_take_no_cast() -> None:
    """The losses' backward scaled their bf16 gradient by the float32 loss gradient cast to bf16 first (a
    kernel each), and a biased block's bias gradient came back in bf16 for a float32 bias (a cast after
    the op): neither casts now."""
    from fastpix2pix.ops import fused as ops  # needs the compiled library (skipped above without it)

    logits = torch.randn(1, 1, 30, 30, dtype=torch.bfloat16, requires_grad=True)
    x = torch.randn(1, 4, 8, 8, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(2, 4, 3, 3, dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(2, requires_grad=True)  # float32, as autocast leaves a conv bias
    counter = TopLevelOps()
    with counter:
        (ops.gan_loss(logits, True) * 0.5).backward()
        ops.conv_bias_act(x, weight, bias, padding=(1, 1), negative_slope=0.2).sum().backward()
    assert counter.kinds["cast"] == 0, counter.names
    assert logits.grad.dtype == torch.bfloat16 and bias.grad.dtype == torch.float32


def test_the_d_steps_pairs_as_one_batch_take_half_its_blocks() -> None:
    """D's fake and real pairs in one forward: D's 5 blocks run twice per iteration instead of three times
    (forward and backward), one gan_losses replaces the D step's two gan_loss calls, the two passes' weight
    gradients are no longer summed (one add per D parameter: 10 for the PatchGAN with BatchNorm), and the
    running statistics still take 3 foreach calls per kind (the second group's updates wait one round)."""
    separate, one = counted_iteration(False).names, counted_iteration(True).names
    for op in ("conv_bn_act", "conv_bn_act_backward"):
        assert separate[f"fastpix2pix::{op}"] - one[f"fastpix2pix::{op}"] == 3, (separate, one)
    for op in ("conv_bias_act", "conv_bias_act_backward"):
        assert separate[f"fastpix2pix::{op}"] - one[f"fastpix2pix::{op}"] == 2, (separate, one)
    assert separate["fastpix2pix::gan_loss"] == 3 and one["fastpix2pix::gan_loss"] == 1, (separate, one)
    assert one["fastpix2pix::gan_losses"] == 1, one
    assert separate["aten::add.Tensor"] - one["aten::add.Tensor"] >= 10, (separate, one)
    assert one["aten::_foreach_lerp_.Scalar"] == separate["aten::_foreach_lerp_.Scalar"] == 3, (separate, one)
