"""Adam and the learning-rate schedules of both trainers, and the checkpoint format they share."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.optim import lr_scheduler

from fastpix2pix.runs.networks import Networks
from fastpix2pix.runs.options import (
    LR_POLICIES,
    TrainOptions,
)
from fastpix2pix.training.step import Optimizers

__all__ = [
    "PLAIN_ADAM_FLAGS",
    "PortableLoader",
    "build_optimizers",
    "build_scheduler",
    "linear_lr_factor",
    "load_portable_optimizer_state",
    "portable_optimizer_state",
    "portable_scheduler_state",
    "use_device_lr",
    "uses_device_lr",
]


# Adam's implementation flags as torch's defaults set them: what every checkpoint records, whichever
# implementation (fused on CPU, fused/capturable in the fast trainer) wrote it, so that any trainer loads it.
PLAIN_ADAM_FLAGS: dict[str, Any] = {"fused": None, "capturable": False, "foreach": None}


def build_optimizers(nets: Networks, opt: TrainOptions) -> Optimizers:
    """Adam as the official code configures it (lr, betas (beta1, 0.999)); on CPU, its fused implementation.

    Fused Adam computes the same update in one multithreaded pass per tensor; torch's default on CPU (the
    for-loop) makes about ten single-threaded ones: for unet_256 that is ~35 ms instead of ~190 ms of every
    iteration on 2 cores (``benchmarks/bench_train.py``, rows ``ours:fused:nchw:fused`` and ``:forloop``).
    Elsewhere torch's default (foreach on CUDA). Checkpoints record the default implementation flags as
    before, and loading one keeps this optimizer's own, so a checkpoint moves freely between trainers.
    """
    betas = (opt.beta1, 0.999)
    return Optimizers(*(_adam(list(net.parameters()), opt.lr, betas) for net in nets))


def _adam(params: list[nn.Parameter], lr: float, betas: tuple[float, float]) -> torch.optim.Adam:
    on_cpu = bool(params) and all(p.device.type == "cpu" for p in params)
    optimizer = torch.optim.Adam(params, lr=lr, betas=betas, fused=True if on_cpu else None)
    if on_cpu:
        optimizer.register_state_dict_post_hook(_record_default_adam_flags)
        optimizer.register_load_state_dict_post_hook(_use_fused_adam)
    return optimizer


def _record_default_adam_flags(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    for group in state["param_groups"]:  # fresh dicts: the optimizer's own groups are untouched
        group.update(PLAIN_ADAM_FLAGS)
    return state


def _use_fused_adam(optimizer: torch.optim.Optimizer) -> None:
    for group in optimizer.param_groups:  # load_state_dict put the checkpoint's flags here
        group.update(PLAIN_ADAM_FLAGS, fused=True)


def linear_lr_factor(epoch_index: int, opt: TrainOptions) -> float:
    """The official ``linear`` rule; ``epoch_index`` counts scheduler steps (0 during the first epoch).

    factor = 1 - max(0, epoch_index + epoch_count - n_epochs) / (n_epochs_decay + 1), so epoch e (from 1)
    trains at 1 - max(0, e - n_epochs) / (n_epochs_decay + 1).
    """
    return 1.0 - max(0, epoch_index + opt.epoch_count - opt.n_epochs) / float(opt.n_epochs_decay + 1)


def build_scheduler(optimizer: torch.optim.Optimizer, opt: TrainOptions) -> Any:
    """The official schedulers, stepped once at the end of each epoch."""
    if opt.lr_policy == "linear":
        return lr_scheduler.LambdaLR(optimizer, lambda epoch_index: linear_lr_factor(epoch_index, opt))
    if opt.lr_policy == "step":
        return lr_scheduler.StepLR(optimizer, step_size=opt.lr_decay_iters, gamma=0.1)
    if opt.lr_policy == "plateau":
        return lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.2, threshold=0.01, patience=5)
    if opt.lr_policy == "cosine":
        return lr_scheduler.CosineAnnealingLR(optimizer, T_max=opt.n_epochs, eta_min=0)
    raise ValueError(f"unknown lr_policy {opt.lr_policy!r}; choose one of {LR_POLICIES}")


def use_device_lr(optimizer: torch.optim.Optimizer) -> None:
    """Hold each group's lr in a 0-dim tensor on the parameters' device, so that a captured step reads the
    current value; LRScheduler fills such a tensor in place (``_update_param_group_val``).

    Only for fused or capturable Adam (the others refuse a tensor lr with foreach)."""
    for group in optimizer.param_groups:
        if not isinstance(group["lr"], torch.Tensor):
            device = group["params"][0].device
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)


def uses_device_lr(optimizer: torch.optim.Optimizer) -> bool:
    group = optimizer.param_groups[0]
    return bool(group.get("fused") or group.get("capturable"))


def _plain(value: Any) -> Any:
    """A float for a 0-dim tensor (lr values), anything else unchanged."""
    return float(value) if isinstance(value, torch.Tensor) and value.dim() == 0 else value


def portable_optimizer_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """An Adam state_dict in the plain trainer's format: float lr, plain flags, step counters on the CPU."""
    groups = [
        {k: _plain(v) if k in ("lr", "initial_lr") else v for k, v in group.items()} | PLAIN_ADAM_FLAGS
        for group in state["param_groups"]
    ]
    per_param = {
        index: {k: v.detach().to("cpu", torch.float32) if k == "step" else v for k, v in values.items()}
        for index, values in state["state"].items()
    }
    return {"state": per_param, "param_groups": groups}


def portable_scheduler_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """A scheduler state_dict with float learning rates (``_last_lr``/``base_lrs`` may hold tensors)."""
    return {
        k: [_plain(x) for x in v] if k in ("_last_lr", "base_lrs") and isinstance(v, list) else v
        for k, v in state.items()
    }


def load_portable_optimizer_state(optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> None:
    """Load a (plain or fast) Adam state_dict and keep this optimizer's own implementation settings.

    ``Optimizer.load_state_dict`` replaces every group option with the saved one, flags included, so they
    are put back; the lr tensors keep their identity (a captured graph reads their address). It also keeps
    the saved tensors' strides, so moments saved from NCHW weights would stay NCHW next to channels_last
    weights, which CUDA fused Adam refuses: every per-parameter tensor is given its parameter's layout.
    """
    flags = [{k: g[k] for k in PLAIN_ADAM_FLAGS} for g in optimizer.param_groups]
    lr_tensors = [g["lr"] if isinstance(g["lr"], torch.Tensor) else None for g in optimizer.param_groups]
    optimizer.load_state_dict(dict(state))
    for group, flag, lr in zip(optimizer.param_groups, flags, lr_tensors, strict=True):
        group.update(flag)
        value = float(group["lr"])
        if lr is not None:
            group["lr"] = lr.fill_(value)
        on_device_step = group["fused"] or group["capturable"]
        for param in group["params"]:
            per_param = optimizer.state.get(param, {})
            for key, tensor in per_param.items():
                if key == "step":
                    if on_device_step:  # these implementations keep the counter on the parameters' device
                        per_param[key] = tensor.to(param.device, torch.float32)
                elif isinstance(tensor, torch.Tensor) and tensor.shape == param.shape:
                    per_param[key] = _in_layout_of(tensor, param)


def _in_layout_of(tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``tensor``'s values with ``param``'s strides, device and dtype (``tensor`` itself if it has them)."""
    if tensor.stride() == param.stride() and tensor.device == param.device and tensor.dtype == param.dtype:
        return tensor
    return torch.empty_like(param, requires_grad=False).copy_(tensor.detach())


class PortableLoader:
    """Stands in for an optimizer while Trainer._restore runs: load_state_dict goes the portable way."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        load_portable_optimizer_state(self.optimizer, state)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.optimizer, name)
