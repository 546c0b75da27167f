"""diffjet's Triton kernels against their PyTorch references, and the pass that puts them in.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1);
on the GPU they run for real. Each kernel is held to DESIGN.md's rule: its error against a float32
reference is at most 1.5 × that of PyTorch's own half-precision op.
"""

import copy
import types

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.resnet import ResnetBlock2D

from diffjet import Config
from diffjet.kernels import group_norm_silu as gn
from diffjet.passes import kernels as kernel_pass

from .conftest import relative_error

triton = pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# DESIGN.md's 1.5×, except for bfloat16 in Triton's interpreter, which rounds float32 → bfloat16 toward
# zero where the GPU rounds to nearest (its `fp_downcast_rounding` is ignored there): twice the error of
# one correct rounding, so 2.5× there. On the GPU every case is held to 1.5×.
BOUND = {("cuda", torch.float16): 1.5, ("cuda", torch.bfloat16): 1.5,
         ("cpu", torch.float16): 1.5, ("cpu", torch.bfloat16): 2.5}

# (N, C, H, W, groups): SD's channel counts, odd pixel counts, one pixel, tiles that do not divide H·W,
# channel counts that are not powers of two, and more pixels than one combine chunk holds.
SHAPES = [
    (2, 320, 8, 8, 32),
    (1, 64, 5, 7, 32),
    (3, 96, 3, 5, 8),
    (1, 1280, 4, 4, 32),
    (2, 48, 1, 1, 16),
    (1, 128, 33, 17, 32),
    (1, 32, 96, 100, 32),
]


def inputs(shape, dtype, seed=0):
    n, c, h, w, _ = shape
    g = torch.Generator().manual_seed(seed)
    # An offset and scale per channel, as activations have: catches E[x²] − E[x]² cancellation.
    x = torch.randn(n, c, h, w, generator=g) * (1 + 3 * torch.rand(1, c, 1, 1, generator=g)) + 4 * torch.randn(1, c, 1, 1, generator=g)
    weight, bias = torch.randn(c, generator=g), torch.randn(c, generator=g)
    shift = torch.randn(n, c, generator=g)
    to = lambda t: t.to(DEVICE, dtype)  # noqa: E731
    return to(x).contiguous(memory_format=torch.channels_last), to(weight), to(bias), to(shift)


def eager_half(x, weight, bias, groups, eps, silu, shift):
    """PyTorch's own ops in x's dtype: the baseline of the lossless rule."""
    if shift is not None:
        x = x + shift[:, :, None, None]
    y = F.group_norm(x, groups, weight, bias, eps)
    return F.silu(y) if silu else y


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("silu, use_shift, affine", [(True, False, True), (True, True, True), (False, False, False)],
                         ids=["silu", "shift-silu", "plain-no-affine"])
def test_group_norm_silu_kernel_against_reference(shape, dtype, silu, use_shift, affine):
    x, weight, bias, shift = inputs(shape, dtype)
    groups, eps = shape[-1], 1e-5
    weight, bias = (weight, bias) if affine else (None, None)
    shift = shift if use_shift else None
    out = torch.full_like(x, float("nan"))  # poisoned: an element the kernel does not write stays NaN
    y = gn.launch(x, weight, bias, groups, eps, silu, shift, out=out)
    assert y is out and y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(y).all()
    ref = gn.reference(x.float(), None if weight is None else weight.float(), None if bias is None else bias.float(),
                       groups, eps, silu, None if shift is None else shift.float())
    baseline = relative_error(eager_half(x, weight, bias, groups, eps, silu, shift).float().cpu(), ref.cpu())
    error = relative_error(y.float().cpu(), ref.cpu())
    assert error <= BOUND[DEVICE, dtype] * baseline + 1e-6, (error, baseline)


@pytest.mark.parametrize("programs", [0, 1, 3, 7], ids=lambda p: f"{p}-programs" if p else "one-per-tile")
@pytest.mark.parametrize("shape", [(1, 32, 96, 100, 32), (2, 320, 24, 24, 32), (3, 96, 3, 5, 8)],
                         ids=lambda s: "x".join(map(str, s)))
def test_statistics_merged_across_tiles_match_the_reference(shape, programs):
    # Few statistics programs: each merges many tiles (the last one fewer, or none past the end).
    x, weight, bias, shift = inputs(shape, torch.float16, seed=3)
    groups, eps = shape[-1], 1e-5
    out = torch.full_like(x, float("nan"))
    y = gn.launch(x, weight, bias, groups, eps, True, shift, out=out, stats_programs=programs)
    assert torch.isfinite(y).all()
    ref = gn.reference(x.float(), weight.float(), bias.float(), groups, eps, True, shift.float())
    baseline = relative_error(eager_half(x, weight, bias, groups, eps, True, shift).float().cpu(), ref.cpu())
    assert relative_error(y.float().cpu(), ref.cpu()) <= 1.5 * baseline + 1e-6


def test_fresh_inputs_give_fresh_results():
    shape = SHAPES[0]
    a, b = inputs(shape, torch.float16, seed=1), inputs(shape, torch.float16, seed=2)
    ya = gn.launch(a[0], a[1], a[2], 32, 1e-5, True)
    yb = gn.launch(b[0], b[1], b[2], 32, 1e-5, True)
    assert not torch.equal(ya, yb)
    torch.testing.assert_close(ya.float(), gn.reference(*a[:3], 32, 1e-5, True).float(), atol=2e-2, rtol=1e-2)


def test_op_falls_back_to_the_reference_for_layouts_the_kernels_do_not_take():
    x, weight, bias, _ = inputs(SHAPES[0], torch.float32)
    contiguous = x.contiguous()
    assert not gn.supported(contiguous, 32)
    y = torch.ops.diffjet.group_norm_silu(contiguous, weight, bias, 32, 1e-5, True)
    torch.testing.assert_close(y, F.silu(F.group_norm(contiguous, 32, weight, bias, 1e-5)))
    assert not gn.supported(x, 7)  # 320 channels do not split into 7 groups


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_op_traces_under_torch_compile(backend):
    # Traced with its fake implementation (one graph, no break, the output's layout as the kernels give it),
    # then run for real.
    x, weight, bias, shift = inputs(SHAPES[1], torch.float32)

    def f(x, shift):
        y = torch.ops.diffjet.group_norm_silu(x, weight, bias, 32, 1e-5, True, shift)
        return y * 2, y.stride()

    compiled = torch.compile(f, backend=backend, fullgraph=True)
    (got, stride), (want, want_stride) = compiled(x, shift), f(x, shift)
    torch.testing.assert_close(got, want)
    assert stride == want_stride == x.stride()  # channels-last in, channels-last out


@pytest.mark.gpu
def test_inductor_compiles_the_op_into_its_graph():
    x, weight, bias, shift = inputs(SHAPES[0], torch.float16)

    def f(x, shift):
        return torch.ops.diffjet.group_norm_silu(x * 1.5, weight, bias, 32, 1e-5, True, shift) + 1

    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(x, shift), f(x, shift), atol=1e-2, rtol=1e-2)


# --- the pass ------------------------------------------------------------------------------------


def test_pass_swaps_every_resnet_block_and_keeps_the_unet_output(tiny_path):  # about 25 s on a CPU
    unet = UNet2DConditionModel.from_pretrained(tiny_path, subfolder="unet").eval()
    reference = UNet2DConditionModel.from_pretrained(tiny_path, subfolder="unet").eval()
    unet.to(memory_format=torch.channels_last)
    resnets = sum(type(m).__name__ == "ResnetBlock2D" for m in unet.modules())
    assert kernel_pass.apply(unet, Config(kernels=())) is unet and kernel_pass.placements(unet)["resnet_blocks"] == 0
    assert Config().kernels == ("group_norm_silu", "geglu", "geglu_fp8", "qk_norm_rope", "gelu_epilogue",
                               "flash_attn_4"), (
        "all kernels are on by default")
    assert kernel_pass.apply(unet, Config(kernels=("group_norm_silu",))) is unet
    counts = kernel_pass.placements(unet)
    assert counts["resnet_blocks"] == resnets > 0 and counts["left_alone"] == 0
    assert counts["norm_out"] == 1 and counts["transformer_norms"] > 0
    kernel_pass.apply(unet, Config(kernels=("group_norm_silu",)))
    assert kernel_pass.placements(unet) == counts  # idempotent: nothing wrapped twice
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=g).contiguous(memory_format=torch.channels_last)
    states = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        got = unet(sample, 500, states).sample
        want = reference(sample, 500, states).sample
    assert relative_error(got, want) < 1e-5


def test_pass_keeps_every_parameter_object_under_its_name(tiny_path):
    # Compiled code, CUDA graphs and in-place LoRA merges hold the parameters the pipeline loaded: the
    # fused modules must read those very tensors, not copies, and the state dict keeps its names.
    unet = UNet2DConditionModel.from_pretrained(tiny_path, subfolder="unet").eval()
    unet.to(memory_format=torch.channels_last)
    before = dict(unet.named_parameters())
    kernel_pass.apply(unet, Config(kernels=("group_norm_silu",)))
    assert kernel_pass.placements(unet)["norm_out"] == 1
    after = dict(unet.named_parameters())
    assert after.keys() == before.keys()
    assert all(after[name] is parameter for name, parameter in before.items())
    assert isinstance(unet.conv_norm_out, kernel_pass.FusedGroupNorm)
    assert unet.conv_norm_out.weight is before["conv_norm_out.weight"]


def test_pass_feeds_the_kernels_channels_last_after_linear_projection_transformers(tiny_sdxl_path, monkeypatch):
    # SDXL's (and SD 2.x's) transformers end in `.contiguous()` NCHW; the op would fall back to its slow
    # PyTorch reference there. The fused modules hand it channels-last input, and the output is unchanged.
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_path, subfolder="unet").eval()
    reference = UNet2DConditionModel.from_pretrained(tiny_sdxl_path, subfolder="unet").eval()
    assert unet.config.use_linear_projection
    unet.to(memory_format=torch.channels_last)
    kernel_pass.apply(unet, Config(kernels=("group_norm_silu",)))
    layouts = []

    def recording(x, *args):
        layouts.append(x.is_contiguous(memory_format=torch.channels_last))
        return gn.group_norm_silu(x, *args)

    monkeypatch.setattr(kernel_pass, "group_norm_silu", recording)
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=g).contiguous(memory_format=torch.channels_last)
    states = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    added = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.randn(2, 6, generator=g)}
    with torch.no_grad():
        got = unet(sample, 500, states, added_cond_kwargs=added).sample
        want = reference(sample, 500, states, added_cond_kwargs=added).sample
    assert len(layouts) > 0 and all(layouts), layouts
    assert relative_error(got, want) < 1e-5


class _ReturningNchw(torch.nn.Module):
    def __init__(self, conv: torch.nn.Module) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).contiguous()


def test_a_resnet_block_feeds_the_kernels_channels_last_whatever_layout_its_convolution_returns(monkeypatch):
    # torch.export's fake convolution gives contiguous NCHW where the GPU's gives channels-last, and the op
    # gets exactly the traced layout: inside an AOTInductor package every second norm ran its slow PyTorch
    # reference (Config.precompile="aoti", sd15 on the H200). Here conv1 returns NCHW, as traced there.
    torch.manual_seed(0)
    block = ResnetBlock2D(in_channels=32, out_channels=64, temb_channels=16, groups=32).eval()
    reference = copy.deepcopy(block)
    block.to(memory_format=torch.channels_last)
    holder = torch.nn.Sequential(block)
    kernel_pass.apply(holder, Config(kernels=("group_norm_silu",)))
    assert isinstance(block, kernel_pass.FusedResnetBlock2D)
    monkeypatch.setattr(block, "conv1", _ReturningNchw(block.conv1))
    layouts = []

    def recording(x, *args):
        layouts.append(x.is_contiguous(memory_format=torch.channels_last))
        return gn.group_norm_silu(x, *args)

    monkeypatch.setattr(kernel_pass, "group_norm_silu", recording)
    x, temb = torch.randn(2, 32, 8, 8).contiguous(memory_format=torch.channels_last), torch.randn(2, 16)
    with torch.no_grad():
        got, want = block(x, temb), reference(x, temb)
    assert layouts == [True, True]
    assert relative_error(got, want) < 1e-5


class _ParameterOn(torch.nn.Module):
    """A module whose first parameter claims a device and dtype: each guard of `applies` alone, without a GPU."""

    def __init__(self, cuda: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.claimed = types.SimpleNamespace(is_cuda=cuda, dtype=dtype)

    def parameters(self, recurse: bool = True):
        yield self.claimed


@pytest.mark.parametrize(
    "cuda, dtype, config, applies",
    [
        (True, torch.float16, Config(), True),
        (True, torch.bfloat16, Config(), True),
        (False, torch.float16, Config(), False),  # the device guard alone
        (True, torch.float32, Config(), False),  # the dtype guard alone
        (True, torch.float16, Config(kernels=()), False),
        (True, torch.float16, Config(channels_last=False), False),
    ],
    ids=["cuda-fp16", "cuda-bf16", "cpu-fp16", "cuda-fp32", "no-kernels", "not-channels-last"],
)
def test_pass_applies_only_to_cuda_half_precision_channels_last(cuda, dtype, config, applies):
    assert kernel_pass.applies(_ParameterOn(cuda, dtype), config) is applies


def test_config_rejects_unknown_kernels():
    from diffjet.errors import ConfigError

    with pytest.raises(ConfigError, match="flash_qkv"):
        Config(kernels=("flash_qkv",))
    with pytest.raises(ConfigError, match="tuple"):
        Config(kernels="group_norm_silu")


@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_fake_implementation_matches_the_real_op(layout):
    x, weight, bias, shift = inputs(SHAPES[2], torch.float16 if DEVICE == "cuda" else torch.float32)
    if layout == "contiguous":
        x = x.contiguous()
    for args in ((x, weight, bias, 8, 1e-5, True, shift), (x, None, None, 8, 1e-6, False, None)):
        torch.library.opcheck(torch.ops.diffjet.group_norm_silu.default, args,
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.gpu
@pytest.mark.parametrize("kernels", [("group_norm_silu", "geglu"), ("group_norm_silu",)], ids=["default", "no-geglu"])
@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl"])
def test_pipeline_with_the_kernels_keeps_the_lossless_rule(model, kernels, monkeypatch):
    import diffjet
    from diffjet.kernels import geglu as gg
    from diffjet.models import load_pipeline
    from diffjet.quality import verify

    # At 64² the GEGLU outputs are far too small for the kernel to pay (`gg.pays`); run it at every size here.
    monkeypatch.setattr(gg, "pays", lambda rows, features, sms: True)
    config = Config(kernels=kernels, cache=False)
    placed = {}

    def compile_with_kernels(pipe):
        diffjet.compile(pipe, config)
        placed.update(kernel_pass.placements(pipe.unet))
        return pipe

    verdict = verify(lambda dtype: load_pipeline(model, device="cuda", dtype=dtype), device=torch.device("cuda"),
                     prompt="a cat", steps=4, height=64, width=64, seed=0, compile_pipe=compile_with_kernels)
    assert placed["resnet_blocks"] > 0
    assert (placed["geglu"] > 0) == ("geglu" in kernels)
    assert verdict.passed, verdict.table()
