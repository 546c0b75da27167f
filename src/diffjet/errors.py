"""Errors that diffjet raises for its users.

Every message is one line that says what went wrong and what to do; the CLI prints it without a
traceback and exits non-zero.
"""


class DiffjetError(Exception):
    """Base class of every error diffjet raises on purpose."""


class ConfigError(DiffjetError, ValueError):
    """A `Config` field or a command-line option holds a value diffjet cannot use."""


class ModelNotFoundError(DiffjetError):
    """`--model` names no preset, no local diffusers folder and no reachable hub id."""


class ModelLoadError(DiffjetError):
    """A model folder exists but cannot be loaded: a broken `model_index.json`, damaged or missing weights."""


class DeviceError(DiffjetError):
    """The requested device (for example CUDA) is not available on this machine."""


class OutputError(DiffjetError):
    """An output file cannot be written."""


class FidelityError(DiffjetError):
    """A compiled pipeline broke the lossless rule or produced NaN/Inf."""


class LoraError(DiffjetError):
    """A LoRA cannot be loaded, switched or unloaded: unknown keys, another architecture, unknown adapter."""


class CacheError(DiffjetError):
    """The compile cache cannot be used: a folder or key file that others could have written, or none."""
