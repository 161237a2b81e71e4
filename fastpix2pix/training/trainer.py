"""The pix2pix trainer, with the official training semantics (see docs: pix2pix-reference.md "Training").

One iteration is :func:`train_step`, a small function of the networks, optimizers and a batch, so that a
faster trainer (CUDA graphs, DDP) can reuse it or be compared with it. :class:`Trainer` adds everything
around it: data, schedules, logging, checkpoints and exact resume.

Losses stay on the device as tensors; the trainer reads them back to the host only at logging points
(every ``--print_freq`` images), at epoch ends and before saving, so the loop never waits for the
device on its own. A NaN/inf loss is detected at the next read-back and stops the run before anything
is saved, so the last checkpoint on disk is always a good one.

Under ``torchrun`` (see :func:`fastpix2pix.training.distributed.init_distributed`) the same trainer runs data
parallel: one process per device, G and D in DistributedDataParallel, each rank training on its strided
share of every epoch (:class:`DistributedEpochSampler`) with ``--batch_size`` images per step, so the
global batch is world_size x batch_size. Rank 0 alone writes (log, loss log, pages, checkpoints); the
losses are all-reduced at the logging points, so every rank logs, checks and schedules on the same
numbers and a NaN on any rank stops them all.

When torchrun restarts the workers of a failed run (``--max-restarts``), each resumes from the run's
``latest.pt`` as ``--continue_train`` would, and says so; a process whose peer died stops with one line
(:class:`~fastpix2pix.training.distributed.PeerLostError`) naming the peer and the checkpoint to resume from.
"""

from __future__ import annotations

import contextlib
import math
import secrets
import time
import warnings
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import lr_scheduler
from torch.utils.data import DataLoader

from fastpix2pix.data import AlignedDataset, DataOptions
from fastpix2pix.data.check import DataLoadError, check_dataset, loading_error
from fastpix2pix.data.order import DistributedEpochSampler, EpochSampler
from fastpix2pix.data.synthetic import resolve_data_source
from fastpix2pix.models import load_official_checkpoint
from fastpix2pix.models.size import size_multiple
from fastpix2pix.ops.backend import default_backend, get_backend
from fastpix2pix.ops.selfcheck import set_self_check
from fastpix2pix.runs.checkpoint import (
    FORMAT_VERSION,
    capture_rng_state,
    checkpoint_path,
    export_official_networks,
    plain_network_path,
    remove_stale_temporaries,
    restore_rng_state,
    save_checkpoint_set,
)
from fastpix2pix.runs.networks import Networks, build_networks
from fastpix2pix.runs.options import (
    ArchitectureOptions,
    TrainOptions,
    options_to_dict,
    save_options,
)
from fastpix2pix.runs.visualize import (
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
from fastpix2pix.runtime import data_workers, determinism, package_version, resolve_device, seed_everything
from fastpix2pix.training.distributed import (
    PeerLostError,
    init_distributed,
)
from fastpix2pix.training.optim import build_optimizers, build_scheduler
from fastpix2pix.training.precision import check_plain_precision, resolve_training_precision
from fastpix2pix.training.progress import LossWindow, Progress, crossed
from fastpix2pix.training.resume import (
    SavedCheckpoint,
    agree_on_resume_state,
    lost_peer_error,
    read_resume_state,
    resume_hint,
    run_restart_count,
)
from fastpix2pix.training.step import LOSS_NAMES, NonFiniteLossError, Objective, Optimizers, train_step

__all__ = ["Trainer", "check_determinism_support", "train"]
_RANK_STREAM = 0xFFFFFFFE  # and the ranks' own torch streams (dropout) apart from both


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
        self.restart = 0  # torchrun's restart count (the highest of the ranks')
        self.last_checkpoint: SavedCheckpoint | None = None  # the newest this run wrote or resumed from
        self._save_under_way: SavedCheckpoint | None = None  # a save not known to be complete
        try:
            self._setup(opt, progress_bar, stream)
        except BaseException as error:
            self.close()
            if new_run and (self.group is None or self.group.rank == 0):
                with contextlib.suppress(OSError):  # a failed start (e.g. bad data) leaves no empty folder
                    self.run_dir.rmdir()
            lost = self._lost_peer(error)
            if lost is not None:
                raise lost from error
            raise

    def _setup(self, opt: TrainOptions, progress_bar: bool, stream: Any) -> None:
        self.rank = 0 if self.group is None else self.group.rank
        self.world_size = 1 if self.group is None else self.group.world_size
        self.is_main = self.rank == 0
        self.say = RunLog(self.run_dir / "log.txt", stream) if self.is_main else _SilentLog()
        self.device = resolve_device(opt.device) if self.group is None else self.group.device
        self.progress_bar_enabled = progress_bar and self.is_main
        if opt.no_self_check:
            set_self_check(False)  # process-wide, as the kernel check's verdicts are
        if self.is_main:
            self._remove_stale_temporaries()
        opt, resumed = self._load_resume_state(opt)
        self.opt = self._complete_options(opt, resumed)
        check_determinism_support(self.opt, self.device)
        self._check_precision()
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
            return
        if self.restart:
            self._say_on_every_machine(
                f"torchrun restart {self.restart}: no checkpoint in {self.run_dir} yet (no latest.pt): "
                f"starting over from iteration 0"
            )
        if self.opt.load_official:
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

    def _load_resume_state(self, opt: TrainOptions) -> tuple[TrainOptions, dict[str, Any] | None]:
        """The options and the checkpoint to continue from (None: start anew).

        ``--continue_train`` chooses ``--epoch``'s checkpoint. After a torchrun restart (:attr:`restart` >
        0) every rank continues from the run's latest complete checkpoint, ``latest.pt``, whatever the
        command line says: every save writes it last, atomically, so a save that the failure cut short
        left the previous one there (and at most newer network files or temporaries, which the resume
        rewrites and removes). Without a ``latest.pt`` a restart starts over (or follows
        ``--continue_train``). Under DDP the ranks then check that they all read the same checkpoint.
        """
        self.restart = run_restart_count(self.group)
        if self.restart and checkpoint_path(self.run_dir, "latest").is_file():
            opt = replace(opt, continue_train=True, epoch="latest")
        try:
            resumed = read_resume_state(opt, self.run_dir)
        except Exception as error:
            if self.group is None:
                raise
            agree_on_resume_state(self.group, self.run_dir, None, error)
            raise
        if self.group is not None:
            agree_on_resume_state(self.group, self.run_dir, resumed, None)
        return opt, resumed

    def _choose_seed(self, seed: int | None, resumed: dict[str, Any] | None) -> int:
        """The checkpoint's seed when resuming (it fixes the data order), else ``seed`` or a random one."""
        saved = (resumed or {}).get("options", {}).get("seed")
        if saved is not None:
            if seed is not None and seed != saved:
                self.say(f"--seed {seed} ignored: a resumed run keeps its checkpoint's seed {saved}")
            return int(saved)
        return seed if seed is not None else secrets.randbelow(2**31)

    def _build_dataset(self) -> Any:
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
        self.data_report = check_dataset(
            self.dataset.paths, self.dataset.options, folder=self.dataset.root,
            size_multiple=size_multiple(self.nets.G), batch_size=self.opt.batch_size,
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
        """Everything needed to continue exactly from here (see :mod:`fastpix2pix.runs.checkpoint`)."""
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
        path = checkpoint_path(self.run_dir, self.opt.epoch)
        self.last_checkpoint = SavedCheckpoint(path, self.state.epoch, self.state.iteration)
        if self.is_main:
            # A kill during the save that wrote this checkpoint's successor may have left these files one
            # save ahead of it (they are written first): make them the checkpoint's again.
            self._export_networks(self.opt.epoch)
        restart = f"torchrun restart {self.restart}: " if self.restart else ""
        self._say_on_every_machine(
            f"{restart}resumed from {path}: epoch {self.state.epoch}, {self.state.epoch_iter} images into "
            f"it, iteration {self.state.iteration}"
        )

    def _say_on_every_machine(self, message: str) -> None:
        """Rank 0 says it (console and log.txt); under DDP the first process of every other machine prints
        it too, so that each machine's console shows it."""
        self.say(message)
        if self.group is not None and not self.is_main and self.group.local_rank == 0:
            print(f"[rank {self.rank}] {message}", flush=True)

    def _restore_plain_networks(self) -> None:
        """Official-style resume from ``<epoch>_net_G.pth`` / ``_net_D.pth``: weights only."""
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
        self._save_under_way = self._checkpoint_record(state, labels)
        if self.group is None:
            self._write(state, labels)
        else:
            self._write_on_main(state, labels)
            self._committed(state, labels)
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
        self._committed(state, labels)

    def _committed(self, state: dict[str, Any], labels: tuple[str | int, ...]) -> None:
        """Record a complete save: on rank 0 once its files are written, on the others once it says so."""
        self.last_checkpoint = self._checkpoint_record(state, labels)
        self._save_under_way = None

    def _checkpoint_record(self, state: dict[str, Any], labels: tuple[str | int, ...]) -> SavedCheckpoint:
        label = "latest" if "latest" in map(str, labels) else labels[0]
        return SavedCheckpoint(checkpoint_path(self.run_dir, label), state["epoch"], state["iteration"])

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
            stopped = self._stopped_by_data(error) or self._lost_peer(error)
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

    def _check_precision(self) -> None:
        """The plain trainer computes float32 (:class:`FastTrainer` overrides this)."""
        check_plain_precision(self.opt.precision)

    def _fast_path_text(self) -> str:
        """Why this trainer is not the fast one (:class:`FastTrainer` says why it is)."""
        choice = self.opt.fast_path
        if choice == "off":
            why = "--fast_path off"
        elif self.world_size > 1:
            why = f"{self.world_size} processes under torchrun; the fast path is single-device"
        elif self.device.type != "cuda":
            precision = resolve_training_precision(self.opt.precision, self.device)
            why = f"{self.device.type} device, {precision}; on a CPU the fast path is for bf16"
        else:
            why = "the plain Trainer was built directly; `fastpix2pix train` chooses the fast path"
        return f"fast path off ({why})"

    def _stopped_by_data(self, error: Exception) -> Exception | None:
        """A sample that failed to load (e.g. corrupt data after a valid header) as one line naming the
        file, without the worker process's traceback (``--debug`` shows it); None for other errors."""
        failed = loading_error(error)
        if failed is None:
            return None
        return DataLoadError(
            f"{failed}; training stopped at epoch {self.state.epoch}, iteration {self.state.iteration}: the "
            f"last checkpoint saved before it is kept (--debug shows the full error)",
            failed.details,
        )

    def _lost_peer(self, error: BaseException) -> PeerLostError | None:
        """A collective's failure caused by another process (dead, gone or hung) as one line: who is gone,
        where training stopped, the last checkpoint and how to resume; None for any other error."""
        if self.group is None:
            return None
        state = getattr(self, "state", None)
        where = (
            f"at epoch {state.epoch}, iteration {state.iteration}" if state is not None else "while starting"
        )
        hint = resume_hint(self.run_dir, self.last_checkpoint, self._save_under_way, self.restart)
        return lost_peer_error(self.group, error, where, hint)

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
