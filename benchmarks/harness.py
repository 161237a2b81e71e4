"""The measuring harness shared by the CPU benchmarks (``bench_train.py``, ``bench_inference.py``).

Two parts:

- the machine: what CPU this is and its float32 FMA peak (:func:`cpu_info`, :func:`cpu_peak_gflops`),
  which other jobs are running and how much of the CPU they take (:func:`heavy_processes`,
  :class:`OthersCpu`, :func:`wait_until_quiet`), and the record of the machine, versions and commit that
  every result file starts with (:func:`environment`);
- the interleaved rounds: every row timed once per round, the row order rotated each round so that drift
  from other jobs on a shared machine hits all rows alike, a round in which other processes used too much
  of the CPU discarded and redone (:func:`interleaved_rounds`), and one row's times summarised against the
  baseline's, round by round (:func:`round_statistics`).

Imported as ``harness`` with ``benchmarks/`` on ``sys.path`` (as it is when a benchmark runs as a script).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("pytest", "cc1plus", "nvcc", "ninja", "cudafe")  # other jobs that make a shared machine noisy


# --- the machine ----------------------------------------------------------------------------------------


def cpu_info() -> dict[str, Any]:
    """Model, family, clock and the SIMD flags of the first CPU in /proc/cpuinfo."""
    info: dict[str, Any] = {"model": platform.processor() or platform.machine()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    fields = dict(
        (key.strip(), value.strip())
        for key, _, value in (line.partition(":") for line in text.split("\n\n")[0].splitlines())
    )
    flags = fields.get("flags", "").split()
    info |= {
        "model": fields.get("model name", info["model"]),
        "vendor": fields.get("vendor_id"),
        "family": fields.get("cpu family"),
        "model_number": fields.get("model"),
        "mhz": float(fields["cpu MHz"]) if "cpu MHz" in fields else None,
        "logical_cpus": os.cpu_count(),
        "simd_flags": sorted(f for f in flags if f.startswith(("avx", "fma", "amx", "f16c"))),
    }
    return info


def cpu_peak_gflops(threads: int, info: dict[str, Any]) -> dict[str, Any] | None:
    """float32 FMA peak of ``threads`` cores: threads x 2 FMA units x 8 lanes x 2 FLOP x clock.

    8 float32 lanes: a 256-bit FMA datapath (AVX2 + FMA). AMD Zen 4 (family 25) also reports avx512f but
    executes a 512-bit FMA on its 256-bit units, so the peak is the same; a CPU with 512-bit FMA units
    would have 16 lanes (not this machine: not assumed anywhere else here).
    """
    flags = set(info.get("simd_flags", ()))
    clock = info.get("mhz")
    if not clock or not {"avx2", "fma"} <= flags:
        return None
    lanes, fma_units = 8, 2
    return {
        "gflops": threads * fma_units * lanes * 2 * clock / 1e3,
        "formula": f"{threads} threads x {fma_units} FMA x {lanes} lanes x 2 FLOP x {clock / 1e3:.3f} GHz",
        "clock_source": "/proc/cpuinfo 'cpu MHz'",
    }


def heavy_processes() -> list[str]:
    """Other jobs by name (compilers, test runs) and any other process now using > 30% of a core."""
    out = subprocess.run(["ps", "-eo", "pid,pcpu,args"], capture_output=True, text=True).stdout
    found = []
    for line in out.splitlines()[1:]:
        pid, pcpu, args = line.split(None, 2) + [""] * (3 - len(line.split(None, 2)))
        if int(pid) == os.getpid() or "ps -eo" in args:
            continue
        if any(name in args for name in HEAVY) or float(pcpu or 0) > 30:
            found.append(f"{pid} {pcpu}% {args[:100]}")
    return found


class OthersCpu:
    """The share of all CPUs other processes used between ``start`` and ``stop`` (/proc/stat minus us)."""

    def __init__(self) -> None:
        self.busy0 = self.total0 = self.own0 = 0.0

    @staticmethod
    def _stat() -> tuple[float, float]:
        values = [float(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = values[3] + values[4]  # idle + iowait
        total = sum(values[:8])
        return total - idle, total

    @staticmethod
    def _own() -> float:
        t = os.times()
        return (t.user + t.system) * os.sysconf("SC_CLK_TCK")

    def start(self) -> None:
        self.busy0, self.total0 = self._stat()
        self.own0 = self._own()

    def stop(self) -> float | None:
        try:
            busy, total = self._stat()
        except OSError:
            return None
        others = (busy - self.busy0) - (self._own() - self.own0)
        return max(0.0, others / max(total - self.total0, 1.0))


def wait_until_quiet(limit_s: float) -> dict[str, Any]:
    """Poll every 15 s for up to ``limit_s`` until no heavy process runs and others use < 10% of the CPU."""
    start = time.monotonic()
    while True:
        probe = OthersCpu()
        probe.start()
        time.sleep(5)
        others, heavy = probe.stop(), heavy_processes()
        quiet = not heavy and (others or 0.0) < 0.10
        waited = time.monotonic() - start
        if quiet or waited >= limit_s:
            return {"quiet": quiet, "waited_s": round(waited), "heavy": heavy, "others_cpu_share": others}
        print(f"waiting for a quiet machine ({round(waited)} s): {heavy or f'others use {others:.0%}'}")
        time.sleep(10)


def load_average() -> list[str]:
    """The 1, 5 and 15 minute load averages from /proc/loadavg (empty where there is none)."""
    try:
        return Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        return []


# --- the record of the run ------------------------------------------------------------------------------


def _library_versions() -> dict[str, Any]:
    """``fastpix2pix info``'s versions (torch, CUDA, the build record), or the error that stopped it."""
    try:
        from fastpix2pix.commands import info

        return info.collect()
    except Exception as error:
        return {"error": repr(error)}


def _git_state() -> dict[str, Any]:
    """The checkout's commit and whether (and where) it has changes, untracked files included."""
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
    return {
        "git_commit": commit.strip(),
        "git_dirty": bool(dirty.strip()),
        "git_dirty_files": dirty.split("\n")[:40],
    }


def environment(device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """The machine, CPU, threads, versions, commit, date, the run's arguments (less ``peak``) and load."""
    versions = _library_versions()
    git = _git_state()
    load = load_average()
    return {
        "machine": platform.node(),
        "cpu": cpu_info(),
        "threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "versions": versions,
        **git,
        "date": datetime.datetime.now(datetime.UTC).isoformat(),
        "config": {k: v for k, v in vars(args).items() if k != "peak"},
        "load_average_at_start": load,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
    }


# --- the interleaved rounds -----------------------------------------------------------------------------


class NamedRow(Protocol):
    """What :func:`interleaved_rounds` needs of a row: its name (the key of its times)."""

    name: str


R = TypeVar("R", bound=NamedRow)


def quantiles(values: list[float]) -> tuple[float, float, float]:
    """Median, 20th and 80th percentiles (inclusive method; exact for the small samples here)."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    qs = statistics.quantiles(values, n=10, method="inclusive")
    return statistics.median(values), qs[1], qs[7]


def rotated(rows: Sequence[R], round_index: int) -> list[R]:
    """The rows in round ``round_index``'s order: A B C, B C A, C A B, ..."""
    shift = round_index % len(rows)
    return [*rows[shift:], *rows[:shift]]


def interleaved_rounds(
    rows: Sequence[R],
    time_row: Callable[[R], float],
    *,
    rounds: int,
    min_rounds: int,
    max_seconds: float,
    max_others: float | None,
    pause_s: float,
    max_discards: int | None = None,
    on_round: Callable[[dict[str, list[float]]], None] | None = None,
) -> tuple[dict[str, list[float]], list[float | None], list[dict[str, Any]], float]:
    """Time every row once per round, the order rotated each round, so that drift hits all rows alike.

    A round in which other processes used more than ``max_others`` of the CPU is discarded and redone
    after ``pause_s`` (at most ``max_discards`` times); timing stops after ``max_seconds`` once
    ``min_rounds`` rounds count. ``on_round`` is called with the times so far after each counted round (to
    save them: a run killed later keeps them). Returns each row's times (ms), the counted rounds' CPU shares
    of other processes, the discarded rounds, and the seconds spent.
    """
    times: dict[str, list[float]] = {row.name: [] for row in rows}
    shares: list[float | None] = []
    discarded: list[dict[str, Any]] = []
    others = OthersCpu()
    started = time.monotonic()
    while len(shares) < rounds:
        if time.monotonic() - started > max_seconds and len(shares) >= min_rounds:
            print(f"time budget ({max_seconds:.0f} s) spent: {len(shares)} rounds counted")
            break
        r = len(shares)
        others.start()
        this_round = {row.name: time_row(row) for row in rotated(rows, r)}
        share = others.stop()
        line = ", ".join(f"{n} {this_round[n]:.0f}" for n in times)
        noisy = max_others is not None and share is not None and share > max_others
        if noisy and (max_discards is None or len(discarded) < max_discards):
            discarded.append({"others_cpu_share": share, "ms": this_round})
            print(f"round discarded (others used {share:.0%} of the CPU): {line}", flush=True)
            time.sleep(pause_s)  # let the other job's burst pass
            continue
        for name, ms in this_round.items():
            times[name].append(ms)
        shares.append(share)
        print(f"round {r + 1}/{rounds} (others {share or 0:.0%}): {line} ms", flush=True)
        if on_round is not None:
            on_round(times)
    return times, shares, discarded, time.monotonic() - started


def round_statistics(
    own: list[float], base: list[float], batch: int, gflop: float, peak: dict[str, Any] | None
) -> dict[str, Any]:
    """One row's times against the baseline's, round by round (the rows were interleaved): medians with
    20th/80th percentiles, the per-round ratios' median and spread, throughput and the fraction of peak."""
    ratios = [b / t for b, t in zip(base, own, strict=True)]
    median, p20, p80 = quantiles(own)
    ratio, ratio_p20, ratio_p80 = quantiles(ratios)
    return {
        "median_ms": median,
        "p20_ms": p20,
        "p80_ms": p80,
        "images_per_s": batch * 1e3 / median,
        "gflops": gflop / (median / 1e3),
        "fraction_of_peak": gflop / (median / 1e3) / peak["gflops"] if peak else None,
        "ratio_vs_baseline_median_of_rounds": ratio,
        "ratio_vs_baseline_p20": ratio_p20,
        "ratio_vs_baseline_p80": ratio_p80,
        "ratio_of_medians": statistics.median(base) / median,
        "rounds_faster_than_baseline": sum(r > 1 for r in ratios),
        "per_round_ratios": ratios,
        "raw_ms": own,
    }
