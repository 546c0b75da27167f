"""Versions and hardware that compiled code depends on, recorded once for the cache and the benchmarks."""

from __future__ import annotations

import importlib.metadata
from typing import Any

import torch

#: Bumped whenever an entry's layout changes. 4: private config keys left out of the key, meta.sig.
#: 5: the device index in the key, saved functions without guards on the weights.
CACHE_FORMAT = 5


def package_version(package: str) -> str | None:
    """The installed version of `package`, or None."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment_key(device: torch.device) -> dict[str, Any]:
    """Versions and GPU architecture: compiled kernels are valid only where these match."""
    gpu = None
    if device.type == "cuda":
        gpu = {"name": torch.cuda.get_device_name(device), "capability": list(torch.cuda.get_device_capability(device))}
    return {
        "format": CACHE_FORMAT,
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "diffusers": package_version("diffusers"),
        "diffjet": package_version("diffjet"),
        "cuda": torch.version.cuda,
        "gpu": gpu,
    }
