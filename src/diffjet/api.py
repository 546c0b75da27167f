"""The public entry point: `diffjet.compile(pipe, config)`."""

from __future__ import annotations

from typing import TypeVar

from .compiler import CompileReport, compile_pipeline
from .config import Config
from .errors import ConfigError
from .lora import forbid_diffusers_lora

Pipeline = TypeVar("Pipeline")


def compile(pipe: Pipeline, config: Config | None = None) -> Pipeline:  # noqa: A001 - the product's verb
    """Make a diffusers pipeline fast in place and return it.

    The pipeline stays the same object with the same components: diffjet converts them to the
    configured precision and channels-last layout, swaps their attention processors for fused-QKV SDPA,
    replaces the `forward` of the hot modules (UNet, ControlNet, VAE decoder, text encoders) by an
    Inductor-compiled one wrapped in CUDA graphs captured per input shape, and leaves everything else
    (tokenizers, scheduler, safety checker, ...) alone. `pipe.diffjet` holds a `CompileReport` saying
    what was done, what was left alone and what was off. Compilation happens on the first call of each
    input shape. Call it again and nothing changes (every pass is idempotent).

    LoRA: use `diffjet.load_lora` / `unload_lora` / `set_lora_scales` (merged in place, no
    recompilation); diffusers' `load_lora_weights` and friends raise on a compiled pipeline.

    On a machine without CUDA only channels-last and fused attention apply; a warning says so.
    Compiled pipelines are for inference and for one thread at a time.
    """
    if config is None:
        config = Config()
    if not isinstance(config, Config):
        raise ConfigError(f"config must be a diffjet.Config, got {type(config).__name__}")
    if not hasattr(pipe, "components"):
        raise ConfigError(f"diffjet.compile takes a diffusers pipeline, got {type(pipe).__name__}")
    # Before anything changes: a pipeline holding PEFT LoRA layers is refused, and diffusers' LoRA
    # methods, which would be silently ignored by the compiled code, are replaced by clear errors.
    forbid_diffusers_lora(pipe)
    report: CompileReport = compile_pipeline(pipe, config)
    previous = getattr(pipe, "diffjet", None)
    if isinstance(previous, CompileReport):
        report.runners = {**previous.runners, **report.runners}
    pipe.diffjet = report
    return pipe
