"""Inference benchmark: the official generator in eager PyTorch against fastpix2pix's engines, interleaved.

One unet_256 forward per row and round, for every (protocol, size, batch) configuration. Rows:

- ``official_eager``: the official network structure (the nested containers and in-place activations of
  junyanz/pytorch-CycleGAN-and-pix2pix, re-created in ``tests/test_models.py``) in eval() (protocol
  ``eval``: running statistics) or train() mode (protocol ``paper``: the test batch's statistics), under
  ``torch.no_grad()``. What users of the official code run: the baseline of every ratio.
- ``torch_engine``: what ``fastpix2pix predict/test --engine torch --precision fp32`` runs
  (``inference.build_engine``).
- ``torch_engine_bf16``: the same in bfloat16 (``--precision bf16``: oneDNN bf16 convolutions, AMX or
  AVX512-BF16 where the CPU has them, emulated elsewhere); ``auto`` picks it where bf16 is the faster.
- ``onnxruntime_engine``: ``--engine onnxruntime``: the generator exported to ONNX, in an ONNX Runtime
  session (CPU provider), tensors converted to and from numpy in the call. The paper protocol's export
  takes batch 1 only, so that row is absent at batch 8.
- ``openvino``: the ONNX file ``fastpix2pix export`` writes, compiled by OpenVINO for the CPU at its default
  precision (bf16 where the CPU has AMX or AVX512-BF16: the row records which) with ``--threads`` inference
  threads, numpy in and out in the call. OpenVINO is optional (``pip install openvino``, or the
  ``[openvino]`` extra): without it the row says so. Batch 1 only under the paper protocol, as above.
- candidates the torch engine was chosen from (``--rows``): ``folded_nchw``/``folded_cl`` (BatchNorm
  folded, eager, NCHW / channels_last), ``jit_freeze_cl`` (``torch.jit.trace`` + ``freeze``),
  ``inductor_cl`` (``torch.compile`` with freezing; compiled per shape, its compile time in ``first_s``),
  ``fused_nchw``/``fused_cl`` (paper: the fused ops in train mode), ``instance_cl`` (paper, batch 1:
  instance norm with BatchNorm's affine, eager channels_last), ``torch_engine_bf16_all`` (bf16 with the
  first and last convolutions in bf16 too), ``autocast_bf16_cl`` (eval: the folded network under
  ``torch.autocast("cpu", torch.bfloat16)``, channels_last), ``openvino_f32`` (OpenVINO told to compute
  float32: ``INFERENCE_PRECISION_HINT f32``).

No dropout anywhere (the official network is built without it, the engines' generator too): every row
computes the same function, checked on the first call (``max_abs_diff_vs_baseline``, and the PSNR of the
output as an image in [0, 1] against the baseline's and the float32 engine's: bf16 rows differ by their
rounding). Weights: the official initialisation, with running statistics from two train-mode batches (as
a trained network's match its activations). Inputs: random, or with ``--facades DIR`` the label maps of
the facades test split (resized to the size; the statistics then come from train-split label maps).
Rows are built first (``first_s``: build + first call), warmed up, then timed round by round, every row
once per round, the order rotated each round (A B C, B C A, ...) so that drift from other jobs on a
shared machine hits all rows alike; a round in which other processes used more than
``--max-others`` of the CPU is discarded and repeated. Reported: medians with 20th/80th percentiles,
images/s, GFLOP/s and the fraction of the float32 FMA peak, and the median (20th/80th percentiles) of
the per-round ratios baseline time / row time.

    python benchmarks/bench_inference.py --threads 2 --rounds 10 --wait-quiet 300
    python benchmarks/bench_inference.py --threads 2 --protocols eval --sizes 256 \\
        --facades ../shared/data/facades --rows official_eager torch_engine torch_engine_bf16 openvino
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
import torch.nn.functional as F
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

from fastpix2pix.data import read_image, to_tensor
from fastpix2pix.inference.deploy_net import deploy_network, has_batch_norm
from fastpix2pix.inference.engines import torch_network
from fastpix2pix.inference.export import onnx_model_bytes
from fastpix2pix.inference.run import build_engine
from fastpix2pix.models import convert_official_state_dict, define_G

RESULTS = Path(__file__).parent / "results"
BASELINE = "official_eager"
FLOAT32_ENGINE = "torch_engine"
ROWS = ["official_eager", "torch_engine", "torch_engine_bf16", "onnxruntime_engine", "openvino"]
ONLY = {"folded_nchw": "eval", "folded_cl": "eval", "jit_freeze_cl": "eval", "inductor_cl": "eval",
        "autocast_bf16_cl": "eval", "fused_nchw": "paper", "fused_cl": "paper",
        "instance_cl": "paper"}  # fmt: skip
BATCH_1_EXPORTS = (
    "onnxruntime_engine",
    "openvino",
    "openvino_f32",
)  # the paper protocol's ONNX export takes batch 1
GFLOP_256 = 12.10  # one unet_256 forward at 256x256 (docs/performance.md); scales with the pixel count


@dataclass
class Row:
    name: str
    run: Callable[[], Any]  # one forward of the configuration's batch
    first_s: float  # build + first call (compilation, export, session creation)
    output: torch.Tensor
    facts: dict[str, Any] | None = None  # what the row chose (OpenVINO's precision, ...)


def official_network(protocol: str, seed: int = 0, stats: list[torch.Tensor] | None = None) -> nn.Module:
    """Official unet_256 (no dropout), official init, running statistics from two batches: ``stats``, else
    random ones."""
    torch.manual_seed(seed)
    net = official_init(official_G("unet_256", 64, "batch", dropout=False))
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # cumulative average of the two batches
    if stats is None:
        stats = [
            torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(100 + i)) for i in range(2)
        ]
    with torch.no_grad():
        for batch in stats:
            net.train()(batch)
    return net.train(protocol == "paper")


def facades_labels(root: Path, split: str, count: int, size: int, skip: int = 0) -> torch.Tensor:
    """``count`` label maps (the right half: the BtoA input) of ``root/split``, in [-1, 1], at ``size`` px
    (bilinear; the facades halves are 256 px). Cycles through the split when it has fewer."""
    paths = sorted((root / split).glob("*.jpg"), key=lambda p: int(p.stem) if p.stem.isdigit() else 0)
    if not paths:
        raise FileNotFoundError(f"no facades images in {root / split}")
    halves = []
    for i in range(count):
        image = read_image(paths[(skip + i) % len(paths)])
        halves.append(to_tensor(np.ascontiguousarray(image[:, image.shape[1] // 2 :])))
    x = torch.stack(halves)
    return x if x.shape[-1] == size else F.interpolate(x, size=(size, size), mode="bilinear")


def psnr_db(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of two generator outputs in [-1, 1], as images in [0, 1]."""
    mse = float((((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2) ** 2).mean())
    return float("inf") if mse == 0 else 10 * float(np.log10(1 / mse))


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
    if name in ("torch_engine", "torch_engine_bf16", "onnxruntime_engine"):
        engine_name, precision = name.removesuffix("_bf16").removesuffix("_engine"), "fp32"
        if name.endswith("_bf16"):
            precision = "bf16"
        engine = build_engine(
            G, engine_name, eval_mode=eval_mode, device=x.device, batch_size=x.shape[0], precision=precision
        )
        return lambda: engine(x)
    if name in ("openvino", "openvino_f32"):
        return openvino_callable(G, eval_mode, x, torch.get_num_threads(), float32=name.endswith("_f32"))
    xcl = _channels_last(x)
    if name == "torch_engine_bf16_all":
        net = torch_network(G, eval_mode, x.device, "bf16", float32_ends=False)
        return lambda: net(xcl).float()
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
    if name == "autocast_bf16_cl":

        def autocast() -> torch.Tensor:
            with torch.autocast("cpu", torch.bfloat16):
                return net(xcl).float()

        return autocast
    raise ValueError(f"unknown row {name!r}")


class OpenVinoUnavailable(Exception):
    """OpenVINO is not installed: the row is skipped, saying so."""


def openvino_callable(
    G: nn.Module, eval_mode: bool, x: torch.Tensor, threads: int, float32: bool = False
) -> Callable[[], Any]:
    """The ONNX export (as ``fastpix2pix export`` writes it) compiled by OpenVINO for the CPU, at its
    default precision (``float32``: told to compute float32), ``threads`` inference threads; the call
    converts to and from numpy. Its ``facts``: the precision OpenVINO computed in and its version."""
    try:
        import openvino
    except ImportError as error:
        raise OpenVinoUnavailable(
            f"openvino is not installed ({error}): an optional dependency, pip install openvino "
            "(or the [openvino] extra)"
        ) from None
    protocol = "eval" if eval_mode else "paper"
    net = deploy_network(G, protocol).float()
    model = onnx_model_bytes(net, eval_mode or not has_batch_norm(G))
    core = openvino.Core()
    config: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads}
    if float32:
        config["INFERENCE_PRECISION_HINT"] = "f32"
    compiled = core.compile_model(core.read_model(model=model, weights=b""), "CPU", config)
    request = compiled.create_infer_request()
    output = compiled.output(0)

    def run() -> torch.Tensor:
        return torch.from_numpy(request.infer({0: x.numpy()})[output].copy())

    run.facts = {  # type: ignore[attr-defined]
        "openvino": openvino.__version__,
        "inference_precision": _type_name(compiled.get_property("INFERENCE_PRECISION_HINT")),
        "threads": compiled.get_property("INFERENCE_NUM_THREADS"),
        "device": core.get_property("CPU", "FULL_DEVICE_NAME"),
        "capabilities": core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"),
    }
    return run


def _type_name(value: Any) -> str:
    """An OpenVINO element type as its short name (``bf16``, ``f32``)."""
    name = getattr(value, "get_type_name", None)
    return str(name() if name else value)


def build_row(name: str, official: nn.Module, protocol: str, x: torch.Tensor) -> Row:
    started = time.perf_counter()
    run = build_callable(name, official, protocol, x)
    with torch.no_grad():
        output = torch.as_tensor(run()).float()
    return Row(name, run, time.perf_counter() - started, output, getattr(run, "facts", None))


def inputs_for(
    args: argparse.Namespace, size: int, batch: int
) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """The configuration's input batch and the batches the running statistics come from (None: random)."""
    if args.facades is None:
        return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(7)), None
    stats = [facades_labels(args.facades, "train", 2, 256, skip=2 * i) for i in range(2)]
    return facades_labels(args.facades, "test", batch, size), stats


def measure_config(args: argparse.Namespace, protocol: str, size: int, batch: int) -> dict[str, Any]:
    """Build, check and time every row for one configuration."""
    x, stats = inputs_for(args, size, batch)
    official = official_network(protocol, stats=stats)
    rows, skipped = [], []
    for name in args.rows:
        if ONLY.get(name, protocol) != protocol:
            continue  # a candidate of the other protocol
        if name in BATCH_1_EXPORTS and protocol == "paper" and batch != 1:
            skipped.append({"row": name, "skipped": "the paper protocol's ONNX export takes batch 1 only"})
            continue
        try:
            rows.append(build_row(name, official, protocol, x))
        except OpenVinoUnavailable as error:
            skipped.append({"row": name, "skipped": str(error)})
        except Exception as error:  # a failing candidate must not lose the others
            skipped.append({"row": name, "skipped": f"{type(error).__name__}: {error}"[:400]})
    base_output = rows[0].output
    float32_output = next((row.output for row in rows if row.name == FLOAT32_ENGINE), None)
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
        "input": "random" if args.facades is None else f"facades label maps ({args.facades})",
        "rows": [summarise(row, times, base_output, float32_output, batch, gflop, args) for row in rows]
        + skipped,
    }


def _time_call(row: Row) -> float:
    start = time.perf_counter()
    row.run()
    return (time.perf_counter() - start) * 1e3


def summarise(
    row: Row,
    times: dict[str, list[float]],
    base_output: torch.Tensor,
    float32_output: torch.Tensor | None,
    batch: int,
    gflop: float,
    args: argparse.Namespace,
) -> dict[str, Any]:
    return {
        "row": row.name,
        **round_statistics(times[row.name], times[BASELINE], batch, gflop, args.peak),
        "first_s": row.first_s,
        "max_abs_diff_vs_baseline": float((row.output - base_output).abs().max()),
        "psnr_vs_baseline_db": psnr_db(row.output, base_output),
        "psnr_vs_float32_engine_db": None if float32_output is None else psnr_db(row.output, float32_output),
        **({"facts": row.facts} if row.facts else {}),
    }


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| protocol | size | batch | row | median ms [p20, p80] | images/s | vs official eager, per round "
        "[p20, p80] | first call s | max abs diff | PSNR vs fp32 engine dB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        for r in res["rows"]:
            head = f"| {res['protocol']} | {res['size']} | {res['batch']} | {r['row']} |"
            if "skipped" in r:
                lines.append(f"{head} {r['skipped']} | | | | | |")
                continue
            ms = f"{r['median_ms']:.0f} [{r['p20_ms']:.0f}, {r['p80_ms']:.0f}]"
            ratio = (
                f"{r['ratio_vs_baseline_median_of_rounds']:.2f}x [{r['ratio_vs_baseline_p20']:.2f}, "
                f"{r['ratio_vs_baseline_p80']:.2f}]"
            )
            quality = r["psnr_vs_float32_engine_db"]
            quality_text = "" if quality is None else "same" if quality == float("inf") else f"{quality:.1f}"
            lines.append(
                f"{head} {ms} | {r['images_per_s']:.2f} | {ratio} | {r['first_s']:.1f} | "
                f"{r['max_abs_diff_vs_baseline']:.1e} | {quality_text} |"
            )
    return "\n".join(lines)


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"numpy": np.__version__}
    for name in ("onnx", "onnxruntime", "onnxscript", "openvino"):
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
    parser.add_argument(
        "--facades",
        type=Path,
        default=None,
        help="inputs: this facades folder's test label maps (else random)",
    )
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
