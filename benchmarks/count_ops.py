"""What one fast-path iteration dispatches: the top-level ops by kind, every op call below them, and the bytes
moved outside the convolutions. A count that a CPU gives exactly; on a GPU each leaf op is about one kernel.

The iteration is the fast path's (bf16 autocast, channels_last, fused Adam, the fused ops) on unet_256 and
the 70x70 PatchGAN at 256 px, batch 1, run on the CPU. Two counts of the same (third) iteration:

- top level: a ``TorchDispatchMode`` sees every op the Python code dispatches (a fused C++ op is one op; the
  ATen calls it makes inside are not seen), classified by kind (zero-fills, casts, small arithmetic on
  scalars and vectors, layout copies, concatenations, activations, convolutions and fused blocks, losses,
  the optimizer, other). Of them, the ops that launch work (``top_level_launching_ops``): all but views,
  allocations, detaches and profiler markers (:data:`NO_WORK`), which cost a GPU nothing, and under a CUDA
  graph nothing at all;
- every op call that does work itself: ``torch.profiler`` events of ops with no working op below them
  (allocations, views and no-op conversions excluded), C++ ops' nested ATen calls included: about the
  kernels a GPU would launch. A ``_foreach_`` call counts once (one multi-tensor kernel on CUDA; the CPU
  loops over its tensors, which are not counted).

Bytes: for each top-level op that is not a convolution or a fused conv block, the bytes of its tensor inputs
and outputs (an estimate: views count as moved, caching is ignored).

    python benchmarks/count_ops.py --out benchmarks/results/count_ops_<date>.json
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import cpu_info, environment

from fastpix2pix._extension import extension_available
from fastpix2pix.runs.networks import build_networks
from fastpix2pix.runs.options import TrainOptions
from fastpix2pix.training.fast_step import (
    FastPathConfig,
    FastStep,
    attach_weight_copies,
    build_fast_optimizers,
)
from fastpix2pix.training.step import Objective

ZERO_FILLS = {"zeros_like", "zeros", "zero_", "new_zeros"}
CASTS = {"_to_copy", "to", "_autocast_to_reduced_precision", "_autocast_to_full_precision"}
LAYOUT = {"clone", "contiguous", "copy_", "_copy_from"}
UPDATES = {"lerp_", "mul_", "add_", "addcmul_", "sub_", "div_", "mul", "add", "sub", "div", "lerp"}
ACTIVATIONS = {"relu", "relu_", "leaky_relu", "leaky_relu_", "tanh", "tanh_backward", "threshold_backward"}


def op_kind(name: str, args: tuple[Any, ...]) -> str:
    """A top-level op's kind, from its name (``aten::add_`` -> ``add_``) and, for updates, its operand."""
    base = name.split("::")[-1].split(".")[0]
    if name.startswith("fastpix2pix::"):
        return "fused " + ("block" if base.startswith("conv") else base)
    if "convolution" in base or base.startswith("conv"):
        return "convolution"
    if base in ZERO_FILLS or (base == "fill_" and len(args) > 1 and args[1] == 0):
        return "zero-fill"
    if base in CASTS:
        return "cast"
    if base == "cat":
        return "cat"
    if base in ACTIVATIONS:
        return "activation"
    if base.startswith("_fused_adam"):
        return "optimizer"
    if base in UPDATES and args and isinstance(args[0], torch.Tensor) and args[0].dim() <= 1:
        return "small arithmetic (operand <= 1-D: counters, loss scaling, vector gradient sums)"
    if base in LAYOUT:
        return "layout copy"
    return "other: " + base


def tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in tensors(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in tensors(item)]
    return []


class TopLevelOps(TorchDispatchMode):
    """Counts the ops the Python code dispatches, by kind, and the bytes they read and write."""

    def __init__(self) -> None:
        super().__init__()
        self.kinds: collections.Counter[str] = collections.Counter()
        self.names: collections.Counter[str] = collections.Counter()
        self.bytes_outside_convolutions = 0
        self.cat_dtypes: list[
            tuple[tuple[torch.dtype, ...], torch.dtype]
        ] = []  # (inputs, output) of each cat

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = str(func.name())
        kind = op_kind(name, args)
        self.kinds[kind] += 1
        self.names[name] += 1
        if kind == "cat":
            self.cat_dtypes.append((tuple(t.dtype for t in tensors(args[0])), out.dtype))
        if kind not in ("convolution", "fused block"):
            moved = tensors(args) + tensors(kwargs) + tensors(out)
            self.bytes_outside_convolutions += sum(t.numel() * t.element_size() for t in moved)
        return out


# Ops that launch no work of their own: allocation, views, metadata, no-op conversions.
NO_WORK = {
    "empty", "empty_strided", "empty_like", "resize_", "as_strided", "as_strided_", "detach", "to", "view",
    "_reshape_alias", "alias", "t", "transpose", "permute", "expand", "unsqueeze", "squeeze", "slice",
    "select", "narrow", "lift_fresh", "_unsafe_view", "reshape", "contiguous", "result_type", "scalar_tensor",
    "_local_scalar_dense", "item", "is_nonzero", "size", "stride", "numel",
}  # fmt: skip


def _op_name(name: str) -> str:
    return name.split("::")[-1].split(".")[0]


def launches_work(name: str) -> bool:
    """Whether a top-level op (``aten::slice.Tensor``) launches work: not a profiler marker nor in
    :data:`NO_WORK`."""
    return not name.startswith("profiler::") and _op_name(name) not in NO_WORK


def _in_foreach(event: Any) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if _op_name(parent.name).startswith("_foreach_"):
            return True
        parent = parent.cpu_parent
    return False


def work_ops(run: Callable[[], None]) -> collections.Counter[str]:
    """The op calls that do work themselves (what launches a kernel on a GPU): torch.profiler's op events
    that are not in :data:`NO_WORK` and have no working op below them (C++ ops' nested calls included)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        run()
    ops = [e for e in profile.events() if e.name.startswith(("aten::", "fastpix2pix::"))]
    # A foreach call is one working op: what the CPU runs below it for each tensor is left out.
    working = [e for e in ops if _op_name(e.name) not in NO_WORK and not _in_foreach(e)]
    with_work_below: set[int] = set()
    for event in working:  # mark every op above a working op (autograd-engine events are not ops)
        parent = event.cpu_parent
        while parent is not None:
            with_work_below.add(id(parent))
            parent = parent.cpu_parent
    return collections.Counter(
        e.name for e in working if id(e) not in with_work_below or _op_name(e.name).startswith("_foreach_")
    )


def build_step(args: argparse.Namespace) -> FastStep:
    device = torch.device("cpu")
    opt = TrainOptions(netG=args.netG, ngf=64, ndf=64, lr=2e-4, batch_size=args.batch, device="cpu")
    backend = "fused" if extension_available() else "reference"
    # The CUDA iteration's settings, less the graph: with the optimizer's bf16 weight copies unless
    # --cast-weights (each weight cast in each pass, as before the copies).
    config = FastPathConfig.for_device(
        device, bf16=True, channels_last=True, cuda_graph=False, weight_copies=not args.cast_weights,
        pairs_as_one_batch=not args.separate_pairs,
    )  # fmt: skip
    torch.manual_seed(0)
    nets = build_networks(opt, backend, device)
    for net in nets:
        net.to(memory_format=torch.channels_last)
    optimizers = build_fast_optimizers(nets, opt, config)
    size = args.size
    A = torch.randn(args.batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    B = torch.randn(args.batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    attach_weight_copies(nets, optimizers)
    step = FastStep(nets, optimizers, Objective(backend=backend), lambda: (A, B), bf16=True, loss_rows=8,
                    pairs_as_one_batch=config.pairs_as_one_batch)  # fmt: skip
    return step


def count(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    step = build_step(args)
    for _ in range(2):  # lazy state (Adam moments) and caches out of the way
        step()
        step.take_losses()
    top = TopLevelOps()
    with top:
        step()
    step.take_losses()
    leaves = work_ops(step)
    return {
        "top_level_ops": sum(top.kinds.values()),
        "top_level_launching_ops": sum(n for name, n in top.names.items() if launches_work(name)),
        "top_level_by_kind": dict(top.kinds.most_common()),
        "top_level_by_name": dict(top.names.most_common()),
        "working_op_calls": sum(leaves.values()),
        "working_op_calls_by_name": dict(leaves.most_common()),
        "bytes_outside_convolutions": top.bytes_outside_convolutions,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--netG", default="unet_256")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--cast-weights",
        action="store_true",
        help="cast each weight in each pass instead of the optimizer's bf16 weight copies (MasterWeightAdam)",
    )
    parser.add_argument(
        "--separate-pairs",
        action="store_true",
        help="D's fake and real pairs as two forwards (the plain trainer's D step) instead of one batch",
    )
    parser.add_argument("--label", default="", help="what this count is of (e.g. before / after a change)")
    parser.add_argument("--out", type=Path, help="JSON file to write")
    args = parser.parse_args(argv)
    result = {
        "what": "one fast-path iteration (bf16, channels_last, fused Adam, fused ops), counted on the CPU",
        "label": args.label,
        "date": datetime.date.today().isoformat(),
        "config": {
            "netG": args.netG,
            "netD": "basic",
            "size": args.size,
            "batch": args.batch,
            "weight_copies": not args.cast_weights,
            "pairs_as_one_batch": not args.separate_pairs,
        },
        "environment": environment(torch.device("cpu"), args) | {"cpu": cpu_info()},
        **count(args),
    }
    moved = result["bytes_outside_convolutions"] / 2**20
    working = result["working_op_calls"]
    print(
        f"top-level ops: {result['top_level_ops']} ({result['top_level_launching_ops']} launch work); "
        f"working op calls (about the kernels): {working}; ",
        end="",
    )
    print(f"bytes outside the convolutions: {moved:.1f} MiB")
    for kind, n in result["top_level_by_kind"].items():
        print(f"  {n:5d}  {kind}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
