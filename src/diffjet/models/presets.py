"""The named model presets: what each is, at which resolution it runs, in which dtype it is stored."""

from dataclasses import dataclass

import torch

from diffjet.errors import ModelNotFoundError


@dataclass(frozen=True)
class Preset:
    """A Stable Diffusion architecture that diffjet can build offline with random weights.

    `height` and `width` are the native resolution the real model was trained at, the resolution
    benchmarks use; `dtype` is the dtype written to disk (float16 like the published fp16 SD
    checkpoints, bfloat16 like the published Flux and SD 3.5 ones, float32 for the tiny CPU presets).
    """

    name: str
    pipeline_class: str
    height: int
    width: int
    dtype: torch.dtype
    description: str


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(
            name="tiny",
            pipeline_class="StableDiffusionPipeline",
            height=64,
            width=64,
            dtype=torch.float32,
            description="SD 1.5 pipeline classes at toy sizes (about 3M parameters)",
        ),
        Preset(
            name="tiny-sdxl",
            pipeline_class="StableDiffusionXLPipeline",
            height=64,
            width=64,
            dtype=torch.float32,
            description="SDXL pipeline classes at toy sizes (two text encoders, text-time UNet)",
        ),
        Preset(
            name="sd15",
            pipeline_class="StableDiffusionPipeline",
            height=512,
            width=512,
            dtype=torch.float16,
            description="runwayml/stable-diffusion-v1-5 architecture, random weights",
        ),
        Preset(
            name="sd21",
            pipeline_class="StableDiffusionPipeline",
            height=768,
            width=768,
            dtype=torch.float16,
            description="stabilityai/stable-diffusion-2-1 architecture (v-prediction), random weights",
        ),
        Preset(
            name="sdxl",
            pipeline_class="StableDiffusionXLPipeline",
            height=1024,
            width=1024,
            dtype=torch.float16,
            description="stabilityai/stable-diffusion-xl-base-1.0 architecture, random weights",
        ),
        # ControlNet pipelines: the base preset's components plus a ControlNet; they need a control image.
        Preset(
            name="tiny-controlnet",
            pipeline_class="StableDiffusionControlNetPipeline",
            height=64,
            width=64,
            dtype=torch.float32,
            description="the tiny pipeline with a ControlNet of its UNet's shape",
        ),
        Preset(
            name="tiny-sdxl-controlnet",
            pipeline_class="StableDiffusionXLControlNetPipeline",
            height=64,
            width=64,
            dtype=torch.float32,
            description="the tiny-sdxl pipeline with a ControlNet of its UNet's shape",
        ),
        Preset(
            name="sd15-controlnet",
            pipeline_class="StableDiffusionControlNetPipeline",
            height=512,
            width=512,
            dtype=torch.float16,
            description="sd15 with lllyasviel/sd-controlnet-canny's architecture, random weights",
        ),
        Preset(
            name="sdxl-controlnet",
            pipeline_class="StableDiffusionXLControlNetPipeline",
            height=1024,
            width=1024,
            dtype=torch.float16,
            description="sdxl with diffusers/controlnet-canny-sdxl-1.0's architecture, random weights",
        ),
        # DiT pipelines: a transformer denoiser, T5 beside CLIP; stored in bfloat16, as they are published.
        Preset(
            name="tiny-flux",
            pipeline_class="FluxPipeline",
            height=64,
            width=64,
            dtype=torch.float32,
            description="Flux pipeline classes at toy sizes (CLIP + T5, joint and single-stream blocks)",
        ),
        Preset(
            name="tiny-sd3",
            pipeline_class="StableDiffusion3Pipeline",
            height=64,
            width=64,
            dtype=torch.float32,
            description="SD3 pipeline classes at toy sizes (two CLIPs + T5, MMDiT-X blocks)",
        ),
        Preset(
            name="flux-dev",
            pipeline_class="FluxPipeline",
            height=1024,
            width=1024,
            dtype=torch.bfloat16,
            description="black-forest-labs/FLUX.1-dev architecture, random weights, placeholder T5 tokenizer",
        ),
        Preset(
            name="flux-schnell",
            pipeline_class="FluxPipeline",
            height=1024,
            width=1024,
            dtype=torch.bfloat16,
            description="black-forest-labs/FLUX.1-schnell architecture, random weights, placeholder T5 tokenizer",
        ),
        Preset(
            name="sd35-medium",
            pipeline_class="StableDiffusion3Pipeline",
            height=1024,
            width=1024,
            dtype=torch.bfloat16,
            description="stabilityai/stable-diffusion-3.5-medium architecture, random weights, placeholder T5 tokenizer",
        ),
    )
}


def get_preset(name: str) -> Preset:
    """The preset called `name`; raises `ModelNotFoundError` listing the known presets."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ModelNotFoundError(
            f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}"
        ) from None
