"""Fast training on one device: the whole official iteration in bf16, channels_last, fused Adam, CUDA graphs.

:class:`FastTrainer` is :class:`fastpix2pix.train.Trainer` (same options, checkpoints, logs, exact resume)
with a different inner loop. One iteration is :class:`FastStep`:

1. the batch source (:func:`fastpix2pix.device_data.plan_batch_source`: the dataset held on the device, or
   streamed from host memory when it does not fit or its images differ in size) writes the next augmented
   batch into static device buffers;
2. :func:`fastpix2pix.train.train_step` itself, unchanged (three D forwards, separate BN batches for real
   and fake, dropout live, running statistics updated, D loss x 0.5, D frozen in the G step), under
   ``torch.autocast`` when ``bf16`` (ConvBlock casts activations and conv weights; BN parameters,
   statistics, master weights, Adam state and losses stay float32);
3. the four losses are written into row ``slot`` of a device buffer and ``slot`` is incremented, on the
   device.

``train_step`` is graph-capturable as it is: its only Python conditionals depend on options and
``requires_grad`` flags, never on tensor values, and at fixed shapes it allocates the same tensors at every
call. With ``cuda_graph`` the step is warmed up on a side stream, captured once into one CUDA graph and
replayed; the warm-up's effects are undone in place (weights, BN statistics, Adam state: the graph holds
their addresses; the dropout generator, the batch source's position and generator), so that the run trains
on exactly the iterations it counts and draws the random numbers an eager run would (checked on the CPU,
where :class:`EagerGraphRuntime` stands in for the CUDA calls; not yet run on a GPU). Gradients are
set to None by ``train_step`` before each backward, so during capture they are allocated from the graph's
private pool and stay at the same addresses for every replay (the "whole network capture" recipe of the
CUDA graphs documentation). The learning rate is a device tensor (Adam fused/capturable read it at each
step); the epoch schedulers fill it outside the graph. A source that cannot run inside a graph (the
streaming one: the host waits for its workers) fetches eagerly before each replay into the buffers the
graph reads; one whose batches change shape runs without a graph.

Losses reach the host only every ``loss_readback_every`` iterations (one sync, for the log and the
NaN/inf check), at saves and at epoch ends. The iteration loop itself never synchronises.

Checkpoints have exactly the format of :class:`Trainer`, plus the batch source's state (``data_source``:
its position and augmentation generator, for an exact mid-epoch resume; optional when loading): optimizer
and scheduler states are converted to the plain trainer's settings (float learning rates, CPU step
counters, no fused/capturable flags) when saved, and back when loaded (the Adam moments in each
parameter's memory format, as fused Adam requires), so a fast run can be continued by the normal trainer
and vice versa.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

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

if TYPE_CHECKING:
    from fastpix2pix.device_data import BatchSource

__all__ = [
    "CudaGraphRuntime",
    "EagerGraphRuntime",
    "FastPathConfig",
    "FastStep",
    "FastTrainer",
    "GraphRuntime",
    "build_fast_optimizers",
    "default_generator",
    "load_portable_optimizer_state",
    "portable_optimizer_state",
    "portable_scheduler_state",
]

Batch = tuple[torch.Tensor, torch.Tensor]

# The plain trainer's Adam settings (build_optimizers): what a checkpoint records.
_PLAIN_ADAM_FLAGS = {"fused": None, "capturable": False, "foreach": None}


@dataclass(frozen=True)
class FastPathConfig:
    """The fast path's switches. :meth:`for_device` gives the defaults: all on for CUDA; on CPU fused Adam
    and device data only (no graph, float32, NCHW: the fastest CPU configuration measured, and the plain
    trainer's function).

    ``loss_readback_every`` is in iterations; 0 means ``max(1, print_freq // batch_size)``, the plain
    trainer's logging period. ``verify_graph``: after capture, compare one replay with an eager iteration
    (:func:`fastpix2pix.selfcheck.verify_captured_step`) and train eagerly if they disagree.
    """

    bf16: bool
    channels_last: bool
    fused_adam: bool
    cuda_graph: bool
    device_data: bool
    loss_readback_every: int = 0
    verify_graph: bool = True

    @classmethod
    def for_device(cls, device: torch.device | str, **changes: Any) -> FastPathConfig:
        cuda = torch.device(device).type == "cuda"
        defaults: dict[str, Any] = {
            "bf16": cuda,
            "channels_last": cuda,  # on CPU NCHW is faster (benchmarks/bench_train.py, ours:*:cl:* rows)
            "fused_adam": True,  # CPU too: several times faster than foreach there
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

    ``fused=True`` (else foreach), and ``capturable`` when graphed (CUDA). The learning rate is a float
    here; :func:`use_device_lr` turns it into a device tensor once the schedulers are built.
    """

    def adam(params: Iterable[nn.Parameter]) -> torch.optim.Adam:
        fused = config.fused_adam  # CUDA and CPU both have it
        return torch.optim.Adam(
            list(params),
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
    are put back; the lr tensors keep their identity (a captured graph reads their address). It also keeps
    the saved tensors' strides, so moments saved from NCHW weights would stay NCHW next to channels_last
    weights, which CUDA fused Adam refuses: every per-parameter tensor is given its parameter's layout.
    """
    flags = [{k: g[k] for k in _PLAIN_ADAM_FLAGS} for g in optimizer.param_groups]
    lr_tensors = [g["lr"] if isinstance(g["lr"], torch.Tensor) else None for g in optimizer.param_groups]
    optimizer.load_state_dict(dict(state))
    for group, flag, lr in zip(optimizer.param_groups, flags, lr_tensors, strict=True):
        group.update(flag)
        value = float(group["lr"])
        if lr is not None:
            group["lr"] = lr.fill_(value)
        on_device_step = group["fused"] or group["capturable"]
        for param in group["params"]:
            per_param = optimizer.state.get(param, {})
            for key, tensor in per_param.items():
                if key == "step":
                    if on_device_step:  # these implementations keep the counter on the parameters' device
                        per_param[key] = tensor.to(param.device, torch.float32)
                elif isinstance(tensor, torch.Tensor) and tensor.shape == param.shape:
                    per_param[key] = _in_layout_of(tensor, param)


def _in_layout_of(tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``tensor``'s values with ``param``'s strides, device and dtype (``tensor`` itself if it has them)."""
    if tensor.stride() == param.stride() and tensor.device == param.device and tensor.dtype == param.dtype:
        return tensor
    return torch.empty_like(param, requires_grad=False).copy_(tensor.detach())


# --- capturing a graph: the CUDA calls, and a CPU stand-in for tests --------------------------------------


class ReplayableGraph(Protocol):
    def replay(self) -> None: ...


class GraphRuntime(Protocol):
    """The device calls of :meth:`FastStep.capture`, apart from its bookkeeping (which is device-generic)."""

    def side_stream(self) -> contextlib.AbstractContextManager[None]:
        """Where the warm-up runs (a side stream on CUDA, as graph capture requires)."""
        ...

    def capture(self, body: Callable[[], None], generators: Sequence[torch.Generator]) -> ReplayableGraph:
        """Capture ``body`` (registering ``generators``, whose offsets then advance at each replay)."""
        ...

    def default_generator(self) -> torch.Generator:
        """The generator dropout draws from."""
        ...


def default_generator(device: torch.device) -> torch.Generator:
    """torch's default generator of ``device`` (the one dropout draws from there)."""
    if device.type != "cuda":
        return torch.default_generator
    torch.cuda.init()  # fills torch.cuda.default_generators
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.default_generators[index]


class CudaGraphRuntime:
    """:class:`GraphRuntime` on a CUDA device."""

    def __init__(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(f"FastStep.capture needs CUDA, got {device}")
        self.device = device

    @contextlib.contextmanager
    def side_stream(self) -> Iterator[None]:
        with torch.cuda.device(self.device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                yield
            torch.cuda.current_stream().wait_stream(side)

    def capture(self, body: Callable[[], None], generators: Sequence[torch.Generator]) -> ReplayableGraph:
        graph = torch.cuda.CUDAGraph()
        for generator in generators:
            graph.register_generator_state(generator)
        # thread_local: the default ("global") lets a CUDA call from any other thread invalidate the capture,
        # e.g. the streaming source's DataLoader pin-memory thread allocating pinned memory meanwhile.
        with torch.cuda.device(self.device), torch.cuda.graph(graph, capture_error_mode="thread_local"):
            body()
        return graph

    def default_generator(self) -> torch.Generator:
        return default_generator(self.device)


class _EagerReplay:
    def __init__(self, body: Callable[[], None]) -> None:
        self.body = body

    def replay(self) -> None:
        self.body()


class EagerGraphRuntime:
    """A CPU stand-in for :class:`CudaGraphRuntime`, so that the capture logic is tested without a GPU: as
    a CUDA capture, ``capture`` runs no computation; ``replay`` runs the captured body eagerly, which is what
    a correct replay computes (CUDA graphs replay the same kernels on the same buffers)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)

    def side_stream(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def capture(self, body: Callable[[], None], generators: Sequence[torch.Generator]) -> ReplayableGraph:
        return _EagerReplay(body)

    def default_generator(self) -> torch.Generator:
        return default_generator(self.device)


# --- one iteration -------------------------------------------------------------------------------------


class _BatchFunction:
    """A function that writes the next batch into static buffers and returns them, as a batch source that
    may run inside the graph and has no state of its own to save (benchmarks, tests)."""

    in_graph = True
    fixed_shape = True

    def __init__(self, next_batch: Callable[[], Batch]) -> None:
        self._next_batch = next_batch
        self.A: torch.Tensor | None = None
        self.B: torch.Tensor | None = None

    def next_batch(self) -> Batch:
        self.A, self.B = self._next_batch()
        return self.A, self.B

    def generators(self) -> tuple[torch.Generator, ...]:
        return ()

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


def _as_source(source: BatchSource | Callable[[], Batch]) -> BatchSource:
    if hasattr(source, "next_batch"):
        return source  # type: ignore[return-value]
    return _BatchFunction(source)  # type: ignore[arg-type,return-value]


class FastStep:
    """The next batch + :func:`train_step` + the loss record, run eagerly or as one captured CUDA graph.

    Args:
        nets, optimizers, objective: as for :func:`train_step` (the networks in train mode).
        source: the batch source (:class:`fastpix2pix.device_data.BatchSource`), or a function that writes
            the next batch into static buffers and returns them (it runs inside the graph).
        bf16: run the forward passes under ``torch.autocast(device, bfloat16)``.
        loss_rows: rows of the device loss buffer; :meth:`take_losses` must run at least this often.

    A source with ``in_graph`` makes its batch inside :meth:`iteration` (and so inside the graph); any other
    makes it in :meth:`prepare_batch`, eagerly, before each iteration or replay, into ``source.A`` and
    ``source.B``, which :meth:`iteration` reads.
    """

    def __init__(
        self,
        nets: Networks,
        optimizers: Optimizers,
        objective: Objective,
        source: BatchSource | Callable[[], Batch],
        *,
        bf16: bool,
        loss_rows: int,
    ) -> None:
        if loss_rows < 1:
            raise ValueError(f"loss_rows must be >= 1, got {loss_rows}")
        self.nets, self.optimizers, self.objective = nets, optimizers, objective
        self.source = _as_source(source)
        self.bf16 = bf16
        self.device = next(nets.G.parameters()).device
        self.losses = torch.zeros((loss_rows, len(LOSS_NAMES)), device=self.device)
        self.slot = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.pending = 0  # iterations whose losses are in ``losses`` and not yet taken (host count)
        self.graph: ReplayableGraph | None = None
        self._graph_inputs: Batch | None = None  # the buffers a graph reads when the batch is made eagerly
        self.fake_B: torch.Tensor | None = None  # the last iteration's generator output (static if graphed)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if not self.bf16:
            return contextlib.nullcontext()
        # No cast cache: cached casts would outlive a capture (torch.cuda.graphs docs, "Usage with AMP").
        return torch.autocast(self.device.type, torch.bfloat16, cache_enabled=False)

    def prepare_batch(self) -> None:
        """Make the next batch now, outside any graph, if the source cannot run inside one."""
        if not self.source.in_graph:
            self.source.next_batch()

    def _batch(self) -> Batch:
        if self.source.in_graph:
            return self.source.next_batch()
        return self.source.A, self.source.B

    def iteration(self) -> None:
        """One iteration, eagerly (also what is captured), on the batch :meth:`prepare_batch` made if the
        source makes it eagerly."""
        real_A, real_B = self._batch()
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
        self.prepare_batch()
        if self.graph is not None:
            self._check_graph_inputs()
            self.graph.replay()
        else:
            self.iteration()
        self.pending += 1

    def _check_graph_inputs(self) -> None:
        """A graph reads the buffers it was captured with: a source that replaced them would train the
        graph on a stale batch without any error."""
        if self._graph_inputs is not None and (
            self.source.A is not self._graph_inputs[0] or self.source.B is not self._graph_inputs[1]
        ):
            raise RuntimeError(
                "FastStep: the batch source replaced its A/B buffers after capture; the graph reads the old "
                "ones (a source with fixed_shape must write its batches in place)"
            )

    def reset_losses(self) -> None:
        """Empty the loss buffer (what :meth:`take_losses` does, without reading it)."""
        self.slot.zero_()
        self.pending = 0

    def take_losses(self) -> torch.Tensor:
        """The pending losses ``[n, len(LOSS_NAMES)]`` (a device copy, no sync) and an empty buffer."""
        rows = self.losses[: self.pending].clone()
        self.reset_losses()
        return rows

    def capture(self, warmup: int = 3, *, runtime: GraphRuntime | None = None) -> None:
        """Warm up on a side stream, capture one iteration into a graph, then undo the warm-up.

        Undone in place (the graph holds the addresses): the weights, BN statistics and Adam state, the
        dropout generator's state, the source's position and random state (its generators, registered
        with the graph when the batch is made inside it, then advance at every replay as in eager mode).
        So the first replay draws and trains exactly what the first eager iteration would have.
        ``runtime``: the device calls (default :class:`CudaGraphRuntime`; :class:`EagerGraphRuntime` on CPU).
        """
        runtime = CudaGraphRuntime(self.device) if runtime is None else runtime
        saved = self._snapshot()
        dropout = runtime.default_generator()
        dropout_state = dropout.get_state()
        source_state = self.source.state_dict()
        with runtime.side_stream():
            self._warm_up(warmup)
        in_graph = self.source.in_graph
        self._graph_inputs = None if in_graph else (self.source.A, self.source.B)
        graph = runtime.capture(self.iteration, self.source.generators() if in_graph else ())
        # Capture runs no kernel; only the warm-up trained and drew random numbers.
        self._restore(saved)
        dropout.set_state(dropout_state)
        self.source.load_state_dict(source_state)
        self.reset_losses()
        self.graph = graph

    def _warm_up(self, iterations: int) -> None:
        """cuDNN autotuning, lazy Adam state and workspace allocation; also makes the batch an eagerly fed
        graph is captured on. Each iteration writes loss row 0: the buffer may have a single row."""
        self.prepare_batch()
        for i in range(iterations):
            if i:
                self.prepare_batch()
            self.slot.zero_()
            self.iteration()

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
    """:class:`Trainer` with the fast inner loop (:class:`FastStep`) on a batch source chosen by
    :func:`fastpix2pix.device_data.plan_batch_source` (``--device_data``, ``--device_data_share``).

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
        config = config or FastPathConfig.for_device(device)
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

    def _build(self) -> None:
        from fastpix2pix.device_data import plan_batch_source

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
        self.optimizers = Optimizers(*(_PortableLoader(o) for o in optimizers))  # type: ignore[arg-type]
        try:
            super()._restore(resumed)
        finally:
            self.optimizers = optimizers
        for optimizer in optimizers:  # the scheduler's load may have put a float lr back
            if _uses_device_lr(optimizer):
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
        """Build (and capture, with ``cuda_graph``) the step once, in train mode, inside ``fit``."""
        if self.step is None:
            self.nets.G.train()
            self.nets.D.train()
            step = FastStep(
                self.nets, self.optimizers, self.objective, self.data,
                bf16=self.config.bf16, loss_rows=self.readback_every,
            )  # fmt: skip
            if self.config.cuda_graph and not self.data.fixed_shape:
                self.say("the batches change shape (images of several sizes): training without a CUDA graph")
            elif self.config.cuda_graph:
                self._check_kernels()
                step.capture(runtime=self.graph_runtime)
                self._verify_graph(step)
            self.step = step
        return self.step

    def _check_kernels(self) -> None:
        """Run the start-up kernel check now, eagerly, if it is due: a capture cannot run it (it
        synchronises), and its verdict decides which ops the graph records."""
        if self.opt.backend == "fused":
            from fastpix2pix.selfcheck import fused_kernels_usable

            fused_kernels_usable(self.device)

    def _verify_graph(self, step: FastStep) -> None:
        """The start-up graph check (:func:`fastpix2pix.selfcheck.verify_captured_step`): on a mismatch,
        train eagerly (still bf16, channels_last, fused Adam) rather than on a wrong graph."""
        from fastpix2pix.selfcheck import self_check_enabled, verify_captured_step

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
