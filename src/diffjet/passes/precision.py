"""Precision pass: run a component in the configured half precision.

SDXL-family pipelines (those with an `upcast_vae` method) convert a VAE whose config says
`force_upcast` to float32 before every decode (and img2img before every encode) and back after, because
it overflows in float16. That round trip reallocates every weight on every call, which would invalidate
compiled code and CUDA graphs. `pin_float32` keeps such a VAE in float32 for good, casts its inputs with
forward pre-hooks, and clears `force_upcast` in its config so the pipeline stops converting it: the same
arithmetic, done once. `apply` leaves a pinned VAE alone. SD 1.x/2.x pipelines never upcast (their VAE
config carries diffusers' default `force_upcast=True` all the same), so their VAE runs in half precision.

Does not apply on CPU (half precision there is slower and less exact): the compiler skips it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import Config


def _cast_inputs_to_weight_dtype(module: nn.Module, args: tuple) -> tuple:
    dtype = next(module.parameters()).dtype
    return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def needs_float32(vae: nn.Module, dtype: torch.dtype | None) -> bool:
    """True for a VAE that an upcasting pipeline would run in float32 rather than `dtype`."""
    return dtype == torch.float16 and bool(getattr(getattr(vae, "config", None), "force_upcast", False))


def pin_float32(vae: nn.Module) -> nn.Module:
    """Keep `vae` in float32 for good (see the module docstring). Idempotent."""
    vae.to(torch.float32)
    if not getattr(vae, "_diffjet_float32", False):
        for part in ("quant_conv", "encoder", "post_quant_conv", "decoder"):
            if getattr(vae, part, None) is not None:
                getattr(vae, part).register_forward_pre_hook(_cast_inputs_to_weight_dtype)
        vae.register_to_config(force_upcast=False)
        vae._diffjet_float32 = True
    return vae


def apply(module: nn.Module, config: Config) -> nn.Module:
    dtype = config.torch_dtype
    if dtype is None or getattr(module, "_diffjet_float32", False):
        return module
    return module.to(dtype)
