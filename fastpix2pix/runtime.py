"""What a process needs from its machine: the device, seeds and determinism, usable CPUs, how the CPU computes
bfloat16, safe file writes, the version."""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as metadata_version
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

__all__ = [
    "ATOMIC_TEMP_SUFFIX",
    "BF16_KINDS",
    "Precision",
    "atomic_write",
    "bf16_faster_than_fp32",
    "cpu_auto_precision",
    "cpu_bf16_support",
    "cpu_vendor",
    "data_workers",
    "determinism",
    "package_version",
    "resolve_device",
    "seed_everything",
    "usable_cpu_count",
]


def package_version() -> str:
    """The installed fastpix2pix version ("0+unknown" in a source tree that was never installed)."""
    try:
        return metadata_version("fastpix2pix")
    except PackageNotFoundError:
        return "0+unknown"


# --- building blocks --------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; a CUDA device that is not there is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available here (use --device cpu or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return device


def seed_everything(seed: int) -> None:
    """Seed python's random, numpy's global generator and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def determinism(enabled: bool) -> Iterator[None]:
    """Deterministic algorithms and no cuDNN autotuning inside the block (restored after: they are global).

    Off, cuDNN autotuning is switched on instead: pix2pix trains at fixed shapes.
    """
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    if enabled:
        # cuBLAS needs this before its first use to be deterministic; harmless on CPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0])
        torch.backends.cudnn.deterministic = saved[1]
        torch.backends.cudnn.benchmark = saved[2]


def data_workers(requested: int) -> int:
    """``--num_threads`` capped at the usable CPUs (shared by this machine's processes under torchrun):
    more loader processes than cores only take them from the training process (and torch warns)."""
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return min(requested, max(1, usable_cpu_count() // max(1, processes)))


def usable_cpu_count() -> int:
    """The CPUs this process may run on: its affinity mask (taskset, Slurm, a container's cpuset), which
    ``os.cpu_count()`` ignores; ``os.cpu_count()`` where the platform has no affinity call."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


# --- bfloat16 on the CPU ------------------------------------------------------------------------------

BF16_KINDS = {"amx": "native (AMX)", "avx512_bf16": "native (AVX512-BF16)", None: "emulated"}
"""What :func:`cpu_bf16_support`'s answers mean, as ``fastpix2pix info`` prints them."""


def _cpu_capabilities() -> dict[str, object]:
    """The CPU features torch detected (cpuinfo), or {} where this torch cannot say."""
    get = getattr(torch.cpu, "get_capabilities", None)
    if get is not None:
        with contextlib.suppress(Exception):
            return dict(get())
    flags: dict[str, object] = {}  # older torch: its per-feature probes
    for name, probe in (("amx_tile", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported")):
        with contextlib.suppress(Exception):
            flags[name] = bool(getattr(torch.cpu, probe)())
    flags["amx_bf16"] = flags.get("amx_tile", False)
    return flags


def cpu_bf16_support() -> str | None:
    """How this CPU computes bfloat16 products, decided at run time: ``"amx"`` (AMX-BF16 tiles: Intel Xeon
    since Sapphire Rapids, where the OS enables them), ``"avx512_bf16"`` (AVX512-BF16 dot products: AMD
    Zen 4/5, Intel Cooper Lake, or a newer Xeon whose AMX a hypervisor hides) or None (emulated: oneDNN
    or torch converts to float32 and back)."""
    caps = _cpu_capabilities()
    if caps.get("amx_bf16") and caps.get("amx_tile") and _amx_usable():
        return "amx"
    if caps.get("avx512_bf16"):
        return "avx512_bf16"
    return None


def _amx_usable() -> bool:
    """The OS lets this process use the AMX tiles (Linux grants them on request, since 5.16)."""
    init = getattr(torch.cpu, "_init_amx", None)
    if init is None:
        return True  # this torch cannot ask; oneDNN asks for itself and falls back if refused
    try:
        return bool(init())
    except Exception:
        return False


def cpu_vendor() -> str:
    """``"intel"``, ``"amd"`` or ``""`` (unknown): from /proc/cpuinfo, else the name torch's cpuinfo reads."""
    text = ""
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text(errors="replace")[:4096]
    text += " " + str(_cpu_capabilities().get("cpu_name", ""))
    if "GenuineIntel" in text or "Intel" in text:
        return "intel"
    if "AuthenticAMD" in text or "AMD" in text:
        return "amd"
    return ""


def bf16_faster_than_fp32(support: str | None, vendor: str) -> bool:
    """Whether bfloat16 convolutions outrun float32 ones on a CPU with this ``support`` and ``vendor``
    (the rule of ``--precision auto``).

    AMX: yes, by far (a tile multiply does 16x the work of an FMA). AVX512-BF16 on AMD Zen 4/5: a
    512-bit bf16 dot product does twice the multiply-adds of a float32 FMA on the same 256-bit units.
    AVX512-BF16 on an Intel core without AMX: no; its dot product does no more multiply-adds per cycle
    than its two float32 FMA units, and the conversions cost extra (measured on an Emerald Rapids Xeon
    whose AMX a hypervisor hides: the bf16 engine ran at 0.8x the float32 one, OpenVINO's bf16 at 0.9x
    its float32; ``benchmarks/results/inference_cpu_2026-12-07_bf16*.json``). Emulated: no.
    """
    return support == "amx" or (support == "avx512_bf16" and vendor == "amd")


@dataclass(frozen=True)
class Precision:
    """What a ``--precision`` option resolved to: ``name`` (``fp32`` or ``bf16``) and why."""

    name: str
    reason: str

    @property
    def bf16(self) -> bool:
        return self.name == "bf16"

    def __str__(self) -> str:
        return f"{self.name} ({self.reason})"


def cpu_auto_precision() -> Precision:
    """``--precision auto`` on this CPU: bf16 where :func:`bf16_faster_than_fp32` says it computes bfloat16
    faster than float32, else fp32; the reason names the capability found."""
    support, vendor = cpu_bf16_support(), cpu_vendor()
    if support is None:
        return Precision("fp32", "auto: bf16 is emulated on this CPU")
    cpu = {"amd": "an AMD", "intel": "an Intel"}.get(vendor, "this")
    unit = "AMX" if support == "amx" else f"AVX512-BF16 on {cpu} CPU"
    if bf16_faster_than_fp32(support, vendor):
        return Precision("bf16", f"auto: {unit} computes bf16 faster than float32")
    if support == "amx":
        return Precision("fp32", f"auto: {unit} is not counted faster than float32 here")
    return Precision("fp32", f"auto: AVX512-BF16 without AMX is no faster than float32 on {cpu} CPU")


# --- files -------------------------------------------------------------------------------------------

# The temporary of ``atomic_write(folder/name)``: ``folder/.<name>.<8 characters of mkstemp>.tmp``.
ATOMIC_TEMP_SUFFIX = ".tmp"


def atomic_write(
    path: str | os.PathLike[str],
    write: Callable[[BinaryIO], None],
    check: Callable[[Path], None] | None = None,
) -> Path:
    """Write a file through ``write(file)`` so that ``path`` is either the old file or the complete new one.

    The temporary ``.<name>.<8 random characters>.tmp`` lives in the same folder (``os.replace`` is atomic
    only within one file system); it is flushed to disk, given to ``check`` (which may raise to keep the old
    file), renamed, and the rename made durable. An exception removes it; a killed process leaves it
    (``fastpix2pix.runs.checkpoint.remove_stale_temporaries`` finds a run folder's).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=ATOMIC_TEMP_SUFFIX, dir=path.parent)
    temp = Path(temp_name)
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        if check is not None:
            check(temp)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    _fsync_directory(path.parent)
    return path


def _fsync_directory(folder: Path) -> None:
    """Make the rename itself durable; not possible on every platform (e.g. Windows), where it is skipped."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
