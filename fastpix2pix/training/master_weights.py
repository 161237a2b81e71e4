"""bf16 weight copies kept by the optimizer: the bf16 fast path's conv weights, cast once per step.

Under ``torch.autocast(bfloat16)`` every convolution casts its float32 weight to bfloat16 in each forward
pass, and autograd casts the weight's bfloat16 gradient back to float32 in each backward: four passes over
the generator's weights per iteration and more over the discriminator's (it runs three forward passes),
on top of Adam's own. Here each :class:`~fastpix2pix.models.layers.ConvBlock` computes with a bfloat16
copy of its weight (``compute_weight``) that receives the gradient in bfloat16, and
:class:`MasterWeightAdam` updates the float32 master weight and Adam's float32 moments from that gradient
and rewrites the copy, in one pass per weight (:func:`fastpix2pix.ops.reference.adam_master_step_`; fused
CPU and CUDA kernels).

What is saved does not change: the networks' state dicts hold the float32 masters, and the optimizer's
state dict is ``torch.optim.Adam``'s (step, exp_avg, exp_avg_sq per parameter), so a checkpoint resumes in
either precision and in the plain trainer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from fastpix2pix.models.layers import ConvBlock
from fastpix2pix.ops.backend import get_backend

__all__ = ["MasterWeightAdam"]


class MasterWeightAdam(torch.optim.Adam):
    """``torch.optim.Adam`` (its options, state and state dict) whose attached conv weights train through
    low-precision copies: see the module docstring. Parameters without a copy (BatchNorm's affine, conv
    biases, weights of blocks that do not take copies) step as in ``torch.optim.Adam``.

    ``backend``: the ops that do the update (``fused``: the CPU or CUDA kernel where it passed its start-up
    check, else the reference; ``reference``: plain PyTorch, and no copies on a GPU).
    """

    def __init__(self, params: Iterable[nn.Parameter], *, backend: str | None = None, **adam: object) -> None:
        for flag in ("amsgrad", "maximize", "differentiable"):
            if adam.get(flag):
                raise ValueError(f"MasterWeightAdam does not support {flag}=True")
        super().__init__(params, **adam)  # type: ignore[arg-type]
        self.copies: dict[nn.Parameter, torch.Tensor] = {}
        self._ops = get_backend(backend)

    def attach(self, net: nn.Module, dtype: torch.dtype) -> int:
        """Give each BatchNorm or norm-free :class:`ConvBlock` of ``net`` whose weight this optimizer trains
        a ``dtype`` copy of its weight to compute with (rewritten from the current weights, so call it
        again after loading weights). Returns the number of copies: none on a GPU where the update's kernel
        failed its start-up check (the blocks then cast their weights, as without copies)."""
        own = {p for group in self.param_groups for p in group["params"]}
        device = next(iter(own)).device if own else torch.device("cpu")
        if device.type == "cuda" and not self._kernel_runs(device):
            return 0  # the reference's per-weight ops would launch more kernels than the casts they save
        for block in net.modules():
            if not isinstance(block, ConvBlock) or block.norm_kind == "instance":
                continue  # an InstanceNorm block computes through nn.Conv2d, which autocast casts itself
            weight = block.conv.weight
            if weight not in own:
                continue
            copy = self.copies.get(weight)
            if copy is None or copy.dtype != dtype:
                copy = torch.empty_like(weight, dtype=dtype, requires_grad=weight.requires_grad)
                self.copies[weight] = copy
            with torch.no_grad():
                copy.copy_(weight)
            block.compute_weight = copy
        return len(self.copies)

    def _kernel_runs(self, device: torch.device) -> bool:
        """The fused backend's kernel runs on ``device`` (its start-up checks passed)."""
        runs = getattr(self._ops, "adam_kernel_runs", None)  # the reference backend has no kernel
        return runs is not None and runs(device)

    def detach_copies(self, net: nn.Module) -> None:
        """Undo :meth:`attach` for ``net``: its blocks cast their weights again."""
        for block in net.modules():
            if isinstance(block, ConvBlock):
                block.compute_weight = None
        self.copies.clear()

    def sync_copies(self) -> None:
        """Rewrite every copy from its master weight (after the masters changed outside :meth:`step`)."""
        with torch.no_grad():
            for weight, copy in self.copies.items():
                copy.copy_(weight)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for copy in self.copies.values():
            if set_to_none:
                copy.grad = None
            elif copy.grad is not None:
                copy.grad.zero_()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_copies(group)
        super().step()  # the rest: the masters with copies have no .grad, so Adam skips them
        return loss

    def _step_copies(self, group: dict) -> None:
        entries: list[tuple[torch.Tensor, ...]] = []
        for param in group["params"]:
            copy = self.copies.get(param)
            if copy is None or copy.grad is None:
                continue
            state = self.state[param]
            if not state:  # as torch.optim.Adam initialises it (fused: a float32 step on the device)
                state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            entries.append((param, copy.grad, state["exp_avg"], state["exp_avg_sq"], copy, state["step"]))
        if not entries:
            return
        params, grads, exp_avgs, exp_avg_sqs, copies, steps = (
            list(column) for column in zip(*entries, strict=True)
        )
        beta1, beta2 = group["betas"]
        self._ops.adam_master_step_(
            params, grads, exp_avgs, exp_avg_sqs, copies, steps, lr=_lr_tensor(group["lr"], params[0].device),
            beta1=float(beta1), beta2=float(beta2), weight_decay=float(group["weight_decay"]),
            eps=float(group["eps"]),
        )  # fmt: skip


def _lr_tensor(lr: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    """The learning rate as the op takes it: a float32 tensor on the weights' device (the fast path's
    device lr already is one, which a CUDA graph reads at each replay)."""
    if isinstance(lr, torch.Tensor):
        return lr.to(device, torch.float32)
    return torch.tensor(float(lr), dtype=torch.float32, device=device)
