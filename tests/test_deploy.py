"""Tests of the inference engines (``--engine torch|onnxruntime``) and of ``fastpix2pix.deploy``."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from test_models import _randomise

from fastpix2pix import deploy
from fastpix2pix.cli import main
from fastpix2pix.data import read_image, to_tensor
from fastpix2pix.inference import engines
from fastpix2pix.inference.run import predict, run_test
from fastpix2pix.inference.translate import pad_to_multiple
from fastpix2pix.models import define_G
from fastpix2pix.runs.options import PredictOptions, TestOptions
from fastpix2pix.runs.visualize import tensor_to_image

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of 5 images: three 32x32 (one grayscale), one 45x37, one 32x32 after it (a new group)."""
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    shapes = {"a": (32, 32, 3), "b": (32, 32, 3), "c": (32, 32), "d": (45, 37, 3), "e": (32, 32, 3)}
    for name, shape in shapes.items():
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(folder / f"{name}.png")
    return folder


def generator(netG: str, norm: str, seed: int = 0) -> nn.Module:
    """Random weights and BN affine; running statistics from two random batches (as a trained net's)."""
    G = define_G(netG, ngf=8, norm=norm, use_dropout=False)
    _randomise(G, seed)
    for bn in (m for m in G.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.reset_running_stats()
        bn.momentum = None
    with torch.no_grad():
        G.train()(torch.randn(2, 3, max(G.size_multiple, 32), max(G.size_multiple, 32)))
    return G


def reference(G: nn.Module, x: torch.Tensor, eval_mode: bool) -> torch.Tensor:
    with torch.no_grad():
        return copy.deepcopy(G).set_backend("reference").train(not eval_mode)(x)


# --- engines --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("netG", "norm", "size"), [("unet_128", "batch", 128), ("resnet_9blocks", "instance", 32)]
)
@pytest.mark.parametrize("eval_mode", [True, False])
def test_engines_compute_the_generator(netG: str, norm: str, size: int, eval_mode: bool) -> None:
    """The torch engine at batch 1 and 3 (paper protocol: the whole batch's statistics); the onnxruntime
    engine once (its exports are checked against PyTorch in test_export)."""
    G = generator(netG, norm)
    before = copy.deepcopy(G.state_dict())
    names = ["torch", "onnxruntime"] if (netG, eval_mode) == ("unet_128", True) else ["torch"]
    for name in names:
        engine = engines.build_engine(G, name, eval_mode=eval_mode, device=CPU, batch_size=3)
        for batch in (1, 3):
            x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
            with torch.no_grad():
                diff = float((engine(x) - reference(G, x, eval_mode)).abs().max())
            assert diff <= TOLERANCE, f"{name} {'eval' if eval_mode else 'paper'} batch {batch}: {diff:.3g}"
    torch.testing.assert_close(G.state_dict(), before, rtol=0, atol=0)  # no running-statistics update


def test_torch_engine_uses_onednn_blocks_and_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    G = generator("unet_128", "batch")
    x = torch.randn(1, 3, 128, 128)
    net = engines.torch_network(G, True, CPU)
    blocks = [m for m in net.modules() if isinstance(m, engines.OneDnnBlock)]
    assert blocks and all(block.norm == "none" for block in blocks)  # eval: every BatchNorm folded
    assert [
        m.norm for m in engines.torch_network(G, False, CPU).modules() if isinstance(m, engines.OneDnnBlock)
    ].count("batch") == sum(isinstance(m, nn.BatchNorm2d) for m in G.modules())
    monkeypatch.setattr(engines, "onednn_available", lambda device: False)
    assert not any(isinstance(m, engines.OneDnnBlock) for m in engines.torch_network(G, True, CPU).modules())
    for eval_mode in (True, False):
        engine = engines.build_engine(G, "torch", eval_mode=eval_mode, device=CPU)
        with torch.no_grad():
            assert float((engine(x) - reference(G, x, eval_mode)).abs().max()) <= TOLERANCE


def test_onednn_block_packs_per_shape_and_keeps_a_few() -> None:
    net = engines.torch_network(generator("resnet_9blocks", "instance"), True, CPU)
    block = next(m for m in net.modules() if isinstance(m, engines.OneDnnBlock))
    with torch.no_grad():
        for side in (8, 12, 16, 20, 24, 8):
            net(torch.randn(1, 3, side, side).contiguous(memory_format=torch.channels_last))
    # The stem's input is reflect-padded by 3: sides 14 ... 30; the oldest dropped, 8 (14) re-packed.
    assert [shape[-1] for shape in block._packed] == [22, 26, 30, 14]


def test_onnxruntime_engine_paper_protocol_needs_batch_1(trained: tuple[Path, Path], tmp_path: Path) -> None:
    data, checkpoints = trained
    opt = TestOptions(
        dataroot=str(data), name="tiny", checkpoints_dir=str(checkpoints), results_dir=str(tmp_path),
        device="cpu", engine="onnxruntime", batch_size=2,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"--engine onnxruntime: --protocol paper exports batch 1 only"):
        run_test(opt)
    result = run_test(TestOptions(**{**opt.__dict__, "eval": True}))  # eval: any batch
    assert result.images == 3
    assert json.loads((result.folder / "metrics.json").read_text())["engine"] == "onnxruntime"


def _predict(checkpoints: Path, source: Path, out: Path, **options: object) -> dict[str, np.ndarray]:
    paths = predict(
        PredictOptions(input=str(source), output=str(out), name="tiny", checkpoints_dir=str(checkpoints),
                       device="cpu", **options)  # type: ignore[arg-type]
    )  # fmt: skip
    return {p.name: read_image(p) for p in paths}


def test_predict_engines_and_batches_give_the_same_images(
    trained: tuple[Path, Path], images: Path, tmp_path: Path
) -> None:
    """Batches of consecutive same-size images (3, then 1 + 1 around the odd size) through either engine
    give the images of the plain reference generator, one by one."""
    checkpoints = trained[1]
    expected = _predict(checkpoints, images, tmp_path / "plain", eval=True, backend="reference")
    assert {k: v.shape for k, v in expected.items()} == {
        "a.png": (32, 32, 3), "b.png": (32, 32, 3), "c.png": (32, 32, 3), "d.png": (45, 37, 3),
        "e.png": (32, 32, 3),
    }  # fmt: skip
    got = {"torch": _predict(checkpoints, images, tmp_path / "torch", eval=True, batch_size=3)}
    args = [
        "predict", "--name", "tiny", "--checkpoints_dir", str(checkpoints), "--input", str(images),
        "--output", str(tmp_path / "ort"), "--device", "cpu", "--eval", "--engine", "onnxruntime",
        "--batch_size", "3",
    ]  # fmt: skip
    assert main(args) == 0
    got["onnxruntime"] = {name: read_image(tmp_path / "ort" / name) for name in expected}
    for engine, outputs in got.items():
        for name, image in expected.items():
            assert np.abs(outputs[name].astype(int) - image).max() <= 1, f"{engine}: {name}"


# --- fastpix2pix.deploy ---------------------------------------------------------------------------


def test_padding_and_scaling_match_predict() -> None:
    rng = np.random.default_rng(0)
    for shape, multiple, min_size in (((5, 7), 4, 0), ((5, 7), 32, 0), ((1, 6), 8, 0), ((3, 9), 4, 8)):
        x = rng.standard_normal((2, 3, *shape)).astype(np.float32)
        ours, size = deploy.pad_to_multiple(x, multiple, min_size)
        theirs, _ = pad_to_multiple(torch.from_numpy(x), multiple, min_size)
        assert size == shape and np.array_equal(ours, theirs.numpy())
    assert ours.shape[-2:] == (8, 12)  # a ResNet's smallest side is 8 (two multiples of 4)
    for dtype, top in ((np.uint8, 255), (np.uint16, 65535)):
        image = rng.integers(0, top, (6, 5, 3)).astype(dtype)
        assert np.array_equal(deploy.preprocess(image), to_tensor(image).numpy())  # bit for bit
    y = rng.uniform(-1.2, 1.2, (3, 6, 5)).astype(np.float32)
    assert np.array_equal(deploy.postprocess(y), tensor_to_image(torch.from_numpy(y)))


def test_deploy_script_runs_an_export_without_torch(
    trained: tuple[Path, Path], images: Path, tmp_path: Path
) -> None:
    """deploy.py copied out of the package: ONNX Runtime + numpy + Pillow only; the image is predict's."""
    checkpoints = trained[1]
    model = tmp_path / "tiny.onnx"
    assert (
        main(["export", "--name", "tiny", "--checkpoints_dir", str(checkpoints), "--output", str(model)]) == 0
    )
    script = tmp_path / "deploy.py"
    script.write_text(Path(deploy.__file__).read_text())
    out = tmp_path / "out.png"
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['deploy.py', {str(model)!r}, {str(images / 'd.png')!r}, '-o', {str(out)!r}]\n"
        "try:\n"
        f"    runpy.run_path({str(script)!r}, run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'fastpix2pix')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"  # neither torch nor fastpix2pix was imported
    expected = _predict(checkpoints, images / "d.png", tmp_path / "d.png", eval=True)
    assert np.abs(read_image(out).astype(int) - expected["d.png"]).max() <= 1
    assert deploy.read_metadata(model)["protocol"] == "eval"
