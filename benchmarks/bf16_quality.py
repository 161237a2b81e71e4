"""Does pix2pix train as well in bf16 as in float32? A fixed protocol that ends by construction.

The real facades (labels -> photo, ``BtoA``), unet_128 with ngf = ndf = 32 at 128 px, batch 1, 15 epochs at
the constant learning rate and 15 of linear decay (the official schedule), the same seeds for both
precisions, one thread per run. The two rows differ only in the precision of the fast trainer:

- ``fp32``: the fast trainer as ``fastpix2pix train --fast_path on`` runs it on a CPU (float32, NCHW,
  fused Adam, the data decoded once into memory);
- ``bf16``: the project's bf16 recipe, the one the GPU fast path uses: forward passes under
  ``torch.autocast(bfloat16)`` (convolutions and activations in bf16; BatchNorm statistics, master weights,
  Adam state and losses in float32), channels_last.

Each run is then translated by ``fastpix2pix test`` in float32 (the paper's protocol: batch statistics,
dropout on; 128 px, no crop) and scored by ``fastpix2pix eval`` (L1, PSNR, SSIM; the FCN-score when a
facade parser is cached). ``collect`` gathers the runs into one JSON: every run's metrics and loss curve,
the per-precision means and seed-to-seed standard deviations, and whether bf16 is within the spread.

Phases (each run is its own process; the runs write their own JSON, so two can run at once)::

    python3 benchmarks/bf16_quality.py run --precision bf16 --seed 0 --work /tmp/bf16q
    python3 benchmarks/bf16_quality.py collect --work /tmp/bf16q --json benchmarks/results/<...>.json

``--epochs 1 1 --max-images 8`` makes a run small enough for a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness, incremental: beside this file
from harness import environment
from incremental import IncrementalJson, read_json

PRECISIONS = ("fp32", "bf16")
METRICS = ("l1", "psnr", "ssim")
FCN = ("pixel_accuracy", "mean_class_accuracy", "mean_iou")
LOSSES = ("G_GAN", "G_L1", "D_real", "D_fake")


def run_name(precision: str, seed: int) -> str:
    return f"{precision}_seed{seed}"


def train_options(args: argparse.Namespace) -> Any:
    from fastpix2pix.runs.options import TrainOptions

    constant, decay = args.epochs
    return TrainOptions(
        dataroot=args.dataroot, direction="BtoA", name=run_name(args.precision, args.seed),
        checkpoints_dir=str(Path(args.work) / "runs"), device="cpu", seed=args.seed, netG="unet_128",
        ngf=32, ndf=32, load_size=142, crop_size=128, n_epochs=constant, n_epochs_decay=decay,
        fast_path="on", num_threads=0, print_freq=args.print_freq, display_freq=10**9,
        save_latest_freq=10**9, save_epoch_freq=0, max_dataset_size=args.max_images or math.inf,
    )  # fmt: skip


def fast_path_config(precision: str, separate_pairs: bool = False) -> Any:
    from fastpix2pix.training.fast_step import FastPathConfig

    bf16 = precision == "bf16"
    # bf16 as on CUDA, with channels_last (measured faster than NCHW in bf16 on the CPU this ran on);
    # float32 keeps the CPU default (NCHW). separate_pairs: D's pairs as two forwards (the plain trainer's).
    return FastPathConfig.for_device(
        "cpu", bf16=bf16, channels_last=bf16, pairs_as_one_batch=not separate_pairs
    )


def loss_curve(run_dir: Path) -> list[dict[str, float]]:
    path = run_dir / "loss_log.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{k: r[k] for k in ("epoch", "iter", *LOSSES) if k in r} for r in rows]


def cli(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "fastpix2pix", *arguments]


def evaluate(args: argparse.Namespace, run_dir: Path, report: IncrementalJson) -> None:
    """``fastpix2pix test`` (float32) then ``fastpix2pix eval`` of the run's last checkpoint."""
    results = Path(args.work) / "results"
    name = run_dir.name
    test = cli(
        "test", "--dataroot", args.dataroot, "--direction", "BtoA", "--name", name,
        "--checkpoints_dir", str(run_dir.parent), "--results_dir", str(results), "--netG", "unet_128",
        "--ngf", "32", "--ndf", "32", "--load_size", "128", "--crop_size", "128", "--precision", "fp32",
        "--device", "cpu", "--seed", str(args.seed),
    )  # fmt: skip
    if args.max_images:
        test += ["--num_test", str(args.max_images)]
    output = Path(args.work) / f"eval_{name}.json"
    scoring = cli("eval", str(results / name), "--dataroot", args.dataroot, "--output", str(output))
    if not args.parser:
        scoring.append("--no-parser")
    for step, command in (("test", test), ("eval", scoring)):
        started = time.monotonic()
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{step} failed ({done.returncode}): {done.stderr[-2000:]}")
        report.update(**{f"{step}_s": time.monotonic() - started})
    scores = read_json(output) or {}
    image = scores.get("image_metrics", {})
    fcn = (scores.get("fcn_score") or {}).get("generated", {})
    report.update(metrics={k: image.get(k) for k in METRICS} | {k: fcn[k] for k in FCN if k in fcn})
    if not fcn:
        report.update(fcn_absent=scores.get("fcn_score_absent") or scores.get("parser") or "no parser")


def run_phase(args: argparse.Namespace) -> int:
    import torch

    from fastpix2pix.training.fast_trainer import FastTrainer

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    name = run_name(args.precision, args.seed)
    report = IncrementalJson(work / f"run_{name}.json", {"precision": args.precision, "seed": args.seed})
    try:
        opt = train_options(args)
        config = fast_path_config(args.precision, args.separate_pairs)
        report.update(
            status="training",
            options={k: str(v) for k, v in dataclasses.asdict(opt).items()},
            fast_path=dataclasses.asdict(config),
            threads=args.threads,
        )
        started = time.monotonic()
        trainer = FastTrainer(opt, config, progress_bar=False)
        trainer.fit()
        seconds = time.monotonic() - started
        report.update(
            status="evaluating",
            iterations=trainer.state.iteration,
            train_s=seconds,
            ms_per_iteration=seconds * 1e3 / max(trainer.state.iteration, 1),
            losses=loss_curve(trainer.run_dir),
        )
        evaluate(args, trainer.run_dir, report)
        report.update(status="done")
        print(f"{name}: {report.data.get('metrics')}", flush=True)
        return 0
    except Exception as error:  # fail soft: the JSON says why
        report.fail(error)
        return 1


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per precision: mean and seed-to-seed standard deviation of each metric and of the last fifth of
    each loss curve; then bf16 - fp32 per metric against the larger of the two spreads."""
    out: dict[str, Any] = {}
    for precision in PRECISIONS:
        done = [r for r in runs if r.get("precision") == precision and r.get("status") == "done"]
        rows: dict[str, Any] = {"runs": len(done), "seeds": sorted(r["seed"] for r in done)}
        for key in (*METRICS, *FCN):
            values = [r["metrics"][key] for r in done if r.get("metrics", {}).get(key) is not None]
            if values:
                rows[key] = {
                    "mean": statistics.fmean(values),
                    "std": statistics.stdev(values) if len(values) > 1 else None,
                    "values": values,
                }
        for loss in LOSSES:
            tails = []
            for r in done:
                curve = [row[loss] for row in r.get("losses", []) if loss in row]
                if curve:
                    tails.append(statistics.fmean(curve[-max(1, len(curve) // 5) :]))
            if tails:
                rows[f"{loss}_last_fifth"] = {"mean": statistics.fmean(tails), "values": tails}
        out[precision] = rows
    verdict: dict[str, Any] = {}
    for key in (*METRICS, *FCN):
        a, b = out["fp32"].get(key), out["bf16"].get(key)
        if not a or not b or a["std"] is None or b["std"] is None:
            continue
        spread = max(a["std"], b["std"])
        difference = b["mean"] - a["mean"]
        verdict[key] = {
            "bf16_minus_fp32": difference,
            "spread": spread,
            "within_spread": abs(difference) <= spread,
        }
    out["verdict"] = verdict
    out["bf16_within_spread"] = bool(verdict) and all(v["within_spread"] for v in verdict.values())
    return out


def collect_phase(args: argparse.Namespace) -> int:
    import torch

    work = Path(args.work)
    runs = [read_json(p) for p in sorted(work.glob("run_*.json"))]
    runs = [r for r in runs if isinstance(r, dict)]
    report = {
        "benchmark": "bf16_quality",
        "environment": environment(torch.device("cpu"), args),
        "protocol": {
            "data": "facades train (400) / test (106), BtoA",
            "model": "unet_128, ngf=ndf=32, basic D, 128 px (load 142, crop 128), batch 1",
            "epochs": list(args.epochs),
            "eval": "fastpix2pix test --precision fp32 (paper protocol), 128 px; fastpix2pix eval",
        },
        "summary": summarize(runs),
        "runs": runs,
    }
    IncrementalJson(args.json, report)
    print(json.dumps(report["summary"], indent=1), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("phase", choices=["run", "collect"])
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--separate-pairs",
        action="store_true",
        help="D's fake and real pairs as two forwards instead of one batch (use its own --work)",
    )
    parser.add_argument("--work", default="/tmp/fastpix2pix_bf16_quality")
    parser.add_argument("--dataroot", default=os.environ.get("FACADES", "../shared/data/facades"))
    parser.add_argument("--epochs", type=int, nargs=2, default=(15, 15), metavar=("CONSTANT", "DECAY"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--print-freq", type=int, default=100, help="loss log period (images)")
    parser.add_argument("--max-images", type=int, default=None, help="train/test on this many (tests)")
    parser.add_argument("--parser", action="store_true", help="FCN-score too (needs a cached parser)")
    parser.add_argument("--json", type=Path, default=Path("bf16_quality.json"))
    args = parser.parse_args(argv)
    return collect_phase(args) if args.phase == "collect" else run_phase(args)


if __name__ == "__main__":
    sys.exit(main())
