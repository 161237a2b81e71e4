"""The crash probe: which C++ error paths of the fused ops crash the process on CUDA, case by case.

On the first GPU run (H200, torch 2.11, 2026-12-04) ``conv_bn_act`` crashed the test process (SIGSEGV) when
the CUDA ``bn_stats`` it calls raised "expected more than 1 value per channel"; the op was reached through
its autograd wrapper (the BatchNorm weights required grad), right after the ``opcheck`` and ``torch.compile``
tests in the same process. The Python wrapper now raises that one error before the op, which hides only
that case: any error raised inside a nested op (out of memory at batch 16 included) may crash the same way.
``cuda_error_paths.py`` never reaches that path (no input requires grad, so autograd is skipped).

Each case runs in its own process (a crash loses only that case) with the fatal-signal stack traces of
torch (``torch._C._set_print_stack_traces_on_fatal_signal``: C++ frames of every thread), Python's
``faulthandler`` and ``TORCH_SHOW_CPP_STACKTRACES=1``, and is recorded in the JSON as soon as it ends:

- ``direct_raise``: ``bn_stats`` called directly raises (the control: worked on the first run);
- ``nested_raise_no_grad`` / ``nested_raise_with_grad``: ``conv_bn_act`` whose nested ``bn_stats`` raises,
  without and with autograd (the crash);
- ``nested_raise_with_grad_launch_blocking``: the same with ``CUDA_LAUNCH_BLOCKING=1``;
- ``nested_raise_other_op_with_grad``: ``conv_bn_act`` whose nested ``bn_act_forward`` raises (a wrong
  BatchNorm weight size), and ``nested_raise_other_block_with_grad`` / ``_no_grad``: ``conv_bias_act`` whose
  nested ``bias_act_forward`` raises (a wrong bias size);
- ``nested_raise_in_backward_op``: ``conv_bn_act_backward`` called directly, its nested
  ``bn_act_backward_reduce`` raising;
- ``blocks_raise_with_grad`` / ``_no_grad``: a check in ``blocks.cpp`` itself before any nested op (weight
  of another dtype), and ``blocks_raise_after_conv_with_grad`` one after the convolution (eval mode without
  running statistics);
- ``public_op_with_grad``: the Python pre-check of ``fastpix2pix.ops`` (a ValueError before the op);
- ``after_opcheck_compile_with_grad``: ``nested_raise_with_grad`` after an in-process ``opcheck`` and a
  ``torch.compile(fullgraph=True)`` forward and backward of ``conv_bn_act`` (what preceded the crash);
- ``cpu_control_with_grad``: ``nested_raise_with_grad`` on the CPU.

Every case is expected to raise a Python exception. A case that crashes is re-run once under ``cuda-gdb``
(when present, time allowing) for a native backtrace. Exit status 1 if any case crashed or did not raise.

    python3 benchmarks/crash_probe.py --json results/crash_probe.json
    python benchmarks/crash_probe.py --device cpu --json /tmp/probe.json     # the machinery, on a CPU
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import faulthandler
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # incremental: beside this file
from incremental import IncrementalJson

HERE = Path(__file__).resolve().parent
RESULT_PREFIX = "CRASH_PROBE_RESULT "
EPS, SLOPE = 1e-5, 0.2
CONV = ([1, 1], [0, 0], [0, 0], False)  # stride, padding, output_padding, transposed


@dataclass(frozen=True)
class Case:
    description: str
    run: Callable[[Any], object]  # given the device, raises (expected) or returns
    device: str | None = None  # None: the probe's --device; "cpu": always the CPU
    env: tuple[tuple[str, str], ...] = ()
    prelude: bool = False  # opcheck + torch.compile of conv_bn_act first, in the same process
    hidden: bool = False  # not in the default list (the probe's own test)


# --- the cases (run in the child process) -----------------------------------------------------------------


def _lib():
    import torch

    import fastpix2pix  # noqa: F401  (loads the library and registers the autograd and fake kernels)

    return torch.ops.fastpix2pix


def _one_value_block(device, grad: bool):
    """The crashed test's inputs: a 1x3x1x1 batch, so BatchNorm sees one value per channel."""
    import torch

    x = torch.randn(1, 3, 1, 1, device=device)
    weight = torch.randn(4, 3, 1, 1, device=device)
    bn_weight = (torch.rand(4, device=device) + 0.5).requires_grad_(grad)
    bn_bias = torch.randn(4, device=device).requires_grad_(grad)
    running = (torch.zeros(4, device=device), torch.ones(4, device=device))
    return x, weight, bn_weight, bn_bias, *running


def nested_raise(device, grad: bool = True):
    return _lib().conv_bn_act(*_one_value_block(device, grad), *CONV, True, EPS, SLOPE)


def direct_raise(device):
    import torch

    return _lib().bn_stats(torch.randn(1, 4, 1, 1, device=device))


def nested_raise_other_op(device, grad: bool = True):
    import torch

    x = torch.randn(2, 3, 4, 4, device=device)
    weight = torch.randn(4, 3, 1, 1, device=device)
    bn_weight = torch.ones(3, device=device).requires_grad_(grad)  # 3 values for 4 channels
    bn_bias = torch.zeros(4, device=device).requires_grad_(grad)
    return _lib().conv_bn_act(x, weight, bn_weight, bn_bias, None, None, *CONV, True, EPS, SLOPE)


def nested_raise_other_block(device, grad: bool):
    import torch

    x = torch.randn(2, 3, 4, 4, device=device)
    weight = torch.randn(4, 3, 1, 1, device=device).requires_grad_(grad)
    bias = torch.zeros(3, device=device).requires_grad_(grad)  # 3 values for 4 channels
    return _lib().conv_bias_act(x, weight, bias, *CONV, SLOPE)


def nested_raise_in_backward_op(device):
    import torch

    lib = _lib()
    x = torch.randn(2, 3, 4, 4, device=device)
    weight = torch.randn(4, 3, 1, 1, device=device)
    conv_out = torch.randn(2, 4, 4, 4, device=device)
    mean, var = torch.zeros(3, device=device), torch.ones(3, device=device)  # 3 values for 4 channels
    grad = torch.randn_like(conv_out)
    return lib.conv_bn_act_backward(
        grad, x, weight, conv_out, None, None, mean, var, *CONV, True, EPS, SLOPE, [True, True, False, False]
    )


def blocks_raise(device, grad: bool):
    import torch

    x = torch.randn(2, 3, 4, 4, device=device)
    weight = torch.randn(4, 3, 1, 1, device=device, dtype=torch.float64)  # another dtype than x
    bn_weight = torch.ones(4, device=device).requires_grad_(grad)
    bn_bias = torch.zeros(4, device=device).requires_grad_(grad)
    return _lib().conv_bn_act(x, weight, bn_weight, bn_bias, None, None, *CONV, True, EPS, SLOPE)


def blocks_raise_after_conv(device):
    import torch

    x = torch.randn(2, 3, 4, 4, device=device)
    weight = torch.randn(4, 3, 1, 1, device=device)
    bn_weight = torch.ones(4, device=device).requires_grad_()
    bn_bias = torch.zeros(4, device=device).requires_grad_()
    # Eval mode needs the running statistics: blocks.cpp checks that after the convolution.
    return _lib().conv_bn_act(x, weight, bn_weight, bn_bias, None, None, *CONV, False, EPS, SLOPE)


def public_op(device):
    from fastpix2pix.ops import kernels

    x, weight, *params = _one_value_block(device, True)
    return kernels.conv_bn_act(x, weight, *params, negative_slope=SLOPE)


def opcheck_and_compile(device, backend: str) -> None:
    """What ran before the crash in the same process: ``opcheck`` of ``conv_bn_act`` (as tests/test_ops.py
    does) and a ``torch.compile(fullgraph=True)`` forward and backward through it."""
    import torch

    from fastpix2pix.ops import fused

    lib = _lib()
    rq = lambda t: t.detach().clone().requires_grad_()  # noqa: E731
    conv_x = torch.randn(2, 3, 6, 5, device=device)
    conv_w = torch.randn(4, 3, 3, 3, device=device)
    bn_weight, bn_bias = torch.rand(4, device=device) + 0.5, torch.randn(4, device=device)
    conv_args = ([1, 1], [1, 1], [0, 0], False)
    sample = (rq(conv_x), rq(conv_w), rq(bn_weight), rq(bn_bias), None, None, *conv_args, True, EPS, SLOPE)
    torch.library.opcheck(lib.conv_bn_act.default, sample)

    def step(x, w, bw, bb, rm, rv):
        h = fused.conv_bn_act(x, w, bw, bb, rm, rv, stride=(2, 2), padding=(1, 1), negative_slope=SLOPE)
        return h.square().mean()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    stats = (torch.zeros(4, device=device), torch.ones(4, device=device))
    x = torch.randn(2, 3, 12, 10, device=device)
    loss = compiled(x, rq(conv_w[:, :, :2, :2]), rq(bn_weight), rq(bn_bias), *stats)
    loss.backward()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _segfault(device):
    import ctypes

    return ctypes.string_at(0)  # reads address 0: SIGSEGV


CASES: dict[str, Case] = {
    "direct_raise": Case("bn_stats called directly, one value per channel (the control)", direct_raise),
    "nested_raise_no_grad": Case(
        "conv_bn_act -> bn_stats raises; no input requires grad", lambda d: nested_raise(d, grad=False)
    ),
    "nested_raise_with_grad": Case(
        "conv_bn_act -> bn_stats raises; BatchNorm weights require grad (autograd path: the crash)",
        nested_raise,
    ),
    "nested_raise_with_grad_launch_blocking": Case(
        "nested_raise_with_grad under CUDA_LAUNCH_BLOCKING=1",
        nested_raise,
        env=(("CUDA_LAUNCH_BLOCKING", "1"),),
    ),
    "nested_raise_other_op_with_grad": Case(
        "conv_bn_act -> bn_act_forward raises (BatchNorm weight of 3 for 4 channels); with grad",
        nested_raise_other_op,
    ),
    "nested_raise_other_block_with_grad": Case(
        "conv_bias_act -> bias_act_forward raises (bias of 3 for 4 channels); with grad",
        lambda d: nested_raise_other_block(d, grad=True),
    ),
    "nested_raise_other_block_no_grad": Case(
        "conv_bias_act -> bias_act_forward raises (bias of 3 for 4 channels); no grad",
        lambda d: nested_raise_other_block(d, grad=False),
    ),
    "nested_raise_in_backward_op": Case(
        "conv_bn_act_backward called directly -> bn_act_backward_reduce raises (mean of 3 for 4 channels)",
        nested_raise_in_backward_op,
    ),
    "blocks_raise_with_grad": Case(
        "conv_bn_act raises in blocks.cpp before any nested op (float64 weight, float32 input); with grad",
        lambda d: blocks_raise(d, grad=True),
    ),
    "blocks_raise_no_grad": Case(
        "conv_bn_act raises in blocks.cpp before any nested op (float64 weight, float32 input); no grad",
        lambda d: blocks_raise(d, grad=False),
    ),
    "blocks_raise_after_conv_with_grad": Case(
        "conv_bn_act raises in blocks.cpp after the convolution (eval mode without running stats); with grad",
        blocks_raise_after_conv,
    ),
    "public_op_with_grad": Case(
        "fastpix2pix.ops.kernels.conv_bn_act: the Python pre-check raises ValueError before the op", public_op
    ),
    "after_opcheck_compile_with_grad": Case(
        "nested_raise_with_grad after an in-process opcheck + torch.compile of conv_bn_act",
        nested_raise,
        prelude=True,
    ),
    "cpu_control_with_grad": Case("nested_raise_with_grad on the CPU", nested_raise, device="cpu"),
    "selftest_segfault": Case("a deliberate SIGSEGV: tests the probe itself", _segfault, hidden=True),
}


def run_case(name: str, device: str, compile_backend: str) -> int:
    """In the child: 0 if the case raised a Python exception, 2 if it returned. Prints one result line."""
    faulthandler.enable()  # Python frames on a fatal signal
    import torch

    traces = hasattr(torch._C, "_set_print_stack_traces_on_fatal_signal")
    if traces:
        torch._C._set_print_stack_traces_on_fatal_signal(True)  # C++ frames of every thread
    case = CASES[name]
    device = case.device or device
    result: dict[str, Any] = {"fatal_signal_stack_traces": traces}
    if case.prelude:
        start = time.perf_counter()
        try:
            opcheck_and_compile(device, compile_backend)
            result["prelude"] = f"opcheck + torch.compile ({compile_backend}) passed"
        except Exception as error:
            result["prelude"] = f"failed: {type(error).__name__}: {error}"[:500]
        result["prelude_s"] = time.perf_counter() - start
        print(f"prelude: {result['prelude']}", flush=True)
    try:
        case.run(device)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
    except Exception as error:
        message = str(error)
        result |= {
            "raised": type(error).__name__,
            "message": message.splitlines()[0][:300] if message else "",
        }
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        print(message[-4000:], file=sys.stderr)  # with TORCH_SHOW_CPP_STACKTRACES: the C++ frames
        return 0
    print(RESULT_PREFIX + json.dumps(result | {"raised": None}), flush=True)
    return 2


# --- the parent ---------------------------------------------------------------------------------------------


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "timed out"
    if returncode < 0:
        try:
            return f"crashed: {signal.Signals(-returncode).name}"
        except ValueError:
            return f"crashed: signal {-returncode}"
    return {0: "raised", 2: "returned without an error"}.get(returncode, f"exited {returncode}")


def probe(name: str, args: argparse.Namespace) -> dict[str, Any]:
    case = CASES[name]
    command = [sys.executable, __file__, "--case", name, "--device", args.device]
    command += ["--compile-backend", args.compile_backend]
    env = os.environ | dict(case.env) | {"TORCH_SHOW_CPP_STACKTRACES": "1", "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.case_timeout, env=env)
        returncode, stdout, stderr = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as expired:
        returncode = None
        stdout = expired.stdout.decode("utf-8", "replace") if isinstance(expired.stdout, bytes) else ""
        stderr = expired.stderr.decode("utf-8", "replace") if isinstance(expired.stderr, bytes) else ""
    record: dict[str, Any] = {
        "case": name,
        "description": case.description,
        "device": case.device or args.device,
        "env": dict(case.env),
        "returncode": returncode,
        "outcome": describe_exit(returncode),
        "seconds": round(time.perf_counter() - start, 2),
    }
    for line in stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            record |= json.loads(line[len(RESULT_PREFIX) :])
    if record.get("raised"):
        record["outcome"] = f"raised {record['raised']}"
    record["stdout_tail"] = stdout[-2000:]
    # A crash's stack traces (C++ frames of every thread, then Python's): the head and the end.
    keep = 12000 if returncode is None or returncode < 0 else 3000
    record["stderr"] = stderr if len(stderr) <= 2 * keep else f"{stderr[:keep]}\n[...]\n{stderr[-keep:]}"
    return record


def gdb_backtrace(name: str, args: argparse.Namespace, timeout: float) -> str:
    if shutil.which("cuda-gdb") is None:
        return "cuda-gdb not found"
    command = ["cuda-gdb", "-batch", "-ex", "run", "-ex", "thread apply all bt 30", "--args", sys.executable]
    command += [__file__, "--case", name, "--device", args.device, "--compile-backend", args.compile_backend]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"cuda-gdb timed out after {timeout:.0f} s"
    lines = [
        line for line in done.stdout.splitlines() if line.startswith(("#", "Thread")) or "signal" in line
    ]
    return "\n".join(lines[-120:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), help="default: all")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--jobs", type=int, default=4, help="cases run at once, each in its own process")
    parser.add_argument("--case-timeout", type=float, default=90)
    parser.add_argument("--compile-backend", default="inductor", help="of the prelude's torch.compile")
    parser.add_argument("--gdb-timeout", type=float, default=45, help="cuda-gdb re-run of a crash (0: none)")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "crash_probe.json")
    args = parser.parse_args(argv)
    if args.case:
        return run_case(args.case, args.device, args.compile_backend)
    names = args.cases or [name for name, case in CASES.items() if not case.hidden]
    import torch

    report = IncrementalJson(
        args.json,
        {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": args.device,
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "cases_planned": names,
            "cases": [],
        },
    )
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        report.update(error="needs CUDA (or --device cpu)")
        print("crash_probe: needs CUDA (or --device cpu)", file=sys.stderr)
        return 2
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {pool.submit(probe, name, args): name for name in names}
        for future in concurrent.futures.as_completed(futures):
            record = future.result()
            report.append("cases", record)  # written as each case ends
            print(f"{record['case']:<42} {record['outcome']}", flush=True)
    crashed = [r for r in report["cases"] if str(r["outcome"]).startswith("crashed")]
    bad = [r["case"] for r in report["cases"] if not str(r["outcome"]).startswith("raised")]
    report.update(not_raised=bad, crashed=[r["case"] for r in crashed])
    if crashed and args.gdb_timeout > 0:
        first = min(crashed, key=lambda r: names.index(r["case"]))
        first["cuda_gdb_backtrace"] = gdb_backtrace(first["case"], args, args.gdb_timeout)
        report.write()
    print(f"crash_probe: {len(bad)} of {len(names)} cases crashed or did not raise: {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
