"""`Config`: what `diffjet.compile` does to a pipeline, as one frozen, validated value."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .errors import ConfigError

#: Components diffjet knows how to optimise, in the order it handles them.
KNOWN_COMPONENTS = ("unet", "controlnet", "transformer", "vae",
                    "text_encoder", "text_encoder_2", "text_encoder_3")

_DTYPES = {"auto": None, "float16": torch.float16, "bfloat16": torch.bfloat16, "keep": None}
_ATTENTION = ("sdpa-fused-qkv", "keep")
_COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
#: What the compile cache keeps of each input signature for a warm start (`runtime/precompiled.for_kind`).
PRECOMPILE_KINDS = ("function", "aoti")
#: `torch.compile` backends: Inductor, and the two that tests use to trace without compiling.
_BACKENDS = ("inductor", "eager", "aot_eager")
#: The largest guidance scale `diffjet generate` and the server's APIs take (from 0).
MAX_GUIDANCE = 50.0
#: The largest seed `torch.Generator.manual_seed` takes (seeds are from 0), in the CLI and the server's APIs.
MAX_SEED = 2**64 - 1
#: diffjet's kernels (Triton, `diffjet/kernels/`; cuBLASLt's GELU epilogue) that `Config.kernels` may name.
KNOWN_KERNELS = ("group_norm_silu", "geglu", "geglu_fp8", "qk_norm_rope", "gelu_epilogue", "flash_attn_4")
#: The UNet kernels on by default (`geglu_fp8` named without fp8 is an error unless with all of these).
_UNET_DEFAULTS = ("group_norm_silu", "geglu", "geglu_fp8")
#: The kernels on by default: those measured faster than Inductor's own code (docs/kernels.md). `geglu_fp8`
#: acts only where `Config.fp8` is on; the last three act on DiT transformers only, `flash_attn_4` where its
#: package is installed.
DEFAULT_KERNELS = (*_UNET_DEFAULTS, "qk_norm_rope", "gelu_epilogue", "flash_attn_4")
#: How `Config.lossy` and the compile report name each fp8 setting.
FP8_NAMES = {True: "fp8", "auto": "fp8", "max": "fp8 max (QKV GEMMs, 3x3 convolutions)"}


def is_dit(components) -> bool:
    """Whether a pipeline with these components (names, or a dict by name) is a DiT pipeline: its denoiser is a
    `transformer` (Flux, SD3), where a UNet pipeline's is a `unet`."""
    return "transformer" in components


@dataclass(frozen=True)
class StepCache:
    """Step caching for SD UNets (lossy, opt-in): DeepCache's scheme, compiled and captured.

    Full steps run the whole UNet and keep the up path's input at skip branch `branch` (DeepCache's
    `cache_branch_id`: 0 is the shallowest); the steps between run only the layers above that branch and
    take the rest from the last full step. The defaults are DeepCache's published SD setting.

    Fields:
        interval: uniform mode (no threshold): every `interval`-th step is full, as DeepCache's
            `cache_interval`. Adaptive mode: the most steps in a row that may reuse the cache, plus one.
        branch: the skip branch, 0 .. 3 · (number of down blocks) − 1.
        threshold: None for the uniform schedule; a number turns on the adaptive mode: every step runs
            the first down layer, and a step reuses the cache while that layer's output has changed by
            less than `threshold` (relative L1) since the last full step.
        first_full, last_full: adaptive mode: the first and last steps of a run that are always full.
    """

    interval: int = 3
    branch: int = 0
    threshold: float | None = None
    first_full: int = 2
    last_full: int = 1

    def __post_init__(self) -> None:
        for name in ("interval", "branch", "first_full", "last_full"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "interval" else 0):
                least = "1" if name == "interval" else "0"
                raise ConfigError(f"StepCache.{name} must be an integer of at least {least}, got {value!r}")
        t = self.threshold
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < 10):
            raise ConfigError(f"StepCache.threshold must be None (uniform) or a number in (0, 10), got {t!r}")
        if self.interval == 1 and t is None:
            raise ConfigError("StepCache(interval=1) would never reuse a step; use interval >= 2 or no step cache")

    @property
    def adaptive(self) -> bool:
        return self.threshold is not None

    def describe(self) -> str:
        if self.adaptive:
            return (f"step_cache(adaptive, threshold {self.threshold:g}, at most {self.interval - 1} reused in a row, "
                    f"branch {self.branch})")
        return f"step_cache(full every {self.interval} steps, branch {self.branch})"


@dataclass(frozen=True)
class Config:
    """Options of `diffjet.compile`. The default is lossless (DESIGN.md's fidelity rule).

    Fields:
        dtype: "auto" (default): the half precision a pipeline's family is published and run in, float16
            for UNet pipelines (SD 1.x, 2.x, XL), bfloat16 for DiT pipelines, those with a `transformer`
            (Flux, SD3: bf16 checkpoints, and a T5 encoder that overflows in float16); `pipe.diffjet.dtype`
            says which. "float16" or "bfloat16": that one for every pipeline; "keep": the pipeline's own.
            Applied on CUDA only. A VAE that declares `force_upcast` stays float32 under float16 in a
            pipeline that upcasts it (SDXL), as diffusers runs it.
        tf32: allow TF32 for the float32 matrix work that is left (e.g. SDXL's float32 VAE). This sets
            PyTorch's process-wide `torch.backends.{cuda.matmul,cudnn}.allow_tf32` flags.
        channels_last: convolution weights and activations in NHWC.
        attention: "sdpa-fused-qkv" (one QKV projection, PyTorch SDPA) or "keep" (the pipeline's own).
        components: the pipeline components diffjet touches; others are left alone and reported.
        inductor: the components compiled with Inductor (`torch.compile`): by default the denoisers
            (UNet, transformer), ControlNet and VAE. Text encoders run once per image, so by default they
            get CUDA graphs but no compile time.
        kernels: diffjet's kernels to put in (`passes/kernels.py`): "group_norm_silu" and
            "geglu", and "geglu_fp8" (the GEGLU kernel on the fp8 pass's e4m3 inputs; nothing unless `fp8`
            is on), and for DiT transformers "qk_norm_rope" (Flux.1's attention norms and rotary embedding
            in one kernel), "gelu_epilogue" (tanh-GELU projections as one cuBLASLt GEMM with a GELU
            epilogue; Flux's single blocks without the concatenation before their output projection) and
            "flash_attn_4" (the attention through FlashAttention-4 on Hopper where the optional `flash-attn-4`
            package is installed; Flux's with "qk_norm_rope"), all six by default (docs/kernels.md); `()` for
            none. Applied on CUDA to half-precision channels-last UNet, ControlNet and VAE, and to
            half-precision DiT transformers.
        compile_mode: "default" or "max-autotune-no-cudagraphs" (much longer compilation).
        backend: the `torch.compile` backend: "inductor", or "eager" / "aot_eager" (tests: traced, not compiled).
        cuda_graphs: capture each component call per input signature into a CUDA graph.
        max_graphs: how many input signatures each component keeps captured (least recently used goes).
        graph_memory_gib: a cap on the device memory each component's graphs hold. With a cap, every graph
            gets a memory pool of its own (counted as the growth of reserved memory during its capture),
            and a capture that takes a component over the cap drops its least recently used graphs, whose
            memory goes back to the driver, until it fits (the newest graph always stays). None (default):
            all graphs of a device share one pool, which needs less memory in all but returns none.
        cache: keep what Inductor compiled on disk and reuse it in later processes (True, default); False;
            or "read-only": load entries, store none (shapes not in the cache compile in the process, with
            one warning). A cache folder this process cannot write is used read-only as well.
        step_cache: a `StepCache` (lossy, off by default): DeepCache-style reuse of the UNet's deep
            layers between full steps, every part compiled and captured (`compiler/step_cache.py`).
        cache_dir: the compile cache's folder (default: `$DIFFJET_CACHE_DIR/compile`, else
            `~/.cache/diffjet/compile`). Entries are code: a folder that another user owns or can write is
            refused (the cache is off, with a warning); `$DIFFJET_CACHE_KEY` names a key file that signs
            entries (docs/compile-cache.md).
        precompile: what the compile cache keeps of each input signature, for the next process to start
            from: "function" (default: the traced and compiled function, loaded with its guards) or "aoti"
            (experimental: an AOTInductor package, loaded by its C++ loader in a fraction of the time, and
            compiled in 2–2.5 times as long: diffjet's part of sd15's warm start 1.5–2.0 s against 3.6–5.3 s;
            docs/compile-cache.md). A process loads an entry of either kind; this says what it compiles.
        fp8: lossy, off by default. True: the UNet's and ControlNet's linear layers and 1×1 convolutions
            compute in fp8 e4m3 where that pays (`passes/fp8.py`); `diffjet.compile` raises `DeviceError`
            on anything but a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper). "auto": on where
            supported, otherwise off and said so in `CompileReport.off`. "max": as True, and lossier for more
            speed: GEMMs in fp8 from fewer output tiles (`fp8.MIN_WAVES_MAX`: SDXL's fused QKV projections too)
            and the ResNet blocks' 3×3 convolutions on the e4m3 output of their "group_norm_silu" kernel
            (SDXL's step 1.17× lossless where True is 1.11×, at ten times True's error: docs/fp8.md).
    """

    dtype: str = "auto"
    tf32: bool = True
    channels_last: bool = True
    attention: str = "sdpa-fused-qkv"
    components: tuple[str, ...] = KNOWN_COMPONENTS
    inductor: tuple[str, ...] = ("unet", "controlnet", "transformer", "vae")
    kernels: tuple[str, ...] = DEFAULT_KERNELS
    compile_mode: str = "default"
    backend: str = "inductor"
    cuda_graphs: bool = True
    max_graphs: int = 16
    graph_memory_gib: float | None = None
    cache: bool | str = True
    cache_dir: str | None = None
    step_cache: StepCache | None = None
    fp8: bool | str = False
    precompile: str = "function"

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
        if not self.fp8 and not set(_UNET_DEFAULTS) <= set(self.kernels) and "geglu_fp8" in self.kernels:
            raise ConfigError('kernels: "geglu_fp8" runs the fp8 GEGLU projections and fp8 is off; '
                              'set fp8=True (or "auto") with it, or leave it out')
        if not isinstance(self.max_graphs, int) or self.max_graphs < 1:
            raise ConfigError(f"max_graphs must be a positive integer, got {self.max_graphs!r}")
        if not isinstance(self.cache, bool) and self.cache != "read-only":
            raise ConfigError(f'cache must be True, False or "read-only", got {self.cache!r}')
        if self.step_cache is not None and not isinstance(self.step_cache, StepCache):
            raise ConfigError(f"step_cache must be a diffjet.StepCache or None, got {self.step_cache!r}")
        cap = self.graph_memory_gib
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0):
            raise ConfigError(f"graph_memory_gib must be a positive number of GiB or None, got {cap!r}")
        if not (self.fp8 is True or self.fp8 is False or self.fp8 in ("auto", "max")):
            raise ConfigError(f"fp8 must be False, True, 'auto' or 'max', got {self.fp8!r}")
        if self.fp8 == "max" and "group_norm_silu" not in self.kernels:
            raise ConfigError('fp8="max" runs the 3x3 convolutions on the e4m3 output of the "group_norm_silu" '
                              'kernel; keep it in kernels, or use fp8=True')
        if self.precompile not in PRECOMPILE_KINDS:
            raise ConfigError(f"precompile must be one of {list(PRECOMPILE_KINDS)}, got {self.precompile!r}")

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The precision asked for; None for "keep", and for "auto", which `for_pipeline` settles."""
        return _DTYPES[self.dtype]

    def for_pipeline(self, components: dict) -> "Config":
        """This config with "auto" settled for a pipeline of these components (see `dtype`)."""
        if self.dtype != "auto":
            return self
        return self.replace(dtype="bfloat16" if is_dit(components) else "float16")

    @property
    def fp8_required(self) -> bool:
        """fp8 asked for whatever the device (True or "max"): `diffjet.compile` raises `DeviceError` where it
        cannot run, where "auto" turns itself off."""
        return self.fp8 in (True, "max")

    @property
    def lossy(self) -> list[str]:
        """The lossy options this config asks for, described (empty: lossless). What a device turned
        off is left out of `CompileReport.lossy` instead."""
        cached = [self.step_cache.describe()] if self.step_cache is not None else []
        return cached + ([FP8_NAMES[self.fp8]] if self.fp8 else [])

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)

    # -- named presets -----------------------------------------------------------------------
    @classmethod
    def lossless(cls) -> "Config":
        """fp16 (bf16 for DiTs), channels-last, fused-QKV SDPA, Inductor on the denoiser, ControlNet and VAE, CUDA
        graphs (the default)."""
        return cls()

    @classmethod
    def fast_startup(cls) -> "Config":
        """No Inductor: eager kernels replayed from CUDA graphs. Seconds to start instead of a minute."""
        return cls(inductor=())

    @classmethod
    def fast(cls) -> "Config":
        """Every lossy option where the device supports it (LOSSY: `diffjet verify` prints the cost):
        the step cache at DeepCache's published SD setting (full every 3 steps, branch 0), and fp8 GEMMs
        on GPUs that have them ("auto")."""
        return cls(step_cache=StepCache(), fp8="auto")

    @classmethod
    def max_autotune(cls) -> "Config":
        """Inductor's autotuned GEMM/conv templates: slower to compile, sometimes faster to run."""
        return cls(compile_mode="max-autotune-no-cudagraphs")
