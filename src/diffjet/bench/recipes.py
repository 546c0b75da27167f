"""The variants that `diffjet bench` compares, each applied to a freshly loaded pipeline.

- `eager`: the pipeline as loaded (fp16 and diffusers' SDPA attention on a GPU).
- `torch-compile`: the recipe of Diffusers' speed guide: channels-last UNet and VAE, fused QKV
  projections, `conv_1x1_as_mm` and no epilogue fusion, `torch.compile` of the UNet and of `vae.decode`,
  in `reduce-overhead` mode (Inductor plus CUDA-graph trees), recorded in every run. For a DiT pipeline
  the same with the transformer in the UNet's place (fullgraph, no channels-last: it has no convolutions
  but its patch embedding), as diffusers' Flux and SD3 speed-up posts do; QKV fused by diffusers'
  `fuse_qkv_projections` only where that computes the same attention (Flux; not SD 3.5, whose QK norms
  diffusers' fused SD3 processor leaves out), recorded as `fused_qkv`. The guide's
  `max-autotune` did not finish compiling the SD1.5 UNet in 430 s on the H100
  (bench/results/unet-step-sd15-autotune-mm-h100-2026-11-27.json), past what one benchmark run may take;
  its coordinate-descent tuning is left out too (bench/NOTES.md §2b: longer compiles, no measurable speed).
- `diffjet`: `diffjet.compile(pipe)` with the default (lossless) config, diffjet's Triton kernels included.
- `diffjet-no-kernels`: the same without the Triton kernels of `diffjet/kernels/` (`Config(kernels=())`):
  Inductor's own code in their place, so that the kernels' effect is measured side by side.
- `diffjet-no-geglu`: the default without the GEGLU projection kernels (`geglu`, `geglu_fp8`), to measure them end
  to end.
- `diffjet-no-dit-kernels`: the default without the DiT kernels (`qk_norm_rope`, `gelu_epilogue`,
  `flash_attn_4`): Inductor's code and SDPA in their place.
- `diffjet-no-flash-attn-4`: the default with SDPA's attention where `flash_attn_4` would act.
- `diffjet-fast`: `Config.fast()`, every lossy option where the device supports it (LOSSY).
- `diffjet-deepcache`: the default plus the step cache alone, DeepCache's setting (interval 3, branch 0).
- `diffjet-fp8`: the default plus fp8 GEMMs alone (`Config(fp8=True)`: Ada and Hopper GPUs only).
- `diffjet-fp8-no-geglu-fp8`: `diffjet-fp8` without the fp8 GEGLU kernel (the GEGLU projections' fp8 calls
  as `torch._scaled_mm`, then the gate in Inductor's code), to measure that kernel end to end.
- `diffjet-fp8-max`: `Config(fp8="max")`: fp8 GEMMs from fewer output tiles (QKV projections too) and the ResNet
  blocks' 3×3 convolutions in e4m3 (SDXL's step 1.17× lossless where `diffjet-fp8` is 1.11×, at ten times its
  error).
- `deepcache`: the `DeepCache` package's own helper (same interval and branch) on the eager pipeline.
  On torch.compile its per-step Python state makes Dynamo recompile at every cached step until it
  gives up (DeepCache issue #26), so the package is measured the way it works: eager.
"""

from __future__ import annotations

from typing import Any

#: The diffjet variants, each as the function that makes its `Config`.
DIFFJET = {
    "diffjet": lambda: _config(),
    "diffjet-no-kernels": lambda: _config(kernels=()),
    "diffjet-no-geglu": lambda: _without("geglu", "geglu_fp8"),
    "diffjet-no-dit-kernels": lambda: _without("qk_norm_rope", "gelu_epilogue", "flash_attn_4"),
    "diffjet-no-flash-attn-4": lambda: _without("flash_attn_4"),
    "diffjet-fast": lambda: _config(preset="fast"),
    "diffjet-deepcache": lambda: _config(step_cache=_deepcache_setting()),
    "diffjet-fp8": lambda: _config(fp8=True),
    "diffjet-fp8-no-geglu-fp8": lambda: _without("geglu_fp8", fp8=True),
    "diffjet-fp8-max": lambda: _config(fp8="max"),
}
COMPILERS = ("eager", "torch-compile", *DIFFJET, "deepcache")
TORCH_COMPILE_MODE = "reduce-overhead"
SCHEDULERS = {
    "default": None,
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "unipc": "UniPCMultistepScheduler",
}


#: The schedulers a flow-matching pipeline (Flux, SD3) takes: its own Euler, by either name.
FLOW_MATCHING_SCHEDULERS = ("default", "euler")


def refused(pipeline_class: str | None, scheduler: str, negative_prompt: str | None = None) -> tuple[str, str] | None:
    """What a DiT pipeline class (`models.loading.DIT_PIPELINES`) cannot do of what was asked, as (the field,
    why), or None: another scheduler than its flow-matching Euler; on Flux, a negative prompt, which
    FluxPipeline ignores unless it runs true CFG (FLUX.1 is guidance-distilled)."""
    from ..models.loading import DIT_PIPELINES

    if pipeline_class in DIT_PIPELINES and scheduler not in FLOW_MATCHING_SCHEDULERS:
        return "scheduler", f"{pipeline_class} is a flow-matching pipeline; use euler or default"
    if pipeline_class == "FluxPipeline" and negative_prompt:
        return "negative_prompt", ("FluxPipeline ignores a negative prompt without true CFG (FLUX.1 is "
                                   "guidance-distilled); leave it out")
    return None


def set_scheduler(pipe, name: str) -> None:
    """Swap the pipeline's scheduler for `name` (same config); "default" keeps the model's own.

    The protocol times Euler: PNDM (SD1.5's published default) indexes a CPU table with a GPU timestep
    every step, a host sync that puts the pipeline's Python time between every two UNet calls.
    Flow-matching pipelines (Flux, SD3) run their own Euler (`FlowMatchEulerDiscreteScheduler`), kept for
    "euler" and "default"; the SD schedulers do not apply to them.
    """
    if type(pipe.scheduler).__name__.startswith("FlowMatch"):
        if name not in FLOW_MATCHING_SCHEDULERS:
            from ..errors import ConfigError

            raise ConfigError(f"--scheduler {name}: {type(pipe).__name__} is a flow-matching pipeline; "
                              "use euler or default (its FlowMatchEulerDiscreteScheduler)")
        return
    class_name = SCHEDULERS[name]
    if class_name is not None:
        import diffusers

        pipe.scheduler = getattr(diffusers, class_name).from_config(pipe.scheduler.config)


def apply(pipe, compiler: str, cache_dir: str | None = None, precompile: str = "function") -> dict[str, Any]:
    """Apply `compiler` to `pipe` in place; returns facts about it to record with the run.

    `cache_dir` is diffjet's compile cache (default: the user's), `precompile` what it keeps (`Config.precompile`)."""
    if compiler == "eager":
        return {}
    if compiler == "torch-compile":
        return _torch_compile(pipe)
    if compiler == "deepcache":
        return _deepcache(pipe)
    if compiler in DIFFJET:
        import diffjet

        diffjet.compile(pipe, DIFFJET[compiler]().replace(cache_dir=cache_dir, precompile=precompile))
        report = pipe.diffjet
        return {"passes": report.passes, "left_alone": report.left_alone, "off": report.off,
                "lossy": list(getattr(report, "lossy", []))}
    raise ValueError(f"unknown compiler {compiler!r}; choose from {', '.join(COMPILERS)}")


def lossy(compiler: str) -> bool:
    """Whether `compiler` trades fidelity for speed (its runs record what it costs)."""
    return compiler == "deepcache" or (compiler in DIFFJET and bool(DIFFJET[compiler]().lossy))


def _config(preset: str = "lossless", **fields):
    from ..config import Config

    return getattr(Config, preset)().replace(**fields)


def _without(*kernels: str, **options: Any):
    from ..config import DEFAULT_KERNELS

    return _config(kernels=tuple(k for k in DEFAULT_KERNELS if k not in kernels), **options)


def _deepcache_setting():
    """DeepCache's published SD setting (interval 3, branch 0: `StepCache`'s defaults), for
    `diffjet-deepcache` and the `deepcache` package alike."""
    from ..config import StepCache

    return StepCache()


def _deepcache(pipe) -> dict[str, Any]:
    from DeepCache import DeepCacheSDHelper

    setting = _deepcache_setting()
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=setting.interval, cache_branch_id=setting.branch)
    helper.enable()
    pipe._deepcache_helper = helper  # keeps it alive with the pipeline
    return {"deepcache": {"interval": setting.interval, "branch": setting.branch, "on": "eager"}}


def _torch_compile(pipe) -> dict[str, Any]:
    import torch

    from ..quality import denoiser_component

    mode = TORCH_COMPILE_MODE if pipe.device.type == "cuda" else "default"
    name = denoiser_component(pipe)
    if name == "unet":
        pipe.vae.fuse_qkv_projections()  # the guide's `pipe.fuse_qkv_projections()`: the UNet's and the VAE's
    pipe.vae.to(memory_format=torch.channels_last)
    # The guide's flags are process-wide Inductor settings; each variant runs in its own process.
    config = torch._inductor.config
    config.conv_1x1_as_mm = True
    config.epilogue_fusion = False
    compiled, fused_qkv = compiled_denoiser(getattr(pipe, name), name, mode)
    setattr(pipe, name, compiled)
    pipe.vae.decode = torch.compile(pipe.vae.decode, mode=mode, fullgraph=True)
    return {"compile_mode": mode, "fused_qkv": fused_qkv}


def compiled_denoiser(denoiser, name: str, mode: str) -> tuple[Any, bool]:
    """The recipe's denoiser (the pipeline's component `name`) and whether its QKV projections were fused: a
    UNet channels-last; diffusers' fused QKV projections where they compute the same attention (a UNet's,
    Flux's; not SD 3.5's, whose QK norms diffusers' fused processor leaves out); `torch.compile(mode=mode,
    fullgraph=True)`."""
    import torch

    if name == "unet":
        denoiser.to(memory_format=torch.channels_last)
    fused_qkv = getattr(denoiser.config, "qk_norm", None) is None
    if fused_qkv:
        denoiser.fuse_qkv_projections()
    return torch.compile(denoiser, mode=mode, fullgraph=True), fused_qkv
