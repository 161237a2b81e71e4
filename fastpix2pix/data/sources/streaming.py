"""Training batches streamed from host memory: the fast trainer's source when the device cannot hold them.

:class:`StreamingDataset` has the interface of :class:`fastpix2pix.data.sources.device.DeviceDataset`
(:class:`fastpix2pix.data.sources.base.BatchSource`) for datasets too large for the device's memory or whose
samples differ in size after preprocessing (:func:`fastpix2pix.data.sources.plan.plan_batch_source` chooses).
A ``DataLoader`` over the CPU pipeline (:class:`AlignedDataset`'s own reading, resize, crop and flip)
decodes in worker processes and returns each batch as packed integer pixels ``[B, h, w, C_A + C_B]``
(4x less to pin and copy than float32); :meth:`StreamingDataset.next_batch` copies it to the device with a
non-blocking copy from pinned memory and converts it there to float in [-1, 1] with the exact float32
values of ``to_tensor`` (:func:`fastpix2pix.data.sources.base.normalize_into`).

Randomness: the crop and flip of the sample at position ``q`` of an epoch's order (sample ``index``) are
drawn from ``(seed, epoch, index)`` with :func:`params_rng`, exactly as the plain trainer's DataLoader
path draws them, so for the epoch's first pass the batches *equal* the plain trainer's, sample for
sample. Positions past the end (the samples that top up the wrapped last batch, ``lap = q // N >= 1``)
draw from ``(seed, epoch, index, lap)``: fresh crops, as :class:`DeviceDataset` gives them. Everything is
a pure function of ``(seed, epoch, position)``, which is how the plain trainer resumes exactly
(:class:`EpochSampler` + ``set_epoch``); the state to checkpoint is only the epoch and the position.

Not for CUDA graph capture (``in_graph`` is False): the host waits for the workers. With ``fixed_shape``
(every cropping preprocess, or equal sizes) :attr:`StreamingDataset.A` and :attr:`StreamingDataset.B` are
static device tensors rewritten in place, so a trainer calls :meth:`next_batch` eagerly before each graph
replay and the graph reads them. Without (``--preprocess none|scale_width`` on images of different sizes,
batch size 1 as for the plain trainer) every batch is a new tensor.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fastpix2pix.data.aligned import AlignedDataset
from fastpix2pix.data.order import IntsLike, checked_order, default_epoch_order
from fastpix2pix.data.sources.base import (
    SampleGeometry,
    check_resume_state,
    normalize_into,
    survey_dataset,
)
from fastpix2pix.data.transforms import params_rng, sample_params, transform_array

__all__ = ["StreamingDataset", "collate_pixels", "sample_rng"]

# A key of the streamed dataset: (sample index, epoch, lap), lap = position // N (0 on the first pass).
SampleKey = tuple[int, int, int]


def sample_rng(seed: int, epoch: int, index: int, lap: int = 0) -> np.random.Generator:
    """The augmentation generator of sample ``index`` on pass ``lap`` over ``epoch``'s order.

    ``lap`` 0 is :func:`params_rng` itself (the plain trainer's draws); later laps (the wrapped top-up)
    add ``lap`` (>= 1, never a trailing zero, which SeedSequence could equate with a shorter key) to the
    entropy: other, independent draws.
    """
    return params_rng(seed, epoch, index) if lap == 0 else np.random.default_rng([seed, epoch, index, lap])


class _AugmentedPairs(Dataset):
    """``key -> ((h, w, C_A + C_B) uint8/uint16 pixels, path)``: the CPU pipeline up to ``to_tensor``."""

    def __init__(self, dataset: AlignedDataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: SampleKey) -> tuple[np.ndarray, str]:
        index, epoch, lap = key
        a, b = self.dataset.read_pair(index)
        path = str(self.dataset.paths[index])
        rng = sample_rng(self.seed, epoch, index, lap)
        params = sample_params((a.shape[1], a.shape[0]), self.dataset.options, rng, path)
        return np.concatenate([transform_array(a, params), transform_array(b, params)], axis=-1), path


def collate_pixels(items: Sequence[tuple[np.ndarray, str]]) -> tuple[torch.Tensor, int]:
    """Stack samples into ``([B, h, w, C] pixels, full-scale value)``.

    8-bit only: ``uint8`` and 255. With any 16-bit sample: every sample as 16 bits (an 8-bit value ``x``
    becomes ``257 x``, the same fraction of full scale, so its float value is bit-identical) in ``int16``
    (not every device copies ``uint16``; the device reads the bits back as unsigned) and 65535.
    """
    pixels = [item[0] for item in items]
    if len({p.shape for p in pixels}) > 1:
        sizes = ", ".join(
            f"{path} {p.shape[1]}x{p.shape[0]}" for p, (_, path) in zip(pixels, items, strict=True)
        )
        raise ValueError(
            f"a batch holds samples of different sizes after preprocessing ({sizes}; WxH), which cannot be "
            f"stacked: use --batch_size 1, or a preprocess that gives one size (resize_and_crop, crop)"
        )
    if all(p.dtype == np.uint8 for p in pixels):
        return torch.from_numpy(np.stack(pixels)), 255
    wide = [p.astype(np.uint16) * np.uint16(257) if p.dtype == np.uint8 else p for p in pixels]
    return torch.from_numpy(np.stack(wide).view(np.int16)), 65535


class _PositionBatches:
    """Batch sampler: keys for positions ``position, position+1, ...`` of an epoch's order, wrapping past
    the end, without end (the source counts batches). Read at every ``iter()``: set it, then iterate."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.order = np.zeros(0, np.int64)
        self.epoch = self.position = 0

    def __iter__(self) -> Iterator[list[SampleKey]]:
        order, epoch, size = self.order.tolist(), self.epoch, len(self.order)
        for first in itertools.count(self.position, self.batch_size):
            yield [(order[q % size], epoch, q // size) for q in range(first, first + self.batch_size)]


class StreamingDataset:
    """An :class:`AlignedDataset` streamed to ``device`` batch by batch (see the module docstring).

    Args:
        dataset: the CPU dataset; its options define the preprocessing.
        device: where the batches go.
        batch_size: the batch size of :meth:`next_batch`.
        channels_last: the outputs in ``torch.channels_last`` memory format.
        drop_last: count ``floor`` instead of ``ceil((N - start) / batch_size)`` batches per epoch.
        seed: base of the epoch orders and augmentation draws; default ``dataset.options.seed`` (then the
            draws are the plain trainer's).
        workers: DataLoader worker processes (default ``min(8, cpu_count)``; 0 decodes in this process).
            They persist across epochs.
        geometry: a :func:`survey_dataset` result to reuse (else the headers are read when the preprocess
            does not fix the output size).
        prefetch_factor: batches each worker prepares ahead.

    Attributes:
        A, B: the current batch, float32 in [-1, 1] on ``device``; with ``fixed_shape``, static tensors
            rewritten in place by :meth:`next_batch`, else new ones at every call.
        fixed_shape: every batch has the same shape (a cropping preprocess, or equal sizes).
        in_graph: False: :meth:`next_batch` waits on the host for the workers.
    """

    in_graph = False

    def __init__(
        self,
        dataset: AlignedDataset,
        device: torch.device | str,
        batch_size: int = 1,
        *,
        channels_last: bool = False,
        drop_last: bool = False,
        seed: int | None = None,
        workers: int | None = None,
        geometry: Sequence[SampleGeometry] | None = None,
        prefetch_factor: int = 2,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.device = torch.device(device)
        self.options = dataset.options
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.seed = self.options.seed if seed is None else seed
        self.workers = min(8, os.cpu_count() or 1) if workers is None else workers
        self.prefetch_factor = prefetch_factor
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        (width, height), self.fixed_shape = self._output_geometry(geometry)
        self._allocate(height, width)
        self._sampler = _PositionBatches(batch_size)
        self._loader: DataLoader | None = None
        self._batches: Iterator[tuple[torch.Tensor, int]] | None = None
        self.start_epoch(0)

    # --- setup ---

    def _output_geometry(self, geometry: Sequence[SampleGeometry] | None) -> tuple[tuple[int, int], bool]:
        """Sample 0's output ``(width, height)`` and whether every sample has it."""
        if "crop" in self.options.preprocess:  # every cropping mode outputs crop_size x crop_size
            return (self.options.crop_size, self.options.crop_size), True
        geometry = survey_dataset(self.dataset, self.workers) if geometry is None else geometry
        first = geometry[0].output_size
        return first, all(sample.output_size == first for sample in geometry)

    def _allocate(self, height: int, width: int) -> None:
        """The outputs (zeros: a graph warm-up may read them before the first batch) and the converters'
        constants; the pinned-to-device staging buffers are allocated at first use (their dtype depends
        on the bit depth of the first batch)."""
        self.A = self._empty(self.options.input_nc, height, width).zero_()
        self.B = self._empty(self.options.output_nc, height, width).zero_()
        self._staging: dict[torch.dtype, torch.Tensor] = {}
        self._unsigned: torch.Tensor | None = None
        # Device scalars, as DeviceDataset: division by a host scalar is not correctly rounded on CUDA.
        self._half_scales = {
            scale: torch.tensor(scale / 2, device=self.device) for scale in (255, 65535)
        }  # 127.5 and 32767.5: exact
        self._minus_one = torch.tensor(-1.0, device=self.device)

    def _empty(self, channels: int, height: int, width: int) -> torch.Tensor:
        shape = (self.batch_size, channels, height, width)
        return torch.empty(shape, device=self.device, memory_format=self.memory_format)

    def _make_loader(self) -> DataLoader:
        workers = self.workers
        return DataLoader(
            _AugmentedPairs(self.dataset, self.seed),
            batch_sampler=self._sampler,
            num_workers=workers,
            collate_fn=collate_pixels,
            pin_memory=self.device.type == "cuda",  # page-locked batches: the copy can be non-blocking
            persistent_workers=workers > 0,  # no worker restart per epoch (the sampler is read afresh)
            prefetch_factor=self.prefetch_factor if workers > 0 else None,
            # Worker seeds come from here, not from the global torch generator (dropout's, on CPU); the
            # draws themselves do not depend on them.
            generator=torch.Generator(),
        )

    def close(self) -> None:
        """Stop the worker processes (a later :meth:`next_batch` starts them again)."""
        self._batches = None
        self._loader = None  # its persistent iterator, and with it the workers, go with it

    # --- epochs ---

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def batches_per_epoch(self) -> int:
        """``ceil((N - start) / batch_size)`` (last batch wrapped), or ``floor`` with ``drop_last``."""
        count = len(self) - self.start
        return count // self.batch_size if self.drop_last else -(-count // self.batch_size)

    @property
    def position(self) -> int:
        """The position in the epoch's order of the next batch's first sample."""
        return self._position

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The default order of ``epoch`` (the same as :meth:`DeviceDataset.epoch_order`)."""
        return default_epoch_order(len(self), self.seed, epoch, not self.options.serial_batches)

    def start_epoch(self, epoch: int, order: IntsLike | None = None, start: int = 0) -> None:
        """Install ``epoch``'s order (``order``, e.g. ``EpochSampler.order(epoch)``, or the default); the
        next batch starts at position ``start`` (a mid-epoch resume: nothing before it is decoded)."""
        n = len(self)
        order_t = self.epoch_order(epoch) if order is None else checked_order(order, n)
        if not 0 <= start <= n:
            raise ValueError(f"start must be in 0..{n}, got {start}")
        self._order = order_t.numpy()
        self.epoch, self.start, self._position = epoch, start, start
        self._batches = None  # the next batch restarts the loader at the new position

    # --- the batch-source interface ---

    def generators(self) -> tuple[torch.Generator, ...]:
        """None: the draws happen on the host, from ``(seed, epoch, position)``."""
        return ()

    def state_dict(self) -> dict[str, Any]:
        """The epoch and position: all the randomness is a function of them (no sync, no generator)."""
        return {"source": "stream", "seed": self.seed, "epoch": self.epoch, "position": self._position}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue at ``state``'s position; call after ``start_epoch(epoch, order, start)`` with the
        checkpoint's epoch and position. A state from an earlier, finished epoch is ignored. A
        :class:`DeviceDataset` state is accepted (its position; its generator does not apply here)."""
        if check_resume_state(state, seed=self.seed, epoch=self.epoch, start=self.start, size=len(self)):
            self._position = int(state["position"])
            self._batches = None

    # --- batches ---

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch on the device (into the static :attr:`A`/:attr:`B` with ``fixed_shape``).

        The host->device copy is non-blocking from pinned memory and, like the conversion, queued on the
        current stream, so it runs after the work queued before it (e.g. the last graph replay reading
        ``A``/``B``) and before the work queued after it. The pinned batch may be freed at once: PyTorch's
        pinned-memory cache does not reuse it before the copy has finished.
        """
        if self._batches is None:
            self._sampler.order, self._sampler.epoch = self._order, self.epoch
            self._sampler.position = self._position
            if self._loader is None:
                self._loader = self._make_loader()
            self._batches = iter(self._loader)
        pixels, scale = next(self._batches)
        self._position += self.batch_size
        return self._write(self._upload(pixels), scale)

    def _upload(self, pixels: torch.Tensor) -> torch.Tensor:
        if not self.fixed_shape:
            staging = torch.empty(pixels.shape, dtype=pixels.dtype, device=self.device)
        else:
            staging = self._staging.get(pixels.dtype)
            if staging is None:
                staging = self._staging[pixels.dtype] = torch.empty_like(pixels, device=self.device)
            if staging.shape != pixels.shape:  # the headers promised one size; the decoder disagrees
                raise ValueError(
                    f"a batch of shape {tuple(pixels.shape)} (B, H, W, C) after batches of "
                    f"{tuple(staging.shape)}: the image headers gave one output size for every sample"
                )
        return staging.copy_(pixels, non_blocking=True)

    def _write(self, crop: torch.Tensor, scale: int) -> tuple[torch.Tensor, torch.Tensor]:
        if scale != 255:  # int16 bits -> the uint16 value, in int32
            if not self.fixed_shape:
                crop = crop.to(torch.int32)
            else:
                if self._unsigned is None:
                    self._unsigned = torch.empty(crop.shape, dtype=torch.int32, device=self.device)
                crop = self._unsigned.copy_(crop)
            crop = crop.bitwise_and_(0xFFFF)
        _, height, width, _ = crop.shape
        if not self.fixed_shape:
            self.A = self._empty(self.options.input_nc, height, width)
            self.B = self._empty(self.options.output_nc, height, width)
        nc_a, half_scale = self.options.input_nc, self._half_scales[scale]
        normalize_into(crop[..., :nc_a], self.A, half_scale, self._minus_one)
        normalize_into(crop[..., nc_a:], self.B, half_scale, self._minus_one)
        return self.A, self.B
