"""The GPU check's first step: nvidia-smi, then the versions and device facts every result depends on.

Prints ``nvidia-smi``'s report and one JSON line (and writes it to ``--json``): the GPU (name, memory,
multiprocessors, L2, compute capability, driver), torch / CUDA / cuDNN / Triton / Python, nvcc, the
TF32 and cuDNN settings torch starts with, the CPU count, and which optional tools are there (pytest-xdist,
compute-sanitizer, cuda-gdb, ncu). Fails soft: whatever it cannot ask is recorded as an error.

    python3 benchmarks/gpu_env.py --json /tmp/environment.json
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def ask(*command: str, timeout: float = 30) -> str | None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    return (done.stdout or done.stderr).strip() or None


def torch_facts() -> dict[str, Any]:
    try:
        import torch
    except Exception as error:  # no torch: the rest still says what the machine is
        return {"torch_error": repr(error)}
    facts: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(),
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_benchmark_default": torch.backends.cudnn.benchmark,
        "print_stack_traces_on_fatal_signal": hasattr(torch._C, "_set_print_stack_traces_on_fatal_signal"),
    }
    try:
        import triton

        facts["triton"] = triton.__version__
    except Exception as error:
        facts["triton"] = f"unavailable: {error!r}"[:200]
    if torch.cuda.is_available():
        try:
            props = torch.cuda.get_device_properties(0)
            facts |= {
                "gpu": props.name,
                "gpu_count": torch.cuda.device_count(),
                "gpu_memory_bytes": props.total_memory,
                "sm_count": props.multi_processor_count,
                "l2_bytes": getattr(props, "L2_cache_size", None),
                "compute_capability": f"{props.major}.{props.minor}",
            }
        except Exception as error:
            facts["gpu_error"] = repr(error)
    return facts


def collect() -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "python_executable": sys.executable,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "driver": ask("nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"),
        "nvcc": ask("nvcc", "--version"),
        "git_commit": ask("git", "rev-parse", "HEAD"),
        "tools": {
            name: shutil.which(name) for name in ("compute-sanitizer", "cuda-gdb", "ncu", "nvidia-smi")
        },
        "pytest_xdist": importlib.util.find_spec("xdist") is not None,
        **torch_facts(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path, help="also write the facts here")
    args = parser.parse_args(argv)
    smi = ask("nvidia-smi")
    print(smi or "nvidia-smi: not found or failed", flush=True)
    facts = collect()
    line = json.dumps(facts)
    print(line, flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(facts, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
