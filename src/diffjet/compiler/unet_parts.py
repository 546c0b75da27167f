"""A diffusers `UNet2DConditionModel` forward as a flat list of layers, cut into parts for step caching.

diffusers' UNet runs its down blocks, mid block and up blocks whole. Step caching (DeepCache) needs to run
only some layers of a block: the shallow steps recompute the outermost layers and take what the deep
layers would have produced from the last full step. So the forward is written here once as a sequence of
`Layer`s (one resnet with its transformer, a down- or upsampler, the mid block) that push and pop the
skip connections on a stack, and `run` executes any slice of that sequence. Run whole it computes what
`UNet2DConditionModel.forward` computes, module call for module call (tests/test_step_cache.py checks it
against diffusers on every preset architecture), so passes that replace modules (fused attention, the
Triton kernels, fp8) act on the parts exactly as on the whole UNet.

DeepCache's skip branch `b` (its `cache_branch_id`) names a layer of the down path: block `b // 3`,
layer `b % 3`. A shallow step runs everything above that layer on the way down and from the mirrored up
layer on, and takes the up path's input at that point (the `feature`) from the last full step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError

_DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
_MID = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D")
_UP = ("CrossAttnUpBlock2D", "UpBlock2D")


@dataclass(frozen=True)
class Layer:
    """One step of the UNet's forward: `kind` is "down", "downsample", "mid", "up" or "upsample"."""

    kind: str
    block: int = 0
    index: int = 0


@dataclass(frozen=True)
class Plan:
    """The UNet's layers in order, and where a step-caching branch cuts them.

    `layers[:head]` run in every step; `layers[head:tail]` only in full steps (they turn the hidden state
    at the branch into the `feature`); `layers[tail:]` run in every step from the feature. `fresh` skip
    connections (the conv_in output and those the head pushes below `fresh`) are the ones the tail pops.
    """

    layers: tuple[Layer, ...]
    head: int
    tail: int
    fresh: int


@dataclass
class State:
    """What flows between layers: the hidden state, the skip connections pushed so far (entry index,
    tensor), and what every layer reads (time embedding, text states, masks, ControlNet residuals)."""

    h: torch.Tensor
    stack: list[tuple[int, torch.Tensor]]
    context: dict[str, Any]
    pushed: int = 0


def check_supported(unet: nn.Module) -> None:
    """Raise `ConfigError` unless `unet` is a UNet whose blocks `layers` knows (SD 1.x, 2.x, XL)."""
    names = [type(b).__name__ for b in [*unet.down_blocks, unet.mid_block, *unet.up_blocks] if b is not None]
    unknown = sorted({n for n in names if n not in (*_DOWN, *_MID, *_UP)})
    if unknown or type(unet).__name__ != "UNet2DConditionModel":
        raise ConfigError(
            f"step_cache supports diffusers' UNet2DConditionModel with Stable Diffusion blocks; this "
            f"{type(unet).__name__} has {', '.join(unknown) or 'another forward'}: leave step_cache off"
        )
    if getattr(unet.config, "addition_embed_type", None) == "image_hint":
        raise ConfigError("step_cache does not support UNets with an image hint embedding; leave step_cache off")


def layers(unet: nn.Module) -> tuple[Layer, ...]:
    """The UNet's forward between conv_in and conv_norm_out, as `Layer`s in execution order."""
    check_supported(unet)
    out: list[Layer] = []
    for b, block in enumerate(unet.down_blocks):
        out += [Layer("down", b, i) for i in range(len(block.resnets))]
        if block.downsamplers is not None:
            out.append(Layer("downsample", b))
    if unet.mid_block is not None:
        out.append(Layer("mid"))
    for u, block in enumerate(unet.up_blocks):
        out += [Layer("up", u, j) for j in range(len(block.resnets))]
        if block.upsamplers is not None:
            out.append(Layer("upsample", u))
    return tuple(out)


def branches(unet: nn.Module) -> int:
    """How many skip branches the UNet has (DeepCache numbers them 0 … 3·blocks − 1)."""
    return 3 * len(unet.down_blocks)


def plan(unet: nn.Module, branch: int, probe: bool = False) -> Plan:
    """Where DeepCache's branch `branch` cuts the UNet's layers.

    DeepCache (`DeepCacheSDHelper.is_skip_step`) keeps, in a shallow step, the down layers of block
    `branch // 3` below layer `branch % 3` (and all blocks above it), and the up layers of the mirrored
    up block whose index from the block's end is at most `branch % 3`. With `probe`, the head also runs
    the first down layer (resnet and transformer of the first block), whose output the adaptive mode
    compares between steps, and the full step takes it from there.
    """
    all_layers = layers(unet)
    if not 0 <= branch < branches(unet):
        raise ConfigError(f"step_cache branch must be in 0..{branches(unet) - 1} for this UNet, got {branch}")
    block, level = divmod(branch, 3)
    up_block = len(unet.up_blocks) - 1 - block
    first_kept = len(unet.up_blocks[up_block].resnets) - 1 - level
    if first_kept < 0:
        raise ConfigError(f"step_cache branch {branch}: up block {up_block} has no layer {level} from its end")

    def skipped(layer: Layer) -> bool:  # in a shallow step, on the way down
        if layer.kind not in ("down", "downsample"):
            return True
        if layer.block != block:
            return layer.block > block
        return layer.kind == "downsample" or layer.index >= level

    head = next(i for i, layer in enumerate(all_layers) if skipped(layer))
    tail = all_layers.index(Layer("up", up_block, first_kept))
    fresh = 1 + sum(1 for layer in all_layers[:head] if layer.kind in ("down", "downsample"))
    if probe:
        head = max(head, all_layers.index(Layer("down", 0, 0)) + 1)
    return Plan(all_layers, head, tail, fresh)


# -- running layers -----------------------------------------------------------------------------


def prologue(
    unet: nn.Module,
    sample: torch.Tensor,
    timestep: Any,
    encoder_hidden_states: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    timestep_cond: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    cross_attention_kwargs: dict[str, Any] | None = None,
    added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    down_block_additional_residuals: tuple[torch.Tensor, ...] | None = None,
    mid_block_additional_residual: torch.Tensor | None = None,
    encoder_attention_mask: torch.Tensor | None = None,
) -> State:
    """diffusers' `UNet2DConditionModel.forward` up to and including conv_in."""
    if attention_mask is not None:
        attention_mask = ((1 - attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
    if encoder_attention_mask is not None:
        encoder_attention_mask = ((1 - encoder_attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), timestep_cond)
    class_emb = unet.get_class_embed(sample=sample, class_labels=class_labels)
    if class_emb is not None:
        emb = torch.cat([emb, class_emb], dim=-1) if unet.config.class_embeddings_concat else emb + class_emb
    aug_emb = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states,
                                 added_cond_kwargs=added_cond_kwargs)
    emb = emb + aug_emb if aug_emb is not None else emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    encoder_hidden_states = unet.process_encoder_hidden_states(
        encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
    )
    h = unet.conv_in(sample)
    context = {
        "emb": emb,
        "attention": {
            "encoder_hidden_states": encoder_hidden_states,
            "attention_mask": attention_mask,
            "cross_attention_kwargs": cross_attention_kwargs,
            "encoder_attention_mask": encoder_attention_mask,
        },
        "residuals": down_block_additional_residuals,
        "mid_residual": mid_block_additional_residual,
    }
    return State(h=h, stack=[(0, h)], context=context, pushed=1)


def epilogue(unet: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """diffusers' `UNet2DConditionModel.forward` from conv_norm_out on."""
    if unet.conv_norm_out is not None:
        h = unet.conv_act(unet.conv_norm_out(h))
    return unet.conv_out(h)


def run(unet: nn.Module, layers_: tuple[Layer, ...], state: State) -> State:
    """Run `layers_` on `state` in place (the hidden state and the skip-connection stack) and return it."""
    emb, attention = state.context["emb"], state.context["attention"]
    residuals = state.context["residuals"]
    for layer in layers_:
        if layer.kind == "down":
            block = unet.down_blocks[layer.block]
            state.h = _resnet_and_attention(block, layer.index, state.h, emb, attention)
            _push(state)
        elif layer.kind == "downsample":
            for downsampler in unet.down_blocks[layer.block].downsamplers:
                state.h = downsampler(state.h)
            _push(state)
        elif layer.kind == "mid":
            mid = unet.mid_block
            if getattr(mid, "has_cross_attention", False):
                state.h = mid(state.h, emb, **attention)
            else:
                state.h = mid(state.h, emb)
            if state.context["mid_residual"] is not None:
                state.h = state.h + state.context["mid_residual"]
        elif layer.kind == "up":
            _refuse_freeu(unet.up_blocks[layer.block])
            entry, skip = state.stack.pop()
            if residuals is not None:  # ControlNet: diffusers adds them to every skip connection
                skip = skip + residuals[entry]
            state.h = torch.cat([state.h, skip], dim=1)
            state.h = _resnet_and_attention(unet.up_blocks[layer.block], layer.index, state.h, emb, attention)
        else:  # upsample; the caller keeps sizes a multiple of the UNet's overall factor (`fits`)
            for upsampler in unet.up_blocks[layer.block].upsamplers:
                state.h = upsampler(state.h, None)
    return state


def fits(unet: nn.Module, sample: torch.Tensor) -> bool:
    """Whether `sample`'s size needs no explicit upsample sizes (diffusers' `forward_upsample_size`)."""
    factor = 2**unet.num_upsamplers
    return all(dim % factor == 0 for dim in sample.shape[-2:])


def forward(unet: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The whole UNet through `run`: equal to `UNet2DConditionModel.forward(...).sample`."""
    state = prologue(unet, *args, **kwargs)
    run(unet, layers(unet), state)
    return epilogue(unet, state.h)


def _push(state: State) -> None:
    state.stack.append((state.pushed, state.h))
    state.pushed += 1


def _refuse_freeu(block: nn.Module) -> None:
    if all(getattr(block, name, None) for name in ("s1", "s2", "b1", "b2")):
        raise ConfigError("step_cache does not support FreeU: call pipe.disable_freeu() or leave step_cache off")


def _resnet_and_attention(block: nn.Module, i: int, h: torch.Tensor, emb: torch.Tensor, attention: dict) -> torch.Tensor:
    h = block.resnets[i](h, emb)
    attentions = getattr(block, "attentions", None)
    if attentions is not None:
        h = attentions[i](h, **attention, return_dict=False)[0]
    return h
