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

#: The fp8 format of the fp8 pass and the kernels that read or write it, and its largest value (448).
FP8 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(FP8).max
#: A floor under amax, so that a row of zeros (ControlNet's zero-initialised output convolutions) gets a
#: finite scale and quantizes to zeros.
_AMAX_FLOOR = 1e-12
#: Triton's interpreter runs the kernels on CPU tensors: how the tests check them without a GPU.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_warned: set[tuple] = set()


def can_launch(x: torch.Tensor) -> bool:
    """Whether a Triton kernel can run on `x` here: a CUDA tensor, or a CPU one under the interpreter."""
    return triton is not None and (x.is_cuda or INTERPRET)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` (rows × k) as e4m3 values and one float32 scale per row (rows × 1): x ≈ q · scale."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=_AMAX_FLOOR)
    scale = amax / E4M3_MAX
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(FP8), scale


def warn_fallback(logger: logging.Logger, x: torch.Tensor, key: tuple, message: str, *args) -> None:
    """Warn once per `key` that a CUDA input goes to an op's slower PyTorch reference (CPU is expected to)."""
    if x.is_cuda and key not in _warned:
        _warned.add(key)
        logger.warning(message, *args)
