"""Tests of ``test`` and ``predict``: outputs, protocols (train-mode vs --eval), padding, grayscale."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_run import train_tiny

from fastpix2pix.data import generate_synthetic_facades, read_image
from fastpix2pix.inference.loading import load_generator
from fastpix2pix.inference.run import predict, run_test
from fastpix2pix.inference.translate import pad_to_multiple
from fastpix2pix.runs.options import PredictOptions, TestOptions

pytestmark = pytest.mark.usefixtures("one_thread")

REF = "reference"


def options_for_test(trained: tuple[Path, Path], results: Path, **changes: object) -> TestOptions:
    data, checkpoints = trained
    # Architecture options are left at their defaults (unet_256): they must come from the checkpoint.
    opt = TestOptions(
        dataroot=str(data), name="tiny", checkpoints_dir=str(checkpoints), results_dir=str(results),
        backend=REF, device="cpu",
    )  # fmt: skip
    return dataclasses.replace(opt, **changes)


def images_of(folder: Path, label: str) -> dict[str, np.ndarray]:
    return {p.name: read_image(p) for p in sorted((folder / "images").glob(f"*_{label}.png"))}


def test_test_writes_every_image_and_a_page(trained: tuple[Path, Path], tmp_path: Path) -> None:
    checkpoint = trained[1] / "tiny" / "latest.pt"
    before = checkpoint.read_bytes()
    result = run_test(options_for_test(trained, tmp_path, batch_size=2))  # batch 2 over 3 images: 2 + 1
    assert result.images == 3 and result.folder == tmp_path / "tiny" / "test_latest"
    for label in ("real_A", "fake_B", "real_B"):
        files = images_of(result.folder, label)
        assert sorted(files) == [f"000{i}_{label}.png" for i in (1, 2, 3)]
        assert all(image.shape == (32, 32, 3) for image in files.values())
    page = result.index_html.read_text()
    assert all(
        f"images/000{i}_{label}.png" in page for i in (1, 2, 3) for label in ("real_A", "fake_B", "real_B")
    )
    metrics = json.loads((result.folder / "metrics.json").read_text())
    assert (
        metrics["images"] == 3
        and metrics["l1"] == pytest.approx(result.l1)
        and "train mode" in metrics["mode"]
    )
    assert checkpoint.read_bytes() == before  # train-mode BatchNorm statistics never reach the checkpoint


def test_num_test_and_aspect_ratio(trained: tuple[Path, Path], tmp_path: Path) -> None:
    result = run_test(options_for_test(trained, tmp_path, num_test=1, aspect_ratio=2.0))
    assert result.images == 1
    assert [image.shape for image in images_of(result.folder, "fake_B").values()] == [(32, 64, 3)]


def test_paper_protocol_versus_eval(trained: tuple[Path, Path], tmp_path: Path) -> None:
    """Train mode keeps dropout on (outputs depend on the seed); --eval is deterministic."""
    fakes = {}
    for mode, eval_mode in (("train", False), ("eval", True)):
        for seed in (1, 2):
            result = run_test(
                options_for_test(trained, tmp_path / f"{mode}{seed}", eval=eval_mode, seed=seed)
            )
            fakes[mode, seed] = images_of(result.folder, "fake_B")
    assert all(np.array_equal(fakes["eval", 1][k], fakes["eval", 2][k]) for k in fakes["eval", 1])
    assert not all(np.array_equal(fakes["train", 1][k], fakes["train", 2][k]) for k in fakes["train", 1])


def test_official_format_export_gives_the_same_generator(trained: tuple[Path, Path], tmp_path: Path) -> None:
    official = trained[1] / "tiny" / "latest_net_G.pth"
    from_checkpoint = run_test(options_for_test(trained, tmp_path / "a", eval=True))
    # A bare file records no options: architecture, direction and size are given on the command line.
    from_official = run_test(
        options_for_test(trained, tmp_path / "b", eval=True, load_official=str(official),
                         netG="resnet_6blocks", ngf=4, direction="BtoA", crop_size=32)
    )  # fmt: skip
    a, b = images_of(from_checkpoint.folder, "fake_B"), images_of(from_official.folder, "fake_B")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_missing_checkpoint(trained: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"epoch_9\.pt does not exist.*latest\.pt"):
        run_test(options_for_test(trained, tmp_path, epoch="9"))
    with pytest.raises(FileNotFoundError, match=r"nothing_net_G\.pth does not exist"):
        run_test(options_for_test(trained, tmp_path, load_official=str(tmp_path / "nothing_net_G.pth")))


# --- predict ----------------------------------------------------------------------------------------


def test_pad_to_multiple_reflects_and_keeps_the_original() -> None:
    x = torch.arange(2 * 3 * 5 * 7, dtype=torch.float32).reshape(2, 3, 5, 7)
    padded, size = pad_to_multiple(x, 4)
    assert size == (5, 7) and padded.shape == (2, 3, 8, 8)
    assert torch.equal(padded[..., :5, :7], x)
    assert torch.equal(padded[..., 5, :7], x[..., 3, :]) and torch.equal(padded[..., :5, 7], x[..., :, 5])
    small, _ = pad_to_multiple(x, 32)  # pads wider than the image: repeated reflections
    assert small.shape == (2, 3, 32, 32) and torch.equal(small[..., :5, :7], x)
    assert small.abs().max() <= x.abs().max()


def test_predict_any_resolution(trained: tuple[Path, Path], tmp_path: Path) -> None:
    checkpoints = trained[1]
    rng = np.random.default_rng(0)
    folder = tmp_path / "inputs"
    folder.mkdir()
    Image.fromarray(rng.integers(0, 255, (45, 37, 3), dtype=np.uint8)).save(folder / "odd.png")
    Image.fromarray(rng.integers(0, 255, (20, 64), dtype=np.uint8)).save(folder / "gray.jpg")  # 1 channel
    single = predict(
        PredictOptions(input=str(folder / "odd.png"), output=str(tmp_path / "out.png"), name="tiny",
                       checkpoints_dir=str(checkpoints), backend=REF, device="cpu")
    )  # fmt: skip
    assert single == [tmp_path / "out.png"] and read_image(single[0]).shape == (45, 37, 3)
    many = predict(
        PredictOptions(input=str(folder), output=str(tmp_path / "many"), name="tiny",
                       checkpoints_dir=str(checkpoints), backend=REF, device="cpu", eval=True)
    )  # fmt: skip
    shapes = {p.name: read_image(p).shape for p in many}
    assert shapes == {"gray.png": (20, 64, 3), "odd.png": (45, 37, 3)}


def test_predict_with_a_grayscale_model(tmp_path: Path) -> None:
    data = generate_synthetic_facades(tmp_path / "data", n_train=2, n_test=1, size=32, seed=0)
    train_tiny(data, tmp_path / "checkpoints", input_nc=1, output_nc=1)
    image = tmp_path / "rgb.png"
    Image.fromarray(np.full((33, 40, 3), 128, np.uint8)).save(image)
    (out,) = predict(
        PredictOptions(input=str(image), output=str(tmp_path / "fake.png"), name="tiny",
                       checkpoints_dir=str(tmp_path / "checkpoints"), backend=REF, device="cpu")
    )  # fmt: skip
    assert read_image(out).shape == (33, 40, 1)
    _, opt, _ = load_generator(
        PredictOptions(name="tiny", checkpoints_dir=str(tmp_path / "checkpoints"), backend=REF),
        torch.device("cpu"),
    )
    assert (opt.input_nc, opt.output_nc, opt.netG) == (1, 1, "resnet_6blocks")


def test_predict_bad_input(trained: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"--input .*missing\.png does not exist"):
        predict(
            PredictOptions(input=str(tmp_path / "missing.png"), name="tiny", checkpoints_dir=str(trained[1]))
        )
    with pytest.raises(ValueError, match="predict needs --input"):
        predict(PredictOptions(name="tiny", checkpoints_dir=str(trained[1])))
