"""Flux attention's inputs in one pass: RMS norm of the queries and keys, the rotary embedding, SDPA's layout.

Between its fused QKV projection and SDPA, each Flux.1 attention splits the projection into q, k and v, RMS-
normalises q and k per head (text tokens with their own weights in the double blocks), concatenates the text
and image tokens, rotates pairs of q and k channels by each token's position, and SDPA reads all three as
(batch, heads, tokens, head_dim). Inductor turns that into kernels well off the memory bound: on flux-dev at
1024² the single blocks' one takes 121 µs a call, for about 170 MB moved, 40 µs at the H200's 4.3 TB/s; with the
double blocks', 7.5 ms of a 130 ms step (bench/results/profile-flux-dev-h200-2026-12-02.json). Here one program
per (head, block of tokens, image) reads its rows of q, k and v once and writes the three in SDPA's layout,
whole rows at a time: the rotation's even and odd channels are split and joined in registers. (Loading them as
two stride-2 accesses made the kernel ten times slower: 532 against 51 µs a single block's call, where
Inductor's compile of the same computation takes 97; bench/results/qk-norm-rope-op-h200-2026-12-02.json.)

Rounding follows diffusers' modules: the norm in float32 rounded once to the input's dtype (`torch.nn.RMSNorm`),
then the rotation in float32 from those values, rounded again (`diffusers.models.embeddings.apply_rotary_emb`).

`qk_norm_rope` is an opaque `torch.library.custom_op` with a fake implementation; on CPU, or for inputs the
kernel does not take, it runs `reference`, diffusers' own computation.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb

from . import can_launch, tl, triton, warn_fallback

logger = logging.getLogger(__name__)
#: Tokens per program, heads per program (a program loads its tokens' rotary tables once for all its heads), warps.
BLOCK_S, HEADS_PER_PROGRAM, NUM_WARPS = 32, 1, 4


def _split(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(batch, tokens, 3·heads·head_dim) → q, k, v as (batch, tokens, heads, head_dim), as diffusers unflattens
    them."""
    return tuple(x.unflatten(-1, (heads, -1)) for x in qkv.chunk(3, dim=-1))


def reference(qkv: torch.Tensor, text_qkv: torch.Tensor | None, norm_q: torch.Tensor, norm_k: torch.Tensor,
              text_norm_q: torch.Tensor | None, text_norm_k: torch.Tensor | None, cos: torch.Tensor,
              sin: torch.Tensor, heads: int, eps: float, text_eps: float) -> tuple[torch.Tensor, ...]:
    """diffusers' `FluxAttnProcessor` from the projections to SDPA's inputs: q, k, v as (batch, heads, tokens,
    head_dim), tokens ordered text first. `qkv` is the fused projection of the image tokens (of all tokens in a
    single block, where `text_qkv` is None); `cos`, `sin`: (tokens, head_dim), Flux's rotary embedding."""
    query, key, value = _split(qkv, heads)
    dim = query.shape[-1]
    query, key = F.rms_norm(query, (dim,), norm_q, eps), F.rms_norm(key, (dim,), norm_k, eps)
    if text_qkv is not None:
        text_query, text_key, text_value = _split(text_qkv, heads)
        text_query = F.rms_norm(text_query, (dim,), text_norm_q, text_eps)
        text_key = F.rms_norm(text_key, (dim,), text_norm_k, text_eps)
        query, key, value = (torch.cat(pair, dim=1) for pair in ((text_query, query), (text_key, key),
                                                                 (text_value, value)))
    query = apply_rotary_emb(query, (cos, sin), sequence_dim=1)
    key = apply_rotary_emb(key, (cos, sin), sequence_dim=1)
    return tuple(x.transpose(1, 2).contiguous() for x in (query, key, value))


def supported(qkv: torch.Tensor, text_qkv: torch.Tensor | None, cos: torch.Tensor, heads: int) -> bool:
    """Whether the kernel takes these: 3-D float projections whose last dimension is contiguous and splits into
    q, k, v of `heads` heads of a power-of-two head_dim (at least 2: channels rotate in pairs), and float32
    `cos`/`sin` rows, one per token."""
    width = qkv.shape[-1]
    dim = width // 3 // heads if heads > 0 else 0
    tokens = qkv.shape[1] + (0 if text_qkv is None else text_qkv.shape[1])
    return (
        can_launch(qkv)
        and qkv.dim() == 3 and qkv.stride(-1) == 1
        and qkv.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and dim >= 2 and dim & (dim - 1) == 0 and width == 3 * heads * dim
        and (text_qkv is None or (text_qkv.dim() == 3 and text_qkv.stride(-1) == 1 and text_qkv.dtype == qkv.dtype
                                  and text_qkv.shape[0] == qkv.shape[0] and text_qkv.shape[-1] == width))
        and cos.dtype == torch.float32 and tuple(cos.shape) == (tokens, dim) and cos.is_contiguous()
    )


if triton is not None:

    @triton.jit
    def _pairs(x, BLOCK_S: tl.constexpr, D: tl.constexpr):
        # A (BLOCK_S, D) tile as its even and odd channels, each (BLOCK_S, D // 2): loaded whole, split in registers.
        return tl.split(tl.reshape(x, (BLOCK_S, D // 2, 2)))

    @triton.jit
    def _normed_pairs(ptr, w_e, w_o, eps, mask, BLOCK_S: tl.constexpr, D: tl.constexpr):
        # RMS-normalise the (BLOCK_S, D) rows at `ptr` over their D channels, scale by the weight's even and odd
        # halves, round to the output's dtype (what torch.nn.RMSNorm returns); even and odd channels apart.
        x_e, x_o = _pairs(tl.load(ptr, mask=mask, other=0.0).to(tl.float32), BLOCK_S, D)
        r = tl.math.rsqrt((tl.sum(x_e * x_e, axis=1) + tl.sum(x_o * x_o, axis=1)) / D + eps)[:, None]
        dtype = ptr.dtype.element_ty
        return (x_e * r * w_e).to(dtype).to(tl.float32), (x_o * r * w_o).to(dtype).to(tl.float32)

    @triton.jit
    def _weight_pairs(ptr, D: tl.constexpr):
        # A norm weight's even and odd channels, as float32 rows that broadcast over tokens.
        w = tl.reshape(tl.load(ptr + tl.arange(0, D)).to(tl.float32), (1, D // 2, 2))
        return tl.split(w)

    @triton.jit
    def _qk_norm_rope(img_ptr, txt_ptr, wq_ptr, wk_ptr, twq_ptr, twk_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr,
                      TEXT, TOKENS, H, img_sb, img_ss, txt_sb, txt_ss, eps, text_eps,
                      HAS_TEXT: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr, HEADS: tl.constexpr):
        # img: (B, TOKENS - TEXT, 3·H·D) rows, txt: (B, TEXT, 3·H·D) rows (last dimension contiguous); q, k, v:
        # (B, H, TOKENS, D) contiguous; cos, sin: (TOKENS, D). Token t < TEXT comes from txt, the rest from img.
        # Every load and store is of whole rows (coalesced); the rotation's channel pairs are split in registers.
        # The program does heads HEADS·program_id(0) onwards.
        tokens = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
        image = tl.program_id(2)
        channels = tl.arange(0, D)
        ok = tokens < TOKENS
        row = img_ptr + image * img_sb + (tokens - TEXT) * img_ss
        wq_e, wq_o = _weight_pairs(wq_ptr, D)
        wk_e, wk_o = _weight_pairs(wk_ptr, D)
        row_eps = tl.zeros((BLOCK_S,), tl.float32) + eps
        if HAS_TEXT:
            text = (tokens < TEXT)[:, None]
            row = tl.where(tokens < TEXT, txt_ptr + image * txt_sb + tokens * txt_ss, row)
            twq_e, twq_o = _weight_pairs(twq_ptr, D)
            twk_e, twk_o = _weight_pairs(twk_ptr, D)
            wq_e, wq_o = tl.where(text, twq_e, wq_e), tl.where(text, twq_o, wq_o)
            wk_e, wk_o = tl.where(text, twk_e, wk_e), tl.where(text, twk_o, wk_o)
            row_eps = tl.where(tokens < TEXT, text_eps, row_eps)
        mask = ok[:, None]
        table = tokens[:, None] * D + channels[None, :]
        c_e, c_o = _pairs(tl.load(cos_ptr + table, mask=mask, other=0.0), BLOCK_S, D)
        s_e, s_o = _pairs(tl.load(sin_ptr + table, mask=mask, other=0.0), BLOCK_S, D)
        for h in range(HEADS):
            head = tl.program_id(0) * HEADS + h
            at = row[:, None] + head * D + channels[None, :]  # each row's channels of this head's q
            out = ((image * H + head) * TOKENS + tokens)[:, None] * D + channels[None, :]
            for which in tl.static_range(2):  # q, then k
                if which == 0:
                    y_e, y_o = _normed_pairs(at, wq_e, wq_o, row_eps, mask, BLOCK_S, D)
                    dst = q_ptr + out
                else:
                    y_e, y_o = _normed_pairs(at + H * D, wk_e, wk_o, row_eps, mask, BLOCK_S, D)
                    dst = k_ptr + out
                # diffusers' rotation: (x_real, x_imag) pairs, out = x·cos + (−x_imag, x_real)·sin
                y = tl.reshape(tl.join(y_e * c_e - y_o * s_e, y_o * c_o + y_e * s_o), (BLOCK_S, D))
                tl.store(dst, y.to(dst.dtype.element_ty), mask=mask)
            value = tl.load(at + 2 * H * D, mask=mask)
            tl.store(v_ptr + out, value, mask=mask)


def launch(qkv, text_qkv, norm_q, norm_k, text_norm_q, text_norm_k, cos, sin, heads, eps, text_eps, *,
           block_s=None, heads_per_program=None, num_warps=None):
    """Run the kernel (`reference`'s arguments and results); the launch configuration defaults to the module's
    (`heads_per_program` is cut to a divisor of `heads`)."""
    block_s = block_s or BLOCK_S
    per_program = math.gcd(heads, heads_per_program or HEADS_PER_PROGRAM)
    batch, image_tokens, width = qkv.shape
    dim = width // 3 // heads
    text = 0 if text_qkv is None else text_qkv.shape[1]
    tokens = text + image_tokens
    q, k, v = (torch.empty((batch, heads, tokens, dim), device=qkv.device, dtype=qkv.dtype) for _ in range(3))
    txt = qkv if text_qkv is None else text_qkv
    # Heads first: the programs running together read (and write) neighbouring heads of the same token rows
    # rather than one head's columns of rows far apart; a double block's call 65.6 → 56.6 µs, a single block's
    # 62.7 → 61.0 (bench/results/qk-norm-rope-op-grid-h200-2026-12-03.json).
    _qk_norm_rope[(heads // per_program, triton.cdiv(tokens, block_s), batch)](
        qkv, txt, norm_q, norm_k, norm_q if text_norm_q is None else text_norm_q,
        norm_k if text_norm_k is None else text_norm_k, cos, sin, q, k, v, text, tokens, heads,
        qkv.stride(0), qkv.stride(1), txt.stride(0), txt.stride(1), eps, text_eps,
        HAS_TEXT=text_qkv is not None, D=dim, BLOCK_S=block_s, HEADS=per_program, num_warps=num_warps or NUM_WARPS)
    return q, k, v


@torch.library.custom_op("diffjet::qk_norm_rope", mutates_args=())
def qk_norm_rope(qkv: torch.Tensor, text_qkv: torch.Tensor | None, norm_q: torch.Tensor, norm_k: torch.Tensor,
                 text_norm_q: torch.Tensor | None, text_norm_k: torch.Tensor | None, cos: torch.Tensor,
                 sin: torch.Tensor, heads: int, eps: float, text_eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`reference`'s result; Triton where `supported`, PyTorch otherwise."""
    if not supported(qkv, text_qkv, cos, heads):
        warn_fallback(logger, qkv, ("qk_norm_rope", tuple(qkv.shape), qkv.stride(), heads),
                      "qk_norm_rope: the Triton kernel does not take %s with strides %s (%d heads); "
                      "running the slower PyTorch reference", tuple(qkv.shape), qkv.stride(), heads)
        return reference(qkv, text_qkv, norm_q, norm_k, text_norm_q, text_norm_k, cos, sin, heads, eps, text_eps)
    return launch(qkv, text_qkv, norm_q.contiguous(), norm_k.contiguous(),
                  None if text_norm_q is None else text_norm_q.contiguous(),
                  None if text_norm_k is None else text_norm_k.contiguous(), cos, sin.contiguous(), heads, eps,
                  text_eps)


@qk_norm_rope.register_fake
def _(qkv, text_qkv, norm_q, norm_k, text_norm_q, text_norm_k, cos, sin, heads, eps, text_eps):
    batch, image_tokens, width = qkv.shape
    tokens = image_tokens + (0 if text_qkv is None else text_qkv.shape[1])
    shape = (batch, heads, tokens, width // 3 // heads)
    return tuple(qkv.new_empty(shape) for _ in range(3))
