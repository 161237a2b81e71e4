"""Tests of ``fastpix2pix export``: exported files compute what the PyTorch generator computes.

Networks get random weights and BatchNorm statistics far from the identity (``_randomise`` of
test_models), so that a wrong fold, a swapped axis or a lost bias shows. Widths are reduced where the
architecture allows (the function does not depend on them); unet_256 runs at 256x256, its smallest size.
"""

from __future__ import annotations

import collections
import copy
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from test_models import _randomise  # noqa: E402

from benchmarks.official_networks import official_G  # noqa: E402
from fastpix2pix.cli import main  # noqa: E402
from fastpix2pix.data import read_image, shared_facades_root, split_ab, to_tensor  # noqa: E402
from fastpix2pix.deploy import OnnxRunner, TorchExportRunner, read_metadata  # noqa: E402
from fastpix2pix.inference.deploy_net import deploy_network, fold_batch_norm  # noqa: E402
from fastpix2pix.inference.export import export_generator, exported_program, onnx_model_bytes  # noqa: E402
from fastpix2pix.models import define_G  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

REF = "reference"
TOLERANCE = 1e-4  # the bound: exported vs PyTorch, max abs

# (netG, norm, ngf, size): the architectures of the issue, each at a size it takes.
CASES = [
    ("unet_256", "batch", 16, 256),
    ("unet_128", "batch", 16, 128),
    ("resnet_9blocks", "batch", 16, 64),
    ("resnet_9blocks", "instance", 16, 64),
]


def generator(netG: str, norm: str = "batch", ngf: int = 16, seed: int = 0) -> nn.Module:
    """Random weights (``_randomise``: He-scaled, BatchNorm affine away from the identity) with running
    statistics estimated on random inputs, as a trained network's match its activations. (With random
    statistics, a ResNet's residual stream reaches |x| ~ 500 in eval mode, where float32 itself is off by
    3e-4 against float64: a test of float32, not of the export.)"""
    G = define_G(netG, ngf=ngf, norm=norm, backend=REF)
    _randomise(G, seed)
    calibrate_running_statistics(G, seed)
    return G


def calibrate_running_statistics(G: nn.Module, seed: int = 0, batches: int = 2) -> None:
    batch_norms = [m for m in G.modules() if isinstance(m, nn.BatchNorm2d)]
    size = max(G.size_multiple, 32)  # a size every generator here takes
    for bn in batch_norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration batches
    G.train()
    dropout, G.use_dropout = G.use_dropout, False
    with torch.no_grad():
        for i in range(batches):
            G(random_input(2, size, seed=100 + seed * batches + i))
    G.use_dropout = dropout
    for bn in batch_norms:
        bn.momentum = 0.1


def pytorch_output(G: nn.Module, x: torch.Tensor, protocol: str) -> torch.Tensor:
    """What the fastpix2pix generator computes under ``protocol``, dropout off, on a copy (train mode
    updates running statistics)."""
    G = copy.deepcopy(G)
    G.use_dropout = False
    with torch.no_grad():
        return (G.eval() if protocol == "eval" else G.train())(x)


def max_diff(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    return float((torch.as_tensor(a) - torch.as_tensor(b)).abs().max())


def random_input(batch: int, size: int, height: int | None = None, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, height or size, size, generator=torch.Generator().manual_seed(seed))


def facade_labels(size: int = 256) -> torch.Tensor | None:
    """The label map (B side: labels -> photo is BtoA) of facades test/1.jpg, as a 1x3xHxW batch."""
    root = shared_facades_root()
    if root is None:
        return None
    path = root / "test" / "1.jpg"
    _, labels = split_ab(read_image(path), path)
    assert labels.shape[:2] == (size, size)
    return to_tensor(labels).unsqueeze(0)


# --- the network that is exported ---------------------------------------------------------------------


@pytest.mark.parametrize("transposed", [False, True])
def test_fold_batch_norm_matches_conv_then_batch_norm(transposed: bool) -> None:
    conv_type = nn.ConvTranspose2d if transposed else nn.Conv2d
    # More input than output channels for the transposed conv, so an axis mix-up cannot pass by shape.
    conv = conv_type(6, 4, 4, 2, 1, bias=False).double()
    bn = nn.BatchNorm2d(4).double().eval()
    _randomise(nn.Sequential(conv, bn))
    x = torch.randn(2, 6, 8, 8, dtype=torch.float64)
    folded = fold_batch_norm(conv, bn)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), bn(conv(x)), rtol=1e-12, atol=1e-12)
    assert conv.bias is None and folded.bias is not None  # the original is not modified


@pytest.mark.parametrize(("netG", "norm", "ngf", "size"), CASES)
def test_deploy_network_matches_the_generator(netG: str, norm: str, ngf: int, size: int) -> None:
    """Folded BN (eval) and instance norm with BN's affine (paper, batch 1) against the unfolded network."""
    G = generator(netG, norm, ngf).double()
    x = random_input(1, size).double()
    for protocol in ("eval", "paper"):
        net = deploy_network(G, protocol).double()
        with torch.no_grad():
            torch.testing.assert_close(net(x), pytorch_output(G, x, protocol), rtol=1e-9, atol=1e-9)
    if norm == "batch":
        with torch.no_grad():  # eval and paper differ: the running statistics are not the batch's
            assert max_diff(deploy_network(G, "eval")(x), deploy_network(G, "paper")(x)) > 0.1
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deploy_network(G, "eval").modules())


def test_deploy_network_leaves_the_generator_alone() -> None:
    G = generator("unet_128")
    before = copy.deepcopy(G.state_dict())
    G.train()
    net = deploy_network(G, "paper")
    with torch.no_grad():
        net(random_input(1, 128))
    torch.testing.assert_close(G.state_dict(), before, rtol=0, atol=0)  # no running-statistics update
    assert G.training and not net.training and net.use_dropout is False


# --- ONNX and torch.export against PyTorch --------------------------------------------------------


MATRIX = [(*case, protocol) for case in CASES for protocol in ("eval", "paper") if case[1] == "batch"] + [
    (*case, "eval")
    for case in CASES
    if case[1] == "instance"  # no BatchNorm: both protocols are one
]


@pytest.mark.parametrize(("netG", "norm", "ngf", "size", "protocol"), MATRIX)
def test_onnx_and_torch_export_match_pytorch(
    tmp_path: Path, netG: str, norm: str, ngf: int, size: int, protocol: str
) -> None:
    """ONNX Runtime and a saved-and-loaded torch.export program against the generator, at its smallest
    size and (a batch of 2 where the protocol allows) a taller one: batch, height and width are dynamic.
    One traced program feeds both formats, as in :func:`export_generator`."""
    G = generator(netG, norm, ngf)
    dynamic_batch = protocol == "eval" or norm == "instance"
    net = deploy_network(G, protocol)
    program = exported_program(net, dynamic_batch)
    model = onnx.load_from_string(onnx_model_bytes(net, dynamic_batch, program=program))
    torch.export.save(program, tmp_path / "G.pt2")
    runners = {
        "onnx": OnnxRunner(model.SerializeToString()),
        "torch.export": TorchExportRunner(tmp_path / "G.pt2"),
    }
    inputs = [random_input(1, size), random_input(2 if dynamic_batch else 1, size, height=2 * size, seed=2)]
    for x in inputs:
        expected = pytorch_output(G, x, protocol)
        for name, runner in runners.items():
            diff = max_diff(runner.run(x.numpy()), expected)
            assert diff <= TOLERANCE, f"{name} {protocol}: {diff:.3g} on {tuple(x.shape)}"
    # Plain ONNX ops: eval has no normalisation left (folded), paper one InstanceNormalization per BN.
    ops = collections.Counter(node.op_type for node in model.graph.node)
    norms = sum(isinstance(m, nn.BatchNorm2d | nn.InstanceNorm2d) for m in G.modules())
    assert "BatchNormalization" not in ops and all(
        node.domain in ("", "ai.onnx") for node in model.graph.node
    )
    assert ops["InstanceNormalization"] == (norms if protocol == "paper" or norm == "instance" else 0)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[1].dim_value == 3 and dims[2].dim_param and dims[3].dim_param
    assert bool(dims[0].dim_param) == dynamic_batch


def test_real_facades_both_protocols(tmp_path: Path) -> None:
    """unet_256 on a real label map: the written ONNX file in ONNX Runtime vs PyTorch. (ngf 16: the
    function does not depend on the width; a full-width export took 12 s here, the test would double.)"""
    x = facade_labels()
    if x is None:
        pytest.skip("no facades data in ../shared/data/facades (or $FASTPIX2PIX_FACADES)")
    G = generator("unet_256", ngf=16)
    for protocol in ("eval", "paper"):
        path = tmp_path / f"{protocol}.onnx"
        export_generator(G, path, protocol=protocol, verify=False)
        diff = max_diff(OnnxRunner(path).run(x.numpy()), pytorch_output(G, x, protocol))
        assert diff <= TOLERANCE, f"{protocol}: {diff:.3g}"


# --- the command and official checkpoints -------------------------------------------------------------


@pytest.fixture(scope="module")
def official_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    """An official-structure unet_128 (ngf 8, with its Dropout layers) saved as ``latest_net_G.pth``."""
    official = official_G("unet_128", 8, "batch", dropout=True)
    _randomise(official)
    path = tmp_path_factory.mktemp("official") / "latest_net_G.pth"
    torch.save(official.state_dict(), path)
    return path, official


OFFICIAL_ARGS = ["--netG", "unet_128", "--ngf", "8"]


@pytest.mark.parametrize("protocol", ["eval", "paper"])
def test_exported_official_checkpoint_matches_the_official_network(
    official_file: tuple[Path, nn.Module], tmp_path: Path, protocol: str
) -> None:
    path, official = official_file
    out = tmp_path / "G.onnx"
    args = [
        "export",
        "--load_official",
        str(path),
        *OFFICIAL_ARGS,
        "--protocol",
        protocol,
        "--output",
        str(out),
    ]
    assert main(args) == 0
    official = copy.deepcopy(official).train(protocol == "paper")
    for module in official.modules():  # the export has no dropout by default
        if isinstance(module, nn.Dropout):
            module.eval()
    x = random_input(1, 128)
    with torch.no_grad():
        expected = official(x)
    assert max_diff(OnnxRunner(out).run(x.numpy()), expected) <= TOLERANCE
    meta = read_metadata(out)
    assert meta["protocol"] == protocol and meta["dropout"] is False and meta["source"] == str(path)
    assert meta["input"]["batch"] == ("dynamic" if protocol == "eval" else 1)
    assert meta["input"]["size_multiple"] == 128 and meta["output"]["range"] == [-1.0, 1.0]


def test_default_output_path_and_metadata(official_file: tuple[Path, nn.Module], tmp_path: Path) -> None:
    path, _ = official_file
    assert main(["export", "--load_official", str(path), *OFFICIAL_ARGS, "--format", "torch-export"]) == 0
    written = path.with_name("latest_net_G_eval.pt2")
    meta = read_metadata(written)
    assert meta["format"] == "torch-export" and meta["netG"] == "unet_128" and meta["input"]["channels"] == 3
    assert "reflect" in meta["input"]["padding"] and "clamp" in meta["output"]["postprocess"]
    written.unlink()


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_errors_write_nothing(
    official_file: tuple[Path, nn.Module], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = official_file
    out = tmp_path / "out"
    out.mkdir()
    target = ["--output", str(out / "G.onnx")]

    def fails(*args: str) -> str:
        assert main(["export", *args, *target]) == 1
        assert _files(out) == []  # not even a temporary file
        return capsys.readouterr().err

    err = fails("--load_official", str(path), *OFFICIAL_ARGS, "--protocol", "paper", "--batch_size", "2")
    assert "--protocol paper exports batch 1 only" in err
    assert "cannot take 100x100" in fails("--load_official", str(path), *OFFICIAL_ARGS, "--size", "100")
    discriminator = tmp_path / "latest_net_D.pth"
    torch.save({"model.0.weight": torch.zeros(8, 6, 4, 4), "model.0.bias": torch.zeros(8)}, discriminator)
    assert "is not a unet_128 generator checkpoint" in fails(
        "--load_official", str(discriminator), *OFFICIAL_ARGS
    )
    garbage = tmp_path / "garbage_net_G.pth"
    garbage.write_bytes(b"not a checkpoint")
    assert "torch.load cannot read it" in fails("--load_official", str(garbage), *OFFICIAL_ARGS)
    assert "not a unet_256 generator" in fails(
        "--load_official", str(path), "--netG", "unet_256", "--ngf", "8"
    )
    with pytest.raises(SystemExit):  # argparse: "invalid choice: 'tflite'"
        main(["export", "--load_official", str(path), "--format", "tflite", *target])
    assert "invalid choice: 'tflite'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown export format 'tflite'"):
        export_generator(generator("unet_128", ngf=8), out / "G.tflite", fmt="tflite")
    assert _files(out) == []


def test_a_file_that_fails_its_check_is_not_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fastpix2pix.inference.export

    monkeypatch.setattr(fastpix2pix.inference.export, "VERIFY_TOLERANCE", -1.0)  # every file "differs"
    with pytest.raises(ValueError, match=r"differs from PyTorch by .* nothing written"):
        export_generator(generator("unet_128", ngf=8), tmp_path / "G.pt2", fmt="torch-export")
    assert _files(tmp_path) == []


def test_sizes_the_export_refuses_at_run_time(tmp_path: Path) -> None:
    G = generator("unet_128", ngf=8)
    pt2 = tmp_path / "G.pt2"
    export_generator(G, pt2, fmt="torch-export", protocol="paper")
    runner = TorchExportRunner(pt2)
    with pytest.raises(Exception, match="Guard failed"):  # 192 is not a multiple of 128
        runner.run(random_input(1, 192).numpy())
    with pytest.raises(Exception, match="Guard failed"):  # paper protocol: batch 1 only
        runner.run(random_input(2, 128).numpy())


# --- dropout ------------------------------------------------------------------------------------------


def test_dropout_export_is_stochastic_where_the_generator_has_dropout(tmp_path: Path) -> None:
    """--dropout: ONNX (explicit masks, which ONNX Runtime cannot optimise away) and torch.export both
    draw new masks per run; each mask keeps half of the values, scaled by 2 (p = 0.5); a seeded ONNX
    export draws the same sequence of masks in every session."""
    G = generator("unet_128", ngf=8)  # unet_128 has dropout on 2 decoder levels
    x = random_input(1, 128).numpy()
    model = onnx.load_from_string(
        onnx_model_bytes(deploy_network(G, "eval", dropout=True), True, dropout_seed=3)
    )
    masks = [node for node in model.graph.node if node.op_type == "RandomUniformLike"]
    assert len(masks) == 2 and not any(node.op_type == "Dropout" for node in model.graph.node)
    # Expose the first dropout's input and output to check the mask values.
    first = next(node for node in model.graph.node if re.fullmatch(r"fastpix2pix_dropout_\d+", node.name))
    outputs = [first.output[0], masks[0].input[0]]
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in outputs)
    sessions = [OnnxRunner(model.SerializeToString()).session for _ in range(2)]
    runs = [[session.run(None, {"real_A": x}) for _ in range(2)] for session in sessions]
    (y1, dropped, before), (y2, _, _) = runs[0]
    assert max_diff(y1, y2) > 0.01  # a new mask every run
    kept = dropped != 0
    assert 0.4 < kept[before != 0].mean() < 0.6
    np.testing.assert_allclose(dropped[kept], 2 * before[kept], rtol=1e-6)
    assert all(max_diff(a[0], b[0]) == 0 for a, b in zip(runs[0], runs[1], strict=True))  # seeded

    pt2 = tmp_path / "G.pt2"
    result = export_generator(G, pt2, fmt="torch-export", protocol="paper", dropout=True)
    assert result.metadata["dropout"] is True and result.max_abs_diff is None  # stochastic: not compared
    runner = TorchExportRunner(pt2)
    assert max_diff(runner.run(x), runner.run(x)) > 0.01


def test_custom_ops_never_reach_the_graph() -> None:
    """The fused backend's generator exports to plain aten ops (the same graph as the reference's)."""
    import fastpix2pix.ops.backend

    if not fastpix2pix.ops.backend.extension_available():
        pytest.skip("compiled extension not built")
    fused = define_G("unet_128", ngf=8, backend="fused")
    fused.load_state_dict(generator("unet_128", ngf=8).state_dict())
    for protocol in ("eval", "paper"):
        program = exported_program(deploy_network(fused, protocol), protocol == "eval")
        targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
        assert targets and all(target.startswith("aten.") for target in targets), targets
