"""Tests of the trainer: one iteration against plain PyTorch, the schedule, exact resume, atomic and
NaN-safe checkpoints, learning, and a few iterations on the real facades data.

Most runs use a tiny ResNet generator (ngf 4) on 32x32 synthetic pairs, which takes a fraction of a
second per iteration on a CPU; the semantics under test do not depend on the size.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_run import tiny_options

import fastpix2pix.runs.checkpoint as checkpoint_module
import fastpix2pix.training.trainer as train_module
from fastpix2pix._extension import extension_available
from fastpix2pix.data import generate_synthetic_facades, shared_facades_root
from fastpix2pix.inference.loading import set_inference_mode
from fastpix2pix.inference.run import evaluate_l1, split_loader
from fastpix2pix.models import convert_to_official_state_dict
from fastpix2pix.runs.checkpoint import checkpoint_path, load_checkpoint, plain_network_path, save_checkpoint
from fastpix2pix.runs.networks import build_networks
from fastpix2pix.runs.options import TestOptions, TrainOptions
from fastpix2pix.runs.visualize import read_loss_log
from fastpix2pix.training.optim import build_optimizers, build_scheduler
from fastpix2pix.training.step import LOSS_NAMES, NonFiniteLossError, Objective, train_step
from fastpix2pix.training.trainer import Trainer, check_determinism_support

pytestmark = pytest.mark.usefixtures("one_thread")

REF = "reference"
CPU = torch.device("cpu")


def run(opt: TrainOptions) -> Trainer:
    trainer = Trainer(opt, progress_bar=False)
    trainer.fit()
    return trainer


def assert_states_equal(a: object, b: object, where: str = "") -> None:
    """Recursive torch.equal over dicts, lists and tensors of two saved states."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_states_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_states_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# --- one iteration ----------------------------------------------------------------------------------


def _hand_written_iteration(G, D, opt_G, opt_D, real_A, real_B, lambda_L1=100.0):
    """The official pix2pix iteration in plain PyTorch, written out independently of train_step."""
    fake_B = G(real_A)
    opt_D.zero_grad()
    pred_fake = D(torch.cat([real_A, fake_B.detach()], dim=1))
    loss_fake = F.binary_cross_entropy_with_logits(pred_fake, torch.zeros_like(pred_fake))
    pred_real = D(torch.cat([real_A, real_B], dim=1))
    loss_real = F.binary_cross_entropy_with_logits(pred_real, torch.ones_like(pred_real))
    ((loss_fake + loss_real) * 0.5).backward()
    opt_D.step()
    for p in D.parameters():
        p.requires_grad = False
    opt_G.zero_grad()
    pred = D(torch.cat([real_A, fake_B], dim=1))
    loss_G = F.binary_cross_entropy_with_logits(pred, torch.ones_like(pred)) + lambda_L1 * F.l1_loss(
        fake_B, real_B
    )
    loss_G.backward()
    opt_G.step()
    for p in D.parameters():
        p.requires_grad = True


@pytest.mark.parametrize("netG", ["resnet_6blocks", "unet_128"])
def test_train_step_equals_hand_written_iteration(netG: str) -> None:
    opt = TrainOptions(netG=netG, ngf=4, ndf=4)
    size = 32 if netG.startswith("resnet") else 128
    torch.manual_seed(0)
    nets = build_networks(opt, REF, CPU)
    twin = copy.deepcopy(nets)
    optimizers, twin_optimizers = build_optimizers(nets, opt), build_optimizers(twin, opt)
    for step in range(2):  # the second step sees Adam state and updated BatchNorm statistics
        real_A, real_B = torch.randn(2, 3, size, size), torch.randn(2, 3, size, size)
        torch.manual_seed(10 + step)  # the same dropout masks in both
        losses = train_step(nets, optimizers, {"A": real_A, "B": real_B}, Objective("vanilla", 100.0, REF))
        torch.manual_seed(10 + step)
        _hand_written_iteration(*twin, *twin_optimizers, real_A, real_B)
        assert set(losses) == set(LOSS_NAMES) and all(
            v.dim() == 0 and not v.requires_grad for v in losses.values()
        )
    for ours, theirs in zip(nets, twin, strict=True):
        assert_states_equal(ours.state_dict(), theirs.state_dict())
        # The D gradients are those of the D step only (0.5 factor, D frozen in the G step); Adam is nearly
        # invariant to a gradient scale, so the gradients themselves pin the 0.5 down.
        for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
            assert p.requires_grad and torch.equal(p.grad, q.grad), name


def test_train_step_lsgan_loss_values() -> None:
    opt = TrainOptions(netG="resnet_6blocks", ngf=4, ndf=4)
    torch.manual_seed(0)
    nets = build_networks(opt, REF, CPU)
    nets.G.eval()  # no dropout, running stats: G(A) below is the same function train_step sees
    frozen_G, frozen_D = copy.deepcopy(nets.G), copy.deepcopy(nets.D)
    real_A, real_B = torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32)
    losses = train_step(
        nets, build_optimizers(nets, opt), {"A": real_A, "B": real_B}, Objective("lsgan", 10.0, REF)
    )
    with torch.no_grad():
        fake = frozen_G(real_A)
        expected_fake = (frozen_D(torch.cat([real_A, fake], 1)) ** 2).mean()
    assert torch.allclose(losses["D_fake"], expected_fake, rtol=1e-5)
    assert torch.allclose(losses["G_L1"], 10.0 * (fake - real_B).abs().mean(), rtol=1e-5)


@pytest.mark.skipif(not extension_available(), reason="compiled extension not built")
def test_train_step_fused_backend_agrees_with_reference() -> None:
    """Same losses and gradients on both backends. (Not the weights after the step: Adam's first step is
    about lr * sign(grad), so a float-level difference in a near-zero gradient moves a weight by 2 lr.)"""
    opt = TrainOptions(netG="unet_128", ngf=8, ndf=8)
    batch = {"A": torch.randn(2, 3, 128, 128), "B": torch.randn(2, 3, 128, 128)}
    results = {}
    for backend in ("reference", "fused"):
        torch.manual_seed(0)
        nets = build_networks(opt, backend, CPU)
        losses = train_step(nets, build_optimizers(nets, opt), batch, Objective(backend=backend))
        grads = {
            f"{net}.{k}": p.grad for net, m in zip("GD", nets, strict=True) for k, p in m.named_parameters()
        }
        results[backend] = (losses, grads)
    for name in LOSS_NAMES:
        torch.testing.assert_close(
            results["fused"][0][name], results["reference"][0][name], rtol=1e-5, atol=0
        )
    for key, grad in results["reference"][1].items():
        scale = float(grad.abs().max())
        torch.testing.assert_close(results["fused"][1][key], grad, rtol=1e-3, atol=1e-4 * scale, msg=key)


# --- schedule ---------------------------------------------------------------------------------------


def official_linear_lr(opt: TrainOptions, epoch: int) -> float:
    """The learning rate of epoch ``epoch`` (numbered from epoch_count) under the official linear rule."""
    return opt.lr * (1.0 - max(0, epoch - opt.n_epochs) / float(opt.n_epochs_decay + 1))


@pytest.mark.parametrize("epoch_count", [1, 3])
def test_linear_schedule_matches_official_formula(epoch_count: int) -> None:
    opt = TrainOptions(n_epochs=4, n_epochs_decay=5, epoch_count=epoch_count)
    optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=opt.lr)
    scheduler = build_scheduler(optimizer, opt)
    for epoch in range(epoch_count, opt.n_epochs + opt.n_epochs_decay + 1):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(official_linear_lr(opt, epoch), rel=1e-12)
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_other_schedules() -> None:
    param = [torch.zeros(1, requires_grad=True)]
    step = build_scheduler(torch.optim.Adam(param, lr=1.0), TrainOptions(lr_policy="step", lr_decay_iters=2))
    lrs = []
    for _ in range(5):
        lrs.append(step.get_last_lr()[0])
        step.optimizer.step()
        step.step()
    assert lrs == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01])
    cosine = build_scheduler(torch.optim.Adam(param, lr=1.0), TrainOptions(lr_policy="cosine", n_epochs=4))
    for _ in range(2):
        cosine.optimizer.step()
        cosine.step()
    assert cosine.get_last_lr()[0] == pytest.approx(0.5)
    plateau = build_scheduler(torch.optim.Adam(param, lr=1.0), TrainOptions(lr_policy="plateau"))
    for _ in range(7):
        plateau.step(1.0)
    assert plateau.optimizer.param_groups[0]["lr"] == pytest.approx(0.2)


def test_trainer_uses_the_schedule_epoch_by_epoch(tiny_data: Path, tmp_path: Path) -> None:
    opt = tiny_options(
        tiny_data, tmp_path, max_dataset_size=1, n_epochs=2, n_epochs_decay=3, save_epoch_freq=100
    )
    trainer = run(opt)
    records = read_loss_log(trainer.run_dir / "loss_log.jsonl")
    assert [r["epoch"] for r in records] == [1, 2, 3, 4, 5]
    for record in records:
        assert record["lr"] == pytest.approx(official_linear_lr(opt, record["epoch"]), rel=1e-12)
        assert {"iter", "time_per_iter", *LOSS_NAMES} <= record.keys()


# --- checkpoints and resume ---------------------------------------------------------------------------


@pytest.mark.parametrize("stop_at", [3, 4, 6])  # mid-epoch, at the end of an epoch, in the decay epoch
def test_resume_is_bit_exact(tiny_data: Path, tmp_path: Path, stop_at: int) -> None:
    total = 7
    straight = run(tiny_options(tiny_data, tmp_path / "straight", max_iters=total))
    run(tiny_options(tiny_data, tmp_path / "resumed", max_iters=stop_at))
    resumed = run(tiny_options(tiny_data, tmp_path / "resumed", max_iters=total, continue_train=True))
    assert straight.state.iteration == resumed.state.iteration == total
    a = load_checkpoint(checkpoint_path(straight.run_dir, "latest"))
    b = load_checkpoint(checkpoint_path(resumed.run_dir, "latest"))
    for key in ("G", "D", "optimizer_G", "optimizer_D", "scheduler_G", "scheduler_D", "epoch", "epoch_iter"):
        assert_states_equal(a[key], b[key], key)
    assert_states_equal(a["rng"]["torch"], b["rng"]["torch"], "rng")


def test_checkpoint_contents(tiny_data: Path, tmp_path: Path) -> None:
    trainer = run(tiny_options(tiny_data, tmp_path, n_epochs=2, n_epochs_decay=0, save_epoch_freq=1))
    state = load_checkpoint(checkpoint_path(trainer.run_dir, 1))
    assert state["epoch"] == 2 and state["epoch_iter"] == 0 and state["iteration"] == 4
    assert state["options"]["netG"] == "resnet_6blocks" and state["backend"] == REF and state["version"]
    assert {"torch", "numpy", "python", "loader"} <= state["rng"].keys()
    names = {p.name for p in trainer.run_dir.iterdir()}
    expected = {"latest.pt", "epoch_1.pt", "epoch_2.pt", "latest_net_G.pth", "1_net_G.pth", "1_net_D.pth"}
    assert expected <= names
    assert {"train_opt.txt", "loss_log.jsonl", "loss_curve.png", "log.txt"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    index = (trainer.run_dir / "web" / "index.html").read_text()
    assert all(f"epoch00{e}_{label}.png" in index for e in (1, 2) for label in ("real_A", "fake_B", "real_B"))
    # The bare G file has the official key names and loads back through the converter.
    official = torch.load(trainer.run_dir / "latest_net_G.pth", weights_only=True)
    assert all(key.startswith("model.") for key in official)
    from fastpix2pix.models import load_official_checkpoint

    G = build_networks(trainer.opt, REF, CPU).G
    load_official_checkpoint(trainer.run_dir / "latest_net_G.pth", G)
    assert_states_equal(G.state_dict(), trainer.nets.G.state_dict())


def test_crash_while_saving_keeps_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "latest.pt"
    good = {"format": 1, "G": {"w": torch.arange(6.0)}, "D": {}, "optimizer_G": {}, "optimizer_D": {},
            "scheduler_G": {}, "scheduler_D": {}, "epoch": 1, "epoch_iter": 0, "iteration": 3, "rng": {},
            "options": {}}  # fmt: skip
    save_checkpoint(good, path)
    real_save = torch.save

    def crash_half_way(obj: object, file: object, *args: object, **kwargs: object) -> None:
        file.write(b"PK\x03\x04 half a zip archive")  # some bytes reach the temp file, then the "crash"
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", crash_half_way)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint({**good, "iteration": 4, "G": {"w": torch.zeros(6)}}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert_states_equal(load_checkpoint(path), good)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pt"]  # no temp file left behind


def test_stale_temporaries_of_killed_saves_are_removed_at_start(tiny_data: Path, tmp_path: Path) -> None:
    """A save killed inside a write leaves its temporary (~0.7 GB for unet_256); the next trainer in the
    run folder removes those of its own naming scheme, and nothing else, saying so in one line."""
    run_dir = tmp_path / "tiny"
    run_dir.mkdir()
    ours = [".latest.pt.k3j_9x2a.tmp", ".epoch_3.pt.abcdefgh.tmp", ".latest_net_G.pth.0123abcd.tmp",
            ".12_net_D.pth.zz_zz_zz.tmp"]  # fmt: skip
    others = [".latest.pt.tmp", "notes.tmp", ".train_opt.txt.abcdefgh.tmp", ".latest.pt.abcdefghi.tmp",
              "latest.pt.abcdefgh.tmp", ".other_net_G.pth.abcdefgh.tmp"]  # fmt: skip
    for name in ours + others:
        (run_dir / name).write_bytes(b"x" * 1000)
    Trainer(tiny_options(tiny_data, tmp_path), progress_bar=False)
    assert sorted(p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")) == sorted(others)
    said = [line for line in (run_dir / "log.txt").read_text().splitlines() if "temporary" in line]
    assert len(said) == 1 and "removed 4 temporary file(s) of an interrupted save" in said[0]
    assert all(name in said[0] for name in ours)


def official_files_match(run_dir: Path, label: str, state: dict, opt: TrainOptions) -> bool:
    """Whether ``<label>_net_G/D.pth`` hold exactly the networks of the full checkpoint ``state``."""
    for key, name in (("G", opt.netG), ("D", opt.netD)):
        expected = convert_to_official_state_dict(
            state[key], name, n_layers_D=opt.n_layers_D, use_dropout=not opt.no_dropout
        )
        written = torch.load(plain_network_path(run_dir, label, key), weights_only=True)
        if written.keys() != expected.keys() or not all(
            torch.equal(written[k], expected[k]) for k in written
        ):
            return False
    return True


@pytest.mark.parametrize("interrupted_write", [0, 1, 2])  # of the 3 files of a "latest" save
def test_checkpoint_set_is_consistent_after_an_interrupted_save(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, interrupted_write: int
) -> None:
    """latest.pt and latest_net_G/D.pth are separate writes: whichever one a crash interrupts, a resumed
    trainer finds (or makes) the network files equal to latest.pt's networks."""
    opt = tiny_options(tiny_data, tmp_path, max_iters=2, save_epoch_freq=0)
    run(opt)
    real_save = checkpoint_module._torch_save
    writes = []

    def crash_on_one_write(obj: object, path: Path) -> Path:
        writes.append(path.name)
        if len(writes) - 1 == interrupted_write:
            raise OSError("No space left on device")
        return real_save(obj, path)

    monkeypatch.setattr(checkpoint_module, "_torch_save", crash_on_one_write)
    with pytest.raises(OSError, match="No space left"):
        run(dataclasses.replace(opt, max_iters=3, continue_train=True))
    monkeypatch.setattr(checkpoint_module, "_torch_save", real_save)
    assert len(writes) == interrupted_write + 1  # the save stopped at that write
    resumed = Trainer(dataclasses.replace(opt, max_iters=3, continue_train=True), progress_bar=False)
    latest = load_checkpoint(checkpoint_path(resumed.run_dir, "latest"))
    assert official_files_match(resumed.run_dir, "latest", latest, resumed.opt)
    assert latest["iteration"] == resumed.state.iteration


def test_deterministic_cuda_refuses_the_resnet_generators_at_start(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reflection padding has no deterministic CUDA backward: the run would raise at its first iteration.
    It fails before building anything instead, naming the option and the layer."""
    monkeypatch.setattr(train_module, "resolve_device", lambda name: torch.device("cuda"))
    opt = tiny_options(tiny_data, tmp_path, netG="resnet_6blocks", deterministic=True, device="cuda")
    with pytest.raises(ValueError, match=r"--deterministic .*--netG resnet_6blocks.*ReflectionPad2d"):
        Trainer(opt, progress_bar=False)
    cuda = torch.device("cuda")
    check_determinism_support(dataclasses.replace(opt, netG="unet_256"), cuda)  # no reflection padding
    check_determinism_support(dataclasses.replace(opt, deterministic=False), cuda)
    check_determinism_support(opt, CPU)  # the CPU backward is deterministic


def test_missing_and_corrupt_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"latest\.pt does not exist"):
        load_checkpoint(tmp_path / "latest.pt")
    (tmp_path / "latest.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match=r"latest\.pt is corrupt.*fastpix2pix training checkpoint"):
        load_checkpoint(tmp_path / "latest.pt")
    torch.save({"model.0.weight": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match=r"not a fastpix2pix training checkpoint.*--load_official"):
        load_checkpoint(tmp_path / "plain.pt")


def test_continue_without_checkpoint_names_the_file(tiny_data: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"tiny[/\\]epoch_7\.pt does not exist"):
        Trainer(tiny_options(tiny_data, tmp_path, continue_train=True, epoch="7"), progress_bar=False)


def test_continue_from_bare_official_style_files(tiny_data: Path, tmp_path: Path) -> None:
    """Runs that have only ``latest_net_G.pth`` / ``latest_net_D.pth`` (as the official code writes)
    continue from those weights, at --epoch_count."""
    first = run(tiny_options(tiny_data, tmp_path, n_epochs=1, n_epochs_decay=0, save_epoch_freq=0))
    checkpoint_path(first.run_dir, "latest").unlink()
    resumed = Trainer(
        tiny_options(tiny_data, tmp_path, continue_train=True, epoch_count=2), progress_bar=False
    )
    assert_states_equal(resumed.nets.G.state_dict(), first.nets.G.state_dict())
    assert_states_equal(resumed.nets.D.state_dict(), first.nets.D.state_dict())
    assert resumed.state.epoch == 2 and resumed.state.iteration == 0


def test_nan_stops_training_and_keeps_last_good_checkpoint(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_step = train_module.train_step
    calls = {"n": 0}

    def blow_up_at_third_iteration(nets, optimizers, batch, objective, visuals=None):  # type: ignore[no-untyped-def]
        losses = real_step(nets, optimizers, batch, objective, visuals)
        calls["n"] += 1
        if calls["n"] == 3:
            with torch.no_grad():
                next(nets.G.parameters()).fill_(math.nan)
            losses["G_L1"] = torch.tensor(math.nan)
        return losses

    monkeypatch.setattr(train_module, "train_step", blow_up_at_third_iteration)
    opt = tiny_options(tiny_data, tmp_path, max_dataset_size=2, n_epochs=3, n_epochs_decay=0, print_freq=1)
    trainer = Trainer(opt, progress_bar=False)
    with pytest.raises(NonFiniteLossError, match="loss G_L1 is nan at epoch 2, iteration 3"):
        trainer.fit()
    latest = load_checkpoint(checkpoint_path(trainer.run_dir, "latest"))
    assert latest["iteration"] == 2  # saved at the end of epoch 1, never overwritten
    assert_states_equal(latest["G"], load_checkpoint(checkpoint_path(trainer.run_dir, 1))["G"])
    assert all(torch.isfinite(t).all() for t in latest["G"].values() if t.is_floating_point())


def test_nan_weights_are_never_saved(tiny_data: Path, tmp_path: Path) -> None:
    trainer = Trainer(tiny_options(tiny_data, tmp_path), progress_bar=False)
    with torch.no_grad():
        next(trainer.nets.D.parameters())[0] = math.inf
    with pytest.raises(NonFiniteLossError, match="network D has non-finite weights"):
        trainer.save()
    assert not checkpoint_path(trainer.run_dir, "latest").exists()


# --- bad inputs -------------------------------------------------------------------------------------


def test_missing_dataroot(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"--dataroot .*nowhere does not exist"):
        Trainer(tiny_options(tmp_path / "nowhere", tmp_path), progress_bar=False)


def test_crop_size_the_generator_cannot_take(tiny_data: Path, tmp_path: Path) -> None:
    opt = tiny_options(tiny_data, tmp_path, netG="unet_128", load_size=110, crop_size=100)
    with pytest.raises(ValueError, match=r"not a multiple of 128.*--crop_size 128"):
        Trainer(opt, progress_bar=False)


# --- learning ---------------------------------------------------------------------------------------


def held_out_l1(trainer: Trainer, G: torch.nn.Module) -> float:
    """L1 on the test split in the paper's protocol (train-mode BatchNorm), RNG state left untouched."""
    opt = trainer.opt
    test_opt = TestOptions(
        dataroot=opt.dataroot, direction=opt.direction, netG=opt.netG, ngf=opt.ngf, crop_size=opt.crop_size,
        preprocess=opt.preprocess,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        G = set_inference_mode(copy.deepcopy(G), eval_mode=False)
        return evaluate_l1(G, split_loader(test_opt, G), trainer.device)


def learn(opt: TrainOptions) -> tuple[float, float]:
    trainer = Trainer(opt, progress_bar=False)
    before = held_out_l1(trainer, trainer.nets.G)
    trainer.fit()
    return before, held_out_l1(trainer, trainer.nets.G)


def test_tiny_model_learns(tmp_path: Path) -> None:
    data = generate_synthetic_facades(tmp_path / "data", n_train=8, n_test=4, size=128, seed=1)
    opt = tiny_options(
        data, tmp_path, netG="unet_128", ngf=8, ndf=8, load_size=143, crop_size=128, n_epochs=15,
        n_epochs_decay=0, print_freq=8, display_freq=1000, save_epoch_freq=0,
    )  # fmt: skip
    before, after = learn(opt)  # measured: 0.49 -> 0.35 after 120 iterations, 0.32 after 320
    assert after < 0.8 * before, (before, after)


@pytest.mark.slow
def test_unet_128_learns_the_synthetic_task(tmp_path: Path) -> None:
    data = generate_synthetic_facades(tmp_path / "data", n_train=100, n_test=8, size=128, seed=2)
    opt = tiny_options(
        data, tmp_path, netG="unet_128", ngf=16, ndf=16, load_size=143, crop_size=128, n_epochs=4,
        n_epochs_decay=4, print_freq=100, display_freq=100, save_epoch_freq=0,
    )  # fmt: skip
    before, after = learn(opt)  # measured: 0.49 -> 0.26 after 800 iterations
    assert after < 0.65 * before, (before, after)


# --- real data --------------------------------------------------------------------------------------


@pytest.mark.skipif(shared_facades_root() is None, reason="facades data absent (set FASTPIX2PIX_FACADES)")
def test_a_few_iterations_on_facades(tmp_path: Path) -> None:
    opt = TrainOptions(
        dataroot=str(shared_facades_root()), direction="BtoA", name="facades", checkpoints_dir=str(tmp_path),
        netG="unet_256", ngf=8, ndf=8, num_threads=0, backend=REF, device="cpu", seed=0, max_iters=3,
        print_freq=1, display_freq=2,
    )  # fmt: skip
    trainer = run(opt)
    records = read_loss_log(trainer.run_dir / "loss_log.jsonl")
    assert [r["iter"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r[name]) for r in records for name in LOSS_NAMES)
    assert len(trainer.dataset) == 400
    state = load_checkpoint(checkpoint_path(trainer.run_dir, "latest"))
    assert state["iteration"] == 3 and state["epoch"] == 1 and state["epoch_iter"] == 3
    assert json.loads((trainer.run_dir / "train_opt.json").read_text())["direction"] == "BtoA"
