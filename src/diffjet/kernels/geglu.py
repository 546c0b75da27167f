"""GEGLU with the gate in the projection's epilogue: `h * gelu(g)`, where `[h, g] = x @ W.T + b`.

The feed-forward of every SD transformer block starts with diffusers' `GEGLU`: a linear layer to twice
the inner width, split into halves h and g, then `h * gelu(g)`. Compiled by Inductor that is a cuBLAS GEMM
writing the (tokens × 2·inner) projection and a Triton kernel reading it back to write (tokens × inner):
2.10 ms of the SDXL UNet step goes to that second kernel (bench/NOTES.md). Here each program computes an
h tile and the matching g tile from the same x tiles, with two accumulators, and writes `h * gelu(g)`
only: the double-width projection never reaches memory.

Rounding follows the unfused modules in x's dtype: h and g rounded after the bias, gelu(g) rounded, the
product rounded; sums in float32 as cuBLAS does.

`geglu` is an opaque `torch.library.custom_op` with a fake implementation, like `group_norm_silu`. On CPU,
in float32, or for inputs the kernel does not take it runs `reference`, diffusers' own computation.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from . import INTERPRET, can_launch, tl, triton, warn_fallback

logger = logging.getLogger(__name__)

#: Tile sizes and launch settings: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages). BLOCK_N is the
#: width of each of the two accumulators.
DEFAULT_BLOCKS = (128, 64, 64, 8, 8, 3)


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """diffusers' `GEGLU.forward` with `weight` and `bias` as its projection."""
    hidden, gate = F.linear(x, weight, bias).chunk(2, dim=-1)
    return hidden * F.gelu(gate)


def supported(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether the Triton kernel takes these: CUDA half-precision tensors of one dtype, an even projection."""
    return (
        can_launch(x)
        and x.dtype in (torch.float16, torch.bfloat16)
        and weight.dtype == x.dtype
        and (bias is None or bias.dtype == x.dtype)
        and weight.dim() == 2
        and weight.shape[0] % 2 == 0
        and x.shape[-1] == weight.shape[1]
        and weight.stride(-1) == 1
    )


if triton is not None:

    @triton.jit
    def _geglu_projection(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                          HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
                          EXACT_DOT: tl.constexpr):
        # x: (M, K); W: (2N, K), rows [0, N) give h and rows [N, 2N) give g; y: (M, N).
        # Programs walk GROUP_M row tiles down one column before the next, so x tiles are reused from L2.
        pid = tl.program_id(0)
        tiles_m = tl.cdiv(M, BLOCK_M)
        tiles_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * tiles_n
        first_m = (pid // per_group) * GROUP_M
        group_m = tl.minimum(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_m
        pid_n = (pid % per_group) // group_m
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        row_ok = rows < M
        col_ok = cols < N
        x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_xm
        w_h = w_ptr + cols[None, :].to(tl.int64) * stride_wn
        w_g = w_ptr + (cols[None, :] + N).to(tl.int64) * stride_wn
        acc_h = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k in range(0, K, BLOCK_K):
            kk = k + ks
            if EVEN_K:  # SD's widths (320, 640, 1280) are whole BLOCK_Ks: no mask along K
                a = tl.load(x_rows + kk[None, :], mask=row_ok[:, None], other=0.0)
                b_h = tl.load(w_h + kk[:, None], mask=col_ok[None, :], other=0.0)
                b_g = tl.load(w_g + kk[:, None], mask=col_ok[None, :], other=0.0)
            else:
                k_ok = kk < K
                a = tl.load(x_rows + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                b_mask = k_ok[:, None] & col_ok[None, :]
                b_h = tl.load(w_h + kk[:, None], mask=b_mask, other=0.0)
                b_g = tl.load(w_g + kk[:, None], mask=b_mask, other=0.0)
            if EXACT_DOT:  # Triton's interpreter: no bfloat16 dot; half products are exact in float32
                a, b_h, b_g = a.to(tl.float32), b_h.to(tl.float32), b_g.to(tl.float32)
                acc_h = tl.dot(a, b_h, acc_h, input_precision="ieee")
                acc_g = tl.dot(a, b_g, acc_g, input_precision="ieee")
            else:
                acc_h = tl.dot(a, b_h, acc_h)
                acc_g = tl.dot(a, b_g, acc_g)
        if HAS_BIAS:
            acc_h += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            acc_g += tl.load(b_ptr + N + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        dtype = y_ptr.dtype.element_ty
        h = acc_h.to(dtype).to(tl.float32)
        g = acc_g.to(dtype).to(tl.float32)
        gelu = (0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))).to(dtype).to(tl.float32)
        offsets = rows[:, None].to(tl.int64) * stride_ym + cols[None, :]
        tl.store(y_ptr + offsets, (h * gelu).to(dtype), mask=row_ok[:, None] & col_ok[None, :])


def launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, out: torch.Tensor | None = None,
           blocks: tuple[int, int, int, int, int, int] | None = None) -> torch.Tensor:
    """Run the kernel: `h * gelu(g)` of `x @ weight.T + bias` into `out` (new when None), which is returned.

    `blocks`: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages), default `DEFAULT_BLOCKS`."""
    features = weight.shape[0] // 2
    y = torch.empty((*x.shape[:-1], features), device=x.device, dtype=x.dtype) if out is None else out
    if x.numel() == 0:
        return y
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y2 = y.view(-1, features)
    m, k = x2.shape
    block_m, block_n, block_k, group_m, num_warps, num_stages = blocks or DEFAULT_BLOCKS
    grid = (triton.cdiv(m, block_m) * triton.cdiv(features, block_n),)
    has_bias = bias is not None
    _geglu_projection[grid](x2, weight, bias if has_bias else weight, y2, m, features, k, x2.stride(0),
                            weight.stride(0), y2.stride(0), HAS_BIAS=has_bias, BLOCK_M=block_m, BLOCK_N=block_n,
                            BLOCK_K=block_k, GROUP_M=group_m, EVEN_K=k % block_k == 0, EXACT_DOT=INTERPRET, num_warps=num_warps,
                            num_stages=num_stages)
    return y


@torch.library.custom_op("diffjet::geglu", mutates_args=())
def geglu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`reference`'s result; Triton where `supported`, PyTorch otherwise."""
    if not supported(x, weight, bias):
        warn_fallback(logger, x, ("geglu", tuple(x.shape), x.dtype, tuple(weight.shape)),
                      "geglu: the Triton kernel does not take %s %s with a %s weight; running the slower "
                      "PyTorch reference", tuple(x.shape), x.dtype, tuple(weight.shape))
        return reference(x, weight, bias)
    return launch(x, weight, bias)


@geglu.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0] // 2))
