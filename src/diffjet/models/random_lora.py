"""Deterministic random LoRAs shaped like the ones people download, for tests, `verify` and benchmarks.

A LoRA's cost to load, merge or switch depends on which layers it adapts and its rank, not on its values.
`random_lora` adapts the layers a kohya-ss "full" LoRA trains: every attention projection, feed-forward
and transformer in/out projection of the UNet, and the attention and MLP layers of the text encoders. For
Flux, the layers an ai-toolkit LoRA trains: every Linear of the joint and single-stream blocks (attention,
feed-forward, modulation, the single blocks' MLP and output projections).
Each delta `up @ down` is scaled to `strength` times its weight's RMS, so a merged LoRA visibly changes
the image without wrecking a random-weight model. Keys are in the diffusers/PEFT format
(`unet.<module>.lora_A.weight`), which `load_lora_weights` and `diffjet.load_lora` both read.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .random_weights import tensor_seed

_UNET_LAYERS = re.compile(r"(attn\d\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)|proj_in|proj_out)$")
_TEXT_LAYERS = re.compile(r"(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))$")
# Every Linear of Flux's blocks but the fused projections that diffjet's attention pass adds (`to_qkv`,
# `to_added_qkv`), whose rows are the adapted to_q/k/v weights.
_FLUX_LAYERS = re.compile(r"^(single_)?transformer_blocks\.\d+\.(?!.*(to_qkv|to_added_qkv)$).+")


def lora_layers(pipe) -> dict[str, list[str]]:
    """The module paths `random_lora` adapts, per pipeline component."""
    layers = {}
    patterns = {"unet": _UNET_LAYERS, "transformer": _FLUX_LAYERS, "text_encoder": _TEXT_LAYERS,
                "text_encoder_2": _TEXT_LAYERS}
    for component, pattern in patterns.items():
        model = getattr(pipe, component, None)
        if model is None or component == "transformer" and type(model).__name__ != "FluxTransformer2DModel":
            continue
        paths = [name for name, module in model.named_modules()
                 if isinstance(module, (nn.Linear, nn.Conv2d)) and pattern.search(name)]
        if paths:
            layers[component] = paths
    return layers


@torch.no_grad()
def random_lora(pipe, seed: int = 0, rank: int = 16, strength: float = 0.05) -> dict[str, torch.Tensor]:
    """A rank-`rank` LoRA for `pipe` as a float32 CPU state dict; the same arguments give the same values."""
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    state = {}
    for component, paths in lora_layers(pipe).items():
        model = getattr(pipe, component)
        for path in paths:
            weight = model.get_submodule(path).weight
            out_features, fan_in = weight.shape[0], weight[0].numel()
            generator = torch.Generator().manual_seed(tensor_seed(f"lora/{seed}/{component}.{path}"))
            down = torch.randn(rank, *weight.shape[1:], generator=generator) / fan_in**0.5
            # An entry of up @ down sums `rank` products of N(0, σ_up²) and N(0, 1/fan_in) terms, so its
            # standard deviation is σ_up · sqrt(rank / fan_in); pick σ_up to make that strength · RMS(weight).
            rms = weight.float().pow(2).mean().sqrt().item()
            up_std = strength * rms * (fan_in / rank) ** 0.5
            up = torch.randn(out_features, rank, *[1] * (weight.dim() - 2), generator=generator) * up_std
            state[f"{component}.{path}.lora_A.weight"] = down.contiguous()
            state[f"{component}.{path}.lora_B.weight"] = up.contiguous()
    return state
