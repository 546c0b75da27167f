"""CUDA-graph capture per input signature, with static buffers and one memory pool per device.

A Stable Diffusion UNet step is a few hundred kernels, and launched one by one from Python they leave the
GPU idle (SD1.5 512², batch 2, H200: 24.6 ms eager in bench/results/h200-2026-11-26.json against 10.1 ms
for the same kernels replayed from a graph in bench/results/unet-step-sd15-h200-2026-11-26.json).
`CudaGraphRunner` captures a callable once per input signature (shapes, strides, dtypes, devices and
non-tensor values of its arguments) and replays it.

Unlike torch.compile's `reduce-overhead` mode it keeps no per-call bookkeeping and never hands out graph
memory: inputs are copied into static buffers that live outside the pool, and every output tensor is
cloned before it is returned, so the next replay cannot overwrite what the caller holds.

All graphs of a device share one memory pool unless a memory cap is set (see `CudaGraphRunner`). That
is safe because graphs never run concurrently and every value that lives across a replay (static
inputs, cloned outputs) sits outside the pool; the static outputs inside it are read right after their
own replay, before any other graph runs.

That is also why calls are serialized per device, not per runner (`_Serial`): one lock per device
covers every runner's copy-in, replay and clone (and capture, which must see no other work of the
process), so that runners called from several threads (one pipeline's, or several pipelines' on one GPU)
never interleave, and an event makes each call's stream wait for the previous call's work, so threads on
different streams do not overlap on the GPU either. Unlocked, two threads calling one runner got 169 wrong
results in 40,000 calls, silently.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch.utils import _pytree as pytree

from .warm_start import WarmStartStore

logger = logging.getLogger(__name__)
MAX_SIGNATURES = 256

_POOLS: dict[int, Any] = {}
_STREAMS: dict[int, torch.cuda.Stream] = {}
_SERIALS: dict[int, "_Serial"] = {}
_LOCK = threading.Lock()


def _per_device(table: dict[int, Any], device: torch.device, make: Callable[[int], Any]) -> Any:
    """`table`'s one object for `device`, made by `make(index)` the first time it is asked for."""
    with _LOCK:
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in table:
            table[index] = make(index)
        return table[index]


def graph_pool(device: torch.device) -> Any:
    """The one memory pool that every diffjet graph on `device` captures into."""
    return _per_device(_POOLS, device, lambda index: torch.cuda.graph_pool_handle())


def capture_stream(device: torch.device) -> torch.cuda.Stream:
    """The one side stream that warm-ups and captures on `device` run on.

    cuBLAS keeps a workspace (32 MiB on Hopper) for every stream it has run on until the process ends,
    so a new stream per capture would leak that much device memory with each captured shape.
    """
    return _per_device(_STREAMS, device, lambda index: torch.cuda.Stream(torch.device("cuda", index)))


class _Serial:
    """One device's calls, one after another: on the CPU (the lock) and on the GPU (`done`, recorded after
    each call on its stream and waited for by the next call's stream)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()  # re-entrant: a runner's function may call another runner
        self.done = torch.cuda.Event()

    @contextlib.contextmanager
    def call(self, device: torch.device) -> Iterator[None]:
        with self.lock:
            stream = torch.cuda.current_stream(device)
            ordered = not torch.cuda.is_current_stream_capturing()  # a call inside a capture is part of it
            if ordered:
                stream.wait_event(self.done)
            yield
            if ordered:
                self.done.record(stream)


def serial(device: torch.device) -> _Serial:
    """What every runner on `device` holds for a whole call."""
    return _per_device(_SERIALS, device, lambda index: _Serial())


@dataclass
class GraphStats:
    """Counters a caller can read to prove that steady state neither captures nor falls back."""

    captures: int = 0
    replays: int = 0
    eager_calls: int = 0
    invalidations: int = 0
    signatures: list[str] = field(default_factory=list)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph | None  # None: capture failed, this signature runs eagerly
    static_inputs: list[torch.Tensor | None]
    static_output: Any
    bytes: int = 0  # growth of reserved device memory during its capture


def lru_victims(held: list[tuple[Any, int]], max_graphs: int, max_bytes: int | None) -> list[Any]:
    """Which graphs to drop, least recently used first, from `held` = [(key, bytes)] oldest first.

    Drops until at most `max_graphs` remain and their bytes fit `max_bytes`; the newest always stays.
    """
    victims = []
    count, total = len(held), sum(size for _, size in held)
    for key, size in held[:-1]:
        if count <= max_graphs and (max_bytes is None or total <= max_bytes):
            break
        victims.append(key)
        count, total = count - 1, total - size
    return victims


# (shape, strides, device) of an input -> the strides of its copy in a graph's static input.
_STATIC_STRIDES: dict[tuple, tuple[int, ...]] = {}


def _static_strides(leaf: torch.Tensor) -> tuple[int, ...]:
    """The strides of `torch.empty_like(leaf)`, the runner's copy of it, which is what a graph is captured
    with. Keying on them rather than on `leaf`'s own strides lets inputs that differ only in how they are
    laid out share a graph: SD 3's pipeline passes its timesteps expanded (stride 0), a caller who builds
    them with `torch.full` does not, and each way used to compile and capture a graph of its own."""
    memo = (tuple(leaf.shape), tuple(leaf.stride()), leaf.device)
    strides = _STATIC_STRIDES.get(memo)
    if strides is None:
        if len(_STATIC_STRIDES) > 4096:
            _STATIC_STRIDES.clear()
        # empty_like's rules (dense layouts kept, others made dense) as the device applies them.
        strides = _STATIC_STRIDES[memo] = tuple(torch.empty_like(leaf).stride())
    return strides


def _leaf_key(leaf: Any) -> Any:
    if isinstance(leaf, torch.Tensor):
        return ("T", tuple(leaf.shape), _static_strides(leaf), leaf.dtype, leaf.device.type)
    if isinstance(leaf, (int, float, bool, str, type(None))):
        return ("V", type(leaf).__name__, leaf)
    # Anything else (a callable, a custom object) is keyed by identity: a new object means a new graph.
    return ("O", id(leaf))


class CudaGraphRunner:
    """Wrap `fn` so that each input signature is captured once into a CUDA graph and replayed.

    `fn` runs on `device` under `torch.no_grad()`: this is an inference runtime. `tensor_args` names the
    arguments (by position or keyword) that change every call but are not tensors on the device, such as
    a scheduler's timestep: Python numbers and CPU tensors there become device tensors, so one graph
    serves every timestep instead of baking one value in. `weights` are the module's parameters and
    buffers: if any of them moves or changes dtype (`pipe.to(...)`), every graph is dropped and
    re-captured on the next call, because a graph holds raw pointers to them.

    `max_graphs` bounds the number of signatures held; the least recently used graph goes first. With
    `max_memory` (bytes), each graph captures into a pool of its own, is counted as that pool's size plus
    its static inputs, and dropping it gives that memory back to the driver; the runner drops least
    recently used graphs until its total fits. Without it, all graphs of a device share one
    pool: less memory in all, but nothing that a dropped graph could give back.

    With a `store` (`warm_start.py`), each new signature's function comes from it (loaded or
    precompiled, its compiled artifacts preloaded) and what its warm-up compiled is kept for the next
    process; without one, `fn` is warmed up and captured as it is.

    Calls are serialized: every runner on one device holds the device's `serial` for a whole call.
    """

    WARMUP_CALLS = 2

    def __init__(
        self,
        fn: Callable[..., Any],
        device: torch.device,
        *,
        name: str,
        weights: list[torch.Tensor] | None = None,
        tensor_args: tuple[int | str, ...] = (),
        max_graphs: int = 16,
        max_memory: int | None = None,
        store: WarmStartStore | None = None,
    ) -> None:
        if device.type != "cuda":
            raise ValueError(f"CudaGraphRunner needs a CUDA device, got {device}")
        self.fn = fn
        self.device = device
        self.name = name
        self.tensor_args = tensor_args
        self.max_graphs = max_graphs
        self.max_memory = max_memory
        self.store = store
        self.stats = GraphStats()
        self._weights = list(weights or [])
        self._weights_key = self._current_weights_key()
        self._graphs: OrderedDict[Any, _Captured] = OrderedDict()
        self._serial = serial(device)

    # -- public -------------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._serial.call(self.device):
            return self._call(args, kwargs)

    def _call(self, args: tuple, kwargs: dict) -> Any:
        args = tuple(self._tensorize(v) if i in self.tensor_args else v for i, v in enumerate(args))
        kwargs = {k: self._tensorize(v) if k in self.tensor_args else v for k, v in kwargs.items()}
        leaves, spec = pytree.tree_flatten((args, kwargs))
        weights_key = self._current_weights_key()
        if weights_key != self._weights_key:
            logger.info("%s: weights moved or changed dtype; dropping %d CUDA graph(s)", self.name, len(self._graphs))
            self.reset()
            self._weights_key = weights_key
            self.stats.invalidations += 1
        key = (spec, tuple(_leaf_key(x) for x in leaves))
        captured = self._graphs.get(key)
        if captured is None:
            captured = self._capture(key, leaves, spec)
        else:
            self._graphs.move_to_end(key)
        if captured.graph is None:
            self.stats.eager_calls += 1
            args, kwargs = pytree.tree_unflatten(leaves, spec)
            with torch.no_grad():
                return self.fn(*args, **kwargs)
        for static, leaf in zip(captured.static_inputs, leaves):
            if static is not None:
                static.copy_(leaf)
        captured.graph.replay()
        self.stats.replays += 1
        return pytree.tree_map_only(torch.Tensor, torch.clone, captured.static_output)

    @property
    def graphs_held(self) -> int:
        return sum(1 for c in self._graphs.values() if c.graph is not None)

    @property
    def memory_held(self) -> int:
        """Bytes the held graphs hold, as counted at their capture: pool growth plus static inputs."""
        return sum(c.bytes for c in self._graphs.values())

    def reset(self) -> None:
        """Drop every captured graph (their pool memory is reused by the next capture)."""
        with self._serial.lock:
            self._graphs.clear()

    # -- internals ----------------------------------------------------------------------------
    def _current_weights_key(self) -> tuple:
        # `.to()` replaces every parameter's storage, so the first and last one tell a move apart
        # from an in-place update (which graphs see, since they read the same memory).
        if not self._weights:
            return ()
        ends = (self._weights[0], self._weights[-1])
        return tuple((w.data_ptr(), w.dtype, w.device) for w in ends)

    def _tensorize(self, value: Any) -> Any:
        if isinstance(value, (list, tuple)):  # one value per net of a MultiControlNetModel
            return type(value)(self._tensorize(v) for v in value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return torch.tensor(value, device=self.device)
        if isinstance(value, torch.Tensor) and value.device != self.device:
            return value.to(self.device)
        return value

    def _capture(self, key: Any, leaves: list[Any], spec: Any) -> _Captured:
        description = ", ".join(
            f"{tuple(x.shape)}:{str(x.dtype).removeprefix('torch.')}" for x in leaves if isinstance(x, torch.Tensor)
        )
        static_inputs = [torch.empty_like(x).copy_(x) if isinstance(x, torch.Tensor) else None for x in leaves]
        static_leaves = [s if s is not None else x for s, x in zip(static_inputs, leaves)]
        args, kwargs = pytree.tree_unflatten(static_leaves, spec)
        if self.store is None:
            captured = self._warm_up_and_capture(self.fn, args, kwargs, static_inputs, description)
        else:
            signature = f"{spec} {[_leaf_key(x) for x in leaves]}"
            with self.store.signature(signature, description, self.fn, args, kwargs) as compiling:
                captured = self._warm_up_and_capture(compiling.function, args, kwargs, static_inputs, description)
                if captured.graph is not None:
                    compiling.keep()  # never raises: a cache that cannot be written costs only the next start
        self._graphs[key] = captured
        victims = lru_victims([(k, c.bytes) for k, c in self._graphs.items()], self.max_graphs, self.max_memory)
        for victim in victims:
            del self._graphs[victim]
        if victims and self.max_memory is not None:
            torch.cuda.empty_cache()  # give what the dropped graphs alone held back to the driver
        return captured

    def _warm_up_and_capture(self, fn: Callable[..., Any], args: tuple, kwargs: dict,
                             static_inputs: list[torch.Tensor | None], signature: str) -> _Captured:
        stream = capture_stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        graph = torch.cuda.CUDAGraph()
        try:
            # Every signature compiles its own static-shape graph; Dynamo's default limit of 8 per
            # function would send the ninth resolution/batch pair back to eager without a word.
            with torch.no_grad(), torch.cuda.stream(stream), torch._dynamo.config.patch(recompile_limit=MAX_SIGNATURES):
                # Warm-up outside the graph: compiles (Inductor, Triton), picks cuDNN/cuBLAS algorithms
                # and creates library handles, none of which may happen during capture.
                warmup_start = time.perf_counter()
                for _ in range(self.WARMUP_CALLS):
                    fn(*args, **kwargs)
                stream.synchronize()
                warmup_s = time.perf_counter() - warmup_start
                pool = graph_pool(self.device) if self.max_memory is None else torch.cuda.graph_pool_handle()
                # `torch.cuda.graph` empties the cache before capturing: do it first, or the warm-up's
                # cached blocks it gives back would be subtracted from the graph's footprint.
                torch.cuda.empty_cache()
                reserved_before = torch.cuda.memory_reserved(self.device)
                capture_start = time.perf_counter()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    static_output = fn(*args, **kwargs)
                capture_s = time.perf_counter() - capture_start
        except Exception as exc:  # noqa: BLE001 - any failure to capture falls back to eager, loudly
            torch.cuda.synchronize(self.device)
            logger.warning("%s: CUDA graph capture failed for [%s], running it eagerly: %s", self.name, signature, exc)
            return _Captured(graph=None, static_inputs=[], static_output=None)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.stats.captures += 1
        self.stats.signatures.append(signature)
        logger.info("%s: captured a CUDA graph for [%s] (warm-up %.1f s, capture %.1f s)", self.name, signature,
                    warmup_s, capture_s)
        return _Captured(graph=graph, static_inputs=static_inputs, static_output=static_output,
                         bytes=max(0, torch.cuda.memory_reserved(self.device) - reserved_before)
                         + sum(x.nbytes for x in static_inputs if x is not None))

