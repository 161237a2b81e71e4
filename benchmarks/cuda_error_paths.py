"""Every way the CUDA ops refuse bad input must raise a Python error, never crash the process.

The first GPU run (H200, 2026-12-04) saw a segmentation fault in
``tests/test_ops.py::test_one_value_per_channel_in_training_raises_like_pytorch[cuda]``: the C++ op
``conv_bn_act`` on a 1x1 training batch, where the CUDA ``bn_stats`` raises "expected more than 1 value
per channel" under the convolution. Raising from a CUDA op called directly worked in the same run. This
script runs each error path in its own process (a crash cannot hide the others), reports how each ended,
and re-runs a crashing case under ``cuda-gdb`` (when present) for a native backtrace.

    python3 benchmarks/cuda_error_paths.py            # exit 1 if any case crashed or did not raise
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable

import torch


def _cases() -> dict[str, Callable[[], object]]:
    import fastpix2pix  # noqa: F401  (loads the library)

    lib = torch.ops.fastpix2pix
    dev = "cuda"
    one = torch.randn(1, 3, 1, 1, device=dev)
    weight = torch.randn(4, 3, 1, 1, device=dev)
    ones, zeros = torch.ones(4, device=dev), torch.zeros(4, device=dev)
    conv_args = ([1, 1], [0, 0], [0, 0], False)
    return {
        "bn_stats, one value per channel": lambda: lib.bn_stats(torch.randn(1, 4, 1, 1, device=dev)),
        "bn_act_forward, mean on the CPU": lambda: lib.bn_act_forward(
            torch.randn(2, 4, 1, 1, device=dev), zeros.cpu(), ones, None, None, 1e-5, 0.2
        ),
        "conv_bn_act (C++), one value per channel": lambda: lib.conv_bn_act(
            one, weight, ones, zeros, zeros, ones, *conv_args, True, 1e-5, 0.2
        ),
        "conv_bn_act (C++), weight of another dtype": lambda: lib.conv_bn_act(
            torch.randn(2, 3, 4, 4, device=dev),
            weight.double(),
            ones,
            zeros,
            zeros,
            ones,
            *conv_args,
            True,
            1e-5,
            0.2,
        ),
        "conv_bias_act (C++), 3-d input": lambda: lib.conv_bias_act(
            torch.randn(3, 4, 4, device=dev), weight, None, *conv_args, 0.2
        ),
        "l1_loss, shapes differ": lambda: lib.l1_loss(
            torch.randn(2, 3, device=dev), torch.randn(3, 2, device=dev), 1.0, True
        ),
    }


def run_case(name: str) -> int:
    """In the child: 0 if the case raised a Python exception, 2 if it returned."""
    try:
        _cases()[name]()
        torch.cuda.synchronize()
    except (RuntimeError, ValueError, TypeError) as error:
        print(f"raised {type(error).__name__}: {str(error).splitlines()[0][:200]}")
        return 0
    print("returned without an error")
    return 2


def backtrace(name: str) -> str:
    if shutil.which("cuda-gdb") is None:
        return "cuda-gdb not found"
    command = ["cuda-gdb", "-batch", "-ex", "run", "-ex", "bt 30", "--args", sys.executable, __file__, name]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return "cuda-gdb timed out"
    lines = [line for line in done.stdout.splitlines() if line.startswith("#") or "signal" in line]
    return "\n".join(lines[-40:])


def main() -> int:
    if len(sys.argv) > 1:
        return run_case(sys.argv[1])
    if not torch.cuda.is_available():
        print("cuda_error_paths: needs CUDA", file=sys.stderr)
        return 2
    bad = 0
    for name in _cases():
        done = subprocess.run([sys.executable, __file__, name], capture_output=True, text=True, timeout=120)
        record = {"case": name, "returncode": done.returncode, "output": (done.stdout + done.stderr)[-600:]}
        if done.returncode < 0:  # killed by a signal: a crash
            record["backtrace"] = backtrace(name)
        bad += done.returncode != 0
        print(json.dumps(record), flush=True)
    print(f"cuda_error_paths: {bad} of {len(_cases())} cases crashed or did not raise")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
