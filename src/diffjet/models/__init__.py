"""Offline Stable Diffusion model presets: exact published architectures with random weights.

The machines diffjet is developed and benchmarked on cannot download weights, and speed does not
depend on weight values. A preset is the exact architecture of every component of a published
pipeline (SD 1.5, SD 2.1, SDXL; plus tiny CPU-sized twins) with deterministic random weights and
the real CLIP tokenizer, written as a normal diffusers folder and loaded back with
`DiffusionPipeline.from_pretrained`, the same path a user takes with real weights.

    path = build("sd15", "/tmp/sd15")          # or resolve("sd15"): built once into the cache
    pipe = load_pipeline("sd15", device="cuda")
"""

from diffjet.models.building import build, count_parameters
from diffjet.models.control_image import control_image, control_inputs
from diffjet.models.loading import half_precision, load_pipeline, pipeline_class_name, resolve
from diffjet.models.presets import PRESETS, Preset, get_preset
from diffjet.models.random_lora import lora_layers, random_lora
from diffjet.models.tokenizer import clip_tokenizer

__all__ = [
    "PRESETS",
    "Preset",
    "build",
    "clip_tokenizer",
    "control_image",
    "control_inputs",
    "count_parameters",
    "get_preset",
    "half_precision",
    "load_pipeline",
    "lora_layers",
    "pipeline_class_name",
    "random_lora",
    "resolve",
]
