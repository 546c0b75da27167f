"""diffjet: Hugging Face Diffusers pipelines, as fast as the GPU allows, with eager PyTorch's output.

The names below are imported on first use: `import diffjet` alone does not import torch or diffusers,
so `diffjet --help` answers at once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import DiffjetError

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "compile": ".api",
    "Config": ".config",
    "StepCache": ".config",
    "CompileReport": ".compiler",
    # LoRA on compiled pipelines: merged into the weights in place (diffjet/lora.py).
    "load_lora": ".lora",
    "unload_lora": ".lora",
    "set_lora_scales": ".lora",
    "lora_scales": ".lora",
}

__all__ = ["compile", "Config", "StepCache", "CompileReport", "DiffjetError", "__version__"]
__all__ += ["load_lora", "unload_lora", "set_lora_scales", "lora_scales"]

if TYPE_CHECKING:
    from .api import compile
    from .compiler import CompileReport
    from .config import Config, StepCache
    from .lora import load_lora, lora_scales, set_lora_scales, unload_lora


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'diffjet' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
