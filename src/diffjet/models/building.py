"""Write a preset as a normal diffusers folder, one component at a time.

The folder is what `DiffusionPipeline.save_pretrained` would write for the real model (with random
weights), so everything downstream takes the user's path: `DiffusionPipeline.from_pretrained(folder)`.
Peak memory stays near one component's size plus one safetensors shard: each model is created on the
meta device, materialised once in the preset dtype, filled, saved and freed before the next.
"""

import json
import logging
import os
import pathlib
import shutil
import time
import uuid

import diffusers
import torch
import transformers
from tqdm.auto import tqdm

from diffjet.errors import OutputError
from diffjet.models import manifest
from diffjet.models.architectures import ARCHITECTURES, ModelSpec
from diffjet.models.presets import get_preset
from diffjet.models.progress_bars import hidden_progress_bars
from diffjet.models.random_weights import fill_random_weights
from diffjet.models.tokenizer import clip_merges, clip_tokenizer, clip_vocab, t5_tokenizer

logger = logging.getLogger(__name__)

# Some safetensors versions serialise a whole shard in memory before writing it; the shard size bounds
# that extra memory (the SDXL UNet is 5.1 GB in fp16). With safetensors 0.8 no copy was seen: building
# sd15 peaked at 2.2 GiB RSS, its UNet alone being 1.6 GiB (tests/test_models.py, -m slow).
MAX_SHARD_SIZE = "2GB"


def count_parameters(name: str) -> dict[str, int]:
    """Parameters per weight-bearing component of preset `name`, counted on the meta device."""
    get_preset(name)
    counts = {}
    for component, spec in ARCHITECTURES[name].models.items():
        with torch.device("meta"):
            model = spec.instantiate()
        counts[component] = sum(p.numel() for p in model.parameters())
    return counts


def build(name: str, path: str | os.PathLike, *, progress: bool = False) -> pathlib.Path:
    """Write preset `name` with deterministic random weights as a diffusers folder at `path`.

    The folder appears at `path` complete or not at all: it is written beside `path` under a
    temporary name and renamed at the end, with a manifest of its files (`manifest.py`). `path` must
    not exist or be an empty folder.
    `progress=True` shows a tqdm bar over components on stderr.
    """
    preset = get_preset(name)
    architecture = ARCHITECTURES[name]
    target = pathlib.Path(path).expanduser().absolute()
    if target.exists() and not (target.is_dir() and not any(target.iterdir())):
        raise OutputError(f"cannot build {name!r} into {target}: it exists and is not an empty folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()

    started = time.perf_counter()
    tokenizers = len(architecture.tokenizers) + len(architecture.t5_tokenizers)
    steps = len(architecture.models) + tokenizers + 2  # + scheduler, model_index
    try:
        bar = tqdm(total=steps, desc=f"building {name}", unit="component", disable=not progress)
        with hidden_progress_bars(), bar:
            components: dict[str, object] = {}
            for component, spec in architecture.models.items():
                bar.set_postfix_str(component)
                components[component] = _build_model(
                    spec, f"{name}/{component}", preset.dtype, staging / component
                )
                bar.update()
            for component, pad_token in architecture.tokenizers.items():
                bar.set_postfix_str(component)
                components[component] = _save_tokenizer(pad_token, staging / component)
                bar.update()
            for component, max_length in architecture.t5_tokenizers.items():
                bar.set_postfix_str(component)
                components[component] = t5_tokenizer(max_length)
                components[component].save_pretrained(staging / component)
                bar.update()
            bar.set_postfix_str("scheduler")
            scheduler = architecture.scheduler_class.from_config(dict(architecture.scheduler_config))
            scheduler.save_pretrained(staging / "scheduler")
            bar.update()
            # The pipeline object exists only to write model_index.json the way diffusers does;
            # its models are on the meta device by now.
            bar.set_postfix_str("model_index.json")
            pipeline_class = getattr(diffusers, preset.pipeline_class)
            pipeline = pipeline_class(**components, scheduler=scheduler, **architecture.pipeline_options)
            pipeline.save_config(staging)
            bar.update()
        manifest.write(staging)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("built preset %s at %s in %.1f s", name, target, time.perf_counter() - started)
    return target


def _build_model(spec: ModelSpec, key: str, dtype: torch.dtype, folder: pathlib.Path) -> torch.nn.Module:
    """Create, fill and save one model; return it on the meta device (its memory freed)."""
    with torch.device("meta"):
        model = spec.instantiate()
    # Cast while still on meta, so CPU memory is only ever allocated in the target dtype.
    # nn.Module.to rather than ModelMixin.to: diffusers 0.42 warns about float32-only modules on
    # every dtype cast, even for models that have none.
    torch.nn.Module.to(model, dtype)
    model.to_empty(device="cpu")
    if isinstance(model, transformers.PreTrainedModel):
        # `to_empty` gives every module its own new tensor, which unties tied weights (T5's `shared` and
        # `encoder.embed_tokens`): tie them again, as the published checkpoints are.
        model.tie_weights()
    fill_random_weights(model, key)
    model.eval()
    if isinstance(model, transformers.PreTrainedModel):
        # transformers 5 always writes safetensors; it has no safe_serialization switch.
        model.save_pretrained(folder, max_shard_size=MAX_SHARD_SIZE)
    else:
        model.save_pretrained(folder, safe_serialization=True, max_shard_size=MAX_SHARD_SIZE)
    model.to_empty(device="meta")
    return model


def _save_tokenizer(pad_token: str, folder: pathlib.Path) -> transformers.CLIPTokenizer:
    """Save the CLIP tokenizer with `pad_token`, plus the vocab.json and merges.txt of the published folders.

    transformers 5 writes only tokenizer.json; the two classic files keep the folder loadable by
    transformers 4 and by other BPE implementations.
    """
    tokenizer = clip_tokenizer(pad_token)
    tokenizer.save_pretrained(folder)
    (folder / "vocab.json").write_text(json.dumps(clip_vocab(), ensure_ascii=False), encoding="utf-8")
    merges = "\n".join(f"{left} {right}" for left, right in clip_merges())
    (folder / "merges.txt").write_text(f"#version: 0.2\n{merges}\n", encoding="utf-8")
    return tokenizer
