"""What the fast trainer's batch sources share: the protocol, the sample geometry and the resume check."""

from __future__ import annotations

import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from PIL import Image

from fastpix2pix.data.aligned import AlignedDataset
from fastpix2pix.data.images import (
    DECODE_ERRORS,
    ImageReadError,
    header_bytes_per_channel,
)
from fastpix2pix.data.order import IntsLike
from fastpix2pix.data.transforms import output_size, resized_size

__all__ = [
    "BatchSource",
    "SampleGeometry",
    "check_resume_state",
    "normalize_into",
    "sample_geometry",
    "survey_dataset",
]


def check_resume_state(state: Mapping[str, Any], *, seed: int, epoch: int, start: int, size: int) -> bool:
    """Whether a batch source's saved ``state`` applies to the epoch just started (the caller then restores
    its position and random state), or belongs to an earlier, finished epoch (False: nothing to restore).

    A state from an earlier epoch is what a checkpoint written at an epoch's end holds; the uninterrupted
    run then started the next epoch afresh, as the resumed one just did. A state of this epoch may be at
    any position from ``start`` on (a resume restores the checkpoint's, with ``start`` the same position;
    a capture's warm-up is undone from wherever the epoch is); one from a later epoch, or from before
    ``start`` (samples the run would train on twice), is a caller error and raises.
    """
    saved_seed, saved_epoch, position = int(state["seed"]), int(state["epoch"]), int(state["position"])
    if saved_seed != seed:
        raise ValueError(f"the saved data state has seed {saved_seed}, this source seed {seed}")
    if saved_epoch < epoch:
        return False
    if saved_epoch > epoch:
        raise ValueError(f"the saved data state is from epoch {saved_epoch}, but epoch {epoch} was started")
    # The position runs past the end in the wrapped last batch; the trainer's count stops at the end.
    if min(position, size) < start:
        raise ValueError(
            f"the saved data state is at position {position} of epoch {epoch}, before the start={start} "
            f"given to start_epoch: call start_epoch(epoch, order, start=<images done in the epoch>) first"
        )
    return True


def normalize_into(
    crop: torch.Tensor, out: torch.Tensor, half_scale: torch.Tensor, minus_one: torch.Tensor
) -> None:
    """``to_tensor``'s floats from an NHWC integer crop, written into the NCHW ``out``.

    ``to_tensor`` computes ``(x / s - 0.5) / 0.5`` in float32. Scaling by 2 commutes with rounding, so that
    equals ``-1 + x / (s / 2)`` bit for bit: one ``addcdiv`` pass (a correctly rounded quotient, then one
    rounded addition) after the cast. The cast is its own pass because an integer input to
    ``addcdiv``/``div`` with ``out=`` would first be copied to a new float tensor. ``half_scale`` (127.5 or
    32767.5) and ``minus_one`` are 0-dim tensors on ``out``'s device: CUDA turns division by a host scalar
    into a multiplication by its reciprocal, which is not always the correctly rounded quotient.
    """
    out.copy_(crop.permute(0, 3, 1, 2))
    torch.addcdiv(minus_one, out, half_scale, out=out)


# --- the batch-source interface --------------------------------------------------------------------------


class BatchSource(Protocol):
    """What the fast trainer reads its batches from: a :class:`DeviceDataset` or a
    :class:`fastpix2pix.data.sources.streaming.StreamingDataset`.

    Attributes:
        A, B: the current batch (float32 in [-1, 1], NCHW, channels_last when asked). With ``fixed_shape``
            they are static device tensors rewritten in place by every :meth:`next_batch`.
        batch_size: samples per batch.
        batches_per_epoch: ``ceil((N - start) / batch_size)`` (the last batch topped up with the epoch's
            first samples so shapes stay fixed), or ``floor`` with ``drop_last``.
        in_graph: :meth:`next_batch` may be captured in a CUDA graph. When False, call it eagerly before
            each replay; the graph reads ``A`` and ``B``.
        fixed_shape: every batch has the same shape (False: ``A``/``B`` are new tensors at each call and no
            graph can be used).
    """

    A: torch.Tensor
    B: torch.Tensor
    batch_size: int
    in_graph: bool
    fixed_shape: bool

    def __len__(self) -> int: ...

    @property
    def batches_per_epoch(self) -> int: ...

    def start_epoch(self, epoch: int, order: IntsLike | None = None, start: int = 0) -> None: ...

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]: ...

    def generators(self) -> tuple[torch.Generator, ...]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


# --- the footprint, from the image headers ---------------------------------------------------------------


@dataclass(frozen=True)
class SampleGeometry:
    """One sample's sizes, read from its file header (no pixel decoded).

    Attributes:
        stored_size: ``(width, height)`` a :class:`DeviceDataset` keeps: after the resize, before the crop.
        output_size: ``(width, height)`` of the batch tensors.
        bytes_per_channel: 1 for 8-bit sources, 2 for 16-bit ones (:func:`read_image` keeps 16 bits).
    """

    stored_size: tuple[int, int]
    output_size: tuple[int, int]
    bytes_per_channel: int


def sample_geometry(dataset: AlignedDataset, index: int) -> SampleGeometry:
    """The sizes of sample ``index`` after ``dataset.options.preprocess``, from its file header."""
    path = dataset.paths[index]
    try:
        with Image.open(path) as im:
            (width, height), depth = im.size, header_bytes_per_channel(im)
    except FileNotFoundError:
        raise FileNotFoundError(f"image file {path} does not exist") from None
    except DECODE_ERRORS as err:
        raise ImageReadError(f"cannot read image {path}: {type(err).__name__}: {err}") from err
    half = (width // 2, height)  # one side of the A|B pair, as split_ab cuts it
    options = dataset.options
    return SampleGeometry(resized_size(half, options), output_size(half, options), depth)


def survey_dataset(dataset: AlignedDataset, workers: int | None = None) -> list[SampleGeometry]:
    """:func:`sample_geometry` of every sample, in index order (threads: header reads wait on the disk)."""
    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    indices = range(len(dataset))
    if workers <= 1:
        return [sample_geometry(dataset, i) for i in indices]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda i: sample_geometry(dataset, i), indices))
