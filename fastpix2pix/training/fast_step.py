"""The fast iteration: the whole official iteration in bf16, channels_last, fused Adam, CUDA graphs.

The fast trainer (:mod:`fastpix2pix.training.fast_trainer`) is the plain trainer (same options, checkpoints,
logs, exact resume) with this inner loop. One iteration is :class:`FastStep`:

1. the batch source (:func:`fastpix2pix.data.sources.plan.plan_batch_source`: the dataset held on the device,
   or streamed from host memory when it does not fit or its images differ in size) writes the next augmented
   batch into static device buffers;
2. :func:`fastpix2pix.training.step.train_step` itself (separate BN batches for real and fake, dropout live,
   running statistics updated, D loss x 0.5, D frozen in the G step; with ``pairs_as_one_batch``, the
   default, the D step's fake and real pairs go through D as one batch of two BatchNorm groups), under
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
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fastpix2pix.data.sources.base import BatchSource
from fastpix2pix.ops.running_stats import deferred_running_stats
from fastpix2pix.runs.networks import Networks
from fastpix2pix.runs.options import TrainOptions
from fastpix2pix.training.master_weights import MasterWeightAdam
from fastpix2pix.training.step import LOSS_NAMES, Objective, Optimizers, train_step

__all__ = [
    "CudaGraphRuntime",
    "EagerGraphRuntime",
    "FastPathConfig",
    "FastStep",
    "GraphRuntime",
    "attach_weight_copies",
    "build_fast_optimizers",
    "default_generator",
]

Batch = tuple[torch.Tensor, torch.Tensor]

# The most rows of the device loss buffer: when it fills, the trainer moves the rows to its loss window (a
# device copy, no sync), so a long logging period (--print_freq) costs no more device memory than this.
LOSS_BUFFER_ROWS = 256


@dataclass(frozen=True)
class FastPathConfig:
    """The fast path's switches. :meth:`for_device` gives the defaults: all on for CUDA; on CPU fused Adam
    and device data (no graph; float32 in NCHW, the fastest float32 CPU configuration measured and the
    plain trainer's function, or bf16 in channels_last).

    ``loss_readback_every`` is in iterations; 0 means ``max(1, print_freq // batch_size)``, the plain
    trainer's logging period. ``pairs_as_one_batch``: D's fake and real pairs in one forward with per-part
    BatchNorm statistics (:func:`fastpix2pix.training.step.train_step`). ``verify_graph``: after capture,
    compare one replay with an eager iteration
    (:func:`fastpix2pix.training.graph_check.verify_captured_step`) and train eagerly if they disagree.
    """

    bf16: bool
    channels_last: bool
    fused_adam: bool
    cuda_graph: bool
    device_data: bool
    loss_readback_every: int = 0
    verify_graph: bool = True
    weight_copies: bool = False
    pairs_as_one_batch: bool = False

    @classmethod
    def for_device(cls, device: torch.device | str, **changes: Any) -> FastPathConfig:
        cuda = torch.device(device).type == "cuda"
        bf16 = changes.get("bf16", cuda)
        defaults: dict[str, Any] = {
            "bf16": cuda,
            # On CPU NCHW is faster in float32 (benchmarks/bench_train.py, ours:*:cl:* rows), channels_last
            # in bf16 (unet_128, 1 thread, Xeon with AVX512-BF16: 157 against 172 ms per iteration).
            "channels_last": cuda or bf16,
            "fused_adam": True,  # CPU too: several times faster than foreach there
            "cuda_graph": cuda,
            "device_data": True,
            # bf16 conv weights kept by the optimizer (fastpix2pix.training.master_weights); on a GPU only
            # where its kernel passes the start-up check (else the blocks cast, as without copies).
            "weight_copies": bf16,
            # D's fake and real pairs in one forward: fewer, larger kernels (grouped BatchNorm statistics).
            "pairs_as_one_batch": True,
        }
        return cls(**(defaults | changes))

    def check(self, device: torch.device) -> None:
        if self.cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph needs a CUDA device, got {device}")
        if self.cuda_graph and not self.device_data:
            raise ValueError("cuda_graph needs device_data (the graph reads its batch from static buffers)")
        if self.weight_copies and not (self.bf16 and self.fused_adam):
            raise ValueError("weight_copies needs bf16 and fused_adam (the copies are bf16, kept by Adam)")
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
        settings: dict[str, Any] = {
            "lr": opt.lr,
            "betas": (opt.beta1, 0.999),
            "fused": True if fused else None,
            "foreach": None if fused else True,
            "capturable": config.cuda_graph,
        }
        if config.weight_copies:  # the copies are attached once the weights are final (attach_weight_copies)
            return MasterWeightAdam(list(params), backend=opt.backend, **settings)
        return torch.optim.Adam(list(params), **settings)

    return Optimizers(adam(nets.G.parameters()), adam(nets.D.parameters()))


def attach_weight_copies(nets: Networks, optimizers: Optimizers) -> int:
    """Give the networks the bf16 weight copies their :class:`MasterWeightAdam` keeps (a no-op for other
    optimizers), rewritten from the current weights: call it once the weights are final (after
    initialisation or a resume). Returns the number of copies."""
    count = 0
    for net, optimizer in zip(nets, optimizers, strict=True):
        if isinstance(optimizer, MasterWeightAdam):
            count += optimizer.attach(net, torch.bfloat16)
    return count


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


class _RecordedOps(TorchDispatchMode):
    """Runs the captured function once, recording every ATen op (forward, backward, optimizer) with the
    tensors it read and the ones it produced."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, tuple[Any, ...], dict[str, Any], Any]] = []

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.calls.append((func, args, kwargs, out))
        return out


class _RecordedReplay:
    """Replays the recorded ops on the tensors they ran on, writing each op's result into the tensor the
    capture produced: as a CUDA graph replays its kernels on fixed addresses, and like it, no Python of the
    captured function runs again (a Python-side effect there, e.g. an attribute it sets, happens once)."""

    def __init__(self, calls: list[tuple[Any, tuple[Any, ...], dict[str, Any], Any]]) -> None:
        self.calls = calls

    @torch.no_grad()
    def replay(self) -> None:
        for func, args, kwargs, captured in self.calls:
            fresh = func(*args, **kwargs)
            for static, value in zip(_tensors(captured), _tensors(fresh), strict=True):
                if not _same_memory(static, value):
                    static.copy_(value)


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    return []


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.data_ptr() == b.data_ptr() and a.stride() == b.stride() and a.shape == b.shape)


class EagerGraphRuntime:
    """A CPU stand-in for :class:`CudaGraphRuntime`, so that the capture logic is tested without a GPU.

    ``capture`` runs the function once under a dispatch mode that records its ATen ops (the caller undoes
    what that run changed, as it undoes the warm-up); ``replay`` re-runs those ops on the captured tensors,
    writing results in place. So, as with a real graph: the outputs are static tensors rewritten at every
    replay, values read from the host at capture stay frozen, and the captured function's Python never runs
    again. What a correct CUDA graph computes, bit for bit, on the CPU."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)

    def side_stream(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def capture(self, body: Callable[[], None], generators: Sequence[torch.Generator]) -> ReplayableGraph:
        recorder = _RecordedOps()
        with recorder:
            body()
        return _RecordedReplay(recorder.calls)

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
        source: the batch source (:class:`fastpix2pix.data.sources.base.BatchSource`), or a function that
            writes the next batch into static buffers and returns them (it runs inside the graph).
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
        pairs_as_one_batch: bool = False,
    ) -> None:
        if loss_rows < 1:
            raise ValueError(f"loss_rows must be >= 1, got {loss_rows}")
        self.nets, self.optimizers, self.objective = nets, optimizers, objective
        self.source = _as_source(source)
        self.bf16 = bf16
        self.pairs_as_one_batch = pairs_as_one_batch
        self.device = next(nets.G.parameters()).device
        self.losses = torch.zeros((loss_rows, len(LOSS_NAMES)), device=self.device)
        self.slot = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.pending = 0  # iterations whose losses are in ``losses`` and not yet taken (host count)
        self.graph: ReplayableGraph | None = None
        self._graph_inputs: Batch | None = None  # the buffers a graph reads when the batch is made eagerly
        self._eager_fake_B: torch.Tensor | None = None  # the last eager iteration's generator output
        self._graph_fake_B: torch.Tensor | None = None  # the graph's: rewritten in place by every replay

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
        # BatchNorm running statistics batched per network pass (unet_256 + PatchGAN: 9 foreach kernels
        # per iteration instead of 66 small ops; see fastpix2pix.ops.running_stats).
        with self._autocast(), deferred_running_stats():
            losses = train_step(
                self.nets, self.optimizers, {"A": real_A, "B": real_B}, self.objective, visuals,
                pairs_as_one_batch=self.pairs_as_one_batch,
            )  # fmt: skip
        values = torch.stack([losses[name].float() for name in LOSS_NAMES])
        # Device-side slot: the same kernels write the next row at every replay.
        self.losses.index_copy_(0, self.slot, values[None])
        self.slot.add_(1)
        self._eager_fake_B = visuals["fake_B"]

    @property
    def fake_B(self) -> torch.Tensor | None:
        """The generator output of the last iteration: with a graph, the graph's static output (eager
        iterations run beside it, e.g. by the graph check, do not replace what the page shows)."""
        return self._graph_fake_B if self.graph is not None else self._eager_fake_B

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
        self.slot.zero_()  # the captured iteration writes the row the slot holds at replay; row 0 here
        graph = runtime.capture(self.iteration, self.source.generators() if in_graph else ())
        self._graph_fake_B = self._eager_fake_B  # the captured output tensor
        # A CUDA capture runs no kernel (the CPU stand-in runs one iteration): undo what the warm-up and
        # the capture changed, so the first replay trains and draws what the first eager iteration would.
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
                copy = getattr(optimizer, "copies", {}).get(param)
                if copy is not None:  # MasterWeightAdam's bf16 weight copies
                    tensors[f"opt{key}.{i}.copy"] = copy
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
