"""Real datasets as users have them: the data check before training, non-square pairs, mixed formats,
corrupt files found during training, the worker cap and the start summary (issue 11).

Every dataset here is a few tiny generated files (32-64 px); the trainer runs are 32x32 resnet_6blocks/
ngf 4 runs of a few iterations (tests/tiny_run.py). Pairs cut from the real facades are used when
../shared/data/facades is present.
"""

from __future__ import annotations

import dataclasses
import io
import re
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_data import official_aligned_item
from tiny_run import tiny_options

import fastpix2pix.data.check as check_module
import fastpix2pix.runtime as runtime
from fastpix2pix.cli import main
from fastpix2pix.data import AlignedDataset, DataOptions, generate_synthetic_facades, shared_facades_root
from fastpix2pix.data.check import DataCheckError, DataLoadError, check_dataset, check_file, loading_error
from fastpix2pix.data.images import encode_png16
from fastpix2pix.data.sources.device import DeviceDataset
from fastpix2pix.data.sources.plan import plan_batch_source
from fastpix2pix.data.sources.streaming import StreamingDataset
from fastpix2pix.runs.checkpoint import load_checkpoint
from fastpix2pix.runtime import data_workers
from fastpix2pix.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

RNG = np.random.default_rng(11)
OPTIONS = DataOptions(load_size=36, crop_size=32)


def pair(height: int, width: int) -> np.ndarray:
    """Random RGB A|B pixels ``height x width`` (the whole file)."""
    return RNG.integers(0, 256, (height, width, 3), dtype=np.uint8)


def encoded(image: np.ndarray | Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def write(folder: Path, name: str, data: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)
    return folder / name


def corrupt_png(image: np.ndarray) -> bytes:
    """A PNG with a valid header and IEND but garbage in the middle of its pixel data: only decoding the
    pixels finds it (what a header check cannot see)."""
    data = bytearray(encoded(image, "PNG"))
    start = data.index(b"IDAT") + 4
    length = struct.unpack(">I", data[start - 8 : start - 4])[0]
    data[start + length // 2 : start + length - 4] = bytes(length - 4 - length // 2)
    return bytes(data)


# --- the check: every problem at once, one line per file --------------------------------------------


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """Good files and one file per problem the header check must find (name -> expected reason)."""
    folder = tmp_path_factory.mktemp("bad") / "train"
    good = pair(32, 64)
    write(folder, "good.png", encoded(good, "PNG"))
    write(folder, "good.jpg", encoded(good, "JPEG") + b"\x00" * 200)  # trailing data after the end marker
    write(folder, "good_tail.png", encoded(good, "PNG") + b"trailing junk" * 10)
    expected = {
        "text.png": r"unreadable: not an image file Pillow can read",
        "empty.jpg": r"unreadable: not an image file Pillow can read",
        "cut.jpg": r"truncated or corrupt \(no JPEG end-of-image marker at the end\): OSError: image file is "
        r"truncated",
        "cut.png": r"truncated or corrupt \(no PNG IEND chunk at the end\)",
        "cut.bmp": r"truncated: its header puts pixel data up to byte 6198, the file has 5198 bytes",
        "cut.ppm": r"truncated: its header puts pixel data up to byte 6157, the file has 6057 bytes",
        "cut.tif": r"truncated: its header puts pixel data up to byte \d+, the file has \d+ bytes",
        "cut.webp": r"truncated: \d+ bytes, its RIFF header says \d+",
        "odd.png": r"width 63 is odd, so it cannot be split into equal A and B halves",
        "float.tif": r"wrong channel format: pixel mode F \(32-bit floating point\) has no grayscale or RGB",
        "small.png": r"too small for --crop_size 32: each half is 20x20 \(WxH\), 20x20 after preprocess "
        r"'crop'",
    }
    write(folder, "text.png", b"these are not the pixels you are looking for")
    write(folder, "empty.jpg", b"")
    write(folder, "cut.jpg", encoded(good, "JPEG", quality=95)[:-300])
    write(folder, "cut.png", encoded(good, "PNG")[:-100])
    write(folder, "cut.bmp", encoded(good, "BMP")[:-1000])
    write(folder, "cut.ppm", encoded(good, "PPM")[:-100])
    write(folder, "cut.tif", encoded(good, "TIFF")[:-500])
    write(folder, "cut.webp", encoded(good, "WEBP", lossless=True)[:-100])
    write(folder, "odd.png", encoded(pair(32, 63), "PNG"))
    write(folder, "float.tif", encoded(Image.fromarray(RNG.random((32, 64), dtype=np.float32)), "TIFF"))
    write(folder, "small.png", encoded(pair(20, 40), "PNG"))
    return folder, expected


def test_every_problem_is_listed_at_once_one_line_per_file(bad_folder: tuple[Path, dict[str, str]]) -> None:
    folder, expected = bad_folder
    paths = sorted(folder.iterdir())
    report = check_dataset(paths, dataclasses.replace(OPTIONS, preprocess="crop"), folder=folder)
    error = report.error()
    assert isinstance(error, DataCheckError) and isinstance(error, ValueError)
    lines = str(error).splitlines()
    assert lines[0] == f"{folder}: {len(expected)} of {len(paths)} files cannot be used for training:"
    assert lines[-1].startswith("nothing was trained or written")
    listed = lines[1:-1]
    assert len(listed) == len(expected)  # the three good files (two with trailing data) are not listed
    for line, (name, reason) in zip(listed, sorted(expected.items()), strict=True):
        assert re.fullmatch(rf"  {re.escape(str(folder / name))}: {reason}.*", line), line


def test_the_check_reads_headers_not_pixels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Valid files are never decoded (50k files must take seconds): only a missing end marker is."""
    folder = tmp_path / "train"
    for index in range(40):
        write(folder, f"{index}.jpg", encoded(pair(32, 64), "JPEG"))
        write(folder, f"{index}.png", encoded(pair(32, 64), "PNG"))

    def no_decoding(path: object) -> None:
        raise AssertionError(f"the check decoded {path}")

    monkeypatch.setattr(check_module, "read_image", no_decoding)
    report = check_dataset(sorted(folder.iterdir()), OPTIONS, workers=4)
    assert report.error() is None and report.files == 80
    assert report.output_sizes == {(32, 32): 80}


def test_option_problems_are_grouped_not_repeated(tmp_path: Path) -> None:
    """Options that do not fit the data give one line per cause, not one per file."""
    folder = tmp_path / "train"
    for index, height in enumerate((32, 32, 48)):
        write(folder, f"{index}.png", encoded(pair(height, 64), "PNG"))
    paths = sorted(folder.iterdir())
    none = dataclasses.replace(OPTIONS, preprocess="none")
    report = check_dataset(paths, none, size_multiple=16, batch_size=2)
    lines = str(report.error()).splitlines()
    assert len(lines) == 1 and "cannot be stacked into batches of 2" in lines[0]
    assert "2 sizes from 32x32 to 32x48" in lines[0]
    lines = str(check_dataset(paths, none, size_multiple=32).error()).splitlines()
    assert len(lines) == 1 and re.search(r"1 files are 32x48 \(WxH\).*2\.png.*multiples of 32", lines[0])
    # One size for all: the generator's own message (with the crop size to use instead).
    message = str(check_dataset(paths, OPTIONS, size_multiple=128).error())
    assert re.search(r"not a multiple of 128.*--crop_size 128", message) and "\n" not in message


# --- mixed formats ------------------------------------------------------------------------------------


def mixed_folder(root: Path) -> Path:
    """The same A|B pixels as RGB, grayscale, RGBA, palette, grayscale+alpha, 1-bit and CMYK files, plus
    16-bit grayscale and 16-bit RGB ones."""
    folder = root / "train"
    rgb = Image.fromarray(pair(32, 64))
    write(folder, "rgb.png", encoded(rgb, "PNG"))
    write(folder, "gray.png", encoded(rgb.convert("L"), "PNG"))
    write(folder, "rgba.png", encoded(rgb.convert("RGBA"), "PNG"))
    write(folder, "palette.png", encoded(rgb.convert("P"), "PNG"))
    write(folder, "gray_alpha.png", encoded(rgb.convert("LA"), "PNG"))
    write(folder, "bilevel.png", encoded(rgb.convert("1"), "PNG"))
    write(folder, "cmyk.jpg", encoded(rgb.convert("CMYK"), "JPEG", quality=95))
    write(folder, "gray16.png", encode_png16(RNG.integers(0, 65536, (32, 64, 1)).astype(np.uint16)))
    write(folder, "rgb16.png", encode_png16(RNG.integers(0, 65536, (32, 64, 3)).astype(np.uint16)))
    return root


def test_mixed_formats_are_converted_and_summarised(tmp_path: Path) -> None:
    root = mixed_folder(tmp_path)
    paths = sorted((root / "train").iterdir())
    report = check_dataset(paths, OPTIONS)
    assert report.error() is None
    assert report.summary_lines() == [
        "image formats: 7 of 9 files converted as the official code reads them: 1 1-bit -> RGB (0/1 -> "
        "0/255), 1 16-bit grayscale -> RGB, 1 CMYK -> RGB, 1 RGBA -> RGB (alpha dropped), 1 grayscale -> "
        "RGB, 1 grayscale+alpha -> RGB (alpha dropped), 1 palette -> RGB; 2 of 9 files are 16-bit and keep "
        "their 16 bits (scaled to [-1, 1] as 8-bit files are; the official code clips them to 8 bits)"
    ]
    gray_in = check_dataset(paths, dataclasses.replace(OPTIONS, input_nc=1)).summary_lines()[0]
    assert gray_in.startswith("image formats: 9 of 9 files converted")
    assert "1 RGB -> grayscale for A" in gray_in and "1 grayscale -> RGB for B" in gray_in


def test_mixed_formats_read_as_the_official_code_reads_them(tmp_path: Path) -> None:
    """Every 8-bit format gives the official convert("RGB") (+ Grayscale) tensors, bit for bit."""
    root = mixed_folder(tmp_path)
    for channels in ((3, 3), (1, 3)):
        opts = DataOptions(preprocess="none", no_flip=True, input_nc=channels[0], output_nc=channels[1])
        dataset = AlignedDataset(root, "train", opts)
        for index, path in enumerate(dataset.paths):
            if "16" in path.name:
                continue  # 16-bit files keep 16 bits (the official code clips them)
            ours, official = dataset[index], official_aligned_item(path, opts, 0, 0, False)
            assert torch.equal(ours["A"], official["A"]) and torch.equal(ours["B"], official["B"]), path


# --- the trainer: check first, nothing written on failure -----------------------------------------------


def test_training_stops_before_writing_anything(
    bad_folder: tuple[Path, dict[str, str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, expected = bad_folder
    checkpoints = tmp_path / "checkpoints"
    with pytest.raises(DataCheckError, match="11 of 14 files cannot be used"):
        Trainer(tiny_options(folder.parent, checkpoints, preprocess="crop"), progress_bar=False)
    assert not checkpoints.exists() or not any(checkpoints.rglob("*"))  # no log, no options, no folder
    argv = ["train", "--dataroot", str(folder.parent), "--checkpoints_dir", str(checkpoints), "--name", "x"]
    argv += ["--netG", "resnet_6blocks", "--ngf", "4", "--ndf", "4", "--device", "cpu", "--num_threads", "0"]
    assert main([*argv, "--load_size", "36", "--crop_size", "32", "--preprocess", "crop"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"fastpix2pix train: error: {folder}: 11 of 14 files cannot be used")
    assert len(err) == 1 + len(expected) + 1 and "Traceback" not in "\n".join(err)
    assert not any(checkpoints.rglob("*"))


@pytest.fixture(scope="module")
def nonsquare_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 train pairs with non-square halves (64x40, 64x48, 64x32, 64x56), cut from the real facades when
    present (else from the synthetic ones), and 2 test pairs."""
    root = tmp_path_factory.mktemp("nonsquare")
    facades = shared_facades_root()
    source = facades if facades is not None else generate_synthetic_facades(root / "source", 4, 2, 64)
    for split, count in (("train", 4), ("test", 2)):
        (root / split).mkdir()
        for index, path in enumerate(sorted((source / split).iterdir())[:count]):
            image = Image.open(path).convert("RGB")
            half = image.width // 2
            height = (40, 48, 32, 56)[index]
            boxes = ((0, 0, half, image.height), (half, 0, image.width, image.height))
            sides = [image.crop(box).resize((64, height), Image.Resampling.BICUBIC) for box in boxes]
            joined = Image.new("RGB", (128, height))
            joined.paste(sides[0], (0, 0))
            joined.paste(sides[1], (64, 0))
            joined.save(root / split / f"{index}.jpg", quality=95)
    return root


def test_training_on_nonsquare_pairs_and_the_start_summary(nonsquare_data: Path, tmp_path: Path) -> None:
    """The issue's case (512x158 among 512x256 files), in small: it trains, with one line saying how the
    halves are handled and the one-line start summary."""
    trainer = Trainer(tiny_options(nonsquare_data, tmp_path, max_iters=2), progress_bar=False)
    trainer.fit()
    assert trainer.state.iteration == 2
    log = (trainer.run_dir / "log.txt").read_text()
    assert re.search(
        r"A\|B files: the halves are not square in 4 of 4 files \(e.g. .*0\.jpg: 128x40, halves 64x40\); "
        r"resize_and_crop squashes them to 36x36, as the official code does",
        log,
    )
    summary = next(line for line in log.splitlines() if "] training resnet_6blocks" in line)
    assert re.search(
        r"on 4 images of .*/train \(32x32 after resize_and_crop, 4 batches of 1 per epoch, 0 loader "
        r"workers\) on cpu, fast path off \(cpu device, fp32 \(auto: .*\); on a CPU the fast path is for "
        r"bf16\), backend reference, seed 3: \d+ iterations$",
        summary,
    )


def test_nonsquare_pairs_on_the_device_data_path(nonsquare_data: Path) -> None:
    """resize_and_crop gives one size, so the fast path holds them on the device; scale_width keeps the
    aspect ratio (several sizes), so it streams them."""
    squash = AlignedDataset(nonsquare_data, "train", DataOptions(load_size=32, crop_size=32, no_flip=True))
    source, reason = plan_batch_source(squash, "cpu", 2, seed=1)
    assert isinstance(source, DeviceDataset), reason
    source.start_epoch(1, order=[2, 0, 1, 3])
    a, b = source.next_batch()
    # No crop or flip left to draw: the device batch is the CPU pipeline's samples, bit for bit.
    assert torch.equal(a, torch.stack([squash[2]["A"], squash[0]["A"]]))
    assert torch.equal(b, torch.stack([squash[2]["B"], squash[0]["B"]]))
    keep = DataOptions(preprocess="scale_width", load_size=36, crop_size=16)
    width = AlignedDataset(nonsquare_data, "train", keep)
    source, reason = plan_batch_source(width, "cpu", 1, workers=0)
    assert isinstance(source, StreamingDataset) and "different sizes" in reason
    source.start_epoch(1, order=[0, 1, 2, 3])
    heights = [source.next_batch()[0].shape[-2] for _ in range(4)]
    assert heights == [22, 27, 18, 31]  # width 36, height int(max(36 * h / 64, 16)) for h 40, 48, 32, 56


# --- a corrupt file found during training -----------------------------------------------------------


@pytest.fixture
def corrupt_data(tmp_path: Path, tiny_data: Path) -> Path:
    """The 4 tiny pairs and, last in order, one whose header is fine but whose pixel data is not."""
    root = tmp_path / "data"
    for split in ("train", "test"):
        (root / split).mkdir(parents=True)
        for path in (tiny_data / split).iterdir():
            (root / split / path.name).write_bytes(path.read_bytes())
    write(root / "train", "9999.png", corrupt_png(pair(32, 64)))
    return root


def worker_options(data: Path, checkpoints: Path, **changes: object) -> object:
    """In order (the corrupt file is the 5th image), latest.pt every 2 images, one worker process."""
    settings = {"deterministic": False, "num_threads": 1, "serial_batches": True, "save_latest_freq": 2}
    return tiny_options(data, checkpoints, n_epochs_decay=0, save_epoch_freq=0, **(settings | changes))


def test_corrupt_file_in_a_worker_stops_with_one_line(
    corrupt_data: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """No worker traceback (nor anything else) on the terminal: one line naming the file; the checkpoint
    saved before it stays on disk and loads."""
    opt = worker_options(corrupt_data, tmp_path)
    argv = ["train", "--dataroot", str(corrupt_data), "--checkpoints_dir", str(tmp_path), "--name", "tiny"]
    for name in ("netG", "ngf", "ndf", "load_size", "crop_size", "num_threads", "save_latest_freq", "device"):
        argv += [f"--{name}", str(getattr(opt, name))]
    argv += ["--backend", "reference", "--serial_batches", "--n_epochs", "1", "--n_epochs_decay", "0"]
    assert main(argv) == 1
    err = capfd.readouterr().err
    last = err.strip().splitlines()[-1]
    path = corrupt_data / "train" / "9999.png"
    assert last == (
        f"fastpix2pix train: error: cannot read image {path}: OSError: broken data stream when reading image "
        f"file; training stopped at epoch 1, iteration 4: the last checkpoint saved before it is kept "
        f"(--debug shows the full error)"
    )
    assert "Traceback" not in err and err.count("error:") == 1
    saved = load_checkpoint(tmp_path / "tiny" / "latest.pt")
    assert saved["iteration"] == 4 and saved["epoch"] == 1
    with pytest.raises(DataLoadError) as caught:  # --debug: the exception itself, for its traceback
        main([*argv, "--debug"])
    assert "Original Traceback" in str(caught.value.__cause__)


def test_debug_shows_the_worker_traceback(corrupt_data: Path, tmp_path: Path) -> None:
    trainer = Trainer(worker_options(corrupt_data, tmp_path), progress_bar=False)
    with pytest.raises(DataLoadError) as caught:
        trainer.fit()
    assert "9999.png" in str(caught.value) and "\n" not in str(caught.value)
    assert "Caught ImageReadError in DataLoader worker process 0" in caught.value.details
    assert "Traceback (most recent call last)" in caught.value.details
    assert isinstance(caught.value.__cause__, Exception)  # what --debug's traceback shows after it


def test_corrupt_file_in_the_main_process_and_on_the_fast_path(corrupt_data: Path, tmp_path: Path) -> None:
    """num_threads 0 (decoded in this process), and the fast path's streaming source: the same line."""
    from fastpix2pix.training.fast_step import FastPathConfig
    from fastpix2pix.training.fast_trainer import FastTrainer

    trainer = Trainer(worker_options(corrupt_data, tmp_path / "plain", num_threads=0), progress_bar=False)
    with pytest.raises(DataLoadError, match=r"9999\.png.*training stopped at epoch 1, iteration 4"):
        trainer.fit()
    opt = worker_options(corrupt_data, tmp_path / "fast", device_data="stream", num_threads=0)
    fast = FastTrainer(opt, FastPathConfig.for_device("cpu", loss_readback_every=1), progress_bar=False)
    with pytest.raises(DataLoadError, match=r"cannot read image .*9999\.png.*training stopped at epoch 1"):
        fast.fit()
    assert "fast path on (--fast_path auto, cpu device)" in (fast.run_dir / "log.txt").read_text()


def test_loading_error_leaves_other_errors_alone() -> None:
    assert loading_error(RuntimeError("CUDA error: out of memory")) is None
    assert loading_error(ValueError("Caught nothing in particular")) is None


def test_combine_separate_folders_then_train_on_them(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`fastpix2pix datasets combine` for A/ and B/ folders (B of another size: --resize_B), then the
    combined folder passes the check."""
    for side, size in (("A", (48, 32)), ("B", (24, 16))):
        for name in ("x", "y"):
            write(tmp_path / side / "train", f"{name}.png", encoded(pair(size[1], size[0]), "PNG"))
    argv = ["datasets", "combine", "--fold_A", str(tmp_path / "A"), "--fold_B", str(tmp_path / "B")]
    argv += ["--fold_AB", str(tmp_path / "AB")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "size mismatch" in err and "--resize_B" in err
    assert main([*argv, "--resize_B", "nearest"]) == 0
    combined = sorted((tmp_path / "AB" / "train").iterdir())
    assert [Image.open(path).size for path in combined] == [(96, 32), (96, 32)]
    report = check_dataset(combined, OPTIONS)
    assert report.error() is None and report.nonsquare == 2


# --- defaults that fit the machine --------------------------------------------------------------------


def test_workers_capped_at_the_usable_cpus(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runtime, "usable_cpu_count", lambda: 2)
    assert (data_workers(0), data_workers(1), data_workers(4)) == (0, 1, 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun: the machine's processes share the CPUs
    assert data_workers(4) == 1
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    opt = tiny_options(tiny_data, tmp_path, deterministic=False, num_threads=4, max_iters=1)
    trainer = Trainer(opt, progress_bar=False)
    assert trainer.opt.num_threads == 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit()
    assert not [w for w in caught if "worker processes in total" in str(w.message)]  # torch's warning
    log = (trainer.run_dir / "log.txt").read_text()
    assert "2 loader workers, capped from --num_threads 4 to the usable CPUs" in log


def test_usable_cpu_count_follows_the_affinity() -> None:
    import os

    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no CPU affinity on this platform")
    assert runtime.usable_cpu_count() == len(os.sched_getaffinity(0))


def test_check_file_names_a_missing_file(tmp_path: Path) -> None:
    (tmp_path / "link.png").symlink_to(tmp_path / "gone.png")
    assert check_file(tmp_path / "link.png").problem == "unreadable: the file does not exist (a broken link?)"
