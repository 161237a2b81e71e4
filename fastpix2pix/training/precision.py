"""``train --precision``: what a training run computes in, decided once from its device.

``bf16`` is the fast path's recipe (:mod:`fastpix2pix.training.fast_step`): the forward passes under
``torch.autocast(bfloat16)`` (convolutions and activations in bfloat16), with the master weights, BatchNorm
statistics, Adam state and losses in float32. ``fp32`` is float32 throughout (TF32 convolutions on CUDA, as
the official code runs). ``auto`` is bf16 on a CUDA GPU that computes it natively, and on a CPU that
computes it faster than float32 (:func:`fastpix2pix.runtime.cpu_auto_precision`: AMX, or AVX512-BF16 on
AMD); fp32 elsewhere. The plain trainer (``--fast_path off``, torchrun) is the official float32 iteration.
"""

from __future__ import annotations

import torch

from fastpix2pix.runs.options import PRECISIONS
from fastpix2pix.runtime import BF16_KINDS, Precision, cpu_auto_precision, cpu_bf16_support

__all__ = ["check_plain_precision", "resolve_training_precision"]


def resolve_training_precision(requested: str, device: torch.device) -> Precision:
    """What ``--precision requested`` trains in on ``device`` (the fast trainer), and why."""
    if requested not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r}; choose one of {PRECISIONS}")
    if requested == "fp32":
        return Precision("fp32", "--precision fp32")
    if device.type == "cuda":
        if requested == "bf16":
            return Precision("bf16", "--precision bf16")
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return Precision("bf16", "auto: this GPU computes bf16 natively")
        return Precision("fp32", "auto: this GPU has no native bf16")
    if requested == "bf16":
        return Precision("bf16", f"--precision bf16; this CPU's bf16 is {BF16_KINDS[cpu_bf16_support()]}")
    return cpu_auto_precision()


def check_plain_precision(requested: str) -> None:
    """The plain trainer computes float32: refuse ``--precision bf16`` there, before anything is built."""
    if requested == "bf16":
        raise ValueError(
            "--precision bf16 trains on the fast path (one process; --fast_path on or auto); the plain "
            "trainer (--fast_path off, or several processes under torchrun) computes float32: use "
            "--precision fp32 or auto with it"
        )
