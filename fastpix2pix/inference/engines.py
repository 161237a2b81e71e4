"""The engines of ``fastpix2pix test/predict --engine``: what computes a trained generator at inference.

- ``torch`` (default): the generator in plain PyTorch with BatchNorm folded under ``--eval``
  (:func:`fastpix2pix.inference.deploy_net.deploy_network`). On a CPU with oneDNN every convolution is a
  oneDNN convolution with its weights packed once per input shape and its activation fused in as a post-op
  (:class:`OneDnnBlock`, channels_last activations: the ops ``torch.compile``'s freezing pass emits
  for convolutions on the CPU, without a compile per input shape); under the paper's protocol the
  test batch's statistics and the activation follow as the fused ``bn_stats`` + ``bn_act_forward``
  kernels. Elsewhere (CUDA): ``--eval`` runs the folded network on the ordinary ops, the paper's
  protocol ``G`` itself in train mode (the fused ops).
- ``onnxruntime``: the generator exported to ONNX (:mod:`fastpix2pix.inference.export`) in an ONNX Runtime
  session.

Both compute the function of ``G.eval()`` (``--eval``) or of ``G.train()`` (the paper's protocol, dropout
on; each engine draws its own dropout masks). Chosen by measurement (``benchmarks/bench_inference.py``,
``results/inference_cpu_2026-12-04_candidates.json``: unet_256, 256 px, batch 1, 2 threads): BatchNorm
folded + channels_last eager, ``torch.jit.freeze`` and ``torch.compile`` with freezing were each
1.2-1.3x the official eager network, the oneDNN blocks 2.05x (eval) and 1.55x (paper).

``--precision`` (:func:`resolve_precision`): the torch engine's oneDNN blocks compute in float32 or in
bfloat16. In bf16 each convolution is a oneDNN bf16 convolution (packed bf16 weights, float32 bias, the
activation fused; oneDNN picks AMX, AVX512-BF16 or its own emulation at run time), the activations pass
between blocks in bf16, batch statistics are float32 (the fused kernels read bf16), and the first and
last convolutions, the image in and out, stay float32 (:data:`FLOAT32_ENDS`). Where torch's oneDNN
refuses bf16 (a CPU without AVX-512) it is emulated: weights and activations rounded to bf16,
convolutions in float32. ``auto`` is bf16 where the CPU computes it faster than float32
(:func:`fastpix2pix.runtime.bf16_faster_than_fp32`), float32 elsewhere; the onnxruntime engine, the GPU
and the exports compute float32 only.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastpix2pix._extension import extension_available
from fastpix2pix.deploy import OnnxRunner
from fastpix2pix.inference.deploy_net import DeployBlock, check_export_batch, deploy_network, has_batch_norm
from fastpix2pix.inference.export import onnx_model_bytes
from fastpix2pix.models.size import SizeRule, input_channels, size_rule
from fastpix2pix.ops.reference import activation
from fastpix2pix.runs.options import ENGINES, PRECISIONS
from fastpix2pix.runtime import BF16_KINDS, Precision, cpu_auto_precision, cpu_bf16_support

__all__ = [
    "Engine",
    "OneDnnBlock",
    "Precision",
    "build_engine",
    "onednn_available",
    "onednn_takes_bf16",
    "resolve_precision",
    "torch_network",
]

PACKED_SHAPES = 4  # packed weights kept per block: one set per input shape, the least recent dropped
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FLOAT32_ENDS = True
"""In bf16, the first and the last convolution (the image in, the image out) compute in float32."""


class Engine:
    """A built engine: ``engine(x)`` is the generator's float32 output for an ``(N, C, H, W)`` float32
    batch in [-1, 1] on ``device``. Also what :func:`~fastpix2pix.inference.translate.translate` needs to
    pad any image for it: ``size_rule`` and ``input_nc``."""

    def __init__(
        self,
        run: Callable[[torch.Tensor], torch.Tensor],
        *,
        name: str,
        precision: Precision,
        device: torch.device,
        size_rule: SizeRule,
        input_nc: int,
    ) -> None:
        self._run = run
        self.name, self.precision, self.device = name, precision, device
        self.size_rule, self.input_nc = size_rule, input_nc

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x)

    def describe(self) -> str:
        """``engine torch, precision bf16 (auto: ...)``: the start-up line's words."""
        return f"engine {self.name}, precision {self.precision}"

    def __repr__(self) -> str:
        return f"Engine({self.describe()}, device {self.device})"


def build_engine(
    G: nn.Module,
    engine: str,
    *,
    eval_mode: bool,
    device: torch.device,
    seed: int = 0,
    batch_size: int = 1,
    precision: str = "fp32",
) -> Engine:
    """An :class:`Engine`: a function from an input batch to ``G``'s output under ``--eval``
    (``eval_mode``) or the paper's protocol, computed in ``precision`` (``fp32``, ``bf16`` or ``auto``:
    :func:`resolve_precision`; fp32 by default, so that a script's values do not depend on the CPU).
    ``seed`` seeds the onnxruntime engine's dropout; ``batch_size`` is checked against what its export
    takes (the paper protocol's: 1). The engines work on copies of ``G``, except the torch engine under
    the paper's protocol without oneDNN (see :func:`torch_network`)."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {ENGINES}")
    chosen = resolve_precision(precision, engine, device, _parameter_dtype(G))
    facts = {"name": engine, "precision": chosen, "device": device, "size_rule": size_rule(G)}
    facts["input_nc"] = input_channels(G)
    if engine == "torch":
        net = torch_network(G, eval_mode, device, chosen.name)
        layout = torch.channels_last if _uses_onednn(net) else torch.contiguous_format
        if chosen.name == "fp32":
            return Engine(lambda x: net(x.contiguous(memory_format=layout)), **facts)
        return Engine(lambda x: net(x.contiguous(memory_format=layout)).float(), **facts)
    return Engine(_onnxruntime_engine(G, eval_mode, device, seed, batch_size), **facts)


def _parameter_dtype(G: nn.Module) -> torch.dtype:
    return next(G.parameters()).dtype


def resolve_precision(
    requested: str, engine: str, device: torch.device, dtype: torch.dtype = torch.float32
) -> Precision:
    """What ``--precision requested`` computes in with ``--engine engine`` on ``device`` for a generator
    whose parameters are ``dtype``, and why.

    ``fp32`` is float32. ``bf16`` is bfloat16 on the torch engine's oneDNN blocks (a float32 generator
    on a CPU with oneDNN; anything else is an error): native where the CPU has AMX or AVX512-BF16,
    emulated (slower) elsewhere. ``auto`` is bf16 where the CPU computes it faster than float32
    (:func:`fastpix2pix.runtime.bf16_faster_than_fp32`: AMX; AVX512-BF16 on AMD), fp32 elsewhere.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r}; choose one of {PRECISIONS}")
    if requested == "fp32":
        return Precision("fp32", "--precision fp32")
    if engine == "onnxruntime":
        if requested == "bf16":
            raise ValueError(
                "--precision bf16 needs --engine torch: the onnxruntime engine (as every export) computes "
                "float32; use --precision fp32 or auto with it"
            )
        return Precision("fp32", "auto: the onnxruntime engine computes float32")
    if not (onednn_available(device) and dtype == torch.float32):
        where = f"a {str(dtype).removeprefix('torch.')} generator on {device}"
        if requested == "bf16":
            raise ValueError(
                f"--precision bf16 runs on the torch engine's oneDNN blocks: a float32 generator on a CPU "
                f"with oneDNN; here it is {where} (use --precision fp32 or auto)"
            )
        return Precision("fp32", f"auto: bf16 is for the CPU's oneDNN blocks, not {where}")
    if requested == "bf16":
        return Precision("bf16", f"--precision bf16; this CPU's bf16 is {BF16_KINDS[cpu_bf16_support()]}")
    return cpu_auto_precision()


# --- torch ------------------------------------------------------------------------------------------


def onednn_available(device: torch.device) -> bool:
    """The oneDNN fused-convolution ops exist here (a CPU build of PyTorch with mkldnn)."""
    return (
        device.type == "cpu"
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
    )


def onednn_takes_bf16() -> bool:
    """torch's oneDNN convolutions take bf16 here (a CPU with AVX-512 or AVX-NE-CONVERT; oneDNN itself
    emulates the bf16 products where the CPU lacks them); elsewhere the bf16 blocks emulate it in float32."""
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(probe is not None and probe())
    except RuntimeError:
        return False


def torch_network(
    G: nn.Module,
    eval_mode: bool,
    device: torch.device,
    precision: str = "fp32",
    *,
    float32_ends: bool = FLOAT32_ENDS,
) -> nn.Module:
    """The ``torch`` engine's network (see the module docstring) in ``precision`` (``fp32`` or ``bf16``,
    bf16 needing oneDNN; ``float32_ends``: its first and last convolution in float32). Under the paper's
    protocol without oneDNN it is ``G`` itself in train mode (the fused ops; the in-memory running
    statistics move, as in the official test)."""
    onednn = onednn_available(device) and _parameter_dtype(G) == torch.float32
    if precision not in DTYPES:
        raise ValueError(f"torch_network: precision must be one of {tuple(DTYPES)}, got {precision!r}")
    if precision == "bf16" and not onednn:
        raise ValueError("bf16 runs on the oneDNN blocks: a float32 generator on a CPU with oneDNN")
    if not eval_mode and not onednn:
        return G.train()
    net = deploy_network(G, "eval" if eval_mode else "paper", dropout=not eval_mode).to(device)
    if onednn:
        blocks = [(n, m) for n, m in net.named_modules() if isinstance(m, DeployBlock)]
        for index, (name, block) in enumerate(blocks):
            parent, _, child = name.rpartition(".")
            if precision == "bf16" and float32_ends and index in (0, len(blocks) - 1):
                # the image in (its output goes on in bf16) and the image out (float32 to the end)
                out = torch.bfloat16 if index == 0 and len(blocks) > 1 else torch.float32
                onednn_block = OneDnnBlock(block, "fp32", output_dtype=out)
            else:
                onednn_block = OneDnnBlock(block, precision)
            setattr(net.get_submodule(parent), child, onednn_block)
        net.to(memory_format=torch.channels_last)
    return net


def _uses_onednn(net: nn.Module) -> bool:
    return any(isinstance(m, OneDnnBlock) for m in net.modules())


class OneDnnBlock(nn.Module):
    """A :class:`DeployBlock` on oneDNN: weights packed for the input shape, activation fused.

    Norm-free (and folded) blocks are one ``mkldnn._convolution_pointwise`` (or its transposed twin)
    with the activation as a post-op; normalised blocks are the convolution, then the norm and the
    activation. A block that was a BatchNorm normalises with the statistics of the whole batch (as
    ``G.train()``; the exported instance norm equals it at batch 1 only), with the fused ``bn_stats`` +
    ``bn_act_forward`` kernels where they are built.

    ``precision`` ``bf16``: the input is cast to bf16 and the convolution runs on bf16 weights (the bias,
    the statistics and the norm's parameters stay float32); where torch's oneDNN takes no bf16
    (:func:`onednn_takes_bf16`) the block emulates it: weights rounded to bf16, the convolution in
    float32, the output rounded to bf16. The output is in ``output_dtype`` (default: the precision's).
    """

    def __init__(self, block: DeployBlock, precision: str = "fp32", output_dtype: torch.dtype | None = None):
        super().__init__()
        conv = block.conv
        self.precision = precision
        dtype = DTYPES[precision]
        emulated = dtype != torch.float32 and not onednn_takes_bf16()
        self.compute_dtype = torch.float32 if emulated else dtype
        self.output_dtype = output_dtype or dtype
        self.transposed = isinstance(conv, nn.ConvTranspose2d)
        weight = conv.weight.detach().float().to(dtype).to(self.compute_dtype)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach(), requires_grad=False)
        self.padding, self.stride = list(conv.padding), list(conv.stride)
        self.output_padding = list(conv.output_padding) if self.transposed else []
        self.negative_slope = block.negative_slope
        self.norm = "batch" if block.from_batch_norm else "instance" if block.instance_norm else "none"
        self.norm_weight, self.norm_bias, self.eps = block.norm_weight, block.norm_bias, block.eps
        self._packed: collections.OrderedDict[tuple[int, ...], torch.Tensor] = collections.OrderedDict()

    def _packed_weight(self, x: torch.Tensor) -> torch.Tensor:
        """The weight in oneDNN's layout for this input shape (packed once, the last few kept)."""
        key = tuple(x.shape)
        packed = self._packed.get(key)
        if packed is None:
            mkldnn = torch.ops.mkldnn
            if self.transposed:
                packed = mkldnn._reorder_convolution_transpose_weight(
                    self.weight, self.padding, self.output_padding, self.stride, [1, 1], 1, list(key)
                )
            else:
                packed = mkldnn._reorder_convolution_weight(
                    self.weight, self.padding, self.stride, [1, 1], 1, list(key)
                )
            self._packed[key] = packed
            if len(self._packed) > PACKED_SHAPES:
                self._packed.popitem(last=False)
        else:
            self._packed.move_to_end(key)
        return packed

    def _conv(self, x: torch.Tensor, attr: str, scalars: list[Any]) -> torch.Tensor:
        mkldnn, weight = torch.ops.mkldnn, self._packed_weight(x)
        if self.transposed:
            return mkldnn._convolution_transpose_pointwise(
                x,
                weight,
                self.bias,
                self.padding,
                self.output_padding,
                self.stride,
                [1, 1],
                1,
                attr,
                scalars,
                "",
            )
        return mkldnn._convolution_pointwise(
            x, weight, self.bias, self.padding, self.stride, [1, 1], 1, attr, scalars, ""
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.compute_dtype)
        if self.norm == "none":
            y = self._conv(x, *_post_op(self.negative_slope))
        else:
            y = self._conv(x, "none", [])
            if self.norm == "batch":
                y = _batch_norm_act(y, self.norm_weight, self.norm_bias, self.eps, self.negative_slope)
            else:
                y = activation(F.instance_norm(y, eps=self.eps), self.negative_slope)
        return y.to(self.output_dtype)

    def extra_repr(self) -> str:
        return (
            f"transposed={self.transposed}, norm={self.norm}, negative_slope={self.negative_slope}, "
            f"precision={self.precision}, compute={self.compute_dtype}, output={self.output_dtype}"
        )


def _batch_norm_act(
    y: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, negative_slope: float
) -> torch.Tensor:
    """BatchNorm with the batch's statistics (no running statistics), then the activation."""
    if extension_available():
        mean, var = torch.ops.fastpix2pix.bn_stats(y)
        return torch.ops.fastpix2pix.bn_act_forward(y, mean, var, weight, bias, eps, negative_slope)
    return activation(F.batch_norm(y, None, None, weight, bias, True, 0.0, eps), negative_slope)


def _post_op(negative_slope: float) -> tuple[str, list[Any]]:
    """The oneDNN post-op computing LeakyReLU(``negative_slope``) (0 is ReLU, 1 the identity)."""
    if negative_slope == 1.0:
        return "none", []
    if negative_slope == 0.0:
        return "relu", []
    return "leaky_relu", [negative_slope]


# --- onnxruntime ------------------------------------------------------------------------------------


def _onnxruntime_engine(
    G: nn.Module, eval_mode: bool, device: torch.device, seed: int, batch_size: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    protocol = "eval" if eval_mode else "paper"
    try:
        check_export_batch(G, protocol, batch_size)
    except ValueError as error:
        raise ValueError(f"--engine onnxruntime: {error} (or --engine torch)") from None
    dropout = not eval_mode  # the paper's protocol keeps dropout on, as G.train() does
    net = deploy_network(G, protocol, dropout).cpu().float()
    # Not optimized here: the session optimizes the graph itself (measured: the same speed, 1-2 s sooner).
    model = onnx_model_bytes(net, eval_mode or not has_batch_norm(G), dropout_seed=seed, optimize=False)
    runner = OnnxRunner(model, providers=_onnxruntime_providers(device))

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(runner.run(x.detach().float().cpu().numpy())).to(x.device)

    return run


def _onnxruntime_providers(device: torch.device) -> tuple[str, ...]:
    import onnxruntime

    if device.type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        return ("CUDAExecutionProvider", "CPUExecutionProvider")
    return ("CPUExecutionProvider",)
