"""fp8 pass (lossy, opt-in with `Config.fp8`): the UNet's, ControlNet's and DiT's GEMMs in float8 e4m3.

What it changes: every `nn.Linear` and every 1×1 `nn.Conv2d` (stride 1, no padding, one group: a GEMM over
pixels, whose channels-last input is already a (pixels × channels) matrix) gets the class `Fp8Linear` or
`Fp8Conv1x1`. The module keeps its parameters; two buffers derived from the weight are added: the weight in
`float8_e4m3fn` and one float32 scale per output channel (amax / 448, e4m3's largest value). Each call
quantizes its input per row (per token or pixel) with plain torch ops, which Inductor can fuse into the
neighbouring kernels, and multiplies with `torch._scaled_mm`, which applies both scales and the bias in its
epilogue. Tensor cores run e4m3 at twice their fp16 rate on Ada and Hopper. (`Fp8Conv3x3`, a ResNet block's
3×3 convolution on e4m3 input, is given by the kernel pass where `Config.fp8` is "max"; its buffers are derived
and requantized here like the others.)

Where: per call, by the GEMM's shape (`pays`): thin GEMMs (few rows, as in the time embedding and the text
projections) stay in fp16, as measured (`bench/fp8_shapes.py`). Left alone: `to_q/to_k/to_v` (and a
DiT's `add_q/k/v_proj`), which the fused attention (`passes/attention.py`, run before this pass) no longer
calls; layers whose input or output width is not a multiple of 16, which `_scaled_mm` needs; and layers
too narrow for fp8 to pay at any number of rows (`can_pay`). A GEGLU projection runs diffjet's fp16 GEGLU
kernel (`passes/kernels.py`) only at the calls that stay fp16; where fp8 pays it runs the fp8 GEMM, then
`h * gelu(g)` in Inductor's code, where it can join the next layer's input quantization.

Why the fp16 weight stays the parameter: LoRA merges write into it (`diffjet.lora`), the fused projections'
`to_q/k/v` are views of it, and CUDA graphs hold its pointer. `requantize` derives the fp8 buffers from it
again, in place, after such a write; a weight changed any other way needs `requantize` too.

Cost: e4m3 keeps 3 mantissa bits, so a layer's output is off by about 3% (relative L2; 2.6-3.7% on random
data) where fp16 is off by 0.03%; the fp8 buffers take one byte per converted weight on top of the fp16 weights.

The pass runs wherever `torch._scaled_mm` does (CPU too, which the tests use); `diffjet.compile` applies it
only on CUDA GPUs of compute capability 8.9 or newer (`unsupported`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config
from ..kernels import FP8, INTERPRET, quantize_rows
from ..kernels.conv3x3_fp8 import conv3x3_fp8, gemm_weight
from ..kernels.geglu import multiprocessors

logger = logging.getLogger(__name__)

#: fp8 pays for a GEMM whose (rows × n) output makes at least this many waves of 128×128 tiles over the
#: GPU's SMs and whose inner width k is at least MIN_K: quantizing the input costs a pass over rows × k, the
#: GEMM saves in proportion to rows × k × n. Provisional, fitted (`bench/fp8_shapes.py --fit`) to SD1.5's
#: and SDXL's GEMMs on an H200 (bench/results/fp8-shapes-{sd15,sdxl}-h200-2026-12-01.json): SDXL's GEGLU
#: projections won (2048 × 1280 → 10240: 1.49×, 8192 × 640 → 5120: 1.32×, quantization included), all of
#: SD1.5's GEMMs but two small ones lost; to be set again on the H100.
MIN_WAVES = 8
MIN_K = 640
#: The bar with `Config(fp8="max")`: faster and lossier. At 3 waves SDXL's fused QKV projections (2048 or 8192
#: tokens × 640 or 1280 → 3 × that) go fp8 too: with the 3×3 convolutions in e4m3, the step took 26.70 ms where
#: the convolutions alone took 27.50, error against float32 0.078 against 0.068
#: (bench/results/unet-step-sdxl-conv-fp8-qkv-h200-2026-12-02.json).
MIN_WAVES_MAX = 3


def pays(rows: int, k: int, n: int, sms: int | None, min_waves: int | None = None) -> bool:
    """Whether a (rows × k) @ (k × n) GEMM runs faster in fp8 (quantization of its input included) than in fp16
    on a GPU with `sms` SMs, its output at least `min_waves` waves of tiles (default `MIN_WAVES`). Always with
    `sms` None (no GPU to weigh: CPU tests)."""
    if sms is None:
        return True
    tiles = -(-rows // 128) * -(-n // 128)
    return tiles >= (MIN_WAVES if min_waves is None else min_waves) * sms and k >= MIN_K


def can_pay(k: int, sms: int | None) -> bool:
    """Whether fp8 pays for a layer of inner width `k` at any number of rows (`pays`'s bound on k): the pass
    leaves the others fp16, without fp8 copies."""
    return sms is None or k >= MIN_K


def fp8_linear(x: torch.Tensor, weight_fp8: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
               out_dtype: torch.dtype) -> torch.Tensor:
    """`x @ W.T + bias` in x's dtype, with x quantized per row and W given as e4m3 (n × k) with scales (1 × n)."""
    q, scale = quantize_rows(x.reshape(-1, x.shape[-1]))
    # Fast accumulation (no periodic promotion to float32 inside the tensor cores' sums) made the rowwise fp8
    # GEMM 1.2-1.26× faster at SDXL's largest shapes with no change in the error at 3 digits (`fp8_gemm_us`,
    # `error` in bench/results/fp8-shapes-sdxl-h200-2026-12-01.json against ...-no-fast-accum.json).
    y = torch._scaled_mm(q, weight_fp8.t(), scale_a=scale, scale_b=weight_scale,
                         bias=None if bias is None else bias.to(out_dtype), out_dtype=out_dtype, use_fast_accum=True)
    return y.to(x.dtype).view(*x.shape[:-1], weight_fp8.shape[0])


class _Fp8Weight:
    """What `Fp8Linear`, `Fp8Conv1x1` and `Fp8Conv3x3` share: e4m3 buffers derived from the module's own weight.

    `sms` (the GPU's SM count, for `pays`), `min_waves` (`pays`'s bar; None: `MIN_WAVES`) and `out_dtype` (what
    `_scaled_mm` writes, `output_dtype`) are set by the pass."""

    sms: int | None = None
    min_waves: int | None = None
    out_dtype: torch.dtype = torch.float16

    def _gemm_weight(self) -> torch.Tensor:
        """The weight as the GEMM's (output channels × inner width) matrix, which is quantized per row."""
        return self.weight.detach().reshape(self.weight.shape[0], -1)

    def _output_dtype(self) -> torch.dtype:
        """What the layer's fp8 GEMM writes for its weight's device and dtype (`output_dtype`)."""
        return output_dtype(self.weight.device, self.weight.dtype)

    def _derive(self) -> None:
        """New fp8 buffers from the weight, and the output dtype for its device and dtype."""
        q, scale = quantize_rows(self._gemm_weight())
        self.register_buffer("weight_fp8", q, persistent=False)
        self.register_buffer("weight_scale", scale.view(1, -1).contiguous(), persistent=False)
        self.out_dtype = self._output_dtype()

    @torch.no_grad()
    def requantize(self) -> None:
        """Quantize the weight again into the same buffers (compiled code and CUDA graphs hold their pointers)."""
        q, scale = quantize_rows(self._gemm_weight())
        self.weight_fp8.copy_(q)
        self.weight_scale.copy_(scale.view(1, -1))

    def _apply(self, fn, recurse=True):
        # `module.to(dtype)` casts every floating buffer, float8 included: derive them from the weight again.
        super()._apply(fn, recurse)
        if self.weight_fp8.dtype != FP8 or self.weight_scale.dtype != torch.float32:
            self._derive()
        else:
            self.out_dtype = self._output_dtype()
        return self


class Fp8Linear(_Fp8Weight, nn.Linear):
    """An `nn.Linear` that computes in fp8 e4m3 where that pays for the call's shape, in fp16 elsewhere."""

    def uses_fp8(self, rows: int) -> bool:
        """Whether a call on `rows` rows computes in fp8 (else it is `F.linear` on the fp16 weight)."""
        return pays(rows, self.in_features, self.out_features, self.sms, self.min_waves)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.uses_fp8(x.numel() // x.shape[-1]):
            return F.linear(x, self.weight, self.bias)
        return fp8_linear(x, self.weight_fp8, self.weight_scale, self.bias, self.out_dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", fp8=e4m3"


class Fp8Conv1x1(_Fp8Weight, nn.Conv2d):
    """A 1×1 `nn.Conv2d` computed as an fp8 GEMM over pixels where that pays, as a convolution elsewhere.
    A channels-last input is read as a (pixels × channels) matrix in place; the output is channels-last."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if not pays(n * h * w, c, self.out_channels, self.sms, self.min_waves):
            return super().forward(x)
        y = fp8_linear(x.permute(0, 2, 3, 1), self.weight_fp8, self.weight_scale, self.bias, self.out_dtype)
        return y.permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", fp8=e4m3"


class Fp8Conv3x3(_Fp8Weight, nn.Conv2d):
    """A ResNet block's 3×3 convolution (stride 1, padding 1) that reads its input in e4m3 with one scale per
    image from the GroupNorm+SiLU kernel before it (`fp8_forward`, `diffjet::conv3x3_fp8`). The kernel pass
    (`passes/kernels.py`, with `Config(fp8="max")`) gives the class; a call on a half-precision input, where no kernel
    quantized it, is the plain convolution."""

    def _gemm_weight(self) -> torch.Tensor:
        return gemm_weight(self.weight.detach())

    def _output_dtype(self) -> torch.dtype:
        return self.weight.dtype  # the kernel writes the activations' dtype itself

    def uses_fp8(self, pixels: int) -> bool:
        """Whether a call over `pixels` output pixels reads e4m3 (`conv_pays`)."""
        return conv_pays(pixels, self.out_channels, self.sms)

    def fp8_forward(self, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The convolution of the e4m3 channels-last `q` (≈ input / scale[n]); channels-last output."""
        return conv3x3_fp8(q, scale, self.weight_fp8, self.weight_scale, self.bias, self.out_dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", fp8=e4m3"


def conv_pays(pixels: int, out_channels: int, sms: int | None) -> bool:
    """Whether the e4m3 3×3 convolution beats cuDNN's fp16 one: where its 128×128 output tiles fill the GPU's
    SMs at least once. All of SDXL's ResNet convolutions at 1024² (batch 2) do, the smallest with 160 tiles on
    132 SMs, and each ran faster than cuDNN (bench/results/fp8-conv-sdxl-h200-2026-12-02.json); smaller
    convolutions are not measured and stay cuDNN. Always with `sms` None (CPU tests)."""
    return sms is None or -(-pixels // 128) * -(-out_channels // 128) >= sms


def conv3x3_fits(conv: nn.Module) -> bool:
    """A plain 3×3 convolution, stride 1, padding 1, one group, of a width the kernel takes (a multiple of 64;
    32 under Triton's interpreter)."""
    return (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and conv.in_channels % (32 if INTERPRET else 64) == 0)


def _is_gemm_conv(conv: nn.Conv2d) -> bool:
    return (
        conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
        and conv.padding in ((0, 0), "valid")
    )


def _candidates(module: nn.Module) -> list[nn.Module]:
    """The plain Linear and 1×1 Conv2d layers of `module` that run, in fp16 or fp8: all but the projections
    that the fused attention (`passes/attention.py`) replaced, whose weights are views into the fused
    layer's (`to_qkv`, `to_kv`, a DiT's `to_added_qkv`)."""
    layers = [m for m in module.modules()
              if isinstance(m, (nn.Linear, _Fp8Weight)) or isinstance(m, nn.Conv2d) and _is_gemm_conv(m)]
    # By storage, then start, the longest first: a view comes after the weight it lies in.
    spans = sorted((storage, start, -end, i) for i, (storage, start, end) in enumerate(_span(m.weight) for m in layers))
    inside, reach = set(), (None, -1)  # layers whose weight lies within another's; the furthest span so far
    for storage, _, end, i in spans:
        end = -end
        if storage == reach[0] and end <= reach[1]:
            inside.add(i)
        else:
            reach = (storage, end)
    return [m for i, m in enumerate(layers) if i not in inside]


def _span(weight: torch.Tensor) -> tuple[int, int, int]:
    """(storage, first byte, end byte) of a weight's elements."""
    start = weight.storage_offset() * weight.element_size()
    return weight.untyped_storage().data_ptr(), start, start + weight.numel() * weight.element_size()


def _fits(layer: nn.Module) -> bool:
    """`_scaled_mm` takes inner and output widths that are multiples of 16."""
    out, inner = layer.weight.shape[0], layer.weight[0].numel()
    return out % 16 == 0 and inner % 16 == 0


def apply(module: nn.Module, config: Config) -> nn.Module:
    """Give the plain Linear and 1×1 Conv2d layers of `module` fp8 GEMMs (see the module docstring); idempotent."""
    if not config.fp8:
        return module
    sms = multiprocessors(next(module.parameters()).device)
    for layer in _candidates(module):
        if isinstance(layer, _Fp8Weight) or not _fits(layer) or not can_pay(layer.weight[0].numel(), sms):
            continue
        if type(layer) is nn.Linear:
            layer.__class__ = Fp8Linear
        elif type(layer) is nn.Conv2d:
            layer.__class__ = Fp8Conv1x1
        else:
            continue
        layer.sms = sms
        layer.min_waves = MIN_WAVES_MAX if config.fp8 == "max" else None
        layer._derive()
    # For `requantize`, which runs on every LoRA change: a list to walk instead of the whole module tree.
    module._diffjet_fp8_layers = [m for m in module.modules() if isinstance(m, _Fp8Weight)]
    return module


def placements(module: nn.Module) -> dict[str, int]:
    """fp8 linear layers, fp8 1×1 convolutions, and the Linear/1×1 Conv2d layers left fp16 in `module` (too
    narrow, or not plain `nn.Linear`/`nn.Conv2d`); and the 3×3 convolutions the kernel pass made fp8."""
    layers = _candidates(module)
    return {
        "linear": sum(isinstance(m, Fp8Linear) for m in layers),
        "conv1x1": sum(isinstance(m, Fp8Conv1x1) for m in layers),
        "left_fp16": sum(not isinstance(m, _Fp8Weight) for m in layers),
        "conv3x3": sum(isinstance(m, Fp8Conv3x3) for m in layers),
    }


def describe(module: nn.Module) -> str:
    """The pass's entry in `CompileReport.passes`."""
    placed = placements(module)
    bars = sorted({m.min_waves for m in getattr(module, "_diffjet_fp8_layers", ()) if m.min_waves})
    return (f"fp8(e4m3: {placed['linear']} linear + {placed['conv1x1']} 1x1-conv layers, "
            f"{placed['left_fp16']} left fp16" + "".join(f", from {w} waves" for w in bars) + ")")


@torch.no_grad()
def requantize(modules: Iterable[nn.Module], written: Iterable[torch.Tensor]) -> int:
    """Quantize again, in place, every fp8 layer of `modules` (those the pass was applied to; others are
    skipped) whose weight shares storage with a tensor in `written`, a fused `to_qkv` whose `to_q` rows were
    written included; returns how many were."""
    layers = [layer for module in modules for layer in getattr(module, "_diffjet_fp8_layers", ())]
    if not layers:
        return 0
    storages = {t.untyped_storage().data_ptr() for t in written}
    count = 0
    for layer in layers:
        if layer.weight.untyped_storage().data_ptr() in storages:
            layer.requantize()
            count += 1
    return count


def unsupported(device: torch.device) -> str | None:
    """Why fp8 GEMMs do not run on `device`, or None where they do: CUDA GPUs of compute capability 8.9 or
    newer (Ada, Hopper), whose tensor cores take e4m3, with a torch that has the rowwise-scaled GEMM."""
    need = "fp8 needs a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper)"
    if device.type != "cuda":
        return f"{need}; the pipeline is on {device.type}"
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        return f"{need}; {torch.cuda.get_device_name(device)} is {capability[0]}.{capability[1]}"
    if not _rowwise_gemm_writes(device, torch.bfloat16):
        return f"torch {torch.__version__} has no rowwise-scaled fp8 GEMM for {torch.cuda.get_device_name(device)}"
    return None


def output_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """What `_scaled_mm` writes for activations of `dtype` on `device`: `dtype` itself where the rowwise-scaled
    GEMM writes it, else bfloat16, which the layer casts back (Inductor fuses the cast into the next kernel).
    Which torch builds write which dtype with rowwise scales has changed between versions, so it is tried."""
    return dtype if _rowwise_gemm_writes(device, dtype) else torch.bfloat16


@functools.cache
def _rowwise_gemm_writes(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `_scaled_mm` with per-row and per-column scales and a bias writes `dtype` on `device`."""
    q = torch.ones(16, 16, device=device, dtype=FP8)
    try:
        torch._scaled_mm(q, q.t(), scale_a=torch.ones(16, 1, device=device), scale_b=torch.ones(1, 16, device=device),
                         bias=torch.zeros(16, device=device, dtype=dtype), out_dtype=dtype)
    except (RuntimeError, NotImplementedError) as error:
        logger.info("fp8: torch._scaled_mm does not write %s with rowwise scales on %s (%s)", dtype, device,
                    str(error).splitlines()[0] if str(error) else type(error).__name__)
        return False
    return True
