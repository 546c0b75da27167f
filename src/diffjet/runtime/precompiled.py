"""Precompiled forwards: a module's forward traced and compiled once, saved whole, loaded without Dynamo.

With only Inductor's artifacts cached, a new process still traces every component with Dynamo before the
cache can answer; `torch.compile(...).aot_compile` keeps the traced bytecode, the compiled graph and its
guards as one serialisable function instead, which took the SD1.5 warm start's first image from 12.7 to
5.4 s on the H100 (bench/results/warm-start-profile-sd15-h100-2026-11-26.json).

What is compiled is `forward(module, *args, **kwargs)`, the module's class forward with the module as an
argument (or any other function that takes the module first): parameters stay graph inputs read at each call, so in-place weight updates (LoRA merges) reach
the loaded function, and nothing of the weights is saved with it. Only guards that survive a new process
are kept (`keep_portable_guards_unsafe`), less those on the module's own tensors (`portable_guards`); the
CUDA-graph runner calls each function only with the input signature it was compiled for, which is what
the dropped guards would have checked.
"""

from __future__ import annotations

import contextlib
import inspect
import io
from typing import Any, Callable

import torch
from torch import nn


def supported(backend: str) -> bool:
    """Whether this torch can save functions compiled with `backend` (Inductor's are serialisable)."""
    return (
        backend == "inductor"
        and hasattr(torch.compiler, "load_compiled_function")
        and hasattr(torch.compiler, "keep_portable_guards_unsafe")
    )


def portable_guards(module_argument: str = "module") -> Callable[[list], list[bool]]:
    """Dynamo's guard filter for a saved function whose first argument is called `module_argument`: the
    portable guards, less those on that module's tensors.

    Unpickling a guard on a tensor builds a fake tensor for it: with one per weight (776 for the SD1.5
    UNet) that was about 0.8 s of each warm start's load under the profiler (2026-12-01). What those guards
    check is settled before a function is looked up: the weights' shapes, strides and dtypes are part of
    the entry's key (`compile_cache.module_key`), as is the device. Guards on the inputs and on global
    state (grad mode, say) stay.
    """
    prefix = module_argument + "."

    def keep(entries: list) -> list[bool]:
        portable = torch.compiler.keep_portable_guards_unsafe(entries)
        return [k and not (e.guard_type == "TENSOR_MATCH" and e.name.startswith(prefix))
                for e, k in zip(entries, portable)]

    return keep


def forward(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """What is compiled: the class's forward (the instance's `forward` is the CUDA-graph runner)."""
    return type(module).forward(module, *args, **kwargs)


def _aot_enabled():
    flags = torch._dynamo.config
    if hasattr(flags, "enable_aot_compile"):  # off by default before torch 2.12
        return flags.patch(enable_aot_compile=True)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _without_instance_forward(module: nn.Module):
    """The module without the `forward` set on the instance, for the block.

    Dynamo saves the module's own attributes with a function's guards. diffjet's CUDA-graph runner sits
    in `module.forward` and, once it has captured a graph, holds `torch.cuda.CUDAGraph` objects, which
    cannot be saved: every signature after a component's first failed to precompile ("cannot pickle
    'CUDAGraph' object", SDXL on the H100) and was compiled in-process instead, so a new process traced
    it again. What is compiled is the class's forward, which does not use the instance's.
    """
    missing = object()
    saved = module.__dict__.pop("forward", missing)
    try:
        yield
    finally:
        if saved is not missing:
            module.__dict__["forward"] = saved


class Precompiler:
    """Compiles (with Inductor's `options`), saves and loads `function(module, *args, **kwargs)` for one
    input signature at a time; `function` is the module's class forward unless given (any function that
    takes the module first, such as one running part of it)."""

    def __init__(self, module: nn.Module, options: dict | None = None,
                 function: Callable[..., Any] = forward) -> None:
        self.module = module
        self.options = dict(options or {})
        self.function = function

    def compile(self, args: tuple, kwargs: dict) -> tuple[Callable[..., Any], bytes]:
        """Compile for the signature of `args`/`kwargs`: the callable (taking the forward's arguments)
        and its serialised form."""
        first = next(iter(inspect.signature(self.function).parameters))
        options = {**self.options, "guard_filter_fn": portable_guards(first)}
        with _aot_enabled(), torch.no_grad(), _without_instance_forward(self.module):
            compiled = torch.compile(self.function, fullgraph=True, dynamic=False, options=options)
            function = compiled.aot_compile(((self.module, *args), kwargs))
        data = type(function).serialize(function).serialized_data
        return self._bind(function), data

    def load(self, data: bytes) -> Callable[..., Any]:
        """The callable that `compile` returned, from its serialised form (in any process)."""
        with _aot_enabled():
            function = torch.compiler.load_compiled_function(io.BytesIO(data))
        return self._bind(function)

    def _bind(self, function: Callable[..., Any]) -> Callable[..., Any]:
        module = self.module

        def call(*args: Any, **kwargs: Any) -> Any:
            return function(module, *args, **kwargs)

        return call
