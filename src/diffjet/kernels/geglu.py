"""GEGLU with the gate in the projection's epilogue: `h * gelu(g)`, where `[h, g] = x @ W.T + b`.

The feed-forward of every SD transformer block starts with diffusers' `GEGLU`: a linear layer to twice
the inner width, split into halves h and g, then `h * gelu(g)`. Compiled by Inductor that is a cuBLAS GEMM
writing the (tokens × 2·inner) projection and a Triton kernel reading it back to write (tokens × inner):
2.10 ms of the SDXL UNet step goes to that second kernel (bench/NOTES.md). Here each program computes an
h tile and the matching g tile from the same x tiles, with two accumulators, and writes `h * gelu(g)`
only: the double-width projection never reaches memory.

Rounding follows the unfused modules in x's dtype: h and g rounded after the bias, gelu(g) rounded, the
product rounded; sums in float32 as cuBLAS does.

The kernel is persistent (one program per SM) and loads its tiles through tensor descriptors, so it needs
Hopper or later. It beats cuBLAS plus Inductor's separate kernel only for large outputs (`pays`); the pass
that puts it in (`passes/kernels.py`) leaves smaller ones to Inductor.

`geglu` is an opaque `torch.library.custom_op` with a fake implementation, like `group_norm_silu`. On CPU,
in float32, or for inputs the kernel does not take it runs `reference`, diffusers' own computation.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from . import INTERPRET, tl, triton, warn_fallback

logger = logging.getLogger(__name__)

#: Tile sizes and launch settings: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages). BLOCK_N is the
#: width of each of the two accumulators.
DEFAULT_BLOCKS = (128, 128, 64, 8, 8, 3)


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """diffusers' `GEGLU.forward` with `weight` and `bias` as its projection."""
    hidden, gate = F.linear(x, weight, bias).chunk(2, dim=-1)
    return hidden * F.gelu(gate)


def supported(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether the Triton kernel takes these: half-precision tensors of one dtype on a GPU with tensor
    descriptors (Hopper on), an even projection, and rows of W (and of x and the output, contiguous) that
    start on 16 bytes, as tensor descriptors need."""
    size = x.element_size()
    return (
        runs_on(x.device)
        and x.dtype in (torch.float16, torch.bfloat16)
        and weight.dtype == x.dtype
        and (bias is None or bias.dtype == x.dtype)
        and weight.dim() == 2
        and weight.shape[0] % 2 == 0
        and x.shape[-1] == weight.shape[1]
        and weight.stride(-1) == 1
        and all(v * size % 16 == 0 for v in (x.shape[-1], weight.stride(0), weight.shape[0] // 2))
        and weight.data_ptr() % 16 == 0
    )


if triton is not None:

    @triton.jit
    def _geglu_projection(x_desc, w_desc, b_ptr, y_desc, M, N, K, NUM_PROGRAMS, HAS_BIAS: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                          NUM_STAGES: tl.constexpr, EXACT_DOT: tl.constexpr):
        # x: (M, K); W: (2N, K), rows [0, N) give h and rows [N, 2N) give g; y: (M, N). Tiles come in through
        # tensor descriptors (Hopper's copy engine: out-of-range rows and columns read as zero, stores are
        # clipped). One program per SM walks the output tiles in turn, GROUP_M row tiles down one column
        # before the next, so that x tiles are reused from L2.
        tiles_m = tl.cdiv(M, BLOCK_M)
        tiles_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * tiles_n
        for tile in range(tl.program_id(0), tiles_m * tiles_n, NUM_PROGRAMS):
            first_m = (tile // per_group) * GROUP_M
            group_m = tl.minimum(tiles_m - first_m, GROUP_M)
            off_m = (first_m + (tile % per_group) % group_m) * BLOCK_M
            off_n = ((tile % per_group) // group_m) * BLOCK_N
            acc_h = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            acc_g = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            for k in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
                a = x_desc.load([off_m, k])
                b_h = w_desc.load([off_n, k]).T
                b_g = w_desc.load([N + off_n, k]).T
                if EXACT_DOT:  # Triton's interpreter: no bfloat16 dot; half products are exact in float32
                    a, b_h, b_g = a.to(tl.float32), b_h.to(tl.float32), b_g.to(tl.float32)
                    acc_h = tl.dot(a, b_h, acc_h, input_precision="ieee")
                    acc_g = tl.dot(a, b_g, acc_g, input_precision="ieee")
                else:
                    acc_h = tl.dot(a, b_h, acc_h)
                    acc_g = tl.dot(a, b_g, acc_g)
            cols = off_n + tl.arange(0, BLOCK_N)
            if HAS_BIAS:
                col_ok = cols < N
                acc_h += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
                acc_g += tl.load(b_ptr + N + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            dtype = y_desc.dtype
            h = acc_h.to(dtype).to(tl.float32)
            g = acc_g.to(dtype).to(tl.float32)
            gelu = (0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))).to(dtype).to(tl.float32)
            y_desc.store([off_m, off_n], (h * gelu).to(dtype))


def launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, out: torch.Tensor | None = None,
           blocks: tuple[int, int, int, int, int, int] | None = None) -> torch.Tensor:
    """Run the kernel: `h * gelu(g)` of `x @ weight.T + bias` into `out` (new when None), which is returned.

    `blocks`: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages), default `DEFAULT_BLOCKS`."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    features = weight.shape[0] // 2
    y = torch.empty((*x.shape[:-1], features), device=x.device, dtype=x.dtype) if out is None else out
    if x.numel() == 0:
        return y
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1 or x2.stride(0) * x2.element_size() % 16 or x2.data_ptr() % 16:
        x2 = x2.contiguous()  # rows on 16 bytes, as tensor descriptors need
    y2 = y.view(-1, features)
    m, k = x2.shape
    block_m, block_n, block_k, group_m, num_warps, num_stages = blocks or DEFAULT_BLOCKS
    # One program per SM; the interpreter runs programs one after another, so a few do there.
    programs = min(multiprocessors(x.device) or 4, _tiles(m, features, block_m, block_n))
    _geglu_projection[(programs,)](
        TensorDescriptor.from_tensor(x2, [block_m, block_k]), TensorDescriptor.from_tensor(weight, [block_n, block_k]),
        weight if bias is None else bias, TensorDescriptor.from_tensor(y2, [block_m, block_n]), m, features, k,
        NUM_PROGRAMS=programs, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        GROUP_M=group_m, NUM_STAGES=num_stages, EXACT_DOT=INTERPRET, num_warps=num_warps)
    return y


def runs_on(device: torch.device) -> bool:
    """Whether the kernel runs on `device`: a GPU with tensor descriptors (Hopper on), or the CPU under
    Triton's interpreter."""
    if triton is None:
        return False
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (9, 0)
    return INTERPRET and device.type == "cpu"


def multiprocessors(device: torch.device) -> int | None:
    """The GPU's SM count, which `pays` weighs sizes by; None on CPU (the interpreter has no speed to weigh)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None


def pays(rows: int, features: int, sms: int | None) -> bool:
    """Whether the kernel beats cuBLAS plus Inductor's `h * gelu(g)` kernel for `rows` tokens and `features`
    outputs, as measured on the H100: when its output makes at least four waves of default tiles over the
    GPU's `sms`. Below that cuBLAS's own tile choice wins (`bench/geglu_op.py`, by shape: 128 to 2048 rows at
    2560 to 5120 features lose, 2048 rows at 5120 and 8192 rows at 1280 or more win). Always with `sms` None."""
    return sms is None or _tiles(rows, features, DEFAULT_BLOCKS[0], DEFAULT_BLOCKS[1]) >= 4 * sms


def _tiles(rows: int, features: int, block_m: int, block_n: int) -> int:
    """Output tiles of the kernel: what its programs walk, and what `pays` counts."""
    return -(-rows // block_m) * -(-features // block_n)


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
