"""Turn a `--model` string (preset, local folder or hub id) into a loaded diffusers pipeline.

Presets are built once into a cache folder and then loaded like any local diffusers folder, so a
preset and a real checkpoint take the same `DiffusionPipeline.from_pretrained` path. A preset whose
files no longer match its manifest (`manifest.py`) is rebuilt, with a warning.
"""

import functools
import inspect
import json
import logging
import os
import pathlib
import re
import shutil
import uuid

import diffusers
import huggingface_hub
import safetensors
import torch

from diffjet.config import is_dit
from diffjet.errors import DeviceError, ModelLoadError, ModelNotFoundError, OutputError
from diffjet.models import manifest
from diffjet.models.building import build
from diffjet.models.presets import PRESETS
from diffjet.models.progress_bars import hidden_progress_bars

logger = logging.getLogger(__name__)

# Part of the cache folder name ("sd15-v1"): bump it whenever a preset's configs or its random
# weights change, so that caches built by older diffjet versions are not reused.
PRESET_FORMAT_VERSION = 1

# The Hub's repo id shape: "owner/name", letters, digits, "-", "_" and ".".
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")

#: The DiT pipelines diffjet knows: bfloat16, flow matching with their own Euler scheduler.
DIT_PIPELINES = ("FluxPipeline", "StableDiffusion3Pipeline")

_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


def default_cache_dir() -> pathlib.Path:
    """$DIFFJET_CACHE_DIR, else ~/.cache/diffjet."""
    return pathlib.Path(os.environ.get("DIFFJET_CACHE_DIR") or pathlib.Path.home() / ".cache" / "diffjet")


def resolve(model: str, *, cache_dir: str | os.PathLike | None = None) -> str:
    """The `from_pretrained` argument for `model`: a preset's built folder, a local folder or a hub id.

    A preset is built under `cache_dir/models/<name>-v1` the first time and reused after (rebuilt if
    damaged). Raises `ModelNotFoundError` for a path that is not a diffusers folder and for a name that
    is neither a preset nor shaped like a hub id, and `ModelLoadError` for a folder whose
    `model_index.json` names no pipeline.
    """
    if model in PRESETS:
        folder = pathlib.Path(cache_dir or default_cache_dir()).expanduser()
        folder = folder / "models" / f"{model}-v{PRESET_FORMAT_VERSION}"
        if not (folder / "model_index.json").is_file():
            _build_into_cache(model, folder, "no model_index.json")
        elif (problem := manifest.damage(folder)) is not None:
            _build_into_cache(model, folder, problem)
        return str(folder)

    path = pathlib.Path(model).expanduser()
    if (path / "model_index.json").is_file():
        _check_model_index(path)
        return str(path)
    if path.exists() or model.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"{model} is not a diffusers folder (no model_index.json)")
    if _HUB_ID.fullmatch(model):
        return model
    raise ModelNotFoundError(
        f"unknown model {model!r}: use a preset ({', '.join(PRESETS)}), "
        "a local diffusers folder or a hub id such as owner/name"
    )


def load_pipeline(
    model: str,
    *,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> diffusers.DiffusionPipeline:
    """Load `model` (see `resolve`) with `DiffusionPipeline.from_pretrained` and move it to `device`.

    `dtype=None` keeps the dtype stored on disk (float16 for full-size presets); diffusers alone
    would upcast its models to float32 and transformers would not, mixing dtypes in one pipeline.
    """
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"device {device!r} requested but CUDA is not available on this machine")
    path = resolve(model, cache_dir=cache_dir)
    is_hub_id = not pathlib.Path(path).exists()
    try:
        if dtype is None:
            dtype = PRESETS[model].dtype if model in PRESETS else _dtype_on_disk(path)
        with hidden_progress_bars():
            pipeline = diffusers.DiffusionPipeline.from_pretrained(path, dtype=dtype)
    except Exception as error:
        if not is_hub_id:  # whatever a damaged folder makes diffusers or safetensors raise
            raise _load_error(model, error) from error
        if isinstance(error, (OSError, huggingface_hub.errors.EntryNotFoundError)):
            raise ModelNotFoundError(
                f"cannot load {model!r}: the Hugging Face Hub could not be reached or has no such model; "
                f"offline, use a preset ({', '.join(PRESETS)}) or a local diffusers folder"
            ) from error
        raise
    return pipeline.to(device)


def half_precision(model: str) -> torch.dtype:
    """The half precision `model` (see `resolve`, but nothing is built) runs in on a GPU: bfloat16 for DiT
    pipelines (a `transformer` in its model_index.json: Flux, SD3, published in bf16, with a T5 encoder that
    overflows in float16), float16 for the others and for hub ids, which are not looked up."""
    if model in PRESETS:
        return torch.bfloat16 if PRESETS[model].pipeline_class in DIT_PIPELINES else torch.float16
    return torch.bfloat16 if is_dit(_model_index(model) or {}) else torch.float16


def pipeline_class_name(model: str) -> str | None:
    """The diffusers pipeline class `model` loads as (a preset's, or a folder's model_index.json `_class_name`),
    read without loading anything; None for hub ids, which are not looked up."""
    if model in PRESETS:
        return PRESETS[model].pipeline_class
    name = (_model_index(model) or {}).get("_class_name")
    return name if isinstance(name, str) else None


@functools.cache
def default_guidance(pipeline_class: str | None) -> float | None:
    """The default `guidance_scale` of diffusers' pipeline class named `pipeline_class` (FLUX.1's 3.5, SD 3.5's
    7.0, SD's 7.5), None when unknown: a call that leaves guidance out gets it anyway."""
    call = getattr(getattr(diffusers, pipeline_class, None), "__call__", None) if pipeline_class else None
    parameter = inspect.signature(call).parameters.get("guidance_scale") if call is not None else None
    default = getattr(parameter, "default", None)
    return float(default) if isinstance(default, (int, float)) and not isinstance(default, bool) else None


def _model_index(model: str) -> dict | None:
    try:
        index = json.loads((pathlib.Path(model).expanduser() / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return None
    return index if isinstance(index, dict) else None


def _load_error(model: str, error: Exception) -> ModelLoadError:
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return ModelLoadError(f"cannot load {model}: {reason} (damaged or incomplete files? -v shows the whole error)")


def _check_model_index(folder: pathlib.Path) -> None:
    """A `model_index.json` that diffusers can start from: a JSON object naming the pipeline class."""
    index_file = folder / "model_index.json"
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{index_file} is not readable JSON ({error})") from None
    if not isinstance(index, dict) or not isinstance(index.get("_class_name"), (str, list)):
        raise ModelLoadError(f"{index_file} names no pipeline class (\"_class_name\"): not a diffusers pipeline folder")


def _build_into_cache(name: str, folder: pathlib.Path, problem: str) -> None:
    if folder.exists():
        # Only build() writes here and it renames complete folders into place, so this is damage or a
        # leftover of something else (a hand-made folder, a copy cut short). Moved aside in one rename
        # first, so that no process ever loads it half deleted.
        logger.warning("preset %s in %s: %s; rebuilding it", name, folder, problem)
        aside = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
        try:
            folder.rename(aside)
        except FileNotFoundError:  # another process moved it first
            pass
        shutil.rmtree(aside, ignore_errors=True)
    logger.info("building preset %s into %s (first use)", name, folder)
    try:
        build(name, folder)
    except OSError as error:
        # Another process building the same preset renamed its folder into place first.
        if not (folder / "model_index.json").is_file():
            raise OutputError(f"cannot build preset {name!r} into {folder}: {error}") from error


def _dtype_on_disk(path: str) -> torch.dtype | None:
    """Dtype of the first safetensors weight in the pipeline's main model, or None (hub id, no weights)."""
    folder = pathlib.Path(path)
    if not folder.is_dir():
        return None
    for component in ("unet", "transformer", "vae", "text_encoder"):
        for weights in sorted((folder / component).glob("*.safetensors")):
            with safetensors.safe_open(weights, framework="pt") as tensors:
                for key in tensors.keys():
                    return _SAFETENSORS_DTYPES.get(tensors.get_slice(key).get_dtype())
    return None
