"""The pix2pix trainer, with the official training semantics (see docs: pix2pix-reference.md "Training").

One iteration is :func:`train_step`, a small function of the networks, optimizers and a batch, so that a
faster trainer (CUDA graphs, DDP) can reuse it or be compared with it. :class:`Trainer` adds everything
around it: data, schedules, logging, checkpoints and exact resume.

Losses stay on the device as tensors; the trainer reads them back to the host only at logging points
(every ``--print_freq`` images), at epoch ends and before saving, so the loop never waits for the
device on its own. A NaN/inf loss is detected at the next read-back and stops the run before anything
is saved, so the last checkpoint on disk is always a good one.

Under ``torchrun`` (see :func:`fastpix2pix.distributed.init_distributed`) the same trainer runs data
parallel: one process per device, G and D in DistributedDataParallel, each rank training on its strided
share of every epoch (:class:`DistributedEpochSampler`) with ``--batch_size`` images per step, so the
global batch is world_size x batch_size. Rank 0 alone writes (log, loss log, pages, checkpoints); the
losses are all-reduced at the logging points, so every rank logs, checks and schedules on the same
numbers and a NaN on any rank stops them all.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import secrets
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import lr_scheduler
from torch.utils.data import DataLoader, Sampler

from fastpix2pix.backend import default_backend, get_backend
from fastpix2pix.checkpoint import (
    FORMAT_VERSION,
    capture_rng_state,
    checkpoint_path,
    export_official_networks,
    load_checkpoint,
    package_version,
    plain_network_path,
    remove_stale_temporaries,
    restore_rng_state,
    save_checkpoint_set,
)
from fastpix2pix.distributed import DistContext, init_distributed
from fastpix2pix.options import LR_POLICIES, ArchitectureOptions, TrainOptions, options_to_dict, save_options
from fastpix2pix.visualize import (
    VISUAL_LABELS,
    LossLog,
    ProgressBar,
    RunLog,
    TensorBoard,
    TrainingWebPage,
    plot_loss_curve,
    read_loss_log,
    tensor_to_image,
)

LOSS_NAMES = ("G_GAN", "G_L1", "D_real", "D_fake")
"""The losses :func:`train_step` returns, named as in the official code (G_L1 includes lambda_L1)."""

DEFAULT_SYNTHETIC_ROOT = Path("datasets") / "synthetic"
SYNTHETIC_DIRECTION = "BtoA"  # its files are photo | labels, and the task is labels -> photo
_ORDER_STREAM = 0xFFFFFFFF  # keeps the shuffling stream apart from the augmentation's (seed, epoch, index)
_RANK_STREAM = 0xFFFFFFFE  # and the ranks' own torch streams (dropout) apart from both

__all__ = [
    "LOSS_NAMES",
    "DistributedEpochSampler",
    "EpochSampler",
    "Networks",
    "NonFiniteLossError",
    "Objective",
    "Optimizers",
    "Trainer",
    "build_generator",
    "build_networks",
    "build_optimizers",
    "build_scheduler",
    "check_determinism_support",
    "determinism",
    "linear_lr_factor",
    "resolve_data_source",
    "resolve_device",
    "seed_everything",
    "set_requires_grad",
    "train",
    "train_step",
    "unwrap",
]


class NonFiniteLossError(FloatingPointError):
    """A loss (or a weight) became NaN or infinite; the run stopped without saving that state."""


class Networks(NamedTuple):
    G: nn.Module
    D: nn.Module


class Optimizers(NamedTuple):
    G: torch.optim.Optimizer
    D: torch.optim.Optimizer


@dataclass(frozen=True)
class Objective:
    """The pix2pix loss: ``gan_mode`` GAN loss plus ``lambda_L1`` x L1, computed by ``backend``'s ops."""

    gan_mode: str = "vanilla"
    lambda_L1: float = 100.0
    backend: str | None = None

    @property
    def ops(self) -> ModuleType:
        return get_backend(self.backend)


# --- one iteration ----------------------------------------------------------------------------------


def set_requires_grad(net: nn.Module, flag: bool) -> None:
    for parameter in net.parameters():
        parameter.requires_grad_(flag)


def unwrap(net: nn.Module) -> nn.Module:
    """The network inside a DistributedDataParallel wrapper (``net`` itself when not wrapped)."""
    return net.module if isinstance(net, DistributedDataParallel) else net


def train_step(
    nets: Networks,
    optimizers: Optimizers,
    batch: Mapping[str, torch.Tensor],
    objective: Objective,
    visuals: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """One official pix2pix iteration on ``batch["A"]`` -> ``batch["B"]`` (tensors already on the device).

    1. fake_B = G(A), once.
    2. D step: D(A, fake_B.detach()) and D(A, B) as two separate forwards (two BatchNorm batches);
       loss_D = 0.5 * (GAN(fake, 0) + GAN(real, 1)); Adam(D).
    3. D frozen; G step through the updated D: GAN(D(A, fake_B), 1) + lambda_L1 * |fake_B - B|; Adam(G).

    Returns the detached losses :data:`LOSS_NAMES` as 0-dim tensors on the device (no host sync).
    If ``visuals`` is given, ``visuals["fake_B"]`` receives the detached generator output.
    """
    G, D = nets
    ops = objective.ops
    real_A, real_B = batch["A"], batch["B"]
    fake_B = G(real_A)

    set_requires_grad(D, True)
    optimizers.D.zero_grad(set_to_none=True)
    loss_D_fake = ops.gan_loss(D(torch.cat((real_A, fake_B.detach()), 1)), False, objective.gan_mode)
    loss_D_real = ops.gan_loss(D(torch.cat((real_A, real_B), 1)), True, objective.gan_mode)
    ((loss_D_fake + loss_D_real) * 0.5).backward()
    optimizers.D.step()

    # Frozen so that the G loss's backward pass through D computes no D weight gradients. Under DDP the
    # forward goes through the bare D (unwrap): the G step needs only the gradient with respect to fake_B,
    # and DDP has no part in it. Through the wrapper it works only thanks to the freeze (no D parameter's
    # hook fires, so DDP's reducer starts no reduction; an unfrozen D would have its G-step gradients
    # all-reduced for nothing), and every forward pays DDP's bookkeeping; find_unused_parameters=True, the
    # usual advice, adds a traversal of the autograd graph after each of the 3 D forwards per iteration.
    # The bare D: no D communication in the G step, D's weights untouched and equal on all ranks.
    set_requires_grad(D, False)
    optimizers.G.zero_grad(set_to_none=True)
    D_frozen = unwrap(D)
    loss_G_GAN = ops.gan_loss(D_frozen(torch.cat((real_A, fake_B), 1)), True, objective.gan_mode)
    loss_G_L1 = ops.l1_loss(fake_B, real_B, objective.lambda_L1)
    (loss_G_GAN + loss_G_L1).backward()
    optimizers.G.step()
    set_requires_grad(D, True)

    if visuals is not None:
        visuals["fake_B"] = fake_B.detach()
    return {
        "G_GAN": loss_G_GAN.detach(),
        "G_L1": loss_G_L1.detach(),
        "D_real": loss_D_real.detach(),
        "D_fake": loss_D_fake.detach(),
    }


# --- building blocks --------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; a CUDA device that is not there is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available here (use --device cpu or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return device


def seed_everything(seed: int) -> None:
    """Seed python's random, numpy's global generator and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def determinism(enabled: bool) -> Iterator[None]:
    """Deterministic algorithms and no cuDNN autotuning inside the block (restored after: they are global).

    Off, cuDNN autotuning is switched on instead: pix2pix trains at fixed shapes.
    """
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    if enabled:
        # cuBLAS needs this before its first use to be deterministic; harmless on CPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0])
        torch.backends.cudnn.deterministic = saved[1]
        torch.backends.cudnn.benchmark = saved[2]


def check_determinism_support(opt: TrainOptions, device: torch.device) -> None:
    """Refuse, before anything is built, a ``--deterministic`` run that would stop at its first backward.

    The ResNet generators pad by reflection (``F.pad(mode="reflect")``, as ``nn.ReflectionPad2d``), whose
    CUDA backward has no deterministic implementation: under ``torch.use_deterministic_algorithms(True)``
    it raises. An error rather than ``warn_only``: the run would not be reproducible, which is what the
    option promises.
    """
    if opt.deterministic and device.type == "cuda" and opt.netG.startswith("resnet"):
        raise ValueError(
            f"--deterministic cannot train --netG {opt.netG} on CUDA: its reflection padding "
            f"(ReflectionPad2d, F.pad mode='reflect') has no deterministic CUDA backward "
            f"(reflection_pad2d_backward_cuda), so torch.use_deterministic_algorithms would stop the first "
            f"iteration. Drop --deterministic, use a unet_* generator, or train with --device cpu"
        )


def build_generator(opt: ArchitectureOptions, backend: str, device: torch.device) -> nn.Module:
    """G from the options, initialised (drawing from the global torch generator), on ``device``."""
    from fastpix2pix.models import define_G

    G = define_G(
        opt.netG, opt.input_nc, opt.output_nc, opt.ngf, opt.norm, not opt.no_dropout, opt.init_type,
        opt.init_gain, backend=backend,
    )  # fmt: skip
    return G.to(device)


def build_networks(opt: ArchitectureOptions, backend: str, device: torch.device) -> Networks:
    """G, then D (D sees the pair: input_nc + output_nc channels), as the official code creates them."""
    from fastpix2pix.models import define_D

    G = build_generator(opt, backend, device)
    D = define_D(
        opt.netD, opt.input_nc + opt.output_nc, opt.ndf, opt.n_layers_D, opt.norm, opt.init_type,
        opt.init_gain, backend=backend,
    )  # fmt: skip
    return Networks(G, D.to(device))


def build_optimizers(nets: Networks, opt: TrainOptions) -> Optimizers:
    """Adam as the official code configures it (lr, betas (beta1, 0.999)); on CPU, its fused implementation.

    Fused Adam computes the same update in one multithreaded pass per tensor; torch's default on CPU (the
    for-loop) makes about ten single-threaded ones: for unet_256 that is ~35 ms instead of ~190 ms of every
    iteration on 2 cores (``benchmarks/bench_train.py``, rows ``ours:fused:nchw:fused`` and ``:forloop``).
    Elsewhere torch's default (foreach on CUDA). Checkpoints record the default implementation flags as
    before, and loading one keeps this optimizer's own, so a checkpoint moves freely between trainers.
    """
    betas = (opt.beta1, 0.999)
    return Optimizers(*(_adam(list(net.parameters()), opt.lr, betas) for net in nets))


def _adam(params: list[nn.Parameter], lr: float, betas: tuple[float, float]) -> torch.optim.Adam:
    on_cpu = bool(params) and all(p.device.type == "cpu" for p in params)
    optimizer = torch.optim.Adam(params, lr=lr, betas=betas, fused=True if on_cpu else None)
    if on_cpu:
        optimizer.register_state_dict_post_hook(_record_default_adam_flags)
        optimizer.register_load_state_dict_post_hook(_use_fused_adam)
    return optimizer


def _record_default_adam_flags(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    for group in state["param_groups"]:  # fresh dicts: the optimizer's own groups are untouched
        group["fused"] = None
    return state


def _use_fused_adam(optimizer: torch.optim.Optimizer) -> None:
    for group in optimizer.param_groups:  # load_state_dict put the checkpoint's flags here
        group.update(fused=True, foreach=None, capturable=False)


def linear_lr_factor(epoch_index: int, opt: TrainOptions) -> float:
    """The official ``linear`` rule; ``epoch_index`` counts scheduler steps (0 during the first epoch).

    factor = 1 - max(0, epoch_index + epoch_count - n_epochs) / (n_epochs_decay + 1), so epoch e (from 1)
    trains at 1 - max(0, e - n_epochs) / (n_epochs_decay + 1).
    """
    return 1.0 - max(0, epoch_index + opt.epoch_count - opt.n_epochs) / float(opt.n_epochs_decay + 1)


def build_scheduler(optimizer: torch.optim.Optimizer, opt: TrainOptions) -> Any:
    """The official schedulers, stepped once at the end of each epoch."""
    if opt.lr_policy == "linear":
        return lr_scheduler.LambdaLR(optimizer, lambda epoch_index: linear_lr_factor(epoch_index, opt))
    if opt.lr_policy == "step":
        return lr_scheduler.StepLR(optimizer, step_size=opt.lr_decay_iters, gamma=0.1)
    if opt.lr_policy == "plateau":
        return lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.2, threshold=0.01, patience=5)
    if opt.lr_policy == "cosine":
        return lr_scheduler.CosineAnnealingLR(optimizer, T_max=opt.n_epochs, eta_min=0)
    raise ValueError(f"unknown lr_policy {opt.lr_policy!r}; choose one of {LR_POLICIES}")


class EpochSampler(Sampler[int]):
    """Sample order that is a function of ``(seed, epoch)`` only, and can start part-way into an epoch.

    This is what makes a mid-epoch resume exact: the resumed run rebuilds the epoch's permutation and
    skips the samples the checkpoint had already trained on, without loading them.
    """

    def __init__(self, size: int, seed: int, shuffle: bool) -> None:
        self.size = size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch = epoch
        self.start = start

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        stream = np.random.SeedSequence([self.seed, epoch, _ORDER_STREAM]).generate_state(2, np.uint64)
        generator = torch.Generator().manual_seed(int(stream[0] >> np.uint64(1)))
        return torch.randperm(self.size, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.order(self.epoch)[self.start :])

    def __len__(self) -> int:
        return max(0, self.size - self.start)


class DistributedEpochSampler(EpochSampler):
    """This rank's share of :class:`EpochSampler`'s order: ``order[rank::world_size]``.

    Every rank computes the same permutation from ``(seed, epoch)`` (the ``set_epoch`` semantics of
    ``DistributedSampler``), padded by repeating its first samples to a multiple of ``world_size`` so that
    every rank runs the same number of iterations (a rank with one batch fewer would leave the others
    waiting in a collective). Rank r's k-th sample is the epoch's (k * world_size + r)-th: step t of
    world_size ranks with batch n covers the global batch t of one process with batch world_size * n.
    ``start`` counts this rank's samples already done in the epoch.
    """

    def __init__(self, size: int, seed: int, shuffle: bool, rank: int, world_size: int) -> None:
        super().__init__(size, seed, shuffle)
        self.rank = rank
        self.world_size = world_size

    @property
    def per_rank(self) -> int:
        return math.ceil(self.size / self.world_size)

    def shard(self, epoch: int) -> list[int]:
        order = self.order(epoch)
        padding = self.per_rank * self.world_size - len(order)
        padded = order + (order * math.ceil(padding / max(1, len(order))))[:padding]
        return padded[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.shard(self.epoch)[self.start :])

    def __len__(self) -> int:
        return max(0, self.per_rank - self.start)


def resolve_data_source(dataroot: str | None, direction: str, say: RunLog | None = None) -> tuple[Path, str]:
    """The dataset folder and direction. With no dataroot: the synthetic dataset (generated on first
    use), whose task is labels (B) -> photo (A), so a direction left at AtoB becomes BtoA."""
    if dataroot is None:
        from fastpix2pix.data import ensure_synthetic_dataset

        if say is not None:
            say(f"no --dataroot: using the synthetic dataset in {DEFAULT_SYNTHETIC_ROOT} (labels -> photo)")
        return Path(ensure_synthetic_dataset(DEFAULT_SYNTHETIC_ROOT)), SYNTHETIC_DIRECTION
    root = Path(dataroot)
    if not root.is_dir():
        raise FileNotFoundError(
            f"--dataroot {root} does not exist or is not a folder (expected a folder with train/ and test/ "
            f"subfolders of A|B images; `fastpix2pix datasets download facades` fetches one)"
        )
    return root, direction


def data_workers(requested: int) -> int:
    """``--num_threads`` capped at the usable CPUs (shared by this machine's processes under torchrun):
    more loader processes than cores only take them from the training process (and torch warns)."""
    from fastpix2pix.data.check import usable_cpu_count

    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return min(requested, max(1, usable_cpu_count() // max(1, processes)))


def generator_size_multiple(G: nn.Module) -> int:
    return int(getattr(G, "size_multiple", 1))


# --- the loss window: losses kept on the device until a logging point -------------------------------


class LossWindow:
    """The per-iteration loss tensors since the last read-back, and where each was computed."""

    def __init__(self) -> None:
        self._losses: list[torch.Tensor] = []
        self._where: list[tuple[int, int]] = []
        self.data_time = 0.0
        self.started = time.perf_counter()

    def __len__(self) -> int:
        return len(self._losses)

    def add(self, losses: Mapping[str, torch.Tensor], epoch: int, iteration: int) -> None:
        self._losses.append(torch.stack([losses[name] for name in LOSS_NAMES]))
        self._where.append((epoch, iteration))

    def read(self, group: DistContext | None = None) -> tuple[np.ndarray, float, float]:
        """``(losses [n, len(LOSS_NAMES)], seconds per iteration, data seconds per iteration)``; resets.

        With a ``group``, the losses are the means over its ranks (every rank must call this at the same
        point: the windows have the same length, the ranks step in lockstep). Raises NonFiniteLossError
        naming the first non-finite loss, its epoch and iteration (and the ranks that saw one), on every
        rank alike.
        """
        n = len(self._losses)
        bad_ranks: list[int] = []
        if not n:
            values = np.zeros((0, len(LOSS_NAMES)))
        elif group is None:
            values = torch.stack(self._losses).float().cpu().numpy()
        else:
            values, bad_ranks = _reduce_losses(torch.stack(self._losses).float(), group)
        elapsed = time.perf_counter() - self.started
        bad = np.argwhere(~np.isfinite(values))
        if len(bad):
            row, column = bad[0]
            epoch, iteration = self._where[row]
            where = f" (non-finite on rank(s) {bad_ranks})" if group is not None else ""
            raise NonFiniteLossError(
                f"loss {LOSS_NAMES[column]} is {values[row, column]} at epoch {epoch}, iteration "
                f"{iteration}{where}: training stopped; the last good checkpoint is kept (try a lower --lr)"
            )
        per_iter = elapsed / n if n else 0.0
        data_per_iter = self.data_time / n if n else 0.0
        self._losses, self._where, self.data_time = [], [], 0.0
        self.started = time.perf_counter()
        return values, per_iter, data_per_iter


def _reduce_losses(losses: torch.Tensor, group: DistContext) -> tuple[np.ndarray, list[int]]:
    """The ranks' mean losses [n, len(LOSS_NAMES)] and the ranks whose own losses were not all finite.

    One all_reduce per logging point, of the window and one flag per rank: no collective per iteration.
    A NaN on any rank makes the mean NaN, so every rank raises together and none is left waiting.
    """
    flags = torch.zeros(group.world_size, device=losses.device)
    flags[group.rank] = (~torch.isfinite(losses)).any().float()
    summed = group.all_reduce(torch.cat([losses.flatten(), flags])).cpu()
    n = losses.numel()
    values = (summed[:n].view(losses.shape) / group.world_size).numpy()
    return values, torch.nonzero(summed[n:]).flatten().tolist()


def crossed(before: int, after: int, every: int) -> bool:
    """Whether a counter going from ``before`` to ``after`` passed a multiple of ``every``."""
    return every > 0 and after // every > before // every


# --- the trainer ------------------------------------------------------------------------------------


@dataclass
class Progress:
    """Where training is: what a checkpoint records to resume from."""

    epoch: int = 1  # the epoch in progress (or about to start)
    epoch_iter: int = 0  # images of ``epoch`` already trained on
    iteration: int = 0  # optimizer steps in total
    images: int = 0  # images trained on in total (the official ``total_iters``)
    epoch_loss_sums: dict[str, float] | None = None  # per-epoch sums (for the plateau policy)
    epoch_loss_count: int = 0


class Trainer:
    """Builds data, networks, optimizers and schedulers from :class:`TrainOptions` and trains.

    ``Trainer(opt).fit()`` runs from ``opt.epoch_count`` (or the checkpoint's position with
    ``--continue_train``) to ``n_epochs + n_epochs_decay``, or until ``--max_iters`` iterations.
    """

    def __init__(self, opt: TrainOptions, *, progress_bar: bool = True, stream: Any = None) -> None:
        self.run_dir = Path(opt.checkpoints_dir) / opt.name
        new_run = not self.run_dir.exists()
        # Under torchrun: this process's rank, its device, the process group (None in a plain run).
        self.group = init_distributed(opt.device, opt.dist_timeout)
        try:
            self._setup(opt, progress_bar, stream)
        except BaseException:
            self.close()
            if new_run and (self.group is None or self.group.rank == 0):
                with contextlib.suppress(OSError):  # a failed start (e.g. bad data) leaves no empty folder
                    self.run_dir.rmdir()
            raise

    def _setup(self, opt: TrainOptions, progress_bar: bool, stream: Any) -> None:
        self.rank = 0 if self.group is None else self.group.rank
        self.world_size = 1 if self.group is None else self.group.world_size
        self.is_main = self.rank == 0
        self.say = RunLog(self.run_dir / "log.txt", stream) if self.is_main else _SilentLog()
        self.device = resolve_device(opt.device) if self.group is None else self.group.device
        self.progress_bar_enabled = progress_bar and self.is_main
        if opt.no_self_check:
            from fastpix2pix.selfcheck import set_self_check

            set_self_check(False)  # process-wide, as the kernel check's verdicts are
        if self.is_main:
            self._remove_stale_temporaries()
        resumed = self._load_resume_state(opt)
        self.opt = self._complete_options(opt, resumed)
        check_determinism_support(self.opt, self.device)
        seed_everything(self.opt.seed)
        self._build()
        self._seed_rank_stream()
        self._initialise_weights(resumed)
        self._open_outputs()

    def close(self) -> None:
        """Leave the process group if this trainer created it (at the end of :meth:`fit`, or on error)."""
        if self.group is not None:
            self.group.close()

    def _remove_stale_temporaries(self) -> None:
        """Delete the temporaries that a killed save left in the run folder (see checkpoint.py)."""
        removed, freed = remove_stale_temporaries(self.run_dir)
        if removed:
            names = ", ".join(p.name for p in removed)
            self.say(
                f"removed {len(removed)} temporary file(s) of an interrupted save from {self.run_dir} "
                f"({freed / 2**20:.1f} MiB): {names}"
            )

    def _main_first(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext() if self.group is None else self.group.main_first()

    def _complete_options(self, opt: TrainOptions, resumed: dict[str, Any] | None) -> TrainOptions:
        """Fill in what the command line may leave open: backend, seed, dataset folder and direction."""
        backend = opt.backend or default_backend()
        get_backend(backend)  # fail early if "fused" is not built
        seed = self._choose_seed(opt.seed, resumed)
        if self.group is not None:  # a seed drawn at random must be the same on every rank
            seed = self.group.broadcast_object(seed)
        with self._main_first():  # rank 0 generates the synthetic dataset; the others then find it
            dataroot, direction = resolve_data_source(opt.dataroot, opt.direction, self.say)
        self.requested_workers = opt.num_threads
        return replace(
            opt, seed=seed, backend=backend, dataroot=str(dataroot), direction=direction,
            num_threads=data_workers(opt.num_threads),
        )  # fmt: skip

    def _build(self) -> None:
        """Data, networks (initialised from the seeded generator), optimizers, schedules, loss, state."""
        opt = self.opt
        self.dataset = self._build_dataset()
        self.nets = build_networks(opt, opt.backend, self.device)
        self.train_nets = self._wrap_for_ddp(self.nets)  # what train_step runs; self.nets stay bare
        self._check_data()
        self.optimizers = build_optimizers(self.nets, opt)
        self.schedulers = Optimizers(*(build_scheduler(o, opt) for o in self.optimizers))
        self.objective = Objective(opt.gan_mode, opt.lambda_L1, opt.backend)
        self.loader_generator = torch.Generator().manual_seed(opt.seed)
        self.sampler = (
            EpochSampler(len(self.dataset), opt.seed, shuffle=not opt.serial_batches)
            if self.group is None
            else DistributedEpochSampler(
                len(self.dataset), opt.seed, not opt.serial_batches, self.rank, self.world_size
            )
        )
        self.loader = self._build_loader()
        self.state = Progress(epoch=opt.epoch_count)
        self.window = LossWindow()
        self._saved_at: int | None = None

    def _wrap_for_ddp(self, nets: Networks) -> Networks:
        """G and D in DistributedDataParallel (its constructor broadcasts rank 0's weights).

        forward_sync_buffers=False (torch's new name for broadcast_buffers=False; the buffers are still
        synchronised once, at construction): DDP would otherwise copy rank 0's BatchNorm running
        statistics to every rank before each forward (4 per iteration). With syncbatch they are equal on
        all ranks anyway; with batch, rank 0's (the ones saved) evolve from its own batches either way,
        and the other ranks' are never used (training normalises with batch statistics). Not broadcasting
        changes nothing saved and saves the collectives.
        """
        if self.group is None:
            return nets
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return Networks(
            *(DistributedDataParallel(net, device_ids=device_ids, forward_sync_buffers=False) for net in nets)
        )

    def _seed_rank_stream(self) -> None:
        """Give every rank but 0 its own torch stream (dropout masks must differ between the ranks'
        shares of the batch), after the networks were initialised identically from the common seed.
        Rank 0 keeps the single-process stream."""
        if self.rank > 0:
            torch.manual_seed(_rank_seed(self.opt.seed, self.rank, self.state.iteration))

    def _initialise_weights(self, resumed: dict[str, Any] | None) -> None:
        if resumed is not None:
            self._restore(resumed)
        elif self.opt.load_official:
            from fastpix2pix.models import load_official_checkpoint

            load_official_checkpoint(self.opt.load_official, self.nets.G)
            self.say(f"generator initialised from the official checkpoint {self.opt.load_official}")

    def _open_outputs(self) -> None:
        self.bar: ProgressBar | None = None
        if not self.is_main:  # rank 0 alone writes
            self.loss_log, self.web, self.tensorboard = None, None, None
            return
        self.loss_log = LossLog(self.run_dir / "loss_log.jsonl")
        self.loss_log.truncate_after(self.state.iteration)  # records past the checkpoint are redone
        self.web = TrainingWebPage(self.run_dir / "web", self.opt.name, VISUAL_LABELS)
        self.tensorboard = TensorBoard(self.run_dir / "tensorboard", self.say)
        save_options(self.opt, self.run_dir, "train")

    # --- setup ---

    def _load_resume_state(self, opt: TrainOptions) -> dict[str, Any] | None:
        if not opt.continue_train:
            return None
        path = checkpoint_path(self.run_dir, opt.epoch)
        if not path.exists() and plain_network_path(self.run_dir, opt.epoch, "G").exists():
            return {"plain": True}
        # Every rank reads the same file, onto the CPU: the RNG states must be CPU tensors, and
        # load_state_dict copies weights and optimizer states onto each rank's own device.
        return load_checkpoint(path, map_location="cpu")

    def _choose_seed(self, seed: int | None, resumed: dict[str, Any] | None) -> int:
        """The checkpoint's seed when resuming (it fixes the data order), else ``seed`` or a random one."""
        saved = (resumed or {}).get("options", {}).get("seed")
        if saved is not None:
            if seed is not None and seed != saved:
                self.say(f"--seed {seed} ignored: a resumed run keeps its checkpoint's seed {saved}")
            return int(saved)
        return seed if seed is not None else secrets.randbelow(2**31)

    def _build_dataset(self) -> Any:
        from fastpix2pix.data import AlignedDataset, DataOptions

        opt = self.opt
        options = DataOptions(
            direction=opt.direction,
            preprocess=opt.preprocess,
            load_size=opt.load_size,
            crop_size=opt.crop_size,
            no_flip=opt.no_flip,
            input_nc=opt.input_nc,
            output_nc=opt.output_nc,
            max_dataset_size=opt.max_dataset_size,
            serial_batches=opt.serial_batches,
            seed=opt.seed,
        )
        return AlignedDataset(opt.dataroot, opt.phase, options)

    def _check_data(self) -> None:
        """Read every training file's header; on any problem stop before anything is written, listing
        them all (one line per file); else say what was converted (:mod:`fastpix2pix.data.check`)."""
        from fastpix2pix.data.check import check_dataset

        self.data_report = check_dataset(
            self.dataset.paths, self.dataset.options, folder=self.dataset.root,
            size_multiple=generator_size_multiple(self.nets.G), batch_size=self.opt.batch_size,
        )  # fmt: skip
        error = self.data_report.error()
        if error is not None:
            raise error
        for line in self.data_report.summary_lines():
            self.say(line)

    def _build_loader(self) -> DataLoader:
        workers = 0 if self.opt.deterministic else self.opt.num_threads
        return DataLoader(
            self.dataset,
            batch_size=self.opt.batch_size,
            sampler=self.sampler,
            num_workers=workers,
            generator=self.loader_generator,  # worker seeds; keeps the global torch generator untouched
            pin_memory=self.device.type == "cuda",
            drop_last=False,
        )

    # --- checkpoints ---

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly from here (see :mod:`fastpix2pix.checkpoint`)."""
        state = self.state
        return {
            "format": FORMAT_VERSION,
            "G": self.nets.G.state_dict(),
            "D": self.nets.D.state_dict(),
            "optimizer_G": self.optimizers.G.state_dict(),
            "optimizer_D": self.optimizers.D.state_dict(),
            "scheduler_G": self.schedulers.G.state_dict(),
            "scheduler_D": self.schedulers.D.state_dict(),
            "epoch": state.epoch,
            "epoch_iter": state.epoch_iter,
            "iteration": state.iteration,
            "images": state.images,
            "epoch_loss_sums": dict(state.epoch_loss_sums or {}),
            "epoch_loss_count": state.epoch_loss_count,
            "rng": capture_rng_state(self.loader_generator),
            **self._rank_rng_states(),
            "options": options_to_dict(self.opt),
            "version": package_version(),
            "backend": self.opt.backend,
            "torch": str(torch.__version__),  # a TorchVersion object would not load with weights_only
        }

    def _rank_rng_states(self) -> dict[str, Any]:
        """Under DDP, every rank's generators (``rng_ranks``; ``rng`` is rank 0's): a collective."""
        if self.group is None:
            return {}
        return {"rng_ranks": self.group.gather_objects(capture_rng_state(self.loader_generator))}

    def _restore_rank_rng(self, resumed: dict[str, Any]) -> None:
        """This rank's generators as they were; from a run with another world size, a fresh stream."""
        states = resumed.get("rng_ranks")
        if states is not None and len(states) == self.world_size:
            restore_rng_state(states[self.rank], self.loader_generator)
            return
        restore_rng_state(resumed["rng"], self.loader_generator)
        self._seed_rank_stream()
        saved_world = len(states) if states is not None else 1
        if saved_world != self.world_size:
            self.say(
                f"the checkpoint was written by {saved_world} process(es), this run has {self.world_size}: "
                f"it continues from the same epoch and image count, but not bit-identically (other data "
                f"shards and random streams)"
            )

    def _restore(self, resumed: dict[str, Any]) -> None:
        if resumed.get("plain"):
            self._restore_plain_networks()
            return
        self._check_same_architecture(resumed["options"])
        self.nets.G.load_state_dict(resumed["G"])
        self.nets.D.load_state_dict(resumed["D"])
        self.optimizers.G.load_state_dict(resumed["optimizer_G"])
        self.optimizers.D.load_state_dict(resumed["optimizer_D"])
        self.schedulers.G.load_state_dict(resumed["scheduler_G"])
        self.schedulers.D.load_state_dict(resumed["scheduler_D"])
        self.state = Progress(
            epoch=resumed["epoch"],
            epoch_iter=resumed["epoch_iter"],
            iteration=resumed["iteration"],
            images=resumed.get("images", 0),
            epoch_loss_sums=dict(resumed.get("epoch_loss_sums") or {}) or None,
            epoch_loss_count=resumed.get("epoch_loss_count", 0),
        )
        self._restore_rank_rng(resumed)
        self._saved_at = self.state.iteration
        if self.is_main:
            # A kill during the save that wrote this checkpoint's successor may have left these files one
            # save ahead of it (they are written first): make them the checkpoint's again.
            self._export_networks(self.opt.epoch)
        self.say(
            f"resumed from {checkpoint_path(self.run_dir, self.opt.epoch)}: epoch {self.state.epoch}, "
            f"{self.state.epoch_iter} images into it, iteration {self.state.iteration}"
        )

    def _restore_plain_networks(self) -> None:
        """Official-style resume from ``<epoch>_net_G.pth`` / ``_net_D.pth``: weights only."""
        from fastpix2pix.models import load_official_checkpoint

        for key, net in (("G", self.nets.G), ("D", self.nets.D)):
            load_official_checkpoint(plain_network_path(self.run_dir, self.opt.epoch, key), net)
        self.say(
            f"loaded the networks {self.opt.epoch}_net_G/D.pth (weights only, no optimizer, schedule or RNG "
            f"state): starting at epoch {self.opt.epoch_count}"
        )

    def _check_same_architecture(self, saved: Mapping[str, Any]) -> None:
        names = [f for f in ArchitectureOptions.__dataclass_fields__ if f not in ("init_type", "init_gain")]
        different = [f"--{n} {getattr(self.opt, n)} (checkpoint: {saved[n]})" for n in names
                     if n in saved and saved[n] != getattr(self.opt, n)]  # fmt: skip
        if different:
            raise ValueError(
                f"cannot continue {self.run_dir}: options differ from the checkpoint's: "
                f"{', '.join(different)}"
            )

    def _check_finite_weights(self) -> None:
        """Under DDP on every rank together (a collective), so that all stop or none does."""
        bad = []
        for key, net in zip("GD", self.nets, strict=True):
            tensors = [t for t in net.state_dict().values() if t.is_floating_point()]
            if not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
                bad.append(key)
        all_finite = not bad if self.group is None else self.group.agree(not bad)
        if not all_finite:
            where = f"network {', '.join(bad)} has" if bad else "another rank's networks have"
            raise NonFiniteLossError(
                f"{where} non-finite weights at epoch {self.state.epoch}, iteration "
                f"{self.state.iteration}: training stopped; the last checkpoint saved before it is kept"
            )

    def save(self, labels: tuple[str | int, ...] = ("latest",)) -> None:
        """Write the current state under each label (``latest``, an epoch number) once checked finite.

        Under DDP every rank calls this (it reads the losses, checks and gathers collectively); rank 0
        writes while the others wait, and all go on only once the files are complete.
        """
        self._log_window()
        self._check_finite_weights()
        state = self.state_dict()
        if self.group is None:
            self._write(state, labels)
        else:
            self._write_on_main(state, labels)
        self._saved_at = self.state.iteration
        self.say(
            f"saved {', '.join(map(str, labels))} (epoch {state['epoch']}, iteration {state['iteration']})"
        )

    def _write_on_main(self, state: dict[str, Any], labels: tuple[str | int, ...]) -> None:
        """Rank 0 writes; every rank leaves together, and fails together if the writing failed."""
        assert self.group is not None
        error: Exception | None = None
        if self.is_main:
            try:
                self._write(state, labels)
            except Exception as caught:  # re-raised below, after telling the other ranks
                error = caught
        written = self.group.agree(error is None)
        if error is not None:
            raise error
        if not written:
            raise RuntimeError(
                f"rank 0 failed to write checkpoint {labels} in {self.run_dir} (see its error)"
            )

    def _write(self, state: dict[str, Any], labels: tuple[str | int, ...]) -> None:
        opt = self.opt
        save_checkpoint_set(
            self.run_dir, labels, state, self._official_networks(), n_layers_D=opt.n_layers_D,
            use_dropout=not opt.no_dropout,
        )  # fmt: skip

    def _official_networks(self) -> dict[str, tuple[nn.Module, str]]:
        return {"G": (self.nets.G, self.opt.netG), "D": (self.nets.D, self.opt.netD)}

    def _export_networks(self, label: str | int) -> None:
        """Write ``<label>_net_G.pth`` / ``_net_D.pth`` from the networks as they are."""
        opt = self.opt
        export_official_networks(
            self.run_dir, label, self._official_networks(), n_layers_D=opt.n_layers_D,
            use_dropout=not opt.no_dropout,
        )  # fmt: skip

    # --- logging ---

    def _lr(self) -> float:
        return float(self.optimizers.G.param_groups[0]["lr"])

    def _log_window(self) -> dict[str, float] | None:
        """Read the pending losses back (one sync), check them, and write one log record."""
        if not len(self.window):
            return None
        values, per_iter, data_per_iter = self.window.read(self.group)
        values = values.astype(np.float64)
        means = {name: float(v) for name, v in zip(LOSS_NAMES, values.mean(axis=0), strict=True)}
        sums = self.state.epoch_loss_sums or dict.fromkeys(LOSS_NAMES, 0.0)
        self.state.epoch_loss_sums = {
            name: sums[name] + float(values[:, i].sum()) for i, name in enumerate(LOSS_NAMES)
        }
        self.state.epoch_loss_count += len(values)
        if self.is_main:
            self._write_log_record(means, per_iter, data_per_iter)
        return means

    def _write_log_record(self, means: dict[str, float], per_iter: float, data_per_iter: float) -> None:
        assert self.loss_log is not None and self.tensorboard is not None
        state = self.state
        record = {
            "epoch": state.epoch,
            "iter": state.iteration,
            "epoch_iter": state.epoch_iter,
            "images": state.images,
        }
        record |= means | {"lr": self._lr(), "time_per_iter": per_iter, "data_time": data_per_iter}
        self.loss_log.write(record)
        self.tensorboard.scalars(
            {f"loss/{k}": v for k, v in means.items()} | {"lr": self._lr()}, state.iteration
        )
        if self.bar is not None:
            self.bar.set_losses(state.epoch, means)
        losses = " ".join(f"{k}: {v:.3f}" for k, v in means.items())
        self.say(
            f"(epoch: {state.epoch}, iters: {state.epoch_iter}, time: {per_iter:.3f}, "
            f"data: {data_per_iter:.3f}) {losses}"
        )

    def _display(self, batch: Mapping[str, torch.Tensor], fake_B: torch.Tensor) -> None:
        images = {
            "real_A": tensor_to_image(batch["A"][0]),
            "fake_B": tensor_to_image(fake_B[0]),
            "real_B": tensor_to_image(batch["B"][0]),
        }
        assert self.web is not None and self.tensorboard is not None  # rank 0 only
        self.web.add(self.state.epoch, images)
        self.tensorboard.images({f"train/{k}": v for k, v in images.items()}, self.state.iteration)

    # --- the loop ---

    @property
    def last_epoch(self) -> int:
        return self.opt.n_epochs + self.opt.n_epochs_decay

    def _samples_per_rank(self) -> int:
        sampler = self.sampler
        return sampler.per_rank if isinstance(sampler, DistributedEpochSampler) else len(self.dataset)

    def _iterations_left(self) -> int:
        # epoch_iter counts the images of all ranks; each rank has done epoch_iter / world_size of them.
        per_epoch = math.ceil(self._samples_per_rank() / self.opt.batch_size)
        done_in_epoch = math.ceil(self.state.epoch_iter // self.world_size / self.opt.batch_size)
        left = max(0, (self.last_epoch - self.state.epoch + 1) * per_epoch - done_in_epoch)
        if self.opt.max_iters is not None:
            left = min(left, max(0, self.opt.max_iters - self.state.iteration))
        return left

    def _reached_max_iters(self) -> bool:
        return self.opt.max_iters is not None and self.state.iteration >= self.opt.max_iters

    def fit(self) -> Progress:
        """Train to the last epoch (or ``max_iters``); returns where training stopped."""
        opt = self.opt
        left = self._iterations_left()
        self.bar = ProgressBar(self.state.iteration + left, self.state.iteration, self.progress_bar_enabled)
        self.say(self._start_summary(left))
        try:
            with determinism(opt.deterministic):
                self._train_epochs()
            if self._saved_at != self.state.iteration:
                self.save(("latest",))
        except Exception as error:
            stopped = self._stopped_by_data(error)
            if stopped is None:
                raise
            raise stopped from error
        finally:
            self.bar.close()
            self.bar = None
            if self.tensorboard is not None:
                self.tensorboard.close()
            self.close()
        return self.state

    def _start_summary(self, left: int) -> str:
        """One line: data, size after preprocessing, batches per epoch, device, fast path and why."""
        opt = self.opt
        per_epoch = math.ceil(self._samples_per_rank() / opt.batch_size)
        workers = f"{opt.num_threads} loader workers"
        if opt.num_threads < self.requested_workers:
            workers += f", capped from --num_threads {self.requested_workers} to the usable CPUs"
        return (
            f"training {opt.netG} + {opt.netD} on {len(self.dataset)} images of {opt.dataroot}/{opt.phase} "
            f"({self.data_report.output_size_text()} after {opt.preprocess}, {per_epoch} batches of "
            f"{opt.batch_size} per epoch, {workers}) on {self._where()}, {self._fast_path_text()}, backend "
            f"{opt.backend}, seed {opt.seed}: {left} iterations"
        )

    def _fast_path_text(self) -> str:
        from fastpix2pix.fast_train import FastTrainer  # it imports this module

        choice = self.opt.fast_path
        if isinstance(self, FastTrainer):
            if choice == "on" or self.device.type != "cuda":
                return f"fast path on (--fast_path {choice}, {self.device.type} device)"
            return f"fast path on (--fast_path {choice}: one CUDA process)"
        if choice == "off":
            why = "--fast_path off"
        elif self.world_size > 1:
            why = f"{self.world_size} processes under torchrun; the fast path is single-GPU"
        elif self.device.type != "cuda":
            why = f"{self.device.type} device; the fast path is for CUDA"
        else:
            why = "the plain Trainer was built directly; `fastpix2pix train` chooses the fast path"
        return f"fast path off ({why})"

    def _stopped_by_data(self, error: Exception) -> Exception | None:
        """A sample that failed to load (e.g. corrupt data after a valid header) as one line naming the
        file, without the worker process's traceback (``--debug`` shows it); None for other errors."""
        from fastpix2pix.data.check import DataLoadError, loading_error

        failed = loading_error(error)
        if failed is None:
            return None
        return DataLoadError(
            f"{failed}; training stopped at epoch {self.state.epoch}, iteration {self.state.iteration}: the "
            f"last checkpoint saved before it is kept (--debug shows the full error)",
            failed.details,
        )

    def _where(self) -> str:
        if self.group is None:
            return str(self.device)
        return (
            f"{self.world_size} processes x batch {self.opt.batch_size} = global batch "
            f"{self.world_size * self.opt.batch_size}, {self.device.type}"
        )

    def _train_epochs(self) -> None:
        while self.state.epoch <= self.last_epoch and not self._reached_max_iters():
            finished = self._train_epoch()
            if not finished:
                return
            self._end_epoch()

    def _train_epoch(self) -> bool:
        """Train on the rest of the current epoch; False if ``max_iters`` stopped it part-way."""
        state, opt = self.state, self.opt
        self.dataset.set_epoch(state.epoch)
        self.sampler.set_epoch(state.epoch, start=state.epoch_iter // self.world_size)
        self.nets.G.train()
        self.nets.D.train()
        batches = iter(self.loader)
        while True:
            waited = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                return True
            self.window.data_time += time.perf_counter() - waited
            inputs = {key: batch[key].to(self.device, non_blocking=True) for key in ("A", "B")}
            # Images of all ranks: every rank's batch has this size (the sampler pads the epoch).
            size = inputs["A"].shape[0] * self.world_size
            display = self.is_main and crossed(state.images, state.images + size, opt.display_freq)
            visuals: dict[str, torch.Tensor] | None = {} if display else None
            losses = train_step(self.train_nets, self.optimizers, inputs, self.objective, visuals)
            state.iteration += 1
            before = state.images
            state.images += size
            state.epoch_iter += size
            self.window.add(losses, state.epoch, state.iteration)
            if self.bar is not None:
                self.bar.update()
            if crossed(before, state.images, opt.print_freq):
                self._log_window()
            if visuals is not None:
                self._display(inputs, visuals["fake_B"])
            if crossed(before, state.images, opt.save_latest_freq):
                self.save(("latest",))
            if self._reached_max_iters():
                return False

    def _end_epoch(self) -> None:
        """Log, step the schedules, go to the next epoch, plot; save every ``save_epoch_freq`` epochs."""
        self._log_window()
        state, opt = self.state, self.opt
        for scheduler in self.schedulers:
            if isinstance(scheduler, lr_scheduler.ReduceLROnPlateau):
                # The official code passes a constant 0 here; the epoch's mean generator loss is what
                # a plateau is meant to watch (under DDP the mean over all ranks: the sums come from
                # the all-reduced windows, so every rank steps its schedule identically).
                sums, count = state.epoch_loss_sums or {}, max(1, state.epoch_loss_count)
                scheduler.step((sums.get("G_GAN", 0.0) + sums.get("G_L1", 0.0)) / count)
            else:
                with warnings.catch_warnings():
                    # A run resumed exactly at an epoch's end steps its schedule before any optimizer step
                    # in this process; torch warns about a misuse that this is not.
                    warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
                    scheduler.step()
        finished = state.epoch
        self.say(f"end of epoch {finished} / {self.last_epoch}; learning rate now {self._lr():.7f}")
        state.epoch += 1
        state.epoch_iter = 0
        state.epoch_loss_sums, state.epoch_loss_count = None, 0
        if self.loss_log is not None:
            plot_loss_curve(read_loss_log(self.loss_log.path), LOSS_NAMES, self.run_dir / "loss_curve.png")
        if opt.save_epoch_freq > 0 and finished % opt.save_epoch_freq == 0:
            self.save(("latest", finished))


class _SilentLog(RunLog):
    """The messages of ranks other than 0: rank 0 says everything once."""

    def __init__(self) -> None:
        super().__init__(None)

    def __call__(self, message: str) -> None:
        pass


def _rank_seed(seed: int, rank: int, iteration: int) -> int:
    """A torch seed for ``rank``'s own stream, apart from the common one and the data streams."""
    state = np.random.SeedSequence([seed, rank, iteration, _RANK_STREAM]).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


def train(opt: TrainOptions, *, progress_bar: bool = True) -> Trainer:
    """Build a :class:`Trainer` for ``opt`` and run it; returns the trainer (its state, networks, folder)."""
    trainer = Trainer(opt, progress_bar=progress_bar)
    trainer.fit()
    return trainer
