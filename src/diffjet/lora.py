"""LoRA on compiled pipelines: merge adapters into the weights in place, switch them, undo them exactly.

A compiled pipeline's hot modules run Inductor code replayed from CUDA graphs that hold raw pointers to the
weights, and the fused attention projection (`passes/attention.py`) reads one (3·C)×C tensor of which
`to_q`/`to_k`/`to_v` are views. The LoRA layers that diffusers injects through PEFT replace modules the
compiled code no longer calls, so they would be silently ignored. Writing `W + Σ scale · alpha/rank · up @ down`
into the existing storage instead changes what every graph computes, with no recompilation and no
re-capture, and a merged adapter costs nothing per denoising step.

Exact undo: the first time an adapter touches a weight, a copy of it goes to host memory (pinned for CUDA
weights) in the weight's own dtype. Every change (load, unload, new scales) recomputes each touched weight as
its base plus the active deltas in float32 and writes the result once, so float16 weights do not drift however
often adapters are switched, and unloading the last adapter of a weight copies its base back bit for bit.

Switching fast: the base copies are kept after an unload, so the next adapter does not copy the weights off
the GPU again; a fingerprint (storage, version counter) taken after each write tells whether anything else
changed a weight since, and then it is copied afresh. A weight diffjet has just restored is its own base, so
merging into it reads it on the GPU instead of from host memory. Factors go to the GPU in one transfer, and
no step waits for the GPU. The price is host memory equal to every weight an adapter has touched; an unload
then moves all of them over the host link (22 GiB for a full Flux LoRA: 0.43 s on an H200).
`base_copy="device"` keeps the copies in GPU memory instead, beside their weights, for switches that never
cross the host link, at the price of that much GPU memory.

Formats are those diffusers' `lora_state_dict` reads: diffusers/PEFT keys (`unet.….lora_A/lora_B`,
`….lora.down/up`, the old `to_q_lora`), kohya (`lora_unet_…`, `lora_te_…`, SDXL's `lora_te1_/lora_te2_`
and sgm block names, with `.alpha`). diffusers' own converters and key tables turn them into module names.
Linear and Conv2d layers are supported, 1×1 and k×k kohya conv LoRA included; DoRA, LoHa/LoKr, LoRA biases
and LoRAs of components other than the UNet, the Flux transformer and the text encoders raise `LoraError`.

Flux: whatever `FluxPipeline.lora_state_dict` reads (diffusers/PEFT `transformer.…` keys as ai-toolkit writes
them, kohya's `lora_unet_double_blocks_…`/`single_blocks_…` with BFL's fused qkv and linear1 layers, which
diffusers splits into to_q/to_k/to_v and the single blocks' projections, XLabs, …). SD3 LoRAs: not yet.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.loaders import FluxLoraLoaderMixin, StableDiffusionLoraLoaderMixin
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_processor import Attention
from diffusers.utils.state_dict_utils import (
    DIFFUSERS_OLD_TO_PEFT,
    DIFFUSERS_TO_PEFT,
    UNET_TO_DIFFUSERS,
    convert_state_dict,
)
from torch import nn

from .compiler import calls
from .errors import LoraError
from .passes import fp8
from .quality import denoiser_component

#: The pipeline components a LoRA may adapt, named as the prefixes of its keys: a pipeline's denoiser (the UNet,
#: or a DiT's transformer: `_adaptable`) and its CLIP text encoders.
LORA_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")

# diffusers' key tables, in the order that turns every format its loaders accept into PEFT's
# `<module>.lora_A.weight` / `<module>.lora_B.weight`. The UNet and the CLIP text encoders name the same
# projections differently (`to_q` against `q_proj`), so each has its own order.
_UNET_MAPPINGS = (UNET_TO_DIFFUSERS, DIFFUSERS_OLD_TO_PEFT)
_TEXT_ENCODER_MAPPINGS = (DIFFUSERS_OLD_TO_PEFT, DIFFUSERS_TO_PEFT, UNET_TO_DIFFUSERS)

_PEFT_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<part>[AB])\.weight")

# What to call instead of each diffusers LoRA method on a compiled pipeline.
_REPLACEMENTS = {
    "load_lora_weights": "diffjet.load_lora(pipe, lora, scale, adapter_name)",
    "set_adapters": "diffjet.set_lora_scales(pipe, {adapter_name: scale})",
    "fuse_lora": "diffjet.load_lora(pipe, ...), which merges already",
    "unfuse_lora": "diffjet.unload_lora(pipe)",
    "unload_lora_weights": "diffjet.unload_lora(pipe)",
    "delete_adapters": "diffjet.unload_lora(pipe, adapter_name)",
    "enable_lora_hotswap": "diffjet.load_lora and diffjet.unload_lora, which never recompile",
}


@dataclass
class _Layer:
    """One weight adapted by one adapter: its delta is `alpha_scale · up @ down`.

    As read, the factors are CPU tensors in the LoRA's dtype; an adapter holds them in float32 on the
    weight's device (`_to_weight_devices`)."""

    up: torch.Tensor  # (out, rank); float32 once next to its weight
    down: torch.Tensor  # (rank, in · kh · kw)
    alpha_scale: float  # alpha / rank; alpha / sqrt(rank) for rsLoRA


@dataclass
class _Adapter:
    scale: float
    layers: dict[tuple[str, str], _Layer]  # (component, module path) -> factors


@dataclass
class _LoraState:
    """Attached to a pipeline as `pipe._diffjet_lora`."""

    adapters: dict[str, _Adapter] = field(default_factory=dict)
    base: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)  # weights before any adapter
    base_copy: str = "host"  # where `base` lives for CUDA weights: "host" (pinned) or "device"
    written: dict[tuple[str, str], tuple] = field(default_factory=dict)  # each weight's fingerprint after our write
    # LoRA files read lately, by (path, weight_name, size, mtime): switching back skips reading and parsing.
    files: OrderedDict[tuple, dict[tuple[str, str], _Layer]] = field(default_factory=OrderedDict)


#: The pipeline attribute that caches `_locate`'s answers.
_MODULE_CACHE = "_diffjet_lora_modules"
#: Where `load_lora(base_copy=...)` may keep the base copies of CUDA weights.
BASE_COPIES = ("host", "device")
#: Size of the pinned buffers that hold host copies. PyTorch's pinned allocator rounds each allocation up to a
#: power of two (a 75 MB Flux weight would take 128 MB, 35 GiB for a full Flux LoRA's 22 GiB), so copies share
#: buffers of this size.
PINNED_CHUNK_BYTES = 1 << 30
#: How many parsed LoRA files a pipeline keeps (host memory: the factors, 109 MB for a full rank-16 sdxl LoRA).
PARSED_FILES_KEPT = 4


# -- public ----------------------------------------------------------------------------------------


def load_lora(
    pipe: Any,
    lora: str | os.PathLike | Mapping[str, torch.Tensor],
    scale: float = 1.0,
    adapter_name: str | None = None,
    *,
    weight_name: str | None = None,
    base_copy: str | None = None,
    replacing: str | Iterable[str] = (),
) -> str:
    """Merge a LoRA into the pipeline's weights in place and return its adapter name.

    `lora` is what `pipe.load_lora_weights` takes: a state dict, a `.safetensors` file, a folder or a hub
    id (`weight_name` picks the file in a folder or repository). Nothing is changed unless every key maps
    to a layer of this pipeline with matching shapes. Weight storage never moves, so compiled code and
    CUDA graphs see the new weights at once. Works on compiled and plain pipelines alike; on a compiled one
    it waits for a call running in another thread to end (as `unload_lora` and `set_lora_scales` do).
    `base_copy` says where the copies of the original weights of a CUDA pipeline are kept, for this load
    and every later one: "host" (pinned host memory; the default) or "device" (GPU memory: unloading and
    switching never cross the host link); copies made already move there. `replacing` names adapters to
    take out in the same step, as `unload_lora` would (the new one may reuse a name): a switch then gives each
    weight its base back and merges into it while the next one's copy is on its way, where an unload and a
    load run one after the other.
    """
    scale = _scale(scale, adapter_name)
    if base_copy is not None and base_copy not in BASE_COPIES:
        raise LoraError(f"base_copy must be one of {', '.join(map(repr, BASE_COPIES))}, got {base_copy!r}")
    replacing = [replacing] if isinstance(replacing, str) else list(replacing)
    with calls.lock(pipe):
        return _load(pipe, lora, scale, adapter_name, weight_name, base_copy, replacing)


def _load(pipe: Any, lora: Any, scale: float, adapter_name: str | None, weight_name: str | None,
          base_copy: str | None, replacing: list[str]) -> str:
    state = _state(pipe)
    _check_known(state, replacing)
    if adapter_name is None:
        adapter_name = next(f"default_{i}" for i in itertools.count() if f"default_{i}" not in state.adapters)
    elif adapter_name in state.adapters and adapter_name not in replacing:
        raise LoraError(f"a LoRA named {adapter_name!r} is loaded already; unload it or pick another adapter_name")
    layers = _read_file_or_lora(pipe, state, lora, weight_name)
    if base_copy is not None and base_copy != state.base_copy:
        state.base = _base_copies(pipe, state.base, base_copy)  # an error here leaves the old copies in place
        state.base_copy = base_copy
    removed = {key for name in replacing for key in state.adapters[name].layers}
    active = {key for name, adapter in state.adapters.items() if name not in replacing for key in adapter.layers}
    at_base = layers.keys() - active - removed  # weights that hold their base now: merging reads them in place
    weights = {key: _weight(pipe, key) for key in at_base}
    stale = {key: weight for key, weight in weights.items()
             if key not in state.base or state.written.get(key) != _fingerprint(weight)}
    state.base.update(_base_copies(pipe, stale, state.base_copy))
    adapter = _Adapter(scale, _to_weight_devices(pipe, layers))
    undo = _registry_undo(state)
    for name in replacing:
        del state.adapters[name]
    state.adapters[adapter_name] = adapter
    _merge(pipe, state, [*layers, *(removed - layers.keys())], at_base, undo=undo)
    return adapter_name


def unload_lora(pipe: Any, adapter_name: str | None = None) -> None:
    """Take one adapter (or, with `adapter_name=None`, all of them) out of the weights, in place.

    Weights that no adapter touches any more get their original values back exactly.
    """
    with calls.lock(pipe):
        state = _state(pipe)
        names = list(state.adapters) if adapter_name is None else [adapter_name]
        _check_known(state, names)
        undo = _registry_undo(state)
        touched: set[tuple[str, str]] = set()
        for name in names:
            touched.update(state.adapters.pop(name).layers)
        _merge(pipe, state, touched, undo=undo)


def set_lora_scales(pipe: Any, scales: Mapping[str, float]) -> None:
    """Set the scale of each named adapter (0 turns one off and keeps it loaded); others keep theirs."""
    with calls.lock(pipe):
        state = _state(pipe)
        _check_known(state, scales)
        scales = {name: _scale(scale, name) for name, scale in scales.items()}  # all checked before any changes
        undo = _registry_undo(state)
        touched: set[tuple[str, str]] = set()
        for name, scale in scales.items():
            state.adapters[name].scale = scale
            touched.update(state.adapters[name].layers)
        _merge(pipe, state, touched, undo=undo)


def lora_scales(pipe: Any) -> dict[str, float]:
    """The adapters merged into `pipe`, in loading order, with their scales."""
    return {name: adapter.scale for name, adapter in _state(pipe).adapters.items()}


def forbid_diffusers_lora(pipe: Any) -> None:
    """Make diffusers' own LoRA methods raise `LoraError` on this pipeline object, pointing to diffjet's.

    PEFT LoRA layers are skipped by the compiled code (fused projections, Inductor, CUDA graphs), so
    `pipe.load_lora_weights` and its siblings would change nothing, silently. Only this instance is
    changed (instance attributes shadow the class's methods); diffusers itself is left alone. A pipeline
    that holds PEFT LoRA layers already is refused: fuse and unload them first.
    """
    for name, module in pipe.components.items():
        if isinstance(module, nn.Module) and any(type(m).__module__.startswith("peft.") for m in module.modules()):
            raise LoraError(
                f"{name} holds diffusers (PEFT) LoRA layers that compiled code would ignore: call "
                "pipe.fuse_lora() and pipe.unload_lora_weights() first, or load it with diffjet.load_lora"
            )
    for method in _REPLACEMENTS:
        if hasattr(type(pipe), method):
            setattr(pipe, method, functools.partial(_refuse, method))


def _refuse(method: str, *args: Any, **kwargs: Any) -> None:
    raise LoraError(
        f"pipe.{method} does not work on a diffjet-compiled pipeline (its PEFT layers would be skipped); "
        f"use {_REPLACEMENTS[method]}: diffjet merges LoRA weights in place"
    )


# -- reading a LoRA --------------------------------------------------------------------------------


def _read_lora(pipe: Any, lora: Any, weight_name: str | None) -> dict[tuple[str, str], _Layer]:
    """Every layer the LoRA adapts, checked against the pipeline; raises `LoraError` before any change."""
    state_dict, network_alphas, metadata = _lora_state_dict(pipe, lora, weight_name)
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    alphas: dict[tuple[str, str], float] = {}
    for key, value in [*state_dict.items(), *(network_alphas or {}).items()]:
        component, _, rest = key.partition(".")
        if component not in _adaptable(pipe) or not rest:
            raise LoraError(
                f"LoRA key {key!r} names no component diffjet can adapt ({', '.join(_adaptable(pipe))}); "
                "is it a LoRA for another kind of model?"
            )
        if not isinstance(getattr(pipe, component, None), nn.Module):
            raise LoraError(f"the LoRA adapts {component}, which this {type(pipe).__name__} does not have")
        if key.endswith(".alpha"):
            alphas[component, _module_path(component, rest.removesuffix(".alpha"))] = float(value)
            continue
        match = _PEFT_KEY.fullmatch(_to_peft_key(component, rest))
        if match is None:
            raise LoraError(f"unsupported LoRA key {key!r}: diffjet merges plain LoRA (no DoRA, LoHa, LoKr or biases)")
        parts.setdefault((component, match["module"]), {})[match["part"]] = value

    layers = {}
    for (component, path), factors in parts.items():
        if set(factors) != {"A", "B"}:
            missing = "lora_B (up)" if "A" in factors else "lora_A (down)"
            raise LoraError(f"LoRA for {component}.{path} has no {missing} weight")
        module_path, module = _find_module(pipe, component, path)
        down, up = factors["A"], factors["B"]  # in the file's dtype until they reach the weight's device
        _check_shapes(f"{component}.{module_path}", module.weight, down, up)
        rank = down.shape[0]
        alpha = alphas.get((component, path))
        if alpha is None:
            alpha = _metadata_alpha(metadata, component, module_path, rank)
        rs_lora = bool((metadata or {}).get(f"{component}.use_rslora"))
        layers[component, module_path] = _Layer(
            up=up.flatten(1).contiguous(),
            down=down.flatten(1).contiguous(),
            alpha_scale=alpha / (math.sqrt(rank) if rs_lora else rank),
        )
    if not layers:
        raise LoraError("the LoRA holds no lora_A/lora_B (lora_down/lora_up) weights")
    return layers


def _adaptable(pipe: Any) -> tuple[str, ...]:
    """The components a LoRA for this kind of pipeline may adapt: its denoiser and the CLIP text encoders."""
    denoiser = denoiser_component(pipe)
    return tuple(c for c in LORA_COMPONENTS if c == denoiser or c.startswith("text_encoder"))


def _lora_state_dict(pipe: Any, lora: Any, weight_name: str | None) -> tuple[dict, dict | None, dict | None]:
    if isinstance(lora, Mapping):
        lora = dict(lora)  # diffusers' kohya converter pops keys from the dict it is given
    elif isinstance(lora, (str, os.PathLike)):
        lora = os.fspath(lora)
        looks_local = lora.startswith((".", "/", "~")) or lora.endswith((".safetensors", ".bin"))
        if looks_local and not os.path.exists(os.path.expanduser(lora)):
            raise LoraError(f"no LoRA file or folder at {lora}")
        lora = os.path.expanduser(lora)
    else:
        raise LoraError(f"a LoRA is a state dict, a file, a folder or a hub id, got {type(lora).__name__}")
    # SD and SDXL pipelines read LoRAs with their own loader class; SDXL's needs the UNet config to map
    # kohya's sgm block names (input_blocks_4_1) onto diffusers' (down_blocks.1.attentions.0).
    loader = getattr(type(pipe), "lora_state_dict", StableDiffusionLoraLoaderMixin.lora_state_dict)
    unet = getattr(pipe, "unet", None)
    kwargs = {"unet_config": unet.config} if unet is not None else {}
    if getattr(pipe, "transformer", None) is not None:
        if not isinstance(pipe, FluxLoraLoaderMixin):
            raise LoraError(f"diffjet.load_lora takes Flux LoRAs among the DiTs so far, not {type(pipe).__name__}'s")
        kwargs["return_alphas"] = True  # Flux's loader returns the alphas only when asked
    try:
        state_dict, network_alphas, metadata = loader(
            lora, weight_name=weight_name, return_lora_metadata=True, **kwargs
        )
    except Exception as error:  # noqa: BLE001 - file, hub (httpx when offline) and key-conversion errors alike
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        source = "state dict" if isinstance(lora, dict) else lora
        raise LoraError(f"cannot read the LoRA {source}: {reason}") from error
    if (metadata or {}).get("unet.use_dora") or any("magnitude_vector" in k for k in state_dict):
        raise LoraError("DoRA adapters are not supported; diffjet merges plain LoRA")
    return state_dict, network_alphas, metadata


def _to_peft_key(component: str, key: str) -> str:
    mappings = _UNET_MAPPINGS if component == "unet" else _TEXT_ENCODER_MAPPINGS
    for mapping in mappings:
        key = next(iter(convert_state_dict({key: None}, mapping)))
    return key


def _module_path(component: str, key: str) -> str:
    """The module a key or alpha name refers to: `….to_q_lora.down.weight` and `….to_q` both give `….to_q`."""
    converted = _to_peft_key(component, key)
    match = _PEFT_KEY.fullmatch(converted)
    return match["module"] if match else converted


def _find_module(pipe: Any, component: str, path: str) -> tuple[str, nn.Module]:
    cached = pipe.__dict__.get(_MODULE_CACHE, {}).get((component, path))
    if cached is not None:
        return path, cached[0]
    root = getattr(pipe, component)
    candidates = [path]
    if component.startswith("text_encoder"):
        # CLIP LoRA keys come with and without a `text_model.` level; transformers 4 has it, 5 does not.
        candidates += [path.removeprefix("text_model."), f"text_model.{path}"]
    for candidate in candidates:
        try:
            module = root.get_submodule(candidate)
        except AttributeError:
            continue
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            kind = type(module).__name__
            raise LoraError(f"{component}.{candidate} is a {kind}; diffjet merges LoRA into Linear and Conv2d layers")
        return candidate, module
    raise LoraError(
        f"the LoRA adapts {component}.{path}, which {type(root).__name__} does not have: "
        "is the LoRA for another architecture?"
    )


def _check_shapes(name: str, weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> None:
    fits = (
        down.dim() in (2, weight.dim())
        and up.dim() in (2, weight.dim())
        and up.shape[0] == weight.shape[0]
        and up.shape[1] == down.shape[0]
        and down[0].numel() == weight[0].numel()
        and (up.dim() == 2 or all(k == 1 for k in up.shape[2:]))
        and (down.dim() == 2 or down.shape[2:] == weight.shape[2:])
    )
    if not fits:
        raise LoraError(
            f"LoRA for {name} has down {tuple(down.shape)} and up {tuple(up.shape)}, which do not fit its weight "
            f"{tuple(weight.shape)}: is the LoRA for another architecture?"
        )


def _metadata_alpha(metadata: Mapping[str, Any] | None, component: str, module_path: str, rank: int) -> float:
    """PEFT's alpha for a module from diffusers' saved adapter metadata; without any, alpha = rank (scale 1)."""
    metadata = metadata or {}
    # PEFT's own rule (peft.utils.other.get_pattern_key): a pattern matches a suffix of the module name.
    for pattern, alpha in (metadata.get(f"{component}.alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module_path):
            return float(alpha)
    return float(metadata.get(f"{component}.lora_alpha", rank))


def _read_file_or_lora(pipe: Any, state: _LoraState, lora: Any, weight_name: str | None) -> dict:
    """`_read_lora`, through the pipeline's cache of parsed files when `lora` is a local file.

    A file is known by its path, size and modification time, so a file rewritten in place is read again.
    """
    key = None
    if isinstance(lora, (str, os.PathLike)) and os.path.isfile(os.path.expanduser(lora)):
        path = os.path.realpath(os.path.expanduser(lora))
        info = os.stat(path)
        key = (path, weight_name, info.st_size, info.st_mtime_ns)
        if key in state.files:
            state.files.move_to_end(key)
            return state.files[key]
    layers = _read_lora(pipe, lora, weight_name)
    if key is not None:
        state.files[key] = layers
        while len(state.files) > PARSED_FILES_KEPT:
            state.files.popitem(last=False)
    return layers


# -- merging ---------------------------------------------------------------------------------------


def _state(pipe: Any) -> _LoraState:
    state = getattr(pipe, "_diffjet_lora", None)
    if state is None:
        state = _LoraState()
        pipe._diffjet_lora = state
    return state


def _scale(value: Any, adapter: str | None) -> float:
    """A LoRA scale as a float: a finite number (not a string, not a bool)."""
    try:
        scale = float(value) if not isinstance(value, (str, bytes, bool)) else math.nan
    except (TypeError, ValueError):
        scale = math.nan
    if not math.isfinite(scale):
        who = f"LoRA {adapter!r}" if adapter else "a LoRA"
        raise LoraError(f"the scale of {who} must be a finite number (such as 0.8), got {value!r}")
    return scale


def _check_known(state: _LoraState, names: Iterable[str]) -> None:
    unknown = [name for name in names if name not in state.adapters]
    if unknown:
        loaded = ", ".join(map(repr, state.adapters)) or "none"
        raise LoraError(f"no LoRA named {', '.join(map(repr, unknown))} is loaded; loaded: {loaded}")


def _weight_views(pipe: Any, key: tuple[str, str]) -> list[torch.Tensor]:
    """The tensors that hold the weight of layer `key`: its own, plus its rows in a fused projection.

    After diffjet's attention pass `to_q/to_k/to_v` weights are views into the fused `to_qkv`/`to_kv`
    weight, so one write reaches both. A move with `pipe.to(...)` gives every parameter its own storage
    and breaks that link, and diffusers' `fuse_qkv_projections` copies instead of viewing; then the rows
    of the fused weight are written as well. Module lookups are cached per pipeline (modules stay put
    when a pipeline moves; their parameters' storage is what changes).
    """
    module, parent, name = _located(pipe, key)
    weight = module.weight
    if parent is None:
        return [weight]
    modules = parent._modules  # plain dict lookups: this runs for every layer on every switch
    for fused_name, parts in (("to_qkv", ("to_q", "to_k", "to_v")), ("to_kv", ("to_k", "to_v")),
                              ("to_added_qkv", ("add_q_proj", "add_k_proj", "add_v_proj"))):
        fused = modules.get(fused_name)
        if fused is None or name not in parts:
            continue
        start = sum(modules[part].weight.shape[0] for part in parts[: parts.index(name)])
        rows = fused.weight[start : start + weight.shape[0]]
        if rows.data_ptr() != weight.data_ptr():
            return [weight, rows]
    return [weight]


def _weight(pipe: Any, key: tuple[str, str]) -> torch.Tensor:
    """Layer `key`'s own weight (a fast path of `_weight_views(pipe, key)[0]`)."""
    return _located(pipe, key)[0]._parameters["weight"]


def _located(pipe: Any, key: tuple[str, str]) -> tuple[nn.Module, Attention | None, str]:
    """`_locate(pipe, key)`, looked up once per pipeline (modules stay put when a pipeline moves)."""
    cache = pipe.__dict__.setdefault(_MODULE_CACHE, {})
    if key not in cache:
        cache[key] = _locate(pipe, key)
    return cache[key]


def _locate(pipe: Any, key: tuple[str, str]) -> tuple[nn.Module, Attention | None, str]:
    """Layer `key`'s module, its parent when that is an attention module (which may hold fused projections), its
    name."""
    component, path = key
    root = getattr(pipe, component)
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    return root.get_submodule(path), parent if isinstance(parent, (Attention, AttentionModuleMixin)) else None, name


def _fingerprint(weight: torch.Tensor) -> tuple:
    """Changes whenever the weight is written in place (version counter) or replaced (storage, dtype)."""
    return weight.data_ptr(), weight._version, weight.dtype, weight.device


def _base_copies(pipe: Any, sources: Mapping[tuple[str, str], torch.Tensor], where: str
                 ) -> dict[tuple[str, str], torch.Tensor]:
    """Contiguous copies of `sources` (layers' weights, or their base copies being moved), queued without waiting.

    A CPU weight's copy is in host memory. A CUDA weight's is beside it with `where="device"`, after checking
    that they all fit (a `LoraError` before anything is allocated, not an out-of-memory error part-way);
    with "host" it is in pinned host memory (`_pinned_copies`).
    """
    devices = {key: _weight(pipe, key).device for key in sources}
    copies, to_host = {}, {}
    if where == "device":
        _check_room({d: sum(t.numel() * t.element_size() for k, t in sources.items() if devices[k] == d)
                     for d in set(devices.values()) if d.type == "cuda"})
    for key, source in sources.items():
        if devices[key].type == "cpu":
            copies[key] = torch.empty(source.shape, dtype=source.dtype).copy_(source.detach())
        elif where == "device":
            copies[key] = torch.empty(source.shape, dtype=source.dtype, device=devices[key])
            copies[key].copy_(source.detach(), non_blocking=True)
        else:
            to_host[key] = source
    copies.update(_pinned_copies(to_host))
    return copies


def _check_room(needed: Mapping[torch.device, int]) -> None:
    """Raise `LoraError` unless each CUDA device has `needed` bytes free (its driver's free memory plus what
    PyTorch's allocator holds unused)."""
    for device, size in needed.items():
        free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        if size > free:
            raise LoraError(f"base_copy='device' needs {size / 2**30:.2f} GiB more on {device} for the copies of the "
                            f"original weights and {free / 2**30:.2f} GiB are free; base_copy='host' keeps them in host memory")


def _pinned_copies(sources: Mapping[tuple[str, str], torch.Tensor]) -> dict[tuple[str, str], torch.Tensor]:
    """Pinned host copies, packed into shared buffers (`_pack`)."""
    copies = {}
    for used, members in _pack({key: t.numel() * t.element_size() for key, t in sources.items()}):
        buffer = torch.empty(used, dtype=torch.uint8, pin_memory=True)
        for key, offset, size in members:
            source = sources[key]
            copies[key] = buffer[offset : offset + size].view(source.dtype).view(source.shape)
            copies[key].copy_(source.detach(), non_blocking=True)
    return copies


def _pack(sizes: Mapping[Any, int], chunk: int = PINNED_CHUNK_BYTES, align: int = 64) -> list[tuple[int, list]]:
    """First-fit packing of byte `sizes` into buffers of at most `chunk` bytes (a larger one gets its own):
    [(bytes used, [(key, offset, size)])], each offset a multiple of `align` so any dtype can view it. The
    allocator still rounds each buffer up to a power of two, which costs at most one partly filled buffer."""
    buffers: list[list] = []
    for key, size in sizes.items():
        padded = -(-size // align) * align
        target = next((b for b in buffers if b[0] + padded <= chunk), None)
        if target is None:
            target = [0, []]
            buffers.append(target)
        target[1].append((key, target[0], size))
        target[0] += padded
    return [(used, members) for used, members in buffers]


def _to_weight_devices(pipe: Any, layers: dict[tuple[str, str], _Layer]) -> dict[tuple[str, str], _Layer]:
    """The factors in float32 next to their weights: for CUDA, one pinned buffer in the LoRA's own dtype,
    one host-to-device transfer that queues behind the copies in flight instead of waiting, one cast there."""
    by_device: dict[torch.device, list[tuple[str, str]]] = {}
    for key in layers:
        by_device.setdefault(_weight(pipe, key).device, []).append(key)
    moved = {}
    for device, keys in by_device.items():
        tensors = [t for key in keys for t in (layers[key].up, layers[key].down)]
        if device.type == "cpu":
            floats = iter([t.float() for t in tensors])
        else:
            dtypes = {t.dtype for t in tensors}
            staging = torch.empty(sum(t.numel() for t in tensors), pin_memory=True,
                                  dtype=dtypes.pop() if len(dtypes) == 1 else torch.float32)
            offset = 0
            for t in tensors:
                staging[offset : offset + t.numel()].copy_(t.reshape(-1))
                offset += t.numel()
            flat = staging.to(device, non_blocking=True).float()
            floats = iter(piece.view(t.shape) for piece, t in zip(flat.split([t.numel() for t in tensors]), tensors))
        for key in keys:
            up, down = next(floats), next(floats)
            moved[key] = _Layer(up=up, down=down, alpha_scale=layers[key].alpha_scale)
    return moved


class _Restores:
    """Base copies written back into CUDA weights on a side stream, one event each, so that merging a weight
    (on the current stream, after its own copy only) overlaps the copies of the next ones: a switch between
    two full Flux LoRAs is 22 GiB over the host link and then 566 merges, one after the other on one stream.

    The side stream starts after the work queued on the current stream so far (which may read the weights)
    and `join` makes the current stream wait for it: what comes after sees every weight written.
    """

    def __init__(self) -> None:
        self.streams: dict[torch.device, torch.cuda.Stream] = {}

    def copy(self, views: list[torch.Tensor], base: torch.Tensor, then_read: bool) -> None:
        device = views[0].device
        if device.type != "cuda":
            for view in views:
                view.copy_(base)
            return
        side = self.streams.get(device)
        if side is None:
            side = self.streams[device] = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for view in views:
                view.copy_(base, non_blocking=True)
        if then_read:
            torch.cuda.current_stream(device).wait_event(side.record_event())

    def join(self) -> None:
        for device, side in self.streams.items():
            torch.cuda.current_stream(device).wait_stream(side)


def _registry_undo(state: _LoraState) -> Callable[[], None]:
    """What puts the adapters back as they are now (which are loaded, in order, at which scales)."""
    saved = [(name, adapter, adapter.scale) for name, adapter in state.adapters.items()]

    def undo() -> None:
        state.adapters.clear()
        for name, adapter, scale in saved:
            adapter.scale = scale
            state.adapters[name] = adapter

    return undo


def _merge(pipe: Any, state: _LoraState, keys: Iterable[tuple[str, str]],
           at_base: set | frozenset = frozenset(), undo: Callable[[], None] | None = None) -> None:
    """Write base + Σ scale · delta into each weight in `keys`, in place (`_write_merged`).

    Should that fail part-way (out of memory, an interrupt), `undo` puts the adapters back as they were
    and every weight in `keys` is written again from its base's host copy and those adapters, so no
    weight is left half-merged and a failed load leaves its adapter unloaded; then the error is raised.
    """
    keys = list(keys)
    try:
        _write_merged(pipe, state, keys, at_base)
    except BaseException:
        if undo is None:
            raise
        undo()
        _write_merged(pipe, state, keys)
        raise


@torch.no_grad()
def _write_merged(pipe: Any, state: _LoraState, keys: Iterable[tuple[str, str]],
                  at_base: set | frozenset = frozenset()) -> None:
    """Write base + Σ scale · delta (float32) into each weight in `keys`, in place.

    A weight in `at_base` holds its base already and is merged where it is; the others get their base back
    from its copy first (`_Restores`: while the next copy crosses the host link, this one is merged). The
    fp8 copies of the written weights (`Config.fp8`) are quantized again, in place.
    """
    written = []
    restores = _Restores()
    try:
        for key in keys:
            views = _weight_views(pipe, key)
            written += views
            adapters = [a for a in state.adapters.values() if key in a.layers]
            if key not in at_base or not adapters:
                restores.copy(views, state.base[key], then_read=bool(adapters))
            if not adapters:
                continue
            merged = views[0].to(torch.float32, memory_format=torch.contiguous_format, copy=True)
            merged = merged.view(merged.shape[0], -1)
            for adapter in adapters:
                layer = adapter.layers[key]
                merged.addmm_(layer.up, layer.down, alpha=adapter.scale * layer.alpha_scale)
            for view in views:
                view.copy_(merged.view(view.shape))
    finally:
        restores.join()
    fp8.requantize(pipe.components.values(), written)
    # Fingerprints after every write: fused rows share one version counter, so all are taken anew.
    state.written = {key: _fingerprint(_weight(pipe, key)) for key in state.base}
