"""Tests of fastpix2pix.data.sources.device: the device-resident dataset against the CPU pipeline.

Exactness: for the same explicit parameters (sample, crop offsets, flip) the device batch equals the CPU
``AlignedDataset`` sample bit for bit, in every preprocess mode, for 8- and 16-bit data, on the synthetic
facades (always) and the real ones (when present). Statistics: with random parameters, the offsets and
flips follow the CPU sampler's distributions and the mean image matches the exact expectation. Graph
safety: no host sync, fixed storage, and (with CUDA) capture and replay in a CUDA graph.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from pair_files import write_pair
from PIL import Image

from fastpix2pix.data import (
    AlignedDataset,
    AugmentParams,
    DataOptions,
    apply,
    generate_synthetic_facades,
    params_rng,
    sample_params,
    shared_facades_root,
)
from fastpix2pix.data.images import encode_png16
from fastpix2pix.data.sources import plan as plan_module
from fastpix2pix.data.sources.base import sample_geometry
from fastpix2pix.data.sources.device import DeviceDataset, StorageMismatchError
from fastpix2pix.data.sources.plan import estimate_device_bytes, free_memory, plan_batch_source
from fastpix2pix.data.sources.streaming import StreamingDataset

CUDA_REASON = "CUDA is not available on this machine"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_REASON)
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]

# Small synthetic images keep every test fast; 40 -> 32 keeps the official 286/256 load/crop shape.
SIZE = 32
SMALL = {"load_size": 40, "crop_size": 32}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic_facades(tmp_path_factory.mktemp("synthetic"), n_train=6, n_test=0, size=SIZE)


def cpu_params(params: AugmentParams) -> tuple[int, int, int]:
    """``(top, left, flip)`` of CPU parameters (no crop = offset 0)."""
    left, top = params.crop[:2] if params.crop is not None else (0, 0)
    return top, left, int(params.flip)


def cpu_batch(
    dataset: AlignedDataset, indices: list[int]
) -> tuple[list[AugmentParams], torch.Tensor, torch.Tensor]:
    """The CPU pipeline's parameters and samples (``dataset[i]``) for ``indices`` in the current epoch."""
    params, a_list, b_list = [], [], []
    for index in indices:
        a, _ = dataset.read_pair(index)
        params.append(dataset.params_for(index, (a.shape[1], a.shape[0])))
        sample = dataset[index]
        a_list.append(sample["A"])
        b_list.append(sample["B"])
    return params, torch.stack(a_list), torch.stack(b_list)


def assert_matches_cpu(dataset: AlignedDataset, data: DeviceDataset, epochs: range) -> None:
    """For each epoch, every sample with the CPU sampler's parameters equals the CPU sample exactly."""
    n, size = len(dataset), data.batch_size
    for epoch in epochs:
        dataset.set_epoch(epoch)
        for first in range(0, n, size):
            indices = [(first + k) % n for k in range(size)]
            params, want_a, want_b = cpu_batch(dataset, indices)
            tops, lefts, flips = zip(*(cpu_params(p) for p in params), strict=True)
            got_a, got_b = data.augment(indices, tops, lefts, flips)
            assert got_a.dtype == torch.float32 and got_a.shape == want_a.shape
            assert torch.equal(got_a.cpu(), want_a), f"A differs: epoch {epoch}, samples {indices}"
            assert torch.equal(got_b.cpu(), want_b), f"B differs: epoch {epoch}, samples {indices}"


# ----------------------------------------------------------------------------------------------------------
# Exactness against the CPU pipeline


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "options",
    [
        DataOptions(direction="BtoA", **SMALL),
        DataOptions(direction="AtoB", preprocess="crop", crop_size=24),
        DataOptions(direction="BtoA", preprocess="scale_width", load_size=24, crop_size=16),
        DataOptions(direction="BtoA", preprocess="scale_width_and_crop", load_size=40, crop_size=24),
        DataOptions(direction="BtoA", preprocess="none"),
        DataOptions(direction="BtoA", input_nc=1, **SMALL),  # grayscale A, RGB B
        DataOptions(direction="AtoB", output_nc=1, no_flip=True, **SMALL),
        DataOptions(direction="BtoA", input_nc=1, output_nc=1, **SMALL),  # 2-byte pixels
        DataOptions(direction="BtoA", load_size=SIZE, crop_size=SIZE),  # no resize, no crop
    ],
    ids=[
        "resize_and_crop",
        "crop",
        "scale_width",
        "scale_width_and_crop",
        "none",
        "gray_A",
        "gray_B",
        "gray_both",
        "plain",
    ],
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_explicit_params_match_cpu_apply(synthetic_root, device, options, channels_last):
    dataset = AlignedDataset(synthetic_root, "train", options)
    data = DeviceDataset(dataset, device, batch_size=4, channels_last=channels_last, workers=1)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert data.A.is_contiguous(memory_format=fmt) and data.B.is_contiguous(memory_format=fmt)
    assert_matches_cpu(dataset, data, range(3))


def test_real_facades_match_cpu_apply():
    root = shared_facades_root()
    if root is None:
        pytest.skip("shared facades data not found (set FASTPIX2PIX_FACADES to its folder)")
    dataset = AlignedDataset(root, "train", DataOptions(direction="BtoA", max_dataset_size=8))
    data = DeviceDataset(dataset, "cpu", batch_size=4, channels_last=True)
    assert data.stored.pixels.shape == (8, 286, 286, 6) and data.stored.pixels.dtype == torch.uint8
    assert data.A.shape == data.B.shape == (4, 3, 256, 256)
    assert_matches_cpu(dataset, data, range(2))


def write_ab(path: Path, a: np.ndarray, b: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png16(np.concatenate([a, b], axis=1)))


@pytest.mark.parametrize("device", DEVICES)
def test_16bit_sources_keep_full_precision(tmp_path, device):
    # 256x256 holds every 16-bit value once, so the conversion is checked on all of them.
    rng = np.random.default_rng(7)
    every_value = rng.permutation(65536).astype(np.uint16).reshape(256, 256, 1)
    for k in range(2):
        rgb = rng.integers(0, 65536, (256, 256, 3), dtype=np.uint16)
        write_ab(tmp_path / "train" / f"{k}.png", np.repeat(every_value, 3, axis=-1) if k == 0 else rgb, rgb)
    for options in (DataOptions(preprocess="none"), DataOptions(load_size=260, crop_size=256)):
        dataset = AlignedDataset(tmp_path, "train", options)
        data = DeviceDataset(dataset, device, batch_size=2, workers=1)
        assert data.stored.scale == 65535
        assert_matches_cpu(dataset, data, range(2))


@pytest.mark.parametrize("device", DEVICES)
def test_every_8bit_value_converts_like_to_tensor(tmp_path, device):
    every_value = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=-1)
    (tmp_path / "train").mkdir()
    Image.fromarray(np.concatenate([every_value, every_value[::-1]], axis=1)).save(
        tmp_path / "train" / "0.png"
    )
    dataset = AlignedDataset(tmp_path, "train", DataOptions(preprocess="none", no_flip=True))
    data = DeviceDataset(dataset, device, batch_size=1, workers=1)
    assert data.stored.pixels.dtype == torch.uint8
    assert_matches_cpu(dataset, data, range(1))


def test_unequal_sizes_raise_for_size_keeping_modes(tmp_path):
    rng = np.random.default_rng(3)
    (tmp_path / "train").mkdir()
    for name, width in (("0.png", 32), ("1.png", 40)):  # halves of 32x32 and 40x32 (WxH)
        img = rng.integers(0, 256, (32, width, 3), dtype=np.uint8)
        Image.fromarray(np.concatenate([img, img], axis=1)).save(tmp_path / "train" / name)

    def unequal(options: DataOptions) -> AlignedDataset:
        return AlignedDataset(tmp_path, "train", options, allow_nonsquare=True)

    for mode in ("none", "crop", "scale_width", "scale_width_and_crop"):
        dataset = unequal(DataOptions(preprocess=mode, load_size=32, crop_size=16))
        with pytest.raises(
            ValueError, match=rf"1\.png.*preprocess '{mode}' needs source images of equal size"
        ):
            DeviceDataset(dataset, "cpu", workers=1)
    # resize_and_crop makes every sample load_size x load_size, so mixed sources are fine.
    dataset = unequal(DataOptions(load_size=36, crop_size=32))
    data = DeviceDataset(dataset, "cpu", batch_size=2, workers=2)
    assert data.stored.pixels.shape == (2, 36, 36, 6)
    assert_matches_cpu(dataset, data, range(2))


def test_crop_larger_than_image_raises_the_cpu_error(synthetic_root):
    dataset = AlignedDataset(synthetic_root, "train", DataOptions(preprocess="crop", crop_size=SIZE + 4))
    with pytest.raises(ValueError, match="crop_size 36 is larger than the image"):
        DeviceDataset(dataset, "cpu", workers=1)


def test_augment_validates_its_arguments(synthetic_root):
    data = DeviceDataset(AlignedDataset(synthetic_root, "train", DataOptions(**SMALL)), "cpu", batch_size=2)
    with pytest.raises(ValueError, match=r"tops must be in 0\.\.8"):
        data.augment([0, 1], [0, 9], [0, 0], [0, 1])
    with pytest.raises(ValueError, match=r"indices must have shape \(2,\)"):
        data.augment([0], [0], [0], [0])


# ----------------------------------------------------------------------------------------------------------
# Epochs: order, wrapping, resume


def batches(data: DeviceDataset, count: int) -> Iterator[list[int]]:
    for _ in range(count):
        data.next_batch()
        yield data.indices.tolist()


def test_serial_order_wraps_the_last_batch(synthetic_root):
    dataset = AlignedDataset(
        synthetic_root, "train", DataOptions(serial_batches=True, max_dataset_size=5, **SMALL)
    )
    data = DeviceDataset(dataset, "cpu", batch_size=2)
    data.start_epoch(1)
    assert data.batches_per_epoch == 3  # ceil(5 / 2), as the CPU trainer's drop_last=False loader
    assert list(batches(data, 4)) == [[0, 1], [2, 3], [4, 0], [1, 2]]
    data.start_epoch(2, start=3)  # a resume after 3 samples
    assert data.batches_per_epoch == 1
    assert list(batches(data, 1)) == [[3, 4]]
    dropping = DeviceDataset(dataset, "cpu", batch_size=2, drop_last=True)
    assert dropping.batches_per_epoch == 2


def test_shuffled_epochs_cover_every_sample_and_are_reproducible(synthetic_root):
    dataset = AlignedDataset(synthetic_root, "train", DataOptions(seed=5, **SMALL))
    data = DeviceDataset(dataset, "cpu", batch_size=3)

    def epoch(number: int) -> tuple[list[int], torch.Tensor]:
        data.start_epoch(number)
        seen, images = [], []
        for _ in range(data.batches_per_epoch):
            a, _ = data.next_batch()
            seen += data.indices.tolist()
            images.append(a.clone())
        return seen, torch.cat(images)

    first, first_images = epoch(1)
    assert sorted(first) == list(range(6))
    again, again_images = epoch(1)
    assert again == first and torch.equal(again_images, first_images)  # order and crops: f(seed, epoch)
    second, _ = epoch(2)
    assert sorted(second) == list(range(6)) and second != first


def test_caller_order_is_followed(synthetic_root):
    dataset = AlignedDataset(synthetic_root, "train", DataOptions(**SMALL))
    data = DeviceDataset(dataset, "cpu", batch_size=2)
    data.start_epoch(4, order=[5, 3, 1, 0, 2, 4])
    assert list(batches(data, 3)) == [[5, 3], [1, 0], [2, 4]]
    with pytest.raises(ValueError, match="permutation"):
        data.start_epoch(4, order=[0, 0, 1, 2, 3, 4])


# ----------------------------------------------------------------------------------------------------------
# Random parameters: the same distributions as the CPU sampler

CHI2_Z = 3.29  # one-sided normal quantile for p = 0.0005


def chi2_bound(dof: int) -> float:
    """Wilson-Hilferty upper quantile of chi-square(dof) at p = 0.0005."""
    k = 2 / (9 * dof)
    return dof * (1 - k + CHI2_Z * math.sqrt(k)) ** 3


def assert_uniform(counts: np.ndarray, what: str) -> None:
    expected = counts.sum() / len(counts)
    statistic = float(((counts - expected) ** 2 / expected).sum())
    assert statistic < chi2_bound(len(counts) - 1), f"{what}: chi2 {statistic:.1f}, counts {counts}"


def device_draws(data: DeviceDataset, count: int) -> np.ndarray:
    """``[count * batch, 3]`` (top, left, flip) drawn by next_batch."""
    rows = []
    for _ in range(count):
        data.next_batch()
        rows.append(torch.stack([data.tops, data.lefts, data.flips], dim=1).cpu())
    return torch.cat(rows).numpy()


def cpu_draws(size: tuple[int, int], options: DataOptions, count: int) -> np.ndarray:
    rows = []
    for index in range(count):
        params = sample_params(size, options, params_rng(options.seed, index // 100, index % 100))
        rows.append(cpu_params(params))
    return np.array(rows)


@pytest.mark.parametrize("device", DEVICES)
def test_random_params_follow_the_cpu_distributions(synthetic_root, device):
    options = DataOptions(direction="BtoA", seed=11, **SMALL)
    data = DeviceDataset(AlignedDataset(synthetic_root, "train", options), device, batch_size=32, workers=1)
    draws = {"device": device_draws(data, 125), "cpu": cpu_draws((SIZE, SIZE), options, 4000)}
    positions = SMALL["load_size"] - SMALL["crop_size"] + 1
    for source, values in draws.items():
        for column, name in ((0, "top"), (1, "left")):
            counts = np.bincount(values[:, column], minlength=positions)
            assert len(counts) == positions, f"{source} {name} outside 0..{positions - 1}"
            assert_uniform(counts, f"{source} {name}")
        flip_rate = values[:, 2].mean()
        assert abs(flip_rate - 0.5) < 4 * math.sqrt(0.25 / len(values)), f"{source} flip rate {flip_rate}"
    # Same distribution on both sides: a two-sample chi-square on the joint (top, left, flip) cells.
    cells = positions * positions * 2
    hist = [
        np.bincount((v[:, 0] * positions + v[:, 1]) * 2 + v[:, 2], minlength=cells) for v in draws.values()
    ]
    table = np.stack(hist).astype(np.float64)
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    statistic = float(((table - expected) ** 2 / expected).sum())
    assert statistic < chi2_bound(cells - 1), f"device and CPU draws differ: chi2 {statistic:.1f}"


@pytest.mark.parametrize("device", DEVICES)
def test_mean_image_matches_the_cpu_expectation(synthetic_root, device):
    """The per-pixel mean over many random batches against the exact mean over every crop and flip
    (each pixel's error in units of its standard error), and against the CPU pipeline's own mean."""
    options = DataOptions(direction="BtoA", max_dataset_size=1, seed=3, **SMALL)
    dataset = AlignedDataset(synthetic_root, "train", options)
    a, _ = dataset.read_pair(0)
    resize = dataset.params_for(0, (a.shape[1], a.shape[0])).resize
    positions, crop = SMALL["load_size"] - SMALL["crop_size"] + 1, SMALL["crop_size"]
    every = torch.stack(
        [
            apply(a, AugmentParams(resize, (x, y, crop, crop), flip))
            for x in range(positions)
            for y in range(positions)
            for flip in (False, True)
        ]
    ).double()
    exact_mean, variance = every.mean(0), every.var(0, unbiased=False)
    draws = 2048

    data = DeviceDataset(dataset, device, batch_size=32, workers=1)
    device_sum = torch.zeros_like(exact_mean)
    for _ in range(draws // 32):
        device_sum += data.next_batch()[0].double().sum(0).cpu()
    cpu_sum = sum(
        apply(a, sample_params((SIZE, SIZE), options, params_rng(3, 0, i))).double() for i in range(draws)
    )

    stderr = (variance / draws).sqrt().clamp_min(1e-12)
    for name, total in (("device", device_sum), ("cpu", cpu_sum)):
        z = ((total / draws - exact_mean) / stderr)[variance > 0]
        assert z.abs().max() < 6, f"{name}: max |z| {z.abs().max():.2f}"
        assert (z**2).mean() < 1.5, f"{name}: mean z^2 {(z**2).mean():.2f}"
        assert torch.equal((total / draws)[variance == 0], exact_mean[variance == 0])
    difference = (device_sum - cpu_sum) / draws
    assert (difference.abs() / (stderr * math.sqrt(2)))[variance > 0].max() < 6


# ----------------------------------------------------------------------------------------------------------
# Graph safety


FORBIDDEN_TENSOR_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")
DATA_DEPENDENT_SHAPES = ("nonzero", "unique", "masked_select", "argwhere")


def test_next_batch_has_no_host_sync_and_writes_in_place(synthetic_root, monkeypatch):
    dataset = AlignedDataset(synthetic_root, "train", DataOptions(**SMALL))
    data = DeviceDataset(dataset, "cpu", batch_size=4, channels_last=True)
    outputs = (data.A, data.B, data.indices, data.tops, data.lefts, data.flips)
    pointers = [t.data_ptr() for t in outputs]
    strides = [t.stride() for t in outputs]
    snapshots = []

    def forbidden(name: str):
        def fail(*args: object, **kwargs: object) -> None:
            raise AssertionError(f"next_batch called {name}: a host sync or a data-dependent shape")

        return fail

    with monkeypatch.context() as patch:
        for name in FORBIDDEN_TENSOR_METHODS:
            patch.setattr(torch.Tensor, name, forbidden(f"Tensor.{name}"))
        for name in DATA_DEPENDENT_SHAPES:
            patch.setattr(torch, name, forbidden(f"torch.{name}"))
            patch.setattr(torch.Tensor, name, forbidden(f"Tensor.{name}"))
        for _ in range(3):
            a, b = data.next_batch()
            assert a is data.A and b is data.B
            snapshots.append(torch.cat([a.flatten(), b.flatten()]))
    assert [t.data_ptr() for t in outputs] == pointers
    assert [t.stride() for t in outputs] == strides
    assert not torch.equal(snapshots[0], snapshots[1])  # a new batch each call, same storage
    with torch.profiler.profile() as profiler:
        data.next_batch()
    allocations = [
        e.key for e in profiler.key_averages() if e.key.startswith(("aten::empty", "aten::_to_copy"))
    ]
    assert not allocations, f"next_batch allocated tensors: {allocations}"


@needs_cuda
def test_next_batch_captures_and_replays_in_a_cuda_graph(synthetic_root):
    options = DataOptions(direction="BtoA", seed=9, **SMALL)
    dataset = AlignedDataset(synthetic_root, "train", options)
    data = DeviceDataset(dataset, "cuda", batch_size=4, channels_last=True)

    data.start_epoch(3)
    eager = []
    for _ in range(3):
        a, b = data.next_batch()
        eager.append((a.clone(), b.clone(), data.indices.clone()))
    torch.cuda.set_sync_debug_mode("error")  # any sync in eager next_batch raises
    try:
        data.next_batch()
    finally:
        torch.cuda.set_sync_debug_mode("default")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graph recommends
        for _ in range(2):
            data.next_batch()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    graph.register_generator_state(data.generator)
    with torch.cuda.graph(graph):
        static_a, static_b = data.next_batch()
    assert static_a is data.A and static_b is data.B

    data.start_epoch(3)  # rewinds the position and reseeds: replays must redo the eager batches
    for want_a, want_b, want_indices in eager:
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(data.indices, want_indices)
        assert torch.equal(static_a, want_a) and torch.equal(static_b, want_b)
        indices = data.indices.tolist()
        params = zip(data.tops.tolist(), data.lefts.tolist(), data.flips.tolist(), strict=True)
        for k, (index, (top, left, flip)) in enumerate(zip(indices, params, strict=True)):
            a, b = dataset.read_pair(index)
            resize = dataset.params_for(index, (a.shape[1], a.shape[0])).resize
            cpu = AugmentParams(resize, (left, top, options.crop_size, options.crop_size), bool(flip))
            assert torch.equal(static_a[k].cpu(), apply(a, cpu)) and torch.equal(
                static_b[k].cpu(), apply(b, cpu)
            )


# ----------------------------------------------------------------------------------------------------------
# Exact mid-epoch resume: the position and the generator state travel in state_dict


def take(data: DeviceDataset, count: int) -> list[tuple[torch.Tensor, ...]]:
    """``count`` batches: (A, B, indices, tops, lefts, flips), copied (the buffers are rewritten)."""
    out = []
    for _ in range(count):
        a, b = data.next_batch()
        out.append(tuple(t.clone() for t in (a, b, data.indices, data.tops, data.lefts, data.flips)))
    return out


def assert_same_batches(got: list[tuple[torch.Tensor, ...]], want: list[tuple[torch.Tensor, ...]]) -> None:
    assert len(got) == len(want)
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        assert all(torch.equal(x, y) for x, y in zip(g, w, strict=True)), f"batch {k} differs"


def test_resume_mid_epoch_continues_with_the_same_crops_and_flips(synthetic_root):
    dataset = AlignedDataset(synthetic_root, "train", DataOptions(direction="BtoA", seed=4, **SMALL))
    order = [3, 0, 5, 1, 4, 2]
    run = DeviceDataset(dataset, "cpu", batch_size=2, workers=1)
    run.start_epoch(7, order=order)
    take(run, 1)
    saved = run.state_dict()
    uninterrupted = take(run, 2)  # positions 2..5: the rest of the epoch
    assert isinstance(saved["generator"], torch.Tensor) and saved["generator"].dtype == torch.uint8
    assert saved["generator"].device.type == "cpu" and saved["position"] == 2

    resumed = DeviceDataset(dataset, "cpu", batch_size=2, workers=1)
    resumed.start_epoch(7, order=order, start=2)
    resumed.load_state_dict(saved)
    assert resumed.batches_per_epoch == 2
    assert_same_batches(take(resumed, 2), uninterrupted)

    # Without the saved state, start_epoch alone reseeds: the first batches' crops would come back.
    reseeded = DeviceDataset(dataset, "cpu", batch_size=2, workers=1)
    reseeded.start_epoch(7, order=order, start=2)
    replayed = take(reseeded, 2)
    draws = [(g[3], g[5], w[3], w[5]) for g, w in zip(replayed, uninterrupted, strict=True)]
    assert not all(torch.equal(t, u) and torch.equal(f, g) for t, f, u, g in draws)


def test_resume_state_rules(synthetic_root):
    dataset = AlignedDataset(synthetic_root, "train", DataOptions(serial_batches=True, **SMALL))
    data = DeviceDataset(dataset, "cpu", batch_size=4, workers=1)
    data.start_epoch(2)
    take(data, 2)  # positions 0..7: the second batch wraps (6 samples)
    at_end = data.state_dict()
    assert at_end["position"] == 8
    data.start_epoch(2, start=6)  # the trainer's count stops at N
    data.load_state_dict(at_end)
    assert data.batches_per_epoch == 0

    # A state saved at the end of epoch 2, resumed at the start of epoch 3: the fresh epoch stands.
    fresh = DeviceDataset(dataset, "cpu", batch_size=4, workers=1)
    fresh.start_epoch(3)
    want = take(fresh, 1)
    fresh.start_epoch(3)
    fresh.load_state_dict(at_end)
    assert_same_batches(take(fresh, 1), want)

    early = data.state_dict() | {"position": 2}
    with pytest.raises(ValueError, match="position 2 of epoch 2, before the start=4"):
        data.start_epoch(2, start=4)
        data.load_state_dict(early)
    with pytest.raises(ValueError, match="from epoch 2, but epoch 1 was started"):
        data.start_epoch(1)
        data.load_state_dict(at_end)
    with pytest.raises(ValueError, match="seed"):
        data.start_epoch(2, start=6)
        data.load_state_dict(at_end | {"seed": 99})


@pytest.mark.parametrize("done", [0, 1], ids=["at_the_epoch_start", "mid_epoch"])
def test_state_dict_undoes_warmup_draws(synthetic_root, done):
    """The capture recipe: state_dict, warm-up batches, load_state_dict: the run sees the same batches,
    wherever in the epoch the capture happens."""
    dataset = AlignedDataset(synthetic_root, "train", DataOptions(seed=2, **SMALL))
    data = DeviceDataset(dataset, "cpu", batch_size=2, workers=1)
    data.start_epoch(1)
    want = take(data, done + 2)[done:]
    data.start_epoch(1)
    take(data, done)
    saved = data.state_dict()
    pointers = (data.generator, data._position.data_ptr())
    take(data, 2)  # the warm-up (4 samples: not a whole epoch of 6, which would hide a lost position)
    data.load_state_dict(saved)
    assert (data.generator, data._position.data_ptr()) == pointers  # in place: a graph keeps its addresses
    assert_same_batches(take(data, 2), want)


def test_batch_source_flags(synthetic_root):
    data = DeviceDataset(AlignedDataset(synthetic_root, "train", DataOptions(**SMALL)), "cpu", workers=1)
    assert data.in_graph and data.fixed_shape
    assert data.generators() == (data.generator,)


# ----------------------------------------------------------------------------------------------------------
# The footprint estimate and the choice of source


ESTIMATE_OPTIONS = {
    "resize_and_crop": DataOptions(**SMALL),
    "crop": DataOptions(preprocess="crop", crop_size=24),
    "scale_width": DataOptions(preprocess="scale_width", load_size=24, crop_size=16),
    "scale_width_and_crop": DataOptions(preprocess="scale_width_and_crop", load_size=40, crop_size=24),
    "none": DataOptions(preprocess="none"),
    "gray_both": DataOptions(input_nc=1, output_nc=1, **SMALL),
}


@pytest.mark.parametrize("options", ESTIMATE_OPTIONS.values(), ids=ESTIMATE_OPTIONS.keys())
def test_estimate_matches_the_stored_bytes(synthetic_root, options):
    dataset = AlignedDataset(synthetic_root, "train", options)
    estimate = estimate_device_bytes(dataset, workers=1)
    assert estimate == DeviceDataset(dataset, "cpu", workers=1).stored.words.nbytes


@pytest.mark.parametrize("preprocess", ["none", "resize_and_crop"])
def test_estimate_reads_16bit_depth_from_the_header(tmp_path, preprocess):
    for k in range(2):
        write_pair(tmp_path / "train" / f"{k}.png", (20, 20), seed=k, bits=16)
    dataset = AlignedDataset(
        tmp_path, "train", DataOptions(preprocess=preprocess, load_size=24, crop_size=16)
    )
    assert sample_geometry(dataset, 0).bytes_per_channel == 2
    data = DeviceDataset(dataset, "cpu", workers=1)
    assert (
        estimate_device_bytes(dataset)
        == data.stored.words.nbytes
        == 2 * 20 * 20 * 16 * (1 if preprocess == "none" else 24 * 24 / 400)
    )


def test_estimate_is_none_for_sizes_one_tensor_cannot_hold(mixed_root, tmp_path):
    options = {"preprocess": "none"}
    assert estimate_device_bytes(AlignedDataset(mixed_root, "train", DataOptions(**options))) is None
    # resize_and_crop stores load_size x load_size whatever the sources.
    dataset = AlignedDataset(mixed_root, "train", DataOptions(**SMALL))
    assert estimate_device_bytes(dataset) == 3 * 40 * 40 * 8
    # Equal sizes, different bit depths.
    write_pair(tmp_path / "train" / "0.png", (16, 16), bits=8)
    write_pair(tmp_path / "train" / "1.png", (16, 16), bits=16)
    assert estimate_device_bytes(AlignedDataset(tmp_path, "train", DataOptions(preprocess="none"))) is None


def test_planner_holds_a_small_dataset_on_the_device(synthetic_root):
    dataset = AlignedDataset(synthetic_root, "train", DataOptions(**SMALL))
    source, why = plan_batch_source(dataset, "cpu", 2, channels_last=True, seed=0, workers=1)
    assert isinstance(source, DeviceDataset) and source.A.is_contiguous(memory_format=torch.channels_last)
    assert why.startswith("data: 6 pairs, 0.1 MiB decoded, held on cpu (<1% of the "), why


def test_planner_streams_above_the_share_of_free_memory(synthetic_root, monkeypatch):
    dataset = AlignedDataset(synthetic_root, "train", DataOptions(**SMALL))
    size = 6 * 40 * 40 * 8
    monkeypatch.setattr(plan_module, "free_memory", lambda device: 4 * size)
    source, why = plan_batch_source(dataset, "cpu", 2, seed=0, workers=0, max_share=0.2)
    assert isinstance(source, StreamingDataset) and source.fixed_shape and not source.in_graph
    assert "streamed from host memory" in why and "exceeds 20% of the" in why, why
    # Within the share: held.
    source, why = plan_batch_source(dataset, "cpu", 2, seed=0, workers=1, max_share=0.25)
    assert isinstance(source, DeviceDataset) and "held on cpu (25% of the" in why, why
    # "device" overrides the share, with a warning in the line.
    source, why = plan_batch_source(dataset, "cpu", 2, seed=0, workers=1, policy="device", max_share=0.2)
    assert isinstance(source, DeviceDataset) and "warning: above the 20% share" in why, why
    # Unknown free memory: no limit.
    monkeypatch.setattr(plan_module, "free_memory", lambda device: None)
    source, why = plan_batch_source(dataset, "cpu", 2, seed=0, workers=1, max_share=0.2)
    assert isinstance(source, DeviceDataset) and "free memory unknown" in why
    # "stream" always streams.
    source, why = plan_batch_source(dataset, "cpu", 2, seed=0, workers=0, policy="stream")
    assert isinstance(source, StreamingDataset) and "policy 'stream'" in why


@pytest.mark.parametrize(
    ("options", "second"),
    [
        (DataOptions(preprocess="none"), "1.png is 40x40"),
        (DataOptions(preprocess="scale_width", load_size=32, crop_size=16), "2.png is 32x48"),
    ],
    ids=["none", "scale_width"],
)
def test_planner_streams_mixed_sizes_and_device_policy_names_them(mixed_root, options, second):
    dataset = AlignedDataset(mixed_root, "train", options, allow_nonsquare=True)
    source, why = plan_batch_source(dataset, "cpu", 1, seed=0, workers=0)
    assert isinstance(source, StreamingDataset) and not source.fixed_shape
    assert "different sizes" in why and "no CUDA graph" in why, why
    assert "0.png is 32x32, " in why and second in why, why
    with pytest.raises(StorageMismatchError, match=rf"0\.png is 32x32, .*{second}"):
        plan_batch_source(dataset, "cpu", 1, seed=0, workers=0, policy="device")


def test_planner_falls_back_to_streaming_when_the_allocation_fails(synthetic_root, monkeypatch):
    dataset = AlignedDataset(synthetic_root, "train", DataOptions(**SMALL))

    def out_of_memory(*args: object, **kwargs: object) -> DeviceDataset:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(plan_module, "DeviceDataset", out_of_memory)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    source, why = plan_batch_source(dataset, "cpu", 2, seed=0, workers=0)
    assert isinstance(source, StreamingDataset) and "failed" in why
    with pytest.raises(torch.cuda.OutOfMemoryError):
        plan_batch_source(dataset, "cpu", 2, seed=0, workers=0, policy="device")


def test_free_memory_on_cpu_is_the_available_pages_or_unknown():
    free = free_memory("cpu")
    assert free is None or free > 0
    with pytest.raises(ValueError, match="policy"):
        plan_batch_source(None, "cpu", 1, policy="gpu")  # type: ignore[arg-type]


@needs_cuda
def test_state_taken_between_graph_replays_resumes_exactly(synthetic_root):
    """A CUDA generator registered with a graph: replays advance its offset on the host, so state_dict
    between replays is current, and an eager run resumed from it draws what the replays draw next."""
    dataset = AlignedDataset(synthetic_root, "train", DataOptions(seed=9, **SMALL))
    data = DeviceDataset(dataset, "cuda", batch_size=4, channels_last=True)
    data.start_epoch(2)
    before_warmup = data.state_dict()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            data.next_batch()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    for generator in data.generators():
        graph.register_generator_state(generator)
    with torch.cuda.graph(graph):
        data.next_batch()
    data.load_state_dict(before_warmup)  # undo the warm-up: position and generator, in place
    graph.replay()
    saved = data.state_dict()
    assert saved["position"] == 4 and saved["generator"].device.type == "cpu"
    replayed = []
    for _ in range(2):
        graph.replay()
        outputs = (data.A, data.B, data.indices, data.tops, data.lefts, data.flips)
        replayed.append(tuple(t.clone() for t in outputs))

    resumed = DeviceDataset(dataset, "cuda", batch_size=4, channels_last=True)
    resumed.start_epoch(2, start=4)
    resumed.load_state_dict(saved)
    assert_same_batches(take(resumed, 2), replayed)
