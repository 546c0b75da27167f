"""A DiT's forward (Flux.1, SD 3.x) cut into three parts, for first-block caching.

First-block caching (as in ParaAttention and cache-dit) runs the first transformer block(s) at every
step and, when their output has hardly changed since the last full step, skips the remaining blocks and
adds the residual those blocks produced at that step instead. The parts:

- `head(**transformer_args) -> state`: the embeddings and the first `blocks` blocks; the state holds the
  image and text tokens, the conditioning (and Flux's rotary table), and the probe: the image tokens'
  change across those blocks.
- `rest(state) -> (hidden, residual)`: the remaining blocks; their output and its difference from their
  input (image tokens only: the output projection reads nothing else).
- `tail(hidden, residual, temb) -> noise`: the output norm and projection (and SD3's unpatchify) of
  `hidden + residual`. A full step passes its own output and zeros, so it adds nothing and equals the
  transformer's forward exactly.

Each part follows diffusers' `FluxTransformer2DModel.forward` / `SD3Transformer2DModel.forward`
(diffusers 0.42) module call for module call, without the inputs the parts do not cover (ControlNet
residuals, IP-Adapter embeddings, SD3's skipped layers), which run diffusers' own forward (`covers`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConfigError

FLUX, SD3 = "FluxTransformer2DModel", "SD3Transformer2DModel"

#: Each family's forward arguments, in order: positional calls bind to them.
ARGS = {
    FLUX: ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids",
           "guidance", "joint_attention_kwargs", "controlnet_block_samples", "controlnet_single_block_samples"),
    SD3: ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep",
          "block_controlnet_hidden_states", "joint_attention_kwargs"),
}
#: Arguments that, when given, leave a call to diffusers' own forward.
_UNCOVERED = ("controlnet_block_samples", "controlnet_single_block_samples", "block_controlnet_hidden_states",
              "skip_layers")


def family(transformer: nn.Module) -> str:
    name = type(transformer).__name__
    if name not in ARGS:
        raise ConfigError(f"step_cache supports diffusers' FluxTransformer2DModel and SD3Transformer2DModel; "
                          f"this transformer is a {name}: leave step_cache off")
    return name


def check_blocks(transformer: nn.Module, blocks: int) -> None:
    """`blocks` (run at every step) must be double-stream blocks and leave at least one block to skip."""
    double = len(transformer.transformer_blocks)
    total = double + len(getattr(transformer, "single_transformer_blocks", ()))
    most = min(double, total - 1)
    if not 1 <= blocks <= most:
        raise ConfigError(f"step_cache branch must be in 0..{most - 1} for this transformer (branch b runs "
                          f"the first b + 1 of its {double} double-stream blocks at every step), got {blocks - 1}")


def covers(kwargs: dict[str, Any]) -> bool:
    """Whether the parts compute this call: no ControlNet residuals, IP-Adapter inputs or skipped layers."""
    if any(kwargs.get(name) is not None for name in _UNCOVERED):
        return False
    joint = kwargs.get("joint_attention_kwargs") or {}
    return not joint or set(joint) <= {"scale"}


def head(transformer: nn.Module, blocks: int, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
         pooled_projections: torch.Tensor, timestep: torch.Tensor, img_ids: torch.Tensor | None = None,
         txt_ids: torch.Tensor | None = None, guidance: torch.Tensor | None = None,
         **_: Any) -> dict[str, Any]:
    """The embeddings and the first `blocks` blocks (the same code object for both families, so that each
    part compiles to one graph per shape)."""
    t = transformer
    rotary = None
    if type(t).__name__ == FLUX:
        h = t.x_embedder(hidden_states)
        timestep = timestep.to(h.dtype) * 1000
        if guidance is None:
            temb = t.time_text_embed(timestep, pooled_projections)
        else:
            temb = t.time_text_embed(timestep, guidance.to(h.dtype) * 1000, pooled_projections)
        e = t.context_embedder(encoder_hidden_states)
        txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
        img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
        rotary = t.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
    else:
        h = t.pos_embed(hidden_states).contiguous()
        temb = t.time_text_embed(timestep, pooled_projections)
        e = t.context_embedder(encoder_hidden_states)
    start = h
    for block in t.transformer_blocks[:blocks]:
        e, h = _block(block, h, e, temb, rotary)
    return {"h": h, "e": e, "temb": temb, "rotary": rotary, "probe": h - start}


def rest(transformer: nn.Module, blocks: int, h: torch.Tensor, e: torch.Tensor, temb: torch.Tensor,
         rotary: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The blocks after the first `blocks`: (their output, its change from their input), image tokens."""
    start = h
    for block in transformer.transformer_blocks[blocks:]:
        e, h = _block(block, h, e, temb, rotary)
    for block in getattr(transformer, "single_transformer_blocks", ()):
        e, h = _block(block, h, e, temb, rotary)
    return h, h - start


def tail(transformer: nn.Module, h: torch.Tensor, residual: torch.Tensor, temb: torch.Tensor,
         height: int | None = None, width: int | None = None) -> torch.Tensor:
    """The output of `h + residual`: norm, projection, and for SD3 the unpatchify to (N, C, height, width)."""
    t = transformer
    out = t.proj_out(t.norm_out(h + residual, temb))
    if height is None:
        return out
    p = t.config.patch_size
    out = out.reshape(out.shape[0], height // p, width // p, p, p, t.out_channels)
    out = torch.einsum("nhwpqc->nchpwq", out)
    return out.reshape(out.shape[0], t.out_channels, height, width)


def _block(block: nn.Module, h: torch.Tensor, e: torch.Tensor, temb: torch.Tensor, rotary: Any):
    if rotary is None:
        return block(hidden_states=h, encoder_hidden_states=e, temb=temb)
    return block(hidden_states=h, encoder_hidden_states=e, temb=temb, image_rotary_emb=rotary)
