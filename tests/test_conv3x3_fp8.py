"""The ResNet blocks' 3×3 convolutions in e4m3 (`Config(fp8="max")`): the GroupNorm+SiLU kernel writing e4m3 with
one scale per image, the implicit-GEMM convolution reading it, and both in a tiny UNet.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1), which
rounds float32 to e4m3 without carrying into the exponent (31.5 → 16); the norm's expected e4m3 values are
therefore rounded by Triton's own conversion (`triton_e4m3`), which on a GPU is PyTorch's.
"""

import pytest
import torch
import torch.nn.functional as F

from diffjet import Config
from diffjet.config import DEFAULT_KERNELS
from diffjet.errors import ConfigError
from diffjet.kernels import conv3x3_fp8 as cv
from diffjet.kernels import group_norm_silu as gn
from diffjet.passes import fp8
from diffjet.passes import kernels as kernel_pass

from .conftest import relative_error, tiny_fp8_unets, tiny_unet_outputs

triton = pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
WIDTH = 32 if DEVICE == "cpu" else 64  # the kernel's smallest BLOCK_K
MAX = Config(kernels=("group_norm_silu",), fp8="max")  # the norm kernel alone: the interpreter is slow


def norm_inputs(n, c, h, w, *, affine=True, shift=False, seed=0, dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, h, w, generator=g) * 3 + 1).to(DEVICE, dtype).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c, generator=g).to(DEVICE, dtype) if affine else None
    bias = torch.randn(c, generator=g).to(DEVICE, dtype) if affine else None
    temb = torch.randn(n, c, generator=g).to(DEVICE, dtype) if shift else None
    return x, weight, bias, temb


@pytest.mark.parametrize("silu", [True, False], ids=["silu", "no-silu"])
@pytest.mark.parametrize("case", [dict(n=2, c=64, h=5, w=7, shift=True), dict(n=1, c=96, h=9, w=4),
                                  dict(n=3, c=64, h=3, w=3, affine=False)], ids=["shift", "odd-width", "no-affine"])
def test_norm_writes_e4m3_by_a_per_image_scale_at_least_its_largest_value(case, silu):
    x, weight, bias, temb = norm_inputs(**case)
    q, scale = gn.group_norm_silu_fp8(x, weight, bias, 32, 1e-5, silu, temb)
    y = gn._normalized(x, weight, bias, 32, 1e-5, silu, temb)
    amax = y.abs().amax(dim=(1, 2, 3))
    assert q.dtype == torch.float8_e4m3fn and q.is_contiguous(memory_format=torch.channels_last)
    assert scale.shape == (x.shape[0],) and scale.dtype == torch.float32
    # The scale bounds each image's largest |y| / 448 (to float32's rounding) and is not loose on such data.
    assert (scale * 448 >= amax * (1 - 1e-5)).all() and (scale * 448 <= amax * 1.5).all()
    assert q.float().abs().max() <= 448 and not q.float().isnan().any()
    # The values are y / scale rounded to e4m3 (by Triton's conversion, as the kernel rounds).
    want = cv.triton_e4m3(y, scale).float() * scale.view(-1, 1, 1, 1)
    assert relative_error(q.float() * scale.view(-1, 1, 1, 1), want) < 1e-3


def test_norm_scale_covers_silus_minimum_between_the_extremes():
    # Outputs in about [-1.9, 0.1]: SiLU's minimum (-0.278 at -1.278) lies between them and is the largest |value|,
    # larger than SiLU at either end (-0.25 and 0.06). A bound from the ends alone would clip it.
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(2, 64, 6, 6, generator=g) * 2 - 1).to(DEVICE).contiguous(memory_format=torch.channels_last)
    weight = torch.full((64,), 0.58, device=DEVICE)
    bias = torch.full((64,), -0.9, device=DEVICE)
    q, scale = gn.group_norm_silu_fp8(x, weight, bias, 32, 1e-5, True)
    y = gn._normalized(x, weight, bias, 32, 1e-5, True, None)
    assert y.min() < -0.278 and y.max() < 0.2
    assert (scale * 448 >= y.abs().amax(dim=(1, 2, 3)) * (1 - 1e-5)).all()
    want = cv.triton_e4m3(y, scale).float() * scale.view(-1, 1, 1, 1)
    assert relative_error(q.float() * scale.view(-1, 1, 1, 1), want) < 1e-3


def test_norm_reference_is_what_the_fallback_returns_and_quantizes_correctly():
    x, weight, bias, temb = norm_inputs(2, 64, 4, 4, shift=True)
    q, scale = gn.reference_fp8(x.cpu(), weight.cpu(), bias.cpu(), 32, 1e-5, True, temb.cpu())
    y = gn._normalized(x.cpu(), weight.cpu(), bias.cpu(), 32, 1e-5, True, temb.cpu())
    assert torch.allclose(scale * 448, y.abs().amax(dim=(1, 2, 3)))
    assert 0.005 < relative_error(q.float() * scale.view(-1, 1, 1, 1), y) < 0.04  # e4m3's 3 mantissa bits


def conv_inputs(n, c, h, w, co, bias=True, seed=0):
    """(q, per-image scales, e4m3 gemm weight, its scales, bias, the float32 input and weight)."""
    x, _, _, _ = norm_inputs(n, c, h, w, seed=seed)
    x = F.silu(x.float() * torch.arange(1, n + 1, device=DEVICE).view(-1, 1, 1, 1))  # images of different ranges
    scale = x.abs().amax(dim=(1, 2, 3)) / 448
    q = (x / scale.view(-1, 1, 1, 1)).to(torch.float8_e4m3fn).contiguous(memory_format=torch.channels_last)
    x = q.float() * scale.view(-1, 1, 1, 1)  # the input the kernel sees, in float32
    g = torch.Generator().manual_seed(seed + 1)
    weight = ((torch.rand(co, c, 3, 3, generator=g) * 2 - 1) / (9 * c) ** 0.5).to(DEVICE)
    w8, w_scale = fp8.quantize_rows(cv.gemm_weight(weight))
    b = (torch.randn(co, generator=g) * 0.1).to(DEVICE, torch.float16) if bias else None
    return q, scale, w8, w_scale.view(-1), b, x, weight


@pytest.mark.parametrize("shape", [(2, WIDTH, 5, 7, 40), (1, 2 * WIDTH, 6, 6, 16), (3, 3 * WIDTH, 4, 9, 72)],
                         ids=["two-images", "two-blocks-per-tap", "three-images"])
def test_conv_kernel_against_the_dequantized_convolution(shape):
    q, scale, w8, ws, b, x, weight = conv_inputs(*shape, bias=shape[0] != 1)
    assert cv.supported(q, w8)
    y = cv.conv3x3_fp8(q, scale, w8, ws, b, torch.float16)
    want = cv.reference(q, scale, w8, ws, b, torch.float16)
    assert y.shape == (shape[0], shape[4], shape[2], shape[3]) and y.is_contiguous(memory_format=torch.channels_last)
    assert relative_error(y.float(), want.float()) < 2e-3  # float32 sums in another order, fp16 output
    # Against the float32 convolution: e4m3's error, and each image's own scale (not one image's for all).
    exact = F.conv2d(x, weight, None if b is None else b.float(), padding=1)
    assert relative_error(y.float(), exact) < 0.06
    swapped = cv.reference(q, scale.flip(0), w8, ws, b, torch.float16)
    assert shape[0] == 1 or relative_error(swapped.float(), exact) > 0.3


def test_tiny_unet_runs_its_resnet_convolutions_in_e4m3(tiny_path, monkeypatch):
    # The baseline without diffjet's kernels: the norm kernel is lossless, and Triton's interpreter is slow.
    reference, without, with_conv = tiny_fp8_unets(tiny_path, Config(kernels=(), fp8=True), MAX)
    convs = [m for m in with_conv.modules() if isinstance(m, fp8.Fp8Conv3x3)]
    resnets = [m for m in with_conv.modules() if isinstance(m, kernel_pass.FusedResnetBlock2D)]
    assert kernel_pass.placements(with_conv)["conv_fp8"] == len(convs) == 2 * len(resnets) > 0
    assert kernel_pass.placements(without)["conv_fp8"] == 0
    assert fp8.placements(with_conv)["conv3x3"] == len(convs)
    assert all(c in with_conv._diffjet_fp8_layers for c in convs)  # requantized with the others on a LoRA change
    calls = []
    real = cv.conv3x3_fp8
    monkeypatch.setattr(fp8, "conv3x3_fp8", lambda *args: calls.append(args[0].shape) or real(*args))
    # One image: the interpreter runs a norm's combine step once per (image, group).
    want, base, got = tiny_unet_outputs(reference, without, with_conv, batch=1)
    assert len(calls) == len(convs)
    # The convolutions' e4m3 adds error to the fp8 GEMMs', of the same order (e4m3 per layer, about 3%).
    assert relative_error(base, want) < relative_error(got, want) < 3 * relative_error(base, want) + 0.02


def test_a_resnet_block_with_e4m3_convolutions_traces_whole_and_keeps_its_output():
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    block = ResnetBlock2D(in_channels=2 * WIDTH, out_channels=2 * WIDTH, temb_channels=16).to(DEVICE).eval()
    block._diffjet_fp8_layers = []  # as the fp8 pass leaves a module
    kernel_pass.apply(block, MAX)
    assert type(block) is kernel_pass.FusedResnetBlock2D
    assert [type(c) for c in (block.conv1, block.conv2)] == [fp8.Fp8Conv3x3] * 2
    x = torch.randn(2, 2 * WIDTH, 6, 5, device=DEVICE).contiguous(memory_format=torch.channels_last)
    temb = torch.randn(2, 16, device=DEVICE)
    with torch.no_grad():
        eager = block(x, temb)
        traced = torch.compile(block, backend="aot_eager", fullgraph=True)(x, temb)
        plain = ResnetBlock2D.forward(block, x, temb)  # diffusers' forward: fp16/fp32 convolutions
    assert torch.equal(eager, traced)
    assert 0.002 < relative_error(eager, plain) < 0.06


def test_a_requantized_convolution_weight_reaches_the_kernel(tiny_path):
    _, unet = tiny_fp8_unets(tiny_path, MAX)
    conv = next(m for m in unet.modules() if isinstance(m, fp8.Fp8Conv3x3))
    before = conv.weight_fp8.clone()
    with torch.no_grad():
        conv.weight.mul_(-2)
    assert fp8.requantize([unet], [conv.weight]) == 1
    q, scale = fp8.quantize_rows(cv.gemm_weight(conv.weight.detach()))
    assert torch.equal(conv.weight_fp8.view(torch.uint8), q.view(torch.uint8))
    assert torch.allclose(conv.weight_scale.view(-1), scale.view(-1))
    assert not torch.equal(before.view(torch.uint8), conv.weight_fp8.view(torch.uint8))


def test_fp8_max_needs_the_norm_kernel_and_fp8_true_leaves_the_convolutions_alone(tiny_path):
    with pytest.raises(ConfigError, match='fp8="max".*group_norm_silu'):
        Config(kernels=("geglu",), fp8="max")
    assert Config(fp8="max").kernels == DEFAULT_KERNELS
    block = tiny_fp8_unets(tiny_path, Config(fp8=True))[1]
    assert fp8.placements(block)["conv3x3"] == kernel_pass.placements(block)["conv_fp8"] == 0
    assert kernel_pass.placements(block)["resnet_blocks"] > 0


@pytest.mark.gpu
def test_norm_and_conv_kernels_at_an_sdxl_shape_under_inductor():
    # Speed is the UNet step's to show (bench/unet_step.py, from CUDA graphs): eager calls of the two ops are
    # bound by the host.
    x, weight, bias, temb = norm_inputs(2, 640, 64, 64, shift=True)
    conv = torch.nn.Conv2d(640, 640, 3, padding=1).to(DEVICE, torch.float16).to(memory_format=torch.channels_last)
    w8, ws = fp8.quantize_rows(cv.gemm_weight(conv.weight.detach()))

    def f(x, temb):
        q, scale = torch.ops.diffjet.group_norm_silu_fp8(x, weight, bias, 32, 1e-5, True, temb)
        return torch.ops.diffjet.conv3x3_fp8(q, scale, w8, ws.view(-1), conv.bias, torch.float16)

    with torch.no_grad():
        exact = F.conv2d(gn._normalized(x, weight, bias, 32, 1e-5, True, temb), conv.weight.float(),
                         conv.bias.float(), padding=1)
        got = torch.compile(f, fullgraph=True)(x, temb)
        assert relative_error(got.float(), exact) < 0.06
        fp16 = conv(gn.group_norm_silu(x, weight, bias, 32, 1e-5, True, temb))
        assert relative_error(fp16.float(), exact) < 2e-3
