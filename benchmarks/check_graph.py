"""The CUDA-graph self-check on the real configuration: unet_256 + 70x70 PatchGAN at 256 px, bf16.

For each ``--batch``: build the fast trainer (facades when at hand, else the generated facades), capture
its iteration, then compare one graph replay with eager iterations from the same state
(:func:`fastpix2pix.training.graph_check.verify_captured_step`), and time capture, check and replays. Needs
CUDA.

    python3 benchmarks/check_graph.py --batch 1 16 --out results/
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from fastpix2pix.data.synthetic import generate_synthetic_facades
from fastpix2pix.runs.options import TrainOptions
from fastpix2pix.training.fast_step import FastPathConfig
from fastpix2pix.training.fast_trainer import FastTrainer
from fastpix2pix.training.graph_check import verify_captured_step

HERE = Path(__file__).resolve().parent
FACADES = (HERE.parent / ".gpu_data" / "facades", HERE.parent.parent / "shared" / "data" / "facades")


def dataroot(work: Path) -> tuple[Path, str]:
    for path in FACADES:
        if (path / "train").is_dir():
            return path, "facades"
    return generate_synthetic_facades(work / "synthetic", n_train=32, n_test=1, size=256), "synthetic facades"


def check(batch: int, root: Path, work: Path) -> dict:
    opt = TrainOptions(
        dataroot=str(root), direction="BtoA", name=f"graph_check_b{batch}", checkpoints_dir=str(work),
        batch_size=batch, device="cuda", fast_path="on", seed=0, print_freq=10**9,
        display_freq=10**9, save_latest_freq=10**9,
    )  # fmt: skip
    config = FastPathConfig.for_device("cuda", verify_graph=False)  # checked here, with timings
    trainer = FastTrainer(opt, config, progress_bar=False)
    torch.cuda.synchronize()
    start = time.perf_counter()
    step = trainer._ensure_step()
    torch.cuda.synchronize()
    capture_s = time.perf_counter() - start
    start = time.perf_counter()
    result = verify_captured_step(step)
    check_s = time.perf_counter() - start
    trainer.data.start_epoch(trainer.opt.epoch_count)
    replays = []
    for _ in range(20):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        step()
        end.record()
        end.synchronize()
        replays.append(begin.elapsed_time(end))
        if step.pending >= trainer.readback_every:
            step.take_losses()
    losses = step.take_losses().cpu()
    return {
        "batch": batch,
        "check": asdict(result) | {"passed": result.passed},
        "capture_s": capture_s,
        "check_s": check_s,
        "replay_ms_median": sorted(replays)[len(replays) // 2],
        "losses_finite": bool(torch.isfinite(losses).all()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("check_graph: needs CUDA", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="check_graph_"))
    root, data_name = dataroot(work)
    results = []
    for batch in args.batch:
        record = check(batch, root, work)
        results.append(record)
        print(json.dumps(record), flush=True)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "data": data_name,
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"graph_check_{datetime.date.today().isoformat()}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")
    return 0 if all(r["check"]["passed"] and r["losses_finite"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
