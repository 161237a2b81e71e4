"""The training set decoded once, held on the device, and augmented there, ready for CUDA graphs.

:class:`DeviceDataset` replaces the DataLoader in the fast trainer. It decodes every A|B pair once with
the CPU pipeline's own code (:meth:`AlignedDataset.read_pair`: direction swap and grayscale included)
and applies the deterministic part of the preprocessing (the resize of ``resize_and_crop``,
``scale_width``, ``scale_width_and_crop`` and ``none``, via :func:`transform_array`), so the stored
images are exactly what the CPU pipeline crops from. Each iteration then only crops, flips and converts
to float in [-1, 1] on the device:

* no host synchronisation and no data-dependent shapes: random offsets and flips come from a
  ``torch.Generator`` on the device, sample indices from a per-epoch permutation and a position counter
  that are device tensors (the counter is incremented in place, so a captured graph reads the next batch
  at each replay);
* every result is written in place into preallocated tensors (:attr:`DeviceDataset.A`,
  :attr:`DeviceDataset.B` and the parameter buffers), whose addresses never change.

Pixels are identical to the CPU ``apply`` output for the same parameters (same resize code, integer crop
and flip, and the same float32 values as ``to_tensor``'s ``(x / scale - 0.5) / 0.5``). Storage is one
``[N, H, W, K]`` integer tensor: each pixel's A and B channels, zero-padded, packed into one word of 1, 2,
4 or 8 bytes (RGB|RGB: 6 -> 8 bytes), so that the crop gathers one element per pixel (K > 1 words only
beyond 8 bytes, e.g. 16-bit RGB|RGB: 12 -> 16 bytes). 16-bit sources keep their 16 bits.

The random parameters follow the same distributions as :func:`sample_params` (offsets uniform over every
valid position, flip with probability 1/2), but from a different random stream: the CPU pipeline draws
per sample with numpy, this class per batch with torch.

Epochs: :meth:`DeviceDataset.start_epoch` installs the epoch's order (a shuffle drawn from
``(seed, epoch)``, or the caller's order, e.g. the CPU trainer's ``EpochSampler.order(epoch)``) and
reseeds the augmentation generator from ``(seed, epoch)``. A mid-epoch resume is exact only with
:meth:`DeviceDataset.state_dict` in the checkpoint: ``start_epoch(epoch, order, start)`` then
``load_state_dict(saved)`` puts back the position and the generator's state (reseeding alone would replay
the epoch's first crops and flips). The batch size is fixed, as a CUDA graph needs, so the last
incomplete batch of an epoch is *wrapped*: it is topped up with the first samples of the same epoch's
order. An epoch therefore has ``ceil(N / batch_size)`` batches, as the CPU trainer's
``drop_last=False`` loader, and every sample is seen at least once; the ``N % batch_size`` samples that
top up the last batch are seen twice (with fresh crops and flips). ``drop_last=True`` instead counts
``floor(N / batch_size)`` batches per epoch (the data path is the same).

Usage with a CUDA graph (the generator must be registered with the graph)::

    data = DeviceDataset(dataset, "cuda", batch_size=16, channels_last=True)
    data.start_epoch(1)
    ...warm up on a side stream...
    graph = torch.cuda.CUDAGraph()
    graph.register_generator_state(data.generator)
    with torch.cuda.graph(graph):
        real_A, real_B = data.next_batch()
        ...the training step...
    for epoch in epochs:
        data.start_epoch(epoch)
        for _ in range(data.batches_per_epoch):
            graph.replay()

Size check: the whole training set held on the device can exceed its memory (edges2shoes: ~33 GiB decoded,
edges2handbags ~90 GiB), and samples of different sizes after preprocessing cannot be stacked.
:func:`plan_batch_source` estimates the footprint from the image headers (:func:`estimate_device_bytes`,
no pixel decoded) and returns a :class:`DeviceDataset` when it fits in ``max_share`` of the free memory,
else a :class:`fastpix2pix.data.sources.streaming.StreamingDataset` (a DataLoader over the CPU pipeline,
pinned memory, non-blocking copies), with a one-line reason to print. Both implement :class:`BatchSource`.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fastpix2pix.data.aligned import AlignedDataset
from fastpix2pix.data.images import (
    max_value,
)
from fastpix2pix.data.order import IntsLike, checked_order, default_epoch_order, stream_seed
from fastpix2pix.data.sources.base import check_resume_state, normalize_into
from fastpix2pix.data.transforms import AugmentParams, transform_array

__all__ = [
    "DeviceDataset",
    "StorageMismatchError",
    "StoredImages",
    "load_images",
    "padded_pixel_bytes",
    "unpack_pixels",
]
_AUGMENT_STREAM = 2


# Integer types that hold a whole padded pixel as one gather element, by size in bytes.
_WORD_TYPES = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def padded_pixel_bytes(pixel_bytes: int) -> int:
    """Bytes a pixel takes in storage: the next power of two up to 8, then the next multiple of 8."""
    return 1 << (pixel_bytes - 1).bit_length() if pixel_bytes <= 8 else -(-pixel_bytes // 8) * 8


@dataclass(frozen=True)
class StoredImages:
    """The decoded, deterministically preprocessed dataset on the device.

    A pixel's channels (A's, then B's) are padded with zero bytes to a power of two (or a multiple of 8
    bytes) and stored as integer "words", so that the crop gathers one element per pixel instead of one
    per channel (6x fewer gather elements for RGB|RGB, for 33% more memory: 8 bytes instead of 6).

    Attributes:
        words: ``[N, H, W, K]`` packed pixels (K words per pixel; K = 1 unless a pixel exceeds 8 bytes).
        channels: ``C_A + C_B``.
        scale: the full-scale value of the source bit depth (255 or 65535), as ``to_tensor`` uses.
    """

    words: torch.Tensor
    channels: int
    scale: int

    @property
    def pixels(self) -> torch.Tensor:
        """``[N, H, W, C_A + C_B]`` view of the pixels: ``uint8``, or for 16-bit sources the bits in
        ``int16`` (read back as unsigned when converting: not every device gathers ``uint16``)."""
        return unpack_pixels(self.words, self.channels, self.scale)

    @property
    def height(self) -> int:
        return self.words.shape[1]

    @property
    def width(self) -> int:
        return self.words.shape[2]


def unpack_pixels(words: torch.Tensor, channels: int, scale: int) -> torch.Tensor:
    """The ``[..., channels]`` channel view of packed ``[..., K]`` words (no copy)."""
    data = words.view(torch.uint8)
    return data[..., :channels] if scale == 255 else data.view(torch.int16)[..., :channels]


def _preprocessed_pair(dataset: AlignedDataset, index: int) -> np.ndarray:
    """Sample ``index`` as the CPU pipeline has it just before cropping: ``(H, W, C_A + C_B)``.

    The resize target comes from ``params_for`` (the CPU sampler itself), which also raises the CPU
    pipeline's own error when the crop does not fit.
    """
    a, b = dataset.read_pair(index)
    path = str(dataset.paths[index])
    params = dataset.params_for(index, (a.shape[1], a.shape[0]), path)
    resize_only = AugmentParams(resize=params.resize)
    return np.concatenate([transform_array(a, resize_only), transform_array(b, resize_only)], axis=-1)


def _decoded_pairs(dataset: AlignedDataset, workers: int) -> Iterator[np.ndarray]:
    """The preprocessed pairs in index order; Pillow releases the GIL, so threads decode in parallel."""
    indices = range(len(dataset))
    if workers <= 1:
        yield from (_preprocessed_pair(dataset, i) for i in indices)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(lambda i: _preprocessed_pair(dataset, i), indices)


class StorageMismatchError(ValueError):
    """Two samples differ in size or bit depth after preprocessing: one device tensor cannot hold both."""


def _mismatch_error(
    dataset: AlignedDataset, index: int, pair: np.ndarray, first: np.ndarray
) -> StorageMismatchError:
    mode = dataset.options.preprocess
    return StorageMismatchError(
        f"{dataset.paths[index]}: after preprocess {mode!r} this sample is {pair.shape[1]}x{pair.shape[0]} "
        f"(WxH) {pair.dtype}, but {dataset.paths[0]} is {first.shape[1]}x{first.shape[0]} {first.dtype}. "
        f"DeviceDataset stacks all samples in one tensor, so preprocess {mode!r} needs source images of "
        f"equal size and bit depth (resize_and_crop gives equal sizes whatever the sources)"
    )


def _pack(pair: np.ndarray, padded: int) -> torch.Tensor:
    """``(H, W, C)`` uint8/uint16 -> ``(H, W, padded)`` bytes, zero-padded (native byte order, which the
    int16 view on the device reads back, both sides being little-endian)."""
    height, width, _ = pair.shape
    data = np.zeros((height, width, padded), np.uint8)
    data[..., : pair.shape[-1] * pair.itemsize] = np.ascontiguousarray(pair).view(np.uint8)
    return torch.from_numpy(data)


def load_images(dataset: AlignedDataset, device: torch.device, workers: int | None = None) -> StoredImages:
    """Decode and preprocess every sample once, copying each into one device tensor as it arrives
    (so the host never holds a second copy of the whole dataset)."""
    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    words: torch.Tensor | None = None
    first: np.ndarray | None = None
    padded = 0
    for index, pair in enumerate(_decoded_pairs(dataset, workers)):
        if first is None:
            first = pair
            padded = padded_pixel_bytes(pair.shape[-1] * pair.itemsize)
            word_type = _WORD_TYPES[min(padded, 8)]
            shape = (len(dataset), *pair.shape[:2], padded // word_type.itemsize)
            words = torch.empty(shape, dtype=word_type, device=device)
        elif pair.shape != first.shape or pair.dtype != first.dtype:
            raise _mismatch_error(dataset, index, pair, first)
        words[index].view(torch.uint8).copy_(_pack(pair, padded))
    assert words is not None and first is not None  # list_images never returns an empty dataset
    return StoredImages(words=words, channels=first.shape[-1], scale=max_value(first))


class DeviceDataset:
    """An :class:`AlignedDataset` held on ``device``, producing augmented batches without host syncs.

    Args:
        dataset: the CPU dataset; its options (preprocess, sizes, channels, flip, serial_batches, seed)
            define everything here.
        device: where the images live and the batches are made.
        batch_size: the fixed batch size of :meth:`next_batch`.
        channels_last: allocate the outputs in ``torch.channels_last`` memory format.
        drop_last: count ``floor`` instead of ``ceil(N / batch_size)`` batches per epoch (see the module
            docstring: the last batch is wrapped otherwise).
        seed: base of the epoch orders and augmentation streams; default ``dataset.options.seed``.
        workers: decoding threads (default ``min(8, cpu_count)``).

    Attributes:
        A, B: the static output batches, ``[batch_size, C, h, w]`` float32 in [-1, 1], rewritten in place
            by every :meth:`next_batch` / :meth:`augment` (consume or copy them before the next call).
        indices, tops, lefts, flips: ``[batch_size]`` int64 device tensors holding the last batch's
            sample indices, crop offsets and flips (0/1), also rewritten in place.
        generator: the device generator of the crops and flips (register it with a captured graph).
    """

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
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.options = dataset.options
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.seed = self.options.seed if seed is None else seed
        self.stored = load_images(dataset, self.device, workers)
        self.epoch = self.start = 0
        self.generator = torch.Generator(device=self.device)
        self._plan_geometry()
        self._allocate(channels_last)
        self.start_epoch(0)

    # --- setup ---

    def _plan_geometry(self) -> None:
        """Output size and the number of valid crop positions per axis (1 when there is no crop)."""
        height, width = self.stored.height, self.stored.width
        crop = self.options.crop_size
        self.out_height, self.out_width = (
            (crop, crop) if "crop" in self.options.preprocess else (height, width)
        )
        # params_for already refused crops larger than the image; these ranges match sample_params':
        # ``int(u * (size - crop + 1))`` for u uniform in [0, 1).
        self.top_range = height - self.out_height + 1
        self.left_range = width - self.out_width + 1

    def _allocate(self, channels_last: bool) -> None:
        n, b, h, w = len(self), self.batch_size, self.out_height, self.out_width
        height, width = self.stored.height, self.stored.width
        words = self.stored.words
        per_pixel = words.shape[-1]
        dev, i64 = self.device, torch.int64
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.A = torch.empty((b, self.options.input_nc, h, w), device=dev, memory_format=fmt)
        self.B = torch.empty((b, self.options.output_nc, h, w), device=dev, memory_format=fmt)
        self.indices = torch.zeros(b, dtype=i64, device=dev)
        self.tops = torch.zeros(b, dtype=i64, device=dev)
        self.lefts = torch.zeros(b, dtype=i64, device=dev)
        self.flips = torch.zeros(b, dtype=i64, device=dev)
        self._order = torch.arange(n, dtype=i64, device=dev)
        self._position = torch.zeros((), dtype=i64, device=dev)
        self._batch_steps = torch.arange(b, dtype=i64, device=dev)
        self._slots = torch.empty(b, dtype=i64, device=dev)
        self._row_base = torch.empty(b, dtype=i64, device=dev)
        self._row_steps = torch.arange(h, dtype=i64, device=dev)
        self._col_steps = torch.arange(w, dtype=i64, device=dev)
        self._col_mirror = (w - 1) - 2 * self._col_steps  # added to a column index, it flips it
        self._rows = torch.empty((b, h), dtype=i64, device=dev)
        self._cols = torch.empty((b, w), dtype=i64, device=dev)
        # Row gather first (whole contiguous rows of packed pixels), then the column gather within them.
        self._word_rows = words.view(n * height, width * per_pixel)
        self._row_buffer = torch.empty((b * h, width * per_pixel), dtype=words.dtype, device=dev)
        crop_words = torch.empty((b, h, w, per_pixel), dtype=words.dtype, device=dev)
        self._crop = unpack_pixels(crop_words, self.stored.channels, self.stored.scale)
        # Views of the static buffers, made once: the column gather of [B, h, W(, K)] along W.
        source = self._row_buffer.view(b, h, width, per_pixel)
        columns = self._cols[:, None, :, None].expand(b, h, w, per_pixel)
        if per_pixel == 1:  # a 3-d gather: 10x faster on CPU than with a trailing size-1 dimension
            source, columns, crop_words = source[..., 0], columns[..., 0], crop_words[..., 0]
        self._gather = (source, columns, crop_words)
        # 16-bit data is read back as unsigned through int32; 8-bit converts straight from the crop.
        self._unsigned = (
            None if self.stored.scale == 255 else torch.empty(self._crop.shape, dtype=torch.int32, device=dev)
        )
        # A device tensor, not a Python number: CUDA turns division by a host scalar into a multiplication
        # by its reciprocal, which is not always the correctly rounded quotient that to_tensor's table has.
        self._half_scale = torch.tensor(self.stored.scale / 2, device=dev)  # 127.5 or 32767.5: exact
        self._minus_one = torch.tensor(-1.0, device=dev)

    # --- epochs ---

    def __len__(self) -> int:
        return self.stored.words.shape[0]

    @property
    def batches_per_epoch(self) -> int:
        """Batches in a whole epoch: ``ceil(N / batch_size)`` (last batch wrapped), or ``floor`` with
        ``drop_last``. An epoch started at ``start`` has the same count over ``N - start`` samples."""
        count = len(self) - self.start
        return count // self.batch_size if self.drop_last else math.ceil(count / self.batch_size)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The sample order of ``epoch``: ``0..N-1`` with ``serial_batches``, else a shuffle that is a
        function of ``(seed, epoch)`` only (so a resumed run reproduces it)."""
        return default_epoch_order(len(self), self.seed, epoch, not self.options.serial_batches)

    def start_epoch(self, epoch: int, order: IntsLike | None = None, start: int = 0) -> None:
        """Install the order of ``epoch`` and reseed the augmentation; the next batch starts at position
        ``start`` of the order (a mid-epoch resume). Runs outside any graph: it copies host data.

        ``order`` (a permutation of ``0..N-1``) replaces :meth:`epoch_order`, e.g. to follow the CPU
        trainer's ``EpochSampler.order(epoch)`` sample for sample.
        """
        n = len(self)
        order_t = self.epoch_order(epoch) if order is None else checked_order(order, n)
        if not 0 <= start <= n:
            raise ValueError(f"start must be in 0..{n}, got {start}")
        self._order.copy_(order_t)
        self._position.fill_(start)
        self.generator.manual_seed(stream_seed(self.seed, epoch, _AUGMENT_STREAM))
        self.epoch, self.start = epoch, start

    # --- the batch-source interface (see BatchSource) ---

    in_graph = True  # next_batch is device ops only, in place: a CUDA graph may capture it
    fixed_shape = True  # one stacked tensor: every sample has the same size

    def generators(self) -> tuple[torch.Generator, ...]:
        """The device generators a captured graph must register (their offsets advance at each replay)."""
        return (self.generator,)

    def state_dict(self) -> dict[str, Any]:
        """Where the epoch is and the augmentation generator's state, for an exact mid-epoch resume.

        Reads the device position counter: a host sync (checkpoint time only). The generator state is a CPU
        ``ByteTensor`` on every device (a CUDA generator's is its seed and Philox offset, which graph replays
        advance on the host, so it is current without a sync).
        """
        return {
            "source": "device",
            "seed": self.seed,
            "epoch": self.epoch,
            "position": int(self._position),
            "generator": self.generator.get_state(),
            "generator_device": self.device.type,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue exactly where ``state`` (a :meth:`state_dict`) was taken; call after
        ``start_epoch(epoch, order, start)`` with the checkpoint's epoch and position.

        A state from an earlier, finished epoch is ignored (the epoch just started is then fresh, as in the
        uninterrupted run). The position and the generator are written in place, so a captured graph keeps
        reading them; this is also how to undo the warm-up draws of a capture (``state_dict`` before it,
        ``load_state_dict`` after it).
        """
        if not check_resume_state(state, seed=self.seed, epoch=self.epoch, start=self.start, size=len(self)):
            return
        self._position.fill_(int(state["position"]))
        saved = state.get("generator")
        if saved is None:  # a streaming source's state: its randomness does not carry over
            return
        if state.get("generator_device") != self.device.type:
            warnings.warn(
                f"data state saved with a {state.get('generator_device')} generator cannot be restored on "
                f"{self.device.type}: the rest of epoch {self.epoch} draws other crops and flips",
                stacklevel=2,
            )
            return
        self.generator.set_state(saved.cpu())

    # --- batches ---

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next augmented batch, written into the static :attr:`A` and :attr:`B` (returned).

        Graph-safe: device ops only, fixed shapes, in-place writes; the position counter advances by
        ``batch_size`` on the device, wrapping around the epoch's order.
        """
        self._next_indices()
        self._draw_params()
        return self._write_batch()

    def augment(
        self, indices: IntsLike, tops: IntsLike, lefts: IntsLike, flips: IntsLike
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch for explicit parameters (one per sample, ``batch_size`` of each), into :attr:`A` and
        :attr:`B`. For checks and evaluation: it validates its arguments on the host, so it syncs."""
        values = {"indices": indices, "tops": tops, "lefts": lefts, "flips": flips}
        limits = {"indices": len(self), "tops": self.top_range, "lefts": self.left_range, "flips": 2}
        for name, given in values.items():
            value = torch.as_tensor(given, dtype=torch.int64).cpu()
            if value.shape != (self.batch_size,):
                raise ValueError(f"{name} must have shape ({self.batch_size},), got {tuple(value.shape)}")
            if value.numel() and (int(value.min()) < 0 or int(value.max()) >= limits[name]):
                raise ValueError(f"{name} must be in 0..{limits[name] - 1}, got {value.tolist()}")
            getattr(self, name).copy_(value)
        return self._write_batch()

    def _next_indices(self) -> None:
        torch.add(self._position, self._batch_steps, out=self._slots)
        self._slots.remainder_(len(self))
        torch.index_select(self._order, 0, self._slots, out=self.indices)
        self._position.add_(self.batch_size)

    def _draw_params(self) -> None:
        # A range of 1 (no crop) or no_flip leaves the zeros from allocation: no draw, no launch.
        if self.top_range > 1:
            torch.randint(self.top_range, (self.batch_size,), generator=self.generator, out=self.tops)
        if self.left_range > 1:
            torch.randint(self.left_range, (self.batch_size,), generator=self.generator, out=self.lefts)
        if not self.options.no_flip:
            torch.randint(2, (self.batch_size,), generator=self.generator, out=self.flips)

    def _write_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Crop and flip by index arithmetic and two gathers, then convert A and B to [-1, 1]."""
        # Rows of the flattened [N*H, W*K] packed pixels: index*H + top + r.
        torch.mul(self.indices, self.stored.height, out=self._row_base).add_(self.tops)
        torch.add(self._row_base[:, None], self._row_steps, out=self._rows)
        # Columns: left + j, or left + (w-1-j) when flipped, i.e. left + j + flip*(w-1-2j).
        torch.mul(self.flips[:, None], self._col_mirror, out=self._cols).add_(self._col_steps)
        self._cols.add_(self.lefts[:, None])
        torch.index_select(self._word_rows, 0, self._rows.view(-1), out=self._row_buffer)
        source, columns, crop_words = self._gather
        torch.gather(source, 2, columns, out=crop_words)
        crop = self._crop
        if self._unsigned is not None:
            crop = self._unsigned.copy_(crop).bitwise_and_(0xFFFF)  # int16 bits -> the uint16 value
        nc_a = self.options.input_nc
        self._normalize(crop[..., :nc_a], self.A)
        self._normalize(crop[..., nc_a:], self.B)
        return self.A, self.B

    def _normalize(self, crop: torch.Tensor, out: torch.Tensor) -> None:
        normalize_into(crop, out, self._half_scale, self._minus_one)
