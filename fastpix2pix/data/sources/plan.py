"""Whether the training set is held on the device or streamed from host memory, from its headers."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fastpix2pix.data.aligned import AlignedDataset
from fastpix2pix.data.sources.base import SampleGeometry, sample_geometry, survey_dataset
from fastpix2pix.data.sources.device import DeviceDataset, StorageMismatchError, padded_pixel_bytes
from fastpix2pix.data.sources.streaming import StreamingDataset

__all__ = [
    "DEFAULT_DEVICE_SHARE",
    "SOURCE_POLICIES",
    "estimate_device_bytes",
    "free_memory",
    "plan_batch_source",
]


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
    source = StreamingDataset(dataset, device, batch_size, geometry=geometry, **kwargs)
    shape = "" if source.fixed_shape else "; batch shapes vary, so no CUDA graph"
    return (
        source,
        f"data: {len(dataset)} pairs streamed from host memory ({source.workers} workers): {why}{shape}",
    )
