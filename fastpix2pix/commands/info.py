"""`fastpix2pix info`: how the package was built and what it can run on."""

from __future__ import annotations

import argparse
import json
import platform
import warnings
from dataclasses import asdict
from typing import Any

import torch

from fastpix2pix._extension import BUILD_INFO, extension_available
from fastpix2pix.inference.engines import resolve_precision
from fastpix2pix.ops.backend import default_backend
from fastpix2pix.ops.selfcheck import KernelCheckWarning, OpCheck, format_kernel_checks, verify_kernels
from fastpix2pix.runtime import BF16_KINDS, cpu_bf16_support, package_version


def device_report() -> list[dict[str, Any]]:
    """The CPU (with how it computes bfloat16, and what ``--precision auto`` picks on it) and every
    visible CUDA device."""
    support = cpu_bf16_support()
    auto = resolve_precision("auto", "torch", torch.device("cpu"))
    devices: list[dict[str, Any]] = [
        {
            "device": "cpu",
            "name": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "bf16": BF16_KINDS[support],
            "bf16_support": support,
            "precision_auto": auto.name,
            "precision_auto_reason": auto.reason,
        }
    ]
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        devices.append(
            {
                "device": f"cuda:{index}",
                "name": props.name,
                "capability": f"{props.major}.{props.minor}",
                "memory_gib": round(props.total_memory / 2**30, 1),
                "multiprocessors": props.multi_processor_count,
            }
        )
    return devices


def collect() -> dict[str, Any]:
    """Everything `info` prints, as data (benchmarks store it with their results)."""
    return {
        "fastpix2pix": package_version(),
        "extension_loaded": extension_available(),
        "default_backend": default_backend(),
        "build": BUILD_INFO,
        "runtime": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "cuda_available": torch.cuda.is_available(),
        },
        "devices": device_report(),
    }


def _device_details(device: dict[str, Any]) -> str:
    if "capability" in device:
        return f"sm {device['capability']}, {device['memory_gib']} GiB"
    return f"{device['threads']} threads"


def format_report(report: dict[str, Any]) -> str:
    build = report["build"]
    lines = [
        f"fastpix2pix {report['fastpix2pix']}",
        f"  compiled ops:   {'loaded' if report['extension_loaded'] else 'NOT BUILT (reference ops only)'}",
        f"  default backend: {report['default_backend']}",
    ]
    if build:
        cuda = f"yes (arch {build.get('cuda_arch_list')}, {build.get('nvcc')})" if build.get("cuda") else "no"
        lines += [
            f"  built against torch {build.get('torch')} with {build.get('build_tool')}",
            f"  CUDA kernels:   {cuda}",
        ]
    runtime = report["runtime"]
    lines.append(
        f"  runtime: python {runtime['python']}, torch {runtime['torch']} (CUDA {runtime['torch_cuda']}, "
        f"cuDNN {runtime['cudnn']})"
    )
    lines.append("  devices:")
    for device in report["devices"]:
        lines.append(f"    {device['device']}: {device['name']} ({_device_details(device)})")
        if "bf16" in device:
            auto, why = device["precision_auto"], device["precision_auto_reason"].removeprefix("auto: ")
            lines.append(f"      bf16: {device['bf16']}; --precision auto: {auto} ({why})")
    return "\n".join(lines)


def check_devices() -> list[OpCheck]:
    """The fused-kernel self-check (:mod:`fastpix2pix.ops.selfcheck`) on the CPU and every visible GPU."""
    devices = ["cpu"]
    if BUILD_INFO.get("cuda"):
        devices += [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KernelCheckWarning)  # the table says it
        return [check for device in devices for check in verify_kernels(device)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastpix2pix info", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--check",
        action="store_true",
        help="also run every fused op against the reference ops on each device (the start-up self-check) "
        "and print the results; exit status 1 if any op disagrees",
    )
    args = parser.parse_args(argv)
    report = collect()
    checks: list[OpCheck] = []
    if args.check:
        if not report["extension_loaded"]:
            parser.error("--check needs the compiled library fastpix2pix._C, which is not built")
        checks = check_devices()
        report["kernel_checks"] = [asdict(c) | {"passed": c.passed} for c in checks]
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
        if checks:
            print("kernel self-check (fused vs reference, float32 and bf16, relative norm error):")
            print(format_kernel_checks(checks))
    return 0 if all(c.passed for c in checks) else 1
