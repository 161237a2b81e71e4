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

import contextlib
import io
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.export import Dim
from torch.fx.experimental import _config as fx_config

# The runner reads what this module writes: the metadata names are defined once, there.
from fastpix2pix.deploy import METADATA_FILE, METADATA_KEY, OnnxRunner, read_metadata
from fastpix2pix.inference.deploy_net import (
    PROTOCOL_TEXT,
    check_export_batch,
    check_protocol,
    deploy_network,
    has_batch_norm,
)
from fastpix2pix.models.generators import ResnetGenerator, UnetGenerator
from fastpix2pix.models.size import min_size
from fastpix2pix.runtime import atomic_write, package_version

__all__ = ["FORMATS", "METADATA_KEY", "export_generator", "onnx_model_bytes", "read_metadata"]

FORMATS = ("onnx", "torch-export")
SUFFIXES = {"onnx": ".onnx", "torch-export": ".pt2"}
METADATA_VERSION = 1
INPUT_NAME, OUTPUT_NAME = "real_A", "fake_B"
VERIFY_TOLERANCE = 1e-4  # max |exported - PyTorch| accepted by the check after every export


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


# --- exporting --------------------------------------------------------------------------------------


def _dynamic_shapes(G: nn.Module, dynamic_batch: bool) -> dict[str, dict[int, Any]]:
    """Height and width as multiples of size_multiple (so the size checks hold symbolically)."""
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
    check_protocol(protocol)
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

    atomic_write(Path(path), lambda file: file.write(data), check)
    return result


def _seeded() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _verify(path: Path, fmt: str, net: nn.Module, example: torch.Tensor) -> float | None:
    with torch.no_grad():
        expected = net(example)
    if fmt == "onnx":
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
