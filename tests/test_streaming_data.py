"""Tests of fastpix2pix.data.sources.streaming: batches streamed from host memory, against the plain
trainer's.

The streamed batches are the plain trainer's DataLoader batches bit for bit (same order, same per-sample
draws from ``(seed, epoch, index)``, the same float values), except the samples that top up the wrapped
last batch, which draw afresh from ``(seed, epoch, index, lap)``. Resume: a source restored from
``state_dict`` at a mid-epoch position continues with exactly the batches of the uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pair_files import write_pair
from torch.utils.data import DataLoader

from fastpix2pix.data import (
    AlignedDataset,
    DataOptions,
    apply,
    generate_synthetic_facades,
    params_rng,
    sample_params,
)
from fastpix2pix.data.order import EpochSampler
from fastpix2pix.data.sources.device import DeviceDataset
from fastpix2pix.data.sources.plan import plan_batch_source
from fastpix2pix.data.sources.streaming import StreamingDataset, sample_rng

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available on this machine")

SIZE = 32
SMALL = {"load_size": 40, "crop_size": 32}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic_facades(tmp_path_factory.mktemp("synthetic"), n_train=6, n_test=0, size=SIZE)


def plain_batches(dataset: AlignedDataset, batch_size: int, epoch: int, start: int = 0) -> list[dict]:
    """The plain trainer's batches for ``epoch`` (Trainer._build_loader and _train_epoch's set-up)."""
    sampler = EpochSampler(len(dataset), dataset.options.seed, shuffle=not dataset.options.serial_batches)
    sampler.set_epoch(epoch, start=start)
    dataset.set_epoch(epoch)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=0, drop_last=False)
    return list(loader)


def streamed(data: StreamingDataset, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [tuple(t.clone() for t in data.next_batch()) for _ in range(count)]


def assert_same(got: list[tuple[torch.Tensor, ...]], want: list[tuple[torch.Tensor, ...]]) -> None:
    assert len(got) == len(want)
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        assert all(torch.equal(x, y) for x, y in zip(g, w, strict=True)), f"batch {k} differs"


# ----------------------------------------------------------------------------------------------------------
# The plain trainer's batches


MODES = {
    "resize_and_crop": DataOptions(direction="BtoA", seed=3, **SMALL),
    "crop": DataOptions(preprocess="crop", crop_size=24, seed=1),
    "scale_width_and_crop": DataOptions(preprocess="scale_width_and_crop", load_size=40, crop_size=24),
    "none": DataOptions(direction="BtoA", preprocess="none", seed=2),
    "gray_A": DataOptions(direction="BtoA", input_nc=1, seed=5, **SMALL),
    "serial_no_flip": DataOptions(serial_batches=True, no_flip=True, **SMALL),
}


@pytest.mark.parametrize("options", MODES.values(), ids=MODES.keys())
def test_batches_equal_the_plain_trainers(synthetic_root, options):
    dataset = AlignedDataset(synthetic_root, "train", options)
    data = StreamingDataset(dataset, "cpu", batch_size=4, workers=0)
    assert data.fixed_shape and not data.in_graph and data.generators() == ()
    sampler = EpochSampler(len(dataset), options.seed, shuffle=not options.serial_batches)
    for epoch in (1, 2):
        data.start_epoch(epoch, order=sampler.order(epoch))
        want = plain_batches(dataset, 4, epoch)
        assert data.batches_per_epoch == len(want) == 2
        for k, batch in enumerate(want):
            a, b = data.next_batch()
            real = batch["A"].shape[0]  # the last plain batch is short; the streamed one is topped up
            assert a.shape == (4, *batch["A"].shape[1:]) and a.dtype == torch.float32
            assert torch.equal(a[:real], batch["A"]), f"A of batch {k}, epoch {epoch}"
            assert torch.equal(b[:real], batch["B"]), f"B of batch {k}, epoch {epoch}"


def test_worker_processes_give_the_same_batches(synthetic_root):
    dataset = AlignedDataset(synthetic_root, "train", DataOptions(seed=8, **SMALL))
    serial = StreamingDataset(dataset, "cpu", batch_size=4, workers=0)
    parallel = StreamingDataset(dataset, "cpu", batch_size=4, workers=2)
    try:
        for epoch in (0, 1):  # the second epoch goes through the persistent workers' reset
            serial.start_epoch(epoch)
            parallel.start_epoch(epoch)
            parallel.next_batch()  # a restart mid-epoch discards what the workers prefetched
            parallel.start_epoch(epoch)
            assert_same(streamed(parallel, 3), streamed(serial, 3))
    finally:
        parallel.close()


def test_no_draw_from_the_global_torch_generator(synthetic_root):
    """The plain trainer keeps the global generator (dropout's, on CPU) for the networks alone."""
    dataset = AlignedDataset(synthetic_root, "train", DataOptions(**SMALL))
    data = StreamingDataset(dataset, "cpu", batch_size=2, workers=0)
    before = torch.get_rng_state()
    data.next_batch()
    data.start_epoch(1)
    data.next_batch()
    assert torch.equal(torch.get_rng_state(), before)


def test_wrapped_last_batch_tops_up_with_fresh_draws(synthetic_root):
    options = DataOptions(serial_batches=True, max_dataset_size=5, seed=6, **SMALL)
    dataset = AlignedDataset(synthetic_root, "train", options)
    data = StreamingDataset(dataset, "cpu", batch_size=2, workers=0)
    data.start_epoch(3)
    assert data.batches_per_epoch == 3
    batches = streamed(data, 3)
    a, _ = dataset.read_pair(0)
    lap = [sample_params((SIZE, SIZE), options, rng) for rng in (params_rng(6, 3, 0), sample_rng(6, 3, 0, 1))]
    assert lap[0] != lap[1]  # for this seed the two draws differ, so the check below can tell them apart
    dataset.set_epoch(3)
    assert torch.equal(batches[2][0][0], dataset[4]["A"])  # position 4: sample 4, as the plain trainer
    assert torch.equal(batches[2][0][1], apply(a, lap[1]))  # position 5: sample 0 again, drawn afresh
    assert torch.equal(batches[0][0][0], apply(a, lap[0]))
    assert StreamingDataset(dataset, "cpu", batch_size=2, workers=0, drop_last=True).batches_per_epoch == 2


def test_sample_rng_first_lap_is_the_plain_draw():
    assert sample_rng(1, 2, 3).random() == params_rng(1, 2, 3).random()
    assert sample_rng(1, 2, 3, 1).random() != params_rng(1, 2, 3).random()


@pytest.mark.parametrize("channels_last", [False, True])
def test_fixed_shape_outputs_are_static_and_in_the_asked_layout(synthetic_root, channels_last):
    dataset = AlignedDataset(synthetic_root, "train", DataOptions(**SMALL))
    data = StreamingDataset(dataset, "cpu", batch_size=3, channels_last=channels_last, workers=0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    static = (data.A, data.B)
    pointers = [t.data_ptr() for t in static]
    assert data.A.shape == (3, 3, 32, 32) and torch.equal(data.A, torch.zeros_like(data.A))
    first = streamed(data, 1)[0]
    a, b = data.next_batch()
    assert (a, b) == static and [t.data_ptr() for t in (a, b)] == pointers
    assert a.is_contiguous(memory_format=fmt) and b.is_contiguous(memory_format=fmt)
    assert not torch.equal(first[0], a)


# ----------------------------------------------------------------------------------------------------------
# Resume


def test_resume_mid_epoch_is_exact(synthetic_root):
    dataset = AlignedDataset(synthetic_root, "train", DataOptions(seed=9, max_dataset_size=5, **SMALL))
    sampler = EpochSampler(len(dataset), 9, shuffle=True)

    uninterrupted = StreamingDataset(dataset, "cpu", batch_size=2, workers=0)
    uninterrupted.start_epoch(4, order=sampler.order(4))
    streamed(uninterrupted, 1)
    saved = uninterrupted.state_dict()
    assert saved == {"source": "stream", "seed": 9, "epoch": 4, "position": 2}
    rest = streamed(uninterrupted, 2)  # up to the wrapped last batch
    uninterrupted.start_epoch(5, order=sampler.order(5))
    rest += streamed(uninterrupted, 1)

    resumed = StreamingDataset(dataset, "cpu", batch_size=2, workers=0)
    resumed.start_epoch(4, order=sampler.order(4), start=2)
    resumed.load_state_dict(saved)
    assert resumed.batches_per_epoch == 2
    again = streamed(resumed, 2)
    resumed.start_epoch(5, order=sampler.order(5))
    again += streamed(resumed, 1)
    assert_same(again, rest)

    # A state before the start given to start_epoch would train on samples twice: refused.
    with pytest.raises(ValueError, match="before the start=4"):
        resumed.start_epoch(4, order=sampler.order(4), start=4)
        resumed.load_state_dict(saved)


@pytest.mark.parametrize("done", [0, 1], ids=["at_the_epoch_start", "mid_epoch"])
def test_load_state_dict_rewinds_an_epoch_in_progress(synthetic_root, done):
    """state_dict / load_state_dict around warm-up batches (a graph capture's) leaves no trace."""
    dataset = AlignedDataset(synthetic_root, "train", DataOptions(seed=2, **SMALL))
    data = StreamingDataset(dataset, "cpu", batch_size=2, workers=0)
    data.start_epoch(1)
    want = streamed(data, done + 2)[done:]
    data.start_epoch(1)
    streamed(data, done)
    saved = data.state_dict()
    streamed(data, 3)
    data.load_state_dict(saved)
    assert_same(streamed(data, 2), want)


def test_a_device_dataset_state_resumes_the_same_samples(synthetic_root):
    dataset = AlignedDataset(synthetic_root, "train", DataOptions(serial_batches=True, **SMALL))
    device = DeviceDataset(dataset, "cpu", batch_size=2, workers=1)
    device.start_epoch(2)
    device.next_batch()
    stream = StreamingDataset(dataset, "cpu", batch_size=2, workers=0)
    stream.start_epoch(2, start=2)
    stream.load_state_dict(device.state_dict())
    dataset.set_epoch(2)
    assert stream.position == 2 and torch.equal(stream.next_batch()[0][0], dataset[2]["A"])


# ----------------------------------------------------------------------------------------------------------
# Samples a device tensor cannot stack


@pytest.mark.parametrize(
    "options",
    [
        DataOptions(preprocess="none", seed=4),
        DataOptions(preprocess="scale_width", load_size=32, crop_size=16),
    ],
    ids=["none", "scale_width"],
)
def test_mixed_sizes_stream_at_batch_size_one(mixed_root, options):
    dataset = AlignedDataset(mixed_root, "train", options, allow_nonsquare=True)
    data, why = plan_batch_source(dataset, "cpu", 1, seed=options.seed, workers=0)
    assert isinstance(data, StreamingDataset) and not data.fixed_shape, why
    data.start_epoch(0, order=EpochSampler(3, options.seed, shuffle=True).order(0))
    want = plain_batches(dataset, 1, 0)
    shapes = set()
    for batch in want:
        a, b = data.next_batch()
        assert torch.equal(a, batch["A"]) and torch.equal(b, batch["B"])
        shapes.add(tuple(a.shape))
    assert len(shapes) > 1
    # At batch size 2 the plain trainer's collate fails too; this says why, naming the files.
    data = StreamingDataset(dataset, "cpu", batch_size=2, workers=0)
    data.start_epoch(0, order=[0, 2, 1])  # 0.png and 2.png differ in both modes
    with pytest.raises(ValueError, match=r"different sizes after preprocessing \(.*0\.png 32x32"):
        data.next_batch()


def test_mixed_bit_depths_stream_exactly(tmp_path):
    """An 8-bit and a 16-bit file in one batch: the plain trainer stacks their floats; so does this."""
    write_pair(tmp_path / "train" / "0.png", (20, 20), seed=0, bits=8)
    write_pair(tmp_path / "train" / "1.png", (20, 20), seed=1, bits=16)
    options = DataOptions(load_size=24, crop_size=16, serial_batches=True, seed=3)
    dataset = AlignedDataset(tmp_path, "train", options)
    data, why = plan_batch_source(dataset, "cpu", 2, seed=3, workers=0)
    assert isinstance(data, StreamingDataset) and data.fixed_shape
    assert "different bit depths" in why and "8-bit" in why and "16-bit" in why, why
    (want,) = plain_batches(dataset, 2, 0)
    a, b = data.next_batch()
    assert torch.equal(a, want["A"]) and torch.equal(b, want["B"])
    # A batch of the 8-bit file alone goes as uint8, with the same values.
    data = StreamingDataset(dataset, "cpu", batch_size=1, workers=0)
    for sample in (want["A"][0], want["A"][1]):
        assert torch.equal(data.next_batch()[0][0], sample)


# ----------------------------------------------------------------------------------------------------------
# CUDA: pinned memory, non-blocking copies


@needs_cuda
def test_cuda_batches_equal_the_cpu_ones(synthetic_root):
    dataset = AlignedDataset(synthetic_root, "train", DataOptions(seed=1, **SMALL))
    cpu = StreamingDataset(dataset, "cpu", batch_size=4, workers=0)
    cuda = StreamingDataset(dataset, "cuda", batch_size=4, channels_last=True, workers=2)
    try:
        static = cuda.A.data_ptr()
        for want in streamed(cpu, 3):
            got = cuda.next_batch()
            assert got[0].data_ptr() == static and got[0].is_contiguous(memory_format=torch.channels_last)
            assert all(torch.equal(g.cpu(), w) for g, w in zip(got, want, strict=True))
    finally:
        cuda.close()
