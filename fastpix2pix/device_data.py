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
else a :class:`fastpix2pix.streaming_data.StreamingDataset` (a DataLoader over the CPU pipeline, pinned
memory, non-blocking copies), with a one-line reason to print. Both implement :class:`BatchSource`.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from PIL import Image

from fastpix2pix.data.aligned import AlignedDataset
from fastpix2pix.data.images import (
    _DECODE_ERRORS,
    ImageReadError,
    _low_byte_rawmode,
    _tile_rawmode,
    max_value,
)
from fastpix2pix.data.transforms import AugmentParams, output_size, resized_size, transform_array

if TYPE_CHECKING:
    from fastpix2pix.streaming_data import StreamingDataset

__all__ = [
    "DEFAULT_DEVICE_SHARE",
    "SOURCE_POLICIES",
    "BatchSource",
    "DeviceDataset",
    "SampleGeometry",
    "StorageMismatchError",
    "StoredImages",
    "check_resume_state",
    "checked_order",
    "default_epoch_order",
    "estimate_device_bytes",
    "free_memory",
    "load_images",
    "normalize_into",
    "padded_pixel_bytes",
    "plan_batch_source",
    "sample_geometry",
    "survey_dataset",
    "unpack_pixels",
]

# Stream ids that separate the epoch order and the augmentation draws derived from the same (seed, epoch).
_ORDER_STREAM = 1
_AUGMENT_STREAM = 2

IntsLike = torch.Tensor | Sequence[int] | np.ndarray


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


def _stream_seed(seed: int, epoch: int, stream: int) -> int:
    """A 63-bit seed for one (seed, epoch, stream): independent streams via numpy's SeedSequence."""
    state = np.random.SeedSequence([seed, epoch, stream]).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


def default_epoch_order(size: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    """The sample order of ``epoch`` when the caller gives none: ``0..size-1`` without ``shuffle``, else a
    permutation that is a function of ``(seed, epoch)`` only (so a resumed run reproduces it)."""
    if not shuffle:
        return torch.arange(size)
    generator = torch.Generator().manual_seed(_stream_seed(seed, epoch, _ORDER_STREAM))
    return torch.randperm(size, generator=generator)


def checked_order(order: IntsLike, size: int) -> torch.Tensor:
    """``order`` as a CPU int64 tensor, after checking that it is a permutation of ``0..size-1``."""
    order_t = torch.as_tensor(order, dtype=torch.int64).cpu()
    if order_t.shape != (size,) or not torch.equal(order_t.sort().values, torch.arange(size)):
        raise ValueError(f"order must be a permutation of 0..{size - 1}, got {order_t.shape[0]} indices")
    return order_t


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
        self.generator.manual_seed(_stream_seed(self.seed, epoch, _AUGMENT_STREAM))
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


# --- the batch-source interface --------------------------------------------------------------------------


class BatchSource(Protocol):
    """What the fast trainer reads its batches from: a :class:`DeviceDataset` or a
    :class:`fastpix2pix.streaming_data.StreamingDataset`.

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


def _header_bytes_per_channel(im: Image.Image) -> int:
    """The bytes per channel :func:`read_image` decodes this file to, from the header alone: the same
    decisions as its ``_decode`` (16-bit gray and 16-bit RGB(A) PNG/TIFF keep 16 bits)."""
    if im.mode.startswith("I;16") or im.mode == "I":
        return 2
    if im.mode in ("RGB", "RGBA"):
        rawmodes = {_tile_rawmode(tile.args) for tile in im.tile}
        if len(rawmodes) == 1 and _low_byte_rawmode(rawmodes.pop() or "") is not None:
            return 2
    return 1


def sample_geometry(dataset: AlignedDataset, index: int) -> SampleGeometry:
    """The sizes of sample ``index`` after ``dataset.options.preprocess``, from its file header."""
    path = dataset.paths[index]
    try:
        with Image.open(path) as im:
            (width, height), depth = im.size, _header_bytes_per_channel(im)
    except FileNotFoundError:
        raise FileNotFoundError(f"image file {path} does not exist") from None
    except _DECODE_ERRORS as err:
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


def _stored_bytes(dataset: AlignedDataset, geometry: SampleGeometry) -> int:
    """Bytes one sample takes in :class:`StoredImages` (packed, padded pixels)."""
    width, height = geometry.stored_size
    channels = dataset.options.input_nc + dataset.options.output_nc
    return width * height * padded_pixel_bytes(channels * geometry.bytes_per_channel)


def _first_storage_mismatch(geometry: Sequence[SampleGeometry]) -> int | None:
    """The first sample whose stored size or bit depth differs from sample 0's, or None."""
    first = geometry[0]
    for index, sample in enumerate(geometry):
        if (sample.stored_size, sample.bytes_per_channel) != (first.stored_size, first.bytes_per_channel):
            return index
    return None


def estimate_device_bytes(
    dataset: AlignedDataset, *, workers: int | None = None, geometry: Sequence[SampleGeometry] | None = None
) -> int | None:
    """The bytes :class:`DeviceDataset` would store for ``dataset`` (its ``stored.words.nbytes``), from the
    image headers; None when the samples differ in size or bit depth after the deterministic resize (one
    device tensor cannot hold them). ``geometry`` reuses a :func:`survey_dataset` result."""
    geometry = survey_dataset(dataset, workers) if geometry is None else geometry
    if _first_storage_mismatch(geometry) is not None:
        return None
    return len(geometry) * _stored_bytes(dataset, geometry[0])


# --- the memory budget -----------------------------------------------------------------------------------

# Share of the free memory the decoded training set may take on the device. Half: the rest must hold what
# the run allocates after the data: activations saved for backward (they grow with --batch_size and the
# image size), cuDNN workspaces, the CUDA graph's private pool, the warm-up snapshot of weights and Adam
# state, and allocator fragmentation. An over-estimate of the room left only costs speed (the data is
# streamed, see plan_batch_source), an under-estimate an out-of-memory error; at the defaults (unet_256,
# batch 1-16) the run needs a few GiB, far below half of any training GPU's memory.
DEFAULT_DEVICE_SHARE = 0.5

SOURCE_POLICIES: tuple[str, ...] = ("auto", "device", "stream")


def free_memory(device: torch.device | str) -> int | None:
    """Free bytes on ``device``, or None for "unknown" (no limit is then applied).

    CUDA: ``torch.cuda.mem_get_info`` (what the driver has free; the caching allocator's reserve counts as
    used). CPU: the available physical pages from ``os.sysconf`` (``SC_AVPHYS_PAGES``: free RAM without
    the reclaimable page cache, so it errs low); None where the platform has no such counter (macOS).
    Other device types: None.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        pages, page_size = os.sysconf("SC_AVPHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None
    return pages * page_size if pages > 0 and page_size > 0 else None


def _percent(part: float, whole: float) -> str:
    share = part / whole
    return f"{share:.0%}" if share >= 0.01 or share == 0 else "<1%"


def _gib(size: float) -> str:
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 / 10 else f"{size / 2**20:.1f} MiB"


# --- choosing the source ---------------------------------------------------------------------------------


def plan_batch_source(
    dataset: AlignedDataset,
    device: torch.device | str,
    batch_size: int,
    *,
    channels_last: bool = False,
    seed: int | None = None,
    policy: str = "auto",
    max_share: float = DEFAULT_DEVICE_SHARE,
    workers: int | None = None,
    drop_last: bool = False,
) -> tuple[DeviceDataset | StreamingDataset, str]:
    """The batch source for ``dataset`` on ``device``, and one line saying which and why.

    ``policy``: ``"auto"`` holds the data on the device when its decoded size (from the headers) is at
    most ``max_share`` of the free memory (:func:`free_memory`) and every sample has the same stored size,
    else streams it from host memory; ``"device"`` always holds it (a warning in the line when above the
    share; samples of different sizes raise :class:`StorageMismatchError` naming two files);
    ``"stream"`` always streams. ``auto`` never fails where the plain trainer's DataLoader works: a device
    allocation that fails anyway falls back to streaming. ``workers``: decoding threads of the device
    load, or DataLoader worker processes of the stream. The other arguments go to the source.
    """
    if policy not in SOURCE_POLICIES:
        raise ValueError(f"policy must be one of {SOURCE_POLICIES}, got {policy!r}")
    if not max_share > 0:
        raise ValueError(f"max_share must be > 0, got {max_share!r}")
    device = torch.device(device)
    kwargs: dict[str, Any] = {"channels_last": channels_last, "seed": seed, "workers": workers}
    kwargs["drop_last"] = drop_last
    if policy == "stream":
        return _streaming(dataset, device, batch_size, kwargs, None, "policy 'stream' (--device_data stream)")
    count = len(dataset)
    free = free_memory(device)
    # Sample 0's size times N is the exact total when the sizes agree (the only case the device can hold);
    # a total already above the budget is decided without reading every header.
    rough = count * _stored_bytes(dataset, sample_geometry(dataset, 0))
    over = free is not None and rough > max_share * free
    if over and policy == "auto":
        why = f"~{_gib(rough)} decoded exceeds {max_share:.0%} of the {_gib(free)} free on {device}"
        return _streaming(dataset, device, batch_size, kwargs, None, f"{why} (--device_data_share)")
    geometry = survey_dataset(dataset, workers)
    mismatch = _first_storage_mismatch(geometry)
    if mismatch is not None:
        why = _mismatch_reason(dataset, geometry, mismatch)
        if policy == "device":
            raise StorageMismatchError(f"--device_data device: {why}; use --device_data auto to stream them")
        return _streaming(dataset, device, batch_size, kwargs, geometry, why)
    try:
        source = DeviceDataset(dataset, device, batch_size, **kwargs)
    except torch.cuda.OutOfMemoryError:
        if policy != "auto":
            raise
        torch.cuda.empty_cache()
        why = f"allocating {_gib(rough)} on {device} failed ({_gib(free or 0)} were free)"
        return _streaming(dataset, device, batch_size, kwargs, geometry, why)
    except StorageMismatchError as err:  # the decoded pixels disagree with what the headers said
        if policy != "auto":
            raise
        return _streaming(dataset, device, batch_size, kwargs, None, f"the decoded samples differ: {err}")
    return source, _device_reason(count, rough, device, free, max_share, over)


def _device_reason(
    count: int, size: int, device: torch.device, free: int | None, share: float, over: bool
) -> str:
    where = f"data: {count} pairs, {_gib(size)} decoded, held on {device}"
    if free is None:
        return f"{where} (free memory unknown: no limit applied)"
    line = f"{where} ({_percent(size, free)} of the {_gib(free)} free)"
    if over:
        line += f"; warning: above the {share:.0%} share, kept there by --device_data device"
    return line


def _mismatch_reason(dataset: AlignedDataset, geometry: Sequence[SampleGeometry], index: int) -> str:
    first, other = geometry[0], geometry[index]
    mode = dataset.options.preprocess
    if first.stored_size != other.stored_size:

        def size(g: SampleGeometry) -> str:
            return f"{g.stored_size[0]}x{g.stored_size[1]}"

        what = "sizes"
    else:

        def size(g: SampleGeometry) -> str:
            return f"{8 * g.bytes_per_channel}-bit"

        what = "bit depths"
    return (
        f"preprocess {mode!r} leaves samples of different {what} ({dataset.paths[0]} is {size(first)}, "
        f"{dataset.paths[index]} is {size(other)}), which one device tensor cannot stack"
    )


def _streaming(
    dataset: AlignedDataset,
    device: torch.device,
    batch_size: int,
    kwargs: Mapping[str, Any],
    geometry: Sequence[SampleGeometry] | None,
    why: str,
) -> tuple[StreamingDataset, str]:
    from fastpix2pix.streaming_data import StreamingDataset  # it imports this module

    source = StreamingDataset(dataset, device, batch_size, geometry=geometry, **kwargs)
    shape = "" if source.fixed_shape else "; batch shapes vary, so no CUDA graph"
    return (
        source,
        f"data: {len(dataset)} pairs streamed from host memory ({source.workers} workers): {why}{shape}",
    )
