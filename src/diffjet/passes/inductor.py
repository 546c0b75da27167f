"""Inductor pass: compile a module's forward with `torch.compile`.

The module object stays where it is (its config, dtype and parameters are what the pipeline reads);
only its `forward` is replaced by the compiled one, so CUDA graphs can later wrap it and in-place weight
updates reach the compiled code, which reads parameters as inputs (no freezing).

Shapes are compiled static (`dynamic=False`): a new resolution compiles a specialised graph instead of
turning every kernel symbolic, which keeps steady-state speed equal to a single-shape compile.

`conv_1x1_as_mm` lets Inductor fuse the 1×1 convolutions of SD's transformer blocks and ResNet
shortcuts with their neighbours as matmuls (Diffusers' speed guide recommends it).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import nn

from ..config import Config

_OPTIONS = {
    "default": {"conv_1x1_as_mm": True},
    "max-autotune-no-cudagraphs": {"conv_1x1_as_mm": True, "max_autotune": True},
}


def is_compiled(module: nn.Module) -> bool:
    return getattr(module, "_diffjet_compiled", False)


def inductor_options(config: Config) -> dict | None:
    """Inductor's options for `config.compile_mode`; None for other backends."""
    return dict(_OPTIONS[config.compile_mode]) if config.backend == "inductor" else None


def compiled(fn: Callable[..., Any], config: Config) -> Callable[..., Any]:
    """`fn` compiled as this pass compiles a forward (static shapes, the configured backend and mode)."""
    return _AtFirstCall(fn, config)


class _AtFirstCall:
    """`torch.compile(fn, ...)`, made at the first call.

    Making it imports Inductor's compiler (1.1–1.3 s of an sd15 warm start on the H200), which a process whose
    runners all load AOTInductor packages never uses: only a cache miss or an uncached runner calls this."""

    def __init__(self, fn: Callable[..., Any], config: Config) -> None:
        functools.update_wrapper(self, fn)  # the signature diffusers inspects stays fn's
        self._fn, self._config = fn, config
        self._compiled: Callable[..., Any] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # Two threads' first calls may both make one: Dynamo keeps what it compiles with fn's code, not here.
        if self._compiled is None:
            self._compiled = torch.compile(self._fn, backend=self._config.backend, dynamic=False,
                                           options=inductor_options(self._config))
        return self._compiled(*args, **kwargs)


def apply(module: nn.Module, config: Config) -> nn.Module:
    if is_compiled(module):
        return module
    module.forward = compiled(type(module).forward.__get__(module), config)
    module._diffjet_compiled = True
    return module
