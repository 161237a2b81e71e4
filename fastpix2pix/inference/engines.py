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
from fastpix2pix.ops.reference import activation
from fastpix2pix.runs.options import ENGINES

__all__ = ["OneDnnBlock", "build_engine", "onednn_available", "torch_network"]

Engine = Callable[[torch.Tensor], torch.Tensor]
PACKED_SHAPES = 4  # packed weights kept per block: one set per input shape, the least recent dropped


def build_engine(
    G: nn.Module,
    engine: str,
    *,
    eval_mode: bool,
    device: torch.device,
    seed: int = 0,
    batch_size: int = 1,
) -> Engine:
    """A function from an input batch to ``G``'s output under ``--eval`` (``eval_mode``) or the paper's
    protocol. ``seed`` seeds the onnxruntime engine's dropout; ``batch_size`` is checked against what
    its export takes (the paper protocol's: 1). The engines work on copies of ``G``, except the torch
    engine under the paper's protocol without oneDNN (see :func:`torch_network`)."""
    if engine == "torch":
        net = torch_network(G, eval_mode, device)
        layout = torch.channels_last if _uses_onednn(net) else torch.contiguous_format
        return lambda x: net(x.contiguous(memory_format=layout))
    if engine == "onnxruntime":
        return _onnxruntime_engine(G, eval_mode, device, seed, batch_size)
    raise ValueError(f"unknown engine {engine!r}; choose one of {ENGINES}")


# --- torch ------------------------------------------------------------------------------------------


def onednn_available(device: torch.device) -> bool:
    """The oneDNN fused-convolution ops exist here (a CPU build of PyTorch with mkldnn)."""
    return (
        device.type == "cpu"
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
    )


def torch_network(G: nn.Module, eval_mode: bool, device: torch.device) -> nn.Module:
    """The ``torch`` engine's network (see the module docstring). Under the paper's protocol without
    oneDNN it is ``G`` itself in train mode (the fused ops; the in-memory running statistics move, as
    in the official test)."""
    onednn = onednn_available(device) and next(G.parameters()).dtype == torch.float32
    if not eval_mode and not onednn:
        return G.train()
    net = deploy_network(G, "eval" if eval_mode else "paper", dropout=not eval_mode).to(device)
    if onednn:
        for name, block in [(n, m) for n, m in net.named_modules() if isinstance(m, DeployBlock)]:
            parent, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent), child, OneDnnBlock(block))
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
    """

    def __init__(self, block: DeployBlock) -> None:
        super().__init__()
        conv = block.conv
        self.transposed = isinstance(conv, nn.ConvTranspose2d)
        self.weight = nn.Parameter(conv.weight.detach(), requires_grad=False)
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
        if self.norm == "none":
            return self._conv(x, *_post_op(self.negative_slope))
        y = self._conv(x, "none", [])
        if self.norm == "batch":
            return _batch_norm_act(y, self.norm_weight, self.norm_bias, self.eps, self.negative_slope)
        return activation(F.instance_norm(y, eps=self.eps), self.negative_slope)

    def extra_repr(self) -> str:
        return f"transposed={self.transposed}, norm={self.norm}, negative_slope={self.negative_slope}"


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
) -> Engine:
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
