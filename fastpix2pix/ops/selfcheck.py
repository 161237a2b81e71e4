"""The start-up kernel check: the fused kernels against the reference ops, on the device they run on.

A user's GPU, driver or toolkit may differ from anything the project was tested on, so the package checks
itself where it runs: the first time a process uses the fused ops on a device, every public fused op
(:mod:`fastpix2pix.ops.kernels`) runs once on small random inputs, forward and backward, against
:mod:`fastpix2pix.ops.reference` (the same functions in plain PyTorch): in float32 (NCHW and channels_last),
and in bf16 channels_last as the fast path trains (G's 3-channel output, D's 1-channel patch map, the U-Net's
1x1 innermost level included). An op whose output or any gradient differs from a float64 reference by more
than :data:`KERNEL_TOLERANCE_FACTOR` times the reference op's own error in the same dtype (and by
:data:`KERNEL_TOLERANCE` in any case), or is not finite where the reference is, fails the device: a
:class:`KernelCheckWarning` names the op, the device and the error, once, and every fused op on that device
runs the reference implementation from then on. ``fastpix2pix info --check`` runs it and prints a table.

The check is on by default; ``--no_self_check`` (train) or ``FASTPIX2PIX_SELF_CHECK=0`` turns it off, and
with it the CUDA-graph check (:mod:`fastpix2pix.training.graph_check`).
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from fastpix2pix.ops import reference
from fastpix2pix.ops.running_stats import immediate_running_stats

__all__ = [
    "KERNEL_TOLERANCE",
    "KERNEL_TOLERANCE_FACTOR",
    "DeviceLostError",
    "KernelCheckWarning",
    "OpCheck",
    "adam_kernel_usable",
    "device_error",
    "fused_kernels_usable",
    "reset_kernel_checks",
    "self_check_enabled",
    "set_self_check",
    "verify_kernels",
]

# Each output and gradient of a fused op is compared with the reference op computed in float64 on the CPU
# (relative norm error). The fused op may be off by KERNEL_TOLERANCE_FACTOR times the float32 reference
# op's own error, and always by KERNEL_TOLERANCE: TF32 is off during the check, but the convolutions of the
# two sides may still run different cuDNN algorithms, whose float32 rounding differs. Measured on CPU: the
# fused ops are within 1e-6 (often more exact than the reference op). A kernel bug (a missed element or
# block, a wrong index, a biased variance, a wrong eps) costs 1e-3 or far more.
KERNEL_TOLERANCE = 5e-5
KERNEL_TOLERANCE_FACTOR = 4.0

_ENV_SWITCH = "FASTPIX2PIX_SELF_CHECK"


class DeviceLostError(RuntimeError):
    """A fused kernel left the device unusable (a sticky CUDA error such as an illegal memory access): no op
    can run there any more, the reference ops included, so the process must stop."""


class KernelCheckWarning(RuntimeWarning):
    """A fused kernel disagreed with the reference op on a device; that device now uses the reference."""


@dataclass(frozen=True)
class OpCheck:
    """One fused op's comparison on one device, for its worst output or gradient: the relative error of
    the fused op and of the float32 reference op, both against a float64 reference on the CPU."""

    op: str
    device: str
    error: float
    worst: str  # which output or gradient
    reference_error: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.error <= self.tolerance  # False for NaN as well

    @property
    def margin(self) -> float:
        return self.error / self.tolerance


# --- switching the checks ---------------------------------------------------------------------------------

_enabled: bool | None = None  # None: read the environment variable at the first use


def self_check_enabled() -> bool:
    global _enabled
    if _enabled is None:
        _enabled = os.environ.get(_ENV_SWITCH, "1").strip().lower() not in ("0", "false", "off", "no")
    return _enabled


def set_self_check(enabled: bool) -> None:
    """Turn both start-up checks on or off for this process (``--no_self_check``)."""
    global _enabled
    _enabled = enabled


# --- the kernel check ---------------------------------------------------------------------------------------

# Devices checked in this process: True (the fused kernels are used) or False (the reference ops are).
_verdicts: dict[str, bool] = {}
_checking = False  # the check itself calls the fused ops: they must not recurse into it


def reset_kernel_checks() -> None:
    """Forget every device's verdict (tests; a process that rebuilt its kernels)."""
    _verdicts.clear()
    _adam_verdicts.clear()


def _device_key(device: torch.device) -> str:
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def fused_kernels_usable(device: torch.device) -> bool:
    """Whether the fused ops should run on ``device``: checks the device the first time (see module doc).

    Never checks while tracing for ``torch.compile`` or capturing a CUDA graph (a check synchronises):
    the device is then taken as usable until an eager call has checked it. The fast trainer checks before
    it captures.
    """
    if _checking:
        return True
    return _cached_verdict(_verdicts, device, lambda: all(check.passed for check in verify_kernels(device)))


def _cached_verdict(verdicts: dict[str, bool], device: torch.device, check: Callable[[], bool]) -> bool:
    """The verdict recorded for ``device`` in ``verdicts``; else ``check()``'s (which records it), or True
    where no check may run now (self-check off, tracing, capturing)."""
    verdict = verdicts.get(_device_key(device))
    if verdict is not None:
        return verdict
    if not self_check_enabled() or _cannot_check_now(device):
        return True
    return check()


def _cannot_check_now(device: torch.device) -> bool:
    if torch.compiler.is_compiling():
        return True
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def verify_kernels(device: torch.device | str) -> list[OpCheck]:
    """Run every case of :data:`CASES` on ``device``, record the verdict, warn once on a failure."""
    global _checking
    device = torch.device(device)
    key = _device_key(device)
    from fastpix2pix.ops import kernels  # needs the compiled library: the reference ops work without it

    _checking = True
    try:
        with _float32_conditions(device):
            checks = [_run_case(name, case, kernels, device) for name, case in CASES.items()]
    finally:
        _checking = False
    failed = [check for check in checks if not check.passed]
    _verdicts[key] = not failed
    if failed:
        details = "; ".join(f"{c.op}: {c.worst} off by {c.error:.2e} > {c.tolerance:.1e}" for c in failed)
        warnings.warn(
            f"fastpix2pix: the fused kernels disagree with the reference ops on {key} ({details}): "
            f"using the reference ops on {key} for this process. "
            "Please report this with the output of `fastpix2pix info --check`.",
            KernelCheckWarning,
            stacklevel=3,
        )
    return checks


# --- the optimizer kernel's check -----------------------------------------------------------------------

_adam_verdicts: dict[str, bool] = {}
ADAM_TOLERANCE = 1e-3  # of the update's size; float32 rounding of a weight near 1 is ~3e-5 of a 2e-3 step


def adam_kernel_usable(device: torch.device) -> bool:
    """Whether ``adam_master_step_``'s kernel may run on ``device``: the first call there compares one
    update of a few weights (channels_last, odd sizes, bf16 copies, a step count past 1) with the reference
    op in float64 on the CPU. On a disagreement or an error it warns once and the reference runs there. Not
    checked while capturing or compiling (taken as usable; the fast trainer checks before it captures)."""
    return _cached_verdict(_adam_verdicts, device, lambda: _check_adam_kernel(device))


def _check_adam_kernel(device: torch.device) -> bool:
    """Run the optimizer kernel's check on ``device``, record the verdict, warn once on a failure."""
    key = _device_key(device)
    problem = _adam_problem(device)
    _adam_verdicts[key] = problem is None
    if problem is not None:
        warnings.warn(
            f"fastpix2pix: the optimizer kernel (adam_master_step_) disagrees with the reference on {key} "
            f"({problem}): using the reference update on {key} for this process. Please report this with "
            "the output of `fastpix2pix info --check`.",
            KernelCheckWarning,
            stacklevel=5,
        )
    return problem is None


def _adam_inputs(generator: torch.Generator) -> list[list[torch.Tensor]]:
    shapes = [(8, 3, 4, 4), (70_001,), (5, 3)]
    params = [torch.randn(s, generator=generator) for s in shapes]
    params[0] = params[0].contiguous(memory_format=torch.channels_last)
    exp_avgs = [0.1 * torch.randn(p.shape, generator=generator).to(memory_format=torch.preserve_format)
                for p in params]  # fmt: skip
    exp_avg_sqs = [0.01 * torch.rand(p.shape, generator=generator) for p in params]
    exp_avgs[0] = exp_avgs[0].contiguous(memory_format=torch.channels_last)
    exp_avg_sqs[0] = exp_avg_sqs[0].contiguous(memory_format=torch.channels_last)
    grads = [torch.randn(s, generator=generator).to(BF16) for s in shapes]
    copies = [torch.empty_like(p, dtype=BF16) for p in params]
    steps = [torch.full((), 3.0) for _ in params]
    return [params, grads, exp_avgs, exp_avg_sqs, copies, steps]


def _adam_problem(device: torch.device) -> str | None:
    """What is wrong with the optimizer kernel on ``device``, or None."""
    from fastpix2pix.ops import kernels  # needs the compiled library: the reference works without it

    hyper = {"beta1": 0.5, "beta2": 0.999, "weight_decay": 0.0, "eps": 1e-8}
    inputs = _adam_inputs(torch.Generator().manual_seed(0))
    start = [p.clone() for p in inputs[0]]
    on_device = [[t.to(device) for t in column] for column in inputs]
    exact = [[t.double() if t.is_floating_point() and t.dtype != BF16 else t.clone() for t in column]
             for column in inputs]  # fmt: skip
    exact[4] = [p.clone() for p in exact[0]]  # float64 copies
    try:
        kernels.adam_master_step_(*on_device, lr=torch.full((), 2e-3, device=device), **hyper)
        got = [[t.cpu() for t in column] for column in on_device]
    except Exception as error:
        lost = device_error(device)
        if lost is not None:
            raise DeviceLostError(
                f"the optimizer kernel check broke {_device_key(device)} ({str(error).splitlines()[0]}; then "
                f"{lost}): nothing can run there in this process"
            ) from error
        return f"raised {str(error).splitlines()[0]}"[:300]
    reference.adam_master_step_(*exact, lr=2e-3, **hyper)
    for name, column in (("weight", 0), ("exp_avg", 2), ("exp_avg_sq", 3)):
        for k, (ours, truth) in enumerate(zip(got[column], exact[column], strict=True)):
            scale = (
                float((truth - start[k].double()).abs().max()) if column == 0 else float(truth.abs().max())
            )
            error = float((ours.double() - truth).abs().max()) / max(scale, 1e-30)
            if not error <= ADAM_TOLERANCE:
                return f"{name} {k} off by {error:.2e} of its scale"
    for k, (copy, weight) in enumerate(zip(got[4], got[0], strict=True)):
        if not torch.equal(copy, weight.to(BF16)):
            return f"copy {k} is not its weight rounded to bf16"
    if any(float(step) != 4.0 for step in got[5]):
        return "a step count did not advance by 1"
    return None


@contextlib.contextmanager
def _float32_conditions(device: torch.device) -> Iterator[None]:
    """Plain float32 arithmetic on both sides: no autocast, no TF32, the caller's RNG untouched; running
    statistics updated at once (a case compares them right after the op)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(immediate_running_stats())
        stack.enter_context(torch.autocast(device.type, enabled=False))
        stack.enter_context(torch.backends.cudnn.flags(enabled=True, allow_tf32=False))
        stack.enter_context(torch.enable_grad())
        saved_matmul = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        stack.callback(setattr, torch.backends.cuda.matmul, "allow_tf32", saved_matmul)
        yield


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """``||got - expected|| / ||expected||`` in float64 (absolute when ``expected`` is zero); inf when
    ``got`` is not finite where ``expected`` is, or the shapes differ."""
    if got.shape != expected.shape:
        return math.inf
    got, expected = got.detach().double().cpu(), expected.detach().double().cpu()
    if not torch.equal(torch.isfinite(got), torch.isfinite(expected)):
        return math.inf
    finite = torch.isfinite(expected)
    diff = float((got[finite] - expected[finite]).norm())
    scale = float(expected[finite].norm())
    return diff / scale if scale > 0 else diff


# A case builds its inputs from a generator (on the CPU, moved to the device) and returns the function
# to compare: called with an ops module (fastpix2pix.ops or fastpix2pix.ops.reference) and fresh leaf copies
# of the inputs, it returns the tensors to compare (outputs, then what mutated in place).
Case = Callable[[torch.Generator, torch.device], tuple[list[torch.Tensor], Callable[..., list[torch.Tensor]]]]


def _randn(
    generator: torch.Generator,
    device: torch.device,
    *shape: int,
    channels_last: bool = False,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    t = torch.randn(shape, generator=generator).to(device, dtype)
    return t.contiguous(memory_format=torch.channels_last) if channels_last and t.dim() == 4 else t


@dataclass(frozen=True)
class ConvShape:
    """A convolution of a case: ``x`` is [batch, in_channels, size, size]; 4x4 kernel."""

    in_channels: int = 16
    out_channels: int = 32
    size: int = 24
    batch: int = 4
    stride: int = 2
    padding: int = 1


# Sizes that take several thread blocks on a GPU (the reductions' two-level path) yet stay a few ms.
DEFAULT_SHAPE = ConvShape()
BF16 = torch.bfloat16


def _conv_inputs(
    gen: torch.Generator, dev: torch.device, shape: ConvShape, transposed: bool, channels_last: bool, dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The activation and weight as ConvBlock passes them: in the autocast dtype (bf16 in the fast path)."""
    x = _randn(gen, dev, shape.batch, shape.in_channels, shape.size, shape.size, channels_last=channels_last,
               dtype=dtype)  # fmt: skip
    wshape = (
        (shape.in_channels, shape.out_channels) if transposed else (shape.out_channels, shape.in_channels)
    )
    weight = (_randn(gen, dev, *wshape, 4, 4) * 0.1).to(dtype)
    if channels_last:
        weight = weight.contiguous(memory_format=torch.channels_last)
    return x, weight


def _conv_bn_act_case(
    *,
    transposed: bool,
    slope: float,
    training: bool,
    channels_last: bool,
    dtype: torch.dtype = torch.float32,
    shape: ConvShape = DEFAULT_SHAPE,
    groups: int = 1,
) -> Case:
    def build(gen: torch.Generator, dev: torch.device):
        x, weight = _conv_inputs(gen, dev, shape, transposed, channels_last, dtype)
        if groups > 1:  # parts of different means: shared statistics would show
            x = x + torch.arange(groups, device=dev).repeat_interleave(shape.batch // groups).view(
                -1, 1, 1, 1
            )
        channels = shape.out_channels
        # BatchNorm parameters and running statistics stay float32 (also under autocast).
        bn_weight = 1 + 0.1 * _randn(gen, dev, channels)
        bn_bias = 0.1 * _randn(gen, dev, channels)
        running = [0.1 * _randn(gen, dev, channels), 1 + 0.1 * _randn(gen, dev, channels).abs()]

        def run(ops, x, weight, bn_weight, bn_bias):
            stats_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
            mean, var = (t.to(x.device, stats_dtype, copy=True) for t in running)
            out = ops.conv_bn_act(
                x, weight, bn_weight, bn_bias, mean, var, stride=(shape.stride,) * 2,
                padding=(shape.padding,) * 2, transposed=transposed, training=training, negative_slope=slope,
                groups=groups,
            )  # fmt: skip
            return [out, mean, var]

        return [x, weight, bn_weight, bn_bias], run

    return build


def _conv_bias_act_case(
    *,
    transposed: bool,
    slope: float,
    channels_last: bool,
    dtype: torch.dtype = torch.float32,
    shape: ConvShape = DEFAULT_SHAPE,
) -> Case:
    def build(gen: torch.Generator, dev: torch.device):
        x, weight = _conv_inputs(gen, dev, shape, transposed, channels_last, dtype)
        bias = 0.1 * _randn(gen, dev, shape.out_channels)  # float32, as conv biases stay under autocast

        def run(ops, x, weight, bias):
            out = ops.conv_bias_act(
                x, weight, bias, stride=(shape.stride,) * 2, padding=(shape.padding,) * 2,
                transposed=transposed, negative_slope=slope,
            )  # fmt: skip
            return [out]

        return [x, weight, bias], run

    return build


def _gan_loss_case(*, mode: str, real: bool, dtype: torch.dtype = torch.float32) -> Case:
    def build(gen: torch.Generator, dev: torch.device):
        # A batch of 16 70x70-PatchGAN maps of a 256 px image: 15,376 logits.
        logits = 2 * _randn(gen, dev, 16, 1, 31, 31, channels_last=True, dtype=dtype)
        return [logits], lambda ops, logits: [ops.gan_loss(logits, real, mode)]

    return build


def _gan_losses_case(*, mode: str, dtype: torch.dtype = torch.float32) -> Case:
    def build(gen: torch.Generator, dev: torch.device):
        # The D step's fake and real maps as one batch (8 + 8 maps of a 256 px image's PatchGAN).
        logits = 2 * _randn(gen, dev, 16, 1, 31, 31, channels_last=True, dtype=dtype)
        return [logits], lambda ops, logits: [ops.gan_losses(logits, (False, True), mode)]

    return build


def _relu_cat_case(*, channels_last: bool, dtype: torch.dtype = torch.float32, size: int = 24) -> Case:
    def build(gen: torch.Generator, dev: torch.device):
        # A U-Net skip connection: the encoder's output (either sign: LeakyReLU) and the level below's.
        skip = _randn(gen, dev, 4, 16, size, size, channels_last=channels_last, dtype=dtype)
        x = _randn(gen, dev, 4, 8, size, size, channels_last=channels_last, dtype=dtype)
        return [skip, x], lambda ops, skip, x: [ops.relu_cat(skip, x)]

    return build


def _l1_loss_case(gen: torch.Generator, dev: torch.device):
    pred, target = _randn(gen, dev, 4, 3, 64, 64), _randn(gen, dev, 4, 3, 64, 64)
    return [pred, target], lambda ops, pred, target: [ops.l1_loss(pred, target, 100.0)]


def _l1_loss_bf16_case(gen: torch.Generator, dev: torch.device):
    # The fast path's: a bf16 generator output against the float32 real image, which needs no gradient
    # (its gradient would have the prediction's bf16 precision).
    pred, target = _randn(gen, dev, 4, 3, 64, 64, dtype=BF16), _randn(gen, dev, 4, 3, 64, 64)
    return [pred], lambda ops, pred: [ops.l1_loss(pred, target.to(pred.device), 100.0)]


# The U-Net's innermost level: down to 1x1 (no norm, ReLU) and up from 1x1 with BatchNorm.
TO_ONE_BY_ONE = ConvShape(in_channels=16, out_channels=16, size=2)
FROM_ONE_BY_ONE = ConvShape(in_channels=16, out_channels=16, size=1)
# The last layers: D's 1-channel patch map (stride 1) and G's 3-channel image (transposed).
D_OUTPUT = ConvShape(in_channels=16, out_channels=1, size=12, stride=1)
G_OUTPUT = ConvShape(in_channels=16, out_channels=3, size=12)

CASES: dict[str, Case] = {
    "conv_bn_act (down, LeakyReLU, NCHW)": _conv_bn_act_case(
        transposed=False, slope=0.2, training=True, channels_last=False
    ),
    "conv_bn_act (down, LeakyReLU, channels_last)": _conv_bn_act_case(
        transposed=False, slope=0.2, training=True, channels_last=True
    ),
    "conv_bn_act (up, ReLU, channels_last)": _conv_bn_act_case(
        transposed=True, slope=0.0, training=True, channels_last=True
    ),
    "conv_bn_act (eval)": _conv_bn_act_case(transposed=False, slope=0.2, training=False, channels_last=True),
    "conv_bias_act (LeakyReLU)": _conv_bias_act_case(transposed=False, slope=0.2, channels_last=True),
    "conv_bias_act (up, identity)": _conv_bias_act_case(transposed=True, slope=1.0, channels_last=False),
    "gan_loss (vanilla, real)": _gan_loss_case(mode="vanilla", real=True),
    "gan_loss (vanilla, fake)": _gan_loss_case(mode="vanilla", real=False),
    "gan_loss (lsgan, real)": _gan_loss_case(mode="lsgan", real=True),
    "gan_losses (fake, real; lsgan)": _gan_losses_case(mode="lsgan"),
    "conv_bn_act (groups=2, NCHW)": _conv_bn_act_case(
        transposed=False, slope=0.2, training=True, channels_last=False, groups=2
    ),
    "l1_loss": _l1_loss_case,
    "relu_cat (NCHW)": _relu_cat_case(channels_last=False),
    # The fast path's dtype and layout: bf16 activations and conv weights, channels_last.
    "conv_bn_act (down, LeakyReLU, bf16)": _conv_bn_act_case(
        transposed=False, slope=0.2, training=True, channels_last=True, dtype=BF16
    ),
    "conv_bn_act (up, ReLU, bf16)": _conv_bn_act_case(
        transposed=True, slope=0.0, training=True, channels_last=True, dtype=BF16
    ),
    "conv_bn_act (up from 1x1, ReLU, bf16)": _conv_bn_act_case(
        transposed=True, slope=0.0, training=True, channels_last=True, dtype=BF16, shape=FROM_ONE_BY_ONE
    ),
    "conv_bias_act (down to 1x1, ReLU, bf16)": _conv_bias_act_case(
        transposed=False, slope=0.0, channels_last=True, dtype=BF16, shape=TO_ONE_BY_ONE
    ),
    "conv_bias_act (D output, C=1, bf16)": _conv_bias_act_case(
        transposed=False, slope=1.0, channels_last=True, dtype=BF16, shape=D_OUTPUT
    ),
    "conv_bias_act (G output, C=3, bf16)": _conv_bias_act_case(
        transposed=True, slope=1.0, channels_last=True, dtype=BF16, shape=G_OUTPUT
    ),
    "relu_cat (bf16)": _relu_cat_case(channels_last=True, dtype=BF16),
    "relu_cat (2x2, bf16)": _relu_cat_case(channels_last=True, dtype=BF16, size=2),  # the innermost join
    "gan_loss (vanilla, real, bf16)": _gan_loss_case(mode="vanilla", real=True, dtype=BF16),
    # D's fake and real pairs as one batch (train_step's pairs_as_one_batch, the fast path's default).
    "conv_bn_act (D pairs, groups=2, bf16)": _conv_bn_act_case(
        transposed=False, slope=0.2, training=True, channels_last=True, dtype=BF16, groups=2
    ),
    "gan_losses (fake, real, bf16)": _gan_losses_case(mode="vanilla", dtype=BF16),
    "l1_loss (bf16 prediction)": _l1_loss_bf16_case,
}


def device_error(device: torch.device) -> str | None:
    """Why nothing can run on ``device`` any more (a sticky CUDA error, which every later call reports),
    or None while it works. The CPU always works."""
    if device.type != "cuda":
        return None
    try:
        torch.cuda.synchronize(device)
        torch.ones(1, device=device).add_(1).cpu()
    except Exception as error:  # the CUDA runtime reports a lost context as RuntimeError or AcceleratorError
        return str(error).splitlines()[0]
    return None


def _run_case(name: str, case: Case, ops: Any, device: torch.device) -> OpCheck:
    generator = torch.Generator().manual_seed(0)  # the caller's generators stay untouched
    inputs, run = case(generator, device)
    cpu64 = [t.detach().to("cpu", torch.float64) for t in inputs]
    try:
        fused = _outputs_and_grads(run, ops, inputs)
    except Exception as error:  # e.g. no kernel image for this GPU: the reference ops still work ...
        lost = device_error(device)
        if lost is not None:  # ... unless the error poisoned the device (a sticky CUDA error)
            raise DeviceLostError(
                f"the fused kernel check broke {_device_key(device)} ({name}: {str(error).splitlines()[0]}; "
                f"then {lost}): nothing can run there in this process. Please report this with the output "
                f"of `fastpix2pix info --check`; FASTPIX2PIX_SELF_CHECK=0 with --backend reference avoids "
                f"the fused kernels"
            ) from error
        return OpCheck(
            name, _device_key(device), math.inf, f"raised {error}"[:300], math.nan, KERNEL_TOLERANCE
        )
    float32 = _outputs_and_grads(run, reference, inputs)
    exact = _outputs_and_grads(run, reference, cpu64)
    labels = [f"output {i}" for i in range(len(fused) - len(inputs))]
    labels += [f"grad of input {i}" for i in range(len(inputs))]
    worst: OpCheck | None = None
    for label, got, ours, truth in zip(labels, fused, float32, exact, strict=True):
        error = relative_error(got, truth)
        baseline = relative_error(ours, truth)
        tolerance = max(KERNEL_TOLERANCE, KERNEL_TOLERANCE_FACTOR * baseline)
        check = OpCheck(name, _device_key(device), error, label, baseline, tolerance)
        if worst is None or not check.passed or (worst.passed and check.margin > worst.margin):
            worst = check
            if not check.passed:
                break
    assert worst is not None
    return worst


def _outputs_and_grads(
    run: Callable[..., list[torch.Tensor]], module: Any, inputs: list[torch.Tensor]
) -> list[torch.Tensor | None]:
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    outputs = run(module, *leaves)
    # A fixed random cotangent for the first output (the one autograd flows through).
    cotangent = torch.randn(outputs[0].shape, generator=torch.Generator().manual_seed(1))
    outputs[0].backward(cotangent.to(outputs[0].device, outputs[0].dtype))
    return [*outputs, *(leaf.grad for leaf in leaves)]


def format_kernel_checks(checks: list[OpCheck]) -> str:
    """The table ``fastpix2pix info --check`` prints."""
    width = max(len(c.op) for c in checks)
    lines = [f"  {'op':<{width}}  {'device':<8}  {'fused':>9}  {'reference':>9}  {'allowed':>9}  result"]
    for c in checks:
        verdict = "ok" if c.passed else f"FAILED ({c.worst})"
        lines.append(
            f"  {c.op:<{width}}  {c.device:<8}  {c.error:>9.2e}  {c.reference_error:>9.2e}  "
            f"{c.tolerance:>9.2e}  {verdict}"
        )
    return "\n".join(lines)
