"""The prepared GPU check: everything that needs a GPU, in two stages that each fit a short GPU session.

To verify a new GPU machine, run ``make gpu-check STAGE=1`` then ``STAGE=2`` on it, with the CUDA toolkit
and torch installed (python3 there is the one with torch; no network is needed). The two stages fit in 15
minutes of GPU time, each under 8 minutes so that it fits one command limited to 10 minutes. Every step
runs in its own process group under a time limit, so a hang costs only its step; the summary JSON is
rewritten after each step, so a stage killed from outside still leaves what it found.

Stage 1, correctness (~5 min): build for sm_90 with 16 jobs, the kernel self-check
(``fastpix2pix info --check``), every CUDA test, each C++ error path in its own process
(``cuda_error_paths.py``), a 200-iteration training run on facades through the fast path (its start-up
kernel and CUDA-graph checks included), compute-sanitizer memcheck and racecheck on the fused kernels.
Stage 2, speed (~6.5 min): the CUDA-graph self-check on unet_256 at batch 1 and 16, the kernel benchmark
and the training-iteration benchmark (short settings). Measured on an H200 (2026-12-04, first run): stage 1
took 146 s (build 44 s, self-check 10 s, the tests 33 s until a crash, 200 iterations 18 s, memcheck 5 s,
racecheck 30 s); stage 2 has not run yet.

    python3 benchmarks/gpu_check.py --stage 1 --out "$OUT"     # on the GPU machine
    python3 benchmarks/gpu_check.py --stage all --dry-run       # anywhere: the steps and their budgets

Writes ``gpu_check_stage<N>.json`` (every step: command, exit status, seconds, the end of its output),
``gpu_check_stage<N>.log`` (all output) and the benchmarks' own JSON files into ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FACADES_CANDIDATES = (ROOT / ".gpu_data" / "facades", ROOT.parent / "shared" / "data" / "facades")
TAIL_CHARS = 4000
# One command may run for at most 10 minutes: a stage ends before 8, start-up included.
STAGE_BUDGET_S = 470
MIN_STEP_S = 20


@dataclass(frozen=True)
class Step:
    name: str
    command: list[str]
    timeout_s: int  # the hard limit: the step's process group is killed after it
    estimate_s: int  # what it should take on an H100/H200 with 16 cores
    env: dict[str, str] = field(default_factory=dict)
    needs: str | None = None  # an executable that must exist (e.g. compute-sanitizer)


def python() -> str:
    return sys.executable or "python3"


def facades_root() -> Path | None:
    return next((p for p in FACADES_CANDIDATES if (p / "train").is_dir()), None)


def cuda_test_args() -> list[str]:
    """Every CUDA-marked test, failures listed at the end; in several worker processes when pytest-xdist
    is there, so that a crash (a segfault was seen on the first GPU run) loses one test, not the rest."""
    args = ["-q", "-m", "cuda", "--timeout", "120", "-p", "no:cacheprovider", "-rfE", "--tb=short"]
    return [*args, "-n", "4"] if importlib.util.find_spec("xdist") else args


def stage_steps(stage: int, out: Path) -> list[Step]:
    py = python()
    build = Step(
        "build",
        [py, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", "."],
        timeout_s=420,
        estimate_s=60,
        env={"TORCH_CUDA_ARCH_LIST": "9.0", "MAX_JOBS": "16", "FASTPIX2PIX_CUDA": "1"},
    )
    sanitize = [py, "benchmarks/sanitize_ops.py"]
    if stage == 1:
        facades = facades_root()
        data = ["--dataroot", str(facades), "--direction", "BtoA"] if facades else []
        smoke_train = [
            py, "-m", "fastpix2pix", "train", *data, "--name", "gpu_check_smoke", "--checkpoints_dir",
            str(out / "checkpoints"), "--max_iters", "200", "--fast_path", "on", "--print_freq", "400",
            "--display_freq", "100000", "--save_latest_freq", "100000",
        ]  # fmt: skip
        return [
            Step("environment", ["nvidia-smi"], timeout_s=30, estimate_s=2, needs="nvidia-smi"),
            build,
            Step(
                "kernel_self_check",
                [py, "-m", "fastpix2pix", "info", "--check"],
                timeout_s=120,
                estimate_s=15,
            ),
            Step(
                "cuda_tests", [py, "-m", "pytest", *cuda_test_args(), "tests"], timeout_s=240, estimate_s=90
            ),
            Step("cuda_error_paths", [py, "benchmarks/cuda_error_paths.py"], timeout_s=150, estimate_s=40),
            Step("facades_200_iterations", smoke_train, timeout_s=180, estimate_s=30),
            Step(
                "memcheck",
                ["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "3", *sanitize],
                timeout_s=150,
                estimate_s=15,
                needs="compute-sanitizer",
            ),
            Step(
                "racecheck",
                ["compute-sanitizer", "--tool", "racecheck", "--error-exitcode", "3", *sanitize],
                timeout_s=150,
                estimate_s=40,
                needs="compute-sanitizer",
            ),
        ]
    if stage == 2:
        return [
            build,  # a no-op when stage 1 ran on the same machine (ninja sees nothing changed)
            Step(
                "graph_check_unet256",
                [py, "benchmarks/check_graph.py", "--batch", "1", "16", "--out", str(out)],
                timeout_s=180,
                estimate_s=60,
            ),
            Step(
                "bench_ops",
                [
                    py,
                    "benchmarks/bench_ops.py",
                    "--dtypes",
                    "bfloat16",
                    "float32",
                    "--batches",
                    "1",
                    "16",
                    "--warmup",
                    "5",
                    "--reps",
                    "20",
                    "--max-sets",
                    "8",
                    "--out",
                    str(out),
                ],
                timeout_s=160,
                estimate_s=100,
            ),
            Step(
                "bench_train",
                [
                    py,
                    "benchmarks/bench_train.py",
                    "--batch",
                    "1",
                    "16",
                    "--warmup",
                    "5",
                    "--iters",
                    "30",
                    "--rows",
                    "eager_fp32",
                    "eager_bf16_cl_fusedadam",
                    "compile_default",
                    "fast_path",
                    "--out",
                    str(out),
                ],
                timeout_s=300,
                estimate_s=180,
            ),
        ]
    raise ValueError(f"unknown stage {stage}")


def run_step(step: Step, log: Path, timeout_s: float) -> dict:
    """Run one step in its own process group; kill the group after ``timeout_s``."""
    record: dict = {"step": step.name, "command": step.command, "timeout_s": round(timeout_s)}
    if step.needs and shutil.which(step.needs) is None:
        return record | {"status": "skipped", "reason": f"{step.needs} not found on PATH"}
    env = os.environ | step.env | {"PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    with open(log, "a") as sink:
        sink.write(f"\n===== {step.name}: {' '.join(step.command)}\n")
        sink.flush()
        process = subprocess.Popen(
            step.command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True, text=True, errors="replace",
        )  # fmt: skip
        output: list[str] = []
        try:
            text, _ = process.communicate(timeout=timeout_s)
            output.append(text)
            status = "passed" if process.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            text, _ = process.communicate()
            output.append(text)
            status = "timed out"
        sink.write("".join(output))
    seconds = time.monotonic() - start
    tail = "".join(output)[-TAIL_CHARS:]
    return record | {
        "status": status,
        "returncode": process.returncode,
        "seconds": round(seconds, 1),
        "tail": tail,
    }


def machine() -> dict:
    def ask(*command: str) -> str | None:
        try:
            return subprocess.run(command, capture_output=True, text=True, timeout=20).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            return None

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": ask("git", "-C", str(ROOT), "rev-parse", "HEAD"),
        "dirty": bool(ask("git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no")),
        "gpu": ask("nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"),
        "python": sys.version.split()[0],
        "nvcc": ask("nvcc", "--version"),
        "cpus": os.cpu_count(),
    }


def run_stage(stage: int, out: Path, budget_s: int) -> int:
    deadline = time.monotonic() + budget_s
    out.mkdir(parents=True, exist_ok=True)
    log = out / f"gpu_check_stage{stage}.log"
    summary_path = out / f"gpu_check_stage{stage}.json"
    summary = {"stage": stage, "machine": machine(), "steps": []}
    for step in stage_steps(stage, out):
        left = deadline - time.monotonic()
        if left < MIN_STEP_S:
            record = {"step": step.name, "command": step.command, "status": "not run: stage budget spent"}
        else:
            limit = min(step.timeout_s, left)
            print(f"[gpu-check {stage}] {step.name} (limit {limit:.0f} s) ...", flush=True)
            record = run_step(step, log, limit)
        summary["steps"].append(record)
        summary_path.write_text(json.dumps(summary, indent=1))
        print(
            f"[gpu-check {stage}] {step.name}: {record['status']} in {record.get('seconds', 0)} s", flush=True
        )
        if step.name == "build" and record["status"] != "passed":
            print(record.get("tail", ""))
            break  # nothing after it can run
    failed = [s["step"] for s in summary["steps"] if s["status"] != "passed" and s["status"] != "skipped"]
    print(
        f"[gpu-check {stage}] summary: {summary_path}; " + (f"FAILED: {failed}" if failed else "all passed")
    )
    return 1 if failed else 0


def dry_run(stages: list[int], out: Path, budget_s: int) -> int:
    """List each stage's steps with their estimates and limits; fail if a named program or file is missing
    (on a machine without a GPU the GPU tools may be absent: those are reported, not failed)."""
    missing = []
    for stage in stages:
        steps = stage_steps(stage, out)
        estimate = sum(s.estimate_s for s in steps)
        print(f"stage {stage}: estimate {estimate} s; the stage stops after {budget_s} s")
        for step in steps:
            found = (
                "" if not step.needs or shutil.which(step.needs) else f"  [{step.needs} not on this machine]"
            )
            timing = f"~{step.estimate_s:>4} s (limit {step.timeout_s:>4} s)"
            print(f"  {step.name:<24} {timing}  {' '.join(step.command)}{found}")
            missing += [f"{step.name}: {path}" for path in missing_files(step)]
    for line in missing:
        print(f"MISSING {line}")
    return 1 if missing else 0


def missing_files(step: Step) -> list[str]:
    """Scripts and modules a step names that do not exist in the tree."""
    command, missing = step.command, []
    for i, word in enumerate(command):
        if word.endswith(".py") and not (ROOT / word).is_file():
            missing.append(word)
        if word == "-m" and i + 1 < len(command):
            module = command[i + 1]
            if module.startswith("fastpix2pix") and not (ROOT / module.replace(".", "/")).exists():
                missing.append(module)
    return missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stage", choices=["1", "2", "all"], default="all")
    parser.add_argument(
        "--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results")
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="list the steps and check they exist; run nothing"
    )
    parser.add_argument(
        "--budget",
        type=int,
        default=STAGE_BUDGET_S,
        help="seconds a stage may take in all: each step's limit is cut to what is left, and a step that "
        f"would start with less than {MIN_STEP_S} s left is not run (default %(default)s)",
    )
    args = parser.parse_args(argv)
    stages = [1, 2] if args.stage == "all" else [int(args.stage)]
    if args.dry_run:
        return dry_run(stages, args.out, args.budget)
    return max(run_stage(stage, args.out, args.budget) for stage in stages)


if __name__ == "__main__":
    sys.exit(main())
