"""Inference benchmark: the official generator in eager PyTorch against fastpix2pix's engines, interleaved.

One unet_256 forward per row and round, for every (protocol, size, batch) configuration. Rows:

- ``official_eager``: the official network structure (the nested containers and in-place activations of
  junyanz/pytorch-CycleGAN-and-pix2pix, re-created in ``tests/test_models.py``) in eval() (protocol
  ``eval``: running statistics) or train() mode (protocol ``paper``: the test batch's statistics), under
  ``torch.no_grad()``. What users of the official code run: the baseline of every ratio.
- ``torch_engine``: what ``fastpix2pix predict/test --engine torch`` runs (``inference.build_engine``).
- ``onnxruntime_engine``: ``--engine onnxruntime``: the generator exported to ONNX, in an ONNX Runtime
  session (CPU provider), tensors converted to and from numpy in the call. The paper protocol's export
  takes batch 1 only, so that row is absent at batch 8.
- candidates the torch engine was chosen from (``--rows``): ``folded_nchw``/``folded_cl`` (BatchNorm
  folded, eager, NCHW / channels_last), ``jit_freeze_cl`` (``torch.jit.trace`` + ``freeze``),
  ``inductor_cl`` (``torch.compile`` with freezing; compiled per shape, its compile time in ``first_s``),
  ``fused_nchw``/``fused_cl`` (paper: the fused ops in train mode), ``instance_cl`` (paper, batch 1:
  instance norm with BatchNorm's affine, eager channels_last).

No dropout anywhere (the official network is built without it, the engines' generator too): every row
computes the same function, checked on the first call (``max_abs_diff_vs_baseline``). Weights: the
official initialisation, with running statistics from two train-mode batches (as a trained network's
match its activations). Rows are built first (``first_s``: build + first call), warmed up, then timed
round by round, every row once per round, the order rotated each round (A B C, B C A, ...) so that drift
from other jobs on a shared machine hits all rows alike; a round in which other processes used more than
``--max-others`` of the CPU is discarded and repeated. Reported: medians with 20th/80th percentiles,
images/s, GFLOP/s and the fraction of the float32 FMA peak, and the median (20th/80th percentiles) of
the per-round ratios baseline time / row time.

    python benchmarks/bench_inference.py --threads 2 --rounds 10 --wait-quiet 300
    python benchmarks/bench_inference.py --sizes 256 --batches 1 --protocols eval --rows official_eager \\
        torch_engine onnxruntime_engine folded_nchw folded_cl jit_freeze_cl inductor_cl

Writes ``benchmarks/results/inference_cpu_<date><tag>.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness, official_networks: beside this file
from harness import (  # the machine probes and the interleaved rounds, shared
    cpu_info,
    cpu_peak_gflops,
    environment,
    heavy_processes,
    interleaved_rounds,
    round_statistics,
    wait_until_quiet,
)
from official_networks import official_G, official_init

from fastpix2pix.inference.deploy_net import deploy_network
from fastpix2pix.inference.run import build_engine
from fastpix2pix.models import convert_official_state_dict, define_G

RESULTS = Path(__file__).parent / "results"
BASELINE = "official_eager"
ROWS = ["official_eager", "torch_engine", "onnxruntime_engine"]
ONLY = {"folded_nchw": "eval", "folded_cl": "eval", "jit_freeze_cl": "eval", "inductor_cl": "eval",
        "fused_nchw": "paper", "fused_cl": "paper", "instance_cl": "paper"}  # fmt: skip
GFLOP_256 = 12.10  # one unet_256 forward at 256x256 (docs/performance.md); scales with the pixel count


@dataclass
class Row:
    name: str
    run: Callable[[], Any]  # one forward of the configuration's batch
    first_s: float  # build + first call (compilation, export, session creation)
    output: torch.Tensor


def official_network(protocol: str, seed: int = 0) -> nn.Module:
    """Official unet_256 (no dropout), official init, running statistics from two random batches."""
    torch.manual_seed(seed)
    net = official_init(official_G("unet_256", 64, "batch", dropout=False))
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # cumulative average of the two batches
    with torch.no_grad():
        for i in range(2):
            net.train()(torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(100 + i)))
    return net.train(protocol == "paper")


def fastpix2pix_generator(official: nn.Module) -> nn.Module:
    """The fastpix2pix unet_256 (default backend) holding the official network's weights, no dropout."""
    G = define_G("unet_256", use_dropout=False)
    G.load_state_dict(convert_official_state_dict(official.state_dict(), "unet_256"))
    return G


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def build_callable(name: str, official: nn.Module, protocol: str, x: torch.Tensor) -> Callable[[], Any]:
    """The row's forward as a no-argument callable (built here; compiled ones compile on first call)."""
    eval_mode = protocol == "eval"
    if name == BASELINE:
        return lambda: official(x)
    G = fastpix2pix_generator(official)
    if name in ("torch_engine", "onnxruntime_engine"):
        engine = build_engine(
            G, name.removesuffix("_engine"), eval_mode=eval_mode, device=x.device, batch_size=x.shape[0]
        )
        return lambda: engine(x)
    xcl = _channels_last(x)
    if name.startswith("fused_") and not eval_mode:
        G.set_backend("fused").train()
        if name == "fused_cl":
            G.to(memory_format=torch.channels_last)
            return lambda: G(xcl)
        return lambda: G(x)
    if name == "instance_cl" and not eval_mode:
        net = deploy_network(G, "paper").to(memory_format=torch.channels_last)
        return lambda: net(xcl)
    if not eval_mode:
        raise ValueError(f"row {name} is for the eval protocol")
    net = deploy_network(G, "eval")
    if name == "folded_nchw":
        return lambda: net(x)
    net = net.to(memory_format=torch.channels_last)
    if name == "folded_cl":
        return lambda: net(xcl)
    if name == "jit_freeze_cl":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            frozen = torch.jit.freeze(torch.jit.trace(net, xcl))
        return lambda: frozen(xcl)
    if name == "inductor_cl":
        compiled = torch.compile(net, dynamic=False, options={"freezing": True})
        return lambda: compiled(xcl)
    raise ValueError(f"unknown row {name!r}")


def build_row(name: str, official: nn.Module, protocol: str, x: torch.Tensor) -> Row:
    started = time.perf_counter()
    run = build_callable(name, official, protocol, x)
    with torch.no_grad():
        output = torch.as_tensor(run()).float()
    return Row(name, run, time.perf_counter() - started, output)


def measure_config(args: argparse.Namespace, protocol: str, size: int, batch: int) -> dict[str, Any]:
    """Build, check and time every row for one configuration."""
    official = official_network(protocol)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(7))
    rows, skipped = [], []
    for name in args.rows:
        if ONLY.get(name, protocol) != protocol:
            continue  # a candidate of the other protocol
        if name == "onnxruntime_engine" and protocol == "paper" and batch != 1:
            skipped.append({"row": name, "skipped": "the paper protocol's ONNX export takes batch 1 only"})
            continue
        try:
            rows.append(build_row(name, official, protocol, x))
        except Exception as error:  # a failing candidate must not lose the others
            skipped.append({"row": name, "skipped": f"{type(error).__name__}: {error}"[:400]})
    base_output = rows[0].output
    with torch.no_grad():
        for _ in range(args.warmup):
            for row in rows:
                row.run()
        times, shares, discarded, _ = interleaved_rounds(
            rows, _time_call, rounds=args.rounds, min_rounds=args.min_rounds, max_seconds=args.max_seconds,
            max_others=args.max_others, pause_s=3, max_discards=20,
        )  # fmt: skip
    gflop = GFLOP_256 * batch * (size / 256) ** 2
    return {
        "protocol": protocol,
        "size": size,
        "batch": batch,
        "gflop_per_call": gflop,
        "rounds_counted": len(shares),
        "rounds_discarded": len(discarded),
        "others_cpu_share_per_round": shares,
        "rows": [summarise(row, times, base_output, batch, gflop, args) for row in rows] + skipped,
    }


def _time_call(row: Row) -> float:
    start = time.perf_counter()
    row.run()
    return (time.perf_counter() - start) * 1e3


def summarise(
    row: Row, times: dict[str, list[float]], base_output: torch.Tensor, batch: int, gflop: float, args
) -> dict[str, Any]:
    return {
        "row": row.name,
        **round_statistics(times[row.name], times[BASELINE], batch, gflop, args.peak),
        "first_s": row.first_s,
        "max_abs_diff_vs_baseline": float((row.output - base_output).abs().max()),
    }


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| protocol | size | batch | row | median ms [p20, p80] | images/s | vs official eager, per round "
        "[p20, p80] | first call s | max abs diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        for r in res["rows"]:
            head = f"| {res['protocol']} | {res['size']} | {res['batch']} | {r['row']} |"
            if "skipped" in r:
                lines.append(f"{head} {r['skipped']} | | | | |")
                continue
            ms = f"{r['median_ms']:.0f} [{r['p20_ms']:.0f}, {r['p80_ms']:.0f}]"
            ratio = (
                f"{r['ratio_vs_baseline_median_of_rounds']:.2f}x [{r['ratio_vs_baseline_p20']:.2f}, "
                f"{r['ratio_vs_baseline_p80']:.2f}]"
            )
            lines.append(
                f"{head} {ms} | {r['images_per_s']:.2f} | {ratio} | {r['first_s']:.1f} | "
                f"{r['max_abs_diff_vs_baseline']:.1e} |"
            )
    return "\n".join(lines)


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"numpy": np.__version__}
    for name in ("onnx", "onnxruntime", "onnxscript"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--protocols", nargs="+", default=["eval", "paper"], choices=["eval", "paper"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rows", nargs="+", default=ROWS, help=f"default: {ROWS} (baseline always first)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (ONNX Runtime: its default)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds per configuration, at most")
    parser.add_argument("--min-rounds", type=int, default=5, help="timed rounds per configuration, at least")
    parser.add_argument(
        "--max-seconds", type=float, default=60, help="time budget of a configuration's rounds"
    )
    parser.add_argument("--max-others", type=float, default=0.25, help="discard rounds above this CPU share")
    parser.add_argument("--wait-quiet", type=float, default=0, help="seconds to wait for a quiet machine")
    parser.add_argument("--tag", default="", help="appended to the JSON file name")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.rows = [BASELINE, *[r for r in args.rows if r != BASELINE]]
    if args.threads:
        torch.set_num_threads(args.threads)
    args.peak = cpu_peak_gflops(torch.get_num_threads(), cpu_info())
    report: dict[str, Any] = {"environment": environment(torch.device("cpu"), args), "cpu_peak": args.peak}
    report["environment"]["export_versions"] = versions()
    report["quiet_before"] = (
        wait_until_quiet(args.wait_quiet) if args.wait_quiet else {"heavy": heavy_processes()}
    )
    results = []
    for protocol in args.protocols:
        for size in args.sizes:
            for batch in args.batches:
                print(f"{protocol} {size}px batch {batch}:", flush=True)
                results.append(measure_config(args, protocol, size, batch))
    report["results"] = results
    report["heavy_after"] = heavy_processes()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"inference_cpu_{datetime.date.today().isoformat()}{args.tag}.json"
    path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(table(results))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
