"""What only a GPU can check about the CUDA kernels (the device-parametrised correctness tests are in
``test_ops.py``; the kernels' logic also runs on the CPU in ``test_cuda_emulation.py``).

- low precision: in bfloat16/float16 the fused ops' error against a float64 reference is at most twice the
  error of PyTorch's own ops in the same precision (conv + BatchNorm + activation forward and backward,
  bias + activation, the losses), for NCHW and channels_last;
- float32 within the default tolerances of the reference, running statistics equal; and every op's values
  and gradients within rtol 1e-5 of ``reference.py`` evaluated in float64, at pix2pix sizes (many blocks
  and partial states on a 132-SM GPU), in both layouts;
- every output element written: the fused calls run with deterministic mode's fill_uninitialized_memory,
  which fills every new tensor with NaN (each output, whichever cached block it gets), so an element no
  kernel writes stays NaN;
- tensors past 2**31 elements (slow, only with enough free GPU memory);
- CUDA-graph capture and replay of a conv_bn_act forward and backward, equal to eager;
- no host synchronisation: the ops run under ``torch.cuda.set_sync_debug_mode("error")``;
- determinism (no atomics): the same input gives bitwise the same result.

Inputs are fresh random numbers each run; a failing test prints its seed.
"""

from __future__ import annotations

import random
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from fastpix2pix.ops import reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available on this machine"),
]

LOW_PRECISION = (torch.bfloat16, torch.float16)
LAYOUTS = (torch.contiguous_format, torch.channels_last)

# (in_channels, out_channels, input size, stride, padding, transposed, negative_slope): pix2pix layer kinds.
CONV_BN_LAYERS = {
    "down": (64, 128, 16, 2, 1, False, 0.2),  # encoder level: conv, BN, LeakyReLU
    "up": (128, 64, 8, 2, 1, True, 0.0),  # decoder level: transposed conv, BN, ReLU
    "inner": (64, 64, 1, 2, 1, True, 0.0),  # 1x1 -> 2x2, as d1 of unet_256
    "patch": (64, 128, 9, 1, 1, False, 0.2),  # PatchGAN stride-1 level, odd output size
}
CONV_BIAS_LAYERS = {
    "d_first": (3, 64, 32, 2, 1, False, 0.2),  # PatchGAN's first conv: bias, LeakyReLU
    "g_output": (128, 3, 16, 2, 1, True, 1.0),  # U-Net's output: transposed conv, bias, identity
    "d_output": (64, 1, 8, 1, 1, False, 1.0),  # PatchGAN's output: 1 channel
}


# --- fixtures and helpers ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ops():
    """fastpix2pix.ops, from a library built with its CUDA kernels."""
    from fastpix2pix import _extension

    if not _extension.extension_available() or not _extension.cuda_kernels_available():
        pytest.fail(
            "fastpix2pix._C was built without its CUDA kernels on a machine with a GPU: "
            "rebuild with FASTPIX2PIX_CUDA=1 (see setup.py)"
        )
    from fastpix2pix.ops import fused

    return fused


@pytest.fixture(autouse=True)
def seed():
    """A fresh seed per test, printed (pytest shows it on failure) so that a failure can be replayed."""
    value = random.randrange(2**31)
    torch.manual_seed(value)
    print(f"seed: {value}")
    return value


@pytest.fixture
def no_tf32():
    """Full float32 convolutions, for comparisons at float32 tolerances."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@contextmanager
def poisoned_outputs():
    """Inside, every tensor allocated (at::empty and its kin: every op output) starts as NaN.

    This is deterministic mode's fill_uninitialized_memory, which fills each new tensor itself, so it
    reaches small outputs too (poisoning freed memory does not: the caching allocator may hand back another
    block). Only the fused calls run inside, so that nothing else meets deterministic mode's restrictions.
    """
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.utils.deterministic.fill_uninitialized_memory,
    )
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.utils.deterministic.fill_uninitialized_memory = saved[2]


def assert_written(*tensors: torch.Tensor | None) -> None:
    for t in tensors:
        if t is not None:
            assert not t.isnan().any(), "NaN in an output: an element was not written (memory was poisoned)"


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def assert_at_most_twice(name: str, fused: torch.Tensor, eager: torch.Tensor, exact: torch.Tensor) -> None:
    """The fused result's error is at most twice PyTorch's in the same precision (plus a float32 floor)."""
    fused_error, eager_error = rel_error(fused, exact), rel_error(eager, exact)
    assert fused_error <= 2 * eager_error + 1e-6, (
        f"{name}: fused error {fused_error:.3g} > 2 x PyTorch's {eager_error:.3g}"
    )


def conv_inputs(layer, batch: int, dtype: torch.dtype, memory_format, bias: bool = False):
    """x, conv weight, BatchNorm weight/bias (float32 or float64 parameters, as under autocast), grad_out."""
    c_in, c_out, size, *_ = layer
    transposed = layer[5]
    x = torch.randn(batch, c_in, size, size, device="cuda").to(dtype).contiguous(memory_format=memory_format)
    w_shape = (c_in, c_out, 4, 4) if transposed else (c_out, c_in, 4, 4)
    weight = (torch.randn(w_shape, device="cuda") * 0.05).to(dtype).contiguous(memory_format=memory_format)
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    bn_weight = 1 + 0.1 * torch.randn(c_out, device="cuda", dtype=param_dtype)
    bn_bias = 0.1 * torch.randn(c_out, device="cuda", dtype=param_dtype)
    conv_bias = 0.1 * torch.randn(c_out, device="cuda", dtype=dtype) if bias else None
    return x, weight, bn_weight, bn_bias, conv_bias


def conv_kwargs(layer) -> dict:
    _, _, _, stride, padding, transposed, slope = layer
    return {
        "stride": (stride, stride),
        "padding": (padding, padding),
        "transposed": transposed,
        "negative_slope": slope,
    }


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) if t is not None else None for t in tensors]


def as_double(*tensors):
    return [t.detach().double().requires_grad_(True) if t is not None else None for t in tensors]


def run_conv_bn_act(module, x, weight, bn_weight, bn_bias, running, grad_seed, layer):
    """Forward and backward of a conv_bn_act; returns the output and the gradients of all four inputs."""
    running_mean, running_var = running
    out = module.conv_bn_act(x, weight, bn_weight, bn_bias, running_mean, running_var, **conv_kwargs(layer))
    grad_out = grad_seed.to(out.dtype).contiguous(memory_format=_format_of(out))
    grads = torch.autograd.grad(out, [x, weight, bn_weight, bn_bias], grad_out)
    return out, grads


def _format_of(t: torch.Tensor):
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def running_stats(channels: int, dtype=torch.float32):
    return torch.zeros(channels, device="cuda", dtype=dtype), torch.ones(channels, device="cuda", dtype=dtype)


@contextmanager
def sync_is_error():
    """Any synchronising CUDA call (e.g. .item(), a device-to-host copy) raises inside this block."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


# --- precision against PyTorch in the same precision -----------------------------------------------------


@pytest.mark.parametrize("memory_format", LAYOUTS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("layer", CONV_BN_LAYERS, ids=str)
def test_conv_bn_act_low_precision(ops, layer, dtype, memory_format):
    spec = CONV_BN_LAYERS[layer]
    x, weight, bn_weight, bn_bias, _ = conv_inputs(spec, 4, dtype, memory_format)
    out_size = F.conv_transpose2d if spec[5] else F.conv2d
    grad_seed = torch.randn_like(
        out_size(x.float(), weight.float(), stride=spec[3], padding=spec[4]), memory_format=memory_format
    )

    exact_in = as_double(x, weight, bn_weight, bn_bias)
    exact_running = running_stats(spec[1], torch.float64)
    exact_out, exact_grads = run_conv_bn_act(reference, *exact_in, exact_running, grad_seed, spec)

    eager_running = running_stats(spec[1])
    eager_out, eager_grads = run_conv_bn_act(
        reference, *leaves(x, weight, bn_weight, bn_bias), eager_running, grad_seed, spec
    )

    fused_running = running_stats(spec[1])
    with poisoned_outputs():
        fused_out, fused_grads = run_conv_bn_act(
            ops, *leaves(x, weight, bn_weight, bn_bias), fused_running, grad_seed, spec
        )
    assert_written(fused_out, *fused_grads)
    assert fused_out.dtype == dtype and fused_out.is_contiguous(memory_format=memory_format)
    assert_at_most_twice("out", fused_out, eager_out, exact_out)
    for name, fused, eager, exact in zip(
        ("x", "weight", "bn_weight", "bn_bias"), fused_grads, eager_grads, exact_grads, strict=True
    ):
        assert_at_most_twice(f"grad {name}", fused, eager, exact)
    for fused, eager, exact in zip(fused_running, eager_running, exact_running, strict=True):
        assert_at_most_twice("running statistics", fused, eager, exact)


@pytest.mark.parametrize("memory_format", LAYOUTS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("layer", CONV_BIAS_LAYERS, ids=str)
def test_conv_bias_act_low_precision(ops, layer, dtype, memory_format):
    spec = CONV_BIAS_LAYERS[layer]
    x, weight, _, _, bias = conv_inputs(spec, 4, dtype, memory_format, bias=True)

    def run(module, x, weight, bias):
        out = module.conv_bias_act(x, weight, bias, **conv_kwargs(spec))
        grad_out = grad_seed.to(out.dtype).contiguous(memory_format=_format_of(out))
        return out, torch.autograd.grad(out, [x, weight, bias], grad_out)

    out_shape = reference.conv_bias_act(x.float(), weight.float(), None, **conv_kwargs(spec)).shape
    grad_seed = torch.randn(out_shape, device="cuda")
    exact_out, exact_grads = run(reference, *as_double(x, weight, bias))
    eager_out, eager_grads = run(reference, *leaves(x, weight, bias))
    with poisoned_outputs():
        fused_out, fused_grads = run(ops, *leaves(x, weight, bias))
    assert_written(fused_out, *fused_grads)
    assert_at_most_twice("out", fused_out, eager_out, exact_out)
    for name, fused, eager, exact in zip(
        ("x", "weight", "bias"), fused_grads, eager_grads, exact_grads, strict=True
    ):
        assert_at_most_twice(f"grad {name}", fused, eager, exact)


@pytest.mark.parametrize("memory_format", LAYOUTS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("target_is_real", [True, False], ids=["real", "fake"])
@pytest.mark.parametrize("mode", ["vanilla", "lsgan"])
def test_gan_loss_low_precision(ops, mode, target_is_real, dtype, memory_format):
    logits = (3 * torch.randn(16, 1, 30, 30, device="cuda")).to(dtype).contiguous(memory_format=memory_format)

    def eager_loss(x):
        target = torch.full_like(x, 1.0 if target_is_real else 0.0)
        if mode == "vanilla":
            return F.binary_cross_entropy_with_logits(x, target)
        return F.mse_loss(x, target)

    def run(loss_fn, x):
        x = x.detach().clone().requires_grad_(True)
        loss = loss_fn(x)
        return loss, torch.autograd.grad(loss, x)[0]

    exact_loss, exact_grad = run(eager_loss, logits.double())
    eager_loss_value, eager_grad = run(eager_loss, logits)
    with poisoned_outputs():
        fused_loss, fused_grad = run(lambda x: ops.gan_loss(x, target_is_real, mode), logits)
    assert_written(fused_loss, fused_grad)
    assert fused_loss.dtype == torch.float32 and fused_loss.dim() == 0
    assert_at_most_twice("loss", fused_loss, eager_loss_value, exact_loss)
    assert_at_most_twice("grad", fused_grad, eager_grad, exact_grad)


@pytest.mark.parametrize("memory_format", LAYOUTS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_l1_loss_low_precision(ops, dtype, memory_format):
    pred = torch.randn(4, 3, 64, 64, device="cuda").to(dtype).contiguous(memory_format=memory_format)
    target = torch.randn(4, 3, 64, 64, device="cuda").to(dtype)

    def run(loss_fn, p):
        p = p.detach().clone().requires_grad_(True)
        loss = loss_fn(p)
        return loss, torch.autograd.grad(loss, p)[0]

    exact = run(lambda p: 100.0 * F.l1_loss(p, target.double()), pred.double())
    eager = run(lambda p: 100.0 * F.l1_loss(p, target), pred)
    with poisoned_outputs():
        fused = run(lambda p: ops.l1_loss(p, target, 100.0), pred)
    assert_written(*fused)
    assert_at_most_twice("loss", fused[0], eager[0], exact[0])
    assert_at_most_twice("grad", fused[1], eager[1], exact[1])


# --- float32 against the reference, and the running statistics ---------------------------------------------


@pytest.mark.parametrize("memory_format", LAYOUTS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("layer", CONV_BN_LAYERS, ids=str)
def test_conv_bn_act_float32_matches_reference(ops, layer, memory_format, no_tf32):
    spec = CONV_BN_LAYERS[layer]
    x, weight, bn_weight, bn_bias, _ = conv_inputs(spec, 4, torch.float32, memory_format)
    reference_running, fused_running = running_stats(spec[1]), running_stats(spec[1])
    out_ref = reference.conv_bn_act(x, weight, bn_weight, bn_bias, *reference_running, **conv_kwargs(spec))
    grad_seed = torch.randn_like(out_ref)
    ref_out, ref_grads = run_conv_bn_act(
        reference, *leaves(x, weight, bn_weight, bn_bias), running_stats(spec[1]), grad_seed, spec
    )
    with poisoned_outputs():
        out, grads = run_conv_bn_act(
            ops, *leaves(x, weight, bn_weight, bn_bias), fused_running, grad_seed, spec
        )
    assert_written(out, *grads)
    torch.testing.assert_close(out, ref_out)
    for got, expected in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, expected)
    # One update of the running statistics, as nn.BatchNorm2d does it (unbiased variance, momentum 0.1).
    for got, expected in zip(fused_running, reference_running, strict=True):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("memory_format", LAYOUTS, ids=["nchw", "channels_last"])
def test_eval_mode_uses_running_statistics(ops, memory_format, no_tf32):
    spec = CONV_BN_LAYERS["down"]
    x, weight, bn_weight, bn_bias, _ = conv_inputs(spec, 2, torch.float32, memory_format)
    running_mean = torch.randn(spec[1], device="cuda")
    running_var = torch.rand(spec[1], device="cuda") + 0.5
    kwargs = {**conv_kwargs(spec), "training": False}
    expected = reference.conv_bn_act(x, weight, bn_weight, bn_bias, running_mean, running_var, **kwargs)
    with poisoned_outputs():
        got = ops.conv_bn_act(
            x, weight, bn_weight, bn_bias, running_mean.clone(), running_var.clone(), **kwargs
        )
    assert_written(got)
    torch.testing.assert_close(got, expected)


# --- float32 at pix2pix sizes against reference.py in float64, rtol 1e-5 ---------------------------------
#
# Every op's values and gradients against reference.py (and, for the BatchNorm ops, F.batch_norm, whose
# pieces they are) evaluated in float64 on the same float32 inputs. The sizes give many blocks and partial
# states on a 132-SM GPU. test_cuda_emulation.py runs the same checks on the CPU with that GPU's grid.

EPS = 1e-5
# (N, C, H, W) and activation slope of unet_256 layers: an encoder level at batch 16; a decoder level at
# batch 1 (few large planes: the NCHW walks split them into column tiles); an inner level at batch 16 (512
# channels of 2x2 planes).
FLOAT32_LAYERS = {
    "enc_b16": ((16, 64, 64, 64), 0.2),
    "dec_b1": ((1, 64, 128, 128), 0.0),
    "inner_b16": ((16, 512, 2, 2), 0.0),
}
# The losses' inputs: PatchGAN's 30x30 patch map of a 256x256 image (GAN loss) and the generated image (L1).
PATCH_MAPS = {"patch_b1": (1, 1, 30, 30), "patch_b16": (16, 1, 30, 30)}
IMAGES = {"image_b1": (1, 3, 256, 256), "image_b16": (16, 3, 256, 256)}
# How far from the activation's kink (z = 0) an element must be for float32 rounding of z to be sure to
# pick the branch the float64 reference picks; closer elements get no incoming gradient.
KINK_MARGIN = 1e-4


def random_inputs(shape, memory_format, device, generator=None, count=2):
    """`count` float32 tensors of N(0, 1) values in `memory_format` (drawn on the CPU: reproducible)."""
    return [
        torch.randn(shape, generator=generator).to(device).contiguous(memory_format=memory_format)
        for _ in range(count)
    ]


def channel_params(channels, device, generator=None):
    """A BatchNorm weight around 1 and a bias around 0 (float32)."""
    weight = torch.rand(channels, generator=generator) + 0.5
    bias = torch.randn(channels, generator=generator) * 0.5
    return weight.to(device), bias.to(device)


def assert_float32_matches(results: dict, expected: dict) -> None:
    """Each float32 result within rtol 1e-5 of its float64 reference. The absolute floor, 1e-5 times the
    RMS of the expected tensor, is for elements that cancel to near zero, where no relative bound holds."""
    assert results.keys() == expected.keys()
    for name, value in results.items():
        exact = expected[name].detach().double()
        assert value.dtype == torch.float32, name
        assert not value.isnan().any(), f"{name}: NaN, an element no kernel wrote (outputs are poisoned)"
        atol = 1e-5 * exact.pow(2).mean().sqrt().item()
        torch.testing.assert_close(
            value.double(), exact, rtol=1e-5, atol=atol, msg=lambda m, name=name: f"{name}: {m}"
        )


def batch_norm_by_group(x, weight, bias, groups=1):
    """Training-mode F.batch_norm of each of `groups` equal consecutive parts of the batch on its own: what
    the grouped BatchNorm ops compute."""
    return torch.cat(
        [F.batch_norm(part, None, None, weight, bias, True, 0.0, EPS) for part in x.chunk(groups)]
    )


def away_from_kink(grad, x, weight, bias, slope, groups=1):
    """grad_out zeroed near the activation's kink (KINK_MARGIN), so that the float32 and float64 activations
    differentiate the same branch."""
    if slope == 1.0:
        return grad
    wd, bd = (t.double() if t is not None else None for t in (weight, bias))
    z = batch_norm_by_group(x.double(), wd, bd, groups)
    return grad.masked_fill(z.abs() < KINK_MARGIN, 0)


def bn_inputs(shape, memory_format, slope, device, generator=None, groups=1):
    """x (mean 0.5, spread 2), grad_out, weight and bias of a BatchNorm layer (of `groups` groups), with
    grad_out zeroed near the kink (away_from_kink)."""
    x, grad = random_inputs(shape, memory_format, device, generator)
    x = x * 2 + 0.5
    weight, bias = channel_params(shape[1], device, generator)
    return x, away_from_kink(grad, x, weight, bias, slope, groups), weight, bias


def reference_bn_ops(x, grad, weight, bias, slope, groups=1) -> dict:
    """The BN ops' results, from BatchNorm + activation in float64 differentiated by autograd; with groups,
    those of each group on its own, one group after another (the statistics and sums group-major)."""
    parts = [
        reference_bn_group(part, part_grad, weight, bias, slope)
        for part, part_grad in zip(x.chunk(groups), grad.chunk(groups), strict=True)
    ]
    return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}


def reference_bn_group(x, grad, weight, bias, slope) -> dict:
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, weight, bias))
    out = reference.activation(F.batch_norm(xd, None, None, wd, bd, True, 0.0, EPS), slope)
    out.backward(grad.double())
    var, mean = torch.var_mean(xd.detach(), dim=(0, 2, 3), correction=0)
    return {
        "mean": mean,
        "var": var,
        "out": out.detach(),
        "sum_dz": bd.grad,
        "sum_dz_xhat": wd.grad,
        "grad_x": xd.grad,
    }


def fused_bn_ops(lib, x, grad, weight, bias, slope, groups=1) -> dict:
    """bn_stats -> bn_act_forward -> bn_act_backward_reduce -> bn_act_backward_apply (training), of `groups`
    groups (passed only when not 1: the default of the op schemas and of the emulation's functions)."""
    by_group = (groups,) if groups != 1 else ()
    mean, var = lib.bn_stats(x, *by_group)
    out = lib.bn_act_forward(x, mean, var, weight, bias, EPS, slope, *by_group)
    sum_dz, sum_dz_xhat = lib.bn_act_backward_reduce(grad, x, mean, var, weight, bias, EPS, slope, *by_group)
    count = x.numel() // (x.shape[1] * groups)
    grad_x = lib.bn_act_backward_apply(
        grad, x, mean, var, weight, bias, sum_dz, sum_dz_xhat, count, EPS, slope, True, *by_group
    )
    assert out.stride() == grad_x.stride() == x.stride()
    return {
        "mean": mean,
        "var": var,
        "out": out,
        "sum_dz": sum_dz,
        "sum_dz_xhat": sum_dz_xhat,
        "grad_x": grad_x,
    }


def reference_bias_act(x, grad, bias, slope) -> dict:
    """bias + activation results (bias None: the flat walks), from reference.activation in float64."""
    xd = x.detach().double().requires_grad_()
    bd = bias.detach().double().requires_grad_() if bias is not None else None
    out = reference.activation(xd + bd.view(1, -1, 1, 1) if bd is not None else xd, slope)
    out.backward(grad.double())
    results = {"out": out, "grad_x": xd.grad}
    if bd is not None:
        results["grad_bias"] = bd.grad
    return results


def fused_bias_act(lib, x, grad, bias, slope) -> dict:
    out = lib.bias_act_forward(x, bias, slope)
    grad_x, grad_bias = lib.bias_act_backward(grad, out, slope, bias is not None)
    assert out.stride() == grad_x.stride() == x.stride()
    results = {"out": out, "grad_x": grad_x}
    if bias is not None:
        results["grad_bias"] = grad_bias
    return results


def reference_loss(loss_fn, *inputs) -> dict:
    """A reference loss in float64 and its gradient in the first input."""
    first = inputs[0].detach().double().requires_grad_()
    loss = loss_fn(first, *(t.double() for t in inputs[1:]))
    loss.backward()
    return {"loss": loss, "grad": first.grad}


def fused_loss(op, *args) -> dict:
    loss, grad = op(*args)
    assert grad.stride() == args[0].stride()
    return {"loss": loss, "grad": grad}


@pytest.mark.parametrize("memory_format", LAYOUTS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("layer", FLOAT32_LAYERS)
def test_bn_ops_float32_match_reference_at_pix2pix_sizes(ops, layer, memory_format):
    shape, slope = FLOAT32_LAYERS[layer]
    x, grad, weight, bias = bn_inputs(shape, memory_format, slope, "cuda")
    expected = reference_bn_ops(x, grad, weight, bias, slope)
    with poisoned_outputs():
        results = fused_bn_ops(torch.ops.fastpix2pix, x, grad, weight, bias, slope)
    assert_float32_matches(results, expected)


@pytest.mark.parametrize("memory_format", LAYOUTS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("layer", FLOAT32_LAYERS)
def test_bias_act_float32_matches_reference_at_pix2pix_sizes(ops, layer, with_bias, memory_format):
    shape, slope = FLOAT32_LAYERS[layer]
    x, grad = random_inputs(shape, memory_format, "cuda")
    bias = channel_params(shape[1], "cuda")[1] if with_bias else None
    expected = reference_bias_act(x, grad, bias, slope)
    with poisoned_outputs():
        results = fused_bias_act(torch.ops.fastpix2pix, x, grad, bias, slope)
    assert_float32_matches(results, expected)


@pytest.mark.parametrize("memory_format", LAYOUTS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("target_is_real", [True, False], ids=["real", "fake"])
@pytest.mark.parametrize("mode", ["vanilla", "lsgan"])
@pytest.mark.parametrize("patch_map", PATCH_MAPS)
def test_gan_loss_float32_matches_reference_at_pix2pix_sizes(
    ops, patch_map, mode, target_is_real, memory_format
):
    (logits,) = random_inputs(PATCH_MAPS[patch_map], memory_format, "cuda", count=1)
    logits = logits * 3
    expected = reference_loss(lambda x: reference.gan_loss(x, target_is_real, mode), logits)
    with poisoned_outputs():
        results = fused_loss(torch.ops.fastpix2pix.gan_loss, logits, target_is_real, mode, True)
    assert_float32_matches(results, expected)


@pytest.mark.parametrize("memory_format", LAYOUTS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("image", IMAGES)
def test_l1_loss_float32_matches_reference_at_pix2pix_sizes(ops, image, memory_format):
    pred, target = random_inputs(IMAGES[image], memory_format, "cuda")
    expected = reference_loss(lambda p, t: reference.l1_loss(p, t, 100.0), pred, target)
    with poisoned_outputs():
        results = fused_loss(torch.ops.fastpix2pix.l1_loss, pred, target, 100.0, True)
    assert_float32_matches(results, expected)


# --- groups: the discriminator's fake and real batches as one batch of two groups -------------------------
#
# A grouped op is the ungrouped op of each group on its own (fastpix2pix.cpp): against the float64 reference
# of each group, and bit for bit the ungrouped op on each group's view (the same memory, so the same vector
# width and grid). test_cuda_emulation.py runs the same checks on the CPU.

# PatchGAN levels of a 256x256 pair (N, C, H, W) with the fake and the real batch as 2 groups: the second and
# third level at batch 1, the fourth (stride 1, odd planes) at batch 16.
GROUPED_LAYERS = {
    "d2_b1": ((2, 128, 64, 64), 0.2),
    "d3_b1": ((2, 256, 32, 32), 0.2),
    "d4_b16": ((32, 512, 31, 31), 0.2),
}
# The targets of the discriminator's output for a fake and a real batch: the fake half, then the real one.
D_TARGETS = [False, True]


def reference_gan_losses(logits, targets_are_real, mode) -> dict:
    """reference.gan_loss of each group in float64, and on each group's elements the gradient of its loss."""
    x = logits.detach().double().requires_grad_()
    parts = x.chunk(len(targets_are_real))
    losses = torch.stack(
        [reference.gan_loss(part, real, mode) for part, real in zip(parts, targets_are_real, strict=True)]
    )
    losses.sum().backward()  # the groups are disjoint: each element's gradient is its own group's
    return {"loss": losses.detach(), "grad": x.grad}


def assert_groups_equal_each_alone(grouped: dict, alone: list[dict], groups: int) -> None:
    """Each of the grouped results, cut into its groups (along the batch, or the group-major vectors), is
    bitwise the result of the ungrouped op on that group alone."""
    for name, value in grouped.items():
        for g, (part, single) in enumerate(zip(value.chunk(groups), (a[name] for a in alone), strict=True)):
            assert torch.equal(part, single.reshape(part.shape)), f"{name}, group {g}"


@pytest.mark.parametrize("memory_format", LAYOUTS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("layer", GROUPED_LAYERS)
def test_grouped_bn_ops_float32_match_reference_at_pix2pix_sizes(ops, layer, memory_format):
    shape, slope = GROUPED_LAYERS[layer]
    x, grad, weight, bias = bn_inputs(shape, memory_format, slope, "cuda", groups=2)
    expected = reference_bn_ops(x, grad, weight, bias, slope, groups=2)
    with poisoned_outputs():
        results = fused_bn_ops(torch.ops.fastpix2pix, x, grad, weight, bias, slope, groups=2)
    assert_float32_matches(results, expected)


@pytest.mark.parametrize(
    "dtype, memory_format",
    [(torch.bfloat16, torch.channels_last), (torch.float32, torch.contiguous_format)],
    ids=["bf16-channels_last", "float32-nchw"],
)
@pytest.mark.parametrize("groups", [2, 3])
def test_grouped_bn_ops_equal_each_group_alone(ops, groups, dtype, memory_format):
    shape = (6, 128, 64, 64)
    x, grad, weight, bias = bn_inputs(shape, memory_format, 0.2, "cuda", groups=groups)
    x, grad = x.to(dtype), grad.to(dtype)
    with poisoned_outputs():
        grouped = fused_bn_ops(torch.ops.fastpix2pix, x, grad, weight, bias, 0.2, groups)
    assert_written(*grouped.values())
    alone = [
        fused_bn_ops(torch.ops.fastpix2pix, part, part_grad, weight, bias, 0.2)
        for part, part_grad in zip(x.chunk(groups), grad.chunk(groups), strict=True)
    ]
    assert_groups_equal_each_alone(grouped, alone, groups)


@pytest.mark.parametrize("memory_format", LAYOUTS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("mode", ["vanilla", "lsgan"])
@pytest.mark.parametrize("patch_map", PATCH_MAPS)
def test_gan_losses_float32_match_reference_at_pix2pix_sizes(ops, patch_map, mode, memory_format):
    n, c, h, w = PATCH_MAPS[patch_map]
    (logits,) = random_inputs((2 * n, c, h, w), memory_format, "cuda", count=1)
    logits = logits * 3
    expected = reference_gan_losses(logits, D_TARGETS, mode)
    with poisoned_outputs():
        results = fused_loss(torch.ops.fastpix2pix.gan_losses, logits, D_TARGETS, mode, True)
    assert results["loss"].shape == (2,)
    assert_float32_matches(results, expected)


@pytest.mark.parametrize("memory_format", LAYOUTS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("targets", [D_TARGETS, [True, False, True]], ids=["fake_real", "three"])
def test_gan_losses_equal_each_group_alone(ops, targets, dtype, memory_format):
    lib = torch.ops.fastpix2pix
    logits = (3 * torch.randn(16 * len(targets), 1, 30, 30, device="cuda")).to(dtype)
    logits = logits.contiguous(memory_format=memory_format)
    with poisoned_outputs():
        losses, grad = lib.gan_losses(logits, targets, "vanilla", True)
    assert_written(losses, grad)
    assert losses.dtype == torch.float32 and grad.stride() == logits.stride()
    alone = [
        dict(zip(("loss", "grad"), lib.gan_loss(part, real, "vanilla", True), strict=True))
        for part, real in zip(logits.chunk(len(targets)), targets, strict=True)
    ]
    assert_groups_equal_each_alone({"loss": losses, "grad": grad}, alone, len(targets))


def test_grouped_ops_do_not_synchronise(ops):
    """The D step's grouped ops (BatchNorm pieces and the fake/real losses) under sync-debug mode "error"."""
    lib = torch.ops.fastpix2pix
    x, grad, weight, bias = bn_inputs((4, 128, 16, 16), torch.channels_last, 0.2, "cuda", groups=2)
    x, grad = x.bfloat16(), grad.bfloat16()
    logits = torch.randn(4, 1, 30, 30, device="cuda", dtype=torch.bfloat16)
    fused_bn_ops(lib, x, grad, weight, bias, 0.2, 2)  # warm-up: allocator pools
    lib.gan_losses(logits, D_TARGETS, "vanilla", True)
    torch.cuda.synchronize()
    with sync_is_error(), poisoned_outputs():
        results = fused_bn_ops(lib, x, grad, weight, bias, 0.2, 2)
        losses, logits_grad = lib.gan_losses(logits, D_TARGETS, "lsgan", True)
    torch.cuda.synchronize()
    assert_written(*results.values(), losses, logits_grad)


# --- layouts and shapes the kernels treat specially --------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize(
    "shape", [(16, 512, 1, 1), (4, 3, 33, 17), (2, 64, 2, 2), (1, 1, 256, 256), (3, 24, 7, 5)], ids=str
)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided", "unaligned"])
def test_fused_bn_ops_every_path(ops, shape, dtype, layout):
    """bn_stats -> bn_act_forward -> backward_reduce -> backward_apply against float64 math."""
    lib = torch.ops.fastpix2pix
    x = _make(shape, layout, dtype)
    grad = _make(shape, "nchw", dtype)
    channels = shape[1]
    weight = torch.randn(channels, device="cuda") + 1
    bias = torch.randn(channels, device="cuda")
    eps, slope = 1e-5, 0.2
    with poisoned_outputs():
        mean, var = lib.bn_stats(x)
    assert_written(mean, var)
    xd = x.double()
    tol = {} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(mean.double(), xd.mean((0, 2, 3)), **tol)
    torch.testing.assert_close(var.double(), xd.var((0, 2, 3), unbiased=False), **tol)

    with poisoned_outputs():
        out = lib.bn_act_forward(x, mean, var, weight, bias, eps, slope)
    assert_written(out)
    assert out.stride() == torch.empty_like(x).stride()
    xhat = (xd - mean.double().view(1, -1, 1, 1)) * torch.rsqrt(var.double().view(1, -1, 1, 1) + eps)
    z = xhat * weight.double().view(1, -1, 1, 1) + bias.double().view(1, -1, 1, 1)
    torch.testing.assert_close(out, torch.where(z > 0, z, slope * z).to(dtype))

    with poisoned_outputs():
        sum_dz, sum_dz_xhat = lib.bn_act_backward_reduce(grad, x, mean, var, weight, bias, eps, slope)
    assert_written(sum_dz, sum_dz_xhat)
    dz = torch.where(z > 0, grad.double(), slope * grad.double())
    sum_tol = {} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-3}
    torch.testing.assert_close(sum_dz.double(), dz.sum((0, 2, 3)), **sum_tol)
    torch.testing.assert_close(sum_dz_xhat.double(), (dz * xhat).sum((0, 2, 3)), **sum_tol)

    count = x.numel() // channels
    with poisoned_outputs():
        grad_x = lib.bn_act_backward_apply(
            grad, x, mean, var, weight, bias, sum_dz, sum_dz_xhat, count, eps, slope, True
        )
    assert_written(grad_x)
    scale = (weight.double() * torch.rsqrt(var.double() + eps)).view(1, -1, 1, 1)
    expected = scale * (
        dz - sum_dz.double().view(1, -1, 1, 1) / count - xhat * sum_dz_xhat.double().view(1, -1, 1, 1) / count
    )
    torch.testing.assert_close(grad_x, expected.to(dtype))


def _make(shape, layout: str, dtype: torch.dtype) -> torch.Tensor:
    n, c, h, w = shape
    if layout == "nchw":
        return torch.randn(shape, device="cuda").to(dtype)
    if layout == "channels_last":
        return torch.randn(shape, device="cuda").to(dtype).contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        return torch.randn(n, c, h, 2 * w, device="cuda").to(dtype)[..., ::2]
    if layout == "unaligned":  # an odd element offset: the 16-byte vector path must not be taken
        return torch.randn(n * c * h * w + 1, device="cuda").to(dtype)[1:].view(shape)
    raise ValueError(layout)


# --- the written-element checks' poisoning -----------------------------------------------------------------


def test_poisoned_outputs_reach_small_cached_blocks():
    """A small tensor in a block the caching allocator hands back (here one just freed, holding 1s) starts
    as NaN in every float dtype: what the written-element checks rely on."""
    before = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        cached = torch.ones(7, device="cuda", dtype=dtype)
        del cached
        with poisoned_outputs():
            fresh = torch.empty(7, device="cuda", dtype=dtype)
            like = torch.empty_like(fresh)
        assert fresh.isnan().all() and like.isnan().all()
    assert (
        torch.are_deterministic_algorithms_enabled(),
        torch.utils.deterministic.fill_uninitialized_memory,
    ) == before


# --- no synchronisation, determinism, devices --------------------------------------------------------------


def test_d_step_losses_on_one_stream_without_sync(ops):
    """The D step: the fake and the real loss, their sum and its backward, with no host synchronisation."""
    fake = torch.randn(16, 1, 30, 30, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    real = torch.randn(16, 1, 30, 30, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with sync_is_error(), poisoned_outputs():
        loss_d = 0.5 * (ops.gan_loss(fake, False) + ops.gan_loss(real, True))
        loss_d.backward()
    expected = 0.5 * (reference.gan_loss(fake.detach(), False) + reference.gan_loss(real.detach(), True))
    torch.testing.assert_close(loss_d.detach(), expected, rtol=1e-5, atol=1e-6)
    assert_written(fake.grad, real.grad)


@pytest.mark.parametrize("memory_format", LAYOUTS, ids=["nchw", "channels_last"])
def test_training_step_ops_do_not_synchronise(ops, memory_format):
    """Every fused op of a training step, forward and backward, under sync-debug mode "error"."""
    spec = CONV_BN_LAYERS["down"]
    x, weight, bn_weight, bn_bias, bias = leaves(
        *conv_inputs(spec, 4, torch.bfloat16, memory_format, bias=True)
    )
    running = running_stats(spec[1])
    target = torch.randn(4, 128, 8, 8, device="cuda", dtype=torch.bfloat16)
    ops.gan_loss(
        ops.conv_bn_act(x, weight, bn_weight, bn_bias, *running, **conv_kwargs(spec)), True
    ).backward()
    torch.cuda.synchronize()  # warmed up: library handles and allocator pools exist
    with sync_is_error(), poisoned_outputs():
        h = ops.conv_bn_act(x, weight, bn_weight, bn_bias, *running, **conv_kwargs(spec))
        h2 = ops.conv_bias_act(x, weight, bias, **conv_kwargs(spec))
        loss = ops.l1_loss(h, target, 100.0) + ops.gan_loss(h2, True) + ops.gan_loss(h2, False, "lsgan")
        loss.backward()
    torch.cuda.synchronize()
    assert_written(x.grad, weight.grad, bn_weight.grad, bn_bias.grad, bias.grad)


def test_results_are_deterministic(ops):
    lib = torch.ops.fastpix2pix
    x = torch.randn(16, 64, 64, 64, device="cuda", dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last
    )
    grad = torch.randn_like(x)
    mean, var = lib.bn_stats(x)
    sums = lib.bn_act_backward_reduce(grad, x, mean, var, None, None, 1e-5, 0.2)
    loss = lib.gan_loss(x, True, "vanilla", True)
    for _ in range(3):
        assert all(torch.equal(a, b) for a, b in zip((mean, var), lib.bn_stats(x), strict=True))
        again = lib.bn_act_backward_reduce(grad, x, mean, var, None, None, 1e-5, 0.2)
        assert all(torch.equal(a, b) for a, b in zip(sums, again, strict=True))
        assert all(
            torch.equal(a, b) for a, b in zip(loss, lib.gan_loss(x, True, "vanilla", True), strict=True)
        )


def test_mixed_devices_are_rejected(ops):
    lib = torch.ops.fastpix2pix
    x = torch.randn(2, 4, 3, 3, device="cuda")
    mean, var = torch.zeros(4), torch.ones(4)
    with pytest.raises(RuntimeError, match="mean is on cpu"):
        lib.bn_act_forward(x, mean, var.cuda(), None, None, 1e-5, 0.0)
    with pytest.raises(RuntimeError, match="x is on cpu"):
        lib.bn_act_forward(x.cpu(), mean.cuda(), var.cuda(), None, None, 1e-5, 0.0)
    with pytest.raises(RuntimeError, match="target is on cpu"):
        lib.l1_loss(x, x.cpu(), 1.0, False)


def test_other_device_index(ops):
    """Work on a second GPU runs there (the device guard), not on the current device."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    x = torch.randn(4, 8, 5, 5, device="cuda:1")
    mean, _ = torch.ops.fastpix2pix.bn_stats(x)
    assert mean.device == x.device
    torch.testing.assert_close(mean, x.mean((0, 2, 3)))


# --- CUDA graphs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("memory_format", LAYOUTS, ids=["nchw", "channels_last"])
def test_conv_bn_act_cuda_graph_replay_matches_eager(ops, memory_format):
    spec = CONV_BN_LAYERS["down"]
    x, weight, bn_weight, bn_bias, _ = conv_inputs(spec, 8, torch.bfloat16, memory_format)
    params = leaves(weight, bn_weight, bn_bias)
    static_x = x.clone()
    running = running_stats(spec[1])
    out_shape = (8, spec[1], 8, 8)
    static_grad = torch.randn(out_shape, device="cuda", dtype=torch.bfloat16).contiguous(
        memory_format=memory_format
    )

    def step():
        out = ops.conv_bn_act(static_x, *params, *running, **conv_kwargs(spec))
        out.backward(static_grad)
        return out

    # Outputs allocated during capture are NaN-filled by the graph itself at each replay: the replay
    # must write every element again.
    with poisoned_outputs():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph (cuDNN plans, allocator pools)
            for _ in range(3):
                for p in params:
                    p.grad = None
                step()
        torch.cuda.current_stream().wait_stream(side)

        graph = torch.cuda.CUDAGraph()
        for p in params:
            p.grad = None
        with torch.cuda.graph(graph):
            static_out = step()

        # New data into the static inputs, fresh running statistics, then one replay against one eager step.
        static_x.copy_(torch.randn_like(static_x))
        static_grad.copy_(torch.randn_like(static_grad))
        start = [r.clone() for r in running]
        for r, s in zip(running, start, strict=True):
            r.copy_(s)
        graph.replay()
        replayed = [static_out.clone(), *(p.grad.clone() for p in params), *(r.clone() for r in running)]

        for r, s in zip(running, start, strict=True):
            r.copy_(s)
        eager_params = leaves(*params)
        out = ops.conv_bn_act(static_x, *eager_params, *running, **conv_kwargs(spec))
        out.backward(static_grad)
        eager = [out, *(p.grad for p in eager_params), *running]
        for got, expected in zip(replayed, eager, strict=True):
            assert_written(got)
            torch.testing.assert_close(got, expected)


# --- past 2**31 elements -----------------------------------------------------------------------------------


def _free_gpu_bytes() -> int:
    free, _ = torch.cuda.mem_get_info()
    return free


@pytest.mark.slow
@pytest.mark.parametrize(
    "shape, memory_format",
    [
        ((1, 8, 16384, 16385), torch.channels_last),  # channels_last rows past 2**31 / 8
        ((1, 2, 32768, 32769), torch.contiguous_format),  # NCHW planes of 2**30 elements
        ((1, 1, 46341, 46341), torch.contiguous_format),  # one channel of more than 2**31 values
    ],
    ids=["channels_last", "nchw", "one_channel"],
)
def test_past_2_to_the_31_elements(ops, shape, memory_format):
    numel = shape[0] * shape[1] * shape[2] * shape[3]
    assert numel > 2**31
    needed = 2 * numel * 2 + (2 << 30)  # bf16 input and output, and some room
    if _free_gpu_bytes() < needed:
        pytest.skip(f"needs {needed / 2**30:.1f} GiB of free GPU memory")
    lib = torch.ops.fastpix2pix
    x = torch.empty(shape, device="cuda", dtype=torch.bfloat16, memory_format=memory_format)
    x.normal_(3.0, 2.0)
    mean, var = lib.bn_stats(x)
    # float64 statistics, one image row block at a time (a float64 copy of x would not fit).
    total = torch.zeros(shape[1], device="cuda", dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    for rows in torch.split(x, 1024, dim=2):
        r = rows.double() - 3.0
        total += r.sum((0, 2, 3))
        total_sq += (r * r).sum((0, 2, 3))
    count = numel // shape[1]
    exact_mean = total / count + 3.0
    exact_var = total_sq / count - (total / count) ** 2
    torch.testing.assert_close(mean.double(), exact_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double(), exact_var, rtol=1e-4, atol=1e-4)

    with poisoned_outputs():
        out = lib.bn_act_forward(x, mean, var, None, None, 1e-5, 0.2)
    assert out.is_contiguous(memory_format=memory_format)
    assert_written(out)
    # Spot checks by index (no copy of the 4 GiB tensors): random elements, and the last image row of every
    # channel, which holds the last memory offsets (past 2**31) in either layout.
    n, c, h, w = shape
    last = torch.arange(c * 64, device="cuda")
    index = [
        torch.cat([torch.randint(0, n, (4096,), device="cuda"), torch.full_like(last, n - 1)]),
        torch.cat([torch.randint(0, c, (4096,), device="cuda"), last // 64]),
        torch.cat([torch.randint(0, h, (4096,), device="cuda"), torch.full_like(last, h - 1)]),
        torch.cat([torch.randint(0, w, (4096,), device="cuda"), w - 1 - last % 64]),
    ]
    z = (x[index].double() - mean.double()[index[1]]) * torch.rsqrt(var.double()[index[1]] + 1e-5)
    torch.testing.assert_close(out[index], torch.where(z > 0, z, 0.2 * z).to(torch.bfloat16))
