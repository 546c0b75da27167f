"""GEGLU with the gate in the projection's epilogue: `h * gelu(g)`, where `[h, g] = x @ W.T + b`.

The feed-forward of every SD transformer block starts with diffusers' `GEGLU`: a linear layer to twice
the inner width, split into halves h and g, then `h * gelu(g)`. Compiled by Inductor that is a cuBLAS GEMM
writing the (tokens × 2·inner) projection and a Triton kernel reading it back to write (tokens × inner):
2.10 ms of the SDXL UNet step goes to that second kernel (bench/NOTES.md). Here each program computes an
h tile and the matching g tile from the same x tiles, with two accumulators, and writes `h * gelu(g)`
only: the double-width projection never reaches memory.

Rounding follows the unfused modules in x's dtype: h and g rounded after the bias, gelu(g) rounded, the
product rounded; sums in float32 as cuBLAS does.

The kernel is persistent (a fixed number of programs per SM) and loads its tiles through tensor descriptors,
so it needs Hopper or later. It beats cuBLAS plus Inductor's separate kernel only for large outputs (`pays`);
the pass that puts it in (`passes/kernels.py`) leaves smaller ones to Inductor.

`geglu` is an opaque `torch.library.custom_op` with a fake implementation, like `group_norm_silu`. On CPU,
in float32, or for inputs the kernel does not take it runs `reference`, diffusers' own computation.

`geglu_fp8` is the same kernel on e4m3 inputs (`Config.fp8`): x quantized per row and W per output channel
(`passes/fp8.py`), both scales and the bias applied to the float32 sums before the gate, which takes GELU's tanh
form there (`_gate_fp8`: the exact gate took a fifth of the kernel's time on SDXL). Unfused, the fp8
GEMM (`torch._scaled_mm`) writes the double-width projection and Inductor's code reads it back for the gate:
2 × 84 MB per call at SDXL's 8192 × 5120, which costs about what fp8 saves in the GEMM there.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from . import FP8, INTERPRET, tl, triton, warn_fallback

logger = logging.getLogger(__name__)

#: Tile sizes and launch settings: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages[, programs per SM]).
#: BLOCK_N is the width of each of the two accumulators; programs per SM defaults to 1.
DEFAULT_BLOCKS = (128, 128, 64, 8, 8, 3)
#: For e4m3 inputs: BLOCK_K twice as deep (the same 128 bytes of each row per load), and half-width tiles two to
#: an SM, so that one program's epilogue runs while the other's GEMM does (Triton does not split a program into
#: producer and consumer warps on Hopper): 4.16 against 4.34 ms over an SDXL step's calls (bench/NOTES.md).
DEFAULT_BLOCKS_FP8 = (128, 64, 128, 8, 4, 3, 2)


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """diffusers' `GEGLU.forward` with `weight` and `bias` as its projection."""
    hidden, gate = F.linear(x, weight, bias).chunk(2, dim=-1)
    return hidden * F.gelu(gate)


def reference_fp8(q: torch.Tensor, x_scale: torch.Tensor, weight_fp8: torch.Tensor, weight_scale: torch.Tensor,
                  bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """What the fp8 pass computes unfused: the projection `(q · x_scale) @ (W · weight_scale).T + bias` written
    in `out_dtype` (as `torch._scaled_mm` does), then diffusers' gate in `out_dtype`. q: (..., k) e4m3,
    x_scale: one float32 per row of q; weight_fp8: (2n, k) e4m3, weight_scale: one float32 per row of W."""
    q2 = q.reshape(-1, q.shape[-1])
    acc = (q2.float() @ weight_fp8.float().t()) * x_scale.reshape(-1, 1).float() * weight_scale.reshape(1, -1).float()
    if bias is not None:
        acc = acc + bias.float()
    hidden, gate = acc.to(out_dtype).chunk(2, dim=-1)
    return (hidden * F.gelu(gate)).view(*q.shape[:-1], weight_fp8.shape[0] // 2)


def supported_fp8(q: torch.Tensor, x_scale: torch.Tensor, weight_fp8: torch.Tensor, weight_scale: torch.Tensor,
                  bias: torch.Tensor | None, out_dtype: torch.dtype) -> bool:
    """Whether the Triton kernel takes these: e4m3 input and weight, a float32 scale per row of each, a
    half-precision output (and bias) dtype, and rows that start on 16 bytes, as for `supported`."""
    rows = q.numel() // q.shape[-1] if q.dim() else 0
    return (
        runs_on(q.device)
        and q.dtype == FP8 and weight_fp8.dtype == FP8
        and out_dtype in (torch.float16, torch.bfloat16)
        and (bias is None or bias.dtype == out_dtype)
        and weight_fp8.dim() == 2
        and weight_fp8.shape[0] % 2 == 0
        and q.shape[-1] == weight_fp8.shape[1]
        and weight_fp8.stride(-1) == 1
        and x_scale.dtype == torch.float32 and x_scale.numel() == rows and x_scale.is_contiguous()
        and weight_scale.dtype == torch.float32 and weight_scale.numel() == weight_fp8.shape[0]
        and weight_scale.is_contiguous()
        and all(v % 16 == 0 for v in (q.shape[-1], weight_fp8.stride(0)))
        and weight_fp8.shape[0] // 2 * torch.finfo(out_dtype).bits // 8 % 16 == 0
        and weight_fp8.data_ptr() % 16 == 0
    )


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
    def _tile_offsets(tile, tiles_m, tiles_n, GROUP_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # The first row and column of output tile `tile`, walking GROUP_M row tiles down one column before the
        # next, so that x tiles are reused from L2.
        per_group = GROUP_M * tiles_n
        first_m = (tile // per_group) * GROUP_M
        group_m = tl.minimum(tiles_m - first_m, GROUP_M)
        return (first_m + (tile % per_group) % group_m) * BLOCK_M, ((tile % per_group) // group_m) * BLOCK_N

    @triton.jit
    def _gate(acc_h, acc_g, dtype: tl.constexpr):
        # h * gelu(g) from float32 sums, rounded to `dtype` as the unfused modules round: h and g, gelu(g), the product.
        h = acc_h.to(dtype).to(tl.float32)
        g = acc_g.to(dtype).to(tl.float32)
        gelu = (0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))).to(dtype).to(tl.float32)
        return (h * gelu).to(dtype)

    @triton.jit
    def _gate_fp8(h, g, dtype: tl.constexpr):
        # h * gelu(g) with GELU's tanh form as g * sigmoid(2u), u = √(2/π)(g + 0.044715 g³), from the hardware's
        # exp2 and a fast division, and no rounding in between: about a third of `_gate`'s instructions. Within
        # 4.7e-4 of the exact GELU (a quarter of a half-precision step where it is largest), far under fp8's error.
        e = tl.math.exp2(-g * (2.302208198144325 + 0.10294324102012553 * g * g))
        return tl.fdiv(h * g, 1.0 + e).to(dtype)

    @triton.jit
    def _geglu_projection(x_desc, w_desc, xs_ptr, ws_ptr, b_ptr, y_desc, M, N, K, NUM_PROGRAMS,
                          HAS_BIAS: tl.constexpr, SCALED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, NUM_STAGES: tl.constexpr,
                          EXACT_DOT: tl.constexpr):
        # x: (M, K); W: (2N, K), rows [0, N) give h and rows [N, 2N) give g; y: (M, N). SCALED: x and W are e4m3,
        # with float32 scales per row of x (xs) and per row of W (ws) applied to the sums. Tiles come in through
        # tensor descriptors (Hopper's copy engine: out-of-range rows and columns read as zero, stores are
        # clipped). One program per SM walks the output tiles in turn (`_tile_offsets`).
        tiles_m = tl.cdiv(M, BLOCK_M)
        tiles_n = tl.cdiv(N, BLOCK_N)
        for tile in range(tl.program_id(0), tiles_m * tiles_n, NUM_PROGRAMS):
            off_m, off_n = _tile_offsets(tile, tiles_m, tiles_n, GROUP_M, BLOCK_M, BLOCK_N)
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
            col_ok = cols < N
            if SCALED:
                rows = off_m + tl.arange(0, BLOCK_M)
                x_scale = tl.load(xs_ptr + rows, mask=rows < M, other=0.0)[:, None]
                acc_h = acc_h * (x_scale * tl.load(ws_ptr + cols, mask=col_ok, other=0.0)[None, :])
                acc_g = acc_g * (x_scale * tl.load(ws_ptr + N + cols, mask=col_ok, other=0.0)[None, :])
            if HAS_BIAS:
                acc_h += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
                acc_g += tl.load(b_ptr + N + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            if SCALED:
                y_desc.store([off_m, off_n], _gate_fp8(acc_h, acc_g, y_desc.dtype))
            else:
                y_desc.store([off_m, off_n], _gate(acc_h, acc_g, y_desc.dtype))


def launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, out: torch.Tensor | None = None,
           blocks: tuple[int, ...] | None = None) -> torch.Tensor:
    """Run the kernel: `h * gelu(g)` of `x @ weight.T + bias` into `out` (new when None), which is returned.

    `blocks`: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages[, programs per SM]), default
    `DEFAULT_BLOCKS`."""
    return _launch(x, weight, bias, None, None, x.dtype, out, blocks or DEFAULT_BLOCKS)


def launch_fp8(q: torch.Tensor, x_scale: torch.Tensor, weight_fp8: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None, out_dtype: torch.dtype, *, out: torch.Tensor | None = None,
               blocks: tuple[int, ...] | None = None) -> torch.Tensor:
    """Run the kernel on e4m3 inputs (`reference_fp8`'s arguments): `h * gelu(g)` in `out_dtype`.

    `blocks` as for `launch`, default `DEFAULT_BLOCKS_FP8`."""
    return _launch(q, weight_fp8, bias, x_scale, weight_scale, out_dtype, out, blocks or DEFAULT_BLOCKS_FP8)


def _launch(x, weight, bias, x_scale, weight_scale, out_dtype, out, blocks):
    from triton.tools.tensor_descriptor import TensorDescriptor

    features = weight.shape[0] // 2
    y = torch.empty((*x.shape[:-1], features), device=x.device, dtype=out_dtype) if out is None else out
    if x.numel() == 0:
        return y
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1 or x2.stride(0) * x2.element_size() % 16 or x2.data_ptr() % 16:
        x2 = x2.contiguous()  # rows on 16 bytes, as tensor descriptors need
    y2 = y.view(-1, features)
    m, k = x2.shape
    block_m, block_n, block_k, group_m, num_warps, num_stages, per_sm = (*blocks, 1)[:7]
    # A fixed number of programs per SM; the interpreter runs programs one after another, so a few do there.
    programs = min(per_sm * (multiprocessors(x.device) or 4), _tiles(m, features, block_m, block_n))
    _geglu_projection[(programs,)](
        TensorDescriptor.from_tensor(x2, [block_m, block_k]), TensorDescriptor.from_tensor(weight, [block_n, block_k]),
        y2 if x_scale is None else x_scale, y2 if weight_scale is None else weight_scale,
        y2 if bias is None else bias, TensorDescriptor.from_tensor(y2, [block_m, block_n]), m, features, k,
        NUM_PROGRAMS=programs, HAS_BIAS=bias is not None, SCALED=x_scale is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
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


@torch.library.custom_op("diffjet::geglu_fp8", mutates_args=())
def geglu_fp8(q: torch.Tensor, x_scale: torch.Tensor, weight_fp8: torch.Tensor, weight_scale: torch.Tensor,
              bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """`reference_fp8`'s result; Triton where `supported_fp8`, PyTorch otherwise."""
    if not supported_fp8(q, x_scale, weight_fp8, weight_scale, bias, out_dtype):
        warn_fallback(logger, q, ("geglu_fp8", tuple(q.shape), out_dtype, tuple(weight_fp8.shape)),
                      "geglu_fp8: the Triton kernel does not take %s e4m3 rows to %s with a %s weight; running "
                      "the slower PyTorch reference", tuple(q.shape), out_dtype, tuple(weight_fp8.shape))
        return reference_fp8(q, x_scale, weight_fp8, weight_scale, bias, out_dtype)
    return launch_fp8(q, x_scale, weight_fp8, weight_scale, bias, out_dtype)


@geglu_fp8.register_fake
def _(q: torch.Tensor, x_scale: torch.Tensor, weight_fp8: torch.Tensor, weight_scale: torch.Tensor,
      bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    return q.new_empty((*q.shape[:-1], weight_fp8.shape[0] // 2), dtype=out_dtype)
