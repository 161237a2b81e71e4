"""The GPU check's quality stage: the facades recipe of the paper on the fast path, and the plain trainer.

Three phases, each its own process (a step of ``gpu_check.py --stage quality``), all writing one JSON
(``--json``, each under its own key, rewritten at every epoch end so that a kill keeps how far it got):

- ``fast``: ``fastpix2pix train``'s recipe for facades (unet_256, 70x70 PatchGAN, batch 1, 100 + 100
  epochs: 80,000 iterations, BtoA) through the fast trainer, until the recipe ends or ``--budget-s``
  passes (then it stops cleanly, saves ``latest`` and records how far it got, and the time the whole
  recipe would take at the measured rate). A checkpoint ``epoch_<compare-epoch>.pt`` is saved on the way.
- ``plain``: the plain float32 trainer (``--fast_path off``) on the same recipe for its first
  ``--compare-epoch`` epochs (the same learning-rate schedule), saving ``epoch_<compare-epoch>.pt``.
- ``compare``: the two loss logs at equal iterations, and the ``fastpix2pix eval`` reports of both
  epoch-<compare-epoch> checkpoints and of the fast run's end (written by the stage's eval steps).

``--tiny`` (a 32 px ResNet on generated data, 2 + 1 epochs) runs the same code on a CPU, for tests.

    python3 benchmarks/quality_run.py fast --dataroot .gpu_data/facades --checkpoints_dir /tmp/q --json q.json
    python3 benchmarks/quality_run.py plain --dataroot .gpu_data/facades --checkpoints_dir /tmp/q ...
    python3 benchmarks/quality_run.py compare --checkpoints_dir /tmp/q --eval-dir /tmp --json q.json
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # incremental: beside this file
from incremental import IncrementalJson, read_json

PAPER_EPOCHS = (100, 100)  # n_epochs, n_epochs_decay: 200 epochs of the 400 facades = 80,000 iterations
LOSSES = ("G_GAN", "G_L1", "D_real", "D_fake")


def options(args: argparse.Namespace, phase: str) -> Any:
    from fastpix2pix.runs.options import TrainOptions

    n_epochs, n_decay = (2, 1) if args.tiny else PAPER_EPOCHS
    extra: dict[str, Any] = {}
    if args.tiny:
        extra = dict(
            netG="resnet_6blocks", ngf=4, ndf=4, load_size=36, crop_size=32, num_threads=0, print_freq=4
        )
    return TrainOptions(
        dataroot=args.dataroot, direction="BtoA", name=f"quality_{phase}",
        checkpoints_dir=args.checkpoints_dir, device=args.device, seed=0, n_epochs=n_epochs,
        n_epochs_decay=n_decay, save_epoch_freq=0, fast_path="on" if phase == "fast" else "off", **extra,
    )  # fmt: skip


def trainer_class(base: type) -> type:
    """``base`` (Trainer or FastTrainer) that stops cleanly at a deadline or after ``stop_after_epoch``,
    saves ``epoch_<compare_epoch>.pt``, and reports its progress at every epoch end."""

    class Timed(base):  # type: ignore[misc, valid-type]
        deadline: float = float("inf")
        stop_after_epoch: int | None = None
        compare_epoch: int = 5
        on_epoch: Any = None
        stopped_by_budget = False

        def _reached_max_iters(self) -> bool:
            if time.monotonic() >= self.deadline:
                self.stopped_by_budget = True
                return True
            if self.stop_after_epoch is not None and self.state.epoch > self.stop_after_epoch:
                return True
            return super()._reached_max_iters()

        def _end_epoch(self) -> None:
            super()._end_epoch()
            finished = self.state.epoch - 1
            if finished == self.compare_epoch:
                self.save((finished,))
            if self.on_epoch is not None:
                self.on_epoch(self)

    return Timed


def train_phase(args: argparse.Namespace, phase: str) -> int:
    from fastpix2pix.training.fast_trainer import FastTrainer
    from fastpix2pix.training.trainer import Trainer

    report = IncrementalJson(args.json, {"phase": phase, "status": "starting"}, key=phase)
    started = time.monotonic()
    opt = options(args, phase)
    shutil.rmtree(Path(opt.checkpoints_dir) / opt.name, ignore_errors=True)  # an earlier run's: start afresh
    cls = trainer_class(FastTrainer if phase == "fast" else Trainer)
    try:
        trainer = cls(opt, progress_bar=False)
        built = time.monotonic()
        trainer.compare_epoch = args.compare_epoch
        trainer.deadline = started + args.budget_s
        if phase == "plain":
            trainer.stop_after_epoch = args.compare_epoch
        total = trainer._iterations_left()
        report.update(
            status="training",
            options={k: str(v) for k, v in dataclasses.asdict(opt).items()},
            build_s=built - started,
            recipe_iterations=total,
            budget_s=args.budget_s,
        )
        fit_start = time.monotonic()

        def progress(t: Any) -> None:
            done = t.state.iteration
            seconds = time.monotonic() - fit_start
            report.update(
                epoch=t.state.epoch - 1,
                iterations=done,
                train_s=seconds,
                ms_per_iteration=seconds * 1e3 / done,
            )

        trainer.on_epoch = progress
        trainer.fit()
        seconds = time.monotonic() - fit_start
        done = trainer.state.iteration
        wanted = total if phase == "fast" else min(total, args.compare_epoch * len(trainer.dataset))
        rate = seconds / max(done, 1)
        report.update(
            status="done",
            iterations=done,
            epochs_done=trainer.state.epoch - 1 + trainer.state.epoch_iter / max(len(trainer.dataset), 1),
            train_s=seconds,
            ms_per_iteration=rate * 1e3,
            finished=done >= wanted,
            stopped_by_budget=trainer.stopped_by_budget,
            projected_recipe_s=rate * total,
            run_dir=str(trainer.run_dir),
            compare_checkpoint=str(trainer.run_dir / f"epoch_{args.compare_epoch}.pt"),
            compare_checkpoint_saved=(trainer.run_dir / f"epoch_{args.compare_epoch}.pt").is_file(),
        )
        print(f"{phase}: {done} iterations in {seconds:.0f} s ({rate * 1e3:.2f} ms/iteration)", flush=True)
        return 0
    except Exception as error:  # fail soft: the JSON says why
        report.fail(error, limit=1000)
        return 1


def loss_log(run_dir: Path) -> dict[int, dict[str, float]]:
    records = read_json_lines(run_dir / "loss_log.jsonl")
    return {int(r["iter"]): r for r in records if "iter" in r}


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    import json

    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def compare_losses(fast: dict[int, dict], plain: dict[int, dict]) -> dict[str, Any]:
    """The logged window means at the iterations both runs logged: per loss, the means over those points,
    the mean relative difference, and the last point's values."""
    common = sorted(set(fast) & set(plain))
    if not common:
        return {"iterations_compared": 0}
    out: dict[str, Any] = {"iterations_compared": common[-1], "log_points": len(common)}
    for name in LOSSES:
        f = [fast[i][name] for i in common if name in fast[i] and name in plain[i]]
        p = [plain[i][name] for i in common if name in fast[i] and name in plain[i]]
        if not f:
            continue
        last = common[-max(1, len(common) // 5) :]  # the last fifth: where both have settled most
        out[name] = {
            "fast_mean": statistics.fmean(f),
            "plain_mean": statistics.fmean(p),
            "fast_last_fifth": statistics.fmean(fast[i][name] for i in last),
            "plain_last_fifth": statistics.fmean(plain[i][name] for i in last),
            "mean_relative_difference": statistics.fmean(
                abs(a - b) / max(abs(b), 1e-12) for a, b in zip(f, p, strict=True)
            ),
        }
    return out


def eval_summary(report: Any) -> dict[str, Any] | None:
    if not isinstance(report, dict):
        return None
    metrics = report.get("image_metrics", {})
    fcn = (report.get("fcn_score") or {}).get("generated", {})
    found = {k: metrics.get(k) for k in ("l1", "psnr", "ssim")}
    found |= {k: fcn.get(k) for k in ("pixel_accuracy", "mean_class_accuracy", "mean_iou") if k in fcn}
    return found | {"images": report.get("images")}


def compare_phase(args: argparse.Namespace) -> int:
    runs = Path(args.checkpoints_dir)
    fast, plain = loss_log(runs / "quality_fast"), loss_log(runs / "quality_plain")
    epoch = args.compare_epoch
    evals = Path(args.eval_dir) if args.eval_dir else None
    metrics = {}
    if evals is not None:
        for name in ("fast", f"fast_epoch{epoch}", f"plain_epoch{epoch}"):
            metrics[name] = eval_summary(read_json(evals / f"eval_{name}.json"))
    losses = compare_losses(fast, plain)
    headline: dict[str, Any] = {"iterations_compared": losses.get("iterations_compared")}
    for name in ("G_L1", "G_GAN"):
        if name in losses:
            headline[f"{name} last fifth fast/plain"] = (
                round(losses[name]["fast_last_fifth"], 4),
                round(losses[name]["plain_last_fifth"], 4),
            )
    for name in (f"fast_epoch{epoch}", f"plain_epoch{epoch}", "fast"):
        if metrics.get(name):
            headline[name] = {k: v for k, v in metrics[name].items() if k != "images"}
    IncrementalJson(
        args.json,
        {"losses_at_equal_iterations": losses, "eval": metrics, "headline": headline},
        key="compare",
    )
    print(headline, flush=True)
    return 0 if losses.get("iterations_compared") else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("phase", choices=["fast", "plain", "compare"])
    parser.add_argument("--dataroot", default=".gpu_data/facades")
    parser.add_argument("--checkpoints_dir", default="/tmp/fastpix2pix_quality")
    parser.add_argument("--results_dir", default=None, help="(unused here: the eval steps write there)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compare-epoch", type=int, default=5)
    parser.add_argument("--budget-s", type=float, default=225, help="stop training cleanly after this")
    parser.add_argument("--eval-dir", help="compare: the folder of the eval_<name>.json reports")
    parser.add_argument("--tiny", action="store_true", help="a 32 px ResNet, 2 + 1 epochs (CPU tests)")
    parser.add_argument("--json", type=Path, default=Path("quality.json"))
    args = parser.parse_args(argv)
    if args.phase == "compare":
        return compare_phase(args)
    return train_phase(args, args.phase)


if __name__ == "__main__":
    sys.exit(main())
