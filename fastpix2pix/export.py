"""``fastpix2pix export``: a trained generator as an ONNX or ``torch.export`` file that matches PyTorch.

The exported network is a copy of the generator in plain PyTorch ops (every :class:`ConvBlock` replaced
by a :class:`DeployBlock`), so no fastpix2pix custom op reaches the graph. Two inference protocols:

- ``eval``: BatchNorm with its running statistics, folded into the preceding conv / conv-transpose
  weights and bias (computed in float64, stored in float32). Batch, height and width are dynamic.
- ``paper``: the paper's test protocol, BatchNorm with the statistics of the test batch. At batch 1
  that is instance normalisation carrying BatchNorm's affine parameters, exported as such
  (ONNX ``InstanceNormalization`` with BatchNorm's weight and bias as scale and bias); the batch is
  fixed at 1, height and width are dynamic. It is what ``fastpix2pix test`` computes by default (with
  ``--dropout``; see below).

Dropout is off in exports unless ``--dropout`` (the official test protocol keeps it on): then the graph
draws a new dropout mask per run at the positions the PyTorch network has dropout (``aten.dropout`` in
``torch.export``; in ONNX an explicit ``RandomUniformLike`` mask, since ONNX Runtime deletes ``Dropout``
nodes; ``--seed`` seeds the ONNX masks).

Heights and widths must be multiples of the generator's ``size_multiple`` (2**downsamplings: 256 for
unet_256, 128 for unet_128, 4 for the ResNets; ResNets need at least 8). Other sizes are padded
outside the graph, as ``fastpix2pix predict`` does: reflect-padded at the bottom and right to the next
multiple, the output cropped back. The file's metadata (ONNX ``metadata_props`` key ``fastpix2pix``;
``torch.export`` extra file ``fastpix2pix.json``) records the protocol, the dropout, the architecture
and this pre/post-processing; :mod:`fastpix2pix.deploy` reads it to run a file on an image.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import io
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastpix2pix.data.transforms import DIRECTIONS
from fastpix2pix.models.generators import ResnetGenerator, UnetGenerator
from fastpix2pix.models.layers import ConvBlock
from fastpix2pix.options import ArchitectureOptions, HelpFormatter, RunOptions, build_parser, option
from fastpix2pix.reference import activation

__all__ = [
    "FORMATS",
    "METADATA_KEY",
    "PROTOCOLS",
    "DeployBlock",
    "ExportOptions",
    "deploy_network",
    "export_generator",
    "fold_batch_norm",
    "main",
    "min_size",
    "onnx_model_bytes",
    "read_metadata",
]

FORMATS = ("onnx", "torch-export")
PROTOCOLS = ("eval", "paper")
SUFFIXES = {"onnx": ".onnx", "torch-export": ".pt2"}
METADATA_KEY = "fastpix2pix"  # ONNX metadata_props key; torch.export extra file "fastpix2pix.json"
METADATA_FILE = "fastpix2pix.json"
METADATA_VERSION = 1
INPUT_NAME, OUTPUT_NAME = "real_A", "fake_B"
VERIFY_TOLERANCE = 1e-4  # max |exported - PyTorch| accepted by the check after every export

PROTOCOL_TEXT = {
    "eval": "BatchNorm uses its running statistics (folded into the conv weights); any batch size",
    "paper": "BatchNorm uses the statistics of the test batch (the paper's test protocol); batch 1, where "
    "it is instance normalisation with BatchNorm's affine parameters",
}


# --- the network that is exported ---------------------------------------------------------------------


class DeployBlock(nn.Module):
    """conv (with bias) -> optional instance norm (with optional affine) -> activation, in plain ops.

    What a :class:`ConvBlock` becomes in an exported network: under ``eval`` a BatchNorm is folded into
    the conv (no norm here), under ``paper`` it becomes ``instance_norm`` with its weight and bias
    (``from_batch_norm``: the batch statistics of a batch of one).
    """

    def __init__(
        self,
        conv: nn.Conv2d | nn.ConvTranspose2d,
        negative_slope: float,
        *,
        instance_norm: bool = False,
        norm_weight: torch.Tensor | None = None,
        norm_bias: torch.Tensor | None = None,
        eps: float = 1e-5,
        from_batch_norm: bool = False,
    ) -> None:
        super().__init__()
        self.conv = conv
        self.negative_slope = float(negative_slope)
        self.instance_norm = instance_norm
        self.from_batch_norm = from_batch_norm
        self.eps = float(eps)
        self.norm_weight = None if norm_weight is None else nn.Parameter(norm_weight, requires_grad=False)
        self.norm_bias = None if norm_bias is None else nn.Parameter(norm_bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.instance_norm:
            y = F.instance_norm(y, weight=self.norm_weight, bias=self.norm_bias, eps=self.eps)
        return activation(y, self.negative_slope)

    def extra_repr(self) -> str:
        return f"instance_norm={self.instance_norm}, negative_slope={self.negative_slope}"


def fold_batch_norm(
    conv: nn.Conv2d | nn.ConvTranspose2d, bn: nn.BatchNorm2d
) -> nn.Conv2d | nn.ConvTranspose2d:
    """A copy of ``conv`` computing ``bn(conv(x))`` with ``bn``'s running statistics, as one conv with bias.

    BatchNorm in eval is ``y * s + (beta - mean * s)`` with ``s = gamma / sqrt(var + eps)`` per output
    channel; the scale goes into the weight's output-channel axis (dim 0 of a Conv2d weight, dim 1 of a
    ConvTranspose2d weight) and the shift into the bias. Computed in float64 so the only rounding is the
    final cast to the conv's dtype.
    """
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("fold_batch_norm: the BatchNorm has no running statistics to fold")
    dtype = conv.weight.dtype
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(bn.running_var).double()
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(bn.running_mean).double()
    scale = gamma / torch.sqrt(bn.running_var.double() + bn.eps)
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(scale)
    shape = (1, -1, 1, 1) if isinstance(conv, nn.ConvTranspose2d) else (-1, 1, 1, 1)
    folded = copy.deepcopy(conv)
    folded.weight = nn.Parameter((conv.weight.detach().double() * scale.view(shape)).to(dtype))
    folded.bias = nn.Parameter((beta + (bias - bn.running_mean.double()) * scale).to(dtype))
    return folded.requires_grad_(False)


def _deploy_block(block: ConvBlock, protocol: str) -> DeployBlock:
    conv = copy.deepcopy(block.conv).requires_grad_(False)
    norm = block.norm
    if isinstance(norm, nn.BatchNorm2d):
        if protocol == "eval":
            return DeployBlock(fold_batch_norm(conv, norm), block.negative_slope)
        weight = None if norm.weight is None else norm.weight.detach().clone()
        bias = None if norm.bias is None else norm.bias.detach().clone()
        return DeployBlock(
            conv, block.negative_slope, instance_norm=True, norm_weight=weight, norm_bias=bias, eps=norm.eps,
            from_batch_norm=True,
        )  # fmt: skip
    if isinstance(norm, nn.InstanceNorm2d):  # the official InstanceNorm: no affine, no running statistics
        return DeployBlock(conv, block.negative_slope, instance_norm=True, eps=norm.eps)
    return DeployBlock(conv, block.negative_slope)


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {PROTOCOLS}")


def deploy_network(G: nn.Module, protocol: str = "eval", dropout: bool = False) -> nn.Module:
    """A copy of generator ``G`` in plain PyTorch ops (same device and dtype), in eval mode, computing
    ``protocol``.

    ``eval``: G.eval()'s function, BatchNorm folded. ``paper``: G.train()'s function at batch 1 (batch
    statistics), without touching any running statistics. ``dropout`` keeps the generator's dropout
    layers (if it has them) active; otherwise there is no dropout. G itself is not changed.
    """
    _check_protocol(protocol)
    if not isinstance(G, UnetGenerator | ResnetGenerator):
        raise TypeError(f"deploy_network needs a fastpix2pix generator, got {type(G).__name__}")
    net = copy.deepcopy(G).eval()
    blocks = [(name, m) for name, m in net.named_modules() if isinstance(m, ConvBlock)]
    for name, block in blocks:
        parent_name, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent_name), child, _deploy_block(block, protocol))
    # Dropout follows keep_dropout_in_eval in an eval-mode generator (see generators._dropout_active).
    net.use_dropout = bool(G.use_dropout and dropout)
    net.keep_dropout_in_eval = True
    net.fastpix2pix_protocol = protocol
    return net.requires_grad_(False)


def has_batch_norm(G: nn.Module) -> bool:
    return any(isinstance(m, nn.BatchNorm2d) for m in G.modules())


def min_size(G: nn.Module) -> int:
    """The smallest side G takes: one multiple for a U-Net (1x1 innermost), two for a ResNet (its 3x3
    reflection pads need at least 2x2 at the bottleneck)."""
    multiple = int(G.size_multiple)
    return 2 * multiple if isinstance(G, ResnetGenerator) else multiple


def check_export_size(G: nn.Module, height: int, width: int) -> None:
    """A ValueError naming the sizes G takes, for an example input it cannot take."""
    multiple, smallest = int(G.size_multiple), min_size(G)
    bad = [(n, v) for n, v in (("height", height), ("width", width)) if v % multiple or v < smallest]
    if bad:
        what = ", ".join(f"{n} {v}" for n, v in bad)
        raise ValueError(
            f"{type(G).__name__} cannot take {height}x{width} ({what}): sides must be multiples of "
            f"{multiple}, at least {smallest}; other sizes are padded outside the exported graph"
        )


def check_export_batch(G: nn.Module, protocol: str, batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    if protocol == "paper" and batch_size != 1 and has_batch_norm(G):
        raise ValueError(
            f"--protocol paper exports batch 1 only (got batch {batch_size}): with BatchNorm, the paper's "
            "protocol normalises with the whole test batch's statistics, which is instance normalisation "
            "only at batch 1; use --protocol eval for batched inference"
        )


# --- metadata ---------------------------------------------------------------------------------------


def build_metadata(
    G: nn.Module,
    fmt: str,
    protocol: str,
    dropout: bool,
    dynamic_batch: bool,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything a user needs to run the file on an image, as plain JSON data."""
    from fastpix2pix.checkpoint import package_version

    channels_in = int(_first_conv(G).in_channels)
    channels_out = int(_last_conv(G).out_channels)
    order = {1: "L (grayscale)", 3: "RGB"}
    meta: dict[str, Any] = {
        "metadata_version": METADATA_VERSION,
        "producer": f"fastpix2pix {package_version()}, torch {torch.__version__}",
        "format": fmt,
        "protocol": protocol,
        "protocol_description": PROTOCOL_TEXT[protocol],
        "dropout": bool(dropout and G.use_dropout),
        "dropout_note": "stochastic dropout (p=0.5) where the generator has it"
        if dropout and G.use_dropout
        else "no dropout (deterministic)",
        "generator": type(G).__name__,
        "input": {
            "name": INPUT_NAME,
            "layout": "NCHW",
            "dtype": "float32",
            "channels": channels_in,
            "channel_order": order.get(channels_in, "unknown"),
            "batch": "dynamic" if dynamic_batch else 1,
            "size_multiple": int(G.size_multiple),
            "min_size": min_size(G),
            "scaling": "x / max * 2 - 1 (max 255 for 8-bit, 65535 for 16-bit images): values in [-1, 1]",
            "padding": "sides not a multiple of size_multiple (or below min_size): reflect-pad at the "
            "bottom and right to the next multiple, then crop the output back to the input size",
        },
        "output": {
            "name": OUTPUT_NAME,
            "layout": "NCHW",
            "dtype": "float32",
            "channels": channels_out,
            "channel_order": order.get(channels_out, "unknown"),
            "range": [-1.0, 1.0],
            "postprocess": "clamp to [-1, 1], (y + 1) / 2 * 255, round to uint8",
        },
    }
    meta.update(extra or {})
    return meta


def _convs(G: nn.Module) -> list[nn.Module]:
    return [m for m in G.modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)]


def _first_conv(G: nn.Module) -> Any:
    return _convs(G)[0]


def _last_conv(G: nn.Module) -> Any:
    return _convs(G)[-1]


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The fastpix2pix metadata of an exported ``.onnx`` or ``.pt2`` file."""
    from fastpix2pix.deploy import read_metadata as read

    return read(path)


# --- exporting --------------------------------------------------------------------------------------


def _dynamic_shapes(G: nn.Module, dynamic_batch: bool) -> dict[str, dict[int, Any]]:
    """Height and width as multiples of size_multiple (so the size checks hold symbolically)."""
    from torch.export import Dim

    multiple = int(G.size_multiple)
    low = min_size(G) // multiple
    shapes: dict[int, Any] = {
        2: multiple * Dim("height_blocks", min=low, max=2**14 // multiple),
        3: multiple * Dim("width_blocks", min=low, max=2**14 // multiple),
    }
    if dynamic_batch:
        shapes[0] = Dim("batch", min=1, max=4096)
    return {"x": shapes}


def trace_example(net: nn.Module, dynamic_batch: bool) -> torch.Tensor:
    """The input ``torch.export`` traces with: 2 on every dynamic axis, since an example size of 1
    would be specialised (fixed) in the graph. Only its shape matters."""
    multiple = int(net.size_multiple)
    side = multiple * max(2, min_size(net) // multiple)
    return torch.zeros(2 if dynamic_batch else 1, int(_first_conv(net).in_channels), side, side)


def exported_program(net: nn.Module, dynamic_batch: bool) -> torch.export.ExportedProgram:
    """``torch.export`` of a :func:`deploy_network` with dynamic height/width (and batch).

    Traced with size-oblivious shape reasoning: otherwise the tracer guards that each dynamic size is
    not 1 (broadcast and contiguity checks), and a program traced at 2 blocks refuses an input of one
    block (256x256 for unet_256), the most common size. The convolutions do not depend on it.
    """
    from torch.fx.experimental import _config as fx_config

    example = trace_example(net, dynamic_batch)
    with torch.no_grad(), fx_config.patch(backed_size_oblivious=True), _quiet_exporter():
        return torch.export.export(net, (example,), dynamic_shapes=_dynamic_shapes(net, dynamic_batch))


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporters' logged warnings that say nothing about this model (e.g. "torchvision is
    not installed. Skipping torchvision::nms"); errors still propagate."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def onnx_model_bytes(
    net: nn.Module,
    dynamic_batch: bool,
    metadata: dict[str, Any] | None = None,
    dropout_seed: int | None = None,
    program: torch.export.ExportedProgram | None = None,
    optimize: bool = True,
) -> bytes:
    """The ONNX model of a :func:`deploy_network` (dynamo exporter), with ``metadata`` attached.

    Dropout nodes become explicit random masks (see :func:`_explicit_dropout`); ``dropout_seed`` seeds
    them (one seed per node, so a session's sequence of outputs is reproducible), else they are random.
    ``program``: ``net``'s :func:`exported_program`, if already made. ``optimize``: run the ONNX
    optimizer (constant folding, dead code; 1-2 s for a U-Net); ONNX Runtime optimizes at load anyway.
    """
    try:
        import onnx  # noqa: F401  (the exporter needs it, and onnxscript)
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f"ONNX export needs onnx and onnxscript ({error}); pip install 'fastpix2pix[export]'"
        ) from error
    program = program or exported_program(net, dynamic_batch)
    with _quiet_exporter():
        onnx_program = torch.onnx.export(
            program, (trace_example(net, dynamic_batch),), input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME], dynamo=True, external_data=False, optimize=optimize, verbose=False,
        )  # fmt: skip
    model = onnx_program.model_proto
    _explicit_dropout(model, dropout_seed)
    if metadata is not None:
        opset = next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))
        entry = model.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, json.dumps({**metadata, "onnx_opset": int(opset)})
    return model.SerializeToString()


def _explicit_dropout(model: Any, seed: int | None) -> None:
    """Replace each ONNX ``Dropout`` by ``x * (RandomUniformLike(x) >= p) / (1 - p)``, in place.

    ONNX Runtime's graph optimizer (any level above ORT_DISABLE_ALL) deletes Dropout nodes even with
    ``training_mode`` true, so a stochastic export would silently run without dropout (checked with
    onnxruntime 1.32). The explicit mask is what ``torch.nn.functional.dropout`` computes, with its own
    random numbers.
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    nodes = []
    for index, node in enumerate(graph.node):
        if node.op_type != "Dropout":
            nodes.append(node)
            continue
        p = float(constants[node.input[1]]) if len(node.input) > 1 and node.input[1] else 0.5
        x, y, name = node.input[0], node.output[0], f"fastpix2pix_dropout_{index}"
        uniform = {"dtype": TensorProto.FLOAT, "low": 0.0, "high": 1.0}
        if seed is not None:
            uniform["seed"] = float(seed + index)
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.array(p, np.float32), f"{name}_p"),
                numpy_helper.from_array(np.array(1.0 / (1.0 - p), np.float32), f"{name}_scale"),
            ]
        )
        nodes += [
            helper.make_node("RandomUniformLike", [x], [f"{name}_u"], name=f"{name}_u", **uniform),
            helper.make_node("GreaterOrEqual", [f"{name}_u", f"{name}_p"], [f"{name}_keep"]),
            helper.make_node("Cast", [f"{name}_keep"], [f"{name}_mask"], to=TensorProto.FLOAT),
            helper.make_node("Mul", [x, f"{name}_mask"], [f"{name}_kept"]),
            helper.make_node("Mul", [f"{name}_kept", f"{name}_scale"], [y], name=name),
        ]
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    unused = [init for init in graph.initializer if init.name not in used]  # the Dropouts' p, training_mode
    for init in unused:
        graph.initializer.remove(init)


def _torch_export_bytes(net: nn.Module, dynamic_batch: bool, metadata: dict[str, Any]) -> bytes:
    program = exported_program(net, dynamic_batch)
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={METADATA_FILE: json.dumps(metadata)})
    return buffer.getvalue()


def _write_atomically(path: Path, data: bytes, check: Callable[[Path], None]) -> None:
    """Write ``data`` to a temporary file beside ``path``, run ``check`` on it, then rename it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        check(Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@dataclass
class ExportResult:
    path: Path
    metadata: dict[str, Any]
    max_abs_diff: float | None  # exported file vs PyTorch on the example input (None: not checked)


def export_generator(
    G: nn.Module,
    path: str | os.PathLike[str],
    *,
    fmt: str = "onnx",
    protocol: str = "eval",
    dropout: bool = False,
    batch_size: int = 1,
    height: int | None = None,
    width: int | None = None,
    extra_metadata: dict[str, Any] | None = None,
    verify: bool = True,
    dropout_seed: int | None = None,
) -> ExportResult:
    """Export generator ``G`` to ``path`` in format ``fmt`` (see :data:`FORMATS`) under ``protocol``.

    The example input is ``batch_size x C x height x width`` (default: the smallest size G takes);
    batch (eval only), height and width stay dynamic. With ``verify`` the written file is run on the
    example input (ONNX through ONNX Runtime when it is installed) and must match the PyTorch network
    within :data:`VERIFY_TOLERANCE`, except for stochastic (dropout) exports. Every check runs before
    the file appears under ``path``: on an error nothing is written.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {FORMATS}")
    _check_protocol(protocol)
    if not isinstance(G, UnetGenerator | ResnetGenerator):
        raise TypeError(f"export needs a fastpix2pix generator, got {type(G).__name__}")
    height = height or min_size(G)
    width = width or height
    check_export_size(G, height, width)
    check_export_batch(G, protocol, batch_size)
    dynamic_batch = protocol == "eval" or not has_batch_norm(G)
    net = deploy_network(G, protocol, dropout).cpu().float()
    metadata = build_metadata(G, fmt, protocol, dropout, dynamic_batch, extra_metadata)
    example = torch.randn(batch_size, int(_first_conv(G).in_channels), height, width, generator=_seeded())
    if fmt == "onnx":
        data = onnx_model_bytes(net, dynamic_batch, metadata, dropout_seed)
    else:
        data = _torch_export_bytes(net, dynamic_batch, metadata)
    stochastic = bool(metadata["dropout"])
    result = ExportResult(Path(path), metadata, None)

    def check(temporary: Path) -> None:
        if verify and not stochastic:
            result.max_abs_diff = _verify(temporary, fmt, net, example)

    _write_atomically(Path(path), data, check)
    return result


def _seeded() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _verify(path: Path, fmt: str, net: nn.Module, example: torch.Tensor) -> float | None:
    with torch.no_grad():
        expected = net(example)
    if fmt == "onnx":
        from fastpix2pix.deploy import OnnxRunner

        try:
            runner = OnnxRunner(path)
        except ImportError:
            return None  # no onnxruntime: the file is written unchecked (export itself needs only onnx)
        actual = torch.from_numpy(runner.run(example.numpy()))
    else:
        with torch.no_grad():
            actual = torch.export.load(path).module()(example)
    diff = float((actual - expected).abs().max())
    if not diff <= VERIFY_TOLERANCE:
        raise ValueError(
            f"the exported {fmt} model differs from PyTorch by {diff:.3g} (max abs) on a test input, more "
            f"than {VERIFY_TOLERANCE}; nothing written"
        )
    return diff


# --- command line -----------------------------------------------------------------------------------


@dataclass
class ExportOptions(ArchitectureOptions, RunOptions):
    """``fastpix2pix export``: a trained generator (checkpoint or official *_net_G.pth) as an ONNX or
    torch.export file, checked against PyTorch before it is written.

    Architecture options left at their defaults are taken from a full checkpoint; an official
    *_net_G.pth records none, so give them (--netG, --ngf, --norm, --input_nc, --output_nc).
    """

    format: str = option("onnx", "file format: onnx (ONNX Runtime etc.) or torch-export (.pt2)", FORMATS)
    direction: str = option(
        "AtoB", "recorded in the metadata: which half of a paired A|B image is the input", DIRECTIONS
    )
    protocol: str = option(
        "eval",
        "eval: BatchNorm running statistics, folded into the convs (any batch size); paper: statistics of "
        "the test batch as in the paper and `fastpix2pix test` (batch 1: instance normalisation with "
        "BatchNorm's affine parameters)",
        PROTOCOLS,
    )
    dropout: bool = option(
        False, "keep the generator's dropout (stochastic outputs, as the official test); default: off"
    )
    output: str | None = option(
        None,
        "output file; default: beside the weights, <epoch>_net_G_<protocol>[_dropout].onnx|.pt2",
    )
    batch_size: int = option(1, "batch of the example input (eval exports take any batch anyway)")
    size: int | None = option(
        None, "side of the square example input (default: the smallest the generator takes)"
    )
    no_verify: bool = option(False, "skip the check of the written file against PyTorch")


def default_output(opt: ExportOptions) -> Path:
    suffix = f"_{opt.protocol}{'_dropout' if opt.dropout else ''}{SUFFIXES[opt.format]}"
    if opt.load_official:
        source = Path(opt.load_official)
        return source.with_name(source.stem + suffix)
    return Path(opt.checkpoints_dir) / opt.name / f"{opt.epoch}_net_G{suffix}"


def load_for_export(opt: ExportOptions) -> tuple[nn.Module, ExportOptions, str]:
    """The generator to export (on the CPU), the completed options, and where its weights came from.

    A file that is not a generator checkpoint is a ValueError that says so.
    """
    from fastpix2pix.inference import load_generator

    try:
        return load_generator(dataclasses.replace(opt, backend="reference"), torch.device("cpu"))
    except ValueError as error:
        source = opt.load_official or str(Path(opt.checkpoints_dir) / opt.name)
        raise ValueError(
            f"{source} is not a {opt.netG} generator checkpoint with these options ({error})"
        ) from error
    except Exception as error:  # a file torch.load cannot read at all
        if not opt.load_official:
            raise
        raise ValueError(
            f"{opt.load_official} is not a generator checkpoint: torch.load cannot read it "
            f"({type(error).__name__})"
        ) from error


def run_export(opt: ExportOptions, *, say: Callable[[str], Any] = print) -> ExportResult:
    """``fastpix2pix export``: load, export, verify, write; returns where and what."""
    G, opt, source = load_for_export(opt)
    path = Path(opt.output) if opt.output else default_output(opt)
    extra = {
        "source": source,
        "netG": opt.netG,
        "norm": opt.norm,
        "ngf": opt.ngf,
        "direction": opt.direction,
    }
    result = export_generator(
        G, path, fmt=opt.format, protocol=opt.protocol, dropout=opt.dropout, batch_size=opt.batch_size,
        height=opt.size, width=opt.size, extra_metadata=extra, verify=not opt.no_verify,
        dropout_seed=opt.seed,
    )  # fmt: skip
    check = (
        f"matches PyTorch within {result.max_abs_diff:.2g}"
        if result.max_abs_diff is not None
        else "not checked against PyTorch"
    )
    say(
        f"exported {source} ({opt.netG}, protocol {opt.protocol}, {result.metadata['dropout_note']}) "
        f"to {path} ({path.stat().st_size / 1e6:.1f} MB); {check}"
    )
    return result


def build_export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastpix2pix export", description=ExportOptions.__doc__, formatter_class=HelpFormatter
    )
    return build_parser(ExportOptions, parser)  # type: ignore[type-var]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fastpix2pix export`` (parses its own options)."""
    args = build_export_parser().parse_args(argv)
    names = {f.name for f in dataclasses.fields(ExportOptions)}
    opt = ExportOptions(**{k: v for k, v in vars(args).items() if k in names})
    try:
        run_export(opt)
    except (FileNotFoundError, ValueError, TypeError, ImportError) as error:
        if os.environ.get("FASTPIX2PIX_DEBUG") or getattr(opt, "debug", False):
            raise
        print(f"fastpix2pix export: error: {error}", file=sys.stderr)
        return 1
    return 0
