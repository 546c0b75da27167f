"""diffjet: Hugging Face Diffusers pipelines, as fast as the GPU allows, with eager PyTorch's output."""

from .api import compile
from .compiler import CompileReport
from .config import Config
from .errors import DiffjetError

__all__ = ["compile", "Config", "CompileReport", "DiffjetError", "__version__"]
__version__ = "0.1.0"
