"""Attention pass: one fused QKV projection and PyTorch's scaled-dot-product attention.

Self-attention reads its input once through a single (3·C)×C projection instead of three C×C ones;
cross-attention fuses K and V over the text states. The fused weight is one new tensor, and the old
`to_q`/`to_k`/`to_v` weights become views into it, so no weight is stored twice and a state-dict
update of `to_q.weight` in place still reaches the computation.

The processor leaves the choice of kernel to SDPA's dispatcher, which on Hopper picks cuDNN attention at
SD's head sizes (40/64/80); forcing a backend here would pin one card's best choice on every card.

Applies to every `diffusers.models.attention_processor.Attention` whose processor is diffusers' plain
SDPA or classic processor; attention with added KV projections, IP-Adapter or other custom processors
is left as it is.

DiT joint attention (image and text tokens attend together) gets two fused projections: `to_qkv` over
the image stream and `to_added_qkv` over the text stream, again with the old weights as views.
- Flux (`FluxAttention` with diffusers' `FluxAttnProcessor`): diffusers' own fused path, which the
  processor takes when `fused_projections` is set; diffusers' `fuse_qkv_projections` would copy the
  weights instead (4.3 GB more for Flux.1's 57 blocks in bf16, and a LoRA merged into `to_q` would miss it).
- SD3 (`Attention` with `JointAttnProcessor2_0`, joint or MMDiT-X's second, image-only attention):
  `FusedJointQKVAttnProcessor` below. diffusers' `FusedJointAttnProcessor2_0` drops the RMS norms of the
  queries and keys that SD 3.5 has (`qk_norm`) and needs text tokens, so it would change SD 3.5's output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0, JointAttnProcessor2_0
from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor
from torch import nn

from ..config import Config
from ..kernels.flash4 import attend

_REPLACEABLE = (AttnProcessor, AttnProcessor2_0)


class FusedQKVAttnProcessor:
    """Diffusers attention processor: fused projections + `F.scaled_dot_product_attention`."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        batch, tokens, _ = hidden_states.shape
        if attention_mask is not None:
            kv_tokens = tokens if encoder_hidden_states is None else encoder_hidden_states.shape[1]
            attention_mask = attn.prepare_attention_mask(attention_mask, kv_tokens, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        if encoder_hidden_states is None:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            if attn.norm_cross:
                encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            query = attn.to_q(hidden_states)
            key, value = attn.to_kv(encoder_hidden_states).chunk(2, dim=-1)

        head_dim = key.shape[-1] // attn.heads
        query, key, value = (x.unflatten(-1, (attn.heads, head_dim)).transpose(1, 2) for x in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=attn.scale)
        hidden_states = hidden_states.transpose(1, 2).flatten(2).to(query.dtype)

        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class FusedJointQKVAttnProcessor:
    """diffusers' `JointAttnProcessor2_0` (SD3's joint attention) with the image stream's and the text stream's
    projections each fused into one, and PyTorch's SDPA (FlashAttention-4 with `flash`: the kernel pass's
    `flash_attn_4`)."""

    def __init__(self, flash: bool = False) -> None:
        self.flash = flash

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        tokens = hidden_states.shape[1]
        heads = attn.heads

        def split_heads(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(-1, (heads, -1)).transpose(1, 2)

        query, key, value = (split_heads(x) for x in attn.to_qkv(hidden_states).chunk(3, dim=-1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            text_q, text_k, text_v = (split_heads(x) for x in attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1))
            if attn.norm_added_q is not None:
                text_q = attn.norm_added_q(text_q)
            if attn.norm_added_k is not None:
                text_k = attn.norm_added_k(text_k)
            query, key, value = (torch.cat(pair, dim=2) for pair in ((query, text_q), (key, text_k), (value, text_v)))
        hidden_states = attend(query, key, value, self.flash).to(query.dtype)
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = hidden_states[:, :tokens], hidden_states[:, tokens:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


@torch.no_grad()
def _fuse(parts: list[nn.Linear]) -> nn.Linear:
    """One Linear whose weight is the concatenation of `parts`; the parts' weights become views of it."""
    weight = torch.cat([p.weight for p in parts])
    has_bias = parts[0].bias is not None
    grad = parts[0].weight.requires_grad
    # Built on the meta device: its own initial weights would be drawn only to be replaced (0.5 s of the
    # SD1.5 compile on a CPU).
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device="meta", dtype=weight.dtype)
    fused.weight = nn.Parameter(weight, requires_grad=grad)
    if has_bias:
        fused.bias = nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=grad)
    start = 0
    for part in parts:
        rows = part.weight.shape[0]
        part.weight = nn.Parameter(fused.weight[start : start + rows], requires_grad=grad)
        if has_bias:
            part.bias = nn.Parameter(fused.bias[start : start + rows], requires_grad=grad)
        start += rows
    return fused


def _fuse_joint(attn: nn.Module) -> None:
    """`to_qkv` over the image stream and, where there are text projections, `to_added_qkv` over the text's."""
    attn.to_qkv = _fuse([attn.to_q, attn.to_k, attn.to_v])
    if getattr(attn, "add_q_proj", None) is not None:
        attn.to_added_qkv = _fuse([attn.add_q_proj, attn.add_k_proj, attn.add_v_proj])
    attn.fused_projections = True


def apply(module: nn.Module, config: Config) -> nn.Module:
    if config.attention == "keep":
        return module
    joint = FusedJointQKVAttnProcessor()
    for attn in module.modules():
        if isinstance(attn, FluxAttention) and type(attn.processor) is FluxAttnProcessor:
            if not attn.fused_projections:
                _fuse_joint(attn)
        elif isinstance(attn, Attention) and type(attn.processor) is JointAttnProcessor2_0:
            _fuse_joint(attn)
            attn.set_processor(joint)
    processor = FusedQKVAttnProcessor()
    for attn in module.modules():
        if not isinstance(attn, Attention) or isinstance(attn.processor, FusedQKVAttnProcessor):
            continue
        if type(attn.processor) not in _REPLACEABLE or getattr(attn, "add_q_proj", None) is not None:
            continue
        if attn.is_cross_attention:
            attn.to_kv = _fuse([attn.to_k, attn.to_v])
        else:
            attn.to_qkv = _fuse([attn.to_q, attn.to_k, attn.to_v])
        attn.set_processor(processor)
    return module
