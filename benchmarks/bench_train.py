"""Training-iteration benchmark: the official code, fastpix2pix's default trainer and variants, interleaved.

One official pix2pix iteration (G forward; D step on fake and real; G step through the updated D; two Adam
steps) per row and round. Rows:

- ``official_eager``: the official network structure (the nested containers and in-place activations of
  junyanz/pytorch-CycleGAN-and-pix2pix, re-created in ``tests/test_models.py``), the official iteration
  (``Pix2PixModel.optimize_parameters``: BCEWithLogitsLoss against expanded targets, L1Loss) and the
  official optimizer (``torch.optim.Adam(params, lr, betas)``, torch's default implementation: the for-loop
  on CPU, foreach on CUDA). The code users would run: the baseline of every ratio.
- ``default``: what ``fastpix2pix train`` runs on this device: the plain trainer (fused ops, the optimizers
  of ``build_optimizers``: fused Adam on CPU, NCHW) where ``use_fast_path`` says no (CPU), else the fast
  path.
- ``ours:<backend>:<layout>:<adam>``: ``train_step`` with backend ``fused``/``reference``, layout
  ``nchw``/``cl`` (channels_last) and Adam ``forloop``/``foreach``/``fused``/``default``
  (``build_optimizers``'s choice): the variants the CPU default was chosen from.
- ``fast_path``: ``FastStep`` with ``FastPathConfig.for_device`` (on CUDA: bf16, channels_last, fused
  Adam, one CUDA graph per iteration; on CPU: float32, NCHW, fused Adam, no graph).
- ``eager_fp32`` (= ``ours:reference:nchw:default``), ``eager_bf16_cl_fusedadam``, ``compile_default``,
  ``compile_max_autotune``, ``compile_reduce_overhead`` (torch.compile of the reference ``train_step``,
  float32), ``compile_bf16_cl_default``, ``compile_bf16_cl_reduce_overhead`` (the same with bf16 autocast,
  channels_last and fused Adam, as the fast path). Compiled with ``dynamic=False``: each batch size gets its
  own static graph (after ``torch._dynamo.reset()``), as a user compiling at that batch size would.

All rows start from the same official-initialised weights and train on the same rotating random batches (never
zeros). Rows are built first, then timed round by round, every row once per round, the row order rotated by
one each round (A B C, B C A, C A B, ...), so that drift from other jobs on a shared machine hits all rows
alike; on CPU a round in which other processes used more than ``--max-others`` of the CPU (from /proc/stat,
minus this process) is discarded, recorded and redone (2 OpenMP threads sharing 2 cores with another job lose
a scheduler time slice, ~8 ms, at every parallel region). Reported: medians, 20th/80th percentiles, the median
(and 20th/80th percentiles) of the per-round ratio baseline time / row time, GFLOP/s and, on CPU, the fraction
of the float32 FMA peak: threads x 2 FMA units x 8 float32 lanes (256-bit) x 2 FLOP x the clock from
``/proc/cpuinfo`` (a KVM guest reports the nominal clock; ``conv_calibration`` records what the largest layer
reaches). The first iteration of each row (same seed for the dropout masks) is compared with the baseline's
losses: the rows compute the same function (channels_last rows draw their dropout masks in another order).
FLOPs per iteration are counted on the baseline with ``torch.utils.flop_counter.FlopCounterMode``.

The JSON records the machine, CPU flags, threads, versions, commit, load before/after and the share of the
CPU other processes used in each counted round. ``--profile ROW`` adds a torch.profiler split of a row's
iteration (convolutions, BN and activations, concatenations, losses, Adam, data, the rest).

    python benchmarks/bench_train.py --device cpu --threads 2 --rounds 15 --wait-quiet 600
    python benchmarks/bench_train.py --device cpu --netG unet_128 --size 128 --rows official_eager default
    python benchmarks/bench_train.py --device cpu --profile official_eager default --wait-quiet 600
    python benchmarks/bench_train.py --device cuda --batch 1 16 --plot
    python benchmarks/bench_train.py --device cuda --time-to-train --dataroot datasets/facades --epochs 2

Writes ``benchmarks/results/train_<device>_<netG>_<size>_<date>.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastpix2pix.models import convert_official_state_dict
from fastpix2pix.ops.backend import default_backend
from fastpix2pix.runs.networks import Networks, build_networks
from fastpix2pix.runs.options import TrainOptions
from fastpix2pix.training.fast_step import (
    FastPathConfig,
    FastStep,
    attach_weight_copies,
    build_fast_optimizers,
)
from fastpix2pix.training.fast_trainer import use_fast_path
from fastpix2pix.training.optim import build_optimizers
from fastpix2pix.training.step import LOSS_NAMES, Objective, Optimizers, train_step

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness, official_networks: beside this file
from harness import (  # the machine probes and the interleaved rounds, shared
    OthersCpu,
    cpu_info,
    cpu_peak_gflops,
    environment,
    heavy_processes,
    interleaved_rounds,
    load_average,
    round_statistics,
    wait_until_quiet,
)
from incremental import IncrementalJson
from official_networks import official_D, official_G, official_init

GFLOP_PER_IMAGE = 86.94  # unet_256 + 70x70 PatchGAN at 256 px (docs/performance.md)
FLOOR_MS = {1: 0.8, 16: 2.5}  # H100, bf16 (docs/performance.md)
RESULTS = Path(__file__).parent / "results"
ROTATE = 4  # static batches cycled through (unet_256 batch 16: 4 x 2 x 12.6 MB, beyond one L2 fill)
BASELINE = "official_eager"
CPU_ROWS = [
    "official_eager",
    "default",
    "fast_path",
    "ours:fused:nchw:forloop",
    "ours:fused:nchw:foreach",
    "ours:fused:nchw:fused",
    "ours:fused:cl:fused",
    "ours:reference:nchw:fused",
]
CUDA_ROWS = ["official_eager", "eager_fp32", "eager_bf16_cl_fusedadam", "compile_default", "fast_path"]
FAST_LOSS_ROWS = 1000  # the fast path's device loss buffer: emptied (no sync) when full
ADAM_KINDS = {"forloop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- the machine (the rest is in harness.py) ------------------------------------------------------------


def conv_calibration(threads: int) -> dict[str, Any]:
    """The float32 rate of the largest discriminator layer's forward convolution (256->512, 4x4, 32x32 in,
    31x31 out: 37% of an iteration's FLOPs), best of 5 quiet runs: what oneDNN reaches on this machine,
    beside the nominal peak (a KVM guest reports its nominal clock; the cores may boost above it)."""
    x, w = torch.randn(1, 256, 32, 32), torch.randn(512, 256, 4, 4)
    flop = 2 * 512 * 31 * 31 * 256 * 16
    best, quiet = float("inf"), 0
    for _ in range(20):
        others = OthersCpu()
        others.start()
        t0 = time.perf_counter()
        for _ in range(10):
            torch.conv2d(x, w, None, 1, 1)
        elapsed = (time.perf_counter() - t0) / 10
        share = others.stop()
        if share is not None and share <= 0.10:
            best, quiet = min(best, elapsed), quiet + 1
            if quiet == 5:
                break
    return {
        "layer": "D.C512 forward, batch 1",
        "threads": threads,
        "gflops": flop / best / 1e9 if quiet else None,
    }


# --- data ----------------------------------------------------------------------------------------------


class Rotation:
    """Copies the next of the rotating batches into static buffers (outside any graph)."""

    def __init__(self, batches: list) -> None:
        self.batches, self.i = batches, 0
        self.A, self.B = (t.clone() for t in batches[0])

    def advance(self) -> None:
        with torch.profiler.record_function("bench::data"):  # the profile's "data" (~1 us otherwise)
            self.i = (self.i + 1) % len(self.batches)
            self.A.copy_(self.batches[self.i][0])
            self.B.copy_(self.batches[self.i][1])


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


# --- the rows -------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One configuration: ``run`` advances the data and trains one iteration; ``first_losses`` are its
    first iteration's (G_GAN, G_L1, D_real, D_fake), from the shared initial weights and dropout seed."""

    name: str
    run: Callable[[], None]
    losses: Callable[[], dict[str, torch.Tensor]]
    note: str = ""
    first_losses: list[float] = field(default_factory=list)


def official_networks(args: argparse.Namespace, device: torch.device) -> Networks:
    """The official structure, initialised as the official code does (seed 0), on ``device``."""
    torch.manual_seed(0)
    G = official_init(official_G(args.netG, 64, "batch", dropout=True))
    D = official_init(official_D("basic", 64, "batch"))
    return Networks(G.to(device), D.to(device))


def our_networks(args: argparse.Namespace, backend: str, device: torch.device) -> Networks:
    """fastpix2pix networks holding the official networks' initial weights (the same function)."""
    opt = TrainOptions(netG=args.netG, backend=backend, device=str(device))
    nets = build_networks(opt, backend, device)
    official = official_networks(args, torch.device("cpu"))
    nets.G.load_state_dict(convert_official_state_dict(official.G.state_dict(), args.netG))
    nets.D.load_state_dict(convert_official_state_dict(official.D.state_dict(), "basic"))
    return nets


class OfficialGANLoss(nn.Module):
    """The official ``GANLoss`` (vanilla): BCEWithLogitsLoss against a target expanded to the prediction."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("real_label", torch.tensor(1.0))
        self.register_buffer("fake_label", torch.tensor(0.0))
        self.loss = nn.BCEWithLogitsLoss()

    def forward(self, prediction: torch.Tensor, target_is_real: bool) -> torch.Tensor:
        target = self.real_label if target_is_real else self.fake_label
        return self.loss(prediction, target.expand_as(prediction))


def official_row(args, device, batch) -> Row:
    """``Pix2PixModel.optimize_parameters`` on the official structure with the official Adam."""
    G, D = official_networks(args, device)
    G.train(), D.train()
    opt = TrainOptions(netG=args.netG)
    optimizer_G = torch.optim.Adam(G.parameters(), lr=opt.lr, betas=(opt.beta1, 0.999))
    optimizer_D = torch.optim.Adam(D.parameters(), lr=opt.lr, betas=(opt.beta1, 0.999))
    criterion_GAN, criterion_L1 = OfficialGANLoss().to(device), nn.L1Loss()
    rotation = Rotation(make_batches(args, batch, device, False))
    last: dict[str, torch.Tensor] = {}

    def set_requires_grad(net: nn.Module, flag: bool) -> None:
        for param in net.parameters():
            param.requires_grad = flag

    def run() -> None:
        rotation.advance()
        real_A, real_B = rotation.A, rotation.B
        fake_B = G(real_A)  # forward()
        set_requires_grad(D, True)
        optimizer_D.zero_grad()
        pred_fake = D(torch.cat((real_A, fake_B), 1).detach())  # backward_D()
        loss_D_fake = criterion_GAN(pred_fake, False)
        pred_real = D(torch.cat((real_A, real_B), 1))
        loss_D_real = criterion_GAN(pred_real, True)
        ((loss_D_fake + loss_D_real) * 0.5).backward()
        optimizer_D.step()
        set_requires_grad(D, False)
        optimizer_G.zero_grad()
        pred_fake = D(torch.cat((real_A, fake_B), 1))  # backward_G()
        loss_G_GAN = criterion_GAN(pred_fake, True)
        loss_G_L1 = criterion_L1(fake_B, real_B) * opt.lambda_L1
        (loss_G_GAN + loss_G_L1).backward()
        optimizer_G.step()
        last.update(G_GAN=loss_G_GAN, G_L1=loss_G_L1, D_real=loss_D_real, D_fake=loss_D_fake)

    adam = "foreach" if device.type == "cuda" else "for-loop"
    return Row(BASELINE, run, lambda: last, f"official structure and iteration, torch default Adam ({adam})")


def adam_optimizers(nets: Networks, opt: TrainOptions, adam: str) -> Optimizers:
    if adam == "default":
        return build_optimizers(nets, opt)
    kwargs = ADAM_KINDS[adam]
    return Optimizers(
        *(torch.optim.Adam(n.parameters(), lr=opt.lr, betas=(opt.beta1, 0.999), **kwargs) for n in nets)
    )


def ours_row(args, device, batch, backend: str, layout: str, adam: str, name: str) -> Row:
    """``train_step`` with a backend, a memory layout and an Adam implementation."""
    if backend not in ("fused", "reference") or layout not in ("nchw", "cl"):
        raise ValueError(f"row {name}: backend fused|reference, layout nchw|cl")
    if adam not in (*ADAM_KINDS, "default"):
        raise ValueError(f"row {name}: adam one of {[*ADAM_KINDS, 'default']}")
    nets = our_networks(args, backend, device)
    channels_last = layout == "cl"
    if channels_last:
        for net in nets:
            net.to(memory_format=torch.channels_last)
    opt = TrainOptions(netG=args.netG)
    optimizers = adam_optimizers(nets, opt, adam)
    objective = Objective(backend=backend)
    rotation = Rotation(make_batches(args, batch, device, channels_last))
    last: dict[str, torch.Tensor] = {}

    def run() -> None:
        rotation.advance()
        last.update(train_step(nets, optimizers, {"A": rotation.A, "B": rotation.B}, objective))

    group = optimizers.G.param_groups[0]
    chosen = (
        "fused" if group.get("fused") else "foreach" if group.get("foreach") else "for-loop/torch default"
    )
    return Row(name, run, lambda: last, f"train_step, {backend} ops, {layout}, Adam {chosen}")


def default_row(args, device, batch) -> Row:
    """What ``fastpix2pix train`` runs here: the plain trainer's pieces, or the fast path."""
    opt = TrainOptions(netG=args.netG, device=str(device))
    if use_fast_path(opt):
        row = fast_row(args, device, batch)
        row.note = "the fast path (the CLI's choice on this device): " + row.note
    else:
        row = ours_row(args, device, batch, default_backend(), "nchw", "default", "default")
        row.note = "the plain trainer (the CLI's choice on this device): " + row.note
    row.name = "default"
    return row


def eager_row(args, device, batch, *, bf16: bool, compile_mode: str | None = None, name: str = "") -> Row:
    """The reference ops' step, optionally bf16+channels_last+fused Adam or compiled."""
    nets = our_networks(args, "reference", device)
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
    last: dict[str, torch.Tensor] = {}

    def step(A: torch.Tensor, B: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.autocast(device.type, torch.bfloat16) if bf16 else contextlib.nullcontext():
            return train_step(nets, optimizers, {"A": A, "B": B}, objective)

    # dynamic=False: the graph of this batch size only, as a user compiling at that size gets (not a
    # dynamic-shape graph reused from another batch size).
    fn = (
        step
        if compile_mode is None
        else torch.compile(step, mode=None if compile_mode == "default" else compile_mode, dynamic=False)
    )

    def run() -> None:
        rotation.advance()
        last.update(fn(rotation.A, rotation.B))

    what = "bf16 autocast, channels_last, fast-path Adam" if bf16 else "fp32, build_optimizers"
    return Row(name, run, lambda: last, f"reference ops, {what}, compile {compile_mode}")


def fast_row(args, device, batch, name: str = "fast_path", **changes: Any) -> Row:
    """FastStep with the device's fast-path defaults, ``changes`` applied (FastPathConfig fields)."""
    backend = default_backend()
    nets = our_networks(args, backend, device)
    config = FastPathConfig.for_device(device, loss_readback_every=FAST_LOSS_ROWS, **changes)
    for net in nets:
        net.to(memory_format=torch.channels_last if config.channels_last else torch.contiguous_format)
    optimizers = build_fast_optimizers(nets, TrainOptions(netG=args.netG), config)
    if config.cuda_graph:
        from fastpix2pix.training.optim import use_device_lr

        for optimizer in optimizers:
            use_device_lr(optimizer)
    rotation = Rotation(make_batches(args, batch, device, config.channels_last))
    attach_weight_copies(nets, optimizers)
    step = FastStep(nets, optimizers, Objective(backend=backend), lambda: (rotation.A, rotation.B),
                    bf16=config.bf16, loss_rows=FAST_LOSS_ROWS,
                    pairs_as_one_batch=config.pairs_as_one_batch)  # fmt: skip
    if config.cuda_graph:
        step.capture()

    def run() -> None:
        rotation.advance()
        if step.pending >= step.losses.shape[0] - 1:
            step.take_losses()
        step()

    def losses() -> dict[str, torch.Tensor]:
        row = step.losses[int(step.slot) - 1] if int(step.slot) else torch.full((4,), float("nan"))
        return dict(zip(LOSS_NAMES, row, strict=True))

    group = optimizers.G.param_groups[0]
    adam = "fused" if group.get("fused") else "foreach" if group.get("foreach") else "for-loop"
    layout = "channels_last" if config.channels_last else "nchw"
    note = (
        f"FastStep, {backend} ops, bf16={config.bf16}, {layout}, Adam {adam}, graph={config.cuda_graph}, "
        f"weight copies={config.weight_copies}, D pairs as one batch={config.pairs_as_one_batch}"
    )
    return Row(name, run, losses, note)


NAMED_ROWS: dict[str, Callable[..., Row]] = {
    BASELINE: official_row,
    "default": default_row,
    "fast_path": fast_row,
    # The bf16 fast path on the CPU (what --precision bf16 trains), with the optimizer's bf16 weight
    # copies (its default) and with per-forward weight casts instead.
    "fast_path_bf16": lambda a, d, b: fast_row(a, d, b, "fast_path_bf16", bf16=True),
    "fast_path_bf16_cast": lambda a, d, b: fast_row(
        a, d, b, "fast_path_bf16_cast", bf16=True, weight_copies=False
    ),
    # D's fake and real pairs as two forwards (as the plain trainer), against the default's one.
    "fast_path_separate_pairs": lambda a, d, b: fast_row(
        a, d, b, "fast_path_separate_pairs", pairs_as_one_batch=False
    ),
    "fast_path_bf16_separate_pairs": lambda a, d, b: fast_row(
        a, d, b, "fast_path_bf16_separate_pairs", bf16=True, pairs_as_one_batch=False
    ),
    "eager_fp32": lambda a, d, b: ours_row(a, d, b, "reference", "nchw", "default", "eager_fp32"),
    "eager_bf16_cl_fusedadam": lambda a, d, b: eager_row(a, d, b, bf16=True, name="eager_bf16_cl_fusedadam"),
    "compile_default": lambda a, d, b: eager_row(
        a, d, b, bf16=False, compile_mode="default", name="compile_default"
    ),
    "compile_max_autotune": lambda a, d, b: eager_row(
        a, d, b, bf16=False, compile_mode="max-autotune", name="compile_max_autotune"
    ),
    "compile_reduce_overhead": lambda a, d, b: eager_row(
        a, d, b, bf16=False, compile_mode="reduce-overhead", name="compile_reduce_overhead"
    ),
    # The fast path's settings (bf16 autocast, channels_last, fused Adam) compiled: its torch.compile rival.
    "compile_bf16_cl_default": lambda a, d, b: eager_row(
        a, d, b, bf16=True, compile_mode="default", name="compile_bf16_cl_default"
    ),
    "compile_bf16_cl_reduce_overhead": lambda a, d, b: eager_row(
        a, d, b, bf16=True, compile_mode="reduce-overhead", name="compile_bf16_cl_reduce_overhead"
    ),
}


def row_name(name: str) -> str:
    """argparse type: a named row or ``ours:<backend>:<layout>:<adam>``."""
    if name in NAMED_ROWS or (name.startswith("ours:") and len(name.split(":")) == 4):
        return name
    raise argparse.ArgumentTypeError(
        f"unknown row {name!r}: one of {list(NAMED_ROWS)} or ours:BACKEND:LAYOUT:ADAM"
    )


def build_row(name: str, args: argparse.Namespace, device: torch.device, batch: int) -> Row:
    if name.startswith("ours:"):
        _, backend, layout, adam = name.split(":")
        return ours_row(args, device, batch, backend, layout, adam, name)
    return NAMED_ROWS[name](args, device, batch)


# --- measuring ------------------------------------------------------------------------------------------


def count_gflop(row: Row) -> float:
    """FLOPs of one iteration of ``row`` (convolutions and matmuls, as FlopCounterMode counts them)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        row.run()
    return counter.get_total_flops() / 1e9


def first_iteration(row: Row, device: torch.device) -> None:
    """The row's first iteration from the shared weights, with the shared dropout seed; keeps its losses."""
    torch.manual_seed(1234)
    row.run()
    sync(device)
    losses = row.losses()
    row.first_losses = [float(losses[name].detach()) for name in LOSS_NAMES]


def time_one(run: Callable[[], None], device: torch.device) -> float:
    """Milliseconds of one call: CUDA events on the GPU, perf_counter (after a sync) on the CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    run()
    return (time.perf_counter() - t0) * 1e3


def measure_batch(
    args: argparse.Namespace,
    device: torch.device,
    batch: int,
    live: dict[str, Any] | None = None,
    save: Callable[..., None] = lambda **_: None,
) -> dict[str, Any]:
    """Build, check, warm up and time the rows at one batch size. ``live`` (returned) is filled as it goes
    and ``save`` called after each row is built, after each row's first iteration (a compile row's compile),
    and after each round (``save(throttle=True)``), so that a kill keeps what was measured."""
    live = {} if live is None else live
    live |= {"batch": batch, "status": "building rows", "rows_built": []}
    names = args.rows or (CUDA_ROWS if device.type == "cuda" else CPU_ROWS)
    if BASELINE not in names:
        names = [BASELINE, *names]
    if any(name.startswith("compile") for name in names):
        torch._dynamo.reset()  # no code object compiled at another batch size is reused
    rows: list[Row] = []
    skipped: list[dict[str, Any]] = []
    live["skipped"] = skipped
    for name in names:
        if name.startswith("compile") and device.type == "cpu" and not args.compile_on_cpu:
            skipped.append({"row": name, "skipped": "torch.compile rows skipped on CPU (--compile-on-cpu)"})
            continue
        start = time.perf_counter()
        try:
            rows.append(build_row(name, args, device, batch))
            live["rows_built"].append({"row": name, "build_s": time.perf_counter() - start})
        except Exception as error:  # a failing row must not lose the others
            skipped.append({"row": name, "skipped": f"{type(error).__name__}: {error}"[:500]})
        save()
    # First iterations (the function check; a compile row compiles here), then the FLOP count on the
    # baseline, then warm-up: all interleaved like the timed rounds.
    live["status"] = "first iterations"
    live["first_iterations"] = first = []
    for row in list(rows):
        start = time.perf_counter()
        try:
            first_iteration(row, device)
            first.append(
                {"row": row.name, "seconds": time.perf_counter() - start, "losses": row.first_losses}
            )
        except Exception as error:
            rows.remove(row)
            skipped.append({"row": row.name, "skipped": f"{type(error).__name__}: {error}"[:500]})
        save()
    if not rows or rows[0].name != BASELINE:
        live["status"] = "no baseline: nothing timed"
        save()
        return live
    gflop = count_gflop(rows[0])
    live |= {"gflop_per_iteration": gflop, "status": "warm-up"}
    for _ in range(args.warmup):
        for row in rows:
            row.run()
    sync(device)
    live["status"] = "timing"
    save()

    def on_round(times: dict[str, list[float]]) -> None:
        live["raw_ms_so_far"] = times
        save(throttle=True)

    times, counted_shares, discarded, timed_s = interleaved_rounds(
        rows, lambda row: time_one(row.run, device), rounds=args.rounds, min_rounds=3,
        max_seconds=args.max_seconds, max_others=args.max_others, pause_s=5, on_round=on_round,
    )  # fmt: skip
    live.pop("raw_ms_so_far", None)
    live |= {
        "status": "done",
        "gflop_per_iteration": gflop,
        "timed_s": timed_s,
        "rounds_counted": len(counted_shares),
        "others_cpu_share_per_counted_round": counted_shares,
        "max_others_cpu_share": args.max_others,
        "rounds_discarded": discarded,
        # All rows live in one process: the peak is theirs together, not one row's.
        "peak_mem_mb_all_rows": torch.cuda.max_memory_allocated(device) / 2**20
        if device.type == "cuda"
        else None,
        "rows": [summarise(row, times, batch, gflop, device, args) for row in rows] + skipped,
    }
    add_loss_differences(live)
    save()
    return live


def summarise(
    row: Row, times: dict[str, list[float]], batch: int, gflop: float, device, args
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "row": row.name,
        "note": row.note,
        **round_statistics(times[row.name], times[BASELINE], batch, gflop, args.peak),
        "first_losses": dict(zip(LOSS_NAMES, row.first_losses, strict=True)),
    }
    standard = args.netG == "unet_256" and args.size == 256 and device.type == "cuda"
    floor = FLOOR_MS.get(batch)
    record["fraction_of_floor"] = floor / record["median_ms"] if standard and floor else None
    return record


def add_loss_differences(result: dict[str, Any]) -> None:
    """Each row's first-iteration losses against the baseline's, as the largest relative difference."""
    timed = [r for r in result["rows"] if "median_ms" in r]
    base = next(r for r in timed if r["row"] == BASELINE)["first_losses"]
    for r in timed:
        r["first_losses_max_rel_diff"] = max(
            abs(r["first_losses"][k] - base[k]) / max(abs(base[k]), 1e-12) for k in LOSS_NAMES
        )


def table(result: dict[str, Any], peak: bool) -> str:
    def f(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    lines = [
        f"batch {result['batch']}, {result['gflop_per_iteration']:.2f} GFLOP/iteration, "
        f"{result['rounds_counted']} rounds counted, {len(result['rounds_discarded'])} discarded (other "
        f"processes above {f(result['max_others_cpu_share'], '.0%')} of the CPU)",
        "",
        "| row | median ms (p20-p80) | img/s | GFLOP/s | of peak | x official, per-round median (p20-p80) "
        "| x official, medians | 1st-iteration losses vs official |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if "median_ms" not in r:
            lines.append(f"| {r['row']} | skipped: {r['skipped'][:80]} | | | | | | |")
            continue
        lines.append(
            f"| `{r['row']}` | {r['median_ms']:.0f} ({r['p20_ms']:.0f}-{r['p80_ms']:.0f}) | "
            f"{r['images_per_s']:.2f} | {r['gflops']:.1f} | "
            f"{f(r['fraction_of_peak'] * 100 if peak and r['fraction_of_peak'] else None, '.0f')}% | "
            f"{r['ratio_vs_baseline_median_of_rounds']:.2f} ({r['ratio_vs_baseline_p20']:.2f}-"
            f"{r['ratio_vs_baseline_p80']:.2f}) | {r['ratio_of_medians']:.2f} | "
            f"{r['first_losses_max_rel_diff']:.1e} |"
        )
    return "\n".join(lines)


# --- the profile ----------------------------------------------------------------------------------------

_BN_KEYS = (
    "bn_",
    "batch_norm",
    "bias_act",
    "relu",
    "threshold",
    "leaky",
    "tanh",
    "dropout",
    "bernoulli",
    "pad",
)
PROFILE_CATEGORIES = (
    ("convolutions", ("convolution", "mkldnn_conv", "conv2d", "conv_transpose", "_nnpack", "slow_conv")),
    (
        "BN + activations + dropout",
        _BN_KEYS,
    ),
    (
        "concatenations (cat, its backward slices)",
        ("aten::cat", "catbackward", "aten::narrow", "aten::slice"),
    ),
    ("losses", ("gan_loss", "l1_loss", "binary_cross_entropy", "aten::l1", "aten::abs", "aten::sgn")),
    ("gradient accumulation (tensors used twice)", ("accumulategrad", "aten::add")),
)


def profile_row(row: Row, device: torch.device, iterations: int, max_others: float | None) -> dict[str, Any]:
    """Where one iteration's time goes, by torch.profiler self time per op: the median per category over
    ``iterations`` profiled iterations in which other processes used at most ``max_others`` of the CPU
    (up to 4x as many attempts; the noisy ones are counted and left out).

    Each op's self time goes to ``Adam`` inside an optimizer step, to ``data`` inside the batch copy, else
    to the category of the innermost op (itself or an enclosing one) whose name matches a category (so
    a copy inside a convolution counts as convolution), else to ``other``. Autograd's own bookkeeping
    (engine, zero_grad, requires_grad flags) is ``other``.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    splits: list[dict[str, float]] = []
    walls: list[float] = []
    best: tuple[float, Any] | None = None
    noisy = 0
    for _ in range(4 * iterations):
        if len(splits) == iterations:
            break
        others = OthersCpu()
        others.start()
        with profile(activities=activities) as prof:
            wall = time_one(row.run, device)
        share = others.stop()
        if max_others is not None and share is not None and share > max_others:
            noisy += 1
            time.sleep(5)
            continue
        split: dict[str, float] = {}
        for event in prof.events():
            if event.self_cpu_time_total > 0:
                category = categorise(event)
                split[category] = split.get(category, 0.0) + event.self_cpu_time_total / 1e3
        splits.append(split)
        walls.append(wall)
        if best is None or wall < best[0]:
            best = (wall, prof)
    if not splits:
        raise RuntimeError(f"profile of {row.name}: no quiet iteration in {4 * iterations} attempts")
    categories = {k for split in splits for k in split}
    per_iteration = {k: statistics.median(split.get(k, 0.0) for split in splits) for k in categories}
    per_iteration = dict(sorted(per_iteration.items(), key=lambda kv: -kv[1]))
    accounted = sum(per_iteration.values())
    top = best[1].key_averages().table(sort_by="self_cpu_time_total", row_limit=30) if best else ""
    return {
        "row": row.name,
        "note": row.note,
        "quiet_iterations": len(splits),
        "noisy_iterations_left_out": noisy,
        "wall_ms_per_iteration_under_profiler": statistics.median(walls),
        "ms_per_iteration": per_iteration,
        "share": {k: v / accounted for k, v in per_iteration.items()},
        "top_ops_of_the_fastest_iteration": top,
    }


def categorise(event: Any) -> str:
    chain = []
    node = event
    while node is not None:
        chain.append(node.name.lower())
        node = node.cpu_parent
    if any(name.startswith("optimizer.step") for name in chain):
        return "Adam"
    if any(name == "bench::data" for name in chain):
        return "data"
    for name in chain:  # innermost first
        for category, keys in PROFILE_CATEGORIES:
            if any(key in name for key in keys):
                return category
    return "other (autograd engine, zero_grad, flags, Python)"


def profile_rows(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    out = []
    for name in args.profile:
        row = build_row(name, args, device, args.batch[0])
        for _ in range(max(2, args.warmup)):
            row.run()
        result = profile_row(row, device, args.profile_iterations, args.max_others)
        print(f"\nprofile of {name} ({result['wall_ms_per_iteration_under_profiler']:.0f} ms/iteration):")
        for category, ms in result["ms_per_iteration"].items():
            print(f"  {category:50s} {ms:8.1f} ms  {result['share'][category]:.0%}")
        out.append(result)
        del row
    return out


# --- time to train (GPU) --------------------------------------------------------------------------------


def time_to_train(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Wall time of ``--epochs`` epochs of the facades recipe, fast path vs the plain trainer (measured)."""
    from fastpix2pix.training.fast_trainer import FastTrainer
    from fastpix2pix.training.trainer import Trainer

    out: dict[str, Any] = {"epochs": args.epochs, "dataroot": args.dataroot}
    for name in ("fast_path", "plain"):
        opt = TrainOptions(dataroot=args.dataroot, direction="BtoA", name=f"ttt_{name}", device=str(device),
                           checkpoints_dir="/tmp/bench_ttt", n_epochs=args.epochs, n_epochs_decay=0,
                           save_epoch_freq=0, save_latest_freq=10**9, display_freq=10**9, seed=0)  # fmt: skip
        trainer = (
            FastTrainer(opt, progress_bar=False) if name == "fast_path" else Trainer(opt, progress_bar=False)
        )
        sync(device)
        t0 = time.perf_counter()
        trainer.fit()
        sync(device)
        out[name] = {"seconds": time.perf_counter() - t0, "iterations": trainer.state.iteration}
    return out


# --- the report -----------------------------------------------------------------------------------------


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [(res["batch"], r) for res in results for r in res["rows"] if "median_ms" in r]
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.bar([f"{r['row']}\nb{b}" for b, r in timed], [r["images_per_s"] for _, r in timed])
    ax.set_ylabel("images / s")
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="default: 1 on CPU, 1 16 on CUDA")
    parser.add_argument("--netG", default="unet_256")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument(
        "--rows", nargs="*", type=row_name, help=f"default CPU: {CPU_ROWS}; CUDA: {CUDA_ROWS}"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds after the first iteration")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds (every row once per round)")
    parser.add_argument("--iters", type=int, default=None, help="alias of --rounds (older scripts)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="batch 1, 1 warm-up and 5 timed rounds")
    parser.add_argument("--compile-on-cpu", action="store_true")
    parser.add_argument("--wait-quiet", type=float, default=0, help="seconds to wait for a quiet machine")
    parser.add_argument(
        "--max-others",
        type=float,
        default=None,
        help="discard (and redo) a round in which other processes used more than this share of the CPU "
        "(default: 0.10 on CPU, off on CUDA)",
    )
    parser.add_argument("--max-seconds", type=float, default=780, help="time budget of the timed rounds")
    parser.add_argument("--profile", nargs="*", type=row_name, default=[], help="rows to profile (no timing)")
    parser.add_argument("--profile-iterations", type=int, default=5)
    parser.add_argument("--time-to-train", action="store_true")
    parser.add_argument("--dataroot", default="datasets/facades")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--plot", action="store_true")
    parser.add_argument("--tag", default="", help="appended to the JSON file name")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the JSON (default: %(default)s)")
    parser.add_argument(
        "--json",
        type=Path,
        help="the JSON file itself (default: <out>/train_<device>_<netG>_<size>_<date>.json)",
    )
    parser.add_argument(
        "--key", help="keep this run's report under KEY in --json, beside other runs' (one process per row)"
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        if args.json:
            IncrementalJson(args.json, {"error": "needs CUDA (or --device cpu)"}, key=args.key)
        print("bench_train: needs CUDA (or --device cpu)", file=sys.stderr)
        return 2
    if args.iters is not None:
        args.rounds = args.iters
    if args.batch is None:
        args.batch = [1, 16] if device.type == "cuda" else [1]
    if args.quick:
        args.batch, args.warmup, args.rounds = [1], 1, 5
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.max_others is None and device.type == "cpu":
        args.max_others = 0.10
    torch.backends.cudnn.benchmark = True  # official eager semantics at fixed shapes; TF32 left at defaults
    info = cpu_info()
    args.peak = cpu_peak_gflops(torch.get_num_threads(), info) if device.type == "cpu" else None
    stem = f"train_{device.type}_{args.netG}_{args.size}_{datetime.date.today().isoformat()}{args.tag}"
    stem += "_ttt" if args.time_to_train else "_profile" if args.profile else ""
    path = args.json or args.out / f"{stem}.json"
    report = IncrementalJson(
        path, {"environment": environment(device, args), "cpu_peak": args.peak}, key=args.key
    )
    report.update(
        quiet_before=wait_until_quiet(args.wait_quiet) if args.wait_quiet else {"heavy": heavy_processes()}
    )
    if device.type == "cpu" and not args.quick:
        report.update(conv_calibration=conv_calibration(torch.get_num_threads()))
    if args.time_to_train:
        report.update(time_to_train=time_to_train(args, device))
        print(json.dumps(report["time_to_train"], indent=1))
    elif args.profile:
        report.update(profiles=profile_rows(args, device))
    else:
        report.update(results=[])
        for batch in args.batch:
            live: dict[str, Any] = {"batch": batch}
            report.append("results", live)
            try:
                measure_batch(args, device, batch, live, save=report.write)
                print(table(live, args.peak is not None) if "rows" in live else live.get("status"))
            except Exception as error:  # fail soft: the next batch size may still run
                live |= {"status": "failed", "error": f"{type(error).__name__}: {error}"[:1000]}
                live["traceback"] = traceback.format_exc()[-3000:]
                print(live["traceback"], file=sys.stderr)
            report.write()
    report.update(heavy_processes_after=heavy_processes(), load_average_at_end=load_average())
    print(f"wrote {path}")
    if args.plot and "results" in report.data:
        plot([r for r in report["results"] if "rows" in r], path.with_suffix(".png"))
    done = all(r.get("status") == "done" for r in report.data.get("results", []))
    return 0 if done else 1


if __name__ == "__main__":
    sys.exit(main())
