"""The fused ops (``fastpix2pix.ops`` and ``torch.ops.fastpix2pix``) against the plain-PyTorch specification
``fastpix2pix.ops.reference``: outputs, gradients, running statistics, layouts, dtypes, edge cases, errors,
and the custom-op contract (``opcheck``, ``gradcheck``, ``torch.compile``).

Every test runs on each of ``DEVICES``: the CPU always, the GPU when there is one and the CUDA kernels
are built.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastpix2pix._extension import cuda_kernels_available, extension_available

if not extension_available():
    pytest.skip(
        "the compiled operator library fastpix2pix._C is not built "
        "(`pip install --no-build-isolation -e .`); the fused ops cannot be tested",
        allow_module_level=True,
    )

from fastpix2pix.ops import fused as ops  # (needs the library, checked above)
from fastpix2pix.ops import reference

lib = torch.ops.fastpix2pix

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available on this machine"),
            pytest.mark.skipif(
                not cuda_kernels_available(), reason="fastpix2pix._C was built without its CUDA kernels"
            ),
        ],
    ),
]
SLOPES = [0.0, 0.2, 1.0]  # ReLU, LeakyReLU(0.2), identity
EPS = 1e-5


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def leaf(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().clone().requires_grad_(t.requires_grad)


def grads(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.grad for t in tensors]


# --- the blocks through the public functions -----------------------------------------------------------


def conv_case(device, transposed, *, batch=2, size=(9, 7), cin=3, cout=4, dtype=torch.float32):
    """A small convolution (stride 2, 4x4 kernel, as pix2pix's) and its keyword arguments."""
    x = torch.randn(batch, cin, *size, device=device, dtype=dtype, requires_grad=True)
    shape = (cin, cout, 4, 4) if transposed else (cout, cin, 4, 4)
    weight = (torch.randn(shape, device=device, dtype=dtype) * 0.2).requires_grad_()
    kwargs = {"stride": (2, 2), "padding": (1, 1), "transposed": transposed}
    if transposed:
        kwargs["output_padding"] = (1, 0)
    return x, weight, kwargs


def bn_params(cout, device, affine, dtype=torch.float32):
    bn_weight = (torch.rand(cout, device=device, dtype=dtype) + 0.5).requires_grad_() if affine else None
    bn_bias = torch.randn(cout, device=device, dtype=dtype).requires_grad_() if affine else None
    running_mean = torch.randn(cout, device=device, dtype=dtype) * 0.1
    running_var = torch.rand(cout, device=device, dtype=dtype) + 0.5
    return bn_weight, bn_bias, running_mean, running_var


def run_conv_bn_act(impl, x, weight, bn_weight, bn_bias, running_mean, running_var, grad_seed=1, **kwargs):
    """Forward and backward of one implementation on copies of the inputs."""
    x, weight, bn_weight, bn_bias = leaf(x), leaf(weight), leaf(bn_weight), leaf(bn_bias)
    running_mean, running_var = running_mean.clone(), running_var.clone()
    out = impl(x, weight, bn_weight, bn_bias, running_mean, running_var, **kwargs)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out)
    out.backward(grad_out)
    return {
        "out": out,
        "grads": grads(x, weight, bn_weight, bn_bias),
        "running": (running_mean, running_var),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "convT"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("negative_slope", SLOPES)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_conv_bn_act_matches_reference(device, transposed, training, negative_slope, affine):
    x, weight, kwargs = conv_case(device, transposed)
    params = bn_params(4, device, affine)
    kwargs |= {"training": training, "negative_slope": negative_slope, "momentum": 0.3}
    fused = run_conv_bn_act(ops.conv_bn_act, x, weight, *params, **kwargs)
    expected = run_conv_bn_act(reference.conv_bn_act, x, weight, *params, **kwargs)
    torch.testing.assert_close(fused, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "convT"])
@pytest.mark.parametrize("negative_slope", SLOPES)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_conv_bias_act_matches_reference(device, transposed, negative_slope, with_bias):
    x, weight, kwargs = conv_case(device, transposed)
    bias = torch.randn(4, device=device, requires_grad=True) if with_bias else None
    results = []
    for impl in (ops.conv_bias_act, reference.conv_bias_act):
        inputs = [leaf(x), leaf(weight), leaf(bias)]
        out = impl(*inputs, negative_slope=negative_slope, **kwargs)
        out.backward(torch.linspace(-1, 1, out.numel(), device=device).reshape(out.shape))
        results.append((out, grads(*inputs)))
    torch.testing.assert_close(*results)


# --- the low-level ops directly ------------------------------------------------------------------------


def bn_reference(x, mean, var, weight, bias, negative_slope):
    y = (x - mean[:, None, None]) * torch.rsqrt(var[:, None, None] + EPS)
    if weight is not None:
        y = y * weight[:, None, None] + bias[:, None, None]
    return reference.activation(y, negative_slope)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("negative_slope", SLOPES)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_bn_ops_match_autograd_of_reference(device, negative_slope, affine):
    x = torch.randn(3, 5, 7, 5, device=device) * 2 + 1
    weight = torch.rand(5, device=device) + 0.5 if affine else None
    bias = torch.randn(5, device=device) if affine else None
    grad_out = torch.randn_like(x)

    mean, var = lib.bn_stats(x)
    expected_var, expected_mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    torch.testing.assert_close((mean, var), (expected_mean, expected_var))
    out = lib.bn_act_forward(x, mean, var, weight, bias, EPS, negative_slope)

    # The reference: batch norm + activation, differentiated by autograd through the batch statistics.
    xr, wr, br = leaf(x).requires_grad_(), leaf(weight), leaf(bias)
    if affine:
        wr.requires_grad_(), br.requires_grad_()
    expected = reference.activation(F.batch_norm(xr, None, None, wr, br, True, 0.1, EPS), negative_slope)
    expected.backward(grad_out)
    torch.testing.assert_close(out, expected)

    sum_dz, sum_dz_xhat = lib.bn_act_backward_reduce(
        grad_out, x, mean, var, weight, bias, EPS, negative_slope
    )
    dz = grad_out * torch.where(expected > 0, 1.0, negative_slope)
    xhat = (x - mean[:, None, None]) * torch.rsqrt(var[:, None, None] + EPS)
    torch.testing.assert_close(sum_dz, dz.sum((0, 2, 3)))
    torch.testing.assert_close(sum_dz_xhat, (dz * xhat).sum((0, 2, 3)))
    if affine:
        torch.testing.assert_close((sum_dz_xhat, sum_dz), (wr.grad, br.grad))
    count = x.numel() // x.shape[1]
    grad_x = lib.bn_act_backward_apply(
        grad_out, x, mean, var, weight, bias, sum_dz, sum_dz_xhat, count, EPS, negative_slope, True
    )
    torch.testing.assert_close(grad_x, xr.grad)

    # Eval: the statistics are constants, the gradient is dz * weight * invstd; the sums are not read.
    unused = torch.full_like(mean, float("nan"))
    grad_eval = lib.bn_act_backward_apply(
        grad_out, x, mean, var, weight, bias, unused, unused, 0, EPS, negative_slope, False
    )
    scale = torch.rsqrt(var + EPS) * (weight if affine else 1.0)
    torch.testing.assert_close(grad_eval, dz * scale[:, None, None])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("negative_slope", SLOPES)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_bias_act_ops(device, negative_slope, with_bias):
    x = torch.randn(2, 6, 5, 7, device=device)
    bias = torch.randn(6, device=device) if with_bias else None
    out = lib.bias_act_forward(x, bias, negative_slope)
    z = x + bias[:, None, None] if with_bias else x
    torch.testing.assert_close(out, reference.activation(z, negative_slope))
    grad_out = torch.randn_like(out)
    for need_bias_grad in (True, False):
        grad_x, grad_bias = lib.bias_act_backward(grad_out, out, negative_slope, need_bias_grad)
        dz = grad_out * torch.where(z > 0, 1.0, negative_slope)
        torch.testing.assert_close(grad_x, dz)
        if need_bias_grad:
            torch.testing.assert_close(grad_bias, dz.sum((0, 2, 3)))
        else:
            assert grad_bias is None


@pytest.mark.parametrize("device", DEVICES)
def test_bias_gradient_of_a_bf16_block_is_float32(device):
    """The bias stays float32 under autocast; its gradient, a sum over N*H*W, comes back in float32 (no
    cast kernel after the op, no bf16 rounding of the sum: within float32 rounding of the float64 sum)."""
    out = lib.bias_act_forward(torch.randn(4, 8, 16, 16, device=device).to(torch.bfloat16), None, 0.2)
    grad_out = torch.randn_like(out)
    _, grad_bias = lib.bias_act_backward(grad_out, out, 0.2, True)
    assert grad_bias.dtype == torch.float32
    dz = grad_out.double() * torch.where(out.double() > 0, 1.0, 0.2)
    torch.testing.assert_close(grad_bias.double(), dz.sum((0, 2, 3)), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_bn_stats_keep_precision_with_a_large_mean(device):
    """Spread 0.1 around 1e4 (float32 keeps ~3 digits of the spread): naive sums of squares cancel.

    On the CPU the statistics accumulate in float64 (ATen's CPU accumulation type) and are exact to 1e-6.
    On CUDA they accumulate in float32, as PyTorch's own CUDA statistics do: Welford/Chan keeps the spread,
    but a float32 running mean near 1e4 is off by its rounding, ~1e-4 of the variance here (the first GPU
    run, an H200, failed the CPU's 1e-6). There the yardstick is PyTorch's float32 CUDA var_mean: at most
    twice its error against float64."""
    for memory_format in (torch.contiguous_format, torch.channels_last):
        x = (torch.randn(4, 8, 33, 31, device=device) * 0.1 + 1e4).contiguous(memory_format=memory_format)
        mean, var = lib.bn_stats(x)
        expected_var, expected_mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
        if x.is_cuda:
            torch_var, torch_mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
            for ours, theirs, exact in ((mean, torch_mean, expected_mean), (var, torch_var, expected_var)):
                error = ((ours.double() - exact).abs() / exact.abs()).max()
                torch_error = ((theirs.double() - exact).abs() / exact.abs()).max()
                assert error <= max(2 * torch_error, 1e-6), (float(error), float(torch_error))
        else:
            torch.testing.assert_close(
                (mean.double(), var.double()), (expected_mean, expected_var), rtol=1e-6, atol=0
            )
        # Given the statistics, the apply pass is exact too: x - mean is taken before any rounding.
        out = lib.bn_act_forward(x, mean, var, None, None, EPS, 1.0)
        expected_out = (x.double() - mean.double()[:, None, None]) * torch.rsqrt(var.double() + EPS)[
            :, None, None
        ]
        torch.testing.assert_close(out.double(), expected_out, rtol=1e-5, atol=1e-5)


# --- losses ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["vanilla", "lsgan"])
@pytest.mark.parametrize("target_is_real", [True, False], ids=["real", "fake"])
def test_gan_loss_matches_reference(device, mode, target_is_real):
    logits = torch.randn(4, 1, 30, 30, device=device) * 3
    logits[0, 0, 0, :4] = torch.tensor([1e4, -1e4, 0.0, 30.0])  # saturated and exactly-zero logits
    results = []
    for impl in (ops.gan_loss, reference.gan_loss):
        x = leaf(logits).requires_grad_()
        loss = impl(x, target_is_real, mode)
        loss.backward(torch.tensor(0.5, device=device))
        results.append((loss, x.grad))
    (loss, grad), expected = results
    assert loss.dim() == 0 and loss.dtype == torch.float32 and torch.isfinite(loss)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close((loss, grad), expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("target_is_real", [True, False], ids=["real", "fake"])
def test_gan_loss_is_stable_for_huge_logits(device, target_is_real):
    logits = torch.tensor([1e4, -1e4, 1e4, -1e4], device=device).reshape(1, 1, 2, 2)
    loss, grad = lib.gan_loss(logits, target_is_real, "vanilla", True)
    # BCE of a logit of -1e4 against its target 1 (or +1e4 against 0) is 1e4; the right ones cost 0.
    torch.testing.assert_close(loss, torch.tensor(5e3, device=device))
    wrong = (logits < 0) if target_is_real else (logits > 0)
    expected_grad = torch.where(wrong, -0.25 if target_is_real else 0.25, 0.0)
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weight", [1.0, 100.0])
def test_l1_loss_matches_reference(device, weight):
    pred = torch.randn(2, 3, 17, 13, device=device)
    target = torch.randn(2, 3, 17, 13, device=device)
    results = []
    for impl in (ops.l1_loss, reference.l1_loss):
        p, t = leaf(pred).requires_grad_(), leaf(target).requires_grad_()
        loss = impl(p, t, weight)
        loss.backward()
        results.append((loss, p.grad, t.grad))
    torch.testing.assert_close(*results)


@pytest.mark.parametrize("device", DEVICES)
def test_l1_loss_with_mixed_dtypes_compares_in_float32(device):
    pred = torch.randn(2, 3, 8, 8, device=device).bfloat16().requires_grad_()
    target = torch.randn(2, 3, 8, 8, device=device)
    loss = ops.l1_loss(pred, target, 2.0)
    loss.backward()
    torch.testing.assert_close(loss, reference.l1_loss(pred.detach(), target, 2.0))
    assert loss.dtype == torch.float32 and pred.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("device", DEVICES)
def test_losses_without_grad_return_none(device):
    logits = torch.randn(2, 1, 4, 4, device=device)
    assert lib.gan_loss(logits, True, "lsgan", False)[1] is None
    assert lib.l1_loss(logits, logits * 2, 1.0, False)[1] is None
    with torch.no_grad():  # the wrappers ask for no gradient here
        assert ops.gan_loss(logits.requires_grad_(), True).requires_grad is False


# --- NaN and infinity: the derivatives PyTorch takes there -------------------------------------------------
#
# ReLU's backward (threshold_backward) zeroes the gradient where the output is <= 0, so at a NaN input, whose
# output is NaN, the gradient passes; LeakyReLU's tests the input, x > 0, so a NaN input gets slope * grad.
# L1's backward is sign(pred - target), and sign(NaN) is 0. The fused ops give the same on every device.

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("negative_slope", SLOPES)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_bias_act_at_nonfinite_inputs_matches_pytorch(device, negative_slope, with_bias):
    x = torch.randn(2, 8, 4, 4, device=device)
    x[0, :, 0, 0], x[1, :, 1, 1], x[1, :, 2, 2] = NAN, INF, -INF
    grad_out = torch.randn_like(x)
    grad_out[0, :, 3, :] = INF  # an infinite gradient: ReLU selects it away where z <= 0
    bias = torch.randn(8, device=device) if with_bias else None

    xr, br = x.clone().requires_grad_(), leaf(bias)
    if with_bias:
        br.requires_grad_()
    expected = reference.activation(xr + br[:, None, None] if with_bias else xr, negative_slope)
    expected.backward(grad_out)

    out = lib.bias_act_forward(x, bias, negative_slope)
    torch.testing.assert_close(out, expected, equal_nan=True)
    grad_x, grad_bias = lib.bias_act_backward(grad_out, out, negative_slope, with_bias)
    torch.testing.assert_close(grad_x, xr.grad, equal_nan=True)
    if with_bias:
        torch.testing.assert_close(grad_bias, br.grad, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("negative_slope", SLOPES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bn_act_at_a_nan_input_matches_pytorch(device, negative_slope, training):
    """Eval: the NaN stays at its element, whose gradient ReLU passes. Training: it makes the channel's
    statistics NaN, and with them every z of the channel; the bias gradient (the sum of the passed gradients)
    stays finite, as PyTorch's does."""
    x = torch.randn(3, 4, 5, 5, device=device)
    x[1, 2, 3, 3] = NAN
    weight, bias = torch.rand(4, device=device) + 0.5, torch.randn(4, device=device)
    running_mean, running_var = torch.randn(4, device=device), torch.rand(4, device=device) + 0.5
    grad_out = torch.randn_like(x)

    xr, wr, br = (t.clone().requires_grad_() for t in (x, weight, bias))
    normalized = F.batch_norm(xr, running_mean.clone(), running_var.clone(), wr, br, training, 0.1, EPS)
    expected = reference.activation(normalized, negative_slope)
    expected.backward(grad_out)

    mean, var = lib.bn_stats(x) if training else (running_mean, running_var)
    out = lib.bn_act_forward(x, mean, var, weight, bias, EPS, negative_slope)
    torch.testing.assert_close(out, expected, equal_nan=True)
    sum_dz, sum_dz_xhat = lib.bn_act_backward_reduce(
        grad_out, x, mean, var, weight, bias, EPS, negative_slope
    )
    torch.testing.assert_close((sum_dz_xhat, sum_dz), (wr.grad, br.grad), equal_nan=True)
    count = x.numel() // x.shape[1]
    grad_x = lib.bn_act_backward_apply(
        grad_out, x, mean, var, weight, bias, sum_dz, sum_dz_xhat, count, EPS, negative_slope, training
    )
    torch.testing.assert_close(grad_x, xr.grad, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (3, 5, 7)], ids=["vectors", "odd"])
def test_l1_loss_gradient_at_a_nan_difference_is_zero(device, shape):
    pred, target = torch.randn(shape, device=device), torch.randn(shape, device=device)
    pred.view(-1)[:4] = torch.tensor([NAN, INF, -INF, 0.5])
    target.view(-1)[:5] = torch.tensor([0.0, INF, 1.0, NAN, NAN])  # NaN, inf - inf, -inf, NaN, NaN
    results = []
    for impl in (ops.l1_loss, reference.l1_loss):
        p, t = leaf(pred).requires_grad_(), leaf(target).requires_grad_()
        loss = impl(p, t, 10.0)
        loss.backward()
        results.append((loss, p.grad, t.grad))
    torch.testing.assert_close(*results, equal_nan=True)
    assert results[0][0].isnan()
    assert (results[0][1].view(-1)[[0, 1, 3, 4]] == 0).all() and results[0][1].view(-1)[2] < 0


# --- gradcheck (float64) -----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "convT"])
def test_gradcheck_conv_bn_act(device, training, transposed):
    x, weight, kwargs = conv_case(device, transposed, size=(5, 4), cin=2, cout=3, dtype=torch.float64)
    bn_weight, bn_bias, running_mean, running_var = bn_params(3, device, True, torch.float64)
    # Running statistics are left out in training, so that no call mutates state between evaluations.
    stats = (None, None) if training else (running_mean, running_var)

    def fn(x, weight, bn_weight, bn_bias):
        return ops.conv_bn_act(
            x, weight, bn_weight, bn_bias, *stats, training=training, negative_slope=0.2, **kwargs
        )

    assert torch.autograd.gradcheck(fn, (x, weight, bn_weight, bn_bias), fast_mode=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "convT"])
def test_gradcheck_conv_bias_act(device, transposed):
    x, weight, kwargs = conv_case(device, transposed, size=(5, 4), cin=2, cout=3, dtype=torch.float64)
    bias = torch.randn(3, device=device, dtype=torch.float64, requires_grad=True)

    def fn(x, weight, bias):
        return ops.conv_bias_act(x, weight, bias, negative_slope=0.2, **kwargs)

    assert torch.autograd.gradcheck(fn, (x, weight, bias), fast_mode=True)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_relu_cat(device):
    # Away from relu's kink at 0, where a finite difference would straddle it.
    skip = torch.randn(2, 3, 4, 5, device=device, dtype=torch.float64)
    skip = (skip + 0.1 * skip.sign()).requires_grad_()
    x = torch.randn(2, 2, 4, 5, device=device, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ops.relu_cat, (skip, x))
    cl = [t.detach().contiguous(memory_format=torch.channels_last).requires_grad_() for t in (skip, x)]
    assert torch.autograd.gradcheck(ops.relu_cat, tuple(cl))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_losses(device):
    logits = torch.randn(2, 1, 3, 3, device=device, dtype=torch.float64, requires_grad=True)
    for mode in ("vanilla", "lsgan"):
        for real in (True, False):
            assert torch.autograd.gradcheck(lambda z, m=mode, r=real: ops.gan_loss(z, r, m), (logits,))
    target = torch.randn(2, 1, 3, 3, device=device, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p, t: ops.l1_loss(p, t, 3.0), (logits, target))


# --- the custom-op contract: schema, fake kernels, autograd registration -----------------------------------


def opcheck_samples(device):
    """(op name, args) samples covering every op; channels_last ones check the fake kernels' strides."""
    x = torch.randn(2, 3, 5, 4, device=device)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    weight, bias = torch.rand(3, device=device) + 0.5, torch.randn(3, device=device)
    mean, var = lib.bn_stats(x)
    grad = torch.randn_like(x)
    sums = lib.bn_act_backward_reduce(grad, x, mean, var, weight, bias, EPS, 0.2)
    conv_w = torch.randn(4, 3, 3, 3, device=device)
    conv_x = torch.randn(2, 3, 6, 5, device=device)
    conv_args = ([1, 1], [1, 1], [0, 0], False)
    out = lib.bias_act_forward(x, bias, 0.2)
    conv_out = lib.conv_bn_act(conv_x, conv_w, None, None, None, None, *conv_args, True, EPS, 0.2)[1]
    conv_mean, conv_var = lib.bn_stats(conv_out)
    conv_bias = torch.randn(4, device=device)
    bn_weight, bn_bias = torch.rand(4, device=device) + 0.5, torch.randn(4, device=device)
    rq = lambda t: t.detach().clone().requires_grad_()  # noqa: E731
    return [
        ("bn_stats", (x,)),
        ("bn_stats", (x_cl,)),
        ("bn_act_forward", (x, mean, var, weight, bias, EPS, 0.2)),
        ("bn_act_forward", (x_cl, mean, var, None, None, EPS, 0.0)),
        ("bn_act_backward_reduce", (grad, x_cl, mean, var, weight, bias, EPS, 0.2)),
        ("bn_act_backward_apply", (grad, x, mean, var, weight, bias, *sums, 40, EPS, 0.2, True)),
        ("bn_act_backward_apply", (grad, x_cl, mean, var, None, None, *sums, 40, EPS, 1.0, False)),
        ("bias_act_forward", (x_cl, bias, 0.2)),
        ("bias_act_forward", (x, None, 0.0)),
        ("bias_act_backward", (grad, out, 0.2, True)),
        ("bias_act_backward", (grad, out.contiguous(memory_format=torch.channels_last), 0.0, False)),
        ("gan_loss", (rq(x[:, :1]), True, "vanilla", True)),
        ("gan_loss", (x[:, :1], False, "lsgan", False)),
        ("l1_loss", (rq(x), x_cl, 10.0, True)),
        ("l1_loss", (x, grad, 1.0, False)),
        (
            "conv_bn_act",
            (rq(conv_x), rq(conv_w), rq(bn_weight), rq(bn_bias), None, None, *conv_args, True, EPS, 0.2),
        ),
        ("conv_bn_act", (rq(conv_x), conv_w, None, None, conv_mean, conv_var, *conv_args, False, EPS, 0.0)),
        ("conv_bias_act", (rq(conv_x), rq(conv_w), rq(conv_bias), *conv_args, 0.2)),
        ("conv_bias_act", (conv_x, conv_w, None, *conv_args, 1.0)),
        *conv_backward_samples(device),
        ("adam_master_step_", adam_master_sample(device)),
        (
            "relu_cat",
            (
                rq(x_cl),
                rq(torch.randn(2, 5, 5, 4, device=device).contiguous(memory_format=torch.channels_last)),
            ),
        ),
        ("relu_cat", (rq(x), torch.randn(2, 1, 5, 4, device=device))),
        (
            "relu_cat_backward",
            (torch.randn(2, 8, 5, 4, device=device).contiguous(memory_format=torch.channels_last), x_cl),
        ),
        ("relu_cat_backward", (torch.randn(2, 8, 5, 4, device=device), x)),
        *grouped_samples(device),
    ]


def grouped_samples(device):
    """The BatchNorm ops with groups=2 (statistics of 2 * C values) and the two-target GAN loss."""
    x = torch.randn(4, 3, 5, 4, device=device).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.rand(3, device=device) + 0.5, torch.randn(3, device=device)
    mean, var = lib.bn_stats(x, 2)
    grad = torch.randn_like(x)
    sums = lib.bn_act_backward_reduce(grad, x, mean, var, weight, bias, EPS, 0.2, 2)
    conv_x = torch.randn(4, 3, 6, 5, device=device)
    conv_w = torch.randn(4, 3, 3, 3, device=device)
    conv_args = ([1, 1], [1, 1], [0, 0], False)
    conv_out = torch.ops.aten.convolution(conv_x, conv_w, None, *conv_args[:2], [1, 1], False, [0, 0], 1)
    bn_weight, bn_bias = torch.rand(4, device=device) + 0.5, torch.randn(4, device=device)
    rq = lambda t: t.detach().clone().requires_grad_()  # noqa: E731
    logits = torch.randn(4, 1, 3, 3, device=device)
    return [
        ("bn_stats", (x, 2)),
        ("bn_act_forward", (x, mean, var, weight, bias, EPS, 0.2, 2)),
        ("bn_act_backward_reduce", (grad, x, mean, var, weight, bias, EPS, 0.2, 2)),
        ("bn_act_backward_apply", (grad, x, mean, var, weight, bias, *sums, 40, EPS, 0.2, True, 2)),
        (
            "conv_bn_act",
            (rq(conv_x), rq(conv_w), rq(bn_weight), rq(bn_bias), None, None, *conv_args, True, EPS, 0.2, 2),
        ),
        (
            "conv_bn_act_backward",
            (
                torch.randn_like(conv_out),
                conv_x,
                conv_w,
                conv_out,
                bn_weight,
                bn_bias,
                *lib.bn_stats(conv_out, 2),
                *conv_args,
                True,
                EPS,
                0.2,
                [True, True, True, True],
                2,
            ),
        ),
        ("gan_losses", (rq(logits), [False, True], "vanilla", True)),
        ("gan_losses", (rq(logits.contiguous(memory_format=torch.channels_last)), [True], "lsgan", True)),
        ("gan_losses", (logits, [True, False, True, False], "lsgan", False)),
        # The batch innermost in memory: the groups are walked (and the gradient written) contiguous.
        (
            "gan_losses",
            (rq(torch.randn(1, 3, 3, 4, device=device).permute(3, 0, 1, 2)), [False, True], "vanilla", True),
        ),
    ]


def adam_master_sample(device):
    """Two weights (one channels_last) with bf16 gradients and copies, their moments and step counts."""
    params = [torch.randn(4, 3, 2, 2, device=device).to(memory_format=torch.channels_last),
              torch.randn(5, device=device)]  # fmt: skip
    grads = [torch.randn(p.shape, device=device).to(torch.bfloat16) for p in params]
    moments = [[torch.rand_like(p) for p in params] for _ in range(2)]
    copies = [torch.empty_like(p, dtype=torch.bfloat16) for p in params]
    steps = [torch.full((), 2.0, device=device) for _ in params]
    lr = torch.tensor(1e-3, device=device)
    return (params, grads, *moments, copies, steps, lr, 0.5, 0.999, 0.01, 1e-8)


CONV_LAYOUTS = [
    ("contiguous", "contiguous"),
    ("channels_last", "channels_last"),
    ("contiguous", "channels_last"),
    ("channels_last", "contiguous"),
    ("permuted", "contiguous"),
]


def conv_backward_samples(device):
    """The backward blocks under every mix of input and weight layouts: their gradients take the layouts of
    ATen's convolution_backward, which are not always empty_like's (the fake kernels must say the same)."""
    conv_args = ([1, 1], [1, 1], [0, 0], False)
    bias = torch.randn(4, device=device)
    samples = []
    for x_layout, weight_layout in CONV_LAYOUTS:
        x = with_layout(torch.randn(2, 3, 6, 5, device=device), x_layout)
        weight = with_layout(torch.randn(4, 3, 3, 3, device=device), weight_layout)
        conv_out = torch.ops.aten.convolution(x, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1)
        grad = torch.randn_like(conv_out)
        stats = lib.bn_stats(conv_out)
        out = lib.bias_act_forward(conv_out, bias, 0.2)
        bn_args = (grad, x, weight, conv_out, None, None, *stats, *conv_args, True, EPS, 0.2)
        samples.append(("conv_bn_act_backward", (*bn_args, [True, True, False, False])))
        samples.append(
            ("conv_bias_act_backward", (grad, x, weight, out, *conv_args, 0.2, [True, True, True]))
        )
        samples.append(
            ("conv_bias_act_backward", (grad, x, weight, conv_out, *conv_args, 1.0, [True, True, False]))
        )
    return samples


OPCHECK_OPS = [
    "bn_stats", "bn_act_forward", "bn_act_backward_reduce", "bn_act_backward_apply", "bias_act_forward",
    "bias_act_backward", "gan_loss", "l1_loss", "conv_bn_act", "conv_bn_act_backward", "conv_bias_act",
    "conv_bias_act_backward", "adam_master_step_", "relu_cat", "relu_cat_backward", "gan_losses",
]  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op_name", OPCHECK_OPS)
def test_opcheck(device, op_name):
    samples = [args for name, args in opcheck_samples(device) if name == op_name]
    assert samples, f"no opcheck sample for {op_name}"
    for args in samples:
        torch.library.opcheck(getattr(lib, op_name).default, args)


def test_every_op_is_covered_by_opcheck():
    schemas = {s.name for s in torch._C._jit_get_all_schemas() if s.name.startswith("fastpix2pix::")}
    assert {f"fastpix2pix::{name}" for name in OPCHECK_OPS} == schemas


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_matches_eager(device):
    """A small discriminator-like step: conv-BN-LeakyReLU, a biased conv to logits, both losses."""
    x = torch.randn(2, 3, 12, 10, device=device)
    conv1 = (torch.randn(8, 3, 4, 4, device=device) * 0.2).requires_grad_()
    bn_weight, bn_bias, running_mean, running_var = bn_params(8, device, True)
    conv2 = (torch.randn(1, 8, 3, 3, device=device) * 0.2).requires_grad_()
    conv2_bias = torch.randn(1, device=device, requires_grad=True)
    target = torch.randn(2, 1, 6, 5, device=device)

    def step(x, conv1, bn_weight, bn_bias, running_mean, running_var, conv2, conv2_bias):
        h = ops.conv_bn_act(
            x, conv1, bn_weight, bn_bias, running_mean, running_var, stride=(2, 2), padding=(1, 1),
            negative_slope=0.2,
        )  # fmt: skip
        logits = ops.conv_bias_act(h, conv2, conv2_bias, padding=(1, 1))
        return ops.gan_loss(logits, True) + ops.l1_loss(logits, target, 10.0)

    torch._dynamo.reset()
    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        params = [leaf(t) for t in (conv1, bn_weight, bn_bias)]
        stats = [running_mean.clone(), running_var.clone()]
        second = [leaf(conv2), leaf(conv2_bias)]
        loss = fn(x, *params, *stats, *second)
        loss.backward()
        results.append((loss, grads(*params, *second), stats))
    torch.testing.assert_close(*results)


# --- edge cases ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("batch", "size"), [(1, (9, 7)), (3, (7, 5)), (2, (1, 1))], ids=["batch1", "odd", "1x1"]
)
def test_conv_bn_act_edge_shapes(device, batch, size):
    """Batch 1, odd spatial sizes, and a 1x1 map with a batch of 2 (two values per channel: allowed)."""
    x = torch.randn(batch, 3, *size, device=device, requires_grad=True)
    weight = torch.randn(4, 3, 1, 1, device=device, requires_grad=True)
    params = bn_params(4, device, True)
    fused = run_conv_bn_act(ops.conv_bn_act, x, weight, *params, negative_slope=0.2)
    expected = run_conv_bn_act(reference.conv_bn_act, x, weight, *params, negative_slope=0.2)
    torch.testing.assert_close(fused, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_one_value_per_channel_in_training_raises_like_pytorch(device):
    x = torch.randn(1, 3, 1, 1, device=device)
    weight = torch.randn(4, 3, 1, 1, device=device)
    params = bn_params(4, device, True)
    for impl in (reference.conv_bn_act, ops.conv_bn_act):
        with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
            impl(x, weight, *params)
    if device == "cpu":  # the op's own check (on CUDA it crashed once: benchmarks/cuda_error_paths.py)
        with pytest.raises(RuntimeError, match="expected more than 1 value per channel when training"):
            lib.conv_bn_act(x, weight, *params, [1, 1], [0, 0], [0, 0], False, True, EPS, 0.2)
    # Eval normalises with the running statistics: one value is fine there.
    eval_out = ops.conv_bn_act(x, weight, *params, training=False)
    torch.testing.assert_close(eval_out, reference.conv_bn_act(x, weight, *params, training=False))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    """N=0: empty outputs, zero parameter gradients, untouched running statistics (as nn.BatchNorm2d)."""
    x = torch.randn(0, 3, 8, 8, device=device, requires_grad=True)
    weight = torch.randn(4, 3, 3, 3, device=device, requires_grad=True)
    params = bn_params(4, device, True)
    fused = run_conv_bn_act(ops.conv_bn_act, x, weight, *params, padding=(1, 1), negative_slope=0.2)
    expected = run_conv_bn_act(reference.conv_bn_act, x, weight, *params, padding=(1, 1), negative_slope=0.2)
    torch.testing.assert_close(fused, expected)
    torch.testing.assert_close(fused["running"], (params[2], params[3]))
    for empty in (torch.randn(0, 3, 2, 2, device=device), torch.randn(2, 3, 0, 4, device=device)):
        mean, var = lib.bn_stats(empty)
        assert mean.isnan().all() and var.isnan().all()  # the statistics of nothing, as torch.var_mean's
        assert lib.bn_act_forward(empty, mean, var, None, None, EPS, 0.2).shape == empty.shape
        sum_dz, sum_dz_xhat = lib.bn_act_backward_reduce(empty, empty, mean, var, None, None, EPS, 0.2)
        assert (sum_dz == 0).all() and (sum_dz_xhat == 0).all()  # sums of nothing
        grad = lib.bn_act_backward_apply(
            empty, empty, mean, var, None, None, sum_dz, sum_dz_xhat, 0, EPS, 0.2, True
        )
        assert grad.shape == empty.shape
        assert lib.bias_act_backward(empty, empty, 0.2, True)[1].tolist() == [0.0] * 3
    loss, grad = lib.gan_loss(torch.randn(0, 1, 4, 4, device=device), True, "vanilla", True)
    assert loss.isnan() and grad.shape == (0, 1, 4, 4)  # the mean of nothing, as F's losses
    loss, grad = lib.l1_loss(torch.randn(0, 3, device=device), torch.randn(0, 3, device=device), 1.0, True)
    assert loss.isnan() and grad.shape == (0, 3)


def with_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x with the same values in another memory layout."""
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "sliced":  # not dense: every other column of a wider tensor (in x's memory format)
        wide = torch.cat([x, x], dim=3)
        wide[..., ::2] = x
        return wide[..., ::2]
    if layout == "sliced_channels_last":
        return with_layout(x.contiguous(memory_format=torch.channels_last), "sliced")
    if layout == "permuted":  # dense, but H and W swapped in memory: neither NCHW nor channels_last
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    return x


LAYOUTS = ["contiguous", "channels_last", "sliced", "sliced_channels_last", "permuted"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("grad_layout", ["contiguous", "channels_last"])
def test_layouts(device, layout, grad_layout):
    """Any input layout gives the same values; outputs take torch.empty_like's strides (as the fake kernels
    promise), and x and grad_out may differ in layout."""
    x = torch.randn(2, 11, 5, 7, device=device)
    grad_out = torch.randn_like(x)
    weight, bias = torch.rand(11, device=device) + 0.5, torch.randn(11, device=device)
    mean, var = lib.bn_stats(x)
    sums = lib.bn_act_backward_reduce(grad_out, x, mean, var, weight, bias, EPS, 0.2)
    expected = {
        "stats": (mean, var),
        "forward": lib.bn_act_forward(x, mean, var, weight, bias, EPS, 0.2),
        "reduce": sums,
        "apply": lib.bn_act_backward_apply(grad_out, x, mean, var, weight, bias, *sums, 70, EPS, 0.2, True),
        "bias_forward": lib.bias_act_forward(x, bias, 0.2),
        "bias_backward": lib.bias_act_backward(grad_out, x, 0.2, True),
        "l1": lib.l1_loss(x, grad_out, 1.0, True),
    }
    xl, gl = with_layout(x, layout), with_layout(grad_out, grad_layout)
    got = {
        "stats": lib.bn_stats(xl),
        "forward": lib.bn_act_forward(xl, mean, var, weight, bias, EPS, 0.2),
        "reduce": lib.bn_act_backward_reduce(gl, xl, mean, var, weight, bias, EPS, 0.2),
        "apply": lib.bn_act_backward_apply(gl, xl, mean, var, weight, bias, *sums, 70, EPS, 0.2, True),
        "bias_forward": lib.bias_act_forward(xl, bias, 0.2),
        "bias_backward": lib.bias_act_backward(gl, xl, 0.2, True),
        "l1": lib.l1_loss(xl, gl, 1.0, True),
    }
    torch.testing.assert_close(got, expected)
    like = torch.empty_like(xl).stride()
    for key in ("forward", "apply", "bias_forward"):
        assert got[key].stride() == like, key
    assert got["bias_backward"][0].stride() == like
    assert got["l1"][1].stride() == like


def run_relu_cat(impl, skip, x, grad_out):
    """Output and gradients of one implementation; skip and x as given (their layouts kept), made leaves."""
    skip, x = (t.detach().requires_grad_() for t in (skip, x))
    out = impl(skip, x)
    out.backward(grad_out)
    return out, skip.grad, x.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("grad_layout", ["contiguous", "channels_last", "sliced_channels_last"])
def test_relu_cat_equals_reference_exactly(device, dtype, layout, grad_layout):
    """relu and a copy round nothing: the output and both gradients equal the reference's bit for bit, in
    any layout. The output is laid out as x is (channels_last or NCHW), the gradients densely as grad_out
    (the U-Net's decoder BatchNorm reads its gradient without a copy)."""
    skip = torch.randn(2, 6, 5, 7, device=device, dtype=dtype, requires_grad=True)
    x = torch.randn(2, 10, 5, 7, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(2, 16, 5, 7, device=device, dtype=dtype)
    expected = run_relu_cat(reference.relu_cat, skip, x, grad_out)
    skip_l, x_l = with_layout(skip.detach(), layout), with_layout(x.detach(), layout)
    grad_l = with_layout(grad_out, grad_layout)
    got = run_relu_cat(ops.relu_cat, skip_l, x_l, grad_l)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)
    out_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert got[0].is_contiguous(memory_format=out_format)
    # (Read off the op: autograd gives a leaf's .grad the leaf's own strides.)
    grad_format = torch.channels_last if grad_layout == "channels_last" else torch.contiguous_format
    grad_skip, grad_x = lib.relu_cat_backward(grad_l, skip_l.detach())
    assert grad_skip.is_contiguous(memory_format=grad_format) and grad_x.is_contiguous(
        memory_format=grad_format
    )


@pytest.mark.parametrize("device", DEVICES)
def test_relu_cat_at_nonfinite_skips_matches_pytorch(device):
    """NaN stays NaN through relu and passes its gradient (threshold_backward's rule); -inf becomes 0."""
    skip = torch.tensor([float("nan"), float("-inf"), float("inf"), -0.0, 0.0, -1.0, 2.0, 0.5], device=device)
    skip = skip.view(1, 8, 1, 1).repeat(2, 1, 3, 3).contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 8, 3, 3, device=device).contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn(2, 16, 3, 3, device=device).contiguous(memory_format=torch.channels_last)
    got = run_relu_cat(ops.relu_cat, skip, x, grad_out)
    expected = run_relu_cat(reference.relu_cat, skip, x, grad_out)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
def test_relu_cat_of_two_dtypes_promotes_as_cat(device):
    skip = torch.randn(1, 4, 2, 2, device=device, dtype=torch.bfloat16)
    x = torch.randn(1, 4, 2, 2, device=device)
    torch.testing.assert_close(ops.relu_cat(skip, x), reference.relu_cat(skip, x), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["channels_last", "sliced", "permuted"])
def test_conv_bn_act_with_strided_inputs(device, layout):
    """Blocks take any layout; the output follows the convolution's (channels_last in, channels_last out)."""
    x, weight, kwargs = conv_case(device, False, batch=2, size=(10, 8))
    params = bn_params(4, device, True)
    xl = with_layout(x.detach(), layout).requires_grad_()
    fused = run_conv_bn_act(ops.conv_bn_act, xl, weight, *params, negative_slope=0.2, **kwargs)
    expected = run_conv_bn_act(reference.conv_bn_act, x, weight, *params, negative_slope=0.2, **kwargs)
    torch.testing.assert_close(fused, expected)
    if layout == "channels_last":
        assert fused["out"].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("device", DEVICES)
def test_results_do_not_depend_on_the_thread_count(device):
    x = torch.randn(4, 16, 40, 40, device=device).contiguous(memory_format=torch.channels_last)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, max(threads, 2)):
            torch.set_num_threads(n)
            mean, var = lib.bn_stats(x)
            results.append((mean, var, lib.bn_act_backward_reduce(x, x, mean, var, None, None, EPS, 0.2)))
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(*results, rtol=0, atol=0)


def max_error(t: torch.Tensor, expected: torch.Tensor) -> float:
    return (t.double() - expected).abs().max().item()


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_error_is_at_most_twice_pytorchs(device):
    """bf16 in, fp32 arithmetic inside: against a float64 reference on the same (bf16) inputs, the fused
    block's error is no more than twice that of PyTorch's own bf16 ops. The convolution is an identity
    (1x1, exact in bf16), so that the comparison is of the BatchNorm + activation arithmetic, and not of
    which pre-activations the bf16-rounded convolution output happens to push across 0."""
    x = torch.randn(4, 16, 12, 12, device=device).bfloat16().requires_grad_()
    weight = torch.eye(16, device=device, dtype=torch.bfloat16)[:, :, None, None].requires_grad_()
    bn_weight, bn_bias, running_mean, running_var = bn_params(16, device, True, torch.bfloat16)
    inputs = (x, weight, bn_weight, bn_bias, running_mean, running_var)
    double = [t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    expected = run_conv_bn_act(reference.conv_bn_act, *double, negative_slope=0.2)
    pytorch = run_conv_bn_act(reference.conv_bn_act, *inputs, negative_slope=0.2)
    fused = run_conv_bn_act(ops.conv_bn_act, *inputs, negative_slope=0.2)
    assert fused["out"].dtype == torch.bfloat16
    for got, torch_bf16, exact in [
        (fused["out"], pytorch["out"], expected["out"]),
        *zip(fused["grads"], pytorch["grads"], expected["grads"], strict=True),
        *zip(fused["running"], pytorch["running"], expected["running"], strict=True),
    ]:
        assert max_error(got, exact) <= 2 * max_error(torch_bf16, exact) + 1e-6

    logits = (torch.randn(4, 1, 30, 30, device=device) * 4).bfloat16()
    exact = F.binary_cross_entropy_with_logits(logits.double(), torch.ones_like(logits, dtype=torch.float64))
    torch_bf16 = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
    assert max_error(ops.gan_loss(logits, True), exact) <= 2 * max_error(torch_bf16, exact) + 1e-6
    pred, target = (
        torch.randn(2, 3, 16, 16, device=device).bfloat16(),
        torch.randn(2, 3, 16, 16, device=device),
    )
    exact = F.l1_loss(pred.double(), target.bfloat16().double())
    torch_bf16 = F.l1_loss(pred, target.bfloat16())
    assert max_error(ops.l1_loss(pred, target.bfloat16()), exact) <= 2 * max_error(torch_bf16, exact) + 1e-6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_other_float_dtypes(device, dtype):
    x = torch.randn(2, 4, 6, 5, device=device).to(dtype)
    mean, var = lib.bn_stats(x)
    assert mean.dtype == var.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    expected_var, expected_mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close((mean.double(), var.double()), (expected_mean, expected_var))
    out = lib.bn_act_forward(x, mean, var, None, None, EPS, 0.2)
    assert out.dtype == dtype
    torch.testing.assert_close(
        out, bn_reference(x.double(), mean.double(), var.double(), None, None, 0.2).to(dtype)
    )


# --- bad inputs: each gets an error naming the op, the argument and the problem ----------------------------


def bad_calls(device):
    x = torch.randn(2, 3, 4, 4, device=device)
    c3, c4 = torch.ones(3, device=device), torch.ones(4, device=device)
    w = torch.randn(4, 3, 3, 3, device=device)
    return [
        (
            lambda: lib.bn_stats(x.long()),
            r"bn_stats: x must be float32, float64, bfloat16 or float16, got Long",
        ),
        (lambda: lib.bn_stats(x[0]), r"bn_stats: x must be 4-D \(N, C, H, W\), got shape \[3, 4, 4\]"),
        (
            lambda: lib.bn_stats(x[:1, :, :1, :1]),
            r"bn_stats: expected more than 1 value per channel when training",
        ),
        (
            lambda: lib.bn_act_forward(x, c4, c3, None, None, EPS, 0.0),
            r"bn_act_forward: mean must have shape \(3\)",
        ),
        (
            lambda: lib.bn_act_forward(x, c3, c3[None], None, None, EPS, 0.0),
            r"bn_act_forward: var must have shape",
        ),
        (
            lambda: lib.bn_act_forward(x, c3, c3, c4, None, EPS, 0.0),
            r"bn_act_forward: weight must have shape \(3\)",
        ),
        (
            lambda: lib.bn_act_forward(x, c3, c3, None, c3.int(), EPS, 0.0),
            r"bn_act_forward: bias must be float32",
        ),
        (
            lambda: lib.bn_act_backward_reduce(x[:1], x, c3, c3, None, None, EPS, 0.0),
            r"bn_act_backward_reduce: grad_out must have shape \[2, 3, 4, 4\], got \[1, 3, 4, 4\]",
        ),
        (
            lambda: lib.bn_act_backward_reduce(x.double(), x, c3, c3, None, None, EPS, 0.0),
            r"bn_act_backward_reduce: grad_out has dtype Double but the input has dtype Float",
        ),
        (
            lambda: lib.bn_act_backward_apply(x, x, c3, c3, None, None, c4, c3, 32, EPS, 0.0, True),
            r"bn_act_backward_apply: sum_dz must have shape \(3\)",
        ),
        (
            lambda: lib.bn_act_backward_apply(x, x, c3, c3, None, None, c3, c3, 0, EPS, 0.0, True),
            r"bn_act_backward_apply: count must be positive in training",
        ),
        (lambda: lib.bias_act_forward(x, c4, 0.0), r"bias_act_forward: bias must have shape \(3\)"),
        (lambda: lib.bias_act_forward(x[0], None, 0.0), r"bias_act_forward: x must be 4-D"),
        (lambda: lib.bias_act_backward(x, x, -0.5, True), r"bias_act_backward: negative_slope must be >= 0"),
        (
            lambda: lib.bias_act_backward(x[:, :2], x, 0.2, True),
            r"bias_act_backward: grad_out must have shape",
        ),
        (
            lambda: lib.gan_loss(x, True, "wgan", True),
            r'gan_loss: mode must be "vanilla" or "lsgan", got "wgan"',
        ),
        (lambda: lib.gan_loss(x.int(), True, "lsgan", True), r"gan_loss: logits must be float32"),
        (lambda: lib.l1_loss(x, x[:, :2], 1.0, True), r"l1_loss: target must have shape \[2, 3, 4, 4\]"),
        (lambda: lib.l1_loss(x, x.long(), 1.0, True), r"l1_loss: target must be float32"),
        (
            lambda: ops.conv_bn_act(x, w, None, None, None, None, training=False),
            r"conv_bn_act: eval mode \(training=False\) needs running_mean and running_var",
        ),
        (
            lambda: ops.conv_bn_act(x, w.double(), None, None, None, None),
            r"conv_bn_act: weight dtype Double differs",
        ),
        (lambda: ops.conv_bias_act(x, w[0], None), r"conv_bias_act: weight must be 4-D"),
        (
            lambda: lib.relu_cat(x, x[:, :, :2]),
            r"relu_cat: skip \[2, 3, 4, 4\] and x \[2, 3, 2, 4\] must have the same batch size, height and",
        ),
        (
            lambda: lib.relu_cat(x.double(), x),
            r"relu_cat: skip has dtype Double but the input has dtype Float",
        ),
        (lambda: lib.relu_cat(x, x[0]), r"relu_cat: x must be 4-D"),
        (
            lambda: lib.relu_cat_backward(x[:, :2], x),
            r"relu_cat_backward: grad_out \[2, 2, 4, 4\] does not hold skip \[2, 3, 4, 4\] in its first",
        ),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(len(bad_calls("cpu"))))
def test_bad_inputs_raise_clear_errors(device, case):
    call, message = bad_calls(device)[case]
    with pytest.raises(RuntimeError, match=message):
        call()


def test_gan_loss_wrapper_rejects_unknown_modes():
    with pytest.raises(ValueError, match="gan_loss: mode must be one of"):
        ops.gan_loss(torch.randn(2, 1, 3, 3), True, "wgan")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available on this machine")
def test_mixed_devices_are_rejected():
    x = torch.randn(2, 3, 4, 4, device="cuda")
    stats = torch.ones(3)  # on the CPU
    with pytest.raises(RuntimeError, match=r"bn_act_forward: mean is on cpu but the input is on cuda"):
        lib.bn_act_forward(x, stats, stats.cuda(), None, None, EPS, 0.0)
    with pytest.raises(RuntimeError, match=r"l1_loss: target is on cpu but the input is on cuda"):
        lib.l1_loss(x, x.cpu(), 1.0, False)
