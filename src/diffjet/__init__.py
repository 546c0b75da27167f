"""diffjet: Hugging Face Diffusers pipelines, as fast as the GPU allows, with eager PyTorch's output."""

from .api import compile
from .compiler import CompileReport
from .config import Config, StepCache
from .errors import DiffjetError

# LoRA on compiled pipelines: merged into the weights in place (diffjet/lora.py).
from .lora import load_lora, lora_scales, set_lora_scales, unload_lora

__all__ = ["compile", "Config", "StepCache", "CompileReport", "DiffjetError", "__version__"]
__all__ += ["load_lora", "unload_lora", "set_lora_scales", "lora_scales"]
__version__ = "0.1.0"
