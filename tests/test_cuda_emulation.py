"""The CUDA kernels of ``csrc/cuda``, run on the CPU through ``tests/cuda_emulation`` (no GPU needed).

The emulation compiles the very kernel and launch code of the CUDA library as plain C++ and exposes the op
functions directly. Blocks run one after another; the threads of a block are fibers (``ucontext``) on one OS
thread, each run until its next ``__syncthreads`` (or its end) in a shuffled order, so that a missing barrier
shows. Shared memory is poisoned per block; a launch above the kernels' launch bound, too much shared memory
and a misaligned vector load or store raise, as they would fault on a GPU.

These tests check what the GPU tests cannot check without a GPU: the indexing of both layouts and the flat
walk, the vector/scalar choice (divisibility and alignment), the two-level reductions with one and with
several partial states (also at the grid sizes of a 132-SM GPU), and that every output element is written
(outputs come from ``at::empty``, which deterministic mode fills with NaN). Timing, coalescing and code
generation are for ``tests/test_cuda_ops.py`` on a GPU.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_cuda_ops import (
    D_TARGETS,
    FLOAT32_LAYERS,
    GROUPED_LAYERS,
    IMAGES,
    PATCH_MAPS,
    assert_float32_matches,
    assert_groups_equal_each_alone,
    away_from_kink,
    bn_inputs,
    channel_params,
    fused_bias_act,
    fused_bn_ops,
    fused_loss,
    random_inputs,
    reference_bias_act,
    reference_bn_ops,
    reference_gan_losses,
    reference_loss,
)

from fastpix2pix.ops.reference import activation as reference_activation
from fastpix2pix.ops.reference import adam_master_step_ as reference_adam_master_step_
from fastpix2pix.ops.reference import gan_loss as reference_gan_loss
from fastpix2pix.ops.reference import l1_loss as reference_l1_loss

ROOT = Path(__file__).resolve().parents[1]
EMULATION = ROOT / "tests" / "cuda_emulation"

SHAPES = [  # (N, C, H, W): odd planes, C = 3 (scalar rows), 1x1 spatial, several partial states
    (2, 8, 5, 7),
    (3, 16, 4, 4),
    (2, 3, 6, 6),
    (4, 32, 1, 1),
    (1, 5, 3, 1),
    (5, 64, 16, 16),
    (16, 4, 32, 32),
]
LAYOUTS = ("nchw", "channels_last", "strided", "permuted", "unaligned")
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
SM_COUNTS = (1, 2, 8)  # emulated multiprocessors: fewer or more blocks and partial states

# Every (shape, layout) once, with the dtype and the emulated device size varying along the list, plus every
# dtype in the main layouts on one shape that has several partial states. `variant` picks an op's option
# (activation slope, loss mode) so that each is seen in many cases without multiplying them.
CASES = [
    (shape, layout, DTYPES[i % len(DTYPES)], SM_COUNTS[i % len(SM_COUNTS)], i)
    for i, (shape, layout) in enumerate(itertools.product(SHAPES, LAYOUTS))
] + [
    ((5, 64, 16, 16), layout, dtype, 2, i)
    for i, (dtype, layout) in enumerate(itertools.product(DTYPES, ("nchw", "channels_last", "permuted")))
]
SLOPES = (0.0, 0.2, 1.0)


def case_id(case) -> str:
    shape, layout, dtype, sms, variant = case
    return f"{'x'.join(map(str, shape))}-{layout}-{str(dtype).removeprefix('torch.')}-sm{sms}-v{variant}"


@pytest.fixture(scope="module")
def emu():
    """The emulated CUDA ops (compiled on first use; cached in torch's extension folder afterwards)."""
    from torch.utils.cpp_extension import load

    return load(
        name="fastpix2pix_cuda_emulation",
        sources=[str(EMULATION / "kernels.cpp")],
        extra_include_paths=[str(ROOT / "csrc"), str(EMULATION)],
        extra_cflags=["-O1"],
        verbose=False,
    )


@pytest.fixture(autouse=True)
def poisoned_outputs():
    """at::empty fills new tensors with NaN in deterministic mode: an element no kernel wrote stays NaN."""
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.utils.deterministic.fill_uninitialized_memory,
    )
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous[0])
    torch.utils.deterministic.fill_uninitialized_memory = previous[1]


def make(shape, layout: str, dtype: torch.dtype, generator=None, scale=1.0, shift=0.0) -> torch.Tensor:
    """A random tensor of `shape` laid out as named (values drawn in float64, then rounded to dtype)."""
    n, c, h, w = shape

    def draw(*size):
        return (torch.randn(*size, dtype=torch.float64, generator=generator) * scale + shift).to(dtype)

    if layout == "nchw":
        return draw(n, c, h, w)
    if layout == "channels_last":
        return draw(n, c, h, w).contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # not dense: copied by the op
        return draw(n, c, h, 2 * w)[..., ::2]
    if (
        layout == "permuted"
    ):  # dense, but neither layout: computed in NCHW and copied into empty_like's strides
        return draw(n, h, c, w).permute(0, 2, 1, 3)
    if layout == "unaligned":  # NCHW at an odd element offset: the 16-byte vectors must not be used
        flat = draw(n * c * h * w + 1)
        return flat[1:].view(n, c, h, w)
    if layout == "batch_inner":  # dense, the batch not outermost: its groups are not blocks of memory
        return draw(c, n, h, w).permute(1, 0, 2, 3)
    raise ValueError(layout)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def assert_close(actual: torch.Tensor, expected: torch.Tensor, **tolerance) -> None:
    """Compare at the precision of `actual`'s dtype (the float64 reference rounded to it)."""
    assert not actual.isnan().any(), "unwritten (NaN-poisoned) or NaN elements"
    if actual.dtype == torch.float64 and not tolerance:
        tolerance = {"rtol": 1e-9, "atol": 1e-10}
    torch.testing.assert_close(actual, expected.to(actual.dtype), **tolerance)


def channel(v: torch.Tensor) -> torch.Tensor:
    return v.double().view(1, -1, 1, 1)


def act(z: torch.Tensor, slope: float) -> torch.Tensor:
    return torch.where(z > 0, z, z * slope)


def act_grad(grad: torch.Tensor, z: torch.Tensor, slope: float) -> torch.Tensor:
    return torch.where(z > 0, grad, grad * slope)


def bn_params(c: int, dtype: torch.dtype, generator, affine: bool):
    sd = stats_dtype(dtype)
    mean = torch.randn(c, dtype=torch.float64, generator=generator).to(sd)
    var = (torch.rand(c, dtype=torch.float64, generator=generator) + 0.5).to(sd)
    if not affine:
        return mean, var, None, None
    weight = (torch.randn(c, dtype=torch.float64, generator=generator) + 1).to(sd)
    bias = torch.randn(c, dtype=torch.float64, generator=generator).to(sd)
    return mean, var, weight, bias


def z_of(x, mean, var, weight, bias, eps):
    xhat = (x.double() - channel(mean)) / torch.sqrt(channel(var) + eps)
    w = channel(weight) if weight is not None else 1.0
    b = channel(bias) if bias is not None else 0.0
    return xhat, xhat * w + b


def output_tolerance(dtype: torch.dtype) -> dict:
    """An output rounded to dtype may differ from the rounded float64 reference by an ulp or so."""
    return {
        torch.float64: {"rtol": 1e-9, "atol": 1e-10},
        torch.float32: {"rtol": 1e-5, "atol": 1e-5},
        torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-2},
        torch.float16: {"rtol": 2e-3, "atol": 2e-3},
    }[dtype]


@pytest.fixture
def generator():
    g = torch.Generator()
    seed = g.seed()
    yield g
    print(f"generator seed: {seed}")  # shown by pytest on failure


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_bn_stats(emu, case, generator):
    shape, layout, dtype, sms, _variant = case
    emu.set_sm_count(sms)
    x = make(shape, layout, dtype, generator, scale=2.0, shift=3.0)
    mean, var = emu.bn_stats(x)
    assert mean.dtype == var.dtype == stats_dtype(dtype)
    tolerance = {} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    assert_close(mean, x.double().mean((0, 2, 3)), **tolerance)
    assert_close(var, x.double().var((0, 2, 3), unbiased=False), **tolerance)


@pytest.mark.parametrize("sms", SM_COUNTS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_bn_stats_large_mean_keeps_precision(emu, sms, layout, generator):
    """Welford/Chan: a mean 1e4 times the spread loses nothing (a float32 sum of squares would lose all)."""
    emu.set_sm_count(sms)
    x = make((8, 16, 12, 12), layout, torch.float32, generator, scale=0.01, shift=100.0)
    mean, var = emu.bn_stats(x)
    torch.testing.assert_close(mean.double(), x.double().mean((0, 2, 3)), rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), x.double().var((0, 2, 3), unbiased=False), rtol=1e-3, atol=0)


def test_bn_stats_is_deterministic(emu, generator):
    emu.set_sm_count(2)
    x = make((5, 64, 16, 16), "channels_last", torch.bfloat16, generator)
    first = emu.bn_stats(x)
    for _ in range(3):
        again = emu.bn_stats(x)
        assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_bn_act_forward(emu, case, generator):
    shape, layout, dtype, sms, variant = case
    slope = SLOPES[variant % len(SLOPES)]
    emu.set_sm_count(sms)
    x = make(shape, layout, dtype, generator)
    mean, var, weight, bias = bn_params(shape[1], dtype, generator, affine=slope != 1.0)
    out = emu.bn_act_forward(x, mean, var, weight, bias, 1e-5, slope)
    assert out.stride() == torch.empty_like(x).stride()
    _, z = z_of(x, mean, var, weight, bias, 1e-5)
    assert_close(out, act(z, slope), **output_tolerance(dtype))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_bn_act_backward(emu, case, generator):
    shape, layout, dtype, sms, _variant = case
    emu.set_sm_count(sms)
    slope, eps = 0.2, 1e-5
    x = make(shape, layout, dtype, generator)
    grad = make(shape, "channels_last" if layout == "nchw" else "nchw", dtype, generator)  # another layout
    mean, var, weight, bias = bn_params(shape[1], dtype, generator, affine=True)
    xhat, z = z_of(x, mean, var, weight, bias, eps)
    dz = act_grad(grad.double(), z, slope)
    sum_dz, sum_dz_xhat = emu.bn_act_backward_reduce(grad, x, mean, var, weight, bias, eps, slope)
    tolerance = {} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-4}
    assert_close(sum_dz, dz.sum((0, 2, 3)), **tolerance)
    assert_close(sum_dz_xhat, (dz * xhat).sum((0, 2, 3)), **tolerance)

    count = x.numel() // x.shape[1]
    invstd = 1 / torch.sqrt(channel(var) + eps)
    exact_sums = (dz.sum((0, 2, 3)).to(sum_dz.dtype), (dz * xhat).sum((0, 2, 3)).to(sum_dz.dtype))
    grad_x = emu.bn_act_backward_apply(grad, x, mean, var, weight, bias, *exact_sums, count, eps, slope, True)
    assert grad_x.stride() == torch.empty_like(x).stride()
    expected = (
        channel(weight)
        * invstd
        * (dz - channel(exact_sums[0]) / count - xhat * channel(exact_sums[1]) / count)
    )
    assert_close(grad_x, expected, **output_tolerance(dtype))

    no_sums = torch.empty(0)  # eval reads no sums
    grad_x = emu.bn_act_backward_apply(
        grad, x, mean, var, weight, bias, no_sums, no_sums, 0, eps, slope, False
    )
    assert_close(grad_x, channel(weight) * invstd * dz, **output_tolerance(dtype))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_bias_act(emu, case, generator):
    shape, layout, dtype, sms, variant = case
    with_bias = variant % 2 == 0
    emu.set_sm_count(sms)
    slope = 0.2
    x = make(shape, layout, dtype, generator)
    bias = torch.randn(shape[1], generator=generator) if with_bias else None  # float32 bias, any x dtype
    out = emu.bias_act_forward(x, bias, slope)
    assert out.stride() == torch.empty_like(x).stride()
    z = x.double() + (channel(bias) if with_bias else 0.0)
    assert_close(out, act(z, slope), **output_tolerance(dtype))

    grad = make(shape, "nchw" if layout == "channels_last" else "channels_last", dtype, generator)
    expected = act_grad(grad.double(), out.double(), slope)
    grad_x, grad_bias = emu.bias_act_backward(grad, out, slope, with_bias)
    assert grad_x.stride() == torch.empty_like(out).stride()
    assert_close(grad_x, expected, **output_tolerance(dtype))
    if with_bias:
        # Summed and returned in float32 (float64 for float64): a bf16 block's bias gradient is not rounded
        # to bf16 (bf16's relative rounding, 4e-3, would fail this tolerance).
        assert grad_bias.dtype == stats_dtype(dtype)
        tolerance = {} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-4}
        assert_close(grad_bias, expected.sum((0, 2, 3)), **tolerance)
    else:
        assert grad_bias is None


RELU_CAT_X_CHANNELS = (8, 3, 16)  # with the skip's C: both parts whole vectors, or not (scalar kernels)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_relu_cat(emu, case, generator):
    """cat([relu(skip), x]) and its split backward, exactly (relu and copies round nothing); the output laid
    out as x, the gradients as grad_out; every element written (outputs are NaN-poisoned)."""
    shape, layout, dtype, sms, variant = case
    emu.set_sm_count(sms)
    n, c, h, w = shape
    skip = make(shape, layout, dtype, generator)
    x = make((n, RELU_CAT_X_CHANNELS[variant % 3], h, w), layout, dtype, generator)
    out = emu.relu_cat(skip, x)
    expected = torch.cat([skip.clamp_min(0), x], 1)
    assert torch.equal(out, expected)
    channels_last = (
        x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    )
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    grad_layout = "nchw" if layout == "channels_last" else "channels_last"
    grad = make(tuple(out.shape), grad_layout, dtype, generator)
    grad_skip, grad_x = emu.relu_cat_backward(grad, skip)
    assert torch.equal(grad_skip, torch.where(skip > 0, grad[:, :c], torch.zeros((), dtype=dtype)))
    assert torch.equal(grad_x, grad[:, c:])
    grad_format = (
        torch.channels_last if grad_layout == "channels_last" and h * w > 1 else torch.contiguous_format
    )
    assert grad_skip.is_contiguous(memory_format=grad_format) and grad_x.is_contiguous(
        memory_format=grad_format
    )


LOSS_CASES = [c for c in CASES if c[0] != (16, 4, 32, 32)] + [((16, 1, 30, 30), "nchw", torch.bfloat16, 2, 0)]


@pytest.mark.parametrize("case", LOSS_CASES, ids=case_id)
def test_gan_loss(emu, case, generator):
    shape, layout, dtype, sms, variant = case
    mode = ("vanilla", "lsgan")[variant % 2]
    target_is_real = variant % 4 < 2
    emu.set_sm_count(sms)
    logits = make(shape, layout, dtype, generator, scale=8.0)  # |logits| up to ~30: the stable forms matter
    loss, grad = emu.gan_loss(logits, target_is_real, mode, True)
    x = logits.double()
    target = 1.0 if target_is_real else 0.0
    if mode == "vanilla":
        expected = torch.nn.functional.binary_cross_entropy_with_logits(x, torch.full_like(x, target))
        expected_grad = (torch.sigmoid(x) - target) / x.numel()
    else:
        expected = ((x - target) ** 2).mean()
        expected_grad = 2 * (x - target) / x.numel()
    assert loss.dtype == stats_dtype(dtype) and loss.dim() == 0
    assert_close(loss, expected, **({} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}))
    assert grad.stride() == torch.empty_like(logits).stride()
    assert_close(grad, expected_grad, **output_tolerance(dtype))
    loss_only, no_grad = emu.gan_loss(logits, target_is_real, mode, False)
    assert no_grad is None and torch.equal(loss_only, loss)


@pytest.mark.parametrize("case", LOSS_CASES, ids=case_id)
def test_l1_loss(emu, case, generator):
    shape, layout, dtype, sms, _variant = case
    emu.set_sm_count(sms)
    pred = make(shape, layout, dtype, generator)
    target = make(shape, "channels_last" if layout == "nchw" else "nchw", dtype, generator)
    target[0, 0, 0] = pred[0, 0, 0]  # some zero differences: sign(0) = 0
    weight = 100.0
    loss, grad = emu.l1_loss(pred, target, weight, True)
    diff = pred.double() - target.double()
    assert_close(
        loss, weight * diff.abs().mean(), **({} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-4})
    )
    assert grad.stride() == torch.empty_like(pred).stride()
    assert_close(grad, weight * torch.sign(diff) / diff.numel(), **output_tolerance(dtype))


def test_l1_loss_target_of_another_dtype(emu, generator):
    """A float32 target with a bfloat16 prediction is compared in float32, not rounded to bfloat16."""
    emu.set_sm_count(2)
    pred = make((4, 3, 16, 16), "channels_last", torch.bfloat16, generator)
    target = make((4, 3, 16, 16), "nchw", torch.float32, generator)
    loss, grad = emu.l1_loss(pred, target, 1.0, True)
    diff = pred.double() - target.double()
    assert_close(loss, diff.abs().mean(), rtol=1e-6, atol=1e-6)
    assert_close(grad, torch.sign(diff) / diff.numel(), **output_tolerance(torch.bfloat16))


def test_empty_inputs(emu):
    """No values: NaN statistics and losses (as torch.var_mean and F's losses), zero sums, empty outputs."""
    for empty in (torch.empty(0, 3, 2, 2), torch.empty(2, 3, 0, 4)):
        mean, var = emu.bn_stats(empty)
        assert mean.isnan().all() and var.isnan().all()
        assert emu.bn_act_forward(empty, mean, var, None, None, 1e-5, 0.2).shape == empty.shape
        sums = emu.bn_act_backward_reduce(empty, empty, mean, var, None, None, 1e-5, 0.2)
        assert all((s == 0).all() for s in sums)
        grad = emu.bn_act_backward_apply(empty, empty, mean, var, None, None, *sums, 0, 1e-5, 0.2, True)
        assert grad.shape == empty.shape
        assert emu.bias_act_backward(empty, empty, 0.2, True)[1].tolist() == [0.0] * 3


def test_empty_losses_are_nan(emu):
    for loss, _ in (
        emu.gan_loss(torch.empty(0, 1, 3, 3), True, "vanilla", True),
        emu.l1_loss(*[torch.empty(0)] * 2, 1.0, True),
    ):
        assert loss.isnan()


# --- groups: the batch split into equal consecutive parts, each its own BatchNorm or GAN loss --------------
#
# A grouped op is the ungrouped op of each group on its own (fastpix2pix.cpp). So on each group's view (the
# same memory: the same vector width and grid) the ungrouped op gives bitwise the grouped op's results for
# that group, in as many kernel launches; and the float64 references are F.batch_norm and reference.gan_loss
# of each group's chunk.

GROUP_SHAPES = [  # (N, C, H, W) and groups: odd planes, C = 3 (scalar rows), 1x1 spatial, several partials
    ((4, 8, 5, 7), 2),
    ((6, 16, 4, 4), 3),
    ((4, 32, 1, 1), 2),  # walked as channels_last rows: 2 values per channel in each group
    ((6, 3, 6, 6), 3),
    ((10, 64, 16, 16), 2),
    ((6, 4, 32, 32), 3),
]
GROUP_DTYPES = (torch.float32, torch.bfloat16, torch.float64)
# Every (shape, layout) once, the dtype and the emulated device size varying along the list.
GROUP_CASES = [
    (shape, groups, layout, GROUP_DTYPES[i % len(GROUP_DTYPES)], SM_COUNTS[(i // 2) % len(SM_COUNTS)])
    for i, ((shape, groups), layout) in enumerate(itertools.product(GROUP_SHAPES, ("nchw", "channels_last")))
]


def group_case_id(case) -> str:
    shape, groups, layout, dtype, sms = case
    return f"{'x'.join(map(str, shape))}-g{groups}-{layout}-{str(dtype).removeprefix('torch.')}-sm{sms}"


def other_layout(layout: str) -> str:
    return "channels_last" if layout == "nchw" else "nchw"


@pytest.mark.parametrize("case", GROUP_CASES, ids=group_case_id)
def test_grouped_bn_ops_match_reference(emu, case, generator):
    """bn_stats -> forward -> backward_reduce -> backward_apply with groups, against F.batch_norm + activation
    of each group in float64 (statistics and sums group-major), at the ungrouped tests' tolerances."""
    shape, groups, layout, dtype, sms = case
    emu.set_sm_count(sms)
    slope = 0.2
    x = make(shape, layout, dtype, generator, scale=2.0, shift=0.5)
    _, _, weight, bias = bn_params(shape[1], dtype, generator, affine=True)
    grad = make(shape, other_layout(layout), dtype, generator)
    grad = away_from_kink(grad, x, weight, bias, slope, groups)
    expected = reference_bn_ops(x, grad, weight, bias, slope, groups)
    results = fused_bn_ops(emu, x, grad, weight, bias, slope, groups)
    assert results["mean"].shape == results["sum_dz"].shape == (groups * shape[1],)
    wide = dtype == torch.float64
    stats = {} if wide else {"rtol": 1e-5, "atol": 1e-5}
    sums = {} if wide else {"rtol": 1e-5, "atol": 1e-4}
    for name, tolerance in {
        "mean": stats,
        "var": stats,
        "out": output_tolerance(dtype),
        "sum_dz": sums,
        "sum_dz_xhat": sums,
        "grad_x": output_tolerance(dtype),
    }.items():
        assert_close(results[name], expected[name], **tolerance)


def every_bn_op(emu, x, grad, mean, var, weight, bias, sums, *groups) -> tuple[dict, int]:
    """Each BatchNorm op's results (bn_stats' where a group has more than one value per channel; apply in
    training with the given sums, and in eval), with `groups` when given, and the kernel launches made."""
    eps, slope, no_sums = 1e-5, 0.2, torch.empty(0)
    count = x.numel() // (x.shape[1] * (groups[0] if groups else 1))
    launches = emu.launches()
    results = {
        "out": emu.bn_act_forward(x, mean, var, weight, bias, eps, slope, *groups),
        "sum_dz": emu.bn_act_backward_reduce(grad, x, mean, var, weight, bias, eps, slope, *groups)[0],
        "grad_x": emu.bn_act_backward_apply(
            grad, x, mean, var, weight, bias, *sums, count, eps, slope, True, *groups
        ),
        "grad_x_eval": emu.bn_act_backward_apply(
            grad, x, mean, var, weight, bias, no_sums, no_sums, 0, eps, slope, False, *groups
        ),
    }
    results["sum_dz_xhat"] = emu.bn_act_backward_reduce(
        grad, x, mean, var, weight, bias, eps, slope, *groups
    )[1]
    if count > 1:
        results["mean"], results["var"] = emu.bn_stats(x, *groups)
    return results, emu.launches() - launches


@pytest.mark.parametrize(
    "case",
    [
        *GROUP_CASES,
        ((2, 8, 1, 1), 2, "nchw", torch.float32, 2),  # one value per channel and group: no bn_stats
        ((5, 64, 16, 16), 1, "channels_last", torch.bfloat16, 2),  # groups=1 given: the default's results
        ((3, 16, 4, 4), 1, "unaligned", torch.float32, 1),
    ],
    ids=group_case_id,
)
def test_grouped_bn_ops_equal_each_group_alone(emu, case, generator):
    """Given random per-group statistics and sums, every op's grouped results are bitwise those of the
    ungrouped op on each group's view with that group's statistics and sums, in as many launches."""
    shape, groups, layout, dtype, sms = case
    emu.set_sm_count(sms)
    c = shape[1]
    x = make(shape, layout, dtype, generator)
    grad = make(shape, other_layout(layout), dtype, generator)
    mean, var, weight, bias = bn_params(groups * c, dtype, generator, affine=True)
    weight, bias = weight[:c], bias[:c]
    sums = [torch.randn(groups * c, dtype=stats_dtype(dtype), generator=generator) for _ in range(2)]
    grouped, launches = every_bn_op(emu, x, grad, mean, var, weight, bias, sums, groups)
    alone, alone_launches = [], 0
    for g, (part, part_grad) in enumerate(zip(x.chunk(groups), grad.chunk(groups), strict=True)):
        stats = slice(g * c, (g + 1) * c)
        results, n = every_bn_op(
            emu, part, part_grad, mean[stats], var[stats], weight, bias, [s[stats] for s in sums]
        )
        alone.append(results)
        alone_launches += n
    assert grouped.keys() == alone[0].keys()
    assert grouped["out"].stride() == grouped["grad_x"].stride() == torch.empty_like(x).stride()
    assert_groups_equal_each_alone(grouped, alone, groups)
    assert launches == alone_launches


@pytest.mark.parametrize("sms", SM_COUNTS)
def test_grouped_reductions_have_several_partial_states_per_group(emu, sms, generator):
    """The shape of test_bn_stats_is_deterministic in 2 groups: with more than one partial state per group and
    channel (a merge launch each), each group's statistics still equal those of the group alone."""
    emu.set_sm_count(sms)
    x = make((10, 64, 16, 16), "channels_last", torch.bfloat16, generator)
    before = emu.launches()
    mean, var = emu.bn_stats(x, 2)
    assert emu.launches() - before == 4  # per group: the partials, then their merge
    for g, part in enumerate(x.chunk(2)):
        part_mean, part_var = emu.bn_stats(part)
        assert torch.equal(mean[g * 64 : (g + 1) * 64], part_mean)
        assert torch.equal(var[g * 64 : (g + 1) * 64], part_var)


def test_grouped_bn_ops_check_their_arguments(emu):
    x = torch.randn(6, 4, 3, 3)
    stats = torch.zeros(12), torch.ones(12)  # 3 groups of 4 channels
    sums = torch.zeros(12), torch.zeros(12)
    eps, slope = 1e-5, 0.2

    def every_op(groups, mean=stats[0], var=stats[1], weight=None, sum_dz=sums[0]):
        yield lambda: emu.bn_stats(x, groups)
        yield lambda: emu.bn_act_forward(x, mean, var, weight, None, eps, slope, groups)
        yield lambda: emu.bn_act_backward_reduce(x, x, mean, var, weight, None, eps, slope, groups)
        yield lambda: emu.bn_act_backward_apply(
            x, x, mean, var, weight, None, sum_dz, sums[1], 18, eps, slope, True, groups
        )

    for groups, message in ((0, "groups must be >= 1, got 0"), (-2, "groups must be >= 1, got -2")):
        for op in every_op(groups):
            with pytest.raises(RuntimeError, match=message):
                op()
    for op in every_op(4):
        with pytest.raises(RuntimeError, match=r"the batch of \[6, 4, 3, 3\] does not split into groups=4"):
            op()
    for op in list(every_op(2))[1:]:  # 12 statistics are 3 groups', not 2 groups'
        with pytest.raises(RuntimeError, match=r"mean must have shape \(8\), got \[12\]"):
            op()
    with pytest.raises(RuntimeError, match=r"var must have shape \(12\), got \[4\]"):
        emu.bn_act_forward(x, stats[0], stats[1][:4], None, None, eps, slope, 3)
    with pytest.raises(RuntimeError, match=r"weight must have shape \(4\), got \[12\]"):
        list(every_op(3, weight=torch.ones(12)))[1]()
    with pytest.raises(RuntimeError, match=r"sum_dz must have shape \(12\), got \[4\]"):
        list(every_op(3, sum_dz=sums[0][:4]))[3]()
    with pytest.raises(
        RuntimeError, match=r"more than 1 value per channel .* size \[2, 8, 1, 1\] split into 2 groups"
    ):
        emu.bn_stats(torch.randn(2, 8, 1, 1), 2)


def test_grouped_empty_inputs(emu):
    """No values: NaN statistics and zero sums for every group and channel, empty outputs."""
    for empty in (torch.empty(0, 3, 2, 2), torch.empty(2, 3, 0, 4)):
        mean, var = emu.bn_stats(empty, 2)
        assert mean.shape == var.shape == (6,) and mean.isnan().all() and var.isnan().all()
        assert emu.bn_act_forward(empty, mean, var, None, None, 1e-5, 0.2, 2).shape == empty.shape
        sums = emu.bn_act_backward_reduce(empty, empty, mean, var, None, None, 1e-5, 0.2, 2)
        assert all(s.tolist() == [0.0] * 6 for s in sums)
        grad = emu.bn_act_backward_apply(empty, empty, mean, var, None, None, *sums, 0, 1e-5, 0.2, True, 2)
        assert grad.shape == empty.shape
    losses, grad = emu.gan_losses(torch.empty(0, 1, 3, 3), [True, False], "vanilla", True)
    assert losses.shape == (2,) and losses.isnan().all() and grad.shape == (0, 1, 3, 3)


GAN_GROUP_SHAPES = [  # (N, C, H, W) and the targets of the groups
    ((4, 3, 5, 7), D_TARGETS),
    ((6, 1, 4, 4), [True, False, True]),
    ((2, 1, 30, 30), D_TARGETS),  # a group of 900: whole float32 vectors, not bf16 ones
    ((3, 2, 8, 8), [False, False, True]),
    ((4, 8, 5, 7), [True]),
    ((1, 1, 4, 4), [False]),
    ((32, 1, 30, 30), D_TARGETS),  # the D step at batch 16: several partial states per group
]
# Walked in place (nchw, channels_last, permuted, unaligned) or as a contiguous copy (strided: not dense;
# batch_inner: the groups are not blocks of memory).
GAN_GROUP_LAYOUTS = ("nchw", "channels_last", "permuted", "unaligned", "strided", "batch_inner")
GAN_GROUP_CASES = [
    (
        shape,
        targets,
        layout,
        DTYPES[i % len(DTYPES)],
        SM_COUNTS[i % len(SM_COUNTS)],
        ("vanilla", "lsgan")[i % 2],
    )
    for i, ((shape, targets), layout) in enumerate(itertools.product(GAN_GROUP_SHAPES, GAN_GROUP_LAYOUTS))
]


def gan_group_case_id(case) -> str:
    shape, targets, layout, dtype, sms, mode = case
    return (
        f"{'x'.join(map(str, shape))}-g{len(targets)}-{layout}-{str(dtype).removeprefix('torch.')}"
        f"-sm{sms}-{mode}"
    )


def groups_are_blocks(t: torch.Tensor) -> bool:
    """Whether the groups along dim 0 of t (dense) are blocks of memory: the batch outermost in memory."""
    return t.shape[0] <= 1 or t.stride(0) * t.shape[0] == t.numel()


@pytest.mark.parametrize("case", GAN_GROUP_CASES, ids=gan_group_case_id)
def test_gan_losses(emu, case, generator):
    """Each group's loss and gradient against reference.gan_loss of its chunk in float64, and bitwise the
    ungrouped gan_loss of the group's view (the loss where both walk the same memory: a sum's order follows
    the vector width; the gradient everywhere: it is elementwise). The gradient has empty_like's strides, or
    is contiguous when the groups are not blocks of memory."""
    shape, targets, layout, dtype, sms, mode = case
    groups = len(targets)
    emu.set_sm_count(sms)
    logits = make(shape, layout, dtype, generator, scale=8.0)  # |logits| up to ~30: the stable forms matter
    losses, grad = emu.gan_losses(logits, targets, mode, True)
    assert losses.dtype == stats_dtype(dtype) and losses.shape == (groups,)
    in_blocks = groups == 1 or groups_are_blocks(torch.empty_like(logits))
    assert grad.stride() == (torch.empty_like(logits) if in_blocks else torch.empty(shape)).stride()
    expected = reference_gan_losses(logits, targets, mode)
    assert_close(losses, expected["loss"], **({} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}))
    assert_close(grad, expected["grad"], **output_tolerance(dtype))

    alone = [
        emu.gan_loss(part, real, mode, True) for part, real in zip(logits.chunk(groups), targets, strict=True)
    ]
    assert_groups_equal_each_alone({"grad": grad}, [{"grad": a[1]} for a in alone], groups)
    if layout != "strided" and (groups == 1 or groups_are_blocks(logits)):  # walked in place
        assert_groups_equal_each_alone({"loss": losses}, [{"loss": a[0]} for a in alone], groups)
    losses_only, no_grad = emu.gan_losses(logits, targets, mode, False)
    assert no_grad is None and torch.equal(losses_only, losses)


def test_gan_losses_check_their_arguments(emu):
    logits = torch.randn(4, 1, 3, 3)
    with pytest.raises(RuntimeError, match="targets_are_real must name the target of at least one group"):
        emu.gan_losses(logits, [], "vanilla", True)
    with pytest.raises(RuntimeError, match=r"the batch of \[4, 1, 3, 3\] does not split into groups=3"):
        emu.gan_losses(logits, [True, False, True], "vanilla", True)
    with pytest.raises(RuntimeError, match="batch dimension"):
        emu.gan_losses(torch.tensor(0.5), [True], "vanilla", True)
    with pytest.raises(RuntimeError, match='mode must be "vanilla" or "lsgan"'):
        emu.gan_losses(logits, D_TARGETS, "wgan", True)


# --- NaN and infinity: the derivatives PyTorch takes there (see test_ops.py) -----------------------------
#
# ReLU's backward passes the gradient at a NaN input (threshold_backward tests out <= 0, false for NaN),
# LeakyReLU's scales it by the slope (it tests x > 0), and L1's is sign(NaN) = 0.

NAN, INF = float("nan"), float("inf")


def with_nonfinite(x: torch.Tensor) -> torch.Tensor:
    """x with a NaN, an inf and a -inf in every channel, in x's own layout."""
    x[0, :, 0, 0], x[-1, :, 1, 1], x[-1, :, 2, 2] = NAN, INF, -INF
    return x


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "unaligned"])  # vector and scalar paths
@pytest.mark.parametrize("slope", SLOPES)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_bias_act_at_nonfinite_inputs_matches_pytorch(emu, layout, slope, with_bias, generator):
    emu.set_sm_count(2)
    x = with_nonfinite(make((2, 8, 4, 4), layout, torch.float32, generator))
    grad = make((2, 8, 4, 4), layout, torch.float32, generator)
    grad[0, :, 3, :] = INF  # selected away by ReLU where z <= 0
    bias = torch.randn(8, generator=generator) if with_bias else None
    xr = x.detach().clone().requires_grad_()
    br = bias.clone().requires_grad_() if with_bias else None
    expected = reference_activation(xr + br.view(1, -1, 1, 1) if with_bias else xr, slope)
    expected.backward(grad)

    out = emu.bias_act_forward(x, bias, slope)
    torch.testing.assert_close(out, expected, equal_nan=True)
    grad_x, grad_bias = emu.bias_act_backward(grad, out, slope, with_bias)
    torch.testing.assert_close(grad_x, xr.grad, equal_nan=True)
    if with_bias:
        torch.testing.assert_close(grad_bias, br.grad, equal_nan=True)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("slope", SLOPES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bn_act_at_a_nan_input_matches_pytorch(emu, layout, slope, training, generator):
    """Eval: the NaN stays at its element; training: it makes its channel's statistics and z all NaN, and the
    bias gradient (the sum of the passed gradients) stays finite."""
    emu.set_sm_count(2)
    eps = 1e-5
    x = make((3, 8, 5, 4), layout, torch.float32, generator)
    x[1, 2, 3, 3] = NAN
    grad = make((3, 8, 5, 4), layout, torch.float32, generator)
    running_mean, running_var, weight, bias = bn_params(8, torch.float32, generator, affine=True)
    xr, wr, br = (t.detach().clone().requires_grad_() for t in (x, weight, bias))
    normalized = F.batch_norm(xr, running_mean.clone(), running_var.clone(), wr, br, training, 0.1, eps)
    expected = reference_activation(normalized, slope)
    expected.backward(grad)

    mean, var = emu.bn_stats(x) if training else (running_mean, running_var)
    out = emu.bn_act_forward(x, mean, var, weight, bias, eps, slope)
    torch.testing.assert_close(out, expected, equal_nan=True)
    sum_dz, sum_dz_xhat = emu.bn_act_backward_reduce(grad, x, mean, var, weight, bias, eps, slope)
    torch.testing.assert_close((sum_dz_xhat, sum_dz), (wr.grad, br.grad), equal_nan=True)
    count = x.numel() // x.shape[1]
    grad_x = emu.bn_act_backward_apply(
        grad, x, mean, var, weight, bias, sum_dz, sum_dz_xhat, count, eps, slope, training
    )
    torch.testing.assert_close(grad_x, xr.grad, equal_nan=True)


@pytest.mark.parametrize("layout", ["nchw", "unaligned"])  # vector and scalar paths
def test_l1_loss_gradient_at_a_nan_difference_is_zero(emu, layout, generator):
    emu.set_sm_count(2)
    pred = make((2, 3, 8, 8), layout, torch.float32, generator)
    target = make((2, 3, 8, 8), layout, torch.float32, generator)
    pred[0, 0, 0, :4] = torch.tensor([NAN, INF, -INF, 0.5])
    target[0, 0, 0, :5] = torch.tensor([0.0, INF, 1.0, NAN, NAN])  # NaN, inf - inf, -inf, NaN, NaN
    p = pred.detach().clone().requires_grad_()
    expected = 10.0 * F.l1_loss(p, target)
    expected.backward()
    loss, grad = emu.l1_loss(pred, target, 10.0, True)
    assert loss.isnan() and expected.isnan()
    torch.testing.assert_close(grad, p.grad, equal_nan=True)


# --- the emulation's own checks: what would fault on a GPU fails here -------------------------------------


def vectors_for(emu) -> tuple[torch.Tensor, torch.Tensor]:
    """A source and a zeroed destination with room for a full block's vectors at an offset of up to 4."""
    size = emu.block_threads() * 4 + 4
    return torch.arange(size, dtype=torch.float32), torch.zeros(size)


def test_aligned_vector_copy_runs(emu):
    source, out = vectors_for(emu)
    threads = emu.block_threads()
    emu.copy_vectors(source, 4, out, 0, threads)  # 4 floats: 16 bytes, still aligned
    torch.testing.assert_close(out[: threads * 4], source[4 : threads * 4 + 4], rtol=0, atol=0)


@pytest.mark.parametrize("side", ["load", "store"])
def test_misaligned_vector_access_is_caught(emu, side):
    source, out = vectors_for(emu)
    in_offset, out_offset = (1, 0) if side == "load" else (0, 1)  # one float: 4 bytes off
    with pytest.raises(RuntimeError, match="misaligned 16-byte vector access"):
        emu.copy_vectors(source, in_offset, out, out_offset, 32)
    emu.copy_vectors(source, 0, out, 0, 32)  # the failed launch left the emulation usable


def test_block_above_the_launch_bound_is_caught(emu):
    source, out = vectors_for(emu)
    with pytest.raises(RuntimeError, match=f"above the kernels' launch bound of {emu.block_threads()}"):
        emu.copy_vectors(source, 0, out, 0, emu.block_threads() + 1)


def test_every_kernel_declares_the_launch_bound_the_emulation_checks():
    """The emulation checks blocks against kBlockThreads; a kernel with another bound needs its own check."""
    bounds = [
        bound
        for path in sorted((ROOT / "csrc" / "cuda").glob("*.cu*"))
        for bound in re.findall(r"__launch_bounds__\(([^)]*)\)", path.read_text())
    ]
    assert len(bounds) >= 7 and set(bounds) == {"kBlockThreads"}, bounds


# --- float32 at pix2pix sizes, with the grids of a 132-SM GPU (the checks of test_cuda_ops.py) -----------

GPU_SMS = 132  # an H100 or H200, the GPUs test_cuda_ops.py runs on
MEMORY_FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


@pytest.mark.parametrize("layout", MEMORY_FORMATS)
@pytest.mark.parametrize("layer", FLOAT32_LAYERS)
def test_bn_ops_float32_match_reference_at_pix2pix_sizes(emu, layer, layout, generator):
    emu.set_sm_count(GPU_SMS)
    shape, slope = FLOAT32_LAYERS[layer]
    x, grad, weight, bias = bn_inputs(shape, MEMORY_FORMATS[layout], slope, "cpu", generator)
    expected = reference_bn_ops(x, grad, weight, bias, slope)
    assert_float32_matches(fused_bn_ops(emu, x, grad, weight, bias, slope), expected)


@pytest.mark.parametrize("layout", MEMORY_FORMATS)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("layer", FLOAT32_LAYERS)
def test_bias_act_float32_matches_reference_at_pix2pix_sizes(emu, layer, with_bias, layout, generator):
    emu.set_sm_count(GPU_SMS)
    shape, slope = FLOAT32_LAYERS[layer]
    x, grad = random_inputs(shape, MEMORY_FORMATS[layout], "cpu", generator)
    bias = channel_params(shape[1], "cpu", generator)[1] if with_bias else None
    expected = reference_bias_act(x, grad, bias, slope)
    assert_float32_matches(fused_bias_act(emu, x, grad, bias, slope), expected)


@pytest.mark.parametrize("layout", MEMORY_FORMATS)
@pytest.mark.parametrize("target_is_real", [True, False], ids=["real", "fake"])
@pytest.mark.parametrize("mode", ["vanilla", "lsgan"])
@pytest.mark.parametrize("patch_map", PATCH_MAPS)
def test_gan_loss_float32_matches_reference_at_pix2pix_sizes(
    emu, patch_map, mode, target_is_real, layout, generator
):
    emu.set_sm_count(GPU_SMS)
    (logits,) = random_inputs(PATCH_MAPS[patch_map], MEMORY_FORMATS[layout], "cpu", generator, count=1)
    logits = logits * 3
    expected = reference_loss(lambda x: reference_gan_loss(x, target_is_real, mode), logits)
    assert_float32_matches(fused_loss(emu.gan_loss, logits, target_is_real, mode, True), expected)


@pytest.mark.parametrize("layout", MEMORY_FORMATS)
@pytest.mark.parametrize("image", IMAGES)
def test_l1_loss_float32_matches_reference_at_pix2pix_sizes(emu, image, layout, generator):
    emu.set_sm_count(GPU_SMS)
    pred, target = random_inputs(IMAGES[image], MEMORY_FORMATS[layout], "cpu", generator)
    expected = reference_loss(lambda p, t: reference_l1_loss(p, t, 100.0), pred, target)
    assert_float32_matches(fused_loss(emu.l1_loss, pred, target, 100.0, True), expected)


# The grouped ops at the discriminator's sizes of a batch-1 pair (the batch-16 level is for the GPU).
@pytest.mark.parametrize("layout", MEMORY_FORMATS)
@pytest.mark.parametrize("layer", ["d2_b1", "d3_b1"])
def test_grouped_bn_ops_float32_match_reference_at_pix2pix_sizes(emu, layer, layout, generator):
    emu.set_sm_count(GPU_SMS)
    shape, slope = GROUPED_LAYERS[layer]
    x, grad, weight, bias = bn_inputs(shape, MEMORY_FORMATS[layout], slope, "cpu", generator, groups=2)
    expected = reference_bn_ops(x, grad, weight, bias, slope, groups=2)
    assert_float32_matches(fused_bn_ops(emu, x, grad, weight, bias, slope, groups=2), expected)


@pytest.mark.parametrize("layout", MEMORY_FORMATS)
@pytest.mark.parametrize("mode", ["vanilla", "lsgan"])
@pytest.mark.parametrize("patch_map", PATCH_MAPS)
def test_gan_losses_float32_match_reference_at_pix2pix_sizes(emu, patch_map, mode, layout, generator):
    emu.set_sm_count(GPU_SMS)
    n, c, h, w = PATCH_MAPS[patch_map]
    (logits,) = random_inputs((2 * n, c, h, w), MEMORY_FORMATS[layout], "cpu", generator, count=1)
    logits = logits * 3
    expected = reference_gan_losses(logits, D_TARGETS, mode)
    assert_float32_matches(fused_loss(emu.gan_losses, logits, D_TARGETS, mode, True), expected)


# --- the optimizer kernel: adam_master_step_ ------------------------------------------------------------

ADAM_SHAPES = [(8, 3, 4, 4), (16, 8, 4, 4), (7,), (3, 5), (1,), (0,), (2000,)] * 6  # 42: two launches


def adam_state(
    dtype: torch.dtype, generator: torch.Generator, wide: bool = False
) -> list[list[torch.Tensor]]:
    """Weights (every other 4-D one channels_last), moments as after some steps, gradients (every third in
    another layout than its weight), copies and step counts from 0 to 4; float64 for ``wide``."""
    params, grads, exp_avgs, exp_avg_sqs, copies, steps = [], [], [], [], [], []
    for k, shape in enumerate(ADAM_SHAPES):
        fmt = torch.channels_last if len(shape) == 4 and k % 2 else torch.contiguous_format
        param = torch.randn(shape, generator=generator, dtype=torch.float64).to(memory_format=fmt)
        exp_avg = 0.1 * torch.randn(shape, generator=generator, dtype=torch.float64).to(memory_format=fmt)
        exp_avg_sq = 0.01 * torch.rand(shape, generator=generator, dtype=torch.float64).to(memory_format=fmt)
        grad = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
        if len(shape) == 4 and k % 3 == 0:
            grad = grad.to(
                memory_format=torch.channels_last
                if fmt == torch.contiguous_format
                else torch.contiguous_format
            )
        wide_or_float = torch.float64 if wide else torch.float32
        params.append(param.to(wide_or_float))
        exp_avgs.append(exp_avg.to(wide_or_float))
        exp_avg_sqs.append(exp_avg_sq.to(wide_or_float))
        grads.append(grad)
        copies.append(torch.empty_like(param, dtype=torch.float64 if wide else dtype))
        steps.append(torch.full((), float(k % 5)))
    return [params, grads, exp_avgs, exp_avg_sqs, copies, steps]


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("sms", SM_COUNTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_adam_master_step(emu, dtype, sms, weight_decay):
    """Every weight, moment and copy element written (NaN-poisoned otherwise), each within a few float32
    roundings of the float64 update, the copy the weight rounded exactly, the counts advanced by one."""
    emu.set_sm_count(sms)
    hyper = {"beta1": 0.5, "beta2": 0.999, "weight_decay": weight_decay, "eps": 1e-8}
    state = adam_state(dtype, torch.Generator().manual_seed(sms))
    start = [p.clone() for p in state[0]]
    truth = adam_state(dtype, torch.Generator().manual_seed(sms), wide=True)
    launches = emu.launches()
    emu.adam_master_step_(
        *state, torch.tensor(2e-3), hyper["beta1"], hyper["beta2"], weight_decay, hyper["eps"]
    )
    assert emu.launches() - launches == 2  # 42 weights, 41 not empty: 32 + 9
    reference_adam_master_step_(*truth, lr=2e-3, **hyper)
    for k, (param, copy) in enumerate(zip(state[0], state[4], strict=True)):
        if param.numel() == 0:
            continue
        step_size = float((truth[0][k] - start[k].double()).abs().max())
        ulp = 2**-23 * float(truth[0][k].abs().max())  # float32 spacing at the largest weight
        assert float((param.double() - truth[0][k]).abs().max()) <= 1e-4 * step_size + 2 * ulp, k
        for got, exact in ((state[2][k], truth[2][k]), (state[3][k], truth[3][k])):
            assert float((got.double() - exact).abs().max()) <= 1e-6 * float(exact.abs().max()) + 1e-12, k
        assert torch.equal(copy, param.to(dtype)), k
        assert param.stride() == start[k].stride()
    assert [float(s) for s in state[5]] == [float(k % 5 + 1) for k in range(len(ADAM_SHAPES))]


def test_adam_master_step_checks_its_arguments(emu):
    state = adam_state(torch.bfloat16, torch.Generator().manual_seed(0))
    args = (0.5, 0.999, 0.0, 1e-8)
    with pytest.raises(RuntimeError, match="must have one length"):
        emu.adam_master_step_(state[0], state[1][:-1], *state[2:], torch.tensor(1e-3), *args)
    with pytest.raises(RuntimeError, match="lr must be a one-element float32 tensor"):
        emu.adam_master_step_(*state, torch.tensor([1e-3, 1e-3]), *args)
    with pytest.raises(RuntimeError, match="must have one dtype"):
        emu.adam_master_step_(state[0], [g.half() for g in state[1]], *state[2:], torch.tensor(1e-3), *args)
