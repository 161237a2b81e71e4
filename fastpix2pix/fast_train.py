"""Fast training on one device: the whole official iteration in bf16, channels_last, fused Adam, CUDA graphs.

:class:`FastTrainer` is :class:`fastpix2pix.train.Trainer` (same options, checkpoints, logs, exact resume)
with a different inner loop. One iteration is :class:`FastStep`:

1. ``DeviceDataset.next_batch()`` writes the next augmented batch into static device buffers;
2. :func:`fastpix2pix.train.train_step` itself, unchanged (three D forwards, separate BN batches for real
   and fake, dropout live, running statistics updated, D loss x 0.5, D frozen in the G step), under
   ``torch.autocast`` when ``bf16`` (ConvBlock casts activations and conv weights; BN parameters,
   statistics, master weights, Adam state and losses stay float32);
3. the four losses are written into row ``slot`` of a device buffer and ``slot`` is incremented, on the
   device.

``train_step`` is graph-capturable as it is: its only Python conditionals depend on options and
``requires_grad`` flags, never on tensor values, and at fixed shapes it allocates the same tensors at every
call. With ``cuda_graph`` the step is warmed up on a side stream, captured once into one CUDA graph and
replayed; the warm-up's effects on weights, BN statistics and Adam state are undone in place (the graph
holds their addresses), so the run trains on exactly the iterations it counts. Gradients are set to None
by ``train_step`` before each backward, so during capture they are allocated from the graph's private pool
and stay at the same addresses for every replay (the "whole network capture" recipe of the CUDA graphs
documentation). The learning rate is a device tensor (Adam fused/capturable read it at each step); the
epoch schedulers fill it outside the graph.

Losses reach the host only every ``loss_readback_every`` iterations (one sync, for the log and the
NaN/inf check), at saves and at epoch ends. The iteration loop itself never synchronises.

Checkpoints have exactly the format of :class:`Trainer`: optimizer and scheduler states are converted to
the plain trainer's settings (float learning rates, CPU step counters, no fused/capturable flags) when
saved, and back when loaded, so a fast run can be continued by the normal trainer and vice versa.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fastpix2pix.distributed import torchrun_environment
from fastpix2pix.options import TrainOptions
from fastpix2pix.train import (
    LOSS_NAMES,
    LossWindow,
    Networks,
    Objective,
    Optimizers,
    Trainer,
    build_scheduler,
    crossed,
    resolve_device,
    train_step,
)

__all__ = [
    "FastPathConfig",
    "FastStep",
    "FastTrainer",
    "build_fast_optimizers",
    "load_portable_optimizer_state",
    "portable_optimizer_state",
    "portable_scheduler_state",
]

Batch = tuple[torch.Tensor, torch.Tensor]

# The plain trainer's Adam settings (build_optimizers): what a checkpoint records.
_PLAIN_ADAM_FLAGS = {"fused": None, "capturable": False, "foreach": None}


@dataclass(frozen=True)
class FastPathConfig:
    """The fast path's switches. :meth:`for_device` gives the defaults: all on for CUDA; on CPU no graph,
    no bf16 and foreach instead of fused Adam.

    ``loss_readback_every`` is in iterations; 0 means ``max(1, print_freq // batch_size)``, the plain
    trainer's logging period.
    """

    bf16: bool
    channels_last: bool
    fused_adam: bool
    cuda_graph: bool
    device_data: bool
    loss_readback_every: int = 0

    @classmethod
    def for_device(cls, device: torch.device | str, **changes: Any) -> FastPathConfig:
        cuda = torch.device(device).type == "cuda"
        defaults: dict[str, Any] = {
            "bf16": cuda,
            "channels_last": True,
            "fused_adam": cuda,
            "cuda_graph": cuda,
            "device_data": True,
        }
        return cls(**(defaults | changes))

    def check(self, device: torch.device) -> None:
        if self.cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph needs a CUDA device, got {device}")
        if self.cuda_graph and not self.device_data:
            raise ValueError("cuda_graph needs device_data (the graph reads its batch from static buffers)")
        if self.loss_readback_every < 0:
            raise ValueError(f"loss_readback_every must be >= 0, got {self.loss_readback_every}")


# --- optimizers: fused/capturable Adam with a device learning rate -----------------------------------


def build_fast_optimizers(nets: Networks, opt: TrainOptions, config: FastPathConfig) -> Optimizers:
    """Adam as the official code configures it (lr, betas), with the fast implementation.

    CUDA: ``fused=True`` (or foreach) and ``capturable`` when graphed. CPU: foreach. The learning rate is
    a float here; :func:`use_device_lr` turns it into a device tensor once the schedulers are built.
    """

    def adam(params: Iterable[nn.Parameter]) -> torch.optim.Adam:
        params = list(params)
        cuda = params[0].device.type == "cuda"
        fused = config.fused_adam and cuda
        return torch.optim.Adam(
            params,
            lr=opt.lr,
            betas=(opt.beta1, 0.999),
            fused=True if fused else None,
            foreach=None if fused else True,
            capturable=config.cuda_graph,
        )

    return Optimizers(adam(nets.G.parameters()), adam(nets.D.parameters()))


def use_device_lr(optimizer: torch.optim.Optimizer) -> None:
    """Hold each group's lr in a 0-dim tensor on the parameters' device, so that a captured step reads the
    current value; LRScheduler fills such a tensor in place (``_update_param_group_val``).

    Only for fused or capturable Adam (the others refuse a tensor lr with foreach)."""
    for group in optimizer.param_groups:
        if not isinstance(group["lr"], torch.Tensor):
            device = group["params"][0].device
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)


def _uses_device_lr(optimizer: torch.optim.Optimizer) -> bool:
    group = optimizer.param_groups[0]
    return bool(group.get("fused") or group.get("capturable"))


def _plain(value: Any) -> Any:
    """A float for a 0-dim tensor (lr values), anything else unchanged."""
    return float(value) if isinstance(value, torch.Tensor) and value.dim() == 0 else value


def portable_optimizer_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """An Adam state_dict in the plain trainer's format: float lr, plain flags, step counters on the CPU."""
    groups = [
        {k: _plain(v) if k in ("lr", "initial_lr") else v for k, v in group.items()} | _PLAIN_ADAM_FLAGS
        for group in state["param_groups"]
    ]
    per_param = {
        index: {k: v.detach().to("cpu", torch.float32) if k == "step" else v for k, v in values.items()}
        for index, values in state["state"].items()
    }
    return {"state": per_param, "param_groups": groups}


def portable_scheduler_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """A scheduler state_dict with float learning rates (``_last_lr``/``base_lrs`` may hold tensors)."""
    return {
        k: [_plain(x) for x in v] if k in ("_last_lr", "base_lrs") and isinstance(v, list) else v
        for k, v in state.items()
    }


def load_portable_optimizer_state(optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> None:
    """Load a (plain or fast) Adam state_dict and keep this optimizer's own implementation settings.

    ``Optimizer.load_state_dict`` replaces every group option with the saved one, flags included, so they
    are put back; the lr tensors keep their identity (a captured graph reads their address).
    """
    flags = [{k: g[k] for k in _PLAIN_ADAM_FLAGS} for g in optimizer.param_groups]
    lr_tensors = [g["lr"] if isinstance(g["lr"], torch.Tensor) else None for g in optimizer.param_groups]
    optimizer.load_state_dict(dict(state))
    for group, flag, lr in zip(optimizer.param_groups, flags, lr_tensors, strict=True):
        group.update(flag)
        value = float(group["lr"])
        if lr is not None:
            group["lr"] = lr.fill_(value)
        if group["fused"] or group["capturable"]:
            # These implementations keep the step counter on the parameters' device.
            for param in group["params"]:
                per_param = optimizer.state.get(param, {})
                if "step" in per_param:
                    per_param["step"] = per_param["step"].to(param.device, torch.float32)


# --- one iteration -------------------------------------------------------------------------------------


class FastStep:
    """``next_batch`` + :func:`train_step` + the loss record, run eagerly or as one captured CUDA graph.

    Args:
        nets, optimizers, objective: as for :func:`train_step` (the networks in train mode).
        next_batch: writes the next batch into static buffers and returns them (``DeviceDataset.next_batch``).
        bf16: run the forward passes under ``torch.autocast(device, bfloat16)``.
        loss_rows: rows of the device loss buffer; :meth:`take_losses` must run at least this often.
    """

    def __init__(
        self,
        nets: Networks,
        optimizers: Optimizers,
        objective: Objective,
        next_batch: Callable[[], Batch],
        *,
        bf16: bool,
        loss_rows: int,
    ) -> None:
        self.nets, self.optimizers, self.objective = nets, optimizers, objective
        self.next_batch = next_batch
        self.bf16 = bf16
        self.device = next(nets.G.parameters()).device
        self.losses = torch.zeros((loss_rows, len(LOSS_NAMES)), device=self.device)
        self.slot = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.pending = 0  # iterations whose losses are in ``losses`` and not yet taken (host count)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.fake_B: torch.Tensor | None = None  # the last iteration's generator output (static if graphed)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if not self.bf16:
            return contextlib.nullcontext()
        # No cast cache: cached casts would outlive a capture (torch.cuda.graphs docs, "Usage with AMP").
        return torch.autocast(self.device.type, torch.bfloat16, cache_enabled=False)

    def iteration(self) -> None:
        """One iteration, eagerly (also what is captured)."""
        real_A, real_B = self.next_batch()
        visuals: dict[str, torch.Tensor] = {}
        with self._autocast():
            losses = train_step(
                self.nets, self.optimizers, {"A": real_A, "B": real_B}, self.objective, visuals
            )
        values = torch.stack([losses[name].float() for name in LOSS_NAMES])
        # Device-side slot: the same kernels write the next row at every replay.
        self.losses.index_copy_(0, self.slot, values[None])
        self.slot.add_(1)
        self.fake_B = visuals["fake_B"]

    def __call__(self) -> None:
        if self.pending >= self.losses.shape[0]:
            raise RuntimeError("FastStep: the loss buffer is full; call take_losses() first")
        if self.graph is not None:
            self.graph.replay()
        else:
            self.iteration()
        self.pending += 1

    def take_losses(self) -> torch.Tensor:
        """The pending losses ``[n, len(LOSS_NAMES)]`` (a device copy, no sync) and an empty buffer."""
        rows = self.losses[: self.pending].clone()
        self.slot.zero_()
        self.pending = 0
        return rows

    def capture(self, generators: Iterable[torch.Generator] = (), warmup: int = 3) -> None:
        """Warm up on a side stream, undo the warm-up's training, capture one iteration into a graph.

        ``generators`` (besides the default CUDA generator, which is always graph-safe) are registered
        with the graph: their seed and offset advance at every replay, as in eager mode.
        """
        if self.device.type != "cuda":
            raise ValueError("FastStep.capture needs CUDA")
        saved = self._snapshot()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):  # cuDNN autotuning, lazy Adam state and workspace allocation
                self.iteration()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        for generator in generators:
            graph.register_generator_state(generator)
        with torch.cuda.graph(graph):
            self.iteration()
        # Capture runs no kernel; only the warm-up trained. Undo it in place: the graph holds the addresses.
        self._restore(saved)
        self.slot.zero_()
        self.pending = 0
        self.graph = graph

    # --- warm-up undo ---

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor an iteration updates: weights, buffers (BN statistics, counters), Adam state."""
        tensors: dict[str, torch.Tensor] = {}
        for key, net in zip("GD", self.nets, strict=True):
            tensors |= {f"{key}.{name}": t for name, t in net.state_dict(keep_vars=True).items()}
        for key, optimizer in zip("GD", self.optimizers, strict=True):
            for i, param in enumerate(p for g in optimizer.param_groups for p in g["params"]):
                for name, value in optimizer.state.get(param, {}).items():
                    if isinstance(value, torch.Tensor):
                        tensors[f"opt{key}.{i}.{name}"] = value
        return tensors

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {name: t.detach().clone() for name, t in self._state_tensors().items()}

    @torch.no_grad()
    def _restore(self, saved: Mapping[str, torch.Tensor]) -> None:
        for name, tensor in self._state_tensors().items():
            if name in saved:
                tensor.copy_(saved[name])
            else:  # Adam state created by the warm-up: a fresh optimizer's zeros (step 0, moments 0)
                tensor.zero_()


# --- the trainer -----------------------------------------------------------------------------------------


class FastTrainer(Trainer):
    """:class:`Trainer` with the fast inner loop (:class:`FastStep`) on a :class:`DeviceDataset`.

    Differences from the plain trainer, all in the data path and the logging period, none in the update:
    the crops and flips come from the device generator (same distribution, another random stream; the
    sample order is the plain trainer's :class:`EpochSampler` order), an epoch's last incomplete batch is
    topped up with the epoch's first samples (fixed shapes), and losses are logged every
    ``loss_readback_every`` iterations.
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
        self.config = config or FastPathConfig.for_device(device)
        self.config.check(device)
        if not self.config.device_data:
            raise NotImplementedError("FastTrainer needs device_data=True (the DataLoader path is Trainer's)")
        self.step: FastStep | None = None
        super().__init__(opt, progress_bar=progress_bar, stream=stream)

    # --- setup (called by Trainer.__init__) ---

    def _build(self) -> None:
        from fastpix2pix.device_data import DeviceDataset

        super()._build()
        opt, config = self.opt, self.config
        if config.channels_last:
            for net in self.nets:
                net.to(memory_format=torch.channels_last)
        self.optimizers = build_fast_optimizers(self.nets, opt, config)
        self.schedulers = Optimizers(*(build_scheduler(o, opt) for o in self.optimizers))
        for optimizer in self.optimizers:
            if _uses_device_lr(optimizer):
                use_device_lr(optimizer)
        self.data = DeviceDataset(
            self.dataset, self.device, opt.batch_size, channels_last=config.channels_last, seed=opt.seed
        )
        self.readback_every = config.loss_readback_every or max(1, opt.print_freq // opt.batch_size)
        self.window = LossWindow()

    # --- checkpoints in the plain trainer's format ---

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        for key in ("optimizer_G", "optimizer_D"):
            state[key] = portable_optimizer_state(state[key])
        for key in ("scheduler_G", "scheduler_D"):
            state[key] = portable_scheduler_state(state[key])
        return state

    def _restore(self, resumed: dict[str, Any]) -> None:
        optimizers = self.optimizers
        # Trainer._restore loads the optimizers with plain load_state_dict: give it shims that load the
        # portable way instead, keeping this trainer's fused/capturable settings and lr tensors.
        self.optimizers = Optimizers(*(_PortableLoader(o) for o in optimizers))  # type: ignore[arg-type]
        try:
            super()._restore(resumed)
        finally:
            self.optimizers = optimizers
        for optimizer in optimizers:  # the scheduler's load may have put a float lr back
            if _uses_device_lr(optimizer):
                use_device_lr(optimizer)

    # --- the loop ---

    def _ensure_step(self) -> FastStep:
        """Build (and capture, with ``cuda_graph``) the step once, in train mode, inside ``fit``."""
        if self.step is None:
            self.nets.G.train()
            self.nets.D.train()
            step = FastStep(
                self.nets, self.optimizers, self.objective, self.data.next_batch,
                bf16=self.config.bf16, loss_rows=self.readback_every,
            )  # fmt: skip
            if self.config.cuda_graph:
                step.capture(generators=(self.data.generator,))
            self.step = step
        return self.step

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
        for _ in range(data.batches_per_epoch):
            step()
            state.iteration += 1
            before = state.images
            state.images += data.batch_size
            # The wrapped last batch tops up with samples of this epoch already counted.
            state.epoch_iter = min(len(data), state.epoch_iter + data.batch_size)
            if self.bar is not None:
                self.bar.update()
            if step.pending >= self.readback_every:
                self._log_window()
            if crossed(before, state.images, opt.display_freq):
                self._display({"A": data.A, "B": data.B}, step.fake_B.float())
            if crossed(before, state.images, opt.save_latest_freq):
                self.save(("latest",))
            if self._reached_max_iters():
                return False
        return True


class _PortableLoader:
    """Stands in for an optimizer while Trainer._restore runs: load_state_dict goes the portable way."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        load_portable_optimizer_state(self.optimizer, state)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.optimizer, name)


def use_fast_path(opt: TrainOptions) -> bool:
    """``--fast_path``: auto means one CUDA process (the path is single-GPU; see :class:`FastTrainer`)."""
    if opt.fast_path != "auto":
        return opt.fast_path == "on"
    environment = torchrun_environment()
    single_process = environment is None or environment[1] == 1
    return single_process and resolve_device(opt.device).type == "cuda"


def fast_train(
    opt: TrainOptions, config: FastPathConfig | None = None, *, progress_bar: bool = True
) -> Trainer:
    """Build a :class:`FastTrainer` and run it; returns the trainer."""
    trainer = FastTrainer(opt, config, progress_bar=progress_bar)
    trainer.fit()
    return trainer
