"""The fast trainer's captured iteration, timed as ``fit()`` runs it: unet_256 + PatchGAN at 256 px, bf16.

For each ``--batch`` (16 then 1 in the GPU check): build the :class:`FastTrainer` on facades (else generated
facades) and, inside the same ``determinism`` context ``Trainer.fit`` uses (cuDNN autotuning on, determinism
off), build its step as ``fit`` does (``_ensure_step``: the kernel self-check, the warm-up and the capture),
compare one replay with eager iterations (:func:`fastpix2pix.training.graph_check.verify_captured_step`, the
start-up graph check), then run ``--replays`` iterations the way ``FastTrainer._train_epoch`` runs them (the
step, then the losses read back every ``readback_every`` iterations): each timed with CUDA events
(p20/p50/p80) and the whole block by the wall clock; the peak memory; and a ``torch.profiler`` table of
kernel families (count, total time per iteration) over ``--profile-replays`` more.

The JSON is rewritten when each batch starts and ends, so a kill keeps every batch measured before it.
``--device cpu`` runs the same code path on the CPU (replays run eagerly through ``EagerGraphRuntime``;
the profile is of CPU ops): for testing this script, with ``--tiny`` (a 32 px ResNet).

    python3 benchmarks/check_graph.py --batch 16 1 --json results/graph_check.json
    python benchmarks/check_graph.py --device cpu --tiny --batch 2 --replays 4 --json /tmp/g.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # incremental: beside this file
from incremental import IncrementalJson

from fastpix2pix.data.synthetic import generate_synthetic_facades
from fastpix2pix.runs.options import TrainOptions
from fastpix2pix.runtime import determinism
from fastpix2pix.training.fast_step import EagerGraphRuntime, FastPathConfig
from fastpix2pix.training.fast_trainer import FastTrainer
from fastpix2pix.training.graph_check import verify_captured_step

HERE = Path(__file__).resolve().parent
FACADES = (HERE.parent / ".gpu_data" / "facades", HERE.parent.parent / "shared" / "data" / "facades")
PRINT_FREQ = 100  # the default --print_freq: the losses are read back every 100 images, as in a user's run

# Kernel families, by a lower-case substring of the kernel (or CPU op) name; the first match wins.
FAMILIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("fastpix2pix fused kernels", ("fastpix2pix",)),
    ("layout transforms", ("nchwtonhwc", "nhwctonchw", "transpose", "permute")),
    ("Adam (multi-tensor)", ("adam", "multi_tensor", "foreach")),
    (
        "convolution / GEMM (cuDNN, cuBLAS)",
        (
            "conv",
            "cudnn",
            "xmma",
            "gemm",
            "cutlass",
            "nvjet",
            "implicit",
            "dgrad",
            "wgrad",
            "fprop",
            "mkldnn",
        ),
    ),
    ("batch norm (ATen/cuDNN)", ("batch_norm", "batchnorm", "bn_")),
    ("concatenation", ("catarraybatchedcopy", "aten::cat", "cat_")),
    ("dropout / random", ("dropout", "bernoulli", "philox", "distribution", "random", "randint")),
    ("reductions", ("reduce", "sum", "mean")),
    ("triton (inductor)", ("triton",)),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "pointwise", "aten::add", "aten::mul")),
    ("copies / memset", ("memcpy", "memset", "copy")),
    ("index / gather / scatter", ("index", "gather", "scatter")),
)


def family(name: str) -> str:
    lowered = name.lower()
    for label, keys in FAMILIES:
        if any(key in lowered for key in keys):
            return label
    return "other"


def dataroot(work: Path, size: int) -> tuple[Path, str]:
    if size == 256:
        for path in FACADES:
            if (path / "train").is_dir():
                return path, "facades"
    root = generate_synthetic_facades(work / f"synthetic{size}", n_train=32, n_test=1, size=size)
    return root, f"synthetic facades ({size} px)"


def percentiles(values: list[float]) -> dict[str, float]:
    if len(values) == 1:
        return {"p20": values[0], "p50": values[0], "p80": values[0], "n": 1}
    q = statistics.quantiles(values, n=10, method="inclusive")
    return {"p20": q[1], "p50": statistics.median(values), "p80": q[7], "mean": statistics.fmean(values)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def options(args: argparse.Namespace, batch: int, root: Path, work: Path) -> TrainOptions:
    if args.tiny:
        extra: dict[str, Any] = dict(netG="resnet_6blocks", ngf=4, ndf=4, load_size=36, crop_size=32)
    else:  # the official 286 -> 256 resize and crop at 256 px
        extra = {} if args.size == 256 else dict(load_size=args.size, crop_size=args.size)
    return TrainOptions(
        dataroot=str(root), direction="BtoA", name=f"graph_check_b{batch}", checkpoints_dir=str(work),
        batch_size=batch, device=args.device, fast_path="on", seed=0, print_freq=PRINT_FREQ,
        display_freq=10**9, save_latest_freq=10**9, **extra,
    )  # fmt: skip


def build_step(trainer: FastTrainer, device: torch.device) -> tuple[Any, float]:
    """``_ensure_step`` as ``fit`` calls it (kernel check, warm-up, capture); its seconds."""
    sync(device)
    start = time.perf_counter()
    step = trainer._ensure_step()
    sync(device)
    return step, time.perf_counter() - start


def timed_iterations(trainer: FastTrainer, step: Any, n: int, device: torch.device) -> dict[str, Any]:
    """``n`` iterations as ``_train_epoch`` runs them; CUDA-event (or host) times of each, and the wall."""
    state = trainer.state
    events = []
    host: list[float] = []
    sync(device)
    wall_start = time.perf_counter()
    for _ in range(n):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            step()
            end.record()
            events.append((begin, end))
        else:
            t0 = time.perf_counter()
            step()
            host.append((time.perf_counter() - t0) * 1e3)
        state.iteration += 1
        if step.pending >= trainer.readback_every:
            trainer._log_window()  # the read-back (one sync) and the log record, as in fit()
    sync(device)
    wall = time.perf_counter() - wall_start
    times = [b.elapsed_time(e) for b, e in events] if events else host
    return {
        "replay_ms": percentiles(times),
        "wall_ms_per_iteration": wall * 1e3 / n,
        "raw_ms": times,
    }


def kernel_profile(step: Any, n: int, device: torch.device) -> dict[str, Any]:
    """Kernel families over ``n`` iterations (CUDA kernels on a GPU; CPU ops' self time on a CPU)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(n):
            step()
        sync(device)
    step.take_losses()
    per_kernel: dict[str, list[float]] = {}
    for event in prof.events():
        if device.type == "cuda":
            if event.device_type == DeviceType.CPU:
                continue
            us = event.time_range.elapsed_us()
        else:
            us = event.self_cpu_time_total
        entry = per_kernel.setdefault(event.name, [0, 0.0])
        entry[0] += 1
        entry[1] += us
    families: dict[str, dict[str, float]] = {}
    for name, (count, us) in per_kernel.items():
        row = families.setdefault(family(name), {"count": 0, "total_us": 0.0})
        row["count"] += count
        row["total_us"] += us
    total = sum(r["total_us"] for r in families.values()) or 1.0
    table = {
        label: {
            "count_per_iteration": row["count"] / n,
            "us_per_iteration": row["total_us"] / n,
            "share": row["total_us"] / total,
        }
        for label, row in sorted(families.items(), key=lambda kv: -kv[1]["total_us"])
    }
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1][1])[:25]
    return {
        "iterations": n,
        "what": "CUDA kernels (device time)" if device.type == "cuda" else "CPU ops (self time)",
        "kernel_us_per_iteration": total / n,
        "families": table,
        "top": [{"name": k[:160], "count": c, "us_per_iteration": us / n} for k, (c, us) in top],
        "note": None if per_kernel else "the profiler reported no kernel (graph kernels not traced?)",
    }


def check(
    args: argparse.Namespace,
    batch: int,
    root: Path,
    work: Path,
    record: dict[str, Any],
    save: Callable[[], None],
) -> None:
    """One batch size; fills ``record`` as it goes and calls ``save`` after each part."""
    device = torch.device(args.device)
    opt = options(args, batch, root, work)
    config = FastPathConfig.for_device(device, verify_graph=False)  # checked below, timed apart
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    trainer = FastTrainer(opt, config, progress_bar=False)
    if device.type != "cuda":  # the capture path on the CPU: replays run eagerly
        trainer.config = dataclasses.replace(trainer.config, cuda_graph=True)
        trainer.graph_runtime = EagerGraphRuntime()
    record["trainer_build_s"] = time.perf_counter() - start
    record["readback_every"] = trainer.readback_every
    try:
        with determinism(opt.deterministic):  # what fit() runs the epochs in
            record["cudnn_benchmark"] = torch.backends.cudnn.benchmark
            step, record["capture_s"] = build_step(trainer, device)
            save()
            start = time.perf_counter()
            result = verify_captured_step(step)
            record["check_s"] = time.perf_counter() - start
            record["check"] = asdict(result) | {"passed": result.passed}
            trainer.data.start_epoch(
                trainer.state.epoch, order=trainer.sampler.order(trainer.state.epoch), start=0
            )
            record |= timed_iterations(trainer, step, args.replays, device)
            rows = step.take_losses().float().cpu()  # the rest since the last read-back (those were checked)
            record["losses_finite"] = bool(torch.isfinite(rows).all())
            record["graph"] = step.graph is not None
            if device.type == "cuda":
                record["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                record["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
            save()  # the timings stand even if the profiler fails or crashes
            if args.profile_replays:
                try:
                    record["profile"] = kernel_profile(step, args.profile_replays, device)
                except Exception as error:  # the timings above stand without it
                    record["profile"] = {"error": f"{type(error).__name__}: {error}"[:500]}
    finally:
        trainer.close()
        del trainer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, nargs="+", default=[16, 1])
    parser.add_argument(
        "--replays", type=int, default=200, help="timed iterations per batch (>= 100 on a GPU)"
    )
    parser.add_argument("--profile-replays", type=int, default=5, help="profiled iterations (0: none)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--tiny", action="store_true", help="a 32 px resnet_6blocks/ngf 4 (CPU tests)")
    parser.add_argument("--json", type=Path, help="the report (default: results/graph_check_<date>.json)")
    parser.add_argument("--work", type=Path, help="checkpoints and generated data (default: a temp folder)")
    args = parser.parse_args(argv)
    path = args.json or HERE / "results" / f"graph_check_{datetime.date.today().isoformat()}.json"
    report = IncrementalJson(
        path,
        {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": args.device,
            "torch": torch.__version__,
            "args": {k: str(v) for k, v in vars(args).items()},
            "batches": [],
        },
    )
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        report.update(error="needs CUDA (or --device cpu)")
        print("check_graph: needs CUDA (or --device cpu)", file=sys.stderr)
        return 2
    if args.device.startswith("cuda"):
        report.update(gpu=torch.cuda.get_device_name())
    work = args.work or Path(tempfile.mkdtemp(prefix="check_graph_"))
    work.mkdir(parents=True, exist_ok=True)
    root, data_name = dataroot(work, 32 if args.tiny else args.size)
    report.update(data=data_name)
    ok = True
    for batch in args.batch:
        record: dict[str, Any] = {"batch": batch, "status": "running"}
        report.append("batches", record)
        try:
            check(args, batch, root, work, record, report.write)
            record["status"] = "done"
            ok &= bool(record["check"]["passed"] and record["losses_finite"])
        except Exception as error:  # fail soft: the next batch may still run
            record["status"] = "failed"
            record["error"] = f"{type(error).__name__}: {error}"[:1000]
            record["traceback"] = traceback.format_exc()[-3000:]
            ok = False
        report.write()
        brief = {k: v for k, v in record.items() if k not in ("raw_ms", "profile", "traceback")}
        print(brief, flush=True)
        if "profile" in record and "families" in record["profile"]:
            for label, row in record["profile"]["families"].items():
                print(f"  {label:<36} {row['count_per_iteration']:8.1f} x {row['us_per_iteration']:10.1f} us")
    print(f"wrote {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
