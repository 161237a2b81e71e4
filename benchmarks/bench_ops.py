"""Kernel benchmark of the fused ops at every layer shape of pix2pix (unet_256 and the basic PatchGAN).

For each layer (``shapes.py``), batch, dtype and direction (forward, forward+backward), all in one run:

- block: the whole conv + BatchNorm/bias + activation, fused (``fastpix2pix.ops``) against (a) the eager
  PyTorch composite of modules (Conv2d/ConvTranspose2d + BatchNorm2d + LeakyReLU/ReLU) and (b)
  ``torch.compile`` of ``fastpix2pix.ops.reference``;
- epilogue: the non-conv part alone on the conv's output, fused (the low-level ops, as the block calls them)
  against the eager BatchNorm2d + activation modules, with the fused part's achieved bandwidth as a fraction
  of a measured device-to-device copy;
- losses: gan_loss (vanilla, lsgan) on the PatchGAN logits and the weighted l1_loss on images, against
  BCEWithLogitsLoss / MSELoss / L1Loss and the compiled reference.

Everything runs channels_last. Times come from CUDA events around each call (or the host clock on a CPU),
after warm-up, rotating through enough input sets to exceed the L2 cache twice; the JSON keeps every raw
time with the median and 20th/80th percentiles, the speedups, the device, the software versions, the
library's build record and the git commit. ``--plot`` adds a PNG of the speedups per layer.

    python benchmarks/bench_ops.py                          # the full run on the GPU (long: split it with
    python benchmarks/bench_ops.py --dtypes bfloat16 --batches 16 --plot   # --dtypes/--batches/--layers)
    python benchmarks/bench_ops.py --device cpu --quick     # smoke test (CI)
"""

from __future__ import annotations

import argparse
import datetime
import functools
import math
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from incremental import IncrementalJson  # noqa: E402
from shapes import LayerShape, image_shape, patchgan_output_shape, pix2pix_layers  # noqa: E402

from fastpix2pix._extension import BUILD_INFO, extension_available  # noqa: E402
from fastpix2pix.ops import reference  # noqa: E402

EPS = 1e-5
MOMENTUM = 0.1
L1_WEIGHT = 100.0
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUICK_LAYERS = ("e1", "e2", "d1", "d8", "C512", "out")  # one of each kind of block
CL = torch.channels_last


# --- timing ------------------------------------------------------------------------------------------------


class Timer:
    """Times calls one by one: CUDA events around each on a GPU, the host clock on a CPU."""

    def __init__(self, device: torch.device, warmup: int, reps: int) -> None:
        self.device, self.warmup, self.reps = device, warmup, reps

    def __call__(self, calls: list[Callable[[], object]]) -> list[float]:
        """Milliseconds of each of `reps` calls, the i-th call using calls[i % len(calls)]."""
        for i in range(self.warmup):
            calls[i % len(calls)]()
        if self.device.type != "cuda":
            times = []
            for i in range(self.reps):
                start = time.perf_counter()
                calls[i % len(calls)]()
                times.append((time.perf_counter() - start) * 1e3)
            return times
        torch.cuda.synchronize(self.device)
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(self.reps)
        ]
        for i, (start, end) in enumerate(events):
            start.record()
            calls[i % len(calls)]()
            end.record()
        torch.cuda.synchronize(self.device)
        return [start.elapsed_time(end) for start, end in events]


def summary(times: list[float]) -> dict:
    t = torch.tensor(times, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)).tolist()
    return {"p20_ms": q[0], "median_ms": q[1], "p80_ms": q[2], "times_ms": times}


def input_sets(bytes_per_set: int, l2_bytes: int, max_sets: int) -> int:
    """How many input sets to rotate through so that they exceed the L2 cache twice (at most max_sets)."""
    if l2_bytes <= 0:
        return 1
    return max(1, min(max_sets, math.ceil(2 * l2_bytes / max(bytes_per_set, 1))))


# --- the variants ------------------------------------------------------------------------------------------


def eager_activation(slope: float, inplace: bool) -> nn.Module:
    if slope == 1.0:
        return nn.Identity()
    if slope == 0.0:
        return nn.ReLU(inplace=inplace)
    return nn.LeakyReLU(slope, inplace=inplace)


class Block:
    """One layer's parameters, shared by the fused, eager and compiled variants."""

    def __init__(
        self,
        layer: LayerShape,
        dtype: torch.dtype,
        device: torch.device,
        compile_mode: str | None,
        compile_backend: str,
    ) -> None:
        self.layer = layer
        conv_type = nn.ConvTranspose2d if layer.transposed else nn.Conv2d
        self.conv = conv_type(
            layer.in_channels, layer.out_channels, layer.kernel, layer.stride, layer.padding, bias=layer.bias
        ).to(device=device, dtype=dtype, memory_format=CL)
        self.bn = nn.BatchNorm2d(layer.out_channels).to(device) if layer.batch_norm else None
        with torch.no_grad():
            self.conv.weight.normal_(0.0, 0.02)
            if self.bn is not None:
                self.bn.weight.normal_(1.0, 0.02)
        self.eager = nn.Sequential(
            self.conv, *([self.bn] if self.bn else []), eager_activation(layer.negative_slope, inplace=True)
        )
        kwargs = layer.conv_kwargs()
        if layer.batch_norm:
            fn = functools.partial(reference.conv_bn_act, momentum=MOMENTUM, eps=EPS, **kwargs)
        else:
            fn = functools.partial(reference.conv_bias_act, **kwargs)
        self.compiled = torch.compile(fn, mode=compile_mode, backend=compile_backend, dynamic=False)

    def params(self) -> list[torch.Tensor]:
        return [p for p in self.eager.parameters()]

    def fused(self, ops, x: torch.Tensor) -> torch.Tensor:
        kwargs = self.layer.conv_kwargs()
        if self.bn is None:
            return ops.conv_bias_act(x, self.conv.weight, self.conv.bias, **kwargs)
        bn = self.bn
        return ops.conv_bn_act(
            x,
            self.conv.weight,
            bn.weight,
            bn.bias,
            bn.running_mean,
            bn.running_var,
            momentum=MOMENTUM,
            eps=EPS,
            **kwargs,
        )

    def reference_compiled(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn is None:
            return self.compiled(x, self.conv.weight, self.conv.bias)
        bn = self.bn
        return self.compiled(x, self.conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var)


def forward_and_backward(
    forward: Callable, inputs: list[torch.Tensor], grad: torch.Tensor | None
) -> Callable:
    """A call running forward then the gradients of every input that requires one (nothing accumulated).

    `grad` is the output's gradient (None for a scalar loss).
    """

    def call():
        out = forward()
        return torch.autograd.grad(out, [t for t in inputs if t.requires_grad], grad)

    return call


def no_grad_call(forward: Callable) -> Callable:
    def call():
        with torch.no_grad():
            return forward()

    return call


class FusedEpilogue:
    """The non-conv part of a fused block, with the low-level ops in the order the block runs them."""

    def __init__(self, block: Block) -> None:
        self.block = block
        self.lib = torch.ops.fastpix2pix
        self.slope = block.layer.negative_slope

    @torch.no_grad()  # the low-level ops have no autograd; the backward is called explicitly
    def forward(self, y: torch.Tensor) -> tuple:
        from fastpix2pix.ops import fused as ops

        bn = self.block.bn
        if bn is None:
            return (self.lib.bias_act_forward(y, self.block.conv.bias, self.slope),)
        mean, var = self.lib.bn_stats(y)
        out = self.lib.bn_act_forward(y, mean, var, bn.weight, bn.bias, EPS, self.slope)
        ops.update_running_stats(
            bn.running_mean, bn.running_var, mean, var, y.numel() // y.shape[1], MOMENTUM
        )
        return out, mean, var

    @torch.no_grad()
    def forward_backward(self, y: torch.Tensor, grad: torch.Tensor) -> tuple:
        bn = self.block.bn
        if bn is None:
            (out,) = self.forward(y)
            return self.lib.bias_act_backward(grad, out, self.slope, self.block.conv.bias is not None)
        out, mean, var = self.forward(y)
        sum_dz, sum_dz_xhat = self.lib.bn_act_backward_reduce(
            grad, y, mean, var, bn.weight, bn.bias, EPS, self.slope
        )
        count = y.numel() // y.shape[1]
        grad_y = self.lib.bn_act_backward_apply(
            grad, y, mean, var, bn.weight, bn.bias, sum_dz, sum_dz_xhat, count, EPS, self.slope, True
        )
        return grad_y, sum_dz_xhat, sum_dz

    def passes(self, backward: bool) -> int:
        """Full-tensor passes through memory: the bytes floor of this op split, in units of the tensor."""
        if self.block.bn is None:
            return 5 if backward else 2  # act: read, write; backward: read grad and out, write grad_x
        return 8 if backward else 3  # stats read; apply read+write; reduce 2 reads; apply 2 reads + 1 write


def eager_epilogue(block: Block) -> Callable[[torch.Tensor], torch.Tensor]:
    layer = block.layer
    if block.bn is not None:
        act = eager_activation(layer.negative_slope, inplace=True)
        return lambda y: act(block.bn(y))
    bias = block.conv.bias
    if bias is None:
        return lambda y: eager_activation(layer.negative_slope, inplace=False)(y)
    act = eager_activation(layer.negative_slope, inplace=True)
    return lambda y: act(y + bias.view(1, -1, 1, 1))


# --- the measurements --------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, report: IncrementalJson | None = None) -> None:
        self.args = args
        self.report = report  # rewritten after every measurement: a kill keeps all rows before it
        self.device = torch.device(args.device)
        self.timer = Timer(self.device, args.warmup, args.reps)
        self.l2_bytes = (
            getattr(torch.cuda.get_device_properties(self.device), "L2_cache_size", 50 << 20)
            if self.device.type == "cuda"
            else 0
        )
        from fastpix2pix.ops import fused as ops

        self.ops = ops
        self.records: list[dict] = []

    def time(self, calls: list[Callable]) -> dict:
        return summary(self.timer(calls))

    def record(self, **fields) -> None:
        self.records.append(fields)
        if self.report is not None:
            self.report.update(records=self.records, speedups=speedups(self.records))
        print(
            f"{fields['part']:9s} {fields['net']:9s} {fields['layer']:5s} b{fields['batch']:<3d} "
            f"{fields['dtype']:9s} {fields['direction']:8s} {fields['variant']:9s} "
            f"{fields['median_ms']:.4f} ms",
            flush=True,
        )

    def error(self, what: dict, error: Exception) -> None:
        """A measurement that failed (out of memory, a kernel error): recorded, and the run goes on."""
        print(f"FAILED {what}: {type(error).__name__}: {error}", flush=True)
        if self.report is not None:
            self.report.append("errors", {**what, "error": f"{type(error).__name__}: {error}"[:500]})
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def copy_bandwidth(self) -> dict:
        """Bytes read + written per second of a large device-to-device copy: the bandwidth ceiling."""
        nbytes = (1 << 30) if self.device.type == "cuda" else (64 << 20)
        if self.args.quick:
            nbytes = 16 << 20
        src = torch.empty(nbytes, dtype=torch.uint8, device=self.device).random_()
        dst = torch.empty_like(src)
        s = self.time([lambda: dst.copy_(src)])
        return {"bytes": nbytes, **s, "bytes_per_s": 2 * nbytes / (s["median_ms"] * 1e-3)}

    def block(self, layer: LayerShape, batch: int, dtype: torch.dtype) -> None:
        block = Block(layer, dtype, self.device, self.args.compile_mode, self.args.compile_backend)
        first = layer.name in ("e1", "C64")  # the network's input needs no gradient
        x_bytes = math.prod(layer.input_shape(batch)) * dtype.itemsize
        y_bytes = math.prod(layer.output_shape(batch)) * dtype.itemsize
        sets = input_sets(x_bytes + 2 * y_bytes, self.l2_bytes, self.args.max_sets)
        xs = [self.randn(layer.input_shape(batch), dtype).requires_grad_(not first) for _ in range(sets)]
        grads = [self.randn(layer.output_shape(batch), dtype) for _ in range(sets)]
        ys = [self.randn(layer.output_shape(batch), dtype).requires_grad_(True) for _ in range(sets)]
        common = {
            "part": "block",
            "net": layer.net,
            "layer": layer.name,
            "batch": batch,
            "dtype": str(dtype).removeprefix("torch."),
            "layer_shape": layer.as_dict(),
            "gflop_forward": layer.flops(batch) / 1e9,
        }
        forwards = {
            "fused": lambda x: block.fused(self.ops, x),
            "eager": lambda x: block.eager(x),
            "compiled": block.reference_compiled,
        }
        if self.args.no_compile:
            del forwards["compiled"]
        for variant, forward in forwards.items():
            calls = [no_grad_call(functools.partial(forward, x)) for x in xs]
            self.record(**common, direction="fwd", variant=variant, **self.time(calls))
            calls = [
                forward_and_backward(functools.partial(forward, x), [x, *block.params()], g)
                for x, g in zip(xs, grads, strict=True)
            ]
            self.record(**common, direction="fwd+bwd", variant=variant, **self.time(calls))

        # The non-conv part alone, on conv-output-shaped tensors.
        epilogue = FusedEpilogue(block)
        eager = eager_epilogue(block)
        params = [
            p for p in (block.bn.parameters() if block.bn is not None else [block.conv.bias]) if p is not None
        ]
        common = {**common, "part": "epilogue"}
        for direction, backward in (("fwd", False), ("fwd+bwd", True)):
            if backward:
                fused_calls = [
                    functools.partial(epilogue.forward_backward, y, g) for y, g in zip(ys, grads, strict=True)
                ]
                eager_calls = [
                    forward_and_backward(functools.partial(eager, y), [y, *params], g)
                    for y, g in zip(ys, grads, strict=True)
                ]
            else:
                fused_calls = [no_grad_call(functools.partial(epilogue.forward, y)) for y in ys]
                eager_calls = [no_grad_call(functools.partial(eager, y)) for y in ys]
            timing = self.time(fused_calls)
            moved = epilogue.passes(backward) * y_bytes
            self.record(
                **common,
                direction=direction,
                variant="fused",
                bytes=moved,
                bytes_per_s=moved / (timing["median_ms"] * 1e-3),
                **timing,
            )
            self.record(**common, direction=direction, variant="eager", **self.time(eager_calls))

    def losses(self, batch: int, dtype: torch.dtype) -> None:
        dtype_name = str(dtype).removeprefix("torch.")
        cases = []
        logits_shape = patchgan_output_shape(batch)
        for mode in ("vanilla", "lsgan"):
            eager_fn = nn.BCEWithLogitsLoss() if mode == "vanilla" else nn.MSELoss()
            compiled = torch.compile(
                functools.partial(reference.gan_loss, target_is_real=True, mode=mode),
                mode=self.args.compile_mode,
                backend=self.args.compile_backend,
                dynamic=False,
            )
            cases.append(
                (
                    f"gan_{mode}",
                    [logits_shape],
                    {
                        "fused": functools.partial(self.ops.gan_loss, target_is_real=True, mode=mode),
                        "eager": lambda x, f=eager_fn: f(x, torch.ones_like(x[:1, :1, :1, :1]).expand_as(x)),
                        "compiled": compiled,
                    },
                    2,  # read the logits, write their gradient
                )
            )
        images = image_shape(batch)
        compiled_l1 = torch.compile(
            functools.partial(reference.l1_loss, weight=L1_WEIGHT),
            mode=self.args.compile_mode,
            backend=self.args.compile_backend,
            dynamic=False,
        )
        l1 = nn.L1Loss()
        cases.append(
            (
                "l1",
                [images, images],
                {
                    "fused": lambda p, t: self.ops.l1_loss(p, t, L1_WEIGHT),
                    "eager": lambda p, t: L1_WEIGHT * l1(p, t),
                    "compiled": compiled_l1,
                },
                3,  # read pred and target, write the gradient
            )
        )
        for name, shapes, variants, passes in cases:
            nbytes = sum(math.prod(s) for s in shapes) * dtype.itemsize
            sets = input_sets(nbytes, self.l2_bytes, self.args.max_sets)
            inputs = [[self.randn(s, dtype) for s in shapes] for _ in range(sets)]
            for tensors in inputs:
                tensors[0].requires_grad_(True)
            if self.args.no_compile:
                variants = {k: v for k, v in variants.items() if k != "compiled"}
            common = {
                "part": "loss",
                "net": "loss",
                "layer": name,
                "batch": batch,
                "dtype": dtype_name,
                "shape": list(shapes[0]),
            }
            for variant, fn in variants.items():
                calls = [no_grad_call(functools.partial(fn, *t)) for t in inputs]
                self.record(**common, direction="fwd", variant=variant, **self.time(calls))
                calls = [forward_and_backward(functools.partial(fn, *t), [t[0]], None) for t in inputs]
                timing = self.time(calls)
                extra = {}
                if variant == "fused":
                    moved = passes * math.prod(shapes[0]) * dtype.itemsize
                    extra = {"bytes": moved, "bytes_per_s": moved / (timing["median_ms"] * 1e-3)}
                self.record(**common, direction="fwd+bwd", variant=variant, **extra, **timing)

    def randn(self, shape, dtype: torch.dtype) -> torch.Tensor:
        return (
            torch.randn(shape, device=self.device)
            .to(dtype)
            .contiguous(memory_format=CL if len(shape) == 4 else torch.contiguous_format)
        )


# --- the report --------------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict:
    def run(*cmd: str) -> str | None:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=HERE).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "build_info": BUILD_INFO,
        "git_commit": run("git", "rev-parse", "HEAD"),
        "git_dirty": bool(run("git", "status", "--porcelain", "--untracked-files=no")),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "allow_tf32": torch.backends.cudnn.allow_tf32,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {
            "gpu": props.name,
            "gpu_memory_bytes": props.total_memory,
            "sm_count": props.multi_processor_count,
            "l2_bytes": getattr(props, "L2_cache_size", None),
            "compute_capability": f"{props.major}.{props.minor}",
            "driver": run("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"),
        }
    return info


def speedups(records: list[dict]) -> list[dict]:
    """Per (part, layer, batch, dtype, direction): each baseline's time over the fused one (> 1: faster)."""
    groups: dict[tuple, dict[str, dict]] = {}
    for r in records:
        key = (r["part"], r["net"], r["layer"], r["batch"], r["dtype"], r["direction"])
        groups.setdefault(key, {})[r["variant"]] = r
    rows = []
    for (part, net, layer, batch, dtype, direction), variants in groups.items():
        fused = variants.get("fused")
        if fused is None:
            continue
        row = {
            "part": part,
            "net": net,
            "layer": layer,
            "batch": batch,
            "dtype": dtype,
            "direction": direction,
            "fused_ms": fused["median_ms"],
        }
        for baseline in ("eager", "compiled"):
            if baseline in variants:
                row[f"{baseline}_ms"] = variants[baseline]["median_ms"]
                row[f"vs_{baseline}"] = variants[baseline]["median_ms"] / fused["median_ms"]
        if "bandwidth_fraction" in fused:
            row["bandwidth_fraction"] = fused["bandwidth_fraction"]
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    columns = [
        "part",
        "layer",
        "batch",
        "dtype",
        "dir",
        "fused ms",
        "eager ms",
        "compiled ms",
        "vs eager",
        "vs compiled",
        "of copy BW",
    ]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]

    def fmt(value, spec):
        return "" if value is None else format(value, spec)

    for r in rows:
        lines.append(
            f"| {r['part']} | {r['net']}.{r['layer']} | {r['batch']} | {r['dtype']} | {r['direction']} | "
            f"{fmt(r['fused_ms'], '.4f')} | {fmt(r.get('eager_ms'), '.4f')} | "
            f"{fmt(r.get('compiled_ms'), '.4f')} | "
            f"{fmt(r.get('vs_eager'), '.2f')} | {fmt(r.get('vs_compiled'), '.2f')} | "
            f"{fmt(r.get('bandwidth_fraction'), '.0%')} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = sorted({(r["batch"], r["dtype"]) for r in rows})
    fig, axes = plt.subplots(len(configs), 1, figsize=(14, 3.6 * len(configs)), squeeze=False)
    for ax, (batch, dtype) in zip(axes[:, 0], configs, strict=True):
        series = {
            "block vs eager": ("block", "vs_eager"),
            "block vs compiled": ("block", "vs_compiled"),
            "BN+act vs eager": ("epilogue", "vs_eager"),
        }
        selected = [
            r for r in rows if r["batch"] == batch and r["dtype"] == dtype and r["direction"] == "fwd+bwd"
        ]
        names = list(dict.fromkeys(f"{r['net']}.{r['layer']}" for r in selected if r["part"] != "loss"))
        names += list(dict.fromkeys(r["layer"] for r in selected if r["part"] == "loss"))
        width = 0.8 / len(series)
        for i, (label, (part, field)) in enumerate(series.items()):
            values = []
            for name in names:
                match = [
                    r
                    for r in selected
                    if (f"{r['net']}.{r['layer']}" == name or r["layer"] == name)
                    and (r["part"] == part or (r["part"] == "loss" and part == "block"))
                ]
                values.append(match[0].get(field, float("nan")) if match else float("nan"))
            ax.bar([j + i * width for j in range(len(names))], values, width, label=label)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, rotation=60, fontsize=8)
        ax.set_ylabel("speedup (fwd+bwd)")
        ax.set_title(f"fused speedup per layer, batch {batch}, {dtype}, channels_last")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: batch 1, float32, one layer of each kind, 3 repetitions",
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["float32", "bfloat16"])
    parser.add_argument("--layers", nargs="+", help="layer names (e1 ... d8, C64 ... out); default: all")
    parser.add_argument("--no-losses", action="store_true")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile baseline")
    parser.add_argument(
        "--compile-mode", default=None, help="torch.compile mode (default, max-autotune, ...)"
    )
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--max-sets", type=int, default=32, help="most input sets rotated through")
    parser.add_argument(
        "--out", type=Path, help="folder of the JSON (default: benchmarks/results; --quick: a temp folder)"
    )
    parser.add_argument("--plot", action="store_true", help="also write a PNG of the speedups per layer")
    parser.add_argument("--verbose", action="store_true", help="(each measurement is always printed)")
    parser.add_argument(
        "--json", type=Path, help="the JSON file itself (default: <out>/ops_<gpu>_<time>.json)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.dtypes = [1], ["float32"]
        args.layers = args.layers or list(QUICK_LAYERS)
        args.warmup, args.reps, args.max_sets = 1, 3, 1
    # Inductor compiles C++ on a CPU, which a smoke test has no time for; the code path is the same.
    args.compile_backend = "eager" if (args.quick and args.device == "cpu") else "inductor"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problem = (
        "fastpix2pix._C is not built: nothing to benchmark (build it first)"
        if not extension_available()
        else "needs CUDA (or --device cpu)"
        if args.device.startswith("cuda") and not torch.cuda.is_available()
        else None
    )
    if problem:
        if args.json:
            IncrementalJson(args.json, {"error": problem})
        print(f"bench_ops: {problem}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # the honest eager baseline (see docs/performance.md)
    torch._dynamo.config.cache_size_limit = (
        1024  # one compiled graph per shape, never a silent eager fallback
    )
    torch._dynamo.config.accumulated_cache_size_limit = 4096
    torch.manual_seed(0)
    env = environment(device)
    name = (env.get("gpu") or "cpu").replace(" ", "_").replace("/", "_")
    folder = args.out or (Path(tempfile.mkdtemp(prefix="bench_ops_")) if args.quick else HERE / "results")
    stem = f"ops_{name}_{datetime.datetime.now().strftime('%Y%m%d_%H%M%S')}"
    path = args.json or folder / f"{stem}.json"
    report = IncrementalJson(path, {"environment": env, "args": {k: str(v) for k, v in vars(args).items()}})
    bench = Bench(args, report)
    copy = bench.copy_bandwidth()
    report.update(copy_bandwidth=copy)
    print(f"device-to-device copy: {copy['bytes_per_s'] / 1e9:.1f} GB/s (read + write)", flush=True)
    layers = [layer for layer in pix2pix_layers() if not args.layers or layer.name in args.layers]
    for dtype_name in args.dtypes:
        for batch in args.batches:
            for layer in layers:
                try:
                    bench.block(layer, batch, DTYPES[dtype_name])
                except Exception as error:  # fail soft: the other layers still run
                    bench.error({"layer": layer.name, "batch": batch, "dtype": dtype_name}, error)
            if not args.no_losses:
                try:
                    bench.losses(batch, DTYPES[dtype_name])
                except Exception as error:
                    bench.error({"layer": "losses", "batch": batch, "dtype": dtype_name}, error)
    for r in bench.records:
        if "bytes_per_s" in r:
            r["bandwidth_fraction"] = r["bytes_per_s"] / copy["bytes_per_s"]
    rows = speedups(bench.records)
    report.update(records=bench.records, speedups=rows, complete=True)
    print(markdown(rows))
    print(f"\nwrote {path}")
    if args.plot:
        plot(rows, path.with_suffix(".png"))
        print(f"wrote {path.with_suffix('.png')}")
    return 1 if report.data.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
