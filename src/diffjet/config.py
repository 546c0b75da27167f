"""`Config`: what `diffjet.compile` does to a pipeline, as one frozen, validated value."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .errors import ConfigError

#: Components diffjet knows how to optimise, in the order it handles them.
KNOWN_COMPONENTS = ("unet", "controlnet", "vae", "text_encoder", "text_encoder_2")

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "keep": None}
_ATTENTION = ("sdpa-fused-qkv", "keep")
_COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
#: `torch.compile` backends: Inductor, and the two that tests use to trace without compiling.
_BACKENDS = ("inductor", "eager", "aot_eager")
#: diffjet's Triton kernels (`diffjet/kernels/`) that `Config.kernels` may name.
KNOWN_KERNELS = ("group_norm_silu", "geglu")
#: The kernels on by default: those measured faster than Inductor's own code on the H100 (docs/kernels.md).
DEFAULT_KERNELS = ("group_norm_silu", "geglu")


@dataclass(frozen=True)
class Config:
    """Options of `diffjet.compile`. The default is lossless (DESIGN.md's fidelity rule).

    Fields:
        dtype: "float16" (default), "bfloat16", or "keep" (leave the pipeline's dtype alone). Applied on
            CUDA only. A VAE that declares `force_upcast` stays float32 under "float16", as diffusers runs it.
        tf32: allow TF32 for the float32 matrix work that is left (e.g. SDXL's float32 VAE). This sets
            PyTorch's process-wide `torch.backends.{cuda.matmul,cudnn}.allow_tf32` flags.
        channels_last: convolution weights and activations in NHWC.
        attention: "sdpa-fused-qkv" (one QKV projection, PyTorch SDPA) or "keep" (the pipeline's own).
        components: the pipeline components diffjet touches; others are left alone and reported.
        inductor: the components compiled with Inductor (`torch.compile`). Text encoders run once per
            image, so by default they get CUDA graphs but no compile time.
        kernels: diffjet's Triton kernels to put in (`passes/kernels.py`): "group_norm_silu" and
            "geglu" (both by default); `()` for none. Applied on CUDA to
            half-precision channels-last UNet, ControlNet and VAE only.
        compile_mode: "default" or "max-autotune-no-cudagraphs" (much longer compilation).
        backend: the `torch.compile` backend: "inductor", or "eager" / "aot_eager" (tests: traced, not compiled).
        cuda_graphs: capture each component call per input signature into a CUDA graph.
        max_graphs: how many input signatures each component keeps captured (least recently used goes).
        graph_memory_gib: a cap on the device memory each component's graphs hold. With a cap, every graph
            gets a memory pool of its own (counted as the growth of reserved memory during its capture),
            and a capture that takes a component over the cap drops its least recently used graphs, whose
            memory goes back to the driver, until it fits (the newest graph always stays). None (default):
            all graphs of a device share one pool, which needs less memory in all but returns none.
        cache: keep what Inductor compiled on disk and reuse it in later processes.
        cache_dir: the compile cache's folder (default: `$DIFFJET_CACHE_DIR/compile`, else
            `~/.cache/diffjet/compile`). Only this folder is ever read: entries are deserialised.
    """

    dtype: str = "float16"
    tf32: bool = True
    channels_last: bool = True
    attention: str = "sdpa-fused-qkv"
    components: tuple[str, ...] = KNOWN_COMPONENTS
    inductor: tuple[str, ...] = ("unet", "controlnet", "vae")
    kernels: tuple[str, ...] = DEFAULT_KERNELS
    compile_mode: str = "default"
    backend: str = "inductor"
    cuda_graphs: bool = True
    max_graphs: int = 16
    graph_memory_gib: float | None = None
    cache: bool = True
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.attention not in _ATTENTION:
            raise ConfigError(f"attention must be one of {list(_ATTENTION)}, got {self.attention!r}")
        if self.compile_mode not in _COMPILE_MODES:
            raise ConfigError(f"compile_mode must be one of {list(_COMPILE_MODES)}, got {self.compile_mode!r}")
        if self.backend not in _BACKENDS:
            raise ConfigError(f"backend must be one of {list(_BACKENDS)}, got {self.backend!r}")
        for field_name in ("components", "inductor"):
            value = getattr(self, field_name)
            if isinstance(value, str) or not isinstance(value, (tuple, list)):
                raise ConfigError(f"{field_name} must be a tuple of component names, got {value!r}")
            unknown = [c for c in value if c not in KNOWN_COMPONENTS]
            if unknown:
                raise ConfigError(f"{field_name}: unknown component(s) {unknown}; known: {list(KNOWN_COMPONENTS)}")
            object.__setattr__(self, field_name, tuple(value))
        if isinstance(self.kernels, str) or not isinstance(self.kernels, (tuple, list)):
            raise ConfigError(f"kernels must be a tuple of kernel names, got {self.kernels!r}")
        unknown = [k for k in self.kernels if k not in KNOWN_KERNELS]
        if unknown:
            raise ConfigError(f"kernels: unknown {unknown}; known: {list(KNOWN_KERNELS)}")
        object.__setattr__(self, "kernels", tuple(self.kernels))
        if not isinstance(self.max_graphs, int) or self.max_graphs < 1:
            raise ConfigError(f"max_graphs must be a positive integer, got {self.max_graphs!r}")
        cap = self.graph_memory_gib
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0):
            raise ConfigError(f"graph_memory_gib must be a positive number of GiB or None, got {cap!r}")

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return _DTYPES[self.dtype]

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)

    # -- named presets -----------------------------------------------------------------------
    @classmethod
    def lossless(cls) -> "Config":
        """fp16, channels-last, fused-QKV SDPA, Inductor on UNet/ControlNet/VAE, CUDA graphs (the default)."""
        return cls()

    @classmethod
    def fast_startup(cls) -> "Config":
        """No Inductor: eager kernels replayed from CUDA graphs. Seconds to start instead of a minute."""
        return cls(inductor=())

    @classmethod
    def max_autotune(cls) -> "Config":
        """Inductor's autotuned GEMM/conv templates: slower to compile, sometimes faster to run."""
        return cls(compile_mode="max-autotune-no-cudagraphs")
