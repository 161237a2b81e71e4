"""The fast trainer: :class:`~fastpix2pix.training.trainer.Trainer` with the fast iteration inside."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import torch

from fastpix2pix.data.sources.plan import plan_batch_source
from fastpix2pix.ops.selfcheck import fused_kernels_usable, self_check_enabled
from fastpix2pix.runs.options import TrainOptions
from fastpix2pix.runtime import Precision, resolve_device
from fastpix2pix.training.distributed import torchrun_environment
from fastpix2pix.training.fast_step import (
    LOSS_BUFFER_ROWS,
    FastPathConfig,
    FastStep,
    GraphRuntime,
    attach_weight_copies,
    build_fast_optimizers,
)
from fastpix2pix.training.graph_check import verify_captured_step
from fastpix2pix.training.optim import (
    PortableLoader,
    build_scheduler,
    portable_optimizer_state,
    portable_scheduler_state,
    use_device_lr,
    uses_device_lr,
)
from fastpix2pix.training.precision import check_plain_precision, resolve_training_precision
from fastpix2pix.training.progress import LossWindow, crossed
from fastpix2pix.training.step import Optimizers
from fastpix2pix.training.trainer import Trainer, train

__all__ = ["FastTrainer", "fast_train", "run_training", "use_fast_path"]


# --- the trainer -----------------------------------------------------------------------------------------


class FastTrainer(Trainer):
    """:class:`Trainer` with the fast inner loop (:class:`FastStep`) on a batch source chosen by
    :func:`fastpix2pix.data.sources.plan.plan_batch_source` (``--device_data``, ``--device_data_share``).

    Differences from the plain trainer, all in the data path and the logging period, none in the update:
    with the dataset on the device the crops and flips come from the device generator (same distribution,
    another random stream; the sample order is the plain trainer's :class:`EpochSampler` order); an epoch's
    last incomplete batch is topped up with the epoch's first samples (fixed shapes; only the new samples
    are counted, so logging, display and save points fall where the plain trainer's do); losses are logged
    every ``loss_readback_every`` iterations.
    """

    def __init__(
        self,
        opt: TrainOptions,
        config: FastPathConfig | None = None,
        *,
        progress_bar: bool = True,
        stream: Any = None,
    ) -> None:
        environment = torchrun_environment()
        if environment is not None and environment[1] > 1:
            # It steps the bare networks in one captured graph: under DDP each rank would train alone.
            raise ValueError(
                "the fast single-GPU path does not run under torchrun with several processes; "
                "`fastpix2pix train` uses the plain DDP trainer there (see README, multiple GPUs)"
            )
        device = resolve_device(opt.device)
        if config is None:
            self.precision = resolve_training_precision(opt.precision, device)
            config = FastPathConfig.for_device(device, bf16=self.precision.bf16)
        else:
            self.precision = Precision("bf16" if config.bf16 else "fp32", "the FastPathConfig given")
        if opt.no_self_check:
            config = replace(config, verify_graph=False)
        self.config = config
        self.config.check(device)
        if not self.config.device_data:
            raise NotImplementedError("FastTrainer needs device_data=True (the DataLoader path is Trainer's)")
        self.step: FastStep | None = None
        # The device calls of a capture; None: CUDA. Tests put an EagerGraphRuntime here to run the
        # capture path on the CPU (with config.cuda_graph switched on after construction).
        self.graph_runtime: GraphRuntime | None = None
        self._resumed_data: Mapping[str, Any] | None = None  # the checkpoint's batch-source state
        super().__init__(opt, progress_bar=progress_bar, stream=stream)

    # --- setup (called by Trainer.__init__) ---

    def _check_precision(self) -> None:
        pass  # any precision: resolved in __init__, before the device and data were planned

    def _fast_path_text(self) -> str:
        choice = self.opt.fast_path
        if choice == "on" or self.device.type != "cuda":
            where = f"--fast_path {choice}, {self.device.type} device"
        else:
            where = f"--fast_path {choice}: one CUDA process"
        return f"fast path on ({where}), {self.precision}"

    def _build(self) -> None:
        super()._build()
        opt, config = self.opt, self.config
        if config.channels_last:
            for net in self.nets:
                net.to(memory_format=torch.channels_last)
        self.optimizers = build_fast_optimizers(self.nets, opt, config)
        self.schedulers = Optimizers(*(build_scheduler(o, opt) for o in self.optimizers))
        for optimizer in self.optimizers:
            if uses_device_lr(optimizer):
                use_device_lr(optimizer)
        self.data, reason = plan_batch_source(
            self.dataset, self.device, opt.batch_size, channels_last=config.channels_last, seed=opt.seed,
            policy=opt.device_data, max_share=opt.device_data_share, workers=opt.num_threads,
        )  # fmt: skip
        self.say(reason)
        self.readback_every = config.loss_readback_every or max(1, opt.print_freq // opt.batch_size)
        self.window = LossWindow()

    def close(self) -> None:
        """Also stop the streaming source's worker processes."""
        close_data = getattr(getattr(self, "data", None), "close", None)
        if close_data is not None:
            close_data()
        super().close()

    # --- checkpoints in the plain trainer's format ---

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        for key in ("optimizer_G", "optimizer_D"):
            state[key] = portable_optimizer_state(state[key])
        for key in ("scheduler_G", "scheduler_D"):
            state[key] = portable_scheduler_state(state[key])
        # The source's position and augmentation generator: reseeding from (seed, epoch) alone would replay
        # the epoch's first crops and flips after a mid-epoch resume. The plain trainer ignores the key.
        state["data_source"] = self.data.state_dict()
        return state

    def _restore(self, resumed: dict[str, Any]) -> None:
        optimizers = self.optimizers
        # Trainer._restore loads the optimizers with plain load_state_dict: give it shims that load the
        # portable way instead, keeping this trainer's fused/capturable settings and lr tensors.
        self.optimizers = Optimizers(*(PortableLoader(o) for o in optimizers))  # type: ignore[arg-type]
        try:
            super()._restore(resumed)
        finally:
            self.optimizers = optimizers
        for optimizer in optimizers:  # the scheduler's load may have put a float lr back
            if uses_device_lr(optimizer):
                use_device_lr(optimizer)
        # Applied once the epoch is started (the source's load_state_dict needs its epoch and position).
        self._resumed_data = resumed.get("data_source")

    def _resume_data_position(self) -> None:
        """Put the source's position and random state back to the checkpoint's, the first time an epoch
        starts after a resume. Older checkpoints and the plain trainer's have none: the rest of the epoch
        then draws new crops and flips (the same samples, in the same order)."""
        saved, self._resumed_data = self._resumed_data, None
        if saved is not None:
            self.data.load_state_dict(saved)  # ignores a state of an earlier, finished epoch
        elif self.state.epoch_iter:
            self.say(
                "the checkpoint holds no batch-source state (plain trainer or older version): the rest of "
                "this epoch has the same samples but new crops and flips"
            )

    # --- the loop ---

    def _ensure_step(self) -> FastStep:
        """Build (and capture, with ``cuda_graph``) the step once, in train mode, inside ``fit``. What that
        costs (the kernel check, the capture with its warm-up and cuDNN's autotuning, the graph check) is
        said in one line and kept out of the first logged iteration time."""
        if self.step is None:
            self.nets.G.train()
            self.nets.D.train()
            attach_weight_copies(self.nets, self.optimizers)  # from the final (initial or resumed) weights
            step = FastStep(
                self.nets, self.optimizers, self.objective, self.data,
                bf16=self.config.bf16, loss_rows=min(self.readback_every, LOSS_BUFFER_ROWS),
                pairs_as_one_batch=self.config.pairs_as_one_batch,
            )  # fmt: skip
            if self.config.cuda_graph and not self.data.fixed_shape:
                self.say("the batches change shape (images of several sizes): training without a CUDA graph")
            elif self.config.cuda_graph:
                timings = {
                    "kernel check": _seconds(self._check_kernels),
                    "capture (warm-up, autotuning)": _seconds(
                        lambda: step.capture(runtime=self.graph_runtime)
                    ),
                    "replay vs eager": _seconds(lambda: self._verify_graph(step)),
                }
                parts = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in timings.items())
                self.say(
                    f"fast path start-up {sum(timings.values()):.2f} s ({parts}), not in the iteration times"
                )
                self.window.started = time.perf_counter()
            self.step = step
        return self.step

    def _check_kernels(self) -> None:
        """Run the start-up kernel check now, eagerly, if it is due: a capture cannot run it (it
        synchronises), and its verdict decides which ops the graph records."""
        if self.opt.backend == "fused":
            fused_kernels_usable(self.device)

    def _verify_graph(self, step: FastStep) -> None:
        """The start-up graph check (:func:`fastpix2pix.training.graph_check.verify_captured_step`): on a
        mismatch, train eagerly (still bf16, channels_last, fused Adam) rather than on a wrong graph."""
        if not (self.config.verify_graph and self_check_enabled()):
            return
        check = verify_captured_step(step)
        if not check.passed:
            self.say(f"CUDA graph check failed ({check.describe()}); training eagerly")
            step.graph = None

    def _log_window(self) -> dict[str, float] | None:
        self._flush_losses()
        return super()._log_window()

    def _flush_losses(self) -> None:
        if self.step is None or not self.step.pending:
            return
        last = self.state.iteration
        rows = self.step.take_losses()
        where = [(self.state.epoch, last - len(rows) + 1 + i) for i in range(len(rows))]
        # LossWindow keeps one 0-dim stack per iteration; one device copy of all rows, no sync.
        self.window._losses.extend(rows.unbind(0))
        self.window._where.extend(where)

    def _train_epoch(self) -> bool:
        state, opt, data = self.state, self.opt, self.data
        step = self._ensure_step()
        self.nets.G.train()
        self.nets.D.train()
        data.start_epoch(state.epoch, order=self.sampler.order(state.epoch), start=state.epoch_iter)
        self._resume_data_position()
        for _ in range(data.batches_per_epoch):
            step()
            state.iteration += 1
            before = state.images
            # Count the epoch's new samples only: the wrapped last batch tops up with samples already
            # counted, which the plain trainer's smaller last batch does not have.
            new = min(len(data), state.epoch_iter + data.batch_size) - state.epoch_iter
            state.images += new
            state.epoch_iter += new
            if self.bar is not None:
                self.bar.update()
            if step.pending == step.losses.shape[0]:
                self._flush_losses()  # a full buffer: its rows move to the loss window, still on the device
            if len(self.window) + step.pending >= self.readback_every:
                self._log_window()
            if crossed(before, state.images, opt.display_freq):
                self._display({"A": data.A, "B": data.B}, step.fake_B.float())
            if crossed(before, state.images, opt.save_latest_freq):
                self.save(("latest",))
            if self._reached_max_iters():
                return False
        return True


def use_fast_path(opt: TrainOptions) -> bool:
    """``--fast_path``: auto means one process, on CUDA or training in bf16 on the CPU (``--precision``;
    the path is single-device, see :class:`FastTrainer`)."""
    if opt.fast_path != "auto":
        return opt.fast_path == "on"
    environment = torchrun_environment()
    if environment is not None and environment[1] > 1:
        return False
    device = resolve_device(opt.device)
    return device.type == "cuda" or resolve_training_precision(opt.precision, device).bf16


def fast_train(
    opt: TrainOptions, config: FastPathConfig | None = None, *, progress_bar: bool = True
) -> Trainer:
    """Build a :class:`FastTrainer` and run it; returns the trainer."""
    trainer = FastTrainer(opt, config, progress_bar=progress_bar)
    trainer.fit()
    return trainer


def run_training(opt: TrainOptions, *, progress_bar: bool = True) -> Trainer:
    """Train as ``fastpix2pix train`` does: the fast trainer where :func:`use_fast_path` chooses it, else the
    plain one. Returns the trainer after its last epoch (or ``--max_iters``)."""
    if use_fast_path(opt):
        return fast_train(opt, progress_bar=progress_bar)
    check_plain_precision(opt.precision)  # before the plain trainer makes its run folder
    return train(opt, progress_bar=progress_bar)


def _seconds(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started
