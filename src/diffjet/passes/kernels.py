"""Kernel pass: put diffjet's Triton kernels (`diffjet/kernels/`) into the diffusers blocks.

`group_norm_silu` replaces, in place and keeping the same parameters:
- in every `ResnetBlock2D` with SiLU and the default time-embedding mode (all of SD's UNet, ControlNet and
  VAE blocks): `norm1 → SiLU` and `(conv1 + time embedding) → norm2 → SiLU`, through a forward that
  mirrors diffusers' own for that configuration;
- `conv_norm_out → conv_act` at the end of a UNet or VAE decoder, and a transformer's input `norm`
  (no SiLU) where its input is 4-D.
Blocks in another configuration are left alone and counted.

`geglu` changes the class of every diffusers `GEGLU` (the first half of a transformer block's feed-forward)
to `FusedGEGLU`, whose projection writes `h * gelu(g)` directly where that pays (large outputs), on GPUs
the kernel runs on (Hopper on). A projection that the fp8 pass (`passes/fp8.py`, run before this one) made
an fp8 GEMM keeps that at the calls where fp8 pays; the others take the kernel where it pays. `geglu_fp8`
(on by default; it acts only with `Config.fp8`) runs those fp8 calls through the same kernel on e4m3
inputs, gate included, where the kernel pays. The kernels take CUDA half-precision (float16/bfloat16)
channels-last activations; the pass is not applied elsewhere.

With `Config(fp8="max")` (lossier than fp8's GEMMs: SDXL's step error against float32 0.078 where `fp8=True`
has 0.008) `group_norm_silu` also gives the 3×3 convolutions of those ResNet blocks (stride 1, padding 1,
widths the kernel takes) the class `Fp8Conv3x3`: where the convolution pays (`fp8.conv_pays`), the block runs
the norm before it as `group_norm_silu_fp8`, which writes e4m3 with one scale per image, and the convolution
as `diffjet::conv3x3_fp8` on it. Blocks that up- or downsample keep `conv1` in fp16.

`qk_norm_rope` (on by default; docs/kernels.md) gives every Flux.1 attention (diffusers' `FluxAttention` with
its own processor, on the projections the attention pass fused) the processor `FusedFluxAttnProcessor`, which
runs the queries' and keys' RMS norms, the rotary embedding and SDPA's layout as one kernel.

`gelu_epilogue` (on by default) gives diffusers' tanh-GELU projections (the feed-forwards of Flux's and SD 3.5's
blocks) the class `EpilogueGELU`: one cuBLASLt GEMM whose epilogue applies the GELU to the float32 accumulator
(`torch._addmm_activation`), where Inductor runs a GEMM, then a GELU kernel over its rounded output. Flux's single
blocks get the class `SplitFluxSingleBlock`: the MLP's projection through the same epilogue, and the output
projection as two GEMMs over the two halves of its input (the attention's output, the MLP's), the second
accumulating onto the first (in place, `diffjet::addmm_into`, where no gradient flows), where diffusers
concatenates the halves first. Projections the fp8 pass made fp8 GEMMs keep those. With `qk_norm_rope` a
flux-dev step is 1.046× faster (docs/kernels.md).

`flash_attn_4` (on by default) runs the attention of diffjet's DiT processors (SD3's `FusedJointQKVAttnProcessor`,
Flux's `FusedFluxAttnProcessor`, so with `qk_norm_rope`) through FlashAttention-4's Hopper kernel
(`kernels/flash4.py`) where the optional `flash-attn-4` package is installed and the GPU is a Hopper; elsewhere
SDPA stays, and the compile report's `off` says why.

The three act on a DiT transformer in half precision on CUDA; channels-last does not concern them.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.activations import GEGLU, GELU
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_flux import (FluxAttention, FluxAttnProcessor,
                                                            FluxSingleTransformerBlock)
from torch import nn

from ..config import Config
from ..kernels import flash4
from ..kernels import geglu as gg
from ..kernels.geglu import geglu, geglu_fp8
from ..kernels.group_norm_silu import group_norm_silu, group_norm_silu_fp8
from ..kernels.qk_norm_rope import qk_norm_rope
from .attention import FusedJointQKVAttnProcessor
from .fp8 import Fp8Conv3x3, Fp8Linear, conv3x3_fits, quantize_rows

logger = logging.getLogger(__name__)


class FusedGroupNorm(nn.Module):
    """`GroupNorm` (and SiLU when `silu`) through `diffjet::group_norm_silu`, sharing the norm's parameters."""

    def __init__(self, norm: nn.GroupNorm, silu: bool) -> None:
        super().__init__()
        self.num_groups, self.eps, self.silu = norm.num_groups, norm.eps, silu
        self.weight, self.bias = norm.weight, norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            y = nn.functional.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
            return nn.functional.silu(y) if self.silu else y
        x = x.contiguous(memory_format=torch.channels_last)  # see FusedResnetBlock2D.forward
        return group_norm_silu(x, self.weight, self.bias, self.num_groups, self.eps, self.silu)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.weight.shape[0]}, eps={self.eps}, silu={self.silu}"


class FusedResnetBlock2D(ResnetBlock2D):
    """A `ResnetBlock2D` (time_embedding_norm="default", SiLU) whose norms run through
    `diffjet::group_norm_silu`. The pass changes a block's class to this one, keeping its modules and
    parameters: an importable class, unlike a forward patched onto the instance, which a precompiled
    function's guards cannot be saved with (`runtime/precompiled.py`)."""

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None, *args: Any, **kwargs: Any) -> torch.Tensor:
        """diffusers' `ResnetBlock2D.forward` for this configuration, norms fused."""
        norm1, norm2 = self.norm1, self.norm2
        # The kernels read channels-last. Not every block input is: a transformer with linear projections
        # (SD 2.x, SDXL) returns `.contiguous()` NCHW, and the kernels' op would fall back to its slow
        # PyTorch reference (SD2.1 768²: 15.26 against 13.90 ms a UNet step, bench/results/
        # h100-2026-11-26-sd21-side-by-side.json). Asked for here, Inductor writes the producer's output
        # channels-last in the first place; in eager it is a copy only where the layout differs.
        input_tensor = input_tensor.contiguous(memory_format=torch.channels_last)
        if self._fp8_conv(self.conv1, input_tensor) and self.upsample is None and self.downsample is None:
            hidden = self.conv1.fp8_forward(*group_norm_silu_fp8(
                input_tensor, norm1.weight, norm1.bias, norm1.num_groups, norm1.eps, True))
        else:
            hidden = group_norm_silu(input_tensor, norm1.weight, norm1.bias, norm1.num_groups, norm1.eps, True)
            if self.upsample is not None:
                if hidden.shape[0] >= 64:  # diffusers' workaround for upsample_nearest_nhwc at large batch
                    input_tensor, hidden = input_tensor.contiguous(), hidden.contiguous()
                input_tensor, hidden = self.upsample(input_tensor), self.upsample(hidden)
            elif self.downsample is not None:
                input_tensor, hidden = self.downsample(input_tensor), self.downsample(hidden)
            hidden = self.conv1(hidden)
        # Channels-last asked for again: torch.export's fake convolution (Config.precompile="aoti") gives
        # contiguous NCHW where the GPU's gives channels-last, and the op gets exactly the traced layout.
        hidden = hidden.contiguous(memory_format=torch.channels_last)
        shift = None
        if self.time_emb_proj is not None:
            if not self.skip_time_act:
                temb = self.nonlinearity(temb)
            shift = self.time_emb_proj(temb)
        elif temb is not None:
            hidden = hidden + temb
        if self._fp8_conv(self.conv2, hidden) and (self.dropout.p == 0 or not self.training):
            hidden = self.conv2.fp8_forward(*group_norm_silu_fp8(
                hidden, norm2.weight, norm2.bias, norm2.num_groups, norm2.eps, True, shift))
        else:
            hidden = group_norm_silu(hidden, norm2.weight, norm2.bias, norm2.num_groups, norm2.eps, True, shift)
            hidden = self.conv2(self.dropout(hidden))
        if self.conv_shortcut is not None:
            input_tensor = self.conv_shortcut(input_tensor)
        return (input_tensor + hidden) / self.output_scale_factor

    @staticmethod
    def _fp8_conv(conv: nn.Module, x: torch.Tensor) -> bool:
        """Whether `conv` reads its input in e4m3 from the norm kernel at this call (`Config(fp8="max")`)."""
        return type(conv) is Fp8Conv3x3 and conv.uses_fp8(x.shape[0] * x.shape[2] * x.shape[3])


class FusedGEGLU(GEGLU):
    """diffusers' `GEGLU` through `diffjet::geglu`: the projection and `h * gelu(g)` in one kernel, reading
    the projection's own parameters at every call (so in-place LoRA merges reach it). Sizes where the kernel
    does not pay on this GPU (`sms`, its SM count: see `kernels.geglu.pays`), calls that the projection
    computes in fp8 (`Config.fp8`) unless `fp8_kernel` (then `diffjet::geglu_fp8`, on the input quantized
    per row as the fp8 pass does it), calls in fp16 unless `fp16_kernel`, and a projection that is neither
    a plain `nn.Linear` nor an `Fp8Linear` (a PEFT LoRA layer, say) run diffusers' forward, which Inductor
    compiles as before."""

    sms: int | None = None
    fp16_kernel: bool = True
    fp8_kernel: bool = False

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        rows = hidden_states.numel() // hidden_states.shape[-1]
        proj = self.proj
        fp8 = type(proj) is Fp8Linear and proj.uses_fp8(rows)
        fp16 = type(proj) is nn.Linear or (type(proj) is Fp8Linear and not fp8)
        kernel = (fp8 and self.fp8_kernel) or (fp16 and self.fp16_kernel)
        if not kernel or not gg.pays(rows, proj.out_features // 2, self.sms):
            return super().forward(hidden_states, *args, **kwargs)
        if fp16:
            return geglu(hidden_states, proj.weight, proj.bias)
        # The quantization stays in Inductor's graph, where it can join the kernel that writes the input.
        q, scale = quantize_rows(hidden_states.reshape(rows, -1))
        y = geglu_fp8(q, scale, proj.weight_fp8, proj.weight_scale, proj.bias, hidden_states.dtype)
        return y.view(*hidden_states.shape[:-1], -1)


class FusedFluxAttnProcessor(FluxAttnProcessor):
    """diffusers' `FluxAttnProcessor` on fused projections, with the queries' and keys' RMS norms, the rotary
    embedding and the (batch, heads, tokens, head_dim) layout SDPA reads done by `diffjet::qk_norm_rope`, and
    the attention by SDPA or, with `flash`, by `diffjet::flash_attn_4`. Calls it does not cover (an attention
    mask, no rotary embedding, unfused projections, norms without weights or with two epsilons) run diffusers'
    processor."""

    def __init__(self, flash: bool = False) -> None:
        super().__init__()
        self.flash = flash

    def __call__(self, attn: FluxAttention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: torch.Tensor | None = None
                 ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        text = encoder_hidden_states is not None
        norms = [attn.norm_q, attn.norm_k] + ([attn.norm_added_q, attn.norm_added_k] if text else [])
        if (attention_mask is not None or image_rotary_emb is None or not attn.fused_projections
                or text != (attn.added_kv_proj_dim is not None)
                or any(n.weight is None for n in norms) or norms[0].eps != norms[1].eps
                or (text and norms[2].eps != norms[3].eps)):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

        def eps(norm) -> float:  # torch.nn.RMSNorm without eps uses its input's
            return float(norm.eps if norm.eps is not None else torch.finfo(hidden_states.dtype).eps)

        cos, sin = image_rotary_emb
        query, key, value = qk_norm_rope(
            attn.to_qkv(hidden_states), attn.to_added_qkv(encoder_hidden_states) if text else None,
            attn.norm_q.weight, attn.norm_k.weight, norms[2].weight if text else None,
            norms[3].weight if text else None, cos, sin, attn.to_qkv.out_features // 3 // attn.head_dim,
            eps(norms[0]), eps(norms[2]) if text else 0.0)
        hidden_states = flash4.attend(query, key, value, self.flash).to(query.dtype)
        if not text:
            return hidden_states
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        return hidden_states, attn.to_add_out(encoder_hidden_states.contiguous())


def linear_gelu(x: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
    """`gelu(proj(x), approximate="tanh")` as one GEMM with cuBLASLt's GELU epilogue (its GELU is the tanh one).
    Inductor calls `aten._addmm_activation` as it is. On a CPU that op's GELU is the exact one, so there this is
    diffusers' computation."""
    if not x.is_cuda:
        return F.gelu(F.linear(x, proj.weight, proj.bias), approximate="tanh")
    y = torch._addmm_activation(proj.bias, x.reshape(-1, x.shape[-1]), proj.weight.t(), use_gelu=True)
    return y.view(*x.shape[:-1], -1)


@torch.library.custom_op("diffjet::addmm_into", mutates_args=("out",))
def addmm_into(out: torch.Tensor, x: torch.Tensor, weight_t: torch.Tensor) -> None:
    """`out += x @ weight_t`, in place: cuBLAS accumulates onto `out` in its epilogue. `torch.addmm(out, ...)`
    first copies `out` into a new buffer (a 28 MB copy in each flux-dev single block, 0.53 ms a step); a mutating
    op lets Inductor hand the GEMM the buffer `out` already is. It has no backward: callers take it only where
    no gradient flows."""
    out.addmm_(x, weight_t)


def split_projection(attn: torch.Tensor, mlp: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
    """`proj(cat([attn, mlp], -1))` without the concatenation: `mlp @ Wm.T + b`, then `attn @ Wa.T` accumulated
    onto it, `Wa` and `Wm` views of `proj.weight` (a LoRA merge reaches them)."""
    width, weight = attn.shape[-1], proj.weight
    out = torch.addmm(proj.bias, mlp.flatten(0, -2), weight[:, width:].t())
    attn_rows, attn_weight = attn.flatten(0, -2), weight[:, :width].t()
    if torch.is_grad_enabled() and out.requires_grad:  # the op has no backward: keep autograd's addmm
        out = torch.addmm(out, attn_rows, attn_weight)
    else:
        addmm_into(out, attn_rows, attn_weight)
    return out.view(*attn.shape[:-1], -1)


def _epilogue_fits(proj: nn.Module) -> bool:
    """A plain Linear with a bias: not an fp8 GEMM, not a PEFT LoRA layer."""
    return type(proj) is nn.Linear and proj.bias is not None


class EpilogueGELU(GELU):
    """diffusers' tanh-GELU projection through `linear_gelu`."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not _epilogue_fits(self.proj):
            return super().forward(hidden_states)
        return linear_gelu(hidden_states, self.proj)


class SplitFluxSingleBlock(FluxSingleTransformerBlock):
    """diffusers' Flux single block, its MLP projection through `linear_gelu` and its output projection as two
    GEMMs over the halves of its input, without the concatenation (`split_projection`)."""

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
                joint_attention_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if not (_epilogue_fits(self.proj_mlp) and _epilogue_fits(self.proj_out)):
            return super().forward(hidden_states, encoder_hidden_states, temb, image_rotary_emb,
                                   joint_attention_kwargs)
        text_seq_len = encoder_hidden_states.shape[1]
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        residual = hidden_states
        norm_hidden_states, gate = self.norm(hidden_states, emb=temb)
        mlp_hidden_states = linear_gelu(norm_hidden_states, self.proj_mlp)
        attn_output = self.attn(hidden_states=norm_hidden_states, image_rotary_emb=image_rotary_emb,
                                **(joint_attention_kwargs or {}))
        out = split_projection(attn_output, mlp_hidden_states, self.proj_out)
        hidden_states = residual + gate.unsqueeze(1) * out
        if hidden_states.dtype == torch.float16:
            hidden_states = hidden_states.clip(-65504, 65504)
        return hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]


def _flux_fits(attn: nn.Module) -> bool:
    """diffusers' own processor on projections the attention pass fused, with its default attention backend."""
    return (isinstance(attn, FluxAttention) and type(attn.processor) is FluxAttnProcessor and attn.fused_projections
            and getattr(attn.processor, "_attention_backend", None) is None
            and getattr(attn.processor, "_parallel_config", None) is None)


def _resnet_fits(block: ResnetBlock2D) -> bool:
    return (
        block.time_embedding_norm == "default"
        and isinstance(block.nonlinearity, nn.SiLU)
        and all(isinstance(n, nn.GroupNorm) and n.affine for n in (block.norm1, block.norm2))
    )


#: The kernels that act on a DiT's transformer; the others act on UNets, ControlNets and VAEs.
DIT_KERNELS = ("qk_norm_rope", "gelu_epilogue", "flash_attn_4")
#: The kernels that act only on the fp8 pass's layers.
FP8_KERNELS = ("geglu_fp8",)


def applies(module: nn.Module, config: Config, dit: bool = False) -> bool:
    """On CUDA and half precision, and for the convolutional models channels-last: what the kernels are made
    and measured for."""
    parameter = next(module.parameters())
    return (
        bool(acting(config, fp8_on=True, dit=dit))
        and (config.channels_last or dit)
        and parameter.is_cuda
        and parameter.dtype in (torch.float16, torch.bfloat16)
    )


def acting(config: Config, fp8_on: bool, dit: bool = False) -> list[str]:
    """The kernels of `config` that act on a module (a DiT's transformer if `dit`), as the compile report (and
    so the cache key) names them: `geglu_fp8` only where fp8 is on, so that its being on by default leaves
    lossless keys as they were."""
    return [k for k in config.kernels if (k in DIT_KERNELS) == dit and (k not in FP8_KERNELS or fp8_on)]


def apply(module: nn.Module, config: Config) -> nn.Module:
    """Swap the kernels named in `config.kernels` into `module`'s blocks, in place; idempotent."""
    first = next(module.parameters())
    device, dtype = first.device, first.dtype
    named = {"geglu", "geglu_fp8"} & set(config.kernels)
    gegl = [block for block in module.modules() if type(block) is GEGLU] if named else []
    if gegl and not gg.runs_on(device):
        logger.info("geglu: the kernel needs a Hopper or later GPU; %s's GEGLU blocks stay with Inductor",
                    type(module).__name__)
        gegl = []
    flux = [m for m in module.modules() if "qk_norm_rope" in config.kernels and (
        _flux_fits(m) or isinstance(getattr(m, "processor", None), FusedFluxAttnProcessor))]
    joint = [m for m in module.modules() if isinstance(getattr(m, "processor", None), FusedJointQKVAttnProcessor)]
    # asked only where it could act: importing the package takes seconds
    flash = bool(flux or joint) and "flash_attn_4" in config.kernels and flash4.unavailable(device, dtype) is None
    for attns, processor in ((flux, FusedFluxAttnProcessor(flash)), (joint, FusedJointQKVAttnProcessor(flash))):
        for attn in attns:
            attn.set_processor(processor)
    if "gelu_epilogue" in config.kernels:
        for block in module.modules():
            # not where the fp8 pass made the projection an fp8 GEMM
            if type(block) is GELU and block.approximate == "tanh" and _epilogue_fits(block.proj):
                block.__class__ = EpilogueGELU
            elif (type(block) is FluxSingleTransformerBlock and isinstance(block.act_mlp, nn.GELU)
                  and block.act_mlp.approximate == "tanh" and _epilogue_fits(block.proj_mlp)
                  and _epilogue_fits(block.proj_out)):
                block.__class__ = SplitFluxSingleBlock
    for block in gegl:
        block.__class__ = FusedGEGLU
        block.sms = gg.multiprocessors(device)
        block.fp16_kernel, block.fp8_kernel = "geglu" in named, "geglu_fp8" in named
    if "group_norm_silu" not in config.kernels:
        return module
    fp8_layers = getattr(module, "_diffjet_fp8_layers", None)  # set where the fp8 pass ran
    for block in list(module.modules()):
        if type(block) is ResnetBlock2D and _resnet_fits(block):
            block.__class__ = FusedResnetBlock2D
        if type(block) is FusedResnetBlock2D and config.fp8 == "max" and fp8_layers is not None:
            for conv in (block.conv1, block.conv2):
                if conv3x3_fits(conv):
                    conv.__class__ = Fp8Conv3x3
                    conv.sms = gg.multiprocessors(device)
                    conv._derive()
                    fp8_layers.append(conv)
        norm, act = getattr(block, "conv_norm_out", None), getattr(block, "conv_act", None)
        if isinstance(norm, nn.GroupNorm) and norm.affine and isinstance(act, nn.SiLU):
            block.conv_norm_out, block.conv_act = FusedGroupNorm(norm, silu=True), nn.Identity()
        norm = getattr(block, "norm", None)
        if type(block).__name__ == "Transformer2DModel" and isinstance(norm, nn.GroupNorm) and norm.affine:
            block.norm = FusedGroupNorm(norm, silu=False)
    return module


def placements(module: nn.Module) -> dict[str, int]:
    """Where the kernels are in `module`: fused ResNet blocks, fused norms, ResNet blocks left alone, fused
    GEGLU projections, e4m3 3×3 convolutions, Flux attentions with the fused processor, attentions with either
    of diffjet's DiT processors and those of them through FlashAttention-4, GELU projections through the
    epilogue and Flux single blocks with the split output projection."""
    resnets = [m for m in module.modules() if isinstance(m, ResnetBlock2D)]
    fused = [m for m in module.modules() if isinstance(m, FusedGroupNorm)]
    return {
        "resnet_blocks": sum(isinstance(m, FusedResnetBlock2D) for m in resnets),
        "norm_out": sum(m.silu for m in fused),
        "transformer_norms": sum(not m.silu for m in fused),
        "left_alone": sum(not isinstance(m, FusedResnetBlock2D) for m in resnets),
        "geglu": sum(isinstance(m, FusedGEGLU) for m in module.modules()),
        "conv_fp8": sum(isinstance(m, Fp8Conv3x3) for m in module.modules()),
        "flux_attention": sum(isinstance(getattr(m, "processor", None), FusedFluxAttnProcessor)
                              for m in module.modules()),
        "dit_attention": sum(isinstance(getattr(m, "processor", None), (FusedFluxAttnProcessor,
                                                                         FusedJointQKVAttnProcessor))
                             for m in module.modules()),
        "flash_attention": sum(getattr(getattr(m, "processor", None), "flash", False) for m in module.modules()),
        "gelu_epilogue": sum(isinstance(m, EpilogueGELU) for m in module.modules()),
        "flux_single_split": sum(isinstance(m, SplitFluxSingleBlock) for m in module.modules()),
    }
