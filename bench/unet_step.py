"""Denoiser-step variants on the GPU, each in a fresh process: which compile options diffjet should use.

    python bench/unet_step.py --model sd15 --variants eager-graph,inductor,inductor-cdt --json out.json
    python bench/unet_step.py --model sd15 --variants inductor --profile --json profile.json
    python bench/unet_step.py --model sdxl --variants inductor-gn-silu-geglu,fp8-all,fp8-rule --error
    python bench/unet_step.py --model flux-dev --variants inductor,torch-compile --profile --json flux.json
    python bench/unet_step.py --model flux-dev --blocks 2,4 --variants inductor-dit-kernels --profile


Loads the preset's denoiser (built once with random weights): the UNet, or a DiT's transformer (flux-dev,
flux-schnell, sd35-medium; tiny-flux, tiny-sd3). Applies diffjet's passes as `diffjet.compile` does (a UNet:
fp16, channels-last, fused-QKV SDPA; a DiT: bf16 and fused joint QKV attention, no channels-last, and none of
diffjet's UNet kernels: a DiT's UNet-kernel variants time its plain step; `inductor-qk-norm-rope` is Flux's), then
compiles with the variant's Inductor options, captures the step with diffjet's CudaGraphRunner and times
replays with CUDA events (median of 100 after warm-up). `torch-compile` is diffusers' speed-guide recipe in
their place, as `diffjet bench --compiler torch-compile` applies it (`diffjet/bench/recipes.py`).

A UNet's inputs are seeded random tensors at --size pixels (default: the preset's native size) and timestep
999. A DiT's are what its pipeline passes its transformer in the first step of a seeded one-step call at --size
(`quality.record_unet_inputs`): the pipeline's own text lengths (Flux 512 T5 tokens, SD3 77 + 256), timestep and
guidance. --batch is the denoiser's batch (default: one image: 2 with classifier-free guidance, as UNets and
SD3 run it, 1 for Flux, which is guidance-distilled).

With --profile, also the kernel time of the replayed step by category (torch profiler, CUPTI sees the
kernels inside graph replays), the top kernels, the GPU's idle time between kernels (and before which
kernels), and FLOPs by category with what each category achieves.
With --error, also the step's relative error against the float32 denoiser, and that of the eager
half-precision one (diffjet's passes, no Inductor).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

VARIANTS = {
    "eager-graph": None,
    "inductor-plain": {},
    "inductor": {"conv_1x1_as_mm": True},
    # Diffusers' speed-guide flags.
    "inductor-guide": {
        "conv_1x1_as_mm": True,
        "coordinate_descent_tuning": True,
        "epilogue_fusion": False,
        "coordinate_descent_check_all_directions": True,
    },
    "inductor-cdt": {"conv_1x1_as_mm": True, "coordinate_descent_tuning": True},
    "inductor-benchmark": {"conv_1x1_as_mm": True, "__cudnn_benchmark": True},
    # diffjet's Triton GroupNorm(+shift)+SiLU kernels in every ResNet block (passes/kernels.py).
    "inductor-gn-silu": {"conv_1x1_as_mm": True, "__kernels": ("group_norm_silu",)},
    "eager-gn-silu-graph": {"__eager": True, "__kernels": ("group_norm_silu",)},
    # diffjet's default (kernels on) with cuDNN timing its convolution algorithms, or Inductor's coordinate descent.
    "inductor-gn-silu-benchmark": {"conv_1x1_as_mm": True, "__kernels": ("group_norm_silu",), "__cudnn_benchmark": True},
    "inductor-gn-silu-cdt": {"conv_1x1_as_mm": True, "__kernels": ("group_norm_silu",),
                             "coordinate_descent_tuning": True},
    # diffjet's GEGLU projection kernel on top of the GroupNorm kernel (diffjet's default).
    "inductor-gn-silu-geglu": {"conv_1x1_as_mm": True, "__kernels": ("group_norm_silu", "geglu")},
    "inductor-gn-silu-autotune-mm": {"conv_1x1_as_mm": True, "__kernels": ("group_norm_silu",),
                                     "max_autotune_gemm": True, "max_autotune_gemm_backends": "TRITON,ATEN",
                                     "max_autotune_conv_backends": "ATEN"},
    # GEMMs (and 1x1 convolutions lowered to GEMMs) autotuned against Triton templates; 3x3 convs stay cuDNN.
    "inductor-autotune-mm": {"conv_1x1_as_mm": True, "max_autotune_gemm": True,
                             "max_autotune_gemm_backends": "TRITON,ATEN", "max_autotune_conv_backends": "ATEN"},
    # diffjet's default with fp8 GEMMs (passes/fp8.py, lossy): where `fp8.pays`, or in every linear/1x1 layer.
    "fp8-rule": {"conv_1x1_as_mm": True, "__kernels": ("group_norm_silu", "geglu"), "__fp8": "rule"},
    "fp8-all": {"conv_1x1_as_mm": True, "__kernels": ("group_norm_silu", "geglu"), "__fp8": "all"},
    # The same with the GEGLU projections' fp8 calls through diffjet's GEGLU kernel on e4m3 inputs (gate fused).
    "fp8-rule-geglu-fp8": {"conv_1x1_as_mm": True, "__kernels": ("group_norm_silu", "geglu", "geglu_fp8"),
                           "__fp8": "rule"},
    # The same with the fp8 GEGLU kernel swapped for bench/geglu_one_dot.py's layout (one wide dot for h and g).
    "fp8-rule-geglu-one-dot": {"conv_1x1_as_mm": True, "__kernels": ("group_norm_silu", "geglu", "geglu_fp8"),
                               "__fp8": "rule", "__geglu_one_dot": True},
    "fp8-all-geglu-fp8": {"conv_1x1_as_mm": True, "__kernels": ("group_norm_silu", "geglu", "geglu_fp8"),
                          "__fp8": "all"},
    # The rule with fewer waves of output tiles required (`fp8.MIN_WAVES`): at 3, SDXL's fused QKV projections go
    # fp8 too (their input is a LayerNorm's output, whose quantization Inductor can fuse into the norm); at 2,
    # also the 640-wide projections and feed-forward outputs at 64×64.
    "fp8-waves3-geglu-fp8": {"conv_1x1_as_mm": True, "__kernels": ("group_norm_silu", "geglu", "geglu_fp8"),
                             "__fp8": "rule", "__fp8_min_waves": 3},
    "fp8-waves2-geglu-fp8": {"conv_1x1_as_mm": True, "__kernels": ("group_norm_silu", "geglu", "geglu_fp8"),
                             "__fp8": "rule", "__fp8_min_waves": 2},
    # `Config(fp8="max")`: GEMMs in fp8 from `fp8.MIN_WAVES_MAX` waves (the QKV projections too) and the ResNet
    # blocks' 3×3 convolutions in e4m3 (the GroupNorm+SiLU kernel writes e4m3, diffjet's implicit-GEMM convolution
    # reads it); and that with the GEMMs at fp8=True's bar (the convolutions alone on top of fp8).
    "fp8-max": {"conv_1x1_as_mm": True, "__fp8": "max", "__kernels": ("group_norm_silu", "geglu", "geglu_fp8")},
    "fp8-max-waves8": {"conv_1x1_as_mm": True, "__fp8": "max", "__fp8_min_waves": 8,
                       "__kernels": ("group_norm_silu", "geglu", "geglu_fp8")},
    # A DiT's step with diffjet's Flux attention kernel (the queries' and keys' norms, rotary embedding, SDPA layout).
    "inductor-qk-norm-rope": {"__kernels": ("qk_norm_rope",)},
    # ... with the GELU projections through cuBLASLt's epilogue (and Flux's single blocks without their concatenation)
    "inductor-gelu-epilogue": {"__kernels": ("gelu_epilogue",)},
    "inductor-qk-gelu-epilogue": {"__kernels": ("qk_norm_rope", "gelu_epilogue")},
    # ... and FlashAttention-4 in the processors: diffjet's default DiT step on Hopper.
    "inductor-dit-kernels": {"__kernels": ("qk_norm_rope", "gelu_epilogue", "flash_attn_4")},
    # ... with Inductor's Triton kernels launched for programmatic dependent launch (their prologue overlaps the
    # previous kernel's tail): the idle time before them.
    "inductor-dit-kernels-pdl": {"__kernels": ("qk_norm_rope", "gelu_epilogue", "flash_attn_4"),
                                 "triton.enable_pdl": True},
    # ... with the single blocks' split projection accumulating onto a copy of its first GEMM's output
    # (`torch.addmm(out, ...)`, before `diffjet::addmm_into`): what the in-place accumulation saves.
    "inductor-dit-kernels-addmm": {"__kernels": ("qk_norm_rope", "gelu_epilogue", "flash_attn_4"),
                                   "__addmm_copy": True},
    # ... with Inductor's coordinate-descent tuning of its own kernels' launch configurations (the norms).
    "inductor-dit-kernels-cdt": {"__kernels": ("qk_norm_rope", "gelu_epilogue", "flash_attn_4"),
                                 "coordinate_descent_tuning": True},
    # Diffusers' speed guide in place of diffjet's passes and CudaGraphRunner (`recipes.compiled_denoiser`): its
    # Inductor flags and torch.compile's reduce-overhead mode (Inductor plus CUDA-graph trees), fullgraph.
    "torch-compile": {"conv_1x1_as_mm": True, "epilogue_fusion": False, "__mode": "reduce-overhead"},
}
#: A DiT's default variants: its step graphed eager and compiled as diffjet compiles it, with fp8, and diffusers'
#: recipe. The others run too, the UNet-kernel variants as their plain step (those kernels replace UNet blocks only).
DIT_VARIANTS = ("eager-graph", "inductor", "fp8-rule", "torch-compile")
#: The DiT pipelines, with their transformer's batch per image: SD3 runs classifier-free guidance as one
#: batch of two, Flux.1 is guidance-distilled (one row).
DIT_BATCH = {"FluxPipeline": 1, "StableDiffusion3Pipeline": 2}
PROMPT = "a photograph of an astronaut riding a horse"  # padded to the pipeline's text lengths: no shape changes
# Inductor op names that only move data: a Triton kernel of nothing else is a copy. One named after SDPA
# writes SDPA's inputs in the layout its kernel reads, or, with other ops, computes them (Flux's rotary
# embedding, SD 3.5's QK norms): Inductor never generates the attention itself.
_LAYOUT_OPS = {"clone", "cat", "copy", "to", "view", "unsafe", "permute", "transpose", "expand", "squeeze",
               "unsqueeze", "slice", "select", "split", "with", "sizes", "stack", "convolution",
               "scaled", "dot", "product", "flash", "efficient", "cudnn", "attention"}


def category(kernel: str) -> str:
    """The profile's categories, from a CUDA kernel's name (cuDNN, cuBLAS/nvjet/CUTLASS, flash/fmha,
    Inductor's Triton names).

    Inductor names a fused kernel after every op it holds (`triton_per_fused_add_clone_…_group_norm_silu`):
    a kernel with a norm in it is normalisation, other reductions too (a DiT's RMS norms: mean, pow, rsqrt),
    templates are GEMMs, and the rest of Inductor's pointwise kernels are elementwise unless they only copy
    (`_LAYOUT_OPS`). Triton kernels are sorted first, because their names carry the SDPA ops they feed.
    """
    n = kernel.lower()
    if n.startswith("triton_"):
        if n.startswith("triton_tem"):
            return "gemm"
        if any(k in n for k in ("norm", "var_mean")) or n.startswith(("triton_red", "triton_per")):
            return "normalisation"
        ops = set(n.split("fused_", 1)[-1].split("_")) - {""}
        if ops and ops <= _LAYOUT_OPS | {o for o in ops if o.isdigit()}:
            return "copies/layout"
        return "elementwise"
    if any(k in n for k in ("fmha", "flash", "attention", "sdpa", "attn")):
        return "attention"
    if any(k in n for k in ("group_norm", "layer_norm", "qk_norm")):  # diffjet's kernels, ATen's norms
        return "normalisation"
    if any(k in n for k in ("nchwtonhwc", "nhwctonchw", "transpose", "copy", "memcpy", "memset")):
        return "copies/layout"
    if any(k in n for k in ("conv", "fprop", "implicit", "winograd")):
        return "convolution"
    if any(k in n for k in ("gemm", "nvjet", "cutlass", "xmma", "cublas", "splitk", "matmul")):
        return "gemm"
    if any(k in n for k in ("elementwise", "vectorized", "unrolled", "fill", "reduce")):
        return "elementwise"
    return "other"


def flops_by_category(denoiser, args, kwargs) -> dict:
    """TFLOPs of one eager call by category; a DiT's Linear layers count as GEMMs (aten mm/addmm)."""
    import collections

    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        denoiser(*args, **kwargs)
    out = collections.Counter()
    for op, n in counter.get_flop_counts()["Global"].items():
        name = str(op)
        kind = ("convolution" if "convolution" in name else "attention" if "attention" in name
                else "gemm" if any(k in name for k in ("mm", "addmm", "bmm", "baddbmm")) else "other")
        out[kind] += n / 1e12
    return dict(out)


def idle_between_kernels(kernels: list[tuple[float, float, str]], reps: int, between_steps_us: float = 200.0) -> dict:
    """The GPU's idle time between the kernels of a replayed step, from (start µs, end µs, name) of every kernel
    over `reps` replays: per step, in total and by the category of the kernel that waits (the gap before it),
    and the kernel pairs with the most of it. Gaps over `between_steps_us` are the host between replays."""
    import collections

    by_cat, by_pair, count = collections.Counter(), collections.Counter(), collections.Counter()
    end, previous = None, None
    for start, stop, name in sorted(kernels):
        if end is not None and 0 < start - end <= between_steps_us:
            by_cat[category(name)] += (start - end) / reps
            pair = f"{previous[:48]} -> {name[:48]}"
            by_pair[pair] += (start - end) / reps
            count[pair] += 1 / reps
        if end is None or stop > end:
            end, previous = stop, name
    return {
        "idle_ms": round(sum(by_cat.values()) / 1000, 3),
        "idle_by_next_category_ms": {k: round(v / 1000, 3) for k, v in by_cat.most_common()},
        "idle_top_pairs": [{"pair": k, "ms": round(v / 1000, 3), "count": round(count[k], 1),
                            "us_each": round(v / count[k], 2)} for k, v in by_pair.most_common(15)],
    }


def kernel_profile(step, reps: int = 5) -> dict:
    import collections

    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    by_cat, by_kernel, calls = collections.Counter(), collections.Counter(), collections.Counter()
    for event in prof.key_averages():
        us = getattr(event, "self_device_time_total", 0)
        if us <= 0:
            continue
        by_cat[category(event.key)] += us / reps / 1000
        by_kernel[event.key[:110]] += us / reps / 1000
        calls[event.key[:110]] += event.count / reps
    timeline = [(e.time_range.start, e.time_range.end, e.key) for e in prof.events()
                if e.device_type == DeviceType.CUDA]
    return {
        **idle_between_kernels(timeline, reps),
        "kernel_ms": round(sum(by_cat.values()), 3),
        "kernels": int(sum(calls.values())),
        "by_category_ms": {k: round(v, 3) for k, v in by_cat.most_common()},
        "top": [{"kernel": k, "ms": round(v, 3), "calls": calls[k], "category": category(k)}
                for k, v in by_kernel.most_common(60)],
        "top_normalisation": [{"kernel": k, "ms": round(v, 3), "calls": calls[k]}
                              for k, v in by_kernel.most_common() if category(k) == "normalisation"][:15],
    }


def component(model: str) -> str:
    """The preset's denoiser, as its pipeline names it: "transformer" for a DiT (`DIT_BATCH`), else "unet"."""
    from diffjet.models import PRESETS

    return "transformer" if PRESETS[model].pipeline_class in DIT_BATCH else "unet"


def default_batch(model: str) -> int:
    """The denoiser's batch for one image: 2 with classifier-free guidance, 1 for Flux."""
    from diffjet.models import PRESETS

    return DIT_BATCH.get(PRESETS[model].pipeline_class, 2)


def load_denoiser(model: str, dtype, device: str = "cuda"):
    """The preset's denoiser (`component`) alone, in `dtype`."""
    from diffusers import AutoModel

    from diffjet.models import resolve

    return AutoModel.from_pretrained(resolve(model), subfolder=component(model), torch_dtype=dtype).to(device).eval()


def prepared(denoiser, name: str, kernels: tuple[str, ...] = (), fp8: str | None = None):
    """`denoiser`, the pipeline's component `name`, with diffjet's passes as `diffjet.compile` applies them
    (compiler/__init__.py): on CUDA its half precision (fp16 for a UNet, bf16 for a DiT), a UNet's
    channels-last (a DiT's one convolution is its patch embedding), fused-QKV SDPA (a DiT's fused joint
    QKV attention), `kernels` (diffjet's Triton kernels, `Config.kernels`), and with `fp8` "rule" or "all",
    fp8 GEMMs (`Config.fp8`) where `fp8.pays` or in every layer the pass converts; "max", `Config(fp8="max")`."""
    from diffjet.config import Config
    from diffjet.passes import attention, memory_format, precision
    from diffjet.passes import fp8 as fp8_pass
    from diffjet.passes import kernels as kernel_pass

    config = Config(kernels=kernels, fp8="max" if fp8 == "max" else fp8 is not None).for_pipeline({name: denoiser})
    if next(denoiser.parameters()).is_cuda:
        precision.apply(denoiser, config)
    if name == "unet":
        memory_format.apply(denoiser, config)
    attention.apply(denoiser, config)
    if fp8 is not None:
        fp8_pass.apply(denoiser, config)
        for layer in denoiser._diffjet_fp8_layers if fp8 == "all" else ():
            layer.sms = None  # no GPU to weigh: always fp8
    if kernels:
        kernel_pass.apply(denoiser, config)
    return denoiser


def prepared_unet(model: str, device: str = "cuda", kernels: tuple[str, ...] = (), fp8: str | None = None):
    """The preset's UNet with diffjet's passes (`prepared`), fp16 on CUDA, float32 elsewhere (bench/'s
    UNet scripts start from it)."""
    import torch

    unet = load_denoiser(model, torch.float16 if device == "cuda" else torch.float32, device)
    return prepared(unet, "unet", kernels, fp8)


def unet_inputs(unet, height: int, batch: int, device: str = "cuda"):
    """Seeded UNet inputs in the UNet's dtype at `height`² pixels: (latents, text states, further kwargs)."""
    import torch

    lat, dtype = height // 8, unet.dtype
    g = torch.Generator(device).manual_seed(0)
    sample = torch.randn(batch, unet.config.in_channels, lat, lat, device=device, dtype=dtype, generator=g)
    states = torch.randn(batch, 77, unet.config.cross_attention_dim, device=device, dtype=dtype, generator=g)
    kwargs = {}
    if unet.config.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, 1280, device=device, dtype=dtype, generator=g),
            "time_ids": torch.tensor([[height, height, 0, 0, height, height]] * batch, device=device, dtype=dtype),
        }
    return sample, states, kwargs


def dit_inputs(pipe, height: int, batch: int) -> tuple[tuple, dict]:
    """(args, kwargs) of the DiT pipeline `pipe`'s first transformer call in a seeded one-step call at `height`²
    pixels with `batch` rows, cloned: the pipeline's own inputs, which hand-made ones could miss (Flux's
    position ids, the text lengths, the timestep's dtype)."""
    import torch

    from diffjet.quality import record_unet_inputs

    per_image = DIT_BATCH[type(pipe).__name__]
    if batch % per_image:
        raise ValueError(f"batch {batch}: {type(pipe).__name__} calls its transformer with {per_image} rows per image")
    pipe.set_progress_bar_config(disable=True)
    return record_unet_inputs(pipe, lambda: pipe(
        prompt=[PROMPT] * (batch // per_image), num_inference_steps=1, height=height, width=height,
        generator=torch.Generator("cpu").manual_seed(0), output_type="latent"))


def synthetic_dit_step(model: str, height: int, batch: int, blocks: tuple[int, int], device: str = "cuda",
                       dtype=None):
    """A DiT preset's transformer built from its architecture with `blocks` (Flux: double, single blocks; SD3:
    joint blocks, the second number ignored) and default-initialised weights in `dtype` (by default its half
    precision on CUDA, float32 elsewhere), and step kwargs of its pipeline's shapes at `height`² pixels: the kernels of a full
    step at the cost of a few blocks, without building the preset (whose build takes minutes at full size)."""
    import torch

    from diffjet.models import half_precision
    from diffjet.models.architectures import ARCHITECTURES

    dtype = dtype or (half_precision(model) if device == "cuda" else torch.float32)
    spec = ARCHITECTURES[model].models["transformer"]
    flux = spec.cls.__name__ == "FluxTransformer2DModel"
    config = {**spec.config, "num_layers": blocks[0]}
    if flux:
        config["num_single_layers"] = blocks[1]
    elif config.get("dual_attention_layers"):  # SD 3.5's MMDiT-X blocks, as many as fit
        config["dual_attention_layers"] = [i for i in config["dual_attention_layers"] if i < blocks[0]]
    with torch.device(device):
        transformer = spec.cls(**config).to(dtype).eval()
    g = torch.Generator(device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device=device, generator=g).to(dtype)

    text = 512 if flux else 77 + 256  # the T5 tokens (and SD3's two CLIPs' 77) the pipelines pad to
    kwargs = {"encoder_hidden_states": randn(batch, text, config["joint_attention_dim"]),
              "pooled_projections": randn(batch, config["pooled_projection_dim"]),
              # Flux's pipeline casts the timestep to the latents' dtype, SD3's passes the scheduler's float32
              "timestep": torch.full((batch,), 1.0 if flux else 1000.0, device=device,
                                     dtype=dtype if flux else torch.float32),
              "joint_attention_kwargs": {} if flux else None, "return_dict": False}
    if flux:
        side = height // 16  # 8× the VAE, 2×2 patches packed into tokens
        kwargs["hidden_states"] = randn(batch, side * side, config["in_channels"])
        ids = torch.zeros(side, side, 3, device=device, dtype=dtype)
        ids[..., 1] += torch.arange(side, device=device)[:, None]
        ids[..., 2] += torch.arange(side, device=device)[None, :]
        kwargs.update(img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(text, 3, device=device, dtype=dtype))
        if config.get("guidance_embeds"):
            kwargs["guidance"] = torch.full((batch,), 3.5, device=device, dtype=torch.float32)
    else:
        lat = height // 8
        kwargs["hidden_states"] = randn(batch, config["in_channels"], lat, lat)
    return transformer, (), kwargs


def step_inputs(model: str, height: int, batch: int, device: str = "cuda"):
    """The preset's denoiser, in its half precision on CUDA (float32 elsewhere), and one step's (args, kwargs)
    at `height`² pixels: `unet_inputs` at timestep 999, or a DiT's `dit_inputs`, its pipeline's other
    components left to go."""
    import torch

    from diffjet.models import half_precision, load_pipeline

    dtype = half_precision(model) if device == "cuda" else torch.float32
    if component(model) == "unet":
        unet = load_denoiser(model, dtype, device)
        sample, states, kwargs = unet_inputs(unet, height, batch, device)
        return unet, (sample, torch.tensor(999.0, device=device), states), {"return_dict": False, **kwargs}
    pipe = load_pipeline(model, device=device, dtype=dtype)
    return pipe.transformer, *dit_inputs(pipe, height, batch)


def step_errors(model: str, runner, args: tuple, kwargs: dict) -> dict:
    """The relative error of `runner`'s step, and of the eager half-precision denoiser's (`prepared`), against
    the float32 denoiser (TF32 off); the latter's key names the half precision (fp16, or bf16 for a DiT)."""
    import torch
    from torch.utils._pytree import tree_map

    from diffjet.models import half_precision
    from diffjet.quality import relative_error

    half = half_precision(model)
    with torch.no_grad():
        got = runner(*args, **kwargs)[0].clone()
        eager = prepared(load_denoiser(model, half), component(model))(*args, **kwargs)[0]
        torch.cuda.empty_cache()
        reference = load_denoiser(model, torch.float32)
        args32, kwargs32 = tree_map(lambda v: v.float() if torch.is_tensor(v) and v.is_floating_point() else v,
                                    (args, kwargs))
        flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            want = reference(*args32, **kwargs32)[0]
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    half_name = "bf16" if half == torch.bfloat16 else "fp16"
    return {"error_vs_fp32": relative_error(got, want), f"eager_{half_name}_error_vs_fp32": relative_error(eager, want)}


def _use_one_dot_geglu() -> None:
    """Make `diffjet::geglu_fp8` run bench/geglu_one_dot.py's kernel: each weight, its scales and its bias are
    reordered at their first call (the runner's warm-up, before capture) and kept."""
    import geglu_one_dot as one  # bench/, the script's own folder

    from diffjet.kernels import geglu as gg

    reordered = {}

    def launch_fp8(q, x_scale, weight_fp8, weight_scale, bias, out_dtype, *, out=None, blocks=None):
        key = (weight_fp8.data_ptr(), weight_scale.data_ptr())
        if key not in reordered:
            reordered[key] = tuple(None if t is None else one.interleave(t, one.DEFAULT_BLOCKS[1])
                                   for t in (weight_fp8, weight_scale.reshape(-1), bias))
        return one.launch(q, x_scale, *reordered[key], out_dtype)

    gg.launch_fp8 = launch_fp8  # what the op calls where the kernel takes its inputs


def _split_projection_with_copy(attn, mlp, proj):
    """`kernels.split_projection` as it was before `diffjet::addmm_into`: `torch.addmm(out, ...)` copies `out`."""
    import torch

    width, weight = attn.shape[-1], proj.weight
    out = torch.addmm(proj.bias, mlp.flatten(0, -2), weight[:, width:].t())
    out = torch.addmm(out, attn.flatten(0, -2), weight[:, :width].t())
    return out.view(*attn.shape[:-1], -1)


def run_one(model: str, variant: str, batch: int, size: int | None, profile: bool = False,
            error: bool = False, blocks: tuple[int, int] | None = None,
            qk_config: tuple[int, int, int] | None = None) -> dict:
    import gc

    import torch

    from diffjet.bench import recipes
    from diffjet.compiler import _STEP_ARGS
    from diffjet.models import PRESETS
    from diffjet.passes import kernels as kernel_pass
    from diffjet.runtime.cuda_graph import CudaGraphRunner

    name = component(model)
    options = dict(VARIANTS[variant]) if VARIANTS[variant] is not None else None
    cudnn_benchmark = bool(options and options.pop("__cudnn_benchmark", False))
    kernels = options.pop("__kernels", ()) if options else ()
    # as diffjet.compile: a DiT has no GroupNorm or GEGLU blocks, a UNet no Flux attention
    kernels = tuple(k for k in kernels if (k in kernel_pass.DIT_KERNELS) == (name != "unet"))
    fp8 = options.pop("__fp8", None) if options else None
    if options and "__fp8_min_waves" in options:
        from diffjet.passes import fp8 as fp8_pass

        # read by `fp8.pays` as the step is traced (MIN_WAVES) or by the pass (MIN_WAVES_MAX, fp8="max")
        setattr(fp8_pass, "MIN_WAVES_MAX" if fp8 == "max" else "MIN_WAVES", options.pop("__fp8_min_waves"))
    if options and options.pop("__geglu_one_dot", False):
        _use_one_dot_geglu()
    mode = options.pop("__mode", None) if options else None
    if options and options.pop("__addmm_copy", False):
        kernel_pass.split_projection = _split_projection_with_copy
    if qk_config:
        from diffjet.kernels import qk_norm_rope

        qk_norm_rope.BLOCK_S, qk_norm_rope.HEADS_PER_PROGRAM, qk_norm_rope.NUM_WARPS = qk_config
    height = size or PRESETS[model].height
    if blocks:
        denoiser, args, kwargs = synthetic_dit_step(model, height, batch, blocks)
    else:
        denoiser, args, kwargs = step_inputs(model, height, batch)
    gc.collect()  # a DiT's pipeline goes (text encoders, VAE): peak_gib is the step's
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    if mode is not None:
        for key, value in options.items():
            setattr(torch._inductor.config, key, value)  # process-wide, as the guide sets them
        runner = recipes.compiled_denoiser(denoiser, name, mode)[0]
    else:
        denoiser = prepared(denoiser, name, kernels=kernels, fp8=fp8)
        if kernels:
            print("kernels placed:", kernel_pass.placements(denoiser), file=sys.stderr)
        if options and options.pop("__eager", False):
            options = None
        forward = type(denoiser).forward.__get__(denoiser)
        if options is not None:
            forward = torch.compile(forward, dynamic=False, options=options)
        runner = CudaGraphRunner(forward, torch.device("cuda"), name=name,
                                 weights=[*denoiser.parameters(), *denoiser.buffers()], tensor_args=_STEP_ARGS[name])
    torch.backends.cudnn.benchmark = cudnn_benchmark

    def step():
        return runner(*args, **kwargs)

    with torch.no_grad():  # reduce-overhead's graphs replay without autograd's bookkeeping, as in a pipeline
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        first = time.perf_counter() - start
        for _ in range(10):
            step()
        times = []
        for _ in range(100):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        # Back-to-back replays: the GPU time per step with the host running ahead, as in a pipeline.
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(50):
            step()
        b.record()
        b.synchronize()
        result = {
            "model": model, "variant": variant, "batch": batch, "height": height,
            "ms": statistics.median(times), "ms_min": min(times), "ms_max": max(times),
            "ms_pipelined": a.elapsed_time(b) / 50, "first_call_s": first,
            "captures": runner.stats.captures if isinstance(runner, CudaGraphRunner) else None,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        }
        if error:
            result.update(step_errors(model, runner, args, kwargs))
        if profile:
            result["profile"] = kernel_profile(step)
            flops = flops_by_category(denoiser, args, kwargs)
            by_cat = result["profile"]["by_category_ms"]
            result["profile"]["tflop"] = {k: round(v, 4) for k, v in flops.items()}
            result["profile"]["tflop_per_s"] = {k: round(v / (by_cat[k] / 1000), 1) for k, v in flops.items()
                                                if by_cat.get(k)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="sd15", help="a preset: a UNet pipeline's (sd15, sdxl, ...) or a "
                        "DiT's (flux-dev, flux-schnell, sd35-medium; tiny-flux, tiny-sd3 for a quick check)")
    parser.add_argument("--variants", help="comma-separated (default: all of them for a UNet; for a DiT "
                        + ",".join(DIT_VARIANTS) + ")")
    parser.add_argument("--batch", type=int, help="the denoiser's batch (default: one image's, 2 with "
                        "classifier-free guidance, 1 for Flux)")
    parser.add_argument("--size", type=int, help="pixels per side (default: the preset's native size)")
    parser.add_argument("--json")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per variant")
    parser.add_argument("--profile", action="store_true", help="kernel time by category and FLOPs")
    parser.add_argument("--error", action="store_true", help="the step's error against the float32 denoiser")
    parser.add_argument("--blocks", help="a DiT's step with only this many blocks, 'double,single' for Flux, "
                        "'joint,0' for SD3, built from the architecture (`synthetic_dit_step`), not the preset")
    parser.add_argument("--qk-config", help="the QK-norm kernel's launch configuration, 'tokens,heads,warps' per "
                        "program (bench/qk_norm_rope_op.py --sweep names the fastest)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    blocks = tuple(int(n) for n in args.blocks.split(",")) if args.blocks else None
    if blocks and (len(blocks) != 2 or component(args.model) != "transformer" or args.error):
        parser.error("--blocks takes two numbers, for a DiT preset (flux-dev, flux-schnell, sd35-medium, tiny-*), "
                     "without --error (whose float32 reference is the preset's)")
    args.batch = args.batch or default_batch(args.model)
    qk_config = tuple(int(n) for n in args.qk_config.split(",")) if args.qk_config else None
    if qk_config and len(qk_config) != 3:
        parser.error("--qk-config takes three numbers: tokens, heads and warps per program")
    if args.one:
        print("RESULT " + json.dumps(run_one(args.model, args.one, args.batch, args.size, args.profile, args.error,
                                             blocks, qk_config)))
        return
    from diffjet.bench import environment
    from diffjet.models import resolve

    if not blocks:
        resolve(args.model)  # build the preset once, before the variants' processes load it
    report = {**environment("cuda"), "command": "python " + " ".join(sys.argv),
              "weights": "random (architecture-exact)", "runs": []}
    results = report["runs"]
    variants = args.variants or ",".join(DIT_VARIANTS if component(args.model) == "transformer" else VARIANTS)
    for variant in variants.split(","):
        cmd = [sys.executable, __file__, "--model", args.model, "--batch", str(args.batch), "--one", variant]
        if args.size:
            cmd += ["--size", str(args.size)]
        if args.profile:
            cmd.append("--profile")
        if args.error:
            cmd.append("--error")
        if args.blocks:
            cmd += ["--blocks", args.blocks]
        if args.qk_config:
            cmd += ["--qk-config", args.qk_config]
        try:
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=args.timeout)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            error = proc.stderr.strip().splitlines()[-3:]
        except subprocess.TimeoutExpired:
            lines, error = [], f"timed out after {args.timeout} s"
        result = json.loads(lines[-1][7:]) if lines else {"model": args.model, "variant": variant, "error": error}
        results.append(result)
        print(json.dumps(result), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)
    print(f"{'model':12} {'variant':20} {'ms':>7} {'pipelined':>9} {'first s':>8}")
    for r in results:
        half = "bf16" if "eager_bf16_error_vs_fp32" in r else "fp16"
        if "error" in r:
            print(f"{r['model']:12} {r['variant']:20} failed: {r['error']}")
        else:
            print(f"{r['model']:12} {r['variant']:20} {r['ms']:7.2f} {r['ms_pipelined']:9.2f} {r['first_call_s']:8.1f}"
                  + (f"  error vs fp32 {r['error_vs_fp32']:.4f} (eager {half} {r[f'eager_{half}_error_vs_fp32']:.4f})"
                     if "error_vs_fp32" in r else "")
                  + (f"  kernels {r['profile']['kernel_ms']:.2f} ms, idle {r['profile']['idle_ms']:.2f} ms"
                     if "profile" in r else ""))


if __name__ == "__main__":
    main()
