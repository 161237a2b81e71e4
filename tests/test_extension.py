"""Loading the compiled library: the build record, a missing library, a library built for another torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import fastpix2pix
from fastpix2pix import _extension
from fastpix2pix.commands import info


def test_build_record_describes_the_loaded_library() -> None:
    if not fastpix2pix.extension_available():
        pytest.skip("compiled extension not built")
    record = fastpix2pix.BUILD_INFO
    assert record["torch"] == torch.__version__
    assert record["cuda"] == fastpix2pix.cuda_kernels_available()
    if record["cuda"]:
        assert record["cuda_arch_list"] and record["nvcc"]
    report = info.collect()
    assert report["build"] == record and report["devices"][0]["device"] == "cpu"
    assert "compiled ops:   loaded" in info.format_report(report)


def test_library_built_for_another_torch_is_refused_with_a_rebuild_hint() -> None:
    with pytest.raises(ImportError, match=r"built against torch 1\.0\.0 .* rebuild it"):
        _extension._check_torch_version({"torch": "1.0.0"})


def test_missing_library_warns_once_and_falls_back_to_the_reference_ops() -> None:
    # A fresh interpreter in which `fastpix2pix._C` cannot be found.
    script = textwrap.dedent(
        """
        import importlib.abc, sys, warnings

        class HideLibrary(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "fastpix2pix._C":
                    raise ModuleNotFoundError(name)
                return None

        sys.meta_path.insert(0, HideLibrary())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import fastpix2pix
            from fastpix2pix.models import define_G
        messages = [str(w.message) for w in caught if "not built" in str(w.message)]
        assert len(messages) == 1, messages
        assert fastpix2pix.default_backend() == "reference"
        assert define_G("unet_128", ngf=4).backend == "reference"
        try:
            fastpix2pix.get_backend("fused")
        except RuntimeError as error:
            assert "not built" in str(error)
        else:
            raise AssertionError("the fused backend must be refused without the library")
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_importing_the_package_alone_registers_the_ops_for_fake_tensors_and_compile() -> None:
    """``import fastpix2pix`` (and nothing else) must register the fake kernels and autograd: user code that
    calls ``torch.ops.fastpix2pix.*`` under ``FakeTensorMode`` or ``torch.compile`` would fail otherwise."""
    if not fastpix2pix.extension_available():
        pytest.skip("compiled extension not built")
    script = textwrap.dedent(
        """
        import sys
        import torch
        from torch._subclasses.fake_tensor import FakeTensorMode

        import fastpix2pix  # the only fastpix2pix import

        assert "fastpix2pix.ops.kernels" in sys.modules
        with FakeTensorMode():
            x = torch.empty(2, 3, 8, 8)
            w = torch.empty(4, 3, 4, 4)
            out, conv_out, mean, var = torch.ops.fastpix2pix.conv_bn_act(
                x, w, None, None, None, None, [2, 2], [1, 1], [0, 0], False, True, 1e-5, 0.2
            )
            assert out.shape == (2, 4, 4, 4) and mean.shape == (4,)

        def loss(pred, target):
            value, _ = torch.ops.fastpix2pix.l1_loss(pred, target, 100.0, True)
            return value

        pred = torch.randn(1, 3, 8, 8, requires_grad=True)
        target = torch.randn(1, 3, 8, 8)
        compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
        value = compiled(pred, target)
        value.backward()
        expected = 100.0 * (pred - target).abs().mean()
        assert torch.allclose(value, expected, rtol=1e-5), (value, expected)
        assert torch.allclose(pred.grad, 100.0 * torch.sign(pred - target) / pred.numel(), rtol=1e-5)
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
