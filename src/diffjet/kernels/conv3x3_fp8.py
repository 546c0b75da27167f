"""A ResNet block's 3×3 convolutions in e4m3 (with `Config.fp8`): an implicit GEMM over channels-last input.

PyTorch 2.11 has no fp8 convolution, and with the fp8 GEMMs on, SDXL's 3×3 convolutions (cuDNN fp16, ~680
TFLOP/s) were the largest part of the step fp8 did not reach. This kernel on e4m3 inputs took a step's 3×3
convolutions from 5.83 ms (cuDNN fp16) to 4.16 ms on an H200, but quantizing their fp16 input as a pass of its
own cost 5.93 ms more, and quantizing it as the kernel loads it made the kernel slower than cuDNN
(bench/results/fp8-conv-sdxl-h200-2026-12-02.json). So the input comes quantized from the kernel that writes
it: a ResNet convolution reads GroupNorm+SiLU's output, and `group_norm_silu_fp8` (`group_norm_silu.py`) writes
that in e4m3 with one scale per image, derived from the groups' extremes before anything is written.

Each program computes one tile of (output pixels × output channels); its K loop walks 9 taps × C_in in BLOCK_K
steps (BLOCK_K divides C_in, so a step never straddles two taps) and loads each tap's input rows at their
shifted position, reading zeros outside the image (padding 1; stride 1 or 2). Products are summed in float32;
the input's scale (one per image), the weight's (one per output channel) and the bias are applied to the sums.
Two alternatives measured slower and kept for `bench/fp8_conv.py`: one scale per input pixel (`PER_PIXEL`: each
tap's sums rescaled before they join the accumulator) and fp16 input quantized as it is loaded (`QUANTIZE_X`).

In SDXL's step it saved 0.52 ms of 27.70 on top of the fp8 GEMMs, and raised the error against float32 from
0.0079 to 0.0685 (bench/results/unet-step-sdxl-conv-fp8-h200-2026-12-02.json); it runs with `Config(fp8="max")`.

`conv3x3_fp8` is an opaque `torch.library.custom_op`, as `group_norm_silu` is; off the GPU (or for inputs the
kernel does not take) it runs `reference`.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from . import FP8, INTERPRET, can_launch, tl, triton, warn_fallback

logger = logging.getLogger(__name__)
#: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) that `launch` times at a shape's first call and
#: picks from, by the input width's largest BLOCK_K that divides it: each won at some of SDXL's shapes
#: (bench/results/fp8-conv-sdxl-h200-2026-12-02.json, `fp8_setting`).
SETTINGS = {128: [(128, 128, 128, 8, 8, 3), (256, 128, 128, 8, 8, 3)],
            64: [(128, 128, 64, 8, 4, 4), (128, 128, 64, 8, 8, 4)]}
#: The tiles Triton's interpreter runs (tests: small shapes; C a multiple of 32): large, because it runs each
#: program's loop in Python and each tile operation in NumPy. BLOCK_K: the largest of 128, 64, 32 that divides C.
INTERPRETER_SETTING = (128, 64, 32, 1, 4, 1)
_chosen: dict[tuple, tuple] = {}

if triton is not None:
    from .geglu import _tile_offsets

    @triton.jit
    def _dot(a, b, acc, EXACT_DOT: tl.constexpr):
        if EXACT_DOT:  # Triton's interpreter: no half or e4m3 dot; their products are exact in float32
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        return tl.dot(a, b, acc)

    @triton.jit
    def _conv3x3(x_ptr, w_ptr, xs_ptr, ws_ptr, b_ptr, y_ptr, M, H, W, C, HO, WO, CO,
                 STRIDE: tl.constexpr, HAS_BIAS: tl.constexpr, SCALED: tl.constexpr, PER_PIXEL: tl.constexpr,
                 QUANTIZE_X: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, NUM_STAGES: tl.constexpr,
                 EXACT_DOT: tl.constexpr):
        # x: (N, H, W, C) contiguous (a channels-last NCHW tensor's memory); w: (CO, 9·C), K ordered (tap, channel);
        # y: (N·HO·WO, CO). SCALED: x and w are e4m3, xs one float32 per image (or, PER_PIXEL, one per input
        # pixel), ws one per output channel. QUANTIZE_X: x is half precision, rounded to e4m3 by 1/xs as it is loaded.
        off_m, off_n = _tile_offsets(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(CO, BLOCK_N), GROUP_M,
                                     BLOCK_M, BLOCK_N)
        rows = off_m + tl.arange(0, BLOCK_M)
        image = rows // (HO * WO)
        oh = rows % (HO * WO) // WO
        ow = rows % WO
        cols = off_n + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        K = 9 * C
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        if PER_PIXEL:
            for tap in tl.static_range(9):
                ih = oh * STRIDE + tap // 3 - 1
                iw = ow * STRIDE + tap % 3 - 1
                inside = (rows < M) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                pixel = (image * H + ih) * W + iw
                part = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
                for c0 in tl.range(0, C, BLOCK_K, num_stages=NUM_STAGES):
                    a = tl.load(x_ptr + (pixel.to(tl.int64) * C + c0)[:, None] + ks[None, :], mask=inside[:, None],
                                other=0.0)
                    b = tl.load(w_ptr + cols[None, :] * K + (tap * C + c0 + ks)[:, None], mask=(cols < CO)[None, :],
                                other=0.0)
                    part = _dot(a, b, part, EXACT_DOT)
                acc += part * tl.load(xs_ptr + pixel, mask=inside, other=0.0)[:, None]
        else:
            if QUANTIZE_X:
                inverse = 1.0 / tl.load(xs_ptr + image, mask=rows < M, other=1.0)
            for k in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
                tap = k // C
                ih = oh * STRIDE + tap // 3 - 1
                iw = ow * STRIDE + tap % 3 - 1
                inside = (rows < M) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                pixel = (image * H + ih) * W + iw
                a = tl.load(x_ptr + (pixel.to(tl.int64) * C + (k - tap * C))[:, None] + ks[None, :],
                            mask=inside[:, None], other=0.0)
                b = tl.load(w_ptr + cols[None, :] * K + (k + ks)[:, None], mask=(cols < CO)[None, :], other=0.0)
                if QUANTIZE_X:
                    a = (a.to(tl.float32) * inverse[:, None]).to(b.dtype)
                acc = _dot(a, b, acc, EXACT_DOT)
        col_ok = cols < CO
        if SCALED:
            if PER_PIXEL:
                acc = acc * tl.load(ws_ptr + cols, mask=col_ok, other=0.0)[None, :]
            else:
                x_scale = tl.load(xs_ptr + image, mask=rows < M, other=0.0)
                acc = acc * x_scale[:, None] * tl.load(ws_ptr + cols, mask=col_ok, other=0.0)[None, :]
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rows[:, None].to(tl.int64) * CO + cols[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(rows < M)[:, None] & col_ok[None, :])

    @triton.jit
    def _to_e4m3(x_ptr, scale_ptr, q_ptr, N, PER, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + i, mask=i < N).to(tl.float32) / tl.load(scale_ptr + i // PER, mask=i < N, other=1.0)
        tl.store(q_ptr + i, tl.clamp(x, -448.0, 448.0).to(q_ptr.dtype.element_ty), mask=i < N)


def gemm_weight(weight: torch.Tensor) -> torch.Tensor:
    """A (CO, C, 3, 3) convolution weight as the kernel's (CO, 9·C) matrix, K ordered (tap, channel)."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1).contiguous()


def triton_e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """A channels-last NCHW `x` / its image's `scale` (N,) in e4m3, rounded by Triton's conversion, as the kernels
    round (on a GPU the same as PyTorch's; Triton's interpreter does not carry a rounding into the exponent:
    31.5 → 16). The tests' reference for what the kernels write."""
    flat = x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(-1)
    q = torch.empty(flat.shape, device=x.device, dtype=FP8)
    scale = scale.float().reshape(-1).expand(x.shape[0]).contiguous()
    _to_e4m3[(triton.cdiv(flat.numel(), 1024),)](flat, scale, q, flat.numel(), flat.numel() // x.shape[0],
                                                  BLOCK=1024)
    return q.view(x.shape[0], x.shape[2], x.shape[3], x.shape[1]).permute(0, 3, 1, 2)


def reference(q: torch.Tensor, x_scale: torch.Tensor, w_gemm: torch.Tensor, w_scale: torch.Tensor,
              bias: torch.Tensor | None, out_dtype: torch.dtype, stride: int = 1) -> torch.Tensor:
    """What the kernel computes, in PyTorch: the convolution (padding 1) of the dequantized input (`x_scale` one
    per image, or one per pixel) and weight (`w_gemm` as `gemm_weight` lays it out, `w_scale` one per output
    channel) in float32, plus the bias; channels-last in `out_dtype`."""
    n, c = q.shape[:2]
    weight = (w_gemm.float() * w_scale.float().view(-1, 1)).view(-1, 3, 3, c).permute(0, 3, 1, 2)
    per_pixel = x_scale.numel() != n
    x = q.float() * x_scale.float().view((n, 1, *q.shape[2:]) if per_pixel else (n, 1, 1, 1))
    y = F.conv2d(x, weight, None if bias is None else bias.float(), stride=stride, padding=1)
    return y.to(out_dtype).contiguous(memory_format=torch.channels_last)


def supported(q: torch.Tensor, w_gemm: torch.Tensor) -> bool:
    """Whether the kernel takes these: e4m3 channels-last CUDA input (CPU under the interpreter) whose width a
    setting's BLOCK_K divides, and a weight laid out for it."""
    c = q.shape[1] if q.dim() == 4 else 0
    return (can_launch(q) and q.dim() == 4 and q.dtype == FP8 and q.is_contiguous(memory_format=torch.channels_last)
            and c % (INTERPRETER_SETTING[2] if INTERPRET else 64) == 0 and w_gemm.dtype == FP8
            and w_gemm.is_contiguous() and w_gemm.shape[1] == 9 * c)


def run(x: torch.Tensor, w_gemm: torch.Tensor, bias: torch.Tensor | None, stride: int, setting: tuple, *,
        x_scale: torch.Tensor | None = None, w_scale: torch.Tensor | None = None,
        out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """One launch with `setting`: the convolution (padding 1) of the channels-last NCHW `x` by `w_gemm`, returned
    channels-last in `out_dtype`. With scales, w_gemm is e4m3 and x is e4m3 (`x_scale` one per image, or one per
    input pixel) or half precision, which the kernel quantizes by `x_scale` (one per image) as it loads it."""
    n, c, h, w = x.shape
    co = w_gemm.shape[0]
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    block_m, block_n, block_k, group_m, warps, stages = setting
    assert c % block_k == 0 and x.is_contiguous(memory_format=torch.channels_last)
    y = torch.empty((n, ho, wo, co), device=x.device, dtype=out_dtype)
    m = n * ho * wo
    grid = (triton.cdiv(m, block_m) * triton.cdiv(co, block_n),)
    scaled = x_scale is not None
    _conv3x3[grid](x, w_gemm, y if x_scale is None else x_scale, y if w_scale is None else w_scale,
                   y if bias is None else bias, y, m, h, w, c, ho, wo, co, STRIDE=stride, HAS_BIAS=bias is not None,
                   SCALED=scaled, PER_PIXEL=scaled and x_scale.numel() > n, QUANTIZE_X=scaled and x.dtype != FP8,
                   BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m, NUM_STAGES=stages,
                   EXACT_DOT=INTERPRET, num_warps=warps)
    return y.permute(0, 3, 1, 2)


def launch(q: torch.Tensor, x_scale: torch.Tensor, w_gemm: torch.Tensor, w_scale: torch.Tensor,
           bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """The e4m3 convolution (stride 1) with the fastest of `SETTINGS` for its shape, timed at the shape's first call
    (a CUDA-graphed call's warm-up, before capture)."""
    def conv(setting):
        return run(q, w_gemm, bias, 1, setting, x_scale=x_scale, w_scale=w_scale, out_dtype=out_dtype)

    n, c, h, w = q.shape
    if INTERPRET:
        block_k = next(k for k in (128, 64, 32) if c % k == 0)
        return conv((*INTERPRETER_SETTING[:2], block_k, *INTERPRETER_SETTING[3:]))
    key = (n * h * w, c, w_gemm.shape[0], out_dtype, q.device)
    if key not in _chosen:
        from triton.testing import do_bench

        candidates = SETTINGS[128 if c % 128 == 0 else 64]
        times = [do_bench(lambda s=s: conv(s), warmup=5, rep=20) for s in candidates]
        _chosen[key] = candidates[times.index(min(times))]
    return conv(_chosen[key])


@torch.library.custom_op("diffjet::conv3x3_fp8", mutates_args=())
def conv3x3_fp8(q: torch.Tensor, x_scale: torch.Tensor, w_gemm: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """`reference`'s result (stride 1, padding 1) for e4m3 `q` with one scale per image; Triton on CUDA, PyTorch
    otherwise."""
    if not supported(q, w_gemm):
        warn_fallback(logger, q, ("conv3x3_fp8", tuple(q.shape), q.stride()),
                      "conv3x3_fp8: the Triton kernel does not take %s with strides %s; running the slower "
                      "PyTorch reference", tuple(q.shape), q.stride())
        return reference(q, x_scale, w_gemm, w_scale, bias, out_dtype)
    return launch(q, x_scale, w_gemm, w_scale, bias, out_dtype)


@conv3x3_fp8.register_fake
def _(q: torch.Tensor, x_scale: torch.Tensor, w_gemm: torch.Tensor, w_scale: torch.Tensor,
      bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    n, _, h, w = q.shape
    return torch.empty((n, w_gemm.shape[0], h, w), device=q.device, dtype=out_dtype,
                       memory_format=torch.channels_last)
