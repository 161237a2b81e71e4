"""Benchmark-session setup: the machine and build facts every result file records."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, check=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "none (no commit yet)"
    return out.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def pytest_addoption(parser):
    parser.addoption(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads for the benchmarks (default: torch's)",
    )


def pytest_configure(config):
    threads = config.getoption("--threads", default=None)
    if threads:
        torch.set_num_threads(threads)


def pytest_benchmark_update_machine_info(config, machine_info):
    from fastpix2pix._extension import BUILD_INFO

    try:
        load = Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        load = []
    machine_info["fastpix2pix"] = {
        "cpu_model": _cpu_model(),
        "logical_cores": torch.multiprocessing.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_parallel_info": torch.__config__.parallel_info().splitlines()[:3],
        "build_info": BUILD_INFO,
        "git_commit": _git_commit(),
        "load_average_at_start": load,
        "nice": os.nice(0),  # a shared machine's benchmark may run at raised priority: say so
    }
