"""Tests of the network definitions against the facts and against the official module structure.

The strongest checks build the official networks' *structure* (``benchmarks/official_networks.py``, a
compact re-creation of the nested containers of junyanz/pytorch-CycleGAN-and-pix2pix
``models/networks.py`` with its in-place activations; the benchmarks' baseline too), convert their
state_dicts, and require the flat fastpix2pix networks to compute the same
outputs, gradients and running statistics. Widths are kept small: the function does not depend on them.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import fastpix2pix.ops.backend
from benchmarks.official_networks import RESNET_BLOCKS, UNET_DOWNS, official_D, official_G, official_init
from fastpix2pix.models import (
    DISCRIMINATORS,
    GENERATORS,
    NORMS,
    ConvBlock,
    Network,
    NLayerDiscriminator,
    ResnetGenerator,
    UnetGenerator,
    convert_official_state_dict,
    convert_to_official_state_dict,
    define_D,
    define_G,
    init_weights,
    load_official_checkpoint,
    patch_receptive_field,
)

REF = "reference"
needs_extension = pytest.mark.skipif(
    not fastpix2pix.ops.backend.extension_available(), reason="compiled extension not built"
)


def _count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def _randomise(net: nn.Module, seed: int = 0) -> None:
    """Weights and BN statistics that make every mapping error visible (non-zero biases, odd stats)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in net.state_dict().items():
            if name.endswith("num_batches_tracked"):
                tensor.fill_(3)
            elif name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
            elif tensor.dim() == 1:
                tensor.copy_(
                    torch.randn(tensor.shape, generator=gen) * 0.1 + (1.0 if "weight" in name else 0.0)
                )
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * (2.0 / tensor[0].numel()) ** 0.5)


def _run(net: nn.Module, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Output and input gradient of a random linear functional of the output; dropout drawn from ``seed``."""
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    y = net(x)
    weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1))
    (y * weights).sum().backward()
    return y.detach(), x.grad


def _official_pair(
    kind: str, name: str, norm: str, dropout: bool = False, width: int = 8, n_layers: int = 3
) -> tuple[nn.Module, Network]:
    """An official-structure network with random weights and the fastpix2pix one loaded from it.

    Both in float64, so that the comparison sees the function and not float32 summation order: the
    two compute the same ops on differently laid out tensors, which in float32 differs by ~1e-6.
    """
    if kind == "G":
        official = official_G(name, width, norm, dropout)
        ours = define_G(name, ngf=width, norm=norm, use_dropout=dropout, backend=REF)
    else:
        official = official_D(name, width, norm, n_layers)
        ours = define_D(name, ndf=width, n_layers_D=n_layers, norm=norm, backend=REF)
    _randomise(official)
    ours.load_state_dict(convert_official_state_dict(official.state_dict(), name, n_layers_D=n_layers))
    return official.double(), ours.double()


# --- the facts ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("unet_256", 54_413_955),
        ("unet_128", 41_828_995),
        ("resnet_9blocks", 11_383_427),
        ("resnet_6blocks", 7_841_411),
    ],
)
def test_generator_parameter_counts(name: str, expected: int) -> None:
    assert _count(define_G(name, backend=REF)) == expected


def test_basic_discriminator_parameter_count() -> None:
    assert _count(define_D("basic", backend=REF)) == 2_768_705


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", GENERATORS)
def test_generator_counts_and_shapes_match_official_structure(name: str, norm: str) -> None:
    official = official_G(name, 64, norm, dropout=True)
    ours = UnetGenerator(3, 3, UNET_DOWNS[name], 64, norm, True, backend=REF) if name in UNET_DOWNS else (
        ResnetGenerator(3, 3, 64, norm, True, RESNET_BLOCKS[name], backend=REF)
    )  # fmt: skip
    converted = convert_official_state_dict(official.state_dict(), name)
    assert _count(ours) == _count(official)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in ours.state_dict().items()}


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize(("name", "n_layers"), [("pixel", 3)] + [("n_layers", n) for n in range(1, 6)])
def test_discriminator_counts_and_shapes_match_official_structure(
    name: str, n_layers: int, norm: str
) -> None:
    official = official_D(name, 64, norm, n_layers)
    ours = define_D(name, ndf=64, n_layers_D=n_layers, norm=norm, backend=REF)
    converted = convert_official_state_dict(official.state_dict(), name, n_layers_D=n_layers)
    assert _count(ours) == _count(official)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in ours.state_dict().items()}


def test_output_shapes() -> None:
    with torch.no_grad():
        assert define_G("unet_256", backend=REF).eval()(torch.zeros(1, 3, 256, 256)).shape == (1, 3, 256, 256)
        assert define_D("basic", backend=REF).eval()(torch.zeros(1, 6, 256, 256)).shape == (1, 1, 30, 30)
        resnet = define_G("resnet_6blocks", ngf=8, backend=REF).eval()
        assert resnet(torch.zeros(2, 3, 64, 96)).shape == (2, 3, 64, 96)  # non-square


@pytest.mark.parametrize(("n_layers", "field"), [(1, 16), (2, 34), (3, 70), (4, 142), (5, 286)])
def test_patchgan_receptive_field(n_layers: int, field: int) -> None:
    """Measured: the input pixels that one output logit depends on (non-zero gradient), eval-mode BN."""
    assert patch_receptive_field(n_layers) == field
    size = 2**n_layers * (2 * field // 2**n_layers + 2)
    net = define_D("n_layers", ndf=4, n_layers_D=n_layers, backend=REF).eval()
    x = torch.randn(1, 6, size, size, requires_grad=True)
    out = net(x)
    centre = out.shape[-1] // 2
    out[0, 0, centre, centre].backward()
    for dim in (2, 3):
        touched = x.grad.abs().sum(dim=(0, 1, 5 - dim)).nonzero().flatten()
        assert touched.min() > 0 and touched.max() < size - 1  # the field is not clipped by the border
        assert touched.max() - touched.min() + 1 == field


# --- same function as the official structure ----------------------------------------------------------


def _assert_same_step(
    official: nn.Module, ours: Network, name: str, x: torch.Tensor, n_layers: int = 3
) -> None:
    """Train-mode forward+backward (same dropout seed), then running stats, gradients, eval forward."""
    official.train(), ours.train()
    y_official, gx_official = _run(official, x, seed=5)
    y_ours, gx_ours = _run(ours, x, seed=5)
    torch.testing.assert_close(y_ours, y_official)
    torch.testing.assert_close(gx_ours, gx_official)
    grads = {n: p.grad for n, p in official.named_parameters()}
    ours_grads = {n: p.grad for n, p in ours.named_parameters()}
    torch.testing.assert_close(ours_grads, convert_official_state_dict(grads, name, n_layers_D=n_layers))
    # Running statistics and batch counters after one training step, then eval mode (running stats).
    converted = convert_official_state_dict(official.state_dict(), name, n_layers_D=n_layers)
    torch.testing.assert_close(ours.state_dict(), converted)
    official.eval(), ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), official(x.clone()))


@pytest.mark.parametrize(
    ("name", "norm", "dropout", "size"),
    [
        ("unet_256", "batch", True, 256),
        ("unet_128", "batch", True, 128),
        ("unet_128", "batch", False, 128),
        ("unet_128", "instance", True, 128),
        ("unet_128", "none", True, 128),
        ("resnet_9blocks", "batch", True, 32),
        ("resnet_6blocks", "batch", False, 32),
        ("resnet_6blocks", "instance", True, 32),
        ("resnet_6blocks", "none", False, 32),
    ],
)
def test_generator_computes_the_official_function(name: str, norm: str, dropout: bool, size: int) -> None:
    official, ours = _official_pair("G", name, norm, dropout)
    _assert_same_step(official, ours, name, torch.randn(2, 3, size, size, dtype=torch.float64))


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize(("name", "n_layers"), [("basic", 3), ("pixel", 3), ("n_layers", 2)])
def test_discriminator_computes_the_official_function(name: str, n_layers: int, norm: str) -> None:
    official, ours = _official_pair("D", name, norm, n_layers=n_layers)
    _assert_same_step(official, ours, name, torch.randn(2, 6, 48, 48, dtype=torch.float64), n_layers)


def test_unet_dropout_is_on_the_official_levels() -> None:
    """Dropout at 4x4, 8x8 and 16x16 for unet_256 (decoder levels 1..3, 0 being the innermost)."""
    net = UnetGenerator(3, 3, 8, ngf=4, use_dropout=True, backend=REF)
    sizes = [256 // 2 ** (8 - 1 - j) for j, has in enumerate(net.decoder_dropout) if has]
    assert sizes == [4, 8, 16]


@pytest.mark.parametrize("name", ["unet_256", "resnet_6blocks", "basic", "pixel"])
def test_same_seed_gives_the_official_initial_weights(name: str) -> None:
    """Modules are created and initialised in an order that draws the same random numbers as official."""
    torch.manual_seed(123)
    if name in GENERATORS:
        official = official_init(official_G(name, 8, "batch", dropout=True))
        torch.manual_seed(123)
        ours = define_G(name, ngf=8, backend=REF)
    else:
        official = official_init(official_D(name, 8, "batch"))
        torch.manual_seed(123)
        ours = define_D(name, ndf=8, backend=REF)
    torch.testing.assert_close(
        ours.state_dict(), convert_official_state_dict(official.state_dict(), name), rtol=0, atol=0
    )


# --- fused backend vs reference ------------------------------------------------------------------------


@needs_extension
@pytest.mark.parametrize(
    ("kind", "name", "norm"),
    [
        ("G", "unet_128", "batch"),
        ("G", "unet_128", "none"),
        ("G", "resnet_6blocks", "batch"),
        ("G", "resnet_6blocks", "instance"),
        ("D", "basic", "batch"),
        ("D", "basic", "none"),
        ("D", "pixel", "batch"),
    ],
)
def test_fused_backend_matches_reference(kind: str, name: str, norm: str) -> None:
    torch.manual_seed(0)
    if kind == "G":
        reference = define_G(name, ngf=8, norm=norm, use_dropout=True, backend=REF)
        size = 128 if name.startswith("unet") else 32
        x = torch.randn(2, 3, size, size)
    else:
        reference = define_D(name, ndf=8, norm=norm, backend=REF)
        x = torch.randn(2, 6, 48, 48)
    _randomise(reference)
    fused = copy.deepcopy(reference).set_backend("fused")
    assert fused.backend == "fused" and reference.backend == REF
    assert {k: v.shape for k, v in fused.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()
    }
    y_ref, gx_ref = _run(reference, x, seed=7)
    y_fused, gx_fused = _run(fused, x, seed=7)
    _assert_close_scaled(y_fused, y_ref, "output")
    _assert_close_scaled(gx_fused, gx_ref, "input gradient")
    ref_grads = {n: p.grad for n, p in reference.named_parameters()}
    for (n, p_ref), p_fused in zip(reference.named_parameters(), fused.parameters(), strict=True):
        if _bias_cancelled_by_instance_norm(reference, n):
            # Zero by construction (the norm subtracts the per-channel mean): both are rounding noise,
            # so check that they are negligible next to the gradient of the conv weight beside them.
            weight_scale = ref_grads[n.replace("conv.bias", "conv.weight")].abs().max().item()
            for grad in (p_ref.grad, p_fused.grad):
                assert grad.abs().max().item() <= 1e-4 * weight_scale, f"gradient of {n} is not ~0"
            continue
        _assert_close_scaled(p_fused.grad, p_ref.grad, f"gradient of {n}")
    for (n, b_ref), b_fused in zip(reference.named_buffers(), fused.buffers(), strict=True):
        _assert_close_scaled(b_fused, b_ref, n)  # running statistics and batch counters
    with torch.no_grad():
        _assert_close_scaled(fused.eval()(x), reference.eval()(x), "eval output")


def _bias_cancelled_by_instance_norm(net: torch.nn.Module, param_name: str) -> bool:
    if not param_name.endswith("conv.bias"):
        return False
    block = net.get_submodule(param_name.removesuffix(".conv.bias"))
    return isinstance(getattr(block, "norm", None), torch.nn.InstanceNorm2d)


def _assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, what: str, rel: float = 1e-4) -> None:
    """float32 closeness relative to the tensor's scale: the fused kernels sum in another order, and
    gradients of a random functional reach magnitudes of 100s, where a fixed atol means nothing."""
    scale = expected.abs().max().item() if expected.is_floating_point() and expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale, msg=lambda m: f"{what}: {m}")


# --- sizes, names, options ------------------------------------------------------------------------------


def test_unet_rejects_bad_sizes_with_nearest_valid_ones() -> None:
    net = UnetGenerator(3, 3, 8, ngf=4, backend=REF)
    with pytest.raises(ValueError, match=r"divisible by 256, got 300x200.*height 256 or 512, width 256"):
        net(torch.zeros(1, 3, 300, 200))
    with pytest.raises(ValueError, match=r"got 256x260.*width 256 or 512") as error:
        net(torch.zeros(1, 3, 256, 260))
    assert "height" not in str(error.value).split("nearest")[1]


def test_resnet_rejects_sizes_not_divisible_by_4() -> None:
    net = ResnetGenerator(3, 3, ngf=4, n_blocks=1, backend=REF)
    with pytest.raises(ValueError, match=r"divisible by 4, got 66x64.*height 64 or 68"):
        net(torch.zeros(1, 3, 66, 64))


def test_unknown_names_list_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unet_512.*unet_256"):
        define_G("unet_512")
    with pytest.raises(ValueError, match=r"'patch'.*basic"):
        define_D("patch")
    with pytest.raises(ValueError, match=r"'group'.*batch"):
        define_G("unet_128", norm="group")
    with pytest.raises(ValueError, match=r"'uniform'.*normal"):
        define_D("basic", init_type="uniform")
    with pytest.raises(ValueError, match="unknown backend"):
        define_D("basic", backend="cuda")
    assert DISCRIMINATORS == ("basic", "n_layers", "pixel")


def test_init_weights_follows_the_official_rules() -> None:
    torch.manual_seed(0)
    net = define_D("basic", backend=REF)
    convs = [m.conv for m in net.modules() if isinstance(m, ConvBlock)]
    norms = [m.norm for m in net.modules() if isinstance(m, ConvBlock) and m.norm is not None]
    assert all(abs(c.weight.std().item() - 0.02) < 0.002 for c in convs)
    assert all(c.bias is None or not c.bias.any() for c in convs)
    assert all(abs(n.weight.mean().item() - 1.0) < 0.01 and not n.bias.any() for n in norms)
    for init_type in ("xavier", "kaiming", "orthogonal"):
        init_weights(net, init_type)
    with pytest.raises(ValueError, match="init_type"):
        init_weights(net, "uniform")


def test_dropout_follows_training_or_the_keep_flag() -> None:
    net = UnetGenerator(3, 3, 7, ngf=4, use_dropout=True, backend=REF).eval()
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        assert torch.equal(net(x), net(x))
        net.keep_dropout_in_eval = True
        torch.manual_seed(0)
        first = net(x)
        torch.manual_seed(1)
        assert not torch.equal(first, net(x))


def test_set_backend_pickle_and_deepcopy() -> None:
    net = define_D("basic", ndf=8, backend=REF)
    assert net.set_backend(REF) is net and net.backend == REF
    with pytest.raises(ValueError):
        net.set_backend("nope")
    assert all(m.backend == REF for m in net.modules() if isinstance(m, ConvBlock))
    x = torch.randn(1, 6, 64, 64)
    net.eval()
    buffer = io.BytesIO()
    torch.save(net, buffer)
    buffer.seek(0)
    for clone in (
        copy.deepcopy(net),
        pickle.loads(pickle.dumps(net)),
        torch.load(buffer, weights_only=False),
    ):
        with torch.no_grad():
            assert torch.equal(clone(x), net(x))


# --- checkpoint conversion ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "norm", "dropout"),
    [("unet_256", "batch", True), ("unet_128", "instance", False), ("resnet_9blocks", "batch", True),
     ("resnet_6blocks", "none", False), ("basic", "batch", False), ("pixel", "instance", False)],
)  # fmt: skip
def test_conversion_round_trip(name: str, norm: str, dropout: bool) -> None:
    official = official_G(name, 4, norm, dropout) if name in GENERATORS else official_D(name, 4, norm)
    state = official.state_dict()
    ours = convert_official_state_dict({f"module.{k}": v for k, v in state.items()}, name)
    assert len(ours) == len(state)
    back = convert_to_official_state_dict(ours, name, use_dropout=dropout)
    assert list(back) == list(state) and all(back[k] is state[k] for k in state)


def test_conversion_reports_unexpected_and_missing_keys() -> None:
    state = official_D("basic", 4, "batch").state_dict()
    with pytest.raises(ValueError, match=r"not part of this architecture: model\.12\.weight"):
        convert_official_state_dict({**state, "model.12.weight": torch.zeros(1)}, "basic")
    with pytest.raises(ValueError, match=r"not part of this architecture: model\.3\.scale"):
        convert_official_state_dict({**state, "model.3.scale": torch.zeros(1)}, "basic")
    del state["model.5.weight"]
    with pytest.raises(ValueError, match=r"missing keys.*model\.5\.weight"):
        convert_official_state_dict(state, "basic")
    with pytest.raises(ValueError, match="unknown network name"):
        convert_official_state_dict(state, "unet_64")


def test_conversion_handles_old_checkpoints() -> None:
    """Pre-0.4 InstanceNorm running stats are dropped; pre-0.4.1 BatchNorm gets num_batches_tracked."""
    instance = official_D("basic", 4, "instance").state_dict()
    legacy = {**instance, "model.3.running_mean": torch.zeros(8), "model.3.running_var": torch.ones(8)}
    assert (
        convert_official_state_dict(legacy, "basic").keys()
        == convert_official_state_dict(instance, "basic").keys()
    )
    batch = official_D("basic", 4, "batch").state_dict()
    old = {k: v for k, v in batch.items() if not k.endswith("num_batches_tracked")}
    converted = convert_official_state_dict(old, "basic")
    assert converted["layers.1.norm.num_batches_tracked"].item() == 0
    NLayerDiscriminator(6, 4, backend=REF).load_state_dict(converted)


def test_load_official_checkpoint(tmp_path) -> None:
    official = official_G("unet_128", 8, "batch", dropout=True)
    _randomise(official)
    path = tmp_path / "latest_net_G.pth"
    torch.save(official.state_dict(), path)
    net = define_G("unet_128", ngf=8, backend=REF)
    assert load_official_checkpoint(path, net) is net
    torch.testing.assert_close(
        net.state_dict(), convert_official_state_dict(official.state_dict(), "unet_128")
    )
    other = define_G("unet_128", ngf=8, norm="instance", backend=REF)
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match=r"does not fit UnetGenerator.*unexpected.*--norm"):
        load_official_checkpoint(path, other)
    torch.testing.assert_close(other.state_dict(), before, rtol=0, atol=0)
