"""An experimental layout of the fp8 GEGLU kernel, for `bench/geglu_op.py --fp8` to time beside diffjet's.

    TRITON_INTERPRET=1 python bench/geglu_one_dot.py      # checks it against geglu.reference_fp8 on CPU

diffjet's kernel (`diffjet/kernels/geglu.py`) computes each h tile and its g tile with two `tl.dot`s of
BLOCK_N columns from two loads of W. Here the projection's rows are reordered once (`interleave`: the h rows
of each BLOCK_N chunk, then the g rows of the same chunk), so that one load of 2·BLOCK_N rows of W and one
`tl.dot` as wide give both halves, which the epilogue splits. Whether one wide dot keeps Hopper's tensor
cores busier than two narrow ones is what the bench measures; the GEMM floor is `torch._scaled_mm` alone.
The tile order and the epilogue's rounding are diffjet's kernel's own (`geglu._tile_offsets`, `geglu._gate`).
"""

from __future__ import annotations

import sys

import torch

from diffjet.kernels import INTERPRET, tl, triton
from diffjet.kernels.geglu import multiprocessors

if triton is not None:
    from diffjet.kernels.geglu import _gate, _tile_offsets  # the product kernel's tile order and epilogue

#: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages); BLOCK_N is each half's width.
DEFAULT_BLOCKS = (128, 128, 128, 8, 8, 3)


def interleave(rows: torch.Tensor, block_n: int) -> torch.Tensor:
    """`rows` (2n, ...) of a GEGLU projection ([h; g]) reordered as [h chunk 0; g chunk 0; h chunk 1; ...],
    chunks of `block_n` rows; n must be a multiple of `block_n`."""
    n = rows.shape[0] // 2
    if n % block_n:
        raise ValueError(f"the projection's {n} outputs are not a multiple of BLOCK_N {block_n}")
    chunks = rows.reshape(2, n // block_n, block_n, *rows.shape[1:]).transpose(0, 1)
    return chunks.reshape(rows.shape).contiguous()


if triton is not None:

    @triton.jit
    def _geglu_one_dot(x_desc, w_desc, xs_ptr, ws_ptr, b_ptr, y_desc, M, N, K, NUM_PROGRAMS,
                       HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EXACT_DOT: tl.constexpr):
        # x: (M, K) e4m3 with a float32 scale per row (xs); W: (2N, K) e4m3 in `interleave`'s order, with its
        # per-row scales (ws) and bias in the same order; y: (M, N). Persistent, as diffjet's kernel.
        tiles_m = tl.cdiv(M, BLOCK_M)
        tiles_n = tl.cdiv(N, BLOCK_N)
        for tile in range(tl.program_id(0), tiles_m * tiles_n, NUM_PROGRAMS):
            off_m, off_n = _tile_offsets(tile, tiles_m, tiles_n, GROUP_M, BLOCK_M, BLOCK_N)
            acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), tl.float32)
            for k in tl.range(0, K, BLOCK_K):
                a = x_desc.load([off_m, k])
                b = w_desc.load([2 * off_n, k]).T
                if EXACT_DOT:  # Triton's interpreter: e4m3 products are exact in float32
                    acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
                else:
                    acc = tl.dot(a, b, acc)
            rows = off_m + tl.arange(0, BLOCK_M)
            cols = 2 * off_n + tl.arange(0, 2 * BLOCK_N)
            acc = acc * tl.load(xs_ptr + rows, mask=rows < M, other=0.0)[:, None]
            acc = acc * tl.load(ws_ptr + cols)[None, :]
            if HAS_BIAS:
                acc += tl.load(b_ptr + cols).to(tl.float32)[None, :]
            h, g = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N)), (0, 2, 1)))
            y_desc.store([off_m, off_n], _gate(h, g, y_desc.dtype))


def launch(q: torch.Tensor, x_scale: torch.Tensor, weight_fp8: torch.Tensor, weight_scale: torch.Tensor,
           bias: torch.Tensor | None, out_dtype: torch.dtype, blocks: tuple[int, ...] = DEFAULT_BLOCKS) -> torch.Tensor:
    """`h * gelu(g)` as `geglu.launch_fp8` computes it, with the weight, its scales and the bias already in
    `interleave`'s order for `blocks`' BLOCK_N."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    block_m, block_n, block_k, group_m, num_warps, num_stages = blocks
    features = weight_fp8.shape[0] // 2
    x2 = q.reshape(-1, q.shape[-1])
    y = torch.empty((*q.shape[:-1], features), device=q.device, dtype=out_dtype)
    y2 = y.view(-1, features)
    m, k = x2.shape
    tiles = -(-m // block_m) * -(-features // block_n)
    programs = min(multiprocessors(q.device) or 4, tiles)
    _geglu_one_dot[(programs,)](
        TensorDescriptor.from_tensor(x2, [block_m, block_k]),
        TensorDescriptor.from_tensor(weight_fp8, [2 * block_n, block_k]),
        x_scale.reshape(-1), weight_scale.reshape(-1), y2 if bias is None else bias,
        TensorDescriptor.from_tensor(y2, [block_m, block_n]), m, features, k,
        NUM_PROGRAMS=programs, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        GROUP_M=group_m, EXACT_DOT=INTERPRET, num_warps=num_warps, num_stages=num_stages)
    return y


def check(rows: int = 70, k: int = 64, n: int = 64, blocks: tuple[int, ...] = (32, 32, 32, 2, 4, 2)) -> float:
    """This kernel against `geglu.reference_fp8` on reordered inputs: the relative error (on CPU under Triton's
    interpreter, or on a GPU)."""
    from diffjet.kernels import geglu as gg
    from diffjet.passes.fp8 import quantize_rows

    device = "cpu" if INTERPRET else "cuda"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, k, generator=g).to(device, torch.float16)
    weight = (torch.randn(2 * n, k, generator=g) / k**0.5).to(device, torch.float16)
    bias = torch.randn(2 * n, generator=g).to(device, torch.float16)
    q, x_scale = quantize_rows(x)
    w8, w_scale = quantize_rows(weight)
    want = gg.reference_fp8(q, x_scale, w8, w_scale.view(1, -1), bias, torch.float16).float()
    block_n = blocks[1]
    got = launch(q, x_scale.reshape(-1).contiguous(), interleave(w8, block_n),
                 interleave(w_scale.reshape(-1), block_n), interleave(bias, block_n), torch.float16, blocks).float()
    return float((got - want).norm() / want.norm())


if __name__ == "__main__":
    error = check()
    print(f"one-dot fp8 GEGLU against geglu.reference_fp8: relative error {error:.2e}")
    sys.exit(0 if error < 1e-3 else 1)
