"""The fused CPU kernels against the eager PyTorch composites they replace, at pix2pix layer shapes.

Pairs share a benchmark group (fused and eager side by side): BatchNorm2d + LeakyReLU/ReLU (training,
forward, and forward + backward with the BN parameter gradients), BCEWithLogitsLoss / MSELoss (value and
gradient), L1Loss, and bias + LeakyReLU (the norm-free layers; eager's bias rides inside the convolution, so
its composite is the LeakyReLU alone: a harder baseline). Convolutions are left out: both use the same ATen
call. One image (batch 1) in float32, unless the shape says otherwise; the D output map is at batch 16.

    .venv/bin/python -m pytest benchmarks/bench_cpu_ops.py \\
        --benchmark-json benchmarks/results/cpu_ops_$(date +%F).json --benchmark-group-by=group
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from fastpix2pix._extension import extension_available

if not extension_available():
    pytest.skip("fastpix2pix._C is not built: nothing to benchmark", allow_module_level=True)

import fastpix2pix.ops.fused  # noqa: F401  (registers the fake kernels and autograd of the ops)

lib = torch.ops.fastpix2pix
EPS = 1e-5

# (name, (N, C, H, W), negative_slope): unet_256 and the 70x70 PatchGAN at 256x256 input.
BN_LAYERS = [
    ("G.e2 128x64x64 LeakyReLU", (1, 128, 64, 64), 0.2),
    ("G.e3 256x32x32 LeakyReLU", (1, 256, 32, 32), 0.2),
    ("G.d7 64x128x128 ReLU", (1, 64, 128, 128), 0.0),
    ("D.C128 128x64x64 LeakyReLU", (1, 128, 64, 64), 0.2),
    ("D.C512 512x31x31 LeakyReLU", (1, 512, 31, 31), 0.2),
]
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
IMPLS = ["fused", "eager"]


def activation_module(slope: float) -> nn.Module:
    return nn.ReLU() if slope == 0.0 else nn.LeakyReLU(slope)


def layer_input(shape, layout) -> torch.Tensor:
    # Not zeros (never time on zeros): a conv output's typical offset and spread.
    return (torch.randn(shape) * 2 + 0.5).contiguous(memory_format=LAYOUTS[layout])


def bn_act_fused(x, weight, bias, slope):
    mean, var = lib.bn_stats(x)
    return lib.bn_act_forward(x, mean, var, weight, bias, EPS, slope), mean, var


def bn_act_fused_train_step(x, weight, bias, slope, grad_out):
    out, mean, var = bn_act_fused(x, weight, bias, slope)
    sum_dz, sum_dz_xhat = lib.bn_act_backward_reduce(grad_out, x, mean, var, weight, bias, EPS, slope)
    count = x.numel() // x.shape[1]
    grad_x = lib.bn_act_backward_apply(
        grad_out, x, mean, var, weight, bias, sum_dz, sum_dz_xhat, count, EPS, slope, True
    )
    return out, grad_x, sum_dz_xhat, sum_dz


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    ("name", "shape", "slope"), BN_LAYERS, ids=[layer[0].split()[0] for layer in BN_LAYERS]
)
def test_bn_act_forward(benchmark, impl, layout, name, shape, slope):
    benchmark.group = f"bn_act forward | {name} | {layout}"
    x = layer_input(shape, layout)
    bn = nn.BatchNorm2d(shape[1]).train()
    act = activation_module(slope)
    weight, bias = bn.weight.detach(), bn.bias.detach()
    if impl == "fused":
        benchmark(lambda: bn_act_fused(x, weight, bias, slope))
    else:
        with torch.no_grad():
            benchmark(lambda: act(bn(x)))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    ("name", "shape", "slope"), BN_LAYERS, ids=[layer[0].split()[0] for layer in BN_LAYERS]
)
def test_bn_act_forward_backward(benchmark, impl, layout, name, shape, slope):
    benchmark.group = f"bn_act forward+backward | {name} | {layout}"
    x = layer_input(shape, layout)
    grad_out = torch.randn_like(x)
    bn = nn.BatchNorm2d(shape[1]).train()
    act = activation_module(slope)
    if impl == "fused":
        weight, bias = bn.weight.detach(), bn.bias.detach()
        benchmark(lambda: bn_act_fused_train_step(x, weight, bias, slope, grad_out))
    else:
        x = x.requires_grad_()

        def step():
            act(bn(x)).backward(grad_out)

        benchmark(step)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_bias_act_forward_backward(benchmark, impl, layout):
    shape, slope = (1, 64, 128, 128), 0.2  # D.C64: the first PatchGAN layer, no norm
    benchmark.group = f"bias_act forward+backward | D.C64 64x128x128 LeakyReLU | {layout}"
    x = layer_input(shape, layout)
    grad_out = torch.randn_like(x)
    bias = torch.randn(shape[1])
    if impl == "fused":

        def step():
            out = lib.bias_act_forward(x, bias, slope)
            return lib.bias_act_backward(grad_out, out, slope, True)

        benchmark(step)
    else:
        x = x.requires_grad_()
        act = nn.LeakyReLU(slope)
        benchmark(lambda: act(x).backward(grad_out))


# (name, shape): the PatchGAN output map at batch 16 and at batch 1.
GAN_MAPS = [("D out 16x1x30x30", (16, 1, 30, 30)), ("D out 1x1x30x30", (1, 1, 30, 30))]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["vanilla", "lsgan"])
@pytest.mark.parametrize(("name", "shape"), GAN_MAPS, ids=["batch16", "batch1"])
def test_gan_loss(benchmark, impl, mode, name, shape):
    benchmark.group = f"gan_loss {mode} value+grad | {name}"
    logits = torch.randn(shape) * 3
    if impl == "fused":
        benchmark(lambda: lib.gan_loss(logits, True, mode, True))
    else:
        criterion = nn.BCEWithLogitsLoss() if mode == "vanilla" else nn.MSELoss()
        logits = logits.requires_grad_()

        def step():
            criterion(logits, torch.ones_like(logits)).backward()

        benchmark(step)


@pytest.mark.parametrize("impl", IMPLS)
def test_l1_loss(benchmark, impl):
    benchmark.group = "l1_loss value+grad | G out 1x3x256x256"
    pred, target = torch.randn(1, 3, 256, 256), torch.randn(1, 3, 256, 256)
    if impl == "fused":
        benchmark(lambda: lib.l1_loss(pred, target, 100.0, True))
    else:
        criterion = nn.L1Loss()
        pred = pred.requires_grad_()
        benchmark(lambda: (100.0 * criterion(pred, target)).backward())
