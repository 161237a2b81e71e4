"""One training iteration of two commits, timed in alternating processes, round by round.

For a change whose effect on speed must be checked against the code before it (the baseline is the same
iteration at the earlier commit): each commit is checked out in a git worktree (the compiled library of this
tree is copied in: the commits must share ``csrc/``), and every round runs one process per commit, in
alternating order, each timing ``--iterations`` iterations of the plain trainer's step (the CPU default:
float32, NCHW, the fused ops, fused Adam) after a warm-up. Reported: the medians and p20/p80 of the
per-process medians, and the per-round ratios.

    python benchmarks/ab_commits.py BEFORE AFTER --rounds 6 --json benchmarks/results/<name>.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import ROOT, cpu_info, environment, heavy_processes, quantiles

# Runs inside each worktree: prints the median milliseconds of one iteration.
TIMER = """
import statistics, sys, time, torch
from fastpix2pix.runs.networks import build_networks
from fastpix2pix.runs.options import TrainOptions
from fastpix2pix.training.optim import build_optimizers
from fastpix2pix.training.step import Objective, train_step
netG, size, iterations, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
torch.manual_seed(0)
opt = TrainOptions(netG=netG, device="cpu")
nets = build_networks(opt, "fused", torch.device("cpu"))
optimizers = build_optimizers(nets, opt)
batch = {"A": torch.randn(1, 3, size, size), "B": torch.randn(1, 3, size, size)}
objective = Objective(backend="fused")
times = []
for i in range(3 + iterations):
    start = time.perf_counter()
    train_step(nets, optimizers, batch, objective)
    if i >= 3:
        times.append((time.perf_counter() - start) * 1e3)
print(statistics.median(times))
"""


def worktree(commit: str, folder: Path) -> Path:
    subprocess.run(["git", "worktree", "add", "-q", "--detach", str(folder), commit], cwd=ROOT, check=True)
    for library in (ROOT / "fastpix2pix").glob("_C*.so"):
        shutil.copy(library, folder / "fastpix2pix" / library.name)
    return folder


def one_process(tree: Path, args: argparse.Namespace) -> float:
    command = [
        sys.executable,
        "-c",
        TIMER,
        args.netG,
        str(args.size),
        str(args.iterations),
        str(args.threads),
    ]
    result = subprocess.run(command, cwd=tree, env={"PYTHONPATH": str(tree)}, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(result.stderr[-2000:])
    return float(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--netG", default="unet_256")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    result: dict[str, Any] = {
        "what": "plain trainer's iteration (float32, NCHW, fused ops, fused Adam), batch 1, per commit",
        "date": datetime.date.today().isoformat(),
        "commits": {"before": args.before, "after": args.after},
        "config": {"netG": args.netG, "size": args.size, "iterations": args.iterations},
        "environment": environment(torch.device("cpu"), args) | {"cpu": cpu_info()},
        "rounds": [],
    }
    with tempfile.TemporaryDirectory() as scratch:
        trees = {name: worktree(commit, Path(scratch) / name) for name, commit in result["commits"].items()}
        try:
            for round_index in range(args.rounds):
                order = ["before", "after"] if round_index % 2 == 0 else ["after", "before"]
                times = {name: one_process(trees[name], args) for name in order}
                result["rounds"].append(times | {"order": order, "others": heavy_processes()})
                print(f"round {round_index}: " + ", ".join(f"{n} {t:.1f} ms" for n, t in times.items()))
                if args.json:
                    args.json.write_text(json.dumps(summary(result), indent=1, default=str) + "\n")
        finally:
            for tree in trees.values():
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)
    final = summary(result)
    print(json.dumps(final["summary"], indent=1))
    return 0


def summary(result: dict[str, Any]) -> dict[str, Any]:
    rounds = result["rounds"]
    out = dict(result)
    if rounds:
        ratios = [r["before"] / r["after"] for r in rounds]
        out["summary"] = {
            name: dict(
                zip(("median_ms", "p20_ms", "p80_ms"), quantiles([r[name] for r in rounds]), strict=True)
            )
            for name in ("before", "after")
        } | {"ratio_before_over_after": {"per_round": ratios, "median": statistics.median(ratios)}}
    return out


if __name__ == "__main__":
    raise SystemExit(main())
