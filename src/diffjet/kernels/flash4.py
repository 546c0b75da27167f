"""FlashAttention-4's Hopper forward kernel as a `diffjet::` op, for DiT attention.

At a DiT's head sizes and sequence lengths the `flash-attn-4` package's SM90 forward kernel (CuTe DSL) is faster
than the cuDNN attention SDPA picks on Hopper: on an H200, in CUDA graphs, Flux.1's attention (4,608 tokens,
24 heads of 128) 443.4 → 414.8 µs a call, SD 3.5's joint attention (4,429 tokens, 24 heads of 64, batch 2)
605.8 → 484.9 µs; at SDXL's largest (4,096 tokens, 10 heads of 64) 196.5 against 193.5 µs is too little to
carry the package into UNet pipelines, which keep SDPA (bench/results/fa4-attention-op-h200-2026-12-03.json).
Outside a CUDA graph the package's Python launch path costs tens of microseconds a call, which diffjet's graphs
take away; importing it takes seconds (its compiler), and each kernel configuration compiles on first use.

The package is optional (`pip install "diffjet[flash-attn-4]"`); `unavailable` says why the op cannot run on a
device. `flash_attn_4` is an opaque `torch.library.custom_op` on (batch, tokens, heads, head_dim) tensors with a
fake implementation; on CPU it runs `reference` (SDPA), which the tests hold the processors to.

Within `compiled_in(folder)` (a warm-up of the warm-start store) the package's forward kernels are loaded from and
saved to `folder`, so that the compile cache's entry carries them to the next process instead of its compiling
them again (1.3–1.9 s a configuration on the H200).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention over (batch, tokens, heads, head_dim) tensors, through PyTorch's SDPA; the same layout out."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2).contiguous()


@functools.cache
def _interface():
    from flash_attn.cute import interface  # imports the CuTe DSL compiler: seconds, once a process
    return interface


#: The dtypes the package's kernels take.
HALF = (torch.float16, torch.bfloat16)


@functools.cache
def unavailable(device: torch.device, dtype: torch.dtype | None = None) -> str | None:
    """Why the op cannot run on `device` (for `dtype`, if given), None where it can: a CUDA GPU of compute capability
    9.x (Hopper, the one it is measured on) with the `flash-attn-4` package installed, half-precision inputs."""
    if device.type != "cuda":
        return f"needs a CUDA GPU, not {device.type}"
    if dtype is not None and dtype not in HALF:
        return f"takes float16 or bfloat16, not {str(dtype).removeprefix('torch.')}"
    major, minor = torch.cuda.get_device_capability(device)
    if major != 9:
        return f"measured on Hopper (sm_90) only; this GPU is sm_{major}{minor}"
    return _import_failure()


@functools.cache
def _import_failure() -> str | None:
    """Why the package does not import (None where it does)."""
    try:
        _interface()
    except ImportError as exc:
        return f'the flash-attn-4 package is not installed (pip install "diffjet[flash-attn-4]"): {exc}'
    except Exception as exc:  # e.g. RuntimeError from a compiler installed without its CUDA 13 libraries
        return f"the flash-attn-4 package does not import: {type(exc).__name__}: {exc}"
    return None


#: Where the forward kernels go within `compiled_in` (None: outside, in this process's memory only); the folder the
#: package's forward compile cache is bound to now, and the package's own in-memory cache, kept across bindings.
_folder: Path | None = None
_bound: Path | None = None
_memory = None


@contextlib.contextmanager
def compiled_in(folder: Path) -> Iterator[None]:
    """Within the block, FlashAttention-4's forward kernels are loaded from `folder` and the ones compiled are saved
    there (one file each, in a subfolder named by the package's fingerprint of its sources and compiler versions:
    another version's files are not read). Process-wide, as Triton's cache folder is."""
    global _folder
    before, _folder = _folder, Path(folder)
    try:
        yield
    finally:
        _folder = before


def _bind(interface) -> None:
    """Point the package's forward compile cache at `_folder`: its persistent cache there sharing the in-memory one,
    so that kernels this process already has are not compiled or loaded again; outside `compiled_in`, at the
    in-memory one. These are the package's internals (`cache_utils`): where they differ, kernels stay in memory."""
    global _bound, _memory
    if _bound == _folder:
        return
    try:
        fwd = interface._flash_attn_fwd
        if _memory is None:
            _memory = fwd.compile_cache
        if _folder is None:
            fwd.compile_cache = _memory
        else:
            from flash_attn.cute import cache_utils

            persistent = cache_utils.JITPersistentCache(_folder / cache_utils._compute_source_fingerprint() / "fwd")
            persistent.cache = _memory.cache
            fwd.compile_cache = persistent
    except (AttributeError, ImportError, OSError) as exc:
        logger.info("FlashAttention-4's kernels are not kept in the compile cache: %s", exc)
    _bound = _folder


@torch.library.custom_op("diffjet::flash_attn_4", mutates_args=())
def flash_attn_4(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention over (batch, tokens, heads, head_dim) tensors: FlashAttention-4 on CUDA in half precision,
    `reference` elsewhere (the package asserts on float32). The result is contiguous in the same layout."""
    if q.device.type != "cuda" or q.dtype not in HALF:
        return reference(q, k, v, scale)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    interface = _interface()
    _bind(interface)
    return interface.flash_attn_func(q, k, v, softmax_scale=scale)[0]


@flash_attn_4.register_fake
def _(q, k, v, scale):
    return q.new_empty(q.shape[:-1] + v.shape[-1:])


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, flash: bool) -> torch.Tensor:
    """SDPA's attention on (batch, heads, tokens, head_dim) inputs at the default scale, as (batch, tokens,
    heads · head_dim): through `flash_attn_4` if `flash`, else `F.scaled_dot_product_attention`."""
    if flash:
        out = flash_attn_4(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                           query.shape[-1] ** -0.5)
        return out.flatten(2)
    return F.scaled_dot_product_attention(query, key, value).transpose(1, 2).flatten(2)
