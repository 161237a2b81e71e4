"""Tests of ``--precision auto|fp32|bf16``: the CPU's bf16 support, the auto rule, the bf16 engine.

They run on every CPU: bf16 is native where the CPU has AMX or AVX512-BF16 and emulated elsewhere (by oneDNN,
or by the blocks themselves where torch's oneDNN refuses bf16), and the emulation path is also forced
here. Every value a test asserts is computed with the precision pinned (``fp32`` or ``bf16``, never
``auto``), and the auto rule is tested with the capability check monkeypatched both ways, so that no
result depends on which CPU runs the tests.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_models import _randomise
from torch import nn

from fastpix2pix import runtime
from fastpix2pix.cli import build_main_parser, main
from fastpix2pix.commands import info
from fastpix2pix.data import read_image, shared_facades_root, to_tensor
from fastpix2pix.inference import engines, load_engine, translate_image
from fastpix2pix.inference.run import predict, run_test
from fastpix2pix.models import define_G
from fastpix2pix.runs.options import PredictOptions, TestOptions
from fastpix2pix.serve.app import ServeOptions

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
BF16_PSNR_DB = 50.0  # the floor for bf16 output against the float32 engine on real inputs (images in [0, 1])
# Randomised unit-gain weights (every layer's error visible; outputs far from tanh's flat ends) lose more to
# bf16's 8-bit mantissa: 43-58 dB here (the ResNets' 18 residual convolutions the least). One wrong bias,
# statistic or activation in one block of unet_128 gives 28-38 dB.
BF16_SYNTHETIC_PSNR_DB = 40.0
FACADES = shared_facades_root()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB between two generator outputs in [-1, 1], as images in [0, 1]."""
    mse = float((((a.float() - b.float()) / 2) ** 2).mean())
    return float("inf") if mse == 0 else 10 * float(np.log10(1 / mse))


def generator(netG: str, norm: str, seed: int = 0, ngf: int = 8) -> nn.Module:
    """Random weights and BN affine; running statistics from two random batches (as a trained net's)."""
    G = define_G(netG, ngf=ngf, norm=norm, use_dropout=False)
    _randomise(G, seed)
    for bn in (m for m in G.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.reset_running_stats()
        bn.momentum = None
    with torch.no_grad():
        side = max(G.size_multiple, 32)
        G.train()(torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(seed)))
    return G


# --- the CPU's bf16 and the auto rule -------------------------------------------------------------


@pytest.mark.parametrize(
    ("caps", "amx_usable", "expected"),
    [
        ({"amx_bf16": True, "amx_tile": True, "avx512_bf16": True}, True, "amx"),
        ({"amx_bf16": True, "amx_tile": True, "avx512_bf16": True}, False, "avx512_bf16"),  # OS refuses
        ({"amx_bf16": False, "amx_tile": False, "avx512_bf16": True}, True, "avx512_bf16"),
        ({"avx2": True}, True, None),
        ({}, True, None),
    ],
)
def test_cpu_bf16_support_reads_the_capabilities(
    monkeypatch: pytest.MonkeyPatch, caps: dict[str, bool], amx_usable: bool, expected: str | None
) -> None:
    monkeypatch.setattr(runtime, "_cpu_capabilities", lambda: caps)
    monkeypatch.setattr(runtime, "_amx_usable", lambda: amx_usable)
    assert runtime.cpu_bf16_support() == expected


def test_this_cpu_is_described() -> None:
    support = runtime.cpu_bf16_support()
    assert support in ("amx", "avx512_bf16", None) and runtime.cpu_vendor() in ("intel", "amd", "")
    assert runtime.BF16_KINDS[support] in ("native (AMX)", "native (AVX512-BF16)", "emulated")


@pytest.mark.cpu_precision_rule
def test_bf16_is_faster_with_amx_and_on_amd_avx512_bf16_only() -> None:
    rule = runtime.bf16_faster_than_fp32
    assert rule("amx", "intel") and rule("amx", "") and rule("avx512_bf16", "amd")
    assert not rule("avx512_bf16", "intel") and not rule("avx512_bf16", "") and not rule(None, "amd")


@pytest.mark.cpu_precision_rule
@pytest.mark.parametrize(
    ("support", "vendor", "expected"),
    [("amx", "intel", "bf16"), ("avx512_bf16", "amd", "bf16"), ("avx512_bf16", "intel", "fp32"),
     (None, "intel", "fp32"), (None, "amd", "fp32")],
)  # fmt: skip
def test_auto_follows_the_capability_check(
    monkeypatch: pytest.MonkeyPatch, support: str | None, vendor: str, expected: str
) -> None:
    monkeypatch.setattr(runtime, "cpu_bf16_support", lambda: support)
    monkeypatch.setattr(runtime, "cpu_vendor", lambda: vendor)
    monkeypatch.setattr(engines, "cpu_bf16_support", lambda: support)
    chosen = engines.resolve_precision("auto", "torch", CPU)
    assert chosen.name == expected and chosen.reason.startswith("auto: ")
    # fp32 and bf16 are what they say, whatever the CPU (bf16 is emulated where it is not native)
    assert engines.resolve_precision("fp32", "torch", CPU).name == "fp32"
    assert engines.resolve_precision("bf16", "torch", CPU).name == "bf16"
    assert "emulated" in engines.resolve_precision("bf16", "torch", CPU).reason or support is not None


@pytest.mark.cpu_precision_rule
def test_auto_is_float32_where_bf16_is_not_the_torch_engine_on_onednn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(runtime, "cpu_bf16_support", lambda: "amx")
    assert engines.resolve_precision("auto", "torch", CPU).name == "bf16"
    assert engines.resolve_precision("auto", "onnxruntime", CPU).name == "fp32"
    with pytest.raises(ValueError, match="needs --engine torch"):
        engines.resolve_precision("bf16", "onnxruntime", CPU)
    assert engines.resolve_precision("auto", "torch", CPU, torch.float64).name == "fp32"
    with pytest.raises(ValueError, match="float64 generator"):
        engines.resolve_precision("bf16", "torch", CPU, torch.float64)
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        engines.resolve_precision("fp16", "torch", CPU)
    monkeypatch.setattr(engines, "onednn_available", lambda device: False)  # CUDA, or no mkldnn
    assert engines.resolve_precision("auto", "torch", CPU).name == "fp32"
    with pytest.raises(ValueError, match="oneDNN"):
        engines.resolve_precision("bf16", "torch", CPU)
    with pytest.raises(ValueError, match="oneDNN"):
        engines.build_engine(
            generator("unet_128", "batch"), "torch", eval_mode=True, device=CPU, precision="bf16"
        )


def test_python_defaults_are_fp32_and_the_command_line_defaults_to_auto() -> None:
    """A script's values never depend on the CPU; the commands take what is fastest on it."""
    assert TestOptions().precision == PredictOptions().precision == ServeOptions().precision == "fp32"
    G = generator("unet_128", "batch")
    assert engines.build_engine(G, "torch", eval_mode=True, device=CPU).precision.name == "fp32"
    parser = build_main_parser()
    for command in (["test"], ["predict"], ["serve"]):
        assert parser.parse_args(command).precision == "auto"
        assert parser.parse_args([*command, "--precision", "bf16"]).precision == "bf16"
    with pytest.raises(SystemExit):
        parser.parse_args(["predict", "--precision", "fp16"])


@pytest.mark.cpu_precision_rule
def test_info_says_what_this_cpus_bf16_is(monkeypatch: pytest.MonkeyPatch) -> None:
    for support, kind, auto in (("amx", "native (AMX)", "bf16"), (None, "emulated", "fp32")):
        monkeypatch.setattr(runtime, "_cpu_capabilities", lambda s=support: {"amx_bf16": s, "amx_tile": s})
        monkeypatch.setattr(runtime, "_amx_usable", lambda: True)
        monkeypatch.setattr(engines, "cpu_bf16_support", runtime.cpu_bf16_support)
        report = info.collect()
        cpu = report["devices"][0]
        assert (cpu["bf16"], cpu["bf16_support"], cpu["precision_auto"]) == (kind, support, auto)
        assert f"bf16: {kind}; --precision auto: {auto} (" in info.format_report(report)


# --- the bf16 engine ------------------------------------------------------------------------------


def _engine_outputs(
    G: nn.Module, eval_mode: bool, batches: tuple[int, ...], size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    fp32 = engines.build_engine(G, "torch", eval_mode=eval_mode, device=CPU, precision="fp32")
    bf16 = engines.build_engine(G, "torch", eval_mode=eval_mode, device=CPU, precision="bf16")
    assert (fp32.precision.name, bf16.precision.name) == ("fp32", "bf16")
    pairs = []
    with torch.no_grad():
        for batch in batches:
            x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(batch)) * 2 - 1
            pairs.append((bf16(x), fp32(x)))
    return pairs


@pytest.mark.parametrize("emulated", [False, True], ids=["onednn", "emulated"])
@pytest.mark.parametrize(
    ("netG", "norm", "size"), [("unet_128", "batch", 128), ("resnet_9blocks", "instance", 32)]
)
@pytest.mark.parametrize("eval_mode", [True, False], ids=["eval", "paper"])
def test_bf16_engine_is_the_float32_engine_within_bf16_rounding(
    monkeypatch: pytest.MonkeyPatch, netG: str, norm: str, size: int, eval_mode: bool, emulated: bool
) -> None:
    """Batch 1 and 3 (the paper protocol: the whole batch's statistics), against the float32 engine."""
    if emulated:  # the blocks' own emulation, as on a CPU where torch's oneDNN refuses bf16
        monkeypatch.setattr(engines, "onednn_takes_bf16", lambda: False)
    G = generator(netG, norm)
    before = copy.deepcopy(G.state_dict())
    for (ours, theirs), batch in zip(_engine_outputs(G, eval_mode, (1, 3), size), (1, 3), strict=True):
        assert ours.dtype == torch.float32 and ours.shape == theirs.shape
        quality = psnr(ours, theirs)
        assert BF16_SYNTHETIC_PSNR_DB <= quality < 120, f"batch {batch}: {quality:.1f} dB"  # not float32
    torch.testing.assert_close(G.state_dict(), before, rtol=0, atol=0)  # G itself untouched


def test_bf16_blocks_compute_in_bf16_with_float32_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    G = generator("unet_128", "batch")
    for native in (True, False):
        monkeypatch.setattr(engines, "onednn_takes_bf16", lambda native=native: native)
        blocks = [
            m
            for m in engines.torch_network(G, True, CPU, "bf16").modules()
            if isinstance(m, engines.OneDnnBlock)
        ]
        first, *middle, last = blocks
        assert (first.compute_dtype, first.output_dtype) == (torch.float32, torch.bfloat16)  # the image in
        assert (last.compute_dtype, last.output_dtype) == (torch.float32, torch.float32)  # the image out
        compute = torch.bfloat16 if native else torch.float32
        for block in middle:
            assert (block.compute_dtype, block.output_dtype) == (compute, torch.bfloat16)
            assert block.weight.dtype == compute
            assert block.bias is None or block.bias.dtype == torch.float32
            # the weights hold bf16 values, emulated or not
            assert torch.equal(block.weight.float(), block.weight.to(torch.bfloat16).float())
        everything = engines.torch_network(G, True, CPU, "bf16", float32_ends=False)
        assert all(
            m.output_dtype == torch.bfloat16
            for m in everything.modules()
            if isinstance(m, engines.OneDnnBlock)
        )


def test_bf16_on_real_facades_is_within_the_issue_floor() -> None:
    """unet_256 at ngf 64 (the official initialisation, running statistics from facades photos'
    labels), 256 px facades label maps: the bf16 engine is >= 50 dB from the float32 engine."""
    if FACADES is None or not (FACADES / "test").is_dir():
        pytest.skip("no facades data in ../shared/data/facades (or $FASTPIX2PIX_FACADES)")
    test_dir = FACADES / "test"
    images = sorted(test_dir.glob("*.jpg"))[:6]
    halves = []
    for path in images:
        image = read_image(path)
        halves.append(to_tensor(np.ascontiguousarray(image[:, image.shape[1] // 2 :])))  # the label map
    x = torch.stack(halves)
    G = define_G("unet_256", use_dropout=False)  # official initialisation: normal(0, 0.02)
    for bn in (m for m in G.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.momentum = None
    with torch.no_grad():
        G.train()(x[:2]), G.train()(x[2:4])  # running statistics as a trained network's: from the data
    with torch.no_grad():
        for eval_mode, batch in ((True, x[2:]), (False, x[:1])):
            fp32 = engines.build_engine(G, "torch", eval_mode=eval_mode, device=CPU, precision="fp32")
            bf16 = engines.build_engine(G, "torch", eval_mode=eval_mode, device=CPU, precision="bf16")
            quality = psnr(bf16(batch), fp32(batch))
            assert quality >= BF16_PSNR_DB, f"{'eval' if eval_mode else 'paper'}: {quality:.1f} dB"


# --- the commands and the Python API ----------------------------------------------------------------


def test_test_and_predict_say_and_record_the_precision(trained: tuple[Path, Path], tmp_path: Path) -> None:
    data, checkpoints = trained
    lines: list[str] = []
    opt = TestOptions(
        dataroot=str(data), name="tiny", checkpoints_dir=str(checkpoints), results_dir=str(tmp_path),
        device="cpu", eval=True, precision="bf16",
    )  # fmt: skip
    result = run_test(opt, say=lines.append)
    assert lines[0].startswith("test: ") and "engine torch, precision bf16 (--precision bf16;" in lines[0]
    metrics = json.loads((result.folder / "metrics.json").read_text())
    assert metrics["precision"] == "bf16" and "engine torch, bf16" in lines[-1]
    source = data / "test" / "0001.png"
    outputs = {}
    for precision in ("fp32", "bf16"):
        lines.clear()
        (out,) = predict(
            PredictOptions(input=str(source), output=str(tmp_path / f"{precision}.png"), name="tiny",
                           checkpoints_dir=str(checkpoints), device="cpu", eval=True, precision=precision),
            say=lines.append,
        )  # fmt: skip
        assert f"precision {precision} (--precision {precision}" in lines[0]
        outputs[precision] = read_image(out).astype(int)
    assert np.abs(outputs["bf16"] - outputs["fp32"]).max() <= 3  # uint8 levels


def test_command_line_precision(
    trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data, checkpoints = trained
    args = ["predict", "--name", "tiny", "--checkpoints_dir", str(checkpoints), "--device", "cpu", "--eval",
            "--input", str(data / "test" / "0001.png"), "--output", str(tmp_path / "out.png")]  # fmt: skip
    assert main(args) == 0
    first = capsys.readouterr().out.splitlines()[0]
    expected = engines.resolve_precision("auto", "torch", CPU)
    assert first.endswith(f"engine torch, precision {expected}")  # auto, decided for this CPU, and why
    assert main([*args, "--engine", "onnxruntime", "--precision", "bf16"]) == 1
    assert "needs --engine torch" in capsys.readouterr().err


def test_load_engine_translates_as_predict_does(trained: tuple[Path, Path], tmp_path: Path) -> None:
    data, checkpoints = trained
    source = data / "test" / "0002.png"
    labels = read_image(source)[:29, :27]  # an odd size: padded and cropped back
    crop = tmp_path / "crop.png"
    Image.fromarray(labels).save(crop)
    for precision in ("fp32", "bf16"):
        engine = load_engine(checkpoints / "tiny", device="cpu", eval_mode=True, precision=precision)
        assert engine.precision.name == precision and engine.input_nc == 3
        (out,) = predict(
            PredictOptions(input=str(crop), output=str(tmp_path / f"{precision}.png"), name="tiny",
                           checkpoints_dir=str(checkpoints), device="cpu", eval=True, precision=precision),
            say=lambda _: None,
        )  # fmt: skip
        np.testing.assert_array_equal(translate_image(engine, labels), read_image(out))  # the same engine
