"""The prepared GPU check: what only a GPU can tell, in stages that each fit one command of 10 minutes.

For verifying a GPU machine where one command may run at most 10 minutes: each stage stops within
``STAGE_BUDGET_S`` (470 s), and ``make gpu-check`` with no arguments runs the stage that matters most, speed.
Every step runs in its own process group under its own time limit (a hang costs only that step); its output
goes to the log as it comes; the stage summary is rewritten after every step; and every benchmark writes its
own JSON as each measurement (row, batch, case) finishes, so a kill at any point keeps everything measured
before it.

``speed`` (the default; ~467 s estimated): nvidia-smi and versions; build (sm_90, 16 jobs); the kernel
self-check (``fastpix2pix info --check``); the fast trainer's captured iteration timed as ``fit()`` runs it
(cuDNN autotuning on; batch 16 then 1; 200 replays: p20/p50/p80, peak memory, a profiler table of kernel
families); the training-iteration benchmark (official-semantics eager fp32/TF32, eager bf16 +
channels_last + fused Adam, the fast path; batch 16 first); the crash probe (``crash_probe.py``: the
nested-error crash of the first GPU run, case by case); the CUDA tests added or changed since the last GPU
run or not passed on it (``changed_cuda_tests.py``); ``torch.compile`` rows of the reference step with the
fast path's settings (bf16, channels_last, fused Adam) at batch 16 (default, then reduce-overhead,
``dynamic=False``, each in its own process) in the time the later steps leave; the kernel benchmark without
``torch.compile`` on a few layers.

``correctness`` (~280 s): build, self-check, every CUDA test, the C++ error paths, a 200-iteration facades
run on the fast path, compute-sanitizer memcheck and racecheck (the first GPU run's stage 1, measured on an
H200 on 2026-12-04: 146 s).

``quality`` (~455 s): facades with the paper's recipe (200 epochs, 80,000 iterations at batch 1) on the fast
path, timed, until its budget (it records how far it got and saves a checkpoint at epoch 5); ``fastpix2pix
test`` + ``eval`` (L1, PSNR, SSIM, FCN-score) of the result; the plain float32 trainer for the same first 5
epochs (2,000 iterations); both at epoch 5 evaluated alike, and their losses compared at equal iterations.

    python3 benchmarks/gpu_check.py --out "$OUT"                     # the speed stage, on the GPU machine
    python3 benchmarks/gpu_check.py --stage correctness --out "$OUT"
    python3 benchmarks/gpu_check.py --stage all --dry-run            # anywhere: every stage's steps

Into ``--out`` (at most 8 files, easy to bring back from a remote machine): ``gpu_check_<stage>.json`` (the
machine, every step's command, status, seconds, the end of its output and its results),
``gpu_check_<stage>.log`` (all output) and the benchmarks' JSON files. Checkpoints, datasets and scratch files
go to ``--work``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FACADES_CANDIDATES = (ROOT / ".gpu_data" / "facades", ROOT.parent / "shared" / "data" / "facades")
TAIL_CHARS = 4000
# One command may run for at most 10 minutes: a stage ends before 8, start-up included.
STAGE_BUDGET_S = 470
MIN_STEP_S = 20
STAGES = ("speed", "correctness", "quality")
ALIASES = {"1": "correctness", "2": "speed"}  # the first GPU run's stage numbers
MAX_OUT_FILES = 8  # what a remote run's $OUT may hold and still come back whole
QUALITY_COMPARE_EPOCH = 5  # 2,000 iterations of facades at batch 1: the plain trainer's share of the budget


@dataclass(frozen=True)
class Step:
    name: str
    command: list[str]
    timeout_s: int  # the hard limit: the step's process group is killed after it
    estimate_s: int  # what it should take on an H100/H200 with 16 cores
    env: dict[str, str] = field(default_factory=dict)
    needs: str | None = None  # an executable that must exist (e.g. compute-sanitizer)
    needs_path: str | None = None  # a file or folder that must exist (e.g. the facades)
    result: str | None = None  # a JSON file the step writes (merged into the stage summary after it)
    optional: bool = False  # "while time remains": only in the time the later steps' estimates leave
    essential: bool = False  # nothing after it can run if it fails (the build)


def python() -> str:
    return sys.executable or "python3"


def words(text: str) -> list[str]:
    return text.split()


def facades_root() -> Path | None:
    return next((p for p in FACADES_CANDIDATES if (p / "train").is_dir()), None)


def default_work() -> Path:
    return Path(tempfile.gettempdir()) / "fastpix2pix_gpu_check"


def stage_name(stage: str) -> str:
    name = ALIASES.get(stage, stage)
    if name not in STAGES:
        raise ValueError(f"unknown stage {stage!r}: one of {STAGES} (or 1 = correctness, 2 = speed)")
    return name


def cuda_test_args(workers: int = 4) -> list[str]:
    """Pytest arguments for CUDA tests, failures listed at the end; in several worker processes when
    pytest-xdist is there, so that a crash (a segfault was seen on the first GPU run) loses one test, not
    the rest."""
    args = ["-q", "-m", "cuda", "--timeout", "120", "-p", "no:cacheprovider", "-rfE", "--tb=short"]
    return [*args, "-n", str(workers)] if importlib.util.find_spec("xdist") else args


def _build_step() -> Step:
    return Step(
        "build",
        [python(), "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", "."],
        timeout_s=300,
        estimate_s=50,  # 44 s on the H200 (2026-12-04)
        env={"TORCH_CUDA_ARCH_LIST": "9.0", "MAX_JOBS": "16", "FASTPIX2PIX_CUDA": "1"},
        essential=True,
    )


def _common_steps(work: Path) -> list[Step]:
    py = python()
    return [
        Step(
            "environment",
            [py, "benchmarks/gpu_env.py", "--json", str(work / "environment.json")],
            timeout_s=60,
            estimate_s=5,
            result=str(work / "environment.json"),
        ),
        _build_step(),
        Step("kernel_self_check", [py, "-m", "fastpix2pix", "info", "--check"], timeout_s=90, estimate_s=12),
    ]


def speed_steps(out: Path, work: Path) -> list[Step]:
    py = python()
    graph = [py, "benchmarks/check_graph.py", *words("--batch 16 1 --replays 200 --profile-replays 5")]
    graph += ["--json", str(out / "graph_check.json"), "--work", str(work / "graph_check")]
    # fast_path_bf16_cast: the fast path casting its weights in each pass, beside its default (the optimizer's
    # bf16 weight copies): the copies' gain on a GPU, in the same interleaved rounds.
    # fast_path_separate_pairs: D's fake and real pairs as two forwards, against the default's one batch.
    rows = "official_eager eager_bf16_cl_fusedadam fast_path fast_path_bf16_cast fast_path_separate_pairs"
    train = [py, "benchmarks/bench_train.py", *words(f"--device cuda --batch 16 1 --rows {rows}")]
    train += [*words("--warmup 5 --rounds 30 --max-seconds 27 --json"), str(out / "train.json")]
    tests = [py, "benchmarks/changed_cuda_tests.py", "--run", "--json", str(work / "cuda_tests_changed.json")]
    layers = "e2 e5 d2 d7 C64 C512"  # BN+LeakyReLU big and small, BN+ReLU up, bias+LeakyReLU, D's largest
    ops = [py, "benchmarks/bench_ops.py", *words("--device cuda --no-compile --batches 16 1")]
    ops += [*words(f"--dtypes bfloat16 float32 --layers {layers} --warmup 5 --reps 30 --max-sets 8")]
    ops += ["--json", str(out / "ops.json")]

    def compile_row(row: str) -> Step:
        command = [py, "benchmarks/bench_train.py", *words(f"--device cuda --batch 16 --rows {row}")]
        command += [*words(f"--warmup 3 --rounds 20 --max-seconds 20 --key {row} --json")]
        return Step(
            f"{row}_b16",
            [*command, str(out / "train_compile.json")],
            timeout_s=240,
            estimate_s=85,  # an inductor compile of the whole step, then 20 rounds
            result=str(out / "train_compile.json"),
            optional=True,
        )

    return [
        *_common_steps(work),
        Step("graph_check", graph, timeout_s=150, estimate_s=50, result=graph[-3]),
        Step("bench_train", train, timeout_s=150, estimate_s=60, result=train[-1]),  # 2 x 27 s timed
        Step(
            "crash_probe",
            [py, "benchmarks/crash_probe.py", "--json", str(out / "crash_probe.json")],
            timeout_s=120,
            estimate_s=40,  # 14 processes, 4 at a time; one compiles with inductor
            result=str(out / "crash_probe.json"),
        ),
        Step("cuda_tests_changed", tests, timeout_s=150, estimate_s=50, result=tests[-1]),
        compile_row("compile_bf16_cl_default"),
        compile_row("compile_bf16_cl_reduce_overhead"),
        Step("bench_ops", ops, timeout_s=90, estimate_s=30, result=ops[-1]),
    ]


def correctness_steps(out: Path, work: Path) -> list[Step]:
    py = python()
    facades = facades_root()
    data = ["--dataroot", str(facades), "--direction", "BtoA"] if facades else []
    smoke_train = [
        py, "-m", "fastpix2pix", "train", *data, "--name", "gpu_check_smoke", "--checkpoints_dir",
        str(work / "checkpoints"), "--max_iters", "200", "--fast_path", "on", "--print_freq", "400",
        "--display_freq", "100000", "--save_latest_freq", "100000",
    ]  # fmt: skip
    sanitize = [py, "benchmarks/sanitize_ops.py"]
    return [
        *_common_steps(work),
        Step(
            "cuda_tests",
            # The JUnit XML is what the next baseline of changed_cuda_tests.py is written from.
            [py, "-m", "pytest", *cuda_test_args(), f"--junitxml={out / 'cuda_tests.xml'}", "tests"],
            timeout_s=240,
            estimate_s=90,  # 258 tests in 33 s on the H200, one process
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


def quality_steps(out: Path, work: Path) -> list[Step]:
    py = python()
    facades = facades_root()
    root = str(facades) if facades else str(FACADES_CANDIDATES[0])
    runs, results, cache = work / "quality_runs", work / "quality_results", work / "parser_cache"
    report = str(out / "quality.json")
    epoch = str(QUALITY_COMPARE_EPOCH)
    where = ["--checkpoints_dir", str(runs), "--compare-epoch", epoch, "--json", report]

    def quality_run(phase: str, budget_s: int, timeout_s: int, estimate_s: int) -> Step:
        command = [py, "benchmarks/quality_run.py", phase, "--dataroot", root, *where]
        command += ["--results_dir", str(results), "--budget-s", str(budget_s)]
        return Step(f"quality_{phase}", command, timeout_s, estimate_s, needs_path=root, result=report)

    def evaluate(name: str, source: list[str], estimate_s: int) -> Step:
        """``fastpix2pix eval`` of a results folder or a checkpoint, with the facade parser's FCN-score."""
        output = str(work / f"eval_{name}.json")
        command = [py, "-m", "fastpix2pix", "eval", *source, "--dataroot", root, "--train-parser"]
        command += ["--cache-dir", str(cache), "--output", output]
        return Step(
            f"eval_{name}", command, timeout_s=180, estimate_s=estimate_s, needs_path=root, result=output
        )

    def at_epoch(run: str) -> list[str]:
        checkpoint = str(runs / f"quality_{run}" / f"epoch_{epoch}.pt")
        return ["--checkpoint", checkpoint, "--results_dir", str(results / f"{run}_epoch{epoch}")]

    test = [py, "-m", "fastpix2pix", "test", "--dataroot", root, "--direction", "BtoA", "--name"]
    test += ["quality_fast", "--checkpoints_dir", str(runs), "--results_dir", str(results)]
    compare = [py, "benchmarks/quality_run.py", "compare", *where, "--eval-dir", str(work)]
    return [
        *_common_steps(work)[:2],  # the trainer runs the kernel self-check at its start
        quality_run("fast", budget_s=200, timeout_s=240, estimate_s=210),
        Step("test_fast", test, timeout_s=90, estimate_s=15, needs_path=root),
        # The first eval trains the facade parser (cached for the two after it).
        evaluate("fast", [str(results / "quality_fast")], estimate_s=60),
        quality_run("plain", budget_s=75, timeout_s=110, estimate_s=80),
        evaluate(f"fast_epoch{epoch}", at_epoch("fast"), estimate_s=15),
        evaluate(f"plain_epoch{epoch}", at_epoch("plain"), estimate_s=15),
        Step("quality_compare", compare, timeout_s=60, estimate_s=5, result=report),
    ]


def stage_steps(stage: str | int, out: Path, work: Path | None = None) -> list[Step]:
    name = stage_name(str(stage))
    work = work or default_work()
    return {"speed": speed_steps, "correctness": correctness_steps, "quality": quality_steps}[name](out, work)


def out_files(steps: list[Step], out: Path) -> set[str]:
    """The files a stage leaves in ``out``: its summary, its log, and every path in ``out`` a step names."""
    names = {"summary", "log"}
    for step in steps:
        for word in step.command:
            path = Path(word.split("=", 1)[1] if word.startswith("--") and "=" in word else word)
            if path.parent == out:
                names.add(str(path))
    return names


# --- running ------------------------------------------------------------------------------------------


def run_step(step: Step, log: Path, timeout_s: float) -> dict:
    """Run one step in its own process group, its output appended to ``log`` as it comes; kill the group
    after ``timeout_s``."""
    record: dict = {"step": step.name, "command": step.command, "timeout_s": round(timeout_s)}
    if step.needs and shutil.which(step.needs) is None:
        return record | {"status": "skipped", "reason": f"{step.needs} not found on PATH"}
    if step.needs_path and not Path(step.needs_path).exists():
        return record | {"status": "skipped", "reason": f"{step.needs_path} not found"}
    env = os.environ | step.env | {"PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    with open(log, "a") as sink:
        sink.write(f"\n===== {step.name}: {' '.join(step.command)}\n")
        sink.flush()
        begin = sink.tell()
        try:
            process = subprocess.Popen(
                step.command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        except OSError as error:
            return record | {"status": "failed", "returncode": None, "seconds": 0.0, "tail": repr(error)}
        try:
            process.wait(timeout=timeout_s)
            status = "passed" if process.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            status = "timed out"
        else:
            # Children left behind (a server, a compile worker) would hold the log and the GPU.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
    seconds = time.monotonic() - start
    with open(log, "rb") as source:
        source.seek(max(begin, source.seek(0, os.SEEK_END) - 4 * TAIL_CHARS))
        tail = source.read().decode("utf-8", "replace")[-TAIL_CHARS:]
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
        "cpus": os.cpu_count(),
    }


def read_result(path: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        return {"unreadable": repr(error)}


def step_limit(steps: list[Step], i: int, left: float) -> tuple[float, str]:
    """The time step ``i`` may take with ``left`` seconds of the stage to go, and why it is that.

    An optional step ("while time remains") leaves the estimates of the required steps after it."""
    step = steps[i]
    if not step.optional:
        return min(step.timeout_s, left), "stage budget spent"
    reserve = sum(s.estimate_s for s in steps[i + 1 :] if not s.optional)
    return min(step.timeout_s, left - reserve), f"no time left beside the {reserve} s the later steps need"


def run_stage(stage: str | int, out: Path, budget_s: int, work: Path | None = None) -> int:
    name = stage_name(str(stage))
    started = time.monotonic()
    deadline = started + budget_s
    work = work or default_work()
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    log = out / f"gpu_check_{name}.log"
    summary_path = out / f"gpu_check_{name}.json"
    steps = stage_steps(name, out, work)
    summary: dict[str, Any] = {
        "stage": name,
        "budget_s": budget_s,
        "machine": machine(),
        "planned": [{"step": s.name, "estimate_s": s.estimate_s, "optional": s.optional} for s in steps],
        "steps": [],
    }
    write_json(summary_path, summary)
    for i, step in enumerate(steps):
        limit, why = step_limit(steps, i, deadline - time.monotonic())
        if limit < min(MIN_STEP_S, step.timeout_s):  # cut short by the budget: not worth starting
            record = {"step": step.name, "command": step.command, "status": f"not run: {why}"}
        else:
            print(f"[gpu-check {name}] {step.name} (limit {limit:.0f} s) ...", flush=True)
            record = run_step(step, log, limit)
            if step.result:
                record["result"] = read_result(step.result)
        summary["steps"].append(record)
        summary["elapsed_s"] = round(time.monotonic() - started, 1)
        write_json(summary_path, summary)
        print(
            f"[gpu-check {name}] {step.name}: {record['status']} in {record.get('seconds', 0)} s", flush=True
        )
        if step.essential and record["status"] != "passed":
            print(record.get("tail", ""))
            break  # nothing after it can run
    failed = [
        r["step"]
        for r in summary["steps"]
        if r["status"] not in ("passed", "skipped") and not _optional_not_run(steps, r)
    ]
    print(f"\n[gpu-check {name}] {summary_path} ({summary['elapsed_s']} s)")
    for line in headline(summary):
        print(line)
    print(f"[gpu-check {name}] " + (f"FAILED or not run: {failed}" if failed else "all passed"), flush=True)
    return 1 if failed else 0


def _optional_not_run(steps: list[Step], record: dict) -> bool:
    """An optional step that did not start for want of time is not a failure."""
    step = next((s for s in steps if s.name == record["step"]), None)
    return bool(step and step.optional and str(record["status"]).startswith("not run"))


def write_json(path: Path, data: Any) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(data, indent=1, default=str))
    os.replace(temporary, path)


# --- the short table printed last (the device tool returns the end of the output) ------------------------


def _fmt(value: Any, spec: str = ".2f") -> str:
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return "-"


def _graph_lines(result: dict) -> list[str]:
    lines = []
    for r in result.get("batches", []):
        if "replay_ms" not in r:
            lines.append(f"  graph b{r.get('batch')}: {r.get('error', 'incomplete')}"[:160])
            continue
        ms = r["replay_ms"]
        lines.append(
            f"  graph b{r['batch']}: {_fmt(ms.get('p50'))} ms/iteration (p20 {_fmt(ms.get('p20'))}, p80 "
            f"{_fmt(ms.get('p80'))}), {_fmt(r.get('wall_ms_per_iteration'))} ms wall, peak "
            f"{_fmt(r.get('peak_allocated_gib'))} GiB, check {r.get('check', {}).get('passed')}"
        )
    return lines


def _train_lines(result: dict) -> list[str]:
    lines = []
    reports = result.values() if "results" not in result and "environment" not in result else [result]
    for report in reports:
        if not isinstance(report, dict):
            continue
        for batch in report.get("results", []):
            for r in batch.get("rows", []):
                if "median_ms" in r:
                    lines.append(
                        f"  train b{batch.get('batch')} {r['row']:<26} {_fmt(r['median_ms'])} ms "
                        f"({_fmt(r.get('p20_ms'))}-{_fmt(r.get('p80_ms'))}), "
                        f"x{_fmt(r.get('ratio_vs_baseline_median_of_rounds'))} official"
                    )
                else:
                    lines.append(f"  train b{batch.get('batch')} {r.get('row')}: {r.get('skipped')}"[:160])
    return lines


def _probe_lines(result: dict) -> list[str]:
    return [
        f"  probe {c.get('case')}: {c.get('outcome')}"[:160]
        for c in result.get("cases", [])
        if isinstance(c, dict)
    ]


def _tests_lines(result: dict) -> list[str]:
    counts = result.get("outcomes", {})
    failed = result.get("failed", [])
    return [f"  changed CUDA tests: {len(result.get('selected', []))} selected, {counts}"] + [
        f"    not passed: {n}" for n in failed[:10]
    ]


def _ops_lines(result: dict) -> list[str]:
    rows = [
        r for r in result.get("speedups", []) if r.get("direction") == "fwd+bwd" and r.get("part") == "block"
    ]
    return [
        f"  ops {r['net']}.{r['layer']} b{r['batch']} {r['dtype']}: fused "
        f"{_fmt(r.get('fused_ms'), '.3f')} ms, x{_fmt(r.get('vs_eager'))} eager"
        for r in rows
    ]


def _quality_lines(result: dict) -> list[str]:
    lines = []
    for phase in ("fast", "plain"):
        run = result.get(phase)
        if isinstance(run, dict):
            lines.append(
                f"  quality {phase}: {run.get('iterations')} iterations in "
                f"{_fmt(run.get('train_s'), '.0f')} s ({_fmt(run.get('ms_per_iteration'))} ms/it), "
                f"finished {run.get('finished')}"
            )
    compare = result.get("compare")
    if isinstance(compare, dict):
        lines.append(f"  quality compare: {json.dumps(compare.get('headline', {}))}"[:300])
    return lines


def _eval_lines(result: dict) -> list[str]:
    metrics = result.get("image_metrics") or {}
    fcn = (result.get("fcn_score") or {}).get("generated") or {}
    found = {k: metrics.get(k) for k in ("l1", "psnr", "ssim")}
    found |= {k: fcn.get(k) for k in ("pixel_accuracy", "mean_class_accuracy", "mean_iou")}
    return ["  " + ", ".join(f"{k} {_fmt(v, '.3f')}" for k, v in found.items())]


HEADLINES: dict[str, Callable[[dict], list[str]]] = {
    "graph_check": _graph_lines,
    "bench_train": _train_lines,
    "crash_probe": _probe_lines,
    "cuda_tests_changed": _tests_lines,
    "bench_ops": _ops_lines,
    "quality_fast": _quality_lines,
    "quality_plain": _quality_lines,
    "quality_compare": _quality_lines,
}


def headline(summary: dict) -> list[str]:
    """One line per step, then its key numbers."""
    lines = []
    for record in summary.get("steps", []):
        lines.append(f"{record['step']:<28} {record['status']:<12} {record.get('seconds', '')}")
        result = record.get("result")
        row = record["step"].removesuffix("_b16")
        if record["step"].startswith("compile_") and isinstance(result, dict) and row in result:
            result = result[row]  # the file holds every compile row's report, one key each
        extract = HEADLINES.get(record["step"])
        if extract is None and record["step"].startswith(("compile_", "eval_")):
            extract = _train_lines if record["step"].startswith("compile_") else _eval_lines
        if isinstance(result, dict) and result.get("error"):
            lines.append(f"  error: {result['error']}"[:200])
        if not isinstance(result, dict) or extract is None:
            continue
        try:
            lines += extract(result)
        except Exception as error:  # a summary line must never hide the rest
            lines.append(f"  (no summary: {error!r})"[:160])
    return lines


# --- the dry run --------------------------------------------------------------------------------------


def dry_run(stages: list[str], out: Path, budget_s: int, work: Path | None = None) -> int:
    """List each stage's steps with their estimates and limits; fail if a named program or file is missing
    or a stage's estimates exceed its budget (on a machine without a GPU the GPU tools may be absent: those
    are reported, not failed)."""
    problems = []
    for stage in stages:
        steps = stage_steps(stage, out, work)
        estimate = sum(s.estimate_s for s in steps)
        print(f"stage {stage}: estimate {estimate} s; the stage stops after {budget_s} s")
        if estimate > budget_s:
            problems.append(f"OVER BUDGET {stage}: {estimate} s > {budget_s} s")
        files = out_files(steps, out)
        if len(files) > MAX_OUT_FILES:
            problems.append(f"TOO MANY FILES {stage}: {len(files)} > {MAX_OUT_FILES} in {out}")
        for step in steps:
            notes = ""
            if step.needs and not shutil.which(step.needs):
                notes += f"  [{step.needs} not on this machine]"
            if step.needs_path and not Path(step.needs_path).exists():
                notes += f"  [{step.needs_path} not here]"
            kind = " (while time remains)" if step.optional else ""
            timing = f"~{step.estimate_s:>4} s (limit {step.timeout_s:>4} s)"
            print(f"  {step.name:<28} {timing}{kind}  {' '.join(step.command)}{notes}")
            problems += [f"MISSING {step.name}: {path}" for path in missing_files(step)]
    for line in problems:
        print(line)
    return 1 if problems else 0


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
    parser.add_argument(
        "--stage",
        choices=[*STAGES, "all", *ALIASES],
        default="speed",
        help="speed (default), correctness or quality; all: every stage (dry run only)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results")
    )
    parser.add_argument(
        "--work", type=Path, default=default_work(), help="checkpoints and scratch (default: %(default)s)"
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
    stages = list(STAGES) if args.stage == "all" else [stage_name(args.stage)]
    if args.dry_run:
        return dry_run(stages, args.out, args.budget, args.work)
    if len(stages) > 1:
        parser.error("the stages do not fit one 10-minute command together: run one --stage per command")
    return run_stage(stages[0], args.out, args.budget, args.work)


if __name__ == "__main__":
    sys.exit(main())
