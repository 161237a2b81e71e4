"""Training-iteration benchmark: eager baselines, torch.compile, and the fastpix2pix fast path, in one run.

Rows (each at every ``--batch``): ``eager_fp32`` (official semantics: reference ops, for-loop Adam,
cudnn.benchmark on, TF32 as PyTorch defaults), ``eager_bf16_cl_fusedadam``, ``compile_default``,
``compile_max_autotune`` / ``compile_reduce_overhead`` (torch.compile of the reference train_step), and
``fast_path`` (fused ops + FastStep: bf16, channels_last, fused Adam, one CUDA graph per iteration).
Every row uses random data from a rotating set of static batches (never zeros).

    python benchmarks/bench_train.py --device cuda --batch 1 16 --plot
    python benchmarks/bench_train.py --device cpu --quick --netG unet_128 --size 128
    python benchmarks/bench_train.py --device cuda --time-to-train --dataroot datasets/facades --epochs 2

Writes ``benchmarks/results/train_<device>_<date>.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fastpix2pix.backend import extension_available
from fastpix2pix.fast_train import FastPathConfig, FastStep, build_fast_optimizers
from fastpix2pix.options import TrainOptions
from fastpix2pix.train import Networks, Objective, build_networks, build_optimizers, train_step

GFLOP_PER_IMAGE = 86.94  # unet_256 + 70x70 PatchGAN at 256 px (docs/performance.md)
FLOOR_MS = {1: 0.8, 16: 2.5}  # H100, bf16 (docs/performance.md)
RESULTS = Path(__file__).parent / "results"
ROTATE = 4  # static batches cycled through (unet_256 batch 16: 4 x 2 x 12.6 MB, beyond one L2 fill)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_iterations(run: Callable[[], None], device: torch.device, warmup: int, iters: int) -> list[float]:
    """Per-iteration milliseconds: CUDA events on the GPU, perf_counter (after a sync) on the CPU."""
    for _ in range(warmup):
        run()
    sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def peak_memory_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def make_batches(args: argparse.Namespace, batch: int, device: torch.device, channels_last: bool) -> list:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gen = torch.Generator().manual_seed(0)
    shape = (batch, 3, args.size, args.size)
    return [
        tuple(
            (torch.rand(shape, generator=gen) * 2 - 1).to(device).contiguous(memory_format=fmt) for _ in "AB"
        )
        for _ in range(ROTATE)
    ]


def build(args: argparse.Namespace, backend: str, device: torch.device) -> Networks:
    opt = TrainOptions(netG=args.netG, backend=backend, device=str(device))
    torch.manual_seed(0)
    return build_networks(opt, backend, device)


class Rotation:
    """Copies the next of the rotating batches into static buffers (outside any graph)."""

    def __init__(self, batches: list) -> None:
        self.batches, self.i = batches, 0
        self.A, self.B = (t.clone() for t in batches[0])

    def advance(self) -> None:
        self.i = (self.i + 1) % len(self.batches)
        self.A.copy_(self.batches[self.i][0])
        self.B.copy_(self.batches[self.i][1])


def eager_row(args, device, batch, *, bf16: bool, compile_mode: str | None = None) -> Callable[[], None]:
    """The reference trainer's step (reference ops), optionally bf16+channels_last+fused Adam or compiled."""
    nets = build(args, "reference", device)
    opt = TrainOptions(netG=args.netG)
    if bf16:
        for net in nets:
            net.to(memory_format=torch.channels_last)
        config = FastPathConfig.for_device(device, cuda_graph=False)
        optimizers = build_fast_optimizers(nets, opt, config)
    else:
        optimizers = build_optimizers(nets, opt)
    objective = Objective(backend="reference")
    rotation = Rotation(make_batches(args, batch, device, bf16))
    cast = torch.autocast(device.type, torch.bfloat16) if bf16 else None

    def step(A: torch.Tensor, B: torch.Tensor) -> None:
        if cast is None:
            train_step(nets, optimizers, {"A": A, "B": B}, objective)
        else:
            with torch.autocast(device.type, torch.bfloat16):
                train_step(nets, optimizers, {"A": A, "B": B}, objective)

    fn = (
        step
        if compile_mode is None
        else torch.compile(step, mode=None if compile_mode == "default" else compile_mode)
    )

    def run() -> None:
        rotation.advance()
        fn(rotation.A, rotation.B)

    return run


def fast_row(args, device, batch) -> Callable[[], None]:
    backend = "fused" if extension_available() else "reference"
    nets = build(args, backend, device)
    config = FastPathConfig.for_device(device, loss_readback_every=1 << 20)
    for net in nets:
        net.to(memory_format=torch.channels_last if config.channels_last else torch.contiguous_format)
    optimizers = build_fast_optimizers(nets, TrainOptions(netG=args.netG), config)
    if config.cuda_graph:
        from fastpix2pix.fast_train import use_device_lr

        for optimizer in optimizers:
            use_device_lr(optimizer)
    rotation = Rotation(make_batches(args, batch, device, config.channels_last))
    step = FastStep(nets, optimizers, Objective(backend=backend), lambda: (rotation.A, rotation.B),
                    bf16=config.bf16, loss_rows=1 << 20)  # fmt: skip
    if config.cuda_graph:
        step.capture()

    def run() -> None:
        rotation.advance()
        if step.pending >= step.losses.shape[0] - 1:
            step.take_losses()
        step()

    return run


ROWS: dict[str, Callable[..., Callable[[], None]]] = {
    "eager_fp32": lambda a, d, b: eager_row(a, d, b, bf16=False),
    "eager_bf16_cl_fusedadam": lambda a, d, b: eager_row(a, d, b, bf16=True),
    "compile_default": lambda a, d, b: eager_row(a, d, b, bf16=False, compile_mode="default"),
    "compile_max_autotune": lambda a, d, b: eager_row(a, d, b, bf16=False, compile_mode="max-autotune"),
    "compile_reduce_overhead": lambda a, d, b: eager_row(a, d, b, bf16=False, compile_mode="reduce-overhead"),
    "fast_path": fast_row,
}


def measure(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    results = []
    rows = args.rows or list(ROWS)
    for batch in args.batch:
        for name in rows:
            record: dict[str, Any] = {"row": name, "batch": batch}
            if name.startswith("compile") and device.type == "cpu" and not args.compile_on_cpu:
                record["skipped"] = "torch.compile rows skipped on CPU (minutes of compilation on 2 cores)"
                results.append(record)
                continue
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            try:
                run = ROWS[name](args, device, batch)
                times = time_iterations(run, device, args.warmup, args.iters)
            except Exception as error:  # a failing row must not lose the others
                record["skipped"] = f"{type(error).__name__}: {error}"[:500]
                results.append(record)
                continue
            qs = statistics.quantiles(times, n=10)
            median = statistics.median(times)
            record |= {
                "median_ms": median, "p20_ms": qs[1], "p80_ms": qs[7], "images_per_s": batch * 1e3 / median,
                "raw_ms": times,
                "peak_mem_mb": peak_memory_mb(device),
            }  # fmt: skip
            results.append(record)
            print(f"{name} batch {batch}: {median:.2f} ms", flush=True)
    add_ratios(results, device, args)
    return results


def add_ratios(results: list[dict[str, Any]], device: torch.device, args: argparse.Namespace) -> None:
    for batch in {r["batch"] for r in results}:
        timed = {r["row"]: r for r in results if r["batch"] == batch and "median_ms" in r}
        base = timed.get("eager_fp32")
        compiled = [r["median_ms"] for n, r in timed.items() if n.startswith("compile")]
        for r in timed.values():
            r["speedup_vs_eager_fp32"] = base["median_ms"] / r["median_ms"] if base else None
            r["speedup_vs_best_compile"] = min(compiled) / r["median_ms"] if compiled else None
            standard = args.netG == "unet_256" and args.size == 256 and device.type == "cuda"
            floor = FLOOR_MS.get(batch)
            r["fraction_of_floor"] = floor / r["median_ms"] if standard and floor else None


def table(results: list[dict[str, Any]]) -> str:
    def f(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    lines = [
        "| row | batch | median ms (p20-p80) | img/s | peak MB | x eager fp32 | x best compile | of floor |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "median_ms" not in r:
            lines.append(f"| {r['row']} | {r['batch']} | skipped: {r['skipped'][:80]} | | | | | |")
            continue
        lines.append(
            f"| {r['row']} | {r['batch']} | {r['median_ms']:.2f} ({r['p20_ms']:.2f}-{r['p80_ms']:.2f}) | "
            f"{r['images_per_s']:.1f} | {f(r['peak_mem_mb'], '.0f')} | "
            f"{f(r['speedup_vs_eager_fp32'], '.2f')} | "
            f"{f(r['speedup_vs_best_compile'], '.2f')} | {f(r['fraction_of_floor'], '.2f')} |"
        )
    return "\n".join(lines)


def backend_for(row: str) -> str:
    return "fused" if row == "fast_path" and extension_available() else "reference"


def time_to_train(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Wall time of ``--epochs`` epochs of the facades recipe, fast path vs the plain trainer (measured)."""
    from fastpix2pix.fast_train import FastTrainer
    from fastpix2pix.train import Trainer

    out: dict[str, Any] = {"epochs": args.epochs, "dataroot": args.dataroot}
    for name in ("fast_path", "eager_fp32"):
        opt = TrainOptions(dataroot=args.dataroot, direction="BtoA", name=f"ttt_{name}", device=str(device),
                           checkpoints_dir="/tmp/bench_ttt", n_epochs=args.epochs, n_epochs_decay=0,
                           save_epoch_freq=0, save_latest_freq=10**9, display_freq=10**9, seed=0,
                           backend=backend_for(name))  # fmt: skip
        trainer = (
            FastTrainer(opt, progress_bar=False) if name == "fast_path" else Trainer(opt, progress_bar=False)
        )
        sync(device)
        t0 = time.perf_counter()
        trainer.fit()
        sync(device)
        out[name] = {"seconds": time.perf_counter() - t0, "iterations": trainer.state.iteration}
    return out


def environment(device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    try:
        from fastpix2pix import info

        versions = info.collect()
    except Exception as error:
        versions = {"error": repr(error)}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True).stdout)
    return {
        "machine": platform.node(), "cpu": platform.processor(), "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "versions": versions, "git_commit": commit, "git_dirty": dirty,
        "date": datetime.datetime.now(datetime.UTC).isoformat(), "config": vars(args),
        "tf32_cudnn": torch.backends.cudnn.allow_tf32, "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
    }  # fmt: skip


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in results if "median_ms" in r]
    fig, ax = plt.subplots(figsize=(10, 4))
    labels = [f"{r['row']}\nb{r['batch']}" for r in timed]
    ax.bar(labels, [r["images_per_s"] for r in timed])
    ax.set_ylabel("images / s")
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--netG", default="unet_256")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rows", nargs="*", choices=list(ROWS))
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="batch 1, 2 warm-up and 10 timed iterations")
    parser.add_argument("--compile-on-cpu", action="store_true")
    parser.add_argument("--time-to-train", action="store_true")
    parser.add_argument("--dataroot", default="datasets/facades")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--plot", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the JSON (default: %(default)s)")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.warmup, args.iters = [1], 2, 10
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True  # official eager semantics at fixed shapes; TF32 left at defaults
    report: dict[str, Any] = {"environment": environment(device, args)}
    if args.time_to_train:
        report["time_to_train"] = time_to_train(args, device)
        print(json.dumps(report["time_to_train"], indent=1))
    else:
        report["results"] = measure(args, device)
        print(table(report["results"]))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"train_{device.type}_{datetime.date.today().isoformat()}"
    path = args.out / f"{stem}{'_ttt' if args.time_to_train else ''}.json"
    path.write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {path}")
    if args.plot and "results" in report:
        plot(report["results"], path.with_suffix(".png"))


if __name__ == "__main__":
    main()
