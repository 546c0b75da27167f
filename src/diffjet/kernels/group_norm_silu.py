"""GroupNorm (after an optional per-channel shift, before an optional SiLU) on channels-last activations.

Every ResNet block of an SD UNet runs `GroupNorm(32) → SiLU` twice on NHWC activations, the second time
on `conv1(x) + time_embedding[:, :, None, None]`. A group's values are strided in NHWC memory (C/32
channels of every pixel), and Inductor's lowering reads them with that stride or through a layout copy.
Here every load is a contiguous run of whole pixel rows:

1. `_group_norm_stats`: per (image, run of pixel tiles), each channel's mean and sum of squared
   deviations over each tile (two-pass over registers, float32), merged across the run's tiles;
   `_group_norm_combine`: per (image, group), the merge of those partials into mean and 1/std. Both
   merges are Chan's parallel-variance formula (no E[x²] − E[x]² cancellation).
2. `_group_norm_apply`: per (image, block of pixels), normalise, scale and shift per channel, SiLU, store.

Bytes moved: the input twice and the output once, plus C floats of partials per statistics program.

For an fp8 consumer (`conv3x3_fp8`, with `Config.fp8`), `group_norm_silu_fp8` writes the output in e4m3 with
one scale per image. The scale must be known before the first value is written, so the statistics pass also
keeps each channel's smallest and largest input, and the combine turns them into each group's largest |output|
(the output is monotone in x up to SiLU, whose minimum is known); the image's scale is its groups' largest / 448.

`group_norm_silu` is an opaque `torch.library.custom_op` with a fake implementation, which Inductor places
as one call in its graph: traced into as a `triton_op`, the SD1.5 UNet did not finish compiling in ten
times its usual time (bench/results/unet-step-sd15-gn-silu-h200-2026-11-26.json). On CPU, or for layouts the kernels do
not take, it runs `reference`, plain PyTorch.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from . import FP8, can_launch, quantize_rows, tl, triton, warn_fallback

logger = logging.getLogger(__name__)
# Elements of one [pixels × channels] tile a program holds; the pixel block is this over the padded C.
_TILE_ELEMENTS = 8192
# About this many statistics programs for the whole batch (two per SM of an H100): a few hundred partials
# per channel for the combine instead of one per tile, with enough programs in flight to keep memory busy.
# A UNet step's GroupNorms on the H100, one program per tile against 256: SD2.1 1.54 → 1.27 ms, SDXL
# 1.92 → 1.34 ms (128 and 512 were slower; bench/results/group-norm-op-*-h100-2026-11-27.json).
STATS_PROGRAMS = 256


def reference(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, groups: int, eps: float,
              silu: bool, shift: torch.Tensor | None = None) -> torch.Tensor:
    """What the kernels compute, in PyTorch: `silu?(group_norm(x + shift[:, :, None, None]))`, with the sum
    rounded to x's dtype (as the unfused modules do) and float32 statistics; output in x's dtype."""
    return _normalized(x, weight, bias, groups, eps, silu, shift).to(x.dtype).contiguous(
        memory_format=_output_format(x))


def reference_fp8(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, groups: int, eps: float,
                  silu: bool, shift: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`reference` before its rounding, in e4m3 with one float32 scale per image, its largest |value| / 448:
    `(q, scale)`, q ≈ y / scale[n]. (The kernels' scale is a bound on that largest value, found before the
    output is written; it is never below it.)"""
    y = _normalized(x, weight, bias, groups, eps, silu, shift)
    q, scale = quantize_rows(y.reshape(y.shape[0], -1))  # one row per image
    return q.view(y.shape).contiguous(memory_format=_output_format(x)), scale.view(-1)


def _normalized(x, weight, bias, groups, eps, silu, shift) -> torch.Tensor:
    if shift is not None:
        x = x + shift[:, :, None, None]
    y = F.group_norm(x.float(), groups, None if weight is None else weight.float(),
                     None if bias is None else bias.float(), eps)
    return F.silu(y) if silu else y


def _output_format(x: torch.Tensor) -> torch.memory_format:
    """The layout of the op's output: channels-last for channels-last 4-D input, contiguous otherwise."""
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format


def supported(x: torch.Tensor, groups: int) -> bool:
    """Whether the Triton kernels take this input: a CUDA float tensor, 4-D channels-last, C divisible by groups."""
    return (
        can_launch(x)
        and x.dim() == 4
        and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and x.shape[1] % groups == 0
        and x.is_contiguous(memory_format=torch.channels_last)
    )


if triton is not None:
    # SiLU's minimum, -0.27846, at -1.27846 (rounded outward).
    _SILU_ARGMIN = tl.constexpr(-1.2784645)
    _SILU_MIN = tl.constexpr(0.2784647)

    @triton.jit
    def _group_norm_stats(x_ptr, shift_ptr, mean_ptr, m2_ptr, min_ptr, max_ptr, HW, C, num_blocks, tiles,
                          HAS_SHIFT: tl.constexpr, EXTREMES: tl.constexpr, BLOCK_HW: tl.constexpr,
                          BLOCK_C: tl.constexpr):
        n = tl.program_id(0)
        block = tl.program_id(1)
        cols = tl.arange(0, BLOCK_C)
        col_ok = cols < C
        if HAS_SHIFT:
            shift = tl.load(shift_ptr + n * C + cols, mask=col_ok, other=0.0).to(tl.float32)
        # Each channel's running (count, mean, M2) over this program's `tiles` pixel tiles, merged tile by
        # tile with Chan's formula: M2 = M2a + M2b + delta^2 * na * nb / (na + nb).
        acc_count = tl.zeros([BLOCK_C], tl.float32)
        acc_mean = tl.zeros([BLOCK_C], tl.float32)
        acc_m2 = tl.zeros([BLOCK_C], tl.float32)
        acc_min = tl.full([BLOCK_C], float("inf"), tl.float32)
        acc_max = tl.full([BLOCK_C], float("-inf"), tl.float32)
        for tile in range(0, tiles):
            rows = (block * tiles + tile) * BLOCK_HW + tl.arange(0, BLOCK_HW)
            row_ok = rows < HW
            mask = row_ok[:, None] & col_ok[None, :]
            offsets = n.to(tl.int64) * HW * C + rows[:, None].to(tl.int64) * C + cols[None, :]
            x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
            if HAS_SHIFT:  # the sum rounded to x's dtype, as the unfused `hidden + temb` is
                x = (x.to(tl.float32) + shift[None, :]).to(x.dtype)
            x = x.to(tl.float32)
            if EXTREMES:
                acc_min = tl.minimum(acc_min, tl.min(tl.where(mask, x, float("inf")), axis=0))
                acc_max = tl.maximum(acc_max, tl.max(tl.where(mask, x, float("-inf")), axis=0))
            x = tl.where(mask, x, 0.0)
            count = tl.sum(row_ok.to(tl.float32), axis=0)
            mean = tl.sum(x, axis=0) / tl.maximum(count, 1.0)
            centred = tl.where(mask, x - mean[None, :], 0.0)
            m2 = tl.sum(centred * centred, axis=0)
            total = acc_count + count
            delta = mean - acc_mean
            share = count / tl.maximum(total, 1.0)
            acc_mean += delta * share
            acc_m2 += m2 + delta * delta * acc_count * share
            acc_count = total
        out = (n * num_blocks + block) * C + cols
        tl.store(mean_ptr + out, acc_mean, mask=col_ok)
        tl.store(m2_ptr + out, acc_m2, mask=col_ok)
        if EXTREMES:
            tl.store(min_ptr + out, acc_min, mask=col_ok)
            tl.store(max_ptr + out, acc_max, mask=col_ok)

    @triton.jit
    def _group_norm_combine(mean_ptr, m2_ptr, min_ptr, max_ptr, w_ptr, b_ptr, stats_ptr, bound_ptr, HW, C, groups,
                            num_blocks, span, eps, BLOCKS: tl.constexpr, CPG: tl.constexpr, CPG_PAD: tl.constexpr,
                            EXTREMES: tl.constexpr, HAS_AFFINE: tl.constexpr, SILU: tl.constexpr):
        n = tl.program_id(0)
        g = tl.program_id(1)
        chans = tl.arange(0, CPG_PAD)
        base = n * num_blocks * C + g * CPG
        # Pass 1: the group's mean, weighting each (block, channel) partial by its pixel count.
        total = 0.0
        weighted = 0.0
        for start in range(0, num_blocks, BLOCKS):
            blocks = start + tl.arange(0, BLOCKS)
            mask = (blocks[:, None] < num_blocks) & (chans[None, :] < CPG)
            means = tl.load(mean_ptr + base + blocks[:, None] * C + chans[None, :], mask=mask, other=0.0)
            counts = tl.minimum(HW - blocks * span, span).to(tl.float32)
            weights = tl.where(mask, counts[:, None], 0.0)
            total += tl.sum(tl.sum(weights, axis=1), axis=0)
            weighted += tl.sum(tl.sum(weights * means, axis=1), axis=0)
        mean = weighted / total
        # Pass 2 (Chan et al.): M2 = sum of the partials' M2 + count * (partial mean - mean)^2.
        # With EXTREMES, each channel's smallest and largest x over the partials as well.
        m2 = 0.0
        low = tl.full([CPG_PAD], float("inf"), tl.float32)
        high = tl.full([CPG_PAD], float("-inf"), tl.float32)
        for start in range(0, num_blocks, BLOCKS):
            blocks = start + tl.arange(0, BLOCKS)
            mask = (blocks[:, None] < num_blocks) & (chans[None, :] < CPG)
            offsets = base + blocks[:, None] * C + chans[None, :]
            means = tl.load(mean_ptr + offsets, mask=mask, other=0.0)
            m2s = tl.load(m2_ptr + offsets, mask=mask, other=0.0)
            counts = tl.minimum(HW - blocks * span, span).to(tl.float32)
            spread = tl.where(mask, means - mean, 0.0)
            m2 += tl.sum(tl.sum(m2s + counts[:, None] * spread * spread, axis=1), axis=0)
            if EXTREMES:
                low = tl.minimum(low, tl.min(tl.load(min_ptr + offsets, mask=mask, other=float("inf")), axis=0))
                high = tl.maximum(high, tl.max(tl.load(max_ptr + offsets, mask=mask, other=float("-inf")), axis=0))
        rstd = 1.0 / tl.sqrt(m2 / total + eps)
        tl.store(stats_ptr + (n * groups + g) * 2, mean)
        tl.store(stats_ptr + (n * groups + g) * 2 + 1, rstd)
        if EXTREMES:
            # The largest |output| of the group: each channel's output is monotone in x up to SiLU, so it lies
            # between the channel's outputs at the group's smallest and largest x (computed as `_group_norm_apply`
            # computes outputs), or is SiLU's minimum where that lies in between.
            chan_ok = chans < CPG
            scale = rstd
            shift = -mean * rstd
            if HAS_AFFINE:
                w = tl.load(w_ptr + g * CPG + chans, mask=chan_ok, other=0.0).to(tl.float32)
                b = tl.load(b_ptr + g * CPG + chans, mask=chan_ok, other=0.0).to(tl.float32)
                scale = scale * w
                shift = shift * w + b
            y_low = tl.where(chan_ok, low, 0.0) * scale + shift
            y_high = tl.where(chan_ok, high, 0.0) * scale + shift
            lo = tl.minimum(y_low, y_high)
            hi = tl.maximum(y_low, y_high)
            if SILU:
                bound = tl.maximum(tl.abs(lo / (1.0 + tl.exp(-lo))), tl.abs(hi / (1.0 + tl.exp(-hi))))
                bound = tl.where((lo < _SILU_ARGMIN) & (hi > _SILU_ARGMIN), tl.maximum(bound, _SILU_MIN), bound)
            else:
                bound = tl.maximum(tl.abs(lo), tl.abs(hi))
            tl.store(bound_ptr + n * groups + g, tl.max(tl.where(chan_ok, bound, 0.0), axis=0))

    @triton.jit
    def _group_norm_apply(x_ptr, shift_ptr, w_ptr, b_ptr, stats_ptr, bound_ptr, y_ptr, scale_ptr, HW, C, groups,
                          CPG: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_AFFINE: tl.constexpr, SILU: tl.constexpr,
                          QUANTIZE: tl.constexpr, GROUPS_PAD: tl.constexpr, BLOCK_HW: tl.constexpr,
                          BLOCK_C: tl.constexpr):
        n = tl.program_id(0)
        block = tl.program_id(1)
        rows = block * BLOCK_HW + tl.arange(0, BLOCK_HW)
        cols = tl.arange(0, BLOCK_C)
        col_ok = cols < C
        mask = (rows[:, None] < HW) & col_ok[None, :]
        offsets = n.to(tl.int64) * HW * C + rows[:, None].to(tl.int64) * C + cols[None, :]
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
        if HAS_SHIFT:
            shift = tl.load(shift_ptr + n * C + cols, mask=col_ok, other=0.0)
            x = (x.to(tl.float32) + shift.to(tl.float32)[None, :]).to(x.dtype)
        x = x.to(tl.float32)
        group = cols // CPG
        mean = tl.load(stats_ptr + (n * groups + group) * 2, mask=col_ok, other=0.0)
        rstd = tl.load(stats_ptr + (n * groups + group) * 2 + 1, mask=col_ok, other=0.0)
        scale = rstd
        shift = -mean * rstd
        if HAS_AFFINE:
            w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            scale = scale * w
            shift = shift * w + b
        y = x * scale[None, :] + shift[None, :]
        if SILU:
            y = y * tl.sigmoid(y)
        if QUANTIZE:  # e4m3 by the image's scale: its groups' largest |output| / 448
            gs = tl.arange(0, GROUPS_PAD)
            bound = tl.max(tl.load(bound_ptr + n * groups + gs, mask=gs < groups, other=0.0), axis=0)
            x_scale = tl.maximum(bound, 1e-12) / 448.0
            y = tl.clamp(y / x_scale, -448.0, 448.0)
            tl.store(scale_ptr + n, x_scale, mask=block == 0)
        tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


def launch(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, groups: int, eps: float,
           silu: bool, shift: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
           stats_programs: int | None = None, quantize: bool = False):
    """Run the kernels on a channels-last (N, C, H, W) tensor into `out` (new when None), which is returned;
    with `quantize`, in e4m3 with one float32 scale per image (the output ≈ y · scale[n]): `(y, scale)`.

    `stats_programs`: about how many statistics programs to spread the pixels over (default
    `STATS_PROGRAMS`; 0: one per pixel tile)."""
    n, c, h, w = x.shape
    hw = h * w
    if out is None:
        out = torch.empty_like(x, memory_format=torch.channels_last, dtype=FP8 if quantize else x.dtype)
    x_scale = torch.empty(n, device=x.device, dtype=torch.float32) if quantize else None
    if x.numel() == 0:
        return (out, x_scale.fill_(1.0)) if quantize else out
    block_c = triton.next_power_of_2(c)
    block_hw = max(1, min(_TILE_ELEMENTS // block_c, triton.next_power_of_2(hw)))
    # Statistics: about `stats_programs` programs in all, each over `tiles` consecutive pixel tiles, so
    # the combine merges that many partials per channel rather than one per tile.
    num_tiles = triton.cdiv(hw, block_hw)
    programs = STATS_PROGRAMS if stats_programs is None else stats_programs or num_tiles * n
    tiles = triton.cdiv(num_tiles, max(1, triton.cdiv(programs, n)))
    num_blocks = triton.cdiv(num_tiles, tiles)
    cpg = c // groups
    means = torch.empty((n, num_blocks, c), device=x.device, dtype=torch.float32)
    m2s = torch.empty_like(means)
    stats = torch.empty((n, groups, 2), device=x.device, dtype=torch.float32)
    # With `quantize`: each channel's extremes next to its partial statistics, and each group's bound.
    mins, maxs = (torch.empty_like(means), torch.empty_like(means)) if quantize else (means, means)
    bounds = torch.empty((n, groups), device=x.device, dtype=torch.float32) if quantize else stats
    has_shift = shift is not None
    shift = shift.to(x.dtype).contiguous() if has_shift else x
    cpg_pad = triton.next_power_of_2(cpg)
    blocks_per_pass = max(1, min(triton.next_power_of_2(num_blocks), 4096 // cpg_pad))  # ≤ 4096 partials at once
    has_affine = weight is not None
    w, b = (weight, bias) if has_affine else (x, x)  # unused pointers when there is no affine transform
    _group_norm_stats[(n, num_blocks)](x, shift, means, m2s, mins, maxs, hw, c, num_blocks, tiles,
                                       HAS_SHIFT=has_shift, EXTREMES=quantize, BLOCK_HW=block_hw, BLOCK_C=block_c)
    _group_norm_combine[(n, groups)](means, m2s, mins, maxs, w, b, stats, bounds, hw, c, groups, num_blocks,
                                     tiles * block_hw, eps, BLOCKS=blocks_per_pass, CPG=cpg, CPG_PAD=cpg_pad,
                                     EXTREMES=quantize, HAS_AFFINE=has_affine, SILU=silu)
    _group_norm_apply[(n, num_tiles)](x, shift, w, b, stats, bounds, out, stats if x_scale is None else x_scale, hw,
                                      c, groups, CPG=cpg, HAS_SHIFT=has_shift, HAS_AFFINE=has_affine, SILU=silu,
                                      QUANTIZE=quantize, GROUPS_PAD=triton.next_power_of_2(groups),
                                      BLOCK_HW=block_hw, BLOCK_C=block_c)
    return (out, x_scale) if quantize else out


@torch.library.custom_op("diffjet::group_norm_silu", mutates_args=())
def group_norm_silu(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, groups: int,
                    eps: float, silu: bool, shift: torch.Tensor | None = None) -> torch.Tensor:
    """`reference`'s result; Triton on CUDA channels-last input, PyTorch otherwise."""
    if not supported(x, groups):
        warn_fallback(logger, x, ("group_norm_silu", tuple(x.shape), x.stride(), groups),
                      "group_norm_silu: the Triton kernels do not take %s with strides %s (%d groups); "
                      "running the slower PyTorch reference", tuple(x.shape), x.stride(), groups)
        return reference(x, weight, bias, groups, eps, silu, shift)
    return launch(x, weight, bias, groups, eps, silu, shift)


@group_norm_silu.register_fake
def _(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, groups: int, eps: float,
      silu: bool, shift: torch.Tensor | None = None) -> torch.Tensor:
    return torch.empty_like(x, memory_format=_output_format(x))


@torch.library.custom_op("diffjet::group_norm_silu_fp8", mutates_args=())
def group_norm_silu_fp8(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, groups: int,
                        eps: float, silu: bool, shift: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`group_norm_silu`'s output in e4m3 with one float32 scale per image, for an fp8 consumer
    (`conv3x3_fp8`): `(q, scale)`. Triton on CUDA channels-last input, `reference_fp8` otherwise."""
    if not supported(x, groups):
        warn_fallback(logger, x, ("group_norm_silu_fp8", tuple(x.shape), x.stride(), groups),
                      "group_norm_silu_fp8: the Triton kernels do not take %s with strides %s (%d groups); "
                      "running the slower PyTorch reference", tuple(x.shape), x.stride(), groups)
        return reference_fp8(x, weight, bias, groups, eps, silu, shift)
    return launch(x, weight, bias, groups, eps, silu, shift, quantize=True)


@group_norm_silu_fp8.register_fake
def _(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, groups: int, eps: float,
      silu: bool, shift: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.empty_like(x, memory_format=_output_format(x), dtype=FP8)
    return q, torch.empty(x.shape[0], device=x.device, dtype=torch.float32)
