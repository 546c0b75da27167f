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
    return torch.compile(fn, backend=config.backend, dynamic=False, options=inductor_options(config))


def apply(module: nn.Module, config: Config) -> nn.Module:
    if is_compiled(module):
        return module
    module.forward = compiled(type(module).forward.__get__(module), config)
    module._diffjet_compiled = True
    return module
