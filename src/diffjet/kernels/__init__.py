"""Triton kernels for what Inductor leaves on the table, each a `torch.library` op with a PyTorch reference.

One file per kernel: the Triton code, its registration as a `diffjet::` op that torch.compile and CUDA
graphs can hold, and `reference`, the plain-PyTorch definition the tests hold it to.
"""

from __future__ import annotations

import logging
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the ops run their PyTorch references
    triton = tl = None

#: Triton's interpreter runs the kernels on CPU tensors: how the tests check them without a GPU.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_warned: set[tuple] = set()


def can_launch(x: torch.Tensor) -> bool:
    """Whether a Triton kernel can run on `x` here: a CUDA tensor, or a CPU one under the interpreter."""
    return triton is not None and (x.is_cuda or INTERPRET)


def warn_fallback(logger: logging.Logger, x: torch.Tensor, key: tuple, message: str, *args) -> None:
    """Warn once per `key` that a CUDA input goes to an op's slower PyTorch reference (CPU is expected to)."""
    if x.is_cuda and key not in _warned:
        _warned.add(key)
        logger.warning(message, *args)
