"""Per-component plan: which passes run on which pipeline component, and the CUDA-graph runtime.

| component | precision | channels-last | attention | Inductor | CUDA graph |
| --- | --- | --- | --- | --- | --- |
| unet, controlnet | yes | yes | yes | if in `Config.inductor` | forward |
| transformer (Flux, SD3) | yes (bfloat16 under "auto") | no: token sequences | fused joint QKV | if in `Config.inductor` | forward |
| vae | yes (float32 where an SDXL-family pipeline would upcast it) | yes | yes | decoder, if in `Config.inductor` | decoder |
| text_encoder(_2, _3) | yes | no 4-D weights | diffusers' SDPA already | if in `Config.inductor` | forward |

`Config.dtype="auto"` is settled per pipeline (`Config.for_pipeline`): bfloat16 where there is a
`transformer`, float16 otherwise; `CompileReport.dtype` says which and why.

With `Config.fp8` (lossy, opt-in), the GEMMs of the UNet, ControlNet and DiT transformer go fp8
(`passes/fp8.py`) after the attention pass and before the kernels. A device without fp8 refuses `fp8=True`
before anything changes, and turns `fp8="auto"` off, said so in `CompileReport.off`.

On a device other than CUDA only the device-independent passes run (channels-last, attention); the
rest is reported as off, with a warning given once per process.
"""

from __future__ import annotations

import functools
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..config import FP8_NAMES, KNOWN_COMPONENTS, PRECOMPILE_KINDS, Config, is_dit
from ..errors import CacheError, DeviceError
from ..kernels import flash4
from ..passes import attention, fp8, inductor, kernels, memory_format, precision
from ..runtime import precompiled, triton_cache
from ..runtime.compile_cache import CompileCache, module_key, open_cache
from ..runtime.cuda_graph import CudaGraphRunner
from ..runtime.environment import environment_key
from ..runtime.warm_start import OtherKind, WarmStartStore
from . import calls, step_cache

logger = logging.getLogger(__name__)
_warned_cpu = False
_warned_cache: set[str] = set()  # compile-cache problems already reported in this process

# Arguments that change between calls without being device tensors: the timestep (a number for some
# schedulers) and ControlNet's conditioning scale (a float, or one per net). As device tensors they are
# graph inputs; as Python values each new one would compile and capture a graph of its own.
# A DiT's guidance (Flux.1-dev's distilled guidance scale) is a device tensor already; named here all the same,
# so that a caller passing a number still gets one graph for every value.
_STEP_ARGS = {"unet": (1, "timestep"), "controlnet": (1, "timestep", "conditioning_scale"),
              "transformer": (3, "timestep", "guidance")}


@dataclass
class CompileReport:
    """What `diffjet.compile` did to a pipeline; attached to it as `pipe.diffjet`."""

    device: str
    config: Config
    dtype: str = ""  # the precision the components run in, and why (Config.dtype "auto" settled)
    passes: dict[str, list[str]] = field(default_factory=dict)  # component -> passes applied
    left_alone: dict[str, str] = field(default_factory=dict)  # component -> why
    off: list[str] = field(default_factory=list)  # what the device or config turned off
    lossy: list[str] = field(default_factory=list)  # the lossy options on (empty: lossless)
    runners: dict[str, CudaGraphRunner] = field(default_factory=dict)
    cache: CompileCache | None = None
    step_cache: step_cache.StepCachedUNet | step_cache.StepCachedTransformer | None = None

    def summary(self) -> str:
        lines = [f"diffjet on {self.device}, {self.dtype}:"]
        lines += [f"  LOSSY: {what}" for what in self.lossy]
        lines += [f"  {name}: {', '.join(p) or 'nothing'}" for name, p in self.passes.items()]
        lines += [f"  left alone: {name} ({why})" for name, why in self.left_alone.items()]
        lines += [f"  off: {what}" for what in self.off]
        return "\n".join(lines)


def _graph_target(name: str, module: nn.Module) -> nn.Module:
    """The submodule whose forward is the hot path: the VAE's decoder, otherwise the module itself."""
    return module.decoder if name == "vae" else module


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _dtype_of(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def compile_pipeline(pipe, config: Config) -> CompileReport:
    modules = {name: c for name, c in pipe.components.items() if isinstance(c, nn.Module)}
    if not modules:
        raise TypeError(f"{type(pipe).__name__} has no torch modules to compile")
    device = _device_of(next(iter(modules.values())))
    on_cuda = device.type == "cuda"
    report = CompileReport(device=str(device), config=config, dtype=_dtype_rule(config, modules, on_cuda))
    config = config.for_pipeline(modules)
    fp8_off = fp8.unsupported(device) if config.fp8 else None
    if fp8_off and config.fp8_required:
        raise DeviceError(f"{fp8_off}; use Config(fp8='auto') to run fp8 only where it is supported")
    fp8_on = bool(config.fp8) and not fp8_off
    if on_cuda:
        triton_cache.hash_triton_in_background()
    cache = None
    if on_cuda and config.cache and config.inductor:
        cache = _open_cache(config, report)
        report.cache = cache
    if cache is not None:
        triton_cache.keep_driver(cache, environment_key(device))

    if not on_cuda:
        report.off = ["half precision (CPU)", "Inductor (CPU)", "CUDA graphs (CPU)"]
        global _warned_cpu
        if not _warned_cpu:
            warnings.warn(
                f"diffjet: pipeline is on {device}; running only the device-independent passes "
                "(channels-last, fused attention). Move it to CUDA before diffjet.compile for the rest.",
                RuntimeWarning,
                stacklevel=3,
            )
            _warned_cpu = True
    elif config.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if fp8_off:
        report.off.append(f"fp8 ({fp8_off})")

    for name, module in modules.items():
        if name not in KNOWN_COMPONENTS:
            report.left_alone[name] = f"{type(module).__name__}: not a component diffjet optimises"
            continue
        if name not in config.components:
            report.left_alone[name] = "excluded by Config.components"
            continue
        if _device_of(module) != device:
            report.left_alone[name] = f"on {_device_of(module)}, not {device}"
            continue
        applied = report.passes.setdefault(name, [])
        if on_cuda and config.torch_dtype is not None:
            if name == "vae" and hasattr(type(pipe), "upcast_vae") and precision.needs_float32(module, config.torch_dtype):
                precision.pin_float32(module)
            precision.apply(module, config)
            applied.append(f"precision({str(next(module.parameters()).dtype).removeprefix('torch.')})")
        # A DiT's one convolution is its patch embedding; its activations are token sequences, not images.
        if config.channels_last and name != "transformer" and any(p.dim() == 4 for p in module.parameters()):
            memory_format.apply(module, config)
            applied.append("channels_last")
        if config.attention != "keep" and not name.startswith("text_encoder"):
            attention.apply(module, config)
            applied.append("fused_qkv_sdpa")
        if fp8_on and name in ("unet", "controlnet", "transformer"):
            fp8.apply(module, config)
            applied.append(fp8.describe(module))
            if FP8_NAMES[config.fp8] not in report.lossy:
                report.lossy.append(FP8_NAMES[config.fp8])
        if name in ("unet", "controlnet", "vae") and kernels.applies(module, config):
            kernels.apply(module, config)
            placed = kernels.placements(module)
            named = kernels.acting(config, fp8_on=fp8_on)
            counts = [f"{placed['resnet_blocks']} resnet blocks"] + (
                [f"{placed['geglu']} geglu"] if {"geglu", "geglu_fp8"} & set(named) else []) + (
                [f"{placed['conv_fp8']} fp8 3x3 convs"] if placed["conv_fp8"] else [])
            applied.append("kernels(" + ",".join(named) + ": " + ", ".join(counts) + ")")
        if name == "transformer" and kernels.applies(module, config, dit=True):
            kernels.apply(module, config)
            placed = kernels.placements(module)
            acted = [(kernel, f"{placed[key]} {what}") for kernel, key, what in (
                ("qk_norm_rope", "flux_attention", "attention blocks"),
                ("gelu_epilogue", "gelu_epilogue", "gelu projections"),
                ("gelu_epilogue", "flux_single_split", "single blocks"),
                ("flash_attn_4", "flash_attention", "flash attentions")) if placed[key]]
            if "flash_attn_4" in config.kernels and placed["dit_attention"] > placed["flash_attention"]:
                report.off.append(f"flash_attn_4 ({flash4.unavailable(_device_of(module), _dtype_of(module))})")
            if acted:  # named only where they act (SD 3.5 has no Flux attention), a DiT without any unnamed
                named = dict.fromkeys(kernel for kernel, _ in acted)
                applied.append("kernels(" + ",".join(named) + ": " + ", ".join(c for _, c in acted) + ")")
        target = _graph_target(name, module)
        if name in ("unet", "transformer") and config.step_cache is not None:
            report.step_cache = _step_cache(pipe, name, module, config, cache, applied, report)
            applied.append(config.step_cache.describe())
            report.lossy.insert(0, config.step_cache.describe())
            continue
        if on_cuda and name in config.inductor:
            inductor.apply(target, config)
            applied.append(f"inductor({config.compile_mode})")
        if on_cuda and config.cuda_graphs:
            if not isinstance(target.forward, CudaGraphRunner):
                target.forward = graph_runner(name, target, None, config, cache, passes=applied,
                                              about={"model": getattr(pipe, "name_or_path", None)})
            report.runners[name] = target.forward
            applied.append("cuda_graphs")
    calls.serialize(pipe)
    if report.step_cache is not None:
        calls.add_hook(pipe, report.step_cache)
    unknown = [f"{n} ({type(modules[n]).__name__})" for n in report.left_alone if n not in KNOWN_COMPONENTS]
    if unknown:
        logger.warning("diffjet left these components as they are (eager): %s", ", ".join(unknown))
    logger.info("%s", report.summary())
    return report


def _dtype_rule(config: Config, modules: dict[str, nn.Module], on_cuda: bool) -> str:
    """What `CompileReport.dtype` says: the precision the components run in, and where it comes from."""
    if not on_cuda:
        return "the pipeline's own (half precision is for CUDA)"
    if config.dtype == "keep":
        return "dtype kept (Config.dtype='keep')"
    resolved = config.for_pipeline(modules).dtype
    if config.dtype == "auto":
        family = "a DiT pipeline" if is_dit(modules) else "a UNet pipeline"
        return f"{resolved} (Config.dtype='auto': {family})"
    return f"{resolved} (Config.dtype)"


def _open_cache(config: Config, report: CompileReport) -> CompileCache | None:
    """The configured compile cache, or None (with one warning per problem and process) if it is unsafe."""
    try:
        return open_cache(config.cache_dir, read_only=config.cache == "read-only")
    except CacheError as exc:
        report.off.append(f"compile cache ({exc})")
        if str(exc) not in _warned_cache:
            _warned_cache.add(str(exc))
            logger.warning("diffjet: %s; compiling without the cache in this process", exc)
        return None


def _step_cache(pipe, name: str, model: nn.Module, config: Config, cache: CompileCache | None, applied: list[str],
                report: CompileReport) -> step_cache.StepCachedUNet | step_cache.StepCachedTransformer:
    """The UNet's or DiT's forward replaced by a step-cached one whose parts are compiled and graphed like
    the model."""
    cls = step_cache.StepCachedUNet if name == "unet" else step_cache.StepCachedTransformer
    if isinstance(model.forward, cls):
        return model.forward
    device = _device_of(model)
    on_cuda = device.type == "cuda"

    inductor_on = on_cuda and name in config.inductor
    applied_here = [*applied, f"inductor({config.compile_mode})"] if inductor_on else list(applied)
    # The parts called with the model's own arguments take the step arguments (the timestep, Flux's
    # guidance) as graph inputs; the UNet's `deep` and `tail` take the skip-connection stack in that
    # position, whose entry indices must stay Python ints.
    step_parts = step_cache.UNET_ARGUMENT_PARTS if name == "unet" else ("head",)

    def graph(part: str, fn, saveable):
        store = None
        if cache is not None and inductor_on:
            parts = {**_cache_parts(name, model, config, applied_here, step_cache.__name__ + "." + part),
                     "step_cache": [part, config.step_cache.branch, config.step_cache.adaptive]}
            store = _store(cache, parts, config, f"{name}.{part}", model, saveable,
                           {"model": getattr(pipe, "name_or_path", None)})
        tensor_args = _STEP_ARGS[name][1:] if part in step_parts else ()
        runner = _runner(f"{name}.{part}", model, fn, config, store, tensor_args)
        report.runners[f"{name}.{part}"] = runner
        return runner

    compile_part = functools.partial(inductor.compiled, config=config)
    cached = cls(model, config.step_cache, compile=compile_part if inductor_on else None,
                 graph=graph if on_cuda and config.cuda_graphs else None)
    model.forward = cached
    if inductor_on:
        applied.append(f"inductor({config.compile_mode})")
    if on_cuda and config.cuda_graphs:
        applied.append("cuda_graphs")
    return cached


def _cache_parts(name: str, target: nn.Module, config: Config, passes: Sequence[str], function: str) -> dict:
    """Everything a component's compiled code depends on, except the input signature (the runner adds it)."""
    return {
        "component": name,
        "module": module_key(target),
        # Compiled code names its device's index, and the saved functions do not guard the weights' device.
        "device": str(_device_of(target)),
        "environment": environment_key(_device_of(target)),
        "passes": list(passes),
        "compile": _compile_part(config, config.precompile),
        "function": function,
    }


def _compile_part(config: Config, precompile: str) -> dict[str, Any]:
    # An AOTInductor package is not a saved function: entries of the two kinds are apart (and the default's
    # keys are those of the caches written before there was a choice).
    return {"mode": config.compile_mode, "backend": config.backend,
            **({"precompile": precompile} if precompile != "function" else {})}


def _store(cache: CompileCache, parts: dict[str, Any], config: Config, name: str, target: nn.Module,
           function: Callable[..., Any], about: dict[str, Any] | None) -> WarmStartStore:
    """The warm-start store of runner `name` (which precompiles `function(target, ...)`), which also loads the
    entries of the other `Config.precompile` kinds this torch can load."""
    elsewhere = {}
    for kind in PRECOMPILE_KINDS:
        loader = _precompiler(target, config, function, kind) if kind != config.precompile else None
        if loader is not None:
            elsewhere[kind] = OtherKind({**parts, "compile": _compile_part(config, kind)}, loader)
    return WarmStartStore(cache, parts, name=name, precompile=_precompiler(target, config, function), about=about,
                          elsewhere=elsewhere, kernel_folders={"flash_attn_4/": flash4.compiled_in})


def _precompiler(target: nn.Module, config: Config, function: Callable[..., Any],
                 kind: str | None = None) -> precompiled.Precompiler | None:
    """What the warm-start store precompiles `function(target, ...)` with (`kind`, default `config.precompile`);
    None where this torch cannot save what `config.backend` compiles that way."""
    kind = kind or config.precompile
    if not precompiled.supported(config.backend, kind):
        return None
    return precompiled.for_kind(kind, target, inductor.inductor_options(config), function)


def _runner(name: str, target: nn.Module, fn: Callable[..., Any], config: Config, store: WarmStartStore | None,
            tensor_args: tuple[int | str, ...]) -> CudaGraphRunner:
    return CudaGraphRunner(
        fn,
        _device_of(target),
        name=name,
        weights=[*target.parameters(), *target.buffers()],
        tensor_args=tensor_args,
        max_graphs=config.max_graphs,
        max_memory=None if config.graph_memory_gib is None else int(config.graph_memory_gib * 2**30),
        store=store,
    )


def graph_runner(
    name: str,
    target: nn.Module,
    function: Callable[..., Any] | None,
    config: Config,
    cache: CompileCache | None,
    *,
    passes: Sequence[str] = (),
    about: dict[str, Any] | None = None,
    tensor_args: tuple[int | str, ...] | None = None,
) -> CudaGraphRunner:
    """A CUDA-graph runner for `function(target, *args, **kwargs)`, named `name`, with its warm-start store
    in `cache` when what it runs is compiled with Inductor.

    `function=None` runs `target.forward` as the passes left it (Inductor-compiled when `name` is in
    `config.inductor`) and precompiles the class forward. Any other function (one running part of the
    module, say) is compiled here when `name` is in `config.inductor`. `passes` (those applied to `target`)
    are part of the cache key; `about` describes the entries for `diffjet cache ls`; `tensor_args` are
    the runner's (default: the component's step arguments, such as the UNet's timestep).
    """
    if function is None:
        fn, function, compiled = target.forward, precompiled.forward, inductor.is_compiled(target)
    else:
        compiled = name in config.inductor
        fn = functools.partial(function, target)
        fn = inductor.compiled(fn, config) if compiled else fn
    store = None
    if cache is not None and compiled:
        parts = _cache_parts(name, target, config, passes, f"{function.__module__}.{function.__qualname__}")
        store = _store(cache, parts, config, name, target, function, about)
    return _runner(name, target, fn, config, store, _STEP_ARGS.get(name, ()) if tensor_args is None else tensor_args)
