"""The start-up self-checks: the kernel check (fastpix2pix.ops.selfcheck) passes on working kernels, catches a
sabotaged one, warns once and falls back to the reference ops on that device only; the CUDA-graph check
(fastpix2pix.training.graph_check) passes a correct replay and catches wrong ones."""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch
from tiny_run import tiny_options

from fastpix2pix._extension import extension_available
from fastpix2pix.ops import reference, selfcheck
from fastpix2pix.training.fast_step import EagerGraphRuntime, FastPathConfig
from fastpix2pix.training.fast_trainer import FastTrainer
from fastpix2pix.training.graph_check import verify_captured_step

if not extension_available():
    pytest.skip(
        "the compiled library fastpix2pix._C is not built: no fused ops to check", allow_module_level=True
    )

from fastpix2pix import cli
from fastpix2pix.commands import info
from fastpix2pix.ops import fused as ops  # (needs the library)
from fastpix2pix.ops import kernels

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def fresh_verdicts(monkeypatch):
    # Checks on (a trainer run with --no_self_check earlier in the process switches them off for it).
    monkeypatch.setattr(selfcheck, "_enabled", True)
    selfcheck.reset_kernel_checks()
    yield
    selfcheck.reset_kernel_checks()


class _Sabotaged:
    """torch.ops.fastpix2pix with one op's first output scaled: a kernel off by ``relative``."""

    def __init__(self, op: str, relative: float) -> None:
        self.op, self.relative = op, relative

    def __getattr__(self, name: str):
        real = getattr(torch.ops.fastpix2pix, name)
        if name != self.op:
            return real

        def call(*args):
            result = real(*args)
            if isinstance(result, torch.Tensor):
                return result * (1 + self.relative)
            first, *rest = result
            return (first * (1 + self.relative), *rest)

        return call


def _sabotage(monkeypatch: pytest.MonkeyPatch, op: str, relative: float) -> None:
    monkeypatch.setattr(kernels, "_lib", _Sabotaged(op, relative))


def test_working_kernels_pass_with_margin():
    checks = selfcheck.verify_kernels(CPU)
    assert {c.op for c in checks} == set(selfcheck.CASES)
    for check in checks:
        assert check.passed, check
        if "bf16" in check.op:  # as close to float64 as the reference op in bf16 (at most 2x its error)
            assert check.error <= 2 * check.reference_error, check
        else:
            assert check.error < check.tolerance / 10, check  # far from the line, not just under it


BF16_CASES = [name for name in selfcheck.CASES if "bf16" in name]


def test_the_check_covers_the_fast_paths_dtype_layout_and_edge_shapes():
    """bf16 channels_last, as the fast path trains; G's 3-channel and D's 1-channel outputs; 1x1 maps."""
    assert len(BF16_CASES) >= 8
    for shape in ("C=1", "C=3", "1x1"):
        assert any(shape in name for name in BF16_CASES), shape


@pytest.mark.parametrize("case", BF16_CASES)
def test_a_bf16_kernel_off_by_5_percent_is_caught(monkeypatch, case):
    op = case.split(" ")[0]
    _sabotage(monkeypatch, op, 0.05)
    with pytest.warns(selfcheck.KernelCheckWarning, match=rf"{op}.*cpu"):
        checks = selfcheck.verify_kernels(CPU)
    assert case in {c.op for c in checks if not c.passed}


@pytest.mark.parametrize(
    ("op", "case"),
    [
        ("conv_bn_act", "conv_bn_act (down, LeakyReLU, NCHW)"),
        ("conv_bias_act", "conv_bias_act (LeakyReLU)"),
        ("gan_loss", "gan_loss (vanilla, real)"),
        ("l1_loss", "l1_loss"),
    ],
)
def test_a_kernel_off_by_1e_3_is_caught(monkeypatch, op, case):
    _sabotage(monkeypatch, op, 1e-3)
    with pytest.warns(selfcheck.KernelCheckWarning, match=rf"{op}.*cpu"):
        checks = selfcheck.verify_kernels(CPU)
    failed = {c.op for c in checks if not c.passed}
    assert case in failed
    assert all(c.op.startswith(op) for c in checks if not c.passed)


def test_a_failed_device_falls_back_to_the_reference_ops_and_warns_once(monkeypatch):
    _sabotage(monkeypatch, "l1_loss", 1e-2)
    pred, target = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    with pytest.warns(selfcheck.KernelCheckWarning, match="using the reference ops on cpu") as record:
        loss = ops.l1_loss(pred, target, 100.0)
    assert len(record) == 1
    assert torch.equal(loss, reference.l1_loss(pred, target, 100.0))  # the reference op ran
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        again = ops.l1_loss(pred, target, 100.0)
    assert torch.equal(again, reference.l1_loss(pred, target, 100.0))
    assert not selfcheck.fused_kernels_usable(CPU)


def test_the_first_fused_call_on_a_device_runs_the_check(monkeypatch):
    calls = []
    real = selfcheck.verify_kernels
    monkeypatch.setattr(selfcheck, "verify_kernels", lambda device: calls.append(device) or real(device))
    pred = torch.randn(2, 3, 8, 8, requires_grad=True)
    ops.l1_loss(pred, torch.randn(2, 3, 8, 8)).backward()
    ops.l1_loss(pred, torch.randn(2, 3, 8, 8))
    assert calls == [CPU]
    assert selfcheck.fused_kernels_usable(CPU)


def test_switched_off_no_check_runs(monkeypatch):
    monkeypatch.setattr(selfcheck, "_enabled", False)
    _sabotage(monkeypatch, "l1_loss", 1e-2)
    pred, target = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = ops.l1_loss(pred, target)
    assert not torch.equal(loss, reference.l1_loss(pred, target))  # the (sabotaged) fused op ran


def test_a_kernel_that_raises_fails_the_device(monkeypatch):
    # E.g. "no kernel image is available for execution on the device" on a GPU the build did not target.
    class Raising:
        def __getattr__(self, name):
            def call(*args):
                raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

            return call

    monkeypatch.setattr(kernels, "_lib", Raising())
    with pytest.warns(selfcheck.KernelCheckWarning, match="no kernel image"):
        checks = selfcheck.verify_kernels(CPU)
    assert not any(c.passed for c in checks)
    assert not selfcheck.fused_kernels_usable(CPU)


def test_the_environment_variable_switches_it_off(monkeypatch):
    monkeypatch.setattr(selfcheck, "_enabled", None)
    monkeypatch.setenv("FASTPIX2PIX_SELF_CHECK", "0")
    assert not selfcheck.self_check_enabled()
    monkeypatch.setattr(selfcheck, "_enabled", None)
    monkeypatch.setenv("FASTPIX2PIX_SELF_CHECK", "1")
    assert selfcheck.self_check_enabled()


def test_the_check_leaves_the_callers_random_state_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    selfcheck.verify_kernels(CPU)
    assert torch.equal(torch.rand(3), expected)


def test_info_check_prints_a_table_and_fails_on_a_bad_kernel(monkeypatch, capsys):
    assert info.main(["--check"]) == 0
    out = capsys.readouterr().out
    assert "kernel self-check" in out
    assert all(name in out for name in selfcheck.CASES)
    selfcheck.reset_kernel_checks()
    _sabotage(monkeypatch, "gan_loss", 1e-2)
    assert info.main(["--check"]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_relative_error_treats_non_finite_and_shape_mismatches_as_failures():
    ref = torch.ones(4)
    assert selfcheck.relative_error(ref.clone(), ref) == 0
    assert math.isinf(selfcheck.relative_error(torch.tensor([1.0, math.nan, 1, 1]), ref))
    assert math.isinf(selfcheck.relative_error(torch.ones(5), ref))
    assert selfcheck.relative_error(torch.full((4,), 1.001), ref) == pytest.approx(1e-3, rel=1e-4)


def test_the_fallback_is_compiled_as_a_constant():
    # A device's verdict is a constant for torch.compile: the fused op traces without a graph break.
    compiled = torch.compile(ops.l1_loss, fullgraph=True, backend="eager")
    pred, target = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(compiled(pred, target), reference.l1_loss(pred, target))


# --- the CUDA-graph check, on the CPU: EagerGraphRuntime's replay is what a correct graph computes ------


def _graphed_step(tiny_data, tmp_path):
    opt = tiny_options(tiny_data, tmp_path, fast_path="on")
    config = FastPathConfig.for_device("cpu", loss_readback_every=8, verify_graph=False)
    trainer = FastTrainer(opt, config, progress_bar=False)
    trainer.config = dataclasses.replace(trainer.config, cuda_graph=True)
    trainer.graph_runtime = EagerGraphRuntime()
    step = trainer._ensure_step()
    trainer.data.start_epoch(1)
    return step


class _Replay:
    def __init__(self, run) -> None:
        self.replay = run


def test_a_correct_replay_passes_and_the_check_leaves_no_trace(tiny_data, tmp_path):
    step = _graphed_step(tiny_data, tmp_path)
    before = step._snapshot()
    data_before = step.source.state_dict()
    rng_before = torch.get_rng_state()
    result = verify_captured_step(step)
    assert result.passed and result.error == 0 and result.noise == 0, result.describe()
    after = step._snapshot()
    assert all(torch.equal(after[name], value) for name, value in before.items())
    data_after = step.source.state_dict()
    assert data_after.keys() == data_before.keys()
    for key, value in data_before.items():
        same = (
            torch.equal(value, data_after[key])
            if isinstance(value, torch.Tensor)
            else value == data_after[key]
        )
        assert same, key
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert step.pending == 0


def test_a_replay_on_a_stale_or_skipped_batch_fails(tiny_data, tmp_path):
    step = _graphed_step(tiny_data, tmp_path)

    def one_batch_ahead() -> None:  # e.g. a graph that read the buffers before the batch was written
        step.source.next_batch()
        step.iteration()

    step.graph = _Replay(one_batch_ahead)
    result = verify_captured_step(step)
    assert not result.passed and result.error > 10 * result.tolerance, result.describe()


def test_a_replay_with_another_learning_rate_fails(tiny_data, tmp_path):
    step = _graphed_step(tiny_data, tmp_path)

    def doubled_lr() -> None:  # e.g. a graph holding a stale copy of the learning rate
        groups = [g for o in step.optimizers for g in o.param_groups]
        saved = [g["lr"] for g in groups]
        for group in groups:
            group["lr"] = 2 * group["lr"]
        step.iteration()
        for group, lr in zip(groups, saved, strict=True):
            group["lr"] = lr

    step.graph = _Replay(doubled_lr)
    result = verify_captured_step(step)
    assert not result.passed, result.describe()
    assert result.worst.startswith(("G.", "D.", "optG", "optD"))


def test_a_replay_that_skips_the_batchnorm_statistics_fails(tiny_data, tmp_path):
    step = _graphed_step(tiny_data, tmp_path)
    buffers = {n: b for net in step.nets for n, b in net.named_buffers() if n.endswith("running_mean")}

    def stale_statistics() -> None:
        saved = {n: b.clone() for n, b in buffers.items()}
        step.iteration()
        for name, value in saved.items():
            buffers[name].copy_(value)

    step.graph = _Replay(stale_statistics)
    result = verify_captured_step(step)
    assert not result.passed and "running_mean" in result.worst, result.describe()


def test_a_kernel_that_breaks_the_device_stops_with_one_line(monkeypatch, capsys):
    """A sticky CUDA error (an illegal address) inside the check leaves nothing runnable on that device, the
    reference ops included: one clear error instead of a cascade of failures. Simulated on the CPU: a kernel
    that raises, and a device that reports itself lost afterwards."""

    class Raising:
        def __getattr__(self, name):
            def call(*args):
                raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore lines")

            return call

    monkeypatch.setattr(kernels, "_lib", Raising())
    monkeypatch.setattr(selfcheck, "device_error", lambda device: "CUDA error: an illegal memory access")
    with pytest.raises(selfcheck.DeviceLostError, match=r"broke cpu \(conv_bn_act .*illegal memory access"):
        selfcheck.verify_kernels(CPU)
    selfcheck.reset_kernel_checks()
    with pytest.raises(selfcheck.DeviceLostError):  # the first fused call runs the check
        ops.l1_loss(torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8))
    # The command line says it in one line (the first of the kernel's message) and exits 1.
    selfcheck.reset_kernel_checks()
    capsys.readouterr()
    assert cli.main(["info", "--check"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastpix2pix info: error: the fused kernel check broke cpu")
    assert "more lines" not in err[0]


def test_the_device_probe_reports_a_working_cpu():
    assert selfcheck.device_error(CPU) is None
