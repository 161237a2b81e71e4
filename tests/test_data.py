"""Tests of fastpix2pix.data: preprocessing semantics, bad-data errors, synthetic data, combine, download."""

from __future__ import annotations

import dataclasses
import io
import json
import re
import struct
import tarfile
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from fastpix2pix.data import (
    SYNTHETIC_CLASSES,
    SYNTHETIC_PALETTE,
    AlignedDataset,
    AugmentParams,
    DataOptions,
    DownloadError,
    ImageReadError,
    SingleImageDataset,
    UnsafeArchiveError,
    apply,
    check_size_for_generator,
    combine_ab,
    download_dataset,
    ensure_synthetic_dataset,
    generate_synthetic_facades,
    image_size,
    params_rng,
    read_image,
    safe_extract,
    sample_params,
    shared_facades_root,
    synthetic_pair,
    to_channels,
)
from fastpix2pix.data.images import encode_png16
from fastpix2pix.data.labelmaps import decode_labels

RNG = np.random.default_rng(1234)


def write_ab(path: Path, a: np.ndarray, b: np.ndarray) -> Path:
    """Write A|B side by side (uint8 through Pillow, uint16 as 16-bit PNG)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ab = np.concatenate([a, b], axis=1)
    if ab.dtype == np.uint16:
        path.write_bytes(encode_png16(ab))
    else:
        Image.fromarray(ab[..., 0] if ab.shape[-1] == 1 else ab).save(path)
    return path


def random_rgb(h: int, w: int) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def coordinate_image(size: int) -> np.ndarray:
    """R encodes x, G encodes y: any crop/flip can be read back from the pixels."""
    ramp = np.arange(size, dtype=np.uint8) * 3
    img = np.zeros((size, size, 3), np.uint8)
    img[..., 0] = ramp[None, :]
    img[..., 1] = ramp[:, None]
    return img


def tensor_to_uint8(t: torch.Tensor) -> np.ndarray:
    return torch.round((t + 1) / 2 * 255).to(torch.uint8).permute(1, 2, 0).numpy()


# ----------------------------------------------------------------------------------------------------------
# Aligned dataset: preprocessing semantics


@pytest.mark.parametrize(
    ("preprocess", "half", "expected"),
    [
        ("resize_and_crop", (100, 100), (64, 64)),
        ("crop", (100, 100), (64, 64)),
        ("scale_width", (100, 100), (72, 72)),
        ("scale_width", (120, 60), (64, 72)),  # height never below crop_size (official __scale_width)
        ("scale_width_and_crop", (100, 100), (64, 64)),
        ("scale_width_and_crop", (120, 60), (64, 64)),
        ("none", (100, 100), (100, 100)),
        ("none", (102, 102), (104, 104)),  # round(25.5) = 26 (half to even, as the official round)
        ("none", (98, 90), (88, 96)),  # 98/4 = 24.5 -> 24; 90/4 = 22.5 -> 22
    ],
)
def test_preprocess_output_shapes(tmp_path, preprocess, half, expected):
    w, h = half
    write_ab(tmp_path / "train" / "0.png", random_rgb(h, w), random_rgb(h, w))
    opts = DataOptions(preprocess=preprocess, load_size=72, crop_size=64)
    sample = AlignedDataset(tmp_path, "train", opts)[0]  # non-square halves need no flag
    assert sample["A"].shape == (3, *expected)
    assert sample["B"].shape == (3, *expected)
    assert sample["A"].dtype == torch.float32
    assert sample["A"].min() >= -1.0 and sample["A"].max() <= 1.0
    assert sample["A_paths"] == sample["B_paths"] == str(tmp_path / "train" / "0.png")


def test_resize_matches_pillow_bicubic(tmp_path):
    """resize_and_crop without flip and a full-size crop is exactly Pillow's bicubic resize."""
    a = random_rgb(50, 50)
    write_ab(tmp_path / "train" / "0.png", a, a)
    opts = DataOptions(load_size=64, crop_size=64, no_flip=True)
    out = AlignedDataset(tmp_path, "train", opts)[0]["A"]
    ref = np.asarray(Image.fromarray(a).resize((64, 64), Image.Resampling.BICUBIC))
    expected = torch.from_numpy(ref.transpose(2, 0, 1).astype(np.float32)).div(255).sub(0.5).div(0.5)
    assert torch.equal(out, expected)


def _official_steps(img: Image.Image, opts: DataOptions, x: int, y: int, flip: bool) -> Image.Image:
    """The official get_transform steps written with Pillow calls, as an independent oracle."""
    bicubic = Image.Resampling.BICUBIC
    load, crop = opts.load_size, opts.crop_size
    if "resize" in opts.preprocess:
        img = img.resize((load, load), bicubic)
    elif "scale_width" in opts.preprocess and not (img.width == load and img.height >= crop):
        img = img.resize((load, int(max(load * img.height / img.width, crop))), bicubic)
    if "crop" in opts.preprocess and (img.width > crop or img.height > crop):
        img = img.crop((x, y, x + crop, y + crop))
    if opts.preprocess == "none":
        size = (int(round(img.width / 4) * 4), int(round(img.height / 4) * 4))
        img = img if size == img.size else img.resize(size, bicubic)
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip and not opts.no_flip else img


@pytest.mark.parametrize(
    "preprocess", ["resize_and_crop", "crop", "scale_width", "scale_width_and_crop", "none"]
)
@pytest.mark.parametrize("size", [(90, 70), (64, 64), (70, 90)])
def test_apply_matches_official_steps(preprocess, size):
    img = random_rgb(size[1], size[0])
    opts = DataOptions(preprocess=preprocess, load_size=72, crop_size=64)
    for index in range(3):
        params = sample_params(size, opts, params_rng(0, 0, index))
        x, y = params.crop[:2] if params.crop else (0, 0)
        expected = np.asarray(_official_steps(Image.fromarray(img), opts, x, y, params.flip))
        np.testing.assert_array_equal(tensor_to_uint8(apply(img, params)), expected)


def _official_normalize(img: Image.Image) -> torch.Tensor:
    """torchvision's ToTensor + Normalize(0.5, 0.5) on a PIL image, as the official transform ends."""
    array = np.asarray(img)
    array = array[..., None] if array.ndim == 2 else array
    return torch.from_numpy(array.transpose(2, 0, 1).copy()).float().div(255).sub(0.5).div(0.5)


def _official_crop_range(opts: DataOptions, size: tuple[int, int]) -> tuple[int, int]:
    """The largest crop offsets of the official ``get_params`` for an A half of ``size``."""
    w, h = size
    if opts.preprocess == "resize_and_crop":
        w = h = opts.load_size
    elif opts.preprocess == "scale_width_and_crop":
        w, h = opts.load_size, opts.load_size * h // w
    return max(0, w - opts.crop_size), max(0, h - opts.crop_size)


def official_aligned_item(
    path: Path, opts: DataOptions, x: int, y: int, flip: bool
) -> dict[str, torch.Tensor]:
    """The official ``AlignedDataset.__getitem__`` with Pillow calls, given its crop position and flip:
    convert("RGB"), split at int(w / 2), then per side Grayscale (for nc 1) and get_transform's steps."""
    ab = Image.open(path).convert("RGB")
    w, h = ab.size
    w2 = int(w / 2)
    left, right = ab.crop((0, 0, w2, h)), ab.crop((w2, 0, w, h))
    a, b = (right, left) if opts.direction == "BtoA" else (left, right)
    sides = {}
    for key, img, nc in (("A", a, opts.input_nc), ("B", b, opts.output_nc)):
        img = img.convert("L") if nc == 1 else img  # transforms.Grayscale(1), the first step
        sides[key] = _official_normalize(_official_steps(img, opts, x, y, flip))
    return sides


@pytest.mark.parametrize(
    "preprocess", ["resize_and_crop", "crop", "scale_width", "scale_width_and_crop", "none"]
)
@pytest.mark.parametrize(
    ("half", "channels", "direction"),
    [
        ((90, 70), (3, 3), "AtoB"),
        ((70, 90), (1, 3), "BtoA"),
        ((64, 64), (3, 1), "AtoB"),
        ((98, 66), (1, 1), "BtoA"),
    ],
)
def test_aligned_pairs_match_the_official_pipeline(tmp_path, preprocess, half, channels, direction):
    """A|B files with square and non-square halves, every preprocess mode, grayscale sides, both
    directions: the tensors equal the official AlignedDataset's bit for bit, and the crop offsets lie in
    the official get_params range."""
    w, h = half
    path = write_ab(tmp_path / "train" / "0.png", random_rgb(h, w), random_rgb(h, w))
    opts = DataOptions(
        preprocess=preprocess, load_size=72, crop_size=64, input_nc=channels[0], output_nc=channels[1],
        direction=direction, seed=5,
    )  # fmt: skip
    ds = AlignedDataset(tmp_path, "train", opts)
    for epoch in range(4):
        ds.set_epoch(epoch)
        ours = ds[0]
        params = sample_params(half, opts, params_rng(5, epoch, 0))
        x, y = params.crop[:2] if params.crop else (0, 0)
        max_x, max_y = _official_crop_range(opts, half)
        assert 0 <= x <= max_x and 0 <= y <= max_y
        official = official_aligned_item(path, opts, x, y, params.flip)
        for key in "AB":
            assert ours[key].dtype == official[key].dtype == torch.float32
            assert torch.equal(ours[key], official[key]), (key, epoch)


def test_nonsquare_facades_pairs_match_the_official_pipeline(tmp_path):
    """Non-square pairs cut from the real facades (JPEG, as users have them): bit-identical too."""
    root = shared_facades_root()
    if root is None:
        pytest.skip("shared facades data not found (set FASTPIX2PIX_FACADES to its folder)")
    (tmp_path / "train").mkdir()
    for index, source in enumerate(sorted((root / "train").glob("*.jpg"))[:3]):
        pair = read_image(source)
        rows = (158, 200, 256)[index]  # 512x158, 512x200 and the original 512x256
        halves = np.concatenate([pair[:rows, :256], pair[:rows, 256:]], axis=1)
        Image.fromarray(halves).save(tmp_path / "train" / f"{index}.jpg", quality=90)
    for preprocess in ("resize_and_crop", "scale_width_and_crop", "none"):
        opts = DataOptions(direction="BtoA", preprocess=preprocess, load_size=143, crop_size=128, seed=1)
        ds = AlignedDataset(tmp_path, "train", opts)
        for index, path in enumerate(ds.paths):
            width, height = image_size(path)
            params = sample_params((width // 2, height), opts, params_rng(1, 0, index))
            x, y = params.crop[:2] if params.crop else (0, 0)
            official = official_aligned_item(path, opts, x, y, params.flip)
            ours = ds[index]
            assert torch.equal(ours["A"], official["A"]) and torch.equal(ours["B"], official["B"])


def test_odd_width_named(tmp_path):
    path = tmp_path / "train" / "odd.png"
    path.parent.mkdir()
    Image.fromarray(random_rgb(30, 41)).save(path)
    with pytest.raises(ValueError, match=re.escape(str(path)) + r": width 41 is odd"):
        AlignedDataset(tmp_path, "train")[0]


def test_crop_and_flip_shared_and_follow_params(tmp_path):
    img = coordinate_image(64)
    write_ab(tmp_path / "train" / "0.png", img, img)
    opts = DataOptions(preprocess="crop", crop_size=48, seed=7)
    ds = AlignedDataset(tmp_path, "train", opts)
    seen_flips, seen_x = set(), set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        sample = ds[0]
        assert torch.equal(sample["A"], sample["B"])
        params = sample_params((64, 64), opts, params_rng(7, epoch, 0))
        x, y, _, _ = params.crop
        out = tensor_to_uint8(sample["A"])
        xs, ys = out[0, :, 0] // 3, out[:, 0, 1] // 3
        expected_xs = np.arange(x, x + 48)[:: -1 if params.flip else 1]
        np.testing.assert_array_equal(xs, expected_xs)
        np.testing.assert_array_equal(ys, np.arange(y, y + 48))
        seen_flips.add(params.flip)
        seen_x.add(x)
    assert seen_flips == {True, False}
    assert len(seen_x) > 3


def test_resized_halves_stay_identical(tmp_path):
    a = random_rgb(40, 40)
    write_ab(tmp_path / "train" / "0.png", a, a)
    ds = AlignedDataset(tmp_path, "train", DataOptions(load_size=72, crop_size=64))
    for epoch in range(4):
        ds.set_epoch(epoch)
        sample = ds[0]
        assert torch.equal(sample["A"], sample["B"])


def test_same_epoch_same_data_and_epochs_differ(tmp_path):
    write_ab(tmp_path / "train" / "0.png", random_rgb(40, 40), random_rgb(40, 40))
    opts = DataOptions(load_size=72, crop_size=64, seed=3)
    first, resumed = AlignedDataset(tmp_path, "train", opts), AlignedDataset(tmp_path, "train", opts)
    first.set_epoch(5)
    resumed.set_epoch(5)
    assert torch.equal(first[0]["A"], resumed[0]["A"])
    draws = {sample_params((40, 40), opts, params_rng(3, e, 0)) for e in range(10)}
    assert len(draws) > 1


def test_apply_is_pure_and_explicit():
    img = coordinate_image(32)
    params = AugmentParams(resize=None, crop=(4, 2, 16, 16), flip=True)
    out = tensor_to_uint8(apply(img, params))
    np.testing.assert_array_equal(out, img[2:18, 4:20][:, ::-1])
    assert np.array_equal(img, coordinate_image(32))  # input untouched


def test_no_flip_never_flips():
    opts = DataOptions(no_flip=True)
    assert not any(sample_params((256, 256), opts, params_rng(0, 0, i)).flip for i in range(50))


def test_direction_swap(tmp_path):
    red = np.zeros((32, 32, 3), np.uint8)
    red[..., 0] = 255
    blue = np.zeros((32, 32, 3), np.uint8)
    blue[..., 2] = 255
    write_ab(tmp_path / "train" / "0.png", red, blue)
    opts = DataOptions(preprocess="none", no_flip=True)
    atob = AlignedDataset(tmp_path, "train", opts)[0]
    btoa = AlignedDataset(tmp_path, "train", dataclasses.replace(opts, direction="BtoA"))[0]
    assert atob["A"][0].mean() == 1 and atob["B"][2].mean() == 1
    assert btoa["A"][2].mean() == 1 and btoa["B"][0].mean() == 1


def test_grayscale_channels(tmp_path):
    a, b = random_rgb(32, 32), random_rgb(32, 32)
    write_ab(tmp_path / "train" / "0.png", a, b)
    opts = DataOptions(preprocess="none", no_flip=True, input_nc=1, output_nc=3)
    sample = AlignedDataset(tmp_path, "train", opts)[0]
    assert sample["A"].shape == (1, 32, 32) and sample["B"].shape == (3, 32, 32)
    expected = np.asarray(Image.fromarray(a).convert("L"))
    np.testing.assert_array_equal(tensor_to_uint8(sample["A"])[..., 0], expected)


def test_to_channels_matches_pillow_luma():
    img = random_rgb(64, 64)
    np.testing.assert_array_equal(to_channels(img, 1)[..., 0], np.asarray(Image.fromarray(img).convert("L")))
    gray = img[..., :1]
    assert to_channels(gray, 3).shape == (64, 64, 3)


def test_grayscale_file_read_as_rgb_for_three_channels(tmp_path):
    gray = RNG.integers(0, 256, (16, 32), dtype=np.uint8)
    (tmp_path / "train").mkdir()
    Image.fromarray(gray).save(tmp_path / "train" / "0.png")
    sample = AlignedDataset(tmp_path, "train", DataOptions(preprocess="none", no_flip=True))[0]
    assert sample["A"].shape == (3, 16, 16)
    assert torch.equal(sample["A"][0], sample["A"][2])


# ----------------------------------------------------------------------------------------------------------
# 16-bit data


def test_16bit_grayscale_png_keeps_full_range(tmp_path):
    a = np.array([[0, 65535], [32768, 1000]], np.uint16).repeat(4, 0).repeat(4, 1)[..., None]
    path = tmp_path / "train" / "0.png"
    path.parent.mkdir()
    Image.fromarray(np.concatenate([a, a], axis=1)[..., 0]).save(path)  # Pillow writes 16-bit ("I;16")
    assert read_image(path).dtype == np.uint16
    sample = AlignedDataset(tmp_path, "train", DataOptions(preprocess="none", no_flip=True, input_nc=1))[0]
    t = sample["A"][0]
    assert t[0, 0] == -1 and t[0, 4] == 1
    assert abs(float(t[4, 0]) - (32768 / 65535 * 2 - 1)) < 1e-6  # not clipped at 255 as convert("RGB") does
    assert sample["B"].shape == (3, 8, 8)


def _png_filtered(image: np.ndarray) -> bytes:
    """A 16-bit RGB PNG whose rows use all five filter types (exercises un-filtering with 6-byte pixels)."""
    h, w, c = image.shape
    raw = image.astype(">u2").reshape(h, w * c).view(np.uint8).astype(np.int32)
    bpp = c * 2
    rows = []
    for y in range(h):
        cur, up = raw[y], raw[y - 1] if y else np.zeros_like(raw[0])
        left = np.concatenate([np.zeros(bpp, np.int32), cur[:-bpp]])
        up_left = np.concatenate([np.zeros(bpp, np.int32), up[:-bpp]])
        kind = y % 5
        if kind == 0:
            pred = np.zeros_like(cur)
        elif kind == 1:
            pred = left
        elif kind == 2:
            pred = up
        elif kind == 3:
            pred = (left + up) // 2
        else:
            p = left + up - up_left
            pa, pb, pc = np.abs(p - left), np.abs(p - up), np.abs(p - up_left)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, up_left))
        rows.append(bytes([kind]) + ((cur - pred) % 256).astype(np.uint8).tobytes())

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    idat = zlib.compress(b"".join(rows))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_16bit_rgb_png_exact(tmp_path):
    img = RNG.integers(0, 65536, (12, 10, 3)).astype(np.uint16)
    plain, filtered = tmp_path / "plain.png", tmp_path / "filtered.png"
    plain.write_bytes(encode_png16(img))
    filtered.write_bytes(_png_filtered(img))
    np.testing.assert_array_equal(read_image(plain), img)
    np.testing.assert_array_equal(read_image(filtered), img)


def test_16bit_tiff(tmp_path):
    gray = RNG.integers(0, 65536, (8, 16)).astype(np.uint16)
    Image.fromarray(gray).save(tmp_path / "g.tif")
    np.testing.assert_array_equal(read_image(tmp_path / "g.tif")[..., 0], gray)
    tifffile = pytest.importorskip("tifffile")
    rgb = RNG.integers(0, 65536, (8, 16, 3)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb)
    tifffile.imwrite(tmp_path / "rgb_z.tif", rgb, compression="zlib")
    tifffile.imwrite(tmp_path / "rgb_strips.tif", rgb, rowsperstrip=3)  # several tiles in Pillow
    for name in ("rgb.tif", "rgb_z.tif", "rgb_strips.tif"):
        np.testing.assert_array_equal(read_image(tmp_path / name), rgb)


def test_16bit_resize_keeps_precision(tmp_path):
    a = np.full((20, 20, 1), 40000, np.uint16)
    write_ab(tmp_path / "train" / "0.png", a, a)
    opts = DataOptions(load_size=30, crop_size=24, input_nc=1, output_nc=1)
    t = AlignedDataset(tmp_path, "train", opts)[0]["A"]
    assert torch.allclose(t, torch.full_like(t, 40000 / 65535 * 2 - 1), atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Listing and bad data


def test_max_dataset_size_and_sorting(tmp_path):
    for name in ["c.png", "a.JPG", "b.jpeg", "sub/d.png", "e.PNG", "notes.txt"]:
        if name.endswith(".txt"):
            (tmp_path / "train" / name).write_text("not an image")
            continue
        write_ab(tmp_path / "train" / name, random_rgb(8, 8), random_rgb(8, 8))
    ds = AlignedDataset(tmp_path, "train", DataOptions(max_dataset_size=3))
    assert [p.name for p in ds.paths] == ["a.JPG", "b.jpeg", "c.png"]
    assert len(AlignedDataset(tmp_path, "train")) == 5


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "train")) + ".*does not exist"):
        AlignedDataset(tmp_path, "train")
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"no image files in .*train.*\.jpg.*\.png"):
        AlignedDataset(tmp_path, "train")


def test_corrupt_file_named(tmp_path):
    path = tmp_path / "train" / "bad.png"
    path.parent.mkdir()
    path.write_bytes(b"\x89PNG\r\n\x1a\n garbage, not a PNG")
    with pytest.raises(ImageReadError, match=re.escape(str(path))):
        AlignedDataset(tmp_path, "train")[0]


@pytest.mark.parametrize("cut", [2, 300, 2000])
@pytest.mark.parametrize("lenient_global", [False, True])
def test_truncated_jpeg_raises(tmp_path, monkeypatch, cut, lenient_global):
    buf = io.BytesIO()
    Image.fromarray(random_rgb(64, 128)).save(buf, "JPEG", quality=90)
    path = tmp_path / "train" / "cut.jpg"
    path.parent.mkdir()
    path.write_bytes(buf.getvalue()[:-cut])
    # Some libraries set this global to True; reading must stay strict anyway.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", lenient_global)
    with pytest.raises(ImageReadError, match=re.escape(str(path))):
        read_image(path)
    assert lenient_global == ImageFile.LOAD_TRUNCATED_IMAGES


def test_nonsquare_halves_split_at_the_middle(tmp_path):
    """A 40x30 file is two 20x30 halves, as the official code reads it (it used to be refused)."""
    a, b = random_rgb(30, 20), random_rgb(30, 20)
    write_ab(tmp_path / "train" / "pair.png", a, b)
    left, right = AlignedDataset(tmp_path, "train", DataOptions(preprocess="none")).read_pair(0)
    np.testing.assert_array_equal(left, a)
    np.testing.assert_array_equal(right, b)


def test_missing_split_lists_the_others(tmp_path):
    write_ab(tmp_path / "train" / "0.png", random_rgb(8, 8), random_rgb(8, 8))
    write_ab(tmp_path / "val" / "sub" / "0.png", random_rgb(8, 8), random_rgb(8, 8))
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        FileNotFoundError, match=r"has no 'test' split; its splits: train \(1 images\), val \(1 images\)\. "
        r"Choose one with --phase, e.g. --phase train"
    ):  # fmt: skip
        AlignedDataset(tmp_path, "test")


def test_crop_larger_than_image_named(tmp_path):
    path = write_ab(tmp_path / "train" / "small.png", random_rgb(32, 32), random_rgb(32, 32))
    with pytest.raises(ValueError, match=re.escape(str(path)) + r".*crop_size 64.*32x32"):
        AlignedDataset(tmp_path, "train", DataOptions(preprocess="crop", crop_size=64))[0]


def test_invalid_options():
    with pytest.raises(ValueError, match="load_size"):
        DataOptions(load_size=200, crop_size=256)
    with pytest.raises(ValueError, match="direction"):
        DataOptions(direction="AB")
    with pytest.raises(ValueError, match="preprocess"):
        DataOptions(preprocess="resize")
    with pytest.raises(ValueError, match="input_nc"):
        DataOptions(input_nc=2)


def test_check_size_for_generator():
    check_size_for_generator(256, 512, 256)
    with pytest.raises(ValueError, match=r"300x256.*256.*height 300 -> 256 or 512.*--crop_size 256"):
        check_size_for_generator(300, 256, 256)
    with pytest.raises(ValueError, match=r"100x100.*width 100 -> 128"):
        check_size_for_generator(100, 100, 128)


def test_single_image_dataset(tmp_path):
    Image.fromarray(random_rgb(50, 70)).save(tmp_path / "x.jpg")
    Image.fromarray(random_rgb(64, 64)).save(tmp_path / "y.png")
    ds = SingleImageDataset(tmp_path)
    assert len(ds) == 2
    sample = ds[0]
    assert set(sample) == {"A", "A_paths"}
    assert sample["A"].shape == (3, 48, 72)  # 'none': sides rounded to a multiple of 4
    one = SingleImageDataset(tmp_path / "y.png", DataOptions(preprocess="none", no_flip=True, input_nc=1))
    assert len(one) == 1 and one[0]["A"].shape == (1, 64, 64)


# ----------------------------------------------------------------------------------------------------------
# Synthetic facades


def test_synthetic_deterministic(tmp_path):
    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}

    a = files(generate_synthetic_facades(tmp_path / "a", n_train=3, n_test=2, size=128, seed=5))
    b = files(generate_synthetic_facades(tmp_path / "b", n_train=3, n_test=2, size=128, seed=5))
    c = files(generate_synthetic_facades(tmp_path / "c", n_train=3, n_test=2, size=128, seed=6))
    assert list(a) == ["test/0001.png", "test/0002.png", "train/0001.png", "train/0002.png", "train/0003.png"]
    assert a == b
    assert all(a[k] != c[k] for k in a)
    assert len(set(a.values())) == len(a)


def test_synthetic_content_is_learnable_structure():
    assert len(SYNTHETIC_CLASSES) == len(SYNTHETIC_PALETTE) == 12
    for index in range(6):
        photo, labels = synthetic_pair(0, "train", index, 128)
        assert photo.shape == (128, 128, 3) and labels.shape == (128, 128)
        np.testing.assert_array_equal(decode_labels(SYNTHETIC_PALETTE[labels], SYNTHETIC_PALETTE), labels)
        rgb = photo.astype(np.float32)
        wall = rgb[labels == SYNTHETIC_CLASSES.index("facade")]
        for name in ("window", "door"):
            pixels = rgb[labels == SYNTHETIC_CLASSES.index(name)]
            assert len(pixels) > 50 and len(wall) > 1000
            # Each class looks different from the wall, so the photo can be predicted from the labels.
            assert np.abs(pixels.mean(axis=0) - wall.mean(axis=0)).sum() > 25, (index, name)
    # The same building at two resolutions (geometry is drawn in fractions of the size).
    _, small = synthetic_pair(0, "train", 0, 128)
    _, large = synthetic_pair(0, "train", 0, 256)
    _, other = synthetic_pair(1, "train", 0, 128)
    assert (large[::2, ::2] == small).mean() > 0.9 > (other == small).mean()


def test_synthetic_dataset_loads_as_facades(tmp_path):
    root = generate_synthetic_facades(tmp_path, n_train=2, n_test=1, size=128)
    opts = DataOptions(direction="BtoA", load_size=143, crop_size=128)
    sample = AlignedDataset(root, "train", opts)[0]
    assert sample["A"].shape == sample["B"].shape == (3, 128, 128)
    raw = read_image(root / "train" / "0001.png")
    labels = decode_labels(raw[:, 128:], SYNTHETIC_PALETTE)
    np.testing.assert_array_equal(SYNTHETIC_PALETTE[labels], raw[:, 128:])  # the B side is pure palette


def test_ensure_synthetic_dataset(tmp_path):
    root = tmp_path / "syn"
    ensure_synthetic_dataset(root, n_train=2, n_test=1, size=64)
    marker = json.loads((root / "synthetic.json").read_text())
    assert marker["n_train"] == 2 and marker["size"] == 64
    stamp = (root / "train" / "0001.png").stat().st_mtime_ns
    time.sleep(0.01)
    ensure_synthetic_dataset(root, n_train=2, n_test=1, size=64)
    assert (root / "train" / "0001.png").stat().st_mtime_ns == stamp  # not regenerated
    ensure_synthetic_dataset(root, n_train=3, n_test=1, size=64)
    assert len(list((root / "train").glob("*.png"))) == 3
    (root / "test" / "0001.png").unlink()
    ensure_synthetic_dataset(root, n_train=3, n_test=1, size=64)
    assert (root / "test" / "0001.png").exists()
    foreign = tmp_path / "real"
    (foreign / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match="refusing to overwrite"):
        ensure_synthetic_dataset(foreign, n_train=1, n_test=1, size=64)


# ----------------------------------------------------------------------------------------------------------
# combine


def _two_folders(tmp_path: Path) -> tuple[Path, Path]:
    folder_a, folder_b = tmp_path / "A", tmp_path / "B"
    for phase, names in {"train": ["1", "2"], "test": ["9"]}.items():
        for name in names:
            (folder_a / phase).mkdir(parents=True, exist_ok=True)
            (folder_b / phase).mkdir(parents=True, exist_ok=True)
            Image.fromarray(random_rgb(16, 16)).save(folder_a / phase / f"{name}.png")
            Image.fromarray(random_rgb(16, 16)).save(folder_b / phase / f"{name}.jpg")
    return folder_a, folder_b


def test_combine_pairs_by_stem(tmp_path):
    folder_a, folder_b = _two_folders(tmp_path)
    written = combine_ab(folder_a, folder_b, tmp_path / "AB", progress=False)
    assert written == {"test": 1, "train": 2}
    ab = read_image(tmp_path / "AB" / "train" / "1.png")
    assert ab.shape == (16, 32, 3)
    np.testing.assert_array_equal(ab[:, :16], read_image(folder_a / "train" / "1.png"))
    np.testing.assert_array_equal(ab[:, 16:], read_image(folder_b / "train" / "1.jpg"))
    assert len(AlignedDataset(tmp_path / "AB", "train")) == 2


def test_combine_unmatched_listed(tmp_path):
    folder_a, folder_b = _two_folders(tmp_path)
    Image.fromarray(random_rgb(16, 16)).save(folder_a / "train" / "orphan.png")
    Image.fromarray(random_rgb(16, 16)).save(folder_b / "train" / "lonely.png")
    with pytest.raises(
        ValueError, match=r"unmatched.*1 in .*A/train only \(orphan\).*1 in .*B/train only \(lonely\)"
    ):
        combine_ab(folder_a, folder_b, tmp_path / "AB", progress=False)
    with pytest.warns(UserWarning, match="orphan"):
        written = combine_ab(folder_a, folder_b, tmp_path / "AB", strict=False, progress=False)
    assert written["train"] == 2


def test_combine_size_mismatch(tmp_path):
    folder_a, folder_b = _two_folders(tmp_path)
    Image.fromarray(random_rgb(20, 24)).save(folder_b / "train" / "2.jpg")
    with pytest.raises(ValueError, match=r"size mismatch.*2\.png is 16x16.*2\.jpg is 24x20.*resize_b"):
        combine_ab(folder_a, folder_b, tmp_path / "AB", progress=False)
    combine_ab(folder_a, folder_b, tmp_path / "AB", resize_b=True, method="nearest", progress=False)
    assert read_image(tmp_path / "AB" / "train" / "2.png").shape == (16, 32, 3)


def test_combine_ab_suffix(tmp_path):
    for side in "AB":
        (tmp_path / side / "val").mkdir(parents=True)
        Image.fromarray(random_rgb(8, 8)).save(tmp_path / side / "val" / f"0001_{side}.png")
    combine_ab(tmp_path / "A", tmp_path / "B", tmp_path / "AB", use_ab_suffix=True, progress=False)
    assert (tmp_path / "AB" / "val" / "0001.png").exists()


# ----------------------------------------------------------------------------------------------------------
# download (a local server on 127.0.0.1 only)


def _tarball(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    return buf.getvalue()


def _facades_tarball() -> bytes:
    return _tarball(
        {
            "facades/train/1.png": _png_bytes(random_rgb(8, 16)),
            "facades/train/2.png": _png_bytes(random_rgb(8, 16)),
            "facades/test/1.png": _png_bytes(random_rgb(8, 16)),
            "facades/val/1.png": _png_bytes(random_rgb(8, 16)),
        }
    )


class _Server:
    """Serves ``payload`` at ``*.tar.gz``; can drop the first response, ignore Range, lie about length."""

    def __init__(
        self, payload: bytes, *, drop_first: bool = False, ranges: bool = True, extra_length: int = 0
    ):
        self.payload, self.drop_first, self.ranges, self.extra_length = (
            payload,
            drop_first,
            ranges,
            extra_length,
        )
        self.requests: list[str | None] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if not (self.path.startswith("/datasets/") and self.path.endswith(".tar.gz")):
                    self.send_error(404)
                    return
                requested = self.headers.get("Range")
                server.requests.append(requested)
                start = (
                    int(re.match(r"bytes=(\d+)-", requested).group(1)) if requested and server.ranges else 0
                )
                body = server.payload[start:]
                self.send_response(206 if start else 200)
                if start:
                    total = len(server.payload)
                    self.send_header("Content-Range", f"bytes {start}-{total - 1}/{total}")
                self.send_header("Content-Length", str(len(body) + server.extra_length))
                self.end_headers()
                if server.drop_first and len(server.requests) == 1:
                    body = body[: len(body) // 2]  # then the connection closes mid-file
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/datasets/"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def serve():
    servers: list[_Server] = []

    def start(payload: bytes, **kwargs: object) -> _Server:
        servers.append(_Server(payload, **kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


FAST = {"backoff": 0.0, "timeout": 5.0, "progress": False}


@pytest.mark.parametrize("ranges", [True, False])
def test_download_retries_after_dropped_connection(tmp_path, serve, ranges):
    payload = _facades_tarball()
    server = serve(payload, drop_first=True, ranges=ranges)
    target = download_dataset("facades", tmp_path, server.url, retries=3, **FAST)
    assert target == tmp_path / "facades"
    assert sorted(p.name for p in target.iterdir()) == ["test", "train", "val"]
    assert len(AlignedDataset(target, "train", DataOptions(preprocess="none"))) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["facades"]  # no archive, .part or temp left
    assert len(server.requests) == 2
    assert server.requests[1] == f"bytes={len(payload) // 2}-"  # resumed with Range
    # Already there: no request at all.
    download_dataset("facades", tmp_path, server.url, **FAST)
    assert len(server.requests) == 2


def test_download_size_mismatch(tmp_path, serve):
    server = serve(_facades_tarball(), ranges=False, extra_length=100)
    with pytest.raises(DownloadError, match=r"after 3 attempts.*size mismatch.*Content-Length"):
        download_dataset("facades", tmp_path, server.url, retries=2, **FAST)
    assert len(server.requests) == 3
    assert not (tmp_path / "facades").exists() and not (tmp_path / "facades.tar.gz").exists()


def test_download_http_error_not_retried(tmp_path, serve):
    server = serve(b"")
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_dataset("maps", tmp_path, server.url.replace("/datasets/", "/missing"), retries=3, **FAST)


def test_download_rejects_path_traversal(tmp_path, serve):
    evil = _tarball({"facades/train/1.png": _png_bytes(random_rgb(8, 16)), "facades/../../evil.txt": b"x"})
    server = serve(evil)
    root = tmp_path / "root"
    with pytest.raises(UnsafeArchiveError, match=r"evil\.txt"):
        download_dataset("facades", root, server.url, **FAST)
    assert not (tmp_path / "evil.txt").exists()
    assert not (root / "facades").exists() and not (root / "facades.tar.gz").exists()


def test_safe_extract_rejects_absolute_and_links(tmp_path):
    absolute = tmp_path / "abs.tar.gz"
    absolute.write_bytes(_tarball({"/tmp/fastpix2pix-absolute.txt": b"x"}))
    with pytest.raises(UnsafeArchiveError, match="absolute"):
        safe_extract(absolute, tmp_path / "out")
    link = tmp_path / "link.tar"
    with tarfile.open(link, "w") as tar:
        info = tarfile.TarInfo("facades/train/link")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(UnsafeArchiveError, match="link"):
        safe_extract(link, tmp_path / "out")


def test_download_names(tmp_path):
    with pytest.raises(ValueError, match="license"):
        download_dataset("cityscapes", tmp_path)
    with pytest.raises(ValueError, match="available: facades"):
        download_dataset("imagenet", tmp_path)


# ----------------------------------------------------------------------------------------------------------
# The real facades (skipped when ../shared/data/facades is absent)


def test_real_facades_pairs():
    root = shared_facades_root()
    if root is None:
        pytest.skip("shared facades data not found (set FASTPIX2PIX_FACADES to its folder)")
    opts = DataOptions(direction="BtoA", max_dataset_size=3)
    ds = AlignedDataset(root, "train", opts)
    assert len(ds) == 3 and [p.name for p in ds.paths] == ["1.jpg", "10.jpg", "100.jpg"]
    for index in range(3):
        sample = ds[index]
        assert sample["A"].shape == sample["B"].shape == (3, 256, 256)
        assert sample["A"].min() >= -1 and sample["A"].max() <= 1
    a, b = ds.read_pair(0)
    assert a.shape == b.shape == (256, 256, 3)
    assert a.dtype == np.uint8
    assert image_size(ds.paths[0]) == (512, 256)
    test_ds = AlignedDataset(root, "test", DataOptions(direction="BtoA", preprocess="none", no_flip=True))
    assert len(test_ds) == 106 and test_ds[0]["A"].shape == (3, 256, 256)
